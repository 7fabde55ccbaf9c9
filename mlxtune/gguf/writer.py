"""Write a fused Hugging Face / MLX model directory as one GGUF file that llama.cpp loads.

Metadata and tensor names come from `arch`, tokenizer keys from `tokenizer.add_tokenizer`, encodings
from `quants`. The one thing to know: tensors are never loaded whole. Each one is handed to
`gguf.GGUFWriter` as a small object whose `tofile()` reads row chunks from the safetensors files,
converts and encodes them and writes them out, so memory stays at a few chunks whatever the model
size. Rows are read with plain file reads rather than a memory map, because mapped pages count
towards the process's resident memory until the whole file is unmapped.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from tqdm.auto import tqdm

from ..errors import ExportError
from ..files import atomic_file
from ..model_files import normalize_config, read_config
from ..weights import StoredTensor, index_tensors
from . import arch as archmod
from .quants import FileType, bf16_to_f16, encode, quantize_q8_0_checked, row_bytes, tensor_type
from .tokenizer import add_tokenizer

CHUNK_VALUES = 1 << 20  # values converted at a time (4 MiB as float32)
READABLE = ("F32", "F16", "BF16", "U32", "F64")  # stored dtypes the writer converts
IMPORTANCE_FLOOR = 0.01  # of a tensor's mean column importance


# ---------------------------------------------------------------- reading safetensors


def _to_float32(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        wide = a.astype(np.uint32)
        np.left_shift(wide, 16, out=wide)  # bf16 is the top half of a float32
        return wide.view(np.float32)
    return a.astype(np.float32, copy=False)


def dequantize_mlx(wq: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int) -> np.ndarray:
    """MLX affine-quantized rows (uint32 words, values packed low bits first) -> float32 rows."""
    rows = wq.shape[0]
    bitstream = np.unpackbits(wq.astype("<u4").view(np.uint8).reshape(rows, -1), axis=1, bitorder="little")
    values = bitstream.reshape(rows, -1, bits) @ (1 << np.arange(bits, dtype=np.uint32))
    groups = scales.shape[1]
    values = values.reshape(rows, groups, -1).astype(np.float32)
    return (values * scales[:, :, None] + biases[:, :, None]).reshape(rows, -1)


# ---------------------------------------------------------------- the plan: one entry per GGUF tensor


@dataclass
class Planned:
    """One GGUF tensor: where its rows come from and how they are changed and encoded."""

    name: str
    shape: tuple[int, ...]          # numpy order (rows, cols) or (n,)
    qtype: Q
    read: Callable[[int, int], np.ndarray]  # float32 rows [a, b)
    row_align: int = 1              # chunks start at multiples of this (q/k permutation works per head)
    source: str = ""
    read_bf16: Callable[[int, int], np.ndarray] | None = None  # stored bf16 bits, for the direct F16 path
    importance: np.ndarray | None = None  # per-column weights for the scale search (--keep-adapter)

    @property
    def rows(self) -> int:
        return self.shape[0] if len(self.shape) > 1 else 1

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def nbytes(self) -> int:
        if self.qtype == Q.F32:
            return self.rows * self.cols * 4
        if self.qtype == Q.F16:
            return self.rows * self.cols * 2
        return self.rows * row_bytes(self.qtype, self.cols)


def _mlx_quant_bits(config: dict, module: str) -> tuple[int, int]:
    q = config.get("quantization") or config.get("quantization_config") or {}
    if q.get("mode", "affine") != "affine":
        raise ExportError(f"MLX {q.get('mode')} quantization cannot be read back: give the float (fused, de-quantized) model")
    override = q.get(module)
    if isinstance(override, dict):
        return int(override.get("bits", q.get("bits", 4))), int(override.get("group_size", q.get("group_size", 64)))
    return int(q.get("bits", 4)), int(q.get("group_size", 64))


def _reader(index: dict[str, StoredTensor], name: str, config: dict
            ) -> tuple[tuple[int, ...], Callable[[int, int], np.ndarray], bool]:
    """(float shape, row reader, was it MLX-quantized) for stored tensor `name`."""
    st = index[name]
    base = name[: -len(".weight")] if name.endswith(".weight") else None
    if st.dtype == "U32" and base and f"{base}.scales" in index:
        bits, _ = _mlx_quant_bits(config, base)
        sc, bi = index[f"{base}.scales"], index[f"{base}.biases"]
        shape = (st.shape[0], st.shape[1] * 32 // bits)

        def read_q(a: int, b: int) -> np.ndarray:
            return dequantize_mlx(st.read_rows(a, b), _to_float32(sc.read_rows(a, b), sc.dtype),
                                  _to_float32(bi.read_rows(a, b), bi.dtype), bits)

        return shape, read_q, True
    if st.dtype == "U32":
        raise ExportError(f"tensor {name} is uint32 without MLX .scales/.biases: not a weight mlxtune can convert")

    def read(a: int, b: int) -> np.ndarray:
        if len(st.shape) == 1:
            return _to_float32(st.read_rows(0, st.shape[0]), st.dtype)[None, :]
        return _to_float32(st.read_rows(a, b), st.dtype).reshape(b - a, -1)

    return st.shape, read, False


def plan_tensors(index: dict[str, StoredTensor], arch: archmod.Arch, cfg: dict, config: dict,
                 ftype: FileType) -> tuple[list[Planned], bool]:
    """Every tensor of the GGUF file, in file order, and whether any was MLX-quantized."""
    n_layers = cfg["num_hidden_layers"]
    name_of = archmod.tensor_namer(arch, n_layers)
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    tied = bool(cfg.get("tie_word_embeddings", False)) or not arch.output_allowed
    entries: list[tuple[str, str]] = []
    for name in index:
        if _is_quant_aux(index, name):
            continue
        hf = archmod.text_tensor_name(name)
        if hf is None or (hf == "lm_head.weight" and tied):
            continue
        entries.append((name, hf))
    if not any(hf == "lm_head.weight" for _, hf in entries):
        tied = True
    planned: list[Planned] = []
    quantized = False
    for name, hf in entries:
        gname = name_of(hf)
        shape, read, was_q = _reader(index, name, config)
        quantized |= was_q
        if len(shape) > 2:
            raise ExportError(f"tensor {name} has {len(shape)} dimensions: only dense 1-D/2-D weights are supported")
        align = 1
        if arch.permute_qk and re.search(r"\.(q_proj|k_proj)\.(weight|bias)$", hf):
            heads = n_head if ".q_proj." in hf else n_kv
            perm = archmod.qk_permutation(shape[0], heads)
            align = shape[0] // heads if len(shape) > 1 else 1
            read = _permuted(read, perm, len(shape) == 1)
        if arch.norm_offset and hf.endswith("norm.weight"):
            read = _offset(read, arch.norm_offset)
        qtype = tensor_type(gname, tuple(shape), ftype, n_layers, tied)
        raw = None
        if qtype == Q.F16 and index[name].dtype == "BF16" and len(shape) == 2:
            # bf16 -> f16 straight from the stored bits (same bytes, half the work); 2-D weights get no norm offset
            raw = index[name].read_rows
            if arch.permute_qk and re.search(r"\.(q_proj|k_proj)\.weight$", hf):
                raw = _permuted(raw, perm, False)
        planned.append(Planned(gname, tuple(shape), qtype, read, align, name, raw))
    for gname, values in archmod.extra_tensors(arch, cfg).items():
        planned.append(Planned(gname, values.shape, Q.F32, lambda a, b, v=values: v[None, :], 1, "(generated)"))
    _check_complete(planned, arch, cfg)
    return planned, quantized


def _is_quant_aux(index: dict[str, StoredTensor], name: str) -> bool:
    """MLX quantization's per-group `.scales`/`.biases`: read together with their uint32 `.weight`."""
    if not name.endswith((".scales", ".biases")):
        return False
    weight = index.get(name.rsplit(".", 1)[0] + ".weight")
    return weight is not None and weight.dtype == "U32"


