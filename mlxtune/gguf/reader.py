"""Read a GGUF file: its metadata, its tensor directory, and any tensor's rows, with every count checked.

The one thing to know: tensor data is never memory-mapped or loaded whole. `GGUFFile.read_rows` reads a
run of whole rows with one positioned read (quantization blocks never span rows), so a caller streaming
a model holds one chunk at a time and resident memory does not grow with the file; mapped pages would
count towards RSS until the whole file is unmapped. The header is parsed here rather than with
`gguf.GGUFReader` so that a truncated file, a count that lies or an unknown type becomes one line naming
the file and the field instead of a numpy error (and so that the tensor data is never mapped).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from ..errors import ModelLoadError

MAGIC = b"GGUF"
_SCALARS = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
            V.FLOAT32: "<f", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d", V.BOOL: "<?"}
_NUMPY = {V.UINT8: np.uint8, V.INT8: np.int8, V.UINT16: np.uint16, V.INT16: np.int16, V.UINT32: np.uint32,
          V.INT32: np.int32, V.FLOAT32: np.float32, V.UINT64: np.uint64, V.INT64: np.int64,
          V.FLOAT64: np.float64, V.BOOL: np.bool_}


class GGUFError(ModelLoadError):
    """The file is not a readable GGUF model (bad magic, truncated, inconsistent counts, unknown types)."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file. `shape` is in numpy order (rows, cols): GGUF lists dimensions reversed."""

    name: str
    qtype: Q
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def row_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return self.cols // block * size


