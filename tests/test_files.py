"""Atomic writes: data reaches the disk (fsync) before the rename, and the folder after it."""

from __future__ import annotations

import os

from mlxtune import files


def test_atomic_writes_fsync_the_data_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    files.write_text_atomic(tmp_path / "a.txt", "hello")
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"]
    assert events[0][1].startswith(str(tmp_path / ".a.txt.")) and events[2][1] == str(tmp_path)
    assert (tmp_path / "a.txt").read_text() == "hello"

    events.clear()
    with files.atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x.bin").write_bytes(b"1")
    assert [kind for kind, _ in events] == ["fsync", "fsync", "replace", "fsync"]  # x.bin, the dir, rename, parent

    events.clear()
    files.append_line(tmp_path / "m.jsonl", '{"iteration": 1}')
    files.append_line(tmp_path / "m.jsonl", '{"iteration": 2}')
    assert [kind for kind, _ in events] == ["fsync", "fsync"]
    assert (tmp_path / "m.jsonl").read_text() == '{"iteration": 1}\n{"iteration": 2}\n'