def _permuted(read, perm, one_dim: bool):
    if one_dim:
        return lambda a, b: read(a, b)[:, perm]

    def read_perm(a: int, b: int) -> np.ndarray:
        rows = read(int(perm[a:b].min()), int(perm[a:b].max()) + 1)
        return rows[perm[a:b] - perm[a:b].min()]
    return read_perm


def _offset(read, delta: float):
    return lambda a, b: read(a, b) + np.float32(delta)


def _check_complete(planned: list[Planned], arch: archmod.Arch, cfg: dict) -> None:
    names = {p.name for p in planned}
    if "token_embd.weight" not in names:
        raise ExportError("the model has no token embedding (model.embed_tokens.weight): is this a complete model directory?")
    missing = [f"blk.{i}" for i in range(cfg["num_hidden_layers"]) if f"blk.{i}.attn_norm.weight" not in names]
    if missing:
        raise ExportError(f"layers {', '.join(missing[:5])} are missing from the safetensors files "
                          f"but config.json says num_hidden_layers={cfg['num_hidden_layers']}")


# ---------------------------------------------------------------- streaming into GGUFWriter


def _checked_f16(values: np.ndarray, source: str) -> np.ndarray:
    """float16 values from finite inputs: an infinity here is an input beyond float16's range (65504)."""
    if not np.isfinite(values).all():
        raise ExportError(f"tensor {source} has values beyond float16's range (|x| > 65504): write this model as "
                          "--type bf16, f32 or q8_0 instead of f16")
    return values


