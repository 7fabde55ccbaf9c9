"""Bad input, every reader: each case is a damaged file (or a name that would escape its folder) handed to
the CLI verb a user would hand it to. Every one must end in exactly one `error:` line that names the file
(and the line, tensor or key), exit 1, print no traceback, write nothing, and allocate nothing big when a
header lies about its size. The table of cases and messages is docs/errors.md, written by this module when
every case ran (`pytest tests/test_bad_input.py`).
"""

from __future__ import annotations

import json
import resource
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from mlxtune.cli import run

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "errors.md"
MAX_GROWTH_MB = 300  # a header claiming a terabyte must not allocate anything like it


@dataclass
class Case:
    id: str
    what: str  # what is wrong, for docs/errors.md
    reader: str  # which kind of file
    make: Callable  # (tmp, model) -> argv; builds the bad input under tmp
    needles: tuple[str, ...]  # each must be in the one error line
    absent: str | None = None  # a path under tmp the command must not create


# ----------------------------------------------------------------------------------------- makers


def model_copy(tmp: Path, model: Path) -> Path:
    dst = tmp / "model"
    shutil.copytree(model, dst)
    return dst


def safetensors(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def weights_case(mutate) -> Callable:
    """`gguf --model COPY` after `mutate(model.safetensors path)`."""

    def make(tmp, model):
        m = model_copy(tmp, model)
        mutate(m / "model.safetensors")
        return ["gguf", "--model", str(m), "--outfile", str(tmp / "out.gguf"), "--type", "f16"]

    return make


def truncate_to_half(f: Path) -> None:
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) // 2])


def header_of(f: Path) -> tuple[dict, bytes]:
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def edit_first_tensor(change) -> Callable:
    def mutate(f: Path) -> None:
        header, data = header_of(f)
        name = next(k for k in header if k != "__metadata__")
        change(header, name)
        safetensors(f, header, data)

    return mutate


def overlap(header, name):
    other = next(k for k in header if k not in ("__metadata__", name))
    header[name]["data_offsets"] = header[other]["data_offsets"]


def config_case(change) -> Callable:
    def make(tmp, model):
        m = model_copy(tmp, model)
        cfg = json.loads((m / "config.json").read_text())
        change(cfg)
        (m / "config.json").write_text(json.dumps(cfg))
        return ["gguf", "--model", str(m), "--outfile", str(tmp / "out.gguf"), "--type", "f16"]

    return make


def tokenizer_case(text: str) -> Callable:
    def make(tmp, model):
        m = model_copy(tmp, model)
        (m / "tokenizer.json").write_text(text)
        data = tmp / "d.jsonl"
        data.write_text(json.dumps({"text": "hello"}) + "\n")
        return ["data", "inspect", "--model", str(m), "--data", str(data)]

    return make


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama, tmp_path_factory):
    """A real adapter of the tiny model (random B so that it changes the model)."""
    import mlx.core as mx

    from mlxtune import load
    from mlxtune.adapters import save_adapter
    from mlxtune.layers import apply_lora, lora_modules

    model, _ = load(str(tiny_llama))
    apply_lora(model, lora_layers=-1, rank=4, alpha=8, target_modules="attention")
    for m in lora_modules(model).values():
        m.lora_b = mx.random.normal(m.lora_b.shape) * 0.1
    out = tmp_path_factory.mktemp("adapter")
    save_adapter(model, out / "adapters.npz", base_model=str(tiny_llama))
    return out


def adapter_case(mutate, verb="info") -> Callable:
    def make(tmp, model, adapter):
        a = tmp / "adapter"
        shutil.copytree(adapter, a)
        mutate(a)
        if verb == "info":
            return ["adapters", "info", str(a)]
        return ["fuse", "--model", str(model), "--adapter-file", str(a), "--save-path", str(tmp / "fused")]

    make.needs_adapter = True
    return make


