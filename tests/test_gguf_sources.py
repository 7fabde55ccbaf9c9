"""`--model FILE.gguf` (and lmstudio:/ollama: references) through every verb, the import cache, the
adapter's recorded base, `fuse --gguf` in one step, and one-line errors for damaged files."""

from __future__ import annotations

import hashlib
import io
import json
import struct

import mlx.core as mx
import numpy as np
import pytest
from test_cli import assert_one_line_error, inprocess_cli

from mlxtune.gguf import to_gguf
from mlxtune.gguf.sources import find_lmstudio, find_ollama, gguf_model_dir
from mlxtune.models import load_model

import llamacpp

QUIET = dict(progress=False, log=lambda *a: None)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama, tmp_path_factory):
    """The tiny llama as a Q8_0 GGUF (its matrices stay 8-bit when imported)."""
    return to_gguf(tiny_llama, tmp_path_factory.mktemp("tg") / "tiny.Q8_0.gguf", "q8_0", **QUIET)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("chatdata")
    words = ["alpha", "beta", "gamma", "delta", "SELECT", "name", "FROM", "users", "hello", "world"]
    for name, n in (("train", 16), ("valid", 4), ("test", 4)):
        rows = []
        for i in range(n):
            q = " ".join(words[(i + k) % len(words)] for k in range(3 + i % 4))
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": q.upper()}]})
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


def test_cache_is_keyed_by_content_and_reused(tiny_gguf, cache, tmp_path):
    lines = []
    first = gguf_model_dir(tiny_gguf, log=lines.append, progress=False)
    digest = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert first == cache / digest[:32] and (first / "config.json").exists()
    assert "importing" in lines[0] and str(first) in lines[0]
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    # a copy under another name is the same content: the same import, not a second one
    copy = tmp_path / "renamed.gguf"
    copy.write_bytes(tiny_gguf.read_bytes())
    assert gguf_model_dir(copy, log=lines.append, progress=False) == first
    assert "using its MLX import in" in lines[-1] and str(first) in lines[-1]
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    cfg = json.loads((first / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 8  # the default import keeps Q8_0 quantized: a small QLoRA base


def test_lmstudio_and_ollama_layouts(tiny_gguf, cache, tmp_path, monkeypatch, capsys):
    # LM Studio: models/<publisher>/<model>/<file>.gguf (a vision projector beside it is not the model)
    lms = tmp_path / "lmstudio"
    folder = lms / "tester" / "Tiny-GGUF"
    folder.mkdir(parents=True)
    (folder / "tiny.Q8_0.gguf").write_bytes(tiny_gguf.read_bytes())
    (folder / "mmproj-tiny-f16.gguf").write_bytes(b"GGUF")
    monkeypatch.setenv("LMSTUDIO_MODELS", str(lms))
    assert find_lmstudio("tester/Tiny-GGUF") == folder / "tiny.Q8_0.gguf"
    # Ollama: manifests/registry.ollama.ai/library/<name>/<tag> -> layers -> blobs/sha256-<digest>
    oll = tmp_path / "ollama"
    data = tiny_gguf.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (oll / "blobs").mkdir(parents=True)
    (oll / "blobs" / digest.replace(":", "-")).write_bytes(data)
    manifest = oll / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "q8"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:00", "size": 1},
        {"mediaType": "application/vnd.ollama.image.model", "digest": digest, "size": len(data)}]}))
    monkeypatch.setenv("OLLAMA_MODELS", str(oll))
    assert find_ollama("tiny:q8") == oll / "blobs" / digest.replace(":", "-")

    a = load_model("lmstudio:tester/Tiny-GGUF")
    b = load_model("ollama:tiny:q8")
    assert a.path == b.path  # same bytes, same cached import
    ids = mx.array([[1, 17, 42, 99]])
    assert np.array_equal(np.array(a.model(ids)), np.array(b.model(ids)))

    capsys.readouterr()
    code, _, err = inprocess_cli(["generate", "--model", "ollama:tiny:latest", "--prompt", "hi"], monkeypatch, capsys)
    assert_one_line_error(code, err, "ollama:tiny:latest", "manifest")