def _non_finite(source: str) -> ExportError:
    return ExportError(f"tensor {source} has NaN or infinite values: the model is broken, fix it before exporting")


@dataclass
class _Streamed:
    """What GGUFWriter.add_tensor needs (shape, dtype, nbytes, tofile), producing bytes chunk by chunk."""

    plan: Planned
    bar: object = None
    workers: int = 1
    shape: tuple[int, ...] = field(init=False)
    dtype: np.dtype = field(init=False)
    nbytes: int = field(init=False)

    def __post_init__(self):
        p = self.plan
        if p.qtype == Q.F32:
            self.dtype, self.shape = np.dtype(np.float32), p.shape
        elif p.qtype == Q.F16:
            self.dtype, self.shape = np.dtype(np.float16), p.shape
        else:
            self.dtype, self.shape = np.dtype(np.uint8), (p.rows, row_bytes(p.qtype, p.cols))
        self.nbytes = p.nbytes

    def _chunks(self):
        p = self.plan
        step = max(1, CHUNK_VALUES // p.cols)
        step = max(p.row_align, step - step % p.row_align)
        return [(a, min(a + step, p.rows)) for a in range(0, p.rows, step)]

    def _encode(self, span) -> np.ndarray:
        a, b = span
        if self.plan.read_bf16 is not None:
            bits = self.plan.read_bf16(a, b)
            if ((bits & 0x7F80) == 0x7F80).any():  # exponent all ones: infinity or NaN
                raise _non_finite(self.plan.source)
            return _checked_f16(bf16_to_f16(bits).view(np.float16), self.plan.source)
        rows = self.plan.read(a, b)
        if self.plan.qtype == Q.Q8_0:
            out, finite = quantize_q8_0_checked(np.ascontiguousarray(rows, dtype=np.float32))
            if not finite:
                raise _non_finite(self.plan.source)
            return out.reshape(-1) if len(self.plan.shape) == 1 else out
        # one summing pass: any NaN or infinity makes the sum non-finite
        if not np.isfinite(np.add.reduce(rows, axis=None, dtype=np.float64)):
            raise _non_finite(self.plan.source)
        out = encode(rows, self.plan.qtype, self.plan.importance)
        if self.plan.qtype == Q.F16:
            out = _checked_f16(out, self.plan.source)
        return out.reshape(-1) if len(self.plan.shape) == 1 else out

    def tofile(self, f) -> None:
        chunks = self._chunks()
        if self.workers > 1 and len(chunks) > 1:
            # numpy releases the GIL in the encoders; keep only a few chunks in flight
            with ThreadPoolExecutor(self.workers) as pool:
                pending = []
                for span in chunks:
                    pending.append(pool.submit(self._encode, span))
                    if len(pending) > self.workers:
                        self._write(f, pending.pop(0).result())
                for fut in pending:
                    self._write(f, fut.result())
        else:
            for span in chunks:
                self._write(f, self._encode(span))

    def _write(self, f, data: np.ndarray) -> None:
        data.tofile(f)
        if self.bar is not None:
            self.bar.update(data.nbytes)


# ---------------------------------------------------------------- the public function


def _add_tokenizer(w: gguf.GGUFWriter, model_dir: Path, config: dict, pre_tokenizer: str | None, log) -> None:
    info = add_tokenizer(w, model_dir, config, pre_tokenizer=pre_tokenizer)
    for note in getattr(info, "notes", None) or []:
        log(f"tokenizer: {note}")


def _kv_value(w: gguf.GGUFWriter, key: str):
    for kv in w.kv_data:
        if key in kv:
            return kv[key].value
    return None


def write_gguf(model_dir: Path, outfile: Path, ftype: FileType, *, pre_tokenizer: str | None = None,
               progress: bool = True, workers: int | None = None, verify: bool = True, keep_adapter=None,
               data=None, log=print) -> list[Planned]:
    """Convert `model_dir` into `outfile` (written atomically). Returns the tensors written.

    With `verify`, the file is read back and checked before it is renamed into place: a bad file never
    replaces a good one (with --force), nothing is left behind. keep_adapter / data: the adapter fused into
    `model_dir` and its training data, for fine-tune-aware quantization (`keep_adapter.py`).
    """
    config = normalize_config(read_config(model_dir))
    arch, cfg = archmod.resolve_arch(config, str(model_dir / "config.json"))
    index = index_tensors(model_dir)
    unreadable = next((n for n, t in index.items() if t.dtype not in READABLE), None)
    if unreadable:
        raise ExportError(f"tensor {unreadable} in {index[unreadable].file} has dtype {index[unreadable].dtype}, "
                          "which mlxtune gguf cannot read")
    planned, quantized = plan_tensors(index, arch, cfg, config, ftype)
    keep = None
    if keep_adapter is not None:
        # imported here: the plan loads the fused model with MLX (mlx-lm, transformers) and reads the data
        # pipeline, which load models through this package; the plain writer stays free of both
        from .keep_adapter import plan_keep_adapter

        keep = plan_keep_adapter(model_dir, keep_adapter, data, planned, arch, cfg, progress=progress)
        plain = sum(p.nbytes for p in planned)
        apply_keep_adapter(planned, keep)
        extra = sum(p.nbytes for p in planned) - plain
        log(f"{keep.summary()}; tensors {extra / 1024:+,.0f} KiB ({extra / plain:+.1%}) against plain {ftype.value}")
    if quantized:
        log(f"note: {model_dir} holds MLX-quantized weights; they are de-quantized and re-quantized as "
            f"{ftype.value}, which loses a little more quality than converting the original float model")

    embd = next(p for p in planned if p.name == "token_embd.weight")
    with atomic_file(outfile) as tmp:
        w = gguf.GGUFWriter(tmp, arch.name)
        try:
            w.add_type(gguf.GGUFType.MODEL)
            w.add_file_type(ftype.llama_file_type)
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            archmod.add_metadata(w, arch, {**cfg, "vocab_size": embd.rows})
            # the token list is padded to the embedding's rows, which is what llama.cpp checks
            _add_tokenizer(w, model_dir, {**config, **cfg, "vocab_size": embd.rows}, pre_tokenizer, log)
            tokens = _kv_value(w, gguf.Keys.Tokenizer.LIST)
            if tokens is not None and len(tokens) != embd.rows:
                raise ExportError(
                    f"the tokenizer has {len(tokens)} tokens but the embedding has {embd.rows} rows: "
                    "llama.cpp needs them equal (check vocab_size in config.json)"
                )
            w.add_name(_model_name(model_dir, tokens))
            if keep is not None:
                # llama-quantize's keys for an imatrix-quantized file
                w.add_string("quantize.imatrix.dataset", str(keep.data))
                w.add_uint32("quantize.imatrix.entries_count", len(keep.importance))
                w.add_uint32("quantize.imatrix.chunks_count", keep.tokens)
            bar = tqdm(total=sum(p.nbytes for p in planned), unit="B", unit_scale=True,
                       desc=f"gguf {ftype.value}", disable=not progress)
            n_workers = workers or min(4, os.cpu_count() or 1)
            for p in planned:
                # Threads only for the compute-bound K-quant sweeps: the float casts, Q8_0 and gguf's Q4_0
                # are a few memory-bound passes, and a worker thread made q8_0 ~1.6x slower on a busy
                # 2-core machine (GIL hand-offs with the writing thread) without helping a quiet one.
                n = n_workers if workers or p.qtype in (Q.Q4_K, Q.Q6_K) else 1
                w.add_tensor(p.name, _Streamed(p, bar, n), raw_dtype=p.qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file(progress=False)
            bar.close()
        finally:
            w.close()
        # the temp file is created private (0600); a model file is normally readable like any other
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if verify:
            verify_gguf(tmp, planned, name=outfile)
            log(f"verified {outfile}: {len(planned)} tensors, shapes and types as written")
    return planned


def apply_keep_adapter(planned: list[Planned], keep) -> None:
    """Promote the plan's chosen tensors and attach the importance matrix to every quantized tensor."""
    promoted = keep.promoted
    for p in planned:
        p.qtype = promoted.get(p.name, p.qtype)
        imp = keep.importance.get(p.name)
        if imp is not None and p.qtype not in (Q.F32, Q.F16, Q.BF16, Q.Q8_0) and imp.shape == (p.cols,):
            # relative weights, floored so that a column no example drove still counts a little
            imp = imp / max(float(imp.mean()), 1e-30)
            p.importance = np.maximum(imp, IMPORTANCE_FLOOR).astype(np.float32)


def _model_name(model_dir: Path, tokens: list | None) -> str:
    name = Path(model_dir).resolve().name or "model"
    # llama.cpp's vocab loader looks up </s>, <unk>, <s>, <|endoftext|> when general.name contains
    # "phi3"/"phi-3", and aborts if one is missing: keep such a name only when they all exist
    if re.search(r"phi-?3", name, re.I) and not {"</s>", "<unk>", "<s>", "<|endoftext|>"} <= set(tokens or []):
        name = re.sub(r"phi-?3", "phi", name, flags=re.I)
    return name


# ---------------------------------------------------------------- verification

REQUIRED_KEYS = ["general.architecture", "{arch}.context_length", "{arch}.embedding_length", "{arch}.block_count",
                 "{arch}.attention.layer_norm_rms_epsilon", "{arch}.feed_forward_length",
                 "{arch}.attention.head_count", "tokenizer.ggml.model", "tokenizer.ggml.tokens"]


def verify_gguf(path: Path, planned: list[Planned], name: Path | None = None) -> None:
    """Read `path` back and check keys, tensor names, shapes and types against what was planned.

    `name` is the file the messages speak of (the final name, while `path` is still the temporary file).
    """
    shown = name or path
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:  # what GGUFReader raises on a malformed file
        raise ExportError(f"verify: {shown} cannot be read back as GGUF ({type(e).__name__}: {e})") from None
    arch = reader.fields["general.architecture"].contents()
    missing = [k.format(arch=arch) for k in REQUIRED_KEYS if k.format(arch=arch) not in reader.fields]
    if reader.fields.get("tokenizer.ggml.model") and reader.fields["tokenizer.ggml.model"].contents() == "gpt2":
        if "tokenizer.ggml.merges" not in reader.fields:
            missing.append("tokenizer.ggml.merges")
    if missing:
        raise ExportError(f"verify: {shown} lacks required keys {', '.join(missing)}")
    found = {t.name: t for t in reader.tensors}
    for p in planned:
        t = found.pop(p.name, None)
        if t is None:
            raise ExportError(f"verify: tensor {p.name} is missing from {shown}")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if t.tensor_type != p.qtype or shape != tuple(p.shape):
            raise ExportError(f"verify: tensor {p.name} is {t.tensor_type.name} {shape} in {shown}, "
                              f"expected {p.qtype.name} {tuple(p.shape)}")
    if found:
        raise ExportError(f"verify: unexpected tensors in {shown}: {', '.join(sorted(found))}")
