"""Safetensors weight files: reading headers, listing a model's tensors, planning shards, writing.

Every reader and writer of model weights in mlxtune (load, convert, fuse, the GGUF writer) goes
through here, so there is one header parser with one set of checks and one shard layout. The one
thing to know: nothing is loaded whole. Readers get byte offsets from the header and read rows on
demand; the writer writes the header first and then evaluates, appends and drops one tensor at a
time, so peak memory is about the largest tensor, not the model.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import ModelLoadError

SHARD_BYTES = 5 << 30  # like mlx-lm and transformers: ~5 GB per output shard
FLOAT_DTYPES = ("float16", "bfloat16", "float32")  # what --dtype accepts everywhere
INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000

# mlx dtype name -> safetensors dtype code
CODES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64", "uint8": "U8", "int8": "I8",
         "uint16": "U16", "int16": "I16", "uint32": "U32", "int32": "I32", "uint64": "U64", "int64": "I64",
         "bool": "BOOL"}
# safetensors dtype code -> numpy dtype of the stored bytes (bfloat16 as its raw uint16 bits)
NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32, "F64": np.float64,
         "I32": np.int32, "I64": np.int64, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
         "U64": np.uint64, "BOOL": np.bool_}


def read_header(file: Path) -> tuple[dict, int]:
    """(header, byte offset where tensor data starts); a truncated or foreign file is a clear error."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES or n > file.stat().st_size:
                raise ValueError("header length is larger than the file")
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
    except (OSError, ValueError, struct.error) as e:
        raise ModelLoadError(f"cannot read {file}: not a valid safetensors file ({e}); download or convert it again") from None
    _check_header(file, header, file.stat().st_size - 8 - n)
    return header, 8 + n


def _check_header(file: Path, header: dict, data_size: int) -> None:
    """Every tensor's dtype, shape and byte range agree with each other and with the file, before anything
    is read or allocated from them: a header that lies (sizes past the end, shared bytes) is refused."""
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{file}: tensor {name}"
        if not isinstance(info, dict):
            raise ModelLoadError(f"{where}: its header entry is not an object; download or convert the model again")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in NUMPY:
            raise ModelLoadError(f"{where} has dtype {dtype}, which mlxtune cannot read")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise ModelLoadError(f"{where} has shape {shape!r}, not a list of sizes; download or convert the model again")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ModelLoadError(f"{where} has data_offsets {offsets!r}, not [begin, end]; download or convert it again")
        need = int(np.prod(shape, dtype=object)) * np.dtype(NUMPY[dtype]).itemsize
        if offsets[1] - offsets[0] != need:
            raise ModelLoadError(f"{where}: shape {shape} of {dtype} needs {need} bytes but data_offsets give "
                                 f"{offsets[1] - offsets[0]}; download or convert the model again")
        if offsets[1] > data_size:
            raise ModelLoadError(f"{file} is truncated: tensor {name} ends at byte {offsets[1]} of the data, which has "
                                 f"{data_size}; download or convert the model again")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise ModelLoadError(f"{file}: tensors {a} and {b} claim the same bytes (overlapping data_offsets); "
                                 "download or convert the model again")


def tensor_shapes(file: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from the header alone."""
    return {k: v["shape"] for k, v in read_header(file)[0].items() if k != "__metadata__"}


def weight_files(model_dir: Path) -> list[Path]:
    """The model's safetensors files: those its index lists, else every model*.safetensors; [] if none."""
    index = model_dir / INDEX_NAME
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
            raise ModelLoadError(f"{index} is not a valid safetensors index (no weight_map)") from None
        files = [model_dir / n for n in names]
        for f in files:
            if not f.exists():
                raise ModelLoadError(f"{index} lists {f.name}, which is missing: download the checkpoint again")
        return files
    return sorted(model_dir.glob("model*.safetensors"))


@dataclass
class StoredTensor:
    """Where one tensor's bytes are, so rows can be read without loading or mapping the file."""

    file: Path
    dtype: str  # safetensors code: F32, F16, BF16, U32, ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`

    @property
    def row_nbytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * np.dtype(NUMPY[self.dtype]).itemsize

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as stored (BF16 as uint16). Plain reads: mapped pages would count towards RSS."""
        buf = np.empty(((stop - start),) + tuple(self.shape[1:]), dtype=NUMPY[self.dtype])
        with open(self.file, "rb") as f:
            f.seek(self.offset + start * self.row_nbytes)
            got = f.readinto(memoryview(buf).cast("B"))
        if got != buf.nbytes:
            raise ModelLoadError(f"{self.file} is truncated: download or convert the model again")
        return buf


def index_tensors(model_dir: Path) -> dict[str, StoredTensor]:
    """Every tensor of the model directory's weight files, by name."""
    files = weight_files(model_dir)
    if not files:
        raise ModelLoadError(f"{model_dir} has no model*.safetensors weights "
                             "(PyTorch .bin checkpoints: run mlxtune convert first)")
    index: dict[str, StoredTensor] = {}
    for file in files:
        header, data_start = read_header(file)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, _ = info["data_offsets"]
            index[name] = StoredTensor(file, info["dtype"], tuple(info["shape"]), data_start + begin)
    return index


def plan_shards(tensors: list[tuple[str, mx.array]], shard_bytes: int = SHARD_BYTES) -> list[list[tuple[str, mx.array]]]:
    """Split (name, array) pairs, in order, into shards of at most `shard_bytes` (one tensor may exceed it)."""
    shards: list[list] = [[]]
    size = 0
    for name, a in tensors:
        if shards[-1] and size + a.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, a))
        size += a.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_file(path: Path, tensors: list[tuple[str, mx.array]], bar=None) -> None:
    """Write one safetensors file header-first, evaluating and dropping one (lazy) tensor at a time.

    `tensors` is consumed (emptied) so that each array can be freed once written.
    """
    header, offset = {"__metadata__": {"format": "mlx"}}, 0
    for name, a in tensors:
        header[name] = {"dtype": CODES[str(a.dtype).split(".")[-1]], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format wants the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        while tensors:
            _, a = tensors.pop(0)
            a = mx.contiguous(a)
            if a.dtype == mx.bfloat16:
                a = a.view(mx.uint16)  # same bits; the buffer protocol has no bfloat16 code
            mx.eval(a)
            f.write(memoryview(a))
            if bar is not None:
                bar.update(a.nbytes)
            del a
            mx.clear_cache()  # give freed buffers back so RSS tracks the live tensor only


def write_shards(out: Path, tensors: list[tuple[str, mx.array]], *, shard_bytes: int = SHARD_BYTES, bar=None,
                 metadata: dict | None = None) -> list[str]:
    """Write (name, array) pairs as model*.safetensors shards plus model.safetensors.index.json in `out`."""
    total = sum(a.nbytes for _, a in tensors)
    shards = plan_shards(tensors, shard_bytes)
    names = shard_names(len(shards))
    weight_map = {k: name for name, shard in zip(names, shards) for k, _ in shard}
    tensors.clear()  # the shards hold the only references now: each array is freed once written
    for name, shard in zip(names, shards):
        write_file(out / name, shard, bar)
    index = {"metadata": {"total_size": total, **(metadata or {})}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names