def object_array(a: Path) -> None:
    with np.load(a / "adapters.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays[next(iter(arrays))] = np.array([{"x": 1}, None], dtype=object)
    np.savez(a / "adapters.npz", **arrays)


def drop_one_b(a: Path) -> None:
    with np.load(a / "adapters.npz") as z:
        arrays = {k: z[k] for k in z.files}
    del arrays[sorted(k for k in arrays if k.endswith("lora_b"))[0]]
    np.savez(a / "adapters.npz", **arrays)


def config_value(value, *keys) -> Callable:
    """Set `keys` (top level, and inside lora_parameters where mlx-lm keeps them) of adapter_config.json."""

    def mutate(a: Path) -> None:
        cfg = json.loads((a / "adapter_config.json").read_text())
        for key in keys:
            cfg[key] = value
            if key in cfg.get("lora_parameters", {}):
                cfg["lora_parameters"][key] = value
        (a / "adapter_config.json").write_text(json.dumps(cfg))

    return mutate


def yaml_case(text: str) -> Callable:
    def make(tmp, model):
        (tmp / "run.yaml").write_text(text)
        (tmp / "d.jsonl").write_bytes(CHAT + b"\n" + CHAT + b"\n")
        return ["lora", "--config", str(tmp / "run.yaml"), "--model", str(model), "--data", str(tmp / "d.jsonl"),
                "--adapter-file", str(tmp / "ad" / "adapters.npz")]

    return make


def gguf_bytes(n_tensors=0, n_kv=1, key=b"general.architecture", value=b"llama", key_len=None) -> bytes:
    kv = struct.pack("<Q", len(key) if key_len is None else key_len) + key + struct.pack("<I", 8)
    kv += struct.pack("<Q", len(value)) + value
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kv


def gguf_case(content) -> Callable:
    def make(tmp, model):
        f = tmp / "m.gguf"
        f.write_bytes(content(tmp, model) if callable(content) else content)
        return ["convert", "--gguf", str(f), "--mlx-path", str(tmp / "out")]

    return make


def real_gguf_cut(tmp, model) -> bytes:
    run_cli(["gguf", "--model", str(model), "--outfile", str(tmp / "whole.gguf"), "--type", "f16"])
    raw = (tmp / "whole.gguf").read_bytes()
    return raw[: len(raw) * 2 // 3]


def jsonl_case(raw: bytes, name="d.jsonl") -> Callable:
    def make(tmp, model):
        (tmp / name).write_bytes(raw)
        return ["data", "inspect", "--model", str(model), "--data", str(tmp / name)]

    return make


def convert_case(raw: bytes) -> Callable:
    def make(tmp, model):
        (tmp / "d.jsonl").write_bytes(raw)
        return ["data", "convert", str(tmp / "d.jsonl"), str(tmp / "out.jsonl"), "--to", "completions"]

    return make


def lmstudio_case(*flags) -> Callable:
    def make(tmp, model):
        (tmp / "m.gguf").write_bytes(gguf_bytes())
        return ["export", "lmstudio", "--gguf", str(tmp / "m.gguf"), "--models-dir", str(tmp / "models"), *flags]

    return make


CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}).encode()