class _Cursor:
    """Bounds-checked little-endian reads from the header bytes; each failure names what was being read."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"{self.path}: {what} at byte {self.pos} runs past the end of the file "
                            f"({self.size} bytes): the file is truncated or a count in it is wrong")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            # llama.cpp keeps token bytes as they are; so do we, through surrogate escapes
            return raw.decode("utf-8", errors="surrogateescape")

    def value_type(self, what: str) -> V:
        code = self.scalar("<I", what)
        try:
            return V(code)
        except ValueError:
            raise GGUFError(f"{self.path}: {what} has value type {code}, which is not a GGUF type: "
                            "the file is damaged") from None

    def value(self, vtype: V, what: str):
        if vtype == V.STRING:
            return self.string(what)
        if vtype == V.ARRAY:
            etype = self.value_type(what)
            count = self.scalar("<Q", what)
            if etype in _NUMPY:
                size = np.dtype(_NUMPY[etype]).itemsize
                self.need(count * size, f"{what} ({count} values)")
                arr = np.frombuffer(self.buf, dtype=_NUMPY[etype], count=count, offset=self.pos).copy()
                self.pos += count * size
                return arr
            # strings (or nested arrays) take at least 8 bytes each: a count beyond that cannot be true
            self.need(count * 8, f"{what} ({count} entries)")
            return [self.value(etype, what) for _ in range(count)]
        if vtype not in _SCALARS:
            raise GGUFError(f"{self.path}: {what} has unsupported value type {vtype.name}")
        return self.scalar(_SCALARS[vtype], what)


@dataclass
class GGUFFile:
    """A parsed GGUF file: `fields` (key -> value), `tensors` (name -> TensorInfo, in file order)."""

    path: Path
    version: int
    fields: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data_offset: int

    @property
    def arch(self) -> str:
        return str(self.fields.get("general.architecture", ""))

    def get(self, key: str, default=None):
        """A metadata value; `{arch}` in `key` stands for the file's architecture."""
        return self.fields.get(key.format(arch=self.arch), default)

    def read_rows(self, t: TensorInfo, a: int, b: int) -> np.ndarray:
        """Rows [a, b) of tensor `t` as raw bytes, shape (b - a, row_bytes)."""
        n = (b - a) * t.row_bytes
        out = np.empty((b - a, t.row_bytes), dtype=np.uint8)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(t.offset + a * t.row_bytes)
            got = f.readinto(memoryview(out).cast("B"))
        if got != n:
            raise GGUFError(f"{self.path}: tensor {t.name} could not be read (got {got} of {n} bytes): "
                            "the file changed or is truncated")
        return out


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse the header of `path` and check that every tensor lies inside the file."""
    path = Path(path).expanduser()
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except OSError as e:
        raise GGUFError(f"cannot read {path}: {e.strerror}") from None
    with f:
        if size < 24:
            raise GGUFError(f"{path} is not a GGUF file: only {size} bytes")
        if f.read(4) != MAGIC:
            f.seek(0)
            raise GGUFError(f"{path} is not a GGUF file (it starts with {f.read(4)!r}, not b'GGUF')")
        # only the header's pages are touched; the map is closed before any tensor is read
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm, memoryview(mm) as buf:
            return _parse(buf, path, size)


def _parse(buf, path: Path, size: int) -> GGUFFile:
    c = _Cursor(buf, path)
    c.pos = 4
    version = c.scalar("<I", "version")
    if version not in (2, 3):
        swapped = struct.unpack("<I", struct.pack(">I", version))[0]
        hint = " (a big-endian file: convert it on a little-endian machine)" if swapped in (2, 3) else ""
        raise GGUFError(f"{path}: GGUF version {version} is not supported (2 or 3){hint}")
    n_tensors = c.scalar("<Q", "tensor count")
    n_kv = c.scalar("<Q", "metadata count")
    # each metadata entry takes >= 13 bytes and each tensor entry >= 24: a larger count cannot be true
    if n_kv * 13 > size or n_tensors * 24 > size:
        raise GGUFError(f"{path}: the header claims {n_kv} metadata entries and {n_tensors} tensors, more "
                        f"than a {size}-byte file can hold: the file is damaged")
    fields: dict[str, Any] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}")
        vtype = c.value_type(f"metadata {key!r}")
        fields[key] = c.value(vtype, f"metadata {key!r}")
    infos = []
    for i in range(n_tensors):
        name = c.string(f"tensor name #{i}")
        n_dims = c.scalar("<I", f"tensor {name} dimension count")
        if not 1 <= n_dims <= 4:
            raise GGUFError(f"{path}: tensor {name} has {n_dims} dimensions (GGUF allows 1 to 4): the file is damaged")
        dims = [c.scalar("<Q", f"tensor {name} shape") for _ in range(n_dims)]
        code = c.scalar("<I", f"tensor {name} type")
        offset = c.scalar("<Q", f"tensor {name} offset")
        infos.append((name, dims, code, offset))
    alignment = fields.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: general.alignment {alignment!r} is not a power of two")
    data_offset = c.pos + (-c.pos % alignment)
    tensors: dict[str, TensorInfo] = {}
    for name, dims, code, offset in infos:
        try:
            qtype = Q(code)
        except ValueError:
            raise GGUFError(f"{path}: tensor {name} has type id {code}, which is not a GGML type mlxtune knows") from None
        shape = tuple(int(d) for d in reversed(dims))
        block, type_size = GGML_QUANT_SIZES[qtype]
        if any(d <= 0 for d in shape) or shape[-1] % block:
            raise GGUFError(f"{path}: tensor {name} has shape {shape}, which {qtype.name} blocks of {block} "
                            "cannot hold: the file is damaged")
        nbytes = int(np.prod(shape, dtype=np.int64)) // block * type_size
        start = data_offset + offset
        if start + nbytes > size:
            raise GGUFError(f"{path}: tensor {name} ({nbytes} bytes at offset {start}) runs past the end of the "
                            f"file ({size} bytes): the file is truncated; download or copy it again")
        if name in tensors:
            raise GGUFError(f"{path}: tensor {name} appears twice: the file is damaged")
        tensors[name] = TensorInfo(name, qtype, shape, start, nbytes)
    return GGUFFile(path, version, fields, tensors, data_offset)
