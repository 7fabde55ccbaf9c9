"""GGUF file -> MLX model directory (config.json, safetensors, tokenizer files) that mlx-lm loads.

Every tensor becomes what its GGUF type allows: types MLX's affine quantization holds exactly (see
`affine.py`) stay quantized (4, 5 or 8 bits, group size 32, float32 scales), the others are
de-quantized with the `gguf` package's de-quantizers and cast to `dtype`; `dequantize=True` gives a
float model and `quantize=True` re-quantizes the float weights with MLX's own settings. What llama.cpp's
converter did to the weights is undone: q/k rows of the llama architecture are put back in Hugging
Face's RoPE layout, Gemma's norm weights lose their +1, a missing `output.weight` means tied embeddings,
RoPE factor tensors become config keys.

The one thing to know: memory does not grow with the model. Names and shapes come from mlx-lm's model
class (instantiated lazily, never evaluated), the safetensors headers are written first, then each
tensor is read from the GGUF file in row chunks, converted and written at its place, so the process
holds one chunk at a time.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType
from gguf.quants import dequantize as gguf_dequantize

from ..errors import ConfigError, MlxtuneError, ModelLoadError
from ..files import atomic_dir
from . import affine
from . import arch as archmod
from .hf_tokenizer import write_hf_tokenizer
from .reader import GGUFFile, TensorInfo, read_gguf

# The tensor types published GGUF models use; anything else is refused by name.
SUPPORTED = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
DTYPES = ("float16", "bfloat16", "float32")
CHUNK_VALUES = 1 << 20  # values converted at a time (4 MiB as float32)
SHARD_BYTES = 5 * 1024**3
_ST_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "uint32": "U32"}
_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "uint32": 4}
F16_MAX = float(np.finfo(np.float16).max)


@dataclass
class _Out:
    """One safetensors tensor to write."""

    name: str
    dtype: str  # float16 | bfloat16 | float32 | uint32
    shape: tuple[int, ...]
    offset: int = 0  # inside its shard's data section
    shard: int = 0

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * _BYTES[self.dtype]

    @property
    def row_bytes(self) -> int:
        return self.nbytes // (self.shape[0] if len(self.shape) > 1 else 1)


@dataclass
class _Job:
    """One GGUF tensor -> one float tensor, or weight + scales + biases of a quantized layer."""

    source: TensorInfo
    outputs: list[_Out]
    rows: int
    convert: Callable[[int, int], list[np.ndarray]]  # rows [a, b) -> one array per output
    row_align: int = 1
    fate: str = ""  # what became of it, for the summary


@dataclass
class ImportResult:
    """What `import_gguf` wrote; `fates` counts tensors per (GGUF type, what became of them)."""

    path: Path
    source: Path
    arch: str
    num_parameters: int
    dtype: str
    fates: dict[tuple[str, str], int] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)
    total_bytes: int = 0
    tokenizer: object = None

    def summary(self) -> str:
        fates = "; ".join(f"{t}: {n} {'tensor' if n == 1 else 'tensors'} {what}"
                          for (t, what), n in sorted(self.fates.items()))
        return (f"{self.path}: {self.arch}, {self.num_parameters / 1e6:.2f}M parameters, "
                f"{self.total_bytes / 1e6:.1f} MB in {len(self.shards)} shard(s) ({fates})")


def default_dtype(g: GGUFFile) -> str:
    """The float dtype closest to the file's own: float32 for an all-F32 file, bfloat16 for BF16, else float16."""
    ftype = g.fields.get("general.file_type")
    if ftype == LlamaFileType.ALL_F32:
        return "float32"
    if ftype == LlamaFileType.MOSTLY_BF16:
        return "bfloat16"
    return "float16"


def _to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return x
    if dtype == "float16":
        return x.astype(np.float16)
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    # round to nearest even on the upper 16 bits, as every float32 -> bfloat16 cast does
    return ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16).astype(np.uint16)


def _float_rows(g: GGUFFile, t: TensorInfo) -> Callable[[int, int], np.ndarray]:
    def read(a: int, b: int) -> np.ndarray:
        raw = g.read_rows(t, a, b)
        if t.qtype == Q.F32:
            return raw.view(np.float32)
        if t.qtype == Q.F16:
            return raw.view(np.float16).astype(np.float32)
        if t.qtype == Q.Q4_K:  # the bulk of a Q4_K_M file: our decoder is ~3.4x gguf's here (affine.dequantize)
            return affine.dequantize(raw, t.qtype)
        with np.errstate(invalid="ignore", over="ignore"):
            return gguf_dequantize(raw, t.qtype).reshape(b - a, -1)
    return read