CASES = [
    # safetensors headers and data
    Case("st-truncated", "model.safetensors cut in half", "safetensors", weights_case(truncate_to_half),
         ("model.safetensors",), "out.gguf"),
    Case("st-header-1tb", "header length field claims 1 TB", "safetensors",
         weights_case(lambda f: safetensors(f, {}, b"", length=1 << 40)), ("model.safetensors",), "out.gguf"),
    Case("st-header-not-json", "header is not JSON", "safetensors",
         weights_case(lambda f: safetensors(f, b"{not json")), ("model.safetensors",), "out.gguf"),
    Case("st-unknown-dtype", "a tensor of dtype F7", "safetensors",
         weights_case(edit_first_tensor(lambda h, n: h[n].update(dtype="F7"))), ("model.safetensors", "F7"), "out.gguf"),
    Case("st-past-end", "a tensor's data offsets past the end of the file", "safetensors",
         weights_case(edit_first_tensor(lambda h, n: h[n].update(data_offsets=[0, 1 << 40]))),
         ("model.safetensors",), "out.gguf"),
    Case("st-overlap", "two tensors share the same bytes", "safetensors", weights_case(edit_first_tensor(overlap)),
         ("model.safetensors",), "out.gguf"),
    Case("st-shape-size", "shape disagrees with the byte count", "safetensors",
         weights_case(edit_first_tensor(lambda h, n: h[n].update(shape=[1 << 20, 1 << 20]))),
         ("model.safetensors",), "out.gguf"),
    # config.json and tokenizer.json
    Case("config-no-model-type", "config.json without model_type", "config.json",
         config_case(lambda c: c.pop("model_type")), ("config.json", "model_type"), "out.gguf"),
    Case("config-no-layers", "config.json without num_hidden_layers", "config.json",
         config_case(lambda c: c.pop("num_hidden_layers")), ("num_hidden_layers",), "out.gguf"),
    Case("config-wrong-type", "hidden_size is a string", "config.json",
         config_case(lambda c: c.update(hidden_size="64")), ("hidden_size",), "out.gguf"),
    Case("tokenizer-not-json", "tokenizer.json is not JSON", "tokenizer.json", tokenizer_case("{oops"),
         ("tokenizer.json",)),
    Case("tokenizer-wrong-shape", "tokenizer.json is JSON but not a tokenizer", "tokenizer.json",
         tokenizer_case('{"model": 3}'), ("tokenizer.json",)),
    # adapters
    Case("npz-object-array", "adapters.npz holds an object array", "adapter", adapter_case(object_array),
         ("adapters.npz",)),
    Case("npz-not-zip", "adapters.npz is not an npz", "adapter",
         adapter_case(lambda a: (a / "adapters.npz").write_bytes(b"PK\x03\x04garbage")), ("adapters.npz",)),
    Case("npz-missing-key", "adapters.npz lacks one lora_b", "adapter", adapter_case(drop_one_b, verb="fuse"),
         ("lora_b",), "fused"),
    Case("adapter-config-rank-str", "adapter_config.json rank is a string", "adapter",
         adapter_case(config_value("eight", "rank")), ("adapter_config.json", "rank")),
    Case("adapter-config-layers-list", "adapter_config.json num_layers is a list", "adapter",
         adapter_case(config_value([1, 2], "lora_layers", "num_layers")), ("adapter_config.json", "layers")),
    Case("adapter-config-not-json", "adapter_config.json is not JSON", "adapter",
         adapter_case(lambda a: (a / "adapter_config.json").write_text("{")), ("adapter_config.json",)),
    # YAML
    Case("yaml-syntax", "YAML with a syntax error", "YAML", yaml_case("iters: [1, 2\nbatch_size: 2\n"),
         ("run.yaml",), "ad"),
    Case("yaml-not-mapping", "YAML that is a list, not settings", "YAML", yaml_case("- 1\n- 2\n"), ("run.yaml",), "ad"),
    Case("yaml-wrong-type", "a setting of the wrong type", "YAML", yaml_case("iters: many\n"), ("run.yaml", "iters"), "ad"),
    # GGUF
    Case("gguf-truncated", "a real GGUF cut at two thirds", "GGUF", gguf_case(real_gguf_cut), ("m.gguf",), "out"),
    Case("gguf-tensor-count", "tensor count claims 2^60", "GGUF", gguf_case(gguf_bytes(n_tensors=1 << 60)),
         ("m.gguf",), "out"),
    Case("gguf-kv-count", "key/value count claims 2^60", "GGUF", gguf_case(gguf_bytes(n_kv=1 << 60)), ("m.gguf",), "out"),
    Case("gguf-string-length", "a key's length claims 2^60 bytes", "GGUF", gguf_case(gguf_bytes(key_len=1 << 60)),
         ("m.gguf",), "out"),
    Case("gguf-magic", "not a GGUF file at all", "GGUF", gguf_case(b"PK\x03\x04" + bytes(64)), ("m.gguf",), "out"),
    # data files
    Case("jsonl-nul", "a NUL byte in a line", "JSONL", jsonl_case(CHAT + b"\n" + CHAT[:10] + b"\0" + CHAT[10:] + b"\n"),
         ("d.jsonl:2", "NUL")),
    Case("jsonl-utf16", "a UTF-16 file", "JSONL", jsonl_case((CHAT.decode() + "\n").encode("utf-16")), ("d.jsonl:1",)),
    Case("jsonl-bad-utf8", "bytes that are not UTF-8", "JSONL", jsonl_case(CHAT + b"\n" + CHAT[:20] + b"\xff\xfe" + CHAT[20:]),
         ("d.jsonl:2", "UTF-8")),
    Case("jsonl-50mb-line", "a 50 MB line", "JSONL",
         jsonl_case(CHAT + b"\n" + b'{"text": "' + b"a" * (50 << 20) + b'"}\n'), ("d.jsonl:2", "MB")),
    Case("jsonl-not-json", "a line that is not JSON", "JSONL", jsonl_case(CHAT + b"\n{'text': 'single quotes'}\n"),
         ("d.jsonl:2", "not valid JSON")),
    Case("json-array-unclosed", "a JSON array without its ']'", "JSONL", jsonl_case(b"[" + CHAT + b",\n" + CHAT, "d.json"),
         ("d.json:",)),
    Case("convert-nul", "data convert of a file with a NUL byte", "JSONL", convert_case(CHAT + b"\n\0\n"),
         ("d.jsonl:2",), "out.jsonl"),
    # names that would become paths
    Case("lmstudio-publisher-escape", "export lmstudio --publisher ../../x", "path",
         lmstudio_case("--publisher", "../../x"), ("--publisher",), "x"),
    Case("lmstudio-name-separator", "export lmstudio --name a/b", "path", lmstudio_case("--name", "a/b"), ("--name",),
         "models"),
]