def test_every_verb_takes_a_gguf_file(tiny_gguf, chat_dir, cache, tmp_path, monkeypatch, capsys):
    """generate, chat, eval, data inspect, lora, fuse (--gguf in one step) and gguf with --model FILE.gguf."""
    model = str(tiny_gguf)
    code, out, err = inprocess_cli(["generate", "--model", model, "--prompt", "hello", "--max-tokens", "4"],
                                   monkeypatch, capsys)
    assert code == 0, err
    assert "importing" in out + err and str(cache) in out + err

    code, out, err = inprocess_cli(["data", "inspect", "--model", model, "--data", str(chat_dir)], monkeypatch, capsys)
    assert code == 0, err
    assert "using its MLX import" in out + err

    code, out, err = inprocess_cli(["eval", "--model", model, "--data", str(chat_dir), "--max-tokens", "4"],
                                   monkeypatch, capsys)
    assert code == 0, err

    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n/exit\n"))
    code, out, err = inprocess_cli(["chat", "--model", model, "--max-tokens", "4"], monkeypatch, capsys)
    assert code == 0, err

    adapter = tmp_path / "ad" / "adapters.safetensors"
    code, out, err = inprocess_cli(["lora", "--model", model, "--data", str(chat_dir), "--iters", "3",
                                    "--batch-size", "2", "--lora-layers", "2", "--learning-rate", "1e-2",
                                    "--adapter-file", str(adapter), "--steps-per-eval", "100"], monkeypatch, capsys)
    assert code == 0, err
    recorded = json.loads((adapter.parent / "adapter_config.json").read_text())
    assert recorded["base_model"] == str(tiny_gguf.resolve())  # the GGUF is the adapter's base

    fused, out_gguf = tmp_path / "fused", tmp_path / "tuned.gguf"
    code, out, err = inprocess_cli(["fuse", "--model", model, "--adapter-file", str(adapter), "--save-path",
                                    str(fused), "--gguf", str(out_gguf), "--gguf-type", "f32"], monkeypatch, capsys)
    assert code == 0, err
    ids = [1, 17, 42, 99, 7, 256, 300, 12]
    tuned = np.array(load_model(fused).model(mx.array([ids]))[0].astype(mx.float32))
    base = np.array(load_model(model).model(mx.array([ids]))[0].astype(mx.float32))
    got = llamacpp.logits(out_gguf, ids)
    assert np.abs(got - tuned).max() <= 2e-3  # the tuned GGUF holds the fused model
    assert np.abs(tuned - base).max() > 1e-2  # ... which the adapter changed

    code, out, err = inprocess_cli(["gguf", "--model", model, "--outfile", str(tmp_path / "again.gguf"),
                                    "--type", "f32"], monkeypatch, capsys)
    assert code == 0, err
    assert np.abs(llamacpp.logits(tmp_path / "again.gguf", ids) - base).max() <= 2e-3


# ---------------------------------------------------------------- damaged files: one line, nothing written