def _float_reader(g: GGUFFile, t: TensorInfo, ndim: int, order, offset: float):
    """float32 rows [a, b) of `t` as the HF model wants them: rows re-ordered, Gemma's +1 removed."""
    read = _float_rows(g, t)
    if ndim == 1:
        whole = read

        def read(a, b):
            values = whole(0, 1).reshape(1, -1)
            return values[:, order] if order is not None else values
    elif order is not None:
        read = _permuted(read, order)
    if not offset:
        return read

    def shifted(a, b):
        return read(a, b) - np.float32(offset)
    return shifted


def _permuted(read, order: np.ndarray):
    """Rows [a, b) of the re-ordered tensor: new[i] = old[order[i]] (chunks stay within one head)."""
    def read_perm(a: int, b: int):
        src = order[a:b]
        lo = int(src.min())
        rows = read(lo, int(src.max()) + 1)
        return rows[src - lo]
    return read_perm


class _Plan:
    """Turns the model's parameter list into jobs; records what became of each GGUF type."""

    def __init__(self, g: GGUFFile, config: dict, arch: archmod.Arch, dtype: str, dequantize: bool,
                 quantize: dict | None):
        self.g, self.config, self.arch, self.dtype = g, config, arch, dtype
        self.dequantize, self.quantize = dequantize, quantize
        self.quantization: dict = {}
        self.jobs: list[_Job] = []

    def add(self, hf: str, shape: tuple[int, ...], t: TensorInfo, quantizable: bool) -> None:
        g, cfg = self.g, self.config
        if t.qtype not in SUPPORTED:
            raise ModelLoadError(f"{g.path}: tensor {t.name} has type {t.qtype.name}, which mlxtune cannot import "
                                 f"(supported: {', '.join(q.name for q in SUPPORTED)})")
        if tuple(t.shape) != tuple(shape) and not (len(shape) == 1 and t.shape == (1, shape[0])):
            raise ModelLoadError(f"{g.path}: tensor {t.name} has shape {t.shape} but the model's metadata implies "
                                 f"{tuple(shape)} for {hf}: the file's counts do not agree")
        rows = t.rows if len(shape) > 1 else 1
        order, align = None, 1
        if self.arch.permute_qk and re.search(r"\.(q_proj|k_proj)\.(weight|bias)$", hf):
            heads = cfg["num_attention_heads"] if ".q_proj." in hf else cfg["num_key_value_heads"]
            n = shape[0]
            order = archmod.qk_unpermutation(n, heads)
            align = n // heads if len(shape) > 1 else 1
        module = hf[: -len(".weight")] if hf.endswith(".weight") else None
        bits = affine.BITS.get(t.qtype)
        if quantizable and module and len(shape) == 2 and bits and not self.dequantize and not self.quantize:
            self._keep_quantized(hf, module, shape, t, bits, order, align)
            return
        offset = self.arch.norm_offset if hf.endswith("norm.weight") else 0.0
        read = _float_reader(g, t, len(shape), order, offset)
        q = self.quantize
        if q and quantizable and module and len(shape) == 2 and shape[1] % q["group_size"] == 0:
            self._requantize(hf, module, shape, t, read, align)
            return
        dtype, path = self.dtype, g.path

        def convert(a, b):
            values = read(a, b)
            if dtype == "float16" and np.abs(values).max(initial=0) > F16_MAX:
                raise ConfigError(f"{path}: tensor {t.name} holds values beyond float16's range (+-65504): "
                                  "pass --dtype bfloat16 or float32")
            return [_to_dtype(values, dtype)]

        self.jobs.append(_Job(t, [_Out(hf, dtype, shape)], rows, convert, align, f"de-quantized to {dtype}"
                              if t.qtype not in (Q.F32, Q.F16, Q.BF16) else f"cast to {dtype}"))

    def _keep_quantized(self, hf, module, shape, t, bits, order, align):
        g = self.g

        def raw(a, b):
            return g.read_rows(t, a, b)

        if order is not None:
            raw = _permuted(raw, order)

        def convert(a, b):
            q, scales, biases = affine.to_affine(raw(a, b), t.qtype)
            return [affine.pack(q, bits), scales, biases]

        groups = shape[1] // affine.GROUP_SIZE
        outs = [_Out(hf, "uint32", (shape[0], shape[1] * bits // 32)),
                _Out(f"{module}.scales", "float32", (shape[0], groups)),
                _Out(f"{module}.biases", "float32", (shape[0], groups))]
        self.quantization[module] = {"group_size": affine.GROUP_SIZE, "bits": bits, "mode": "affine"}
        self.jobs.append(_Job(t, outs, t.rows, convert, align, f"kept {bits}-bit (exact, MLX affine)"))

    def _requantize(self, hf, module, shape, t, read, align):
        import mlx.core as mx

        q, dtype = self.quantize, self.dtype
        target = getattr(mx, dtype)

        def convert(a, b):
            w, scales, biases = mx.quantize(mx.array(read(a, b)).astype(target), group_size=q["group_size"],
                                            bits=q["bits"])
            out = [np.array(w)]
            for s in (scales, biases):
                out.append(np.array(s.view(mx.uint16)) if dtype == "bfloat16" else np.array(s))
            return out

        groups = shape[1] // q["group_size"]
        outs = [_Out(hf, "uint32", (shape[0], shape[1] * q["bits"] // 32)),
                _Out(f"{module}.scales", dtype, (shape[0], groups)),
                _Out(f"{module}.biases", dtype, (shape[0], groups))]
        self.quantization[module] = {"group_size": q["group_size"], "bits": q["bits"], "mode": "affine"}
        self.jobs.append(_Job(t, outs, t.rows, convert, align, f"re-quantized to {q['bits']}-bit"))


def _model_layout(config: dict, path: Path) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """mlx-lm's parameter names and shapes for `config`, and which modules can be quantized."""
    # imported here: `mlxtune.gguf` (the writer, `mlxtune gguf`) loads this module and must stay free of mlx-lm
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    model_cls, args_cls = _get_classes(config)
    try:
        model = model_cls(args_cls.from_dict(config))  # lazy: its random init is never evaluated
    except (ValueError, TypeError, KeyError) as e:
        raise ModelLoadError(f"{path}: its metadata does not describe a valid {config['model_type']} model: {e}") from None
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    quantizable = {p for p, m in model.named_modules() if hasattr(m, "to_quantized")}
    return shapes, quantizable


def plan_import(g: GGUFFile, *, dtype: str, dequantize: bool = False, quantize: dict | None = None):
    """(config.json dict, jobs, quantization dict) for file `g`."""
    def read_f32(name: str) -> np.ndarray:
        t = g.tensors[name]
        return _float_rows(g, t)(0, t.rows).reshape(-1)

    config = archmod.config_from_gguf(g, read_f32)
    arch = archmod.ARCHES[g.arch]
    shapes, quantizable = _model_layout(config, g.path)
    names = archmod.gguf_names(arch, config["num_hidden_layers"], shapes)
    plan = _Plan(g, config, arch, dtype, dequantize, quantize)
    for gname, hf in names.items():
        t = g.tensors.get(gname)
        if t is None and hf == "lm_head.weight" and config["tie_word_embeddings"]:
            continue  # mlx-lm's gemma3 declares a head and drops it when the weights have none (tied)
        if t is None:
            raise ModelLoadError(f"{g.path} has no tensor {gname} (the model's {hf}): the file is incomplete "
                                 "or its metadata does not match its tensors")
        module = hf[: -len(".weight")] if hf.endswith(".weight") else None
        plan.add(hf, shapes[hf], t, module in quantizable)
    used = set(names) | {n for n in g.tensors if n.startswith("rope_")}
    extra = [n for n in g.tensors if n not in used]
    if extra:
        more = f" (and {len(extra) - 3} more)" if len(extra) > 3 else ""
        raise ModelLoadError(f"{g.path}: tensors {', '.join(extra[:3])}{more} have no place in mlx-lm's "
                             f"{config['model_type']} model: this kind of {g.arch} file is not supported")
    return config, plan.jobs, plan.quantization


def _shard(jobs: list[_Job], shard_bytes: int) -> list[list[_Out]]:
    shards, size = [[]], 0
    for job in jobs:
        n = sum(o.nbytes for o in job.outputs)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        for o in job.outputs:
            o.shard, o.offset = len(shards) - 1, size
            size += o.nbytes
            shards[-1].append(o)
    return shards


def _write_shards(tmp: Path, names: list[str], shards: list[list[_Out]], jobs: list[_Job], bar) -> None:
    """Headers first, then every tensor chunk by chunk at its place (positioned writes)."""
    files, starts = [], []
    try:
        for name, outs in zip(names, shards):
            header = {"__metadata__": {"format": "mlx"}}
            for o in outs:
                header[o.name] = {"dtype": _ST_DTYPES[o.dtype], "shape": list(o.shape),
                                  "data_offsets": [o.offset, o.offset + o.nbytes]}
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)  # the format wants the data 8-byte aligned
            f = open(tmp / name, "wb")
            files.append(f)
            f.write(len(blob).to_bytes(8, "little") + blob)
            starts.append(8 + len(blob))
            f.truncate(starts[-1] + sum(o.nbytes for o in outs))
        for job in jobs:
            cols = max(1, job.source.cols)
            step = max(1, CHUNK_VALUES // cols)
            step = max(job.row_align, step - step % job.row_align)
            for a in range(0, job.rows, step):
                b = min(a + step, job.rows)
                for o, arr in zip(job.outputs, job.convert(a, b)):
                    data = np.ascontiguousarray(arr)
                    os.pwrite(files[o.shard].fileno(), memoryview(data).cast("B"),
                              starts[o.shard] + o.offset + a * o.row_bytes)
                    bar.update(data.nbytes)
    finally:
        for f in files:
            f.close()


def _readme(result: ImportResult, info) -> str:
    lines = [f"# {result.source.name} (MLX)", "",
             f"Imported from the GGUF file `{result.source}` with `mlxtune convert --gguf` on "
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.", "",
             f"- architecture: {result.arch}", f"- float tensors: {result.dtype}",
             f"- parameters: {result.num_parameters:,}",
             f"- tokenizer: {info.model} ({'pre-tokenizer ' + info.pre if info.pre else 'SentencePiece'}), "
             f"{info.n_tokens} tokens, chat template {'included' if info.chat_template else 'absent'}", "",
             "What became of each GGUF tensor type:", ""]
    lines += [f"- {t}: {n} tensor(s) {what}" for (t, what), n in sorted(result.fates.items())]
    lines += ["", "Load it with `mlxtune.load(path)` or `mlx_lm.load(path)`.", ""]
    return "\n".join(lines)


def import_gguf(gguf_file: str | os.PathLike, mlx_path: str | os.PathLike, *, dtype: str | None = None,
                dequantize: bool = False, quantize: bool = False, q_bits: int = 4, q_group_size: int = 64,
                force: bool = False, shard_bytes: int = SHARD_BYTES, progress: bool = True) -> ImportResult:
    """Write the GGUF model `gguf_file` as an MLX model directory `mlx_path`.

    dtype: float16 / bfloat16 / float32 for the float tensors (default: the file's own, float16 for a
    quantized file). dequantize: no quantized layers at all. quantize: re-quantize every layer with
    MLX's affine quantization (`q_bits`, `q_group_size`) instead of keeping GGUF's. Raises
    ModelLoadError (a GGUF subclass for a damaged file) or ConfigError; nothing is written then.
    """
    from tqdm.auto import tqdm

    if dequantize and quantize:
        raise ConfigError("choose either --quantize or --de-quantize, not both")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype} is not supported; choose one of {', '.join(DTYPES)}")
    src = Path(gguf_file).expanduser()
    out = Path(mlx_path).expanduser()
    if out.exists() and not force:
        raise MlxtuneError(f"{out} already exists: choose another --mlx-path or pass --force to replace it")
    g = read_gguf(src)
    dtype = dtype or default_dtype(g)
    qcfg = {"group_size": q_group_size, "bits": q_bits} if quantize else None
    config, jobs, quantization = plan_import(g, dtype=dtype, dequantize=dequantize, quantize=qcfg)

    shards = _shard(jobs, shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    total = sum(o.nbytes for j in jobs for o in j.outputs)
    fates = Counter((j.source.qtype.name, j.fate) for j in jobs)
    result = ImportResult(out, src, g.arch, sum(int(np.prod(j.source.shape)) for j in jobs), dtype,
                          dict(fates), names, total)
    config["torch_dtype"] = dtype
    if quantization:
        common = Counter((q["bits"], q["group_size"]) for q in quantization.values()).most_common(1)[0][0]
        top = {"group_size": common[1], "bits": common[0], "mode": "affine"}
        top.update({m: q for m, q in sorted(quantization.items()) if (q["bits"], q["group_size"]) != common})
        config["quantization"] = top
        config["quantization_config"] = top
    index = {"metadata": {"total_size": total, "total_parameters": result.num_parameters},
             "weight_map": dict(sorted((o.name, names[o.shard]) for s in shards for o in s))}
    try:
        with atomic_dir(out, force=force, flag="--force") as tmp:
            info = write_hf_tokenizer(g, tmp)
            if info.n_tokens > config["vocab_size"]:
                raise ModelLoadError(f"{src}: {info.n_tokens} tokens but token_embd.weight has only "
                                     f"{config['vocab_size']} rows: the file's counts do not agree")
            if info.bos_id is not None:
                config["bos_token_id"] = info.bos_id
            if info.eos_ids:
                config["eos_token_id"] = info.eos_ids if len(info.eos_ids) > 1 else info.eos_ids[0]
            result.tokenizer = info
            with tqdm(total=total, unit="B", unit_scale=True, desc="import gguf", disable=not progress) as bar:
                _write_shards(tmp, names, shards, jobs, bar)
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
            (tmp / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=4))
            (tmp / "README.md").write_text(_readme(result, info))
    except OSError as e:
        raise MlxtuneError(f"cannot write {out}: {e.strerror or e}") from None
    return result