_messages: dict[str, str] = {}


def run_cli(argv) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            run(list(argv))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, err.getvalue()


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("MLXTUNE_NO_OPENBLAS", "1")
    monkeypatch.setenv("MLXTUNE_DEBUG", "0")
    monkeypatch.setenv("MLXTUNE_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_naming_the_file(case, tiny_llama, adapter_dir, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    args = (work, tiny_llama, adapter_dir) if getattr(case.make, "needs_adapter", False) else (work, tiny_llama)
    argv = case.make(*args)
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, err = run_cli(argv)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    # Progress bars and notes may come before it; the error is one line, said once.
    assert code == 1 and err.count("error: ") == 1, err
    line = err[err.index("error: "):].split("\n")[0].split("\r")[0]
    assert "Traceback" not in err
    for needle in case.needles:
        assert needle in line, line
    assert grown_mb < MAX_GROWTH_MB, f"{grown_mb:.0f} MB allocated"
    if case.absent:
        assert not (work / case.absent).exists(), f"{case.absent} was written"
    assert not [p for p in work.rglob("*") if ".tmp" in p.name or p.name.startswith(".mlxtune")], "temp files left"
    for p, mtime in before.items():  # inputs untouched
        assert p.exists() and p.stat().st_mtime_ns == mtime, f"{p} changed"
    message = line.replace(str(work) + "/", "").replace(str(tiny_llama), "MODEL").replace(str(adapter_dir), "ADAPTER")
    _messages[case.id] = message


def test_bom_and_crlf_are_accepted(tiny_llama, tmp_path):
    (tmp_path / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + CHAT + b"\r\n" + CHAT + b"\r\n\r\n")
    code, err = run_cli(["data", "inspect", "--model", str(tiny_llama), "--data", str(tmp_path / "d.jsonl"),
                         "--valid-split", "0"])
    assert code == 0, err


def test_zz_write_docs_errors_md():
    """docs/errors.md: every case and its message, once every case above has run."""
    if set(_messages) != {c.id for c in CASES}:
        pytest.skip("only written when every case ran (run the whole module)")
    rows = ["# Errors: every bad input and what mlxtune says", "",
            "Generated by `tests/test_bad_input.py` (run the module to refresh it). Each case is handed to the CLI verb",
            "a user would hand it to; each ends in this one line on stderr, exit status 1, no traceback, nothing",
            "written, nothing big allocated. Paths are shown relative to the case's folder.", "",
            "| reader | case | message |", "|---|---|---|"]
    for c in CASES:
        message = _messages[c.id].replace("|", "\\|")
        rows.append(f"| {c.reader} | {c.what} | `{message}` |")
    DOC.write_text("\n".join(rows) + "\n")