@pytest.mark.parametrize("case, needle", [
    ("truncated", "runs past the end of the file"),
    ("bad magic", "is not a GGUF file"),
    ("count that lies", "more than a"),
    ("unknown type", "type id 99"),
    ("unsupported type", "Q8_1, which mlxtune cannot import"),
    ("tensor past the end", "runs past the end of the file"),
    ("unknown architecture", "architecture 'mamba' cannot be imported"),
    ("array count that lies", "tokenizer.ggml.tokens"),
])
def test_damaged_file_is_one_line_error_and_nothing_is_written(case, needle, tiny_gguf, tmp_path, monkeypatch, capsys):
    data = bytearray(tiny_gguf.read_bytes())
    from mlxtune.gguf.reader import read_gguf

    g = read_gguf(tiny_gguf)
    first = next(iter(g.tensors.values()))
    # where the first tensor's info sits: its name, then n_dims (u32), dims (u64 each), type (u32), offset (u64)
    name_at = data.index(first.name.encode() + struct.pack("<I", len(first.shape)))
    type_at = name_at + len(first.name) + 4 + 8 * len(first.shape)
    if case == "truncated":
        data = data[: len(data) - 1000]
    elif case == "bad magic":
        data[:4] = b"GGML"
    elif case == "count that lies":
        data[8:16] = struct.pack("<Q", 10**9)
    elif case == "unknown type":
        data[type_at:type_at + 4] = struct.pack("<I", 99)
    elif case == "unsupported type":
        data[type_at:type_at + 4] = struct.pack("<I", 9)  # Q8_1: a GGML type, but not one models are published in
    elif case == "tensor past the end":
        data[type_at + 4:type_at + 12] = struct.pack("<Q", len(data))
    elif case == "unknown architecture":
        at = data.index(b"general.architecture") + len("general.architecture") + 4 + 8
        data[at:at + 5] = b"mamba"
    elif case == "array count that lies":
        at = data.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 4 + 4
        data[at:at + 8] = struct.pack("<Q", 10**8)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    out = tmp_path / "out"
    code, _, err = inprocess_cli(["convert", "--gguf", str(bad), "--mlx-path", str(out)], monkeypatch, capsys)
    assert_one_line_error(code, err, str(bad), needle)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


@pytest.mark.parametrize("how", ["requantize", "bfloat16"])
def test_convert_options(how, tiny_gguf, tiny_llama, tmp_path):
    """-q re-quantizes with MLX's settings (8-bit here, so the logits stay close); --de-quantize --dtype
    bfloat16 gives a bfloat16 float model."""
    import mlxtune

    if how == "requantize":
        r = mlxtune.convert(gguf=tiny_gguf, mlx_path=tmp_path / "m", quantize=True, q_bits=8, q_group_size=32,
                            progress=False)
        cfg = json.loads((r.path / "config.json").read_text())
        assert cfg["quantization"]["bits"] == 8 and cfg["quantization"]["group_size"] == 32
        assert all("re-quantized to 8-bit" in what or what.startswith("cast") for _, what in r.fates)
    else:
        r = mlxtune.convert(gguf=tiny_gguf, mlx_path=tmp_path / "m", dequantize=True, dtype="bfloat16", progress=False)
        assert "quantization" not in json.loads((r.path / "config.json").read_text())
        weights = mx.load(str(r.path / "model.safetensors"))
        assert {v.dtype for v in weights.values()} == {mx.bfloat16}
    ids = mx.array([[1, 17, 42, 99, 7, 256, 300, 12]])
    ours = np.array(load_model(r.path).model(ids).astype(mx.float32))
    ref = np.array(load_model(tiny_llama).model(ids).astype(mx.float32))
    assert np.abs(ours - ref).max() <= 0.05 * np.abs(ref).max()


def test_values_beyond_float16_are_refused_by_name(tiny_llama, tmp_path, monkeypatch, capsys):
    """A float tensor that float16 cannot hold is one line naming it, not a model full of infinities."""
    import shutil

    from safetensors.numpy import load_file, save_file

    src = tmp_path / "big"
    shutil.copytree(tiny_llama, src)
    weights = load_file(src / "model.safetensors")
    weights["model.norm.weight"][3] = 1e5
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    path = to_gguf(src, tmp_path / "big.gguf", "f32", **QUIET)
    code, _, err = inprocess_cli(["convert", "--gguf", str(path), "--mlx-path", str(tmp_path / "o"), "--dtype",
                                  "float16"], monkeypatch, capsys)
    # found while streaming, so the progress bar has started: the error is its own last line
    last = err.strip().splitlines()[-1]
    assert code == 1 and "Traceback" not in err
    assert last.startswith("error: ") and "output_norm.weight" in last and "--dtype bfloat16" in last
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o*"))
