"""Tokenized records as compact arrays: the tokenization cache on disk and the record sets built on it.

A tokenized source (one data file, or one split of a `datasets` dataset) is a `Store`: every record's
token ids end to end in one flat array (uint16 when the vocabulary fits, else int32), the loss mask in
another (one byte per token), and small per-record arrays (start offset, source line, first trained
token, first token). On disk a store is one folder named after its cache key, written whole to a
temporary folder and renamed (so it is complete or absent), and memory-mapped when read back: a million
records cost a few arrays of a million numbers, and token pages are only touched when a batch needs them.
The one thing to know: a `RecordSet` (what `DataSplits.train` is) never copies tokens. It is a list of
(store, row, cut, length) items; truncation to --max-seq-length is the `cut`/`length` of an item, applied
when the record is read, so splitting, truncating and mixing files are array operations.
A big JSON-lines file can instead be a `LazyStore`: no cache, each record tokenized when a batch reads it, and
every line checked in the background once reading starts (`LineCheck`).
"""

from __future__ import annotations

import atexit
import codecs
import contextlib
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MlxtuneError
from .files import atomic_dir


@dataclass
class Record:
    """One training example: what every data format becomes (see `mlxtune.data`)."""

    ids: list[int]  # token ids of the whole rendered example
    mask: list[bool]  # mask[i] True => ids[i] is a training target (predicted from ids[:i]); mask[0] is False


@dataclass
class Source:
    """One input of a dataset: a data file, or one split of a dataset read with the `datasets` library."""

    name: str  # what messages call it: the file path, or "ID[split]"; records are `name:LINE`
    records: Callable[[Any], Iterator[tuple[int, Any]]]  # (progress bar or None) -> (line or row, record)
    identity: Callable[[], str]  # a hash of the content: part of the cache key
    size: int  # bytes (or rows) the progress bar counts to
    unit: str = "B"
    raw_lines: Callable[[Any], Iterator[tuple[int, bytes]]] | None = None  # JSON lines unparsed, for worker processes


FORMAT_VERSION = 1  # of the folder layout below; the cache key carries data.CACHE_VERSION too
META = "meta.json"
IDS, MASK, INDEX = "ids.bin", "mask.bin", "index.npz"


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype that holds every token id of a vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


@dataclass
class Store:
    """Every record of one tokenized source, as flat arrays (memory-mapped from the cache, or in memory)."""

    key: str  # identifies the tokens exactly: source content, tokenizer, options and code version
    fmt: str  # the source's format (data.Format value)
    ids: np.ndarray  # flat token ids of all records
    mask: np.ndarray  # flat bool: True where ids[k] is a training target
    starts: np.ndarray  # int64 (n + 1,): record i is ids[starts[i]:starts[i + 1]]
    lines: np.ndarray  # int64 (n,): where each record is in its source (line, or row of a dataset)
    first: np.ndarray  # int32 (n,): index of the first trained token within the record (= length if none)
    head: np.ndarray  # int32 (n,): the record's first token id (-1 for an empty record), for BOS checks

    def __len__(self) -> int:
        return len(self.lines)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.starts)

    def record(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.starts[i]), int(self.starts[i + 1])
        return self.ids[a:b], self.mask[a:b]

    @property
    def n_tokens(self) -> int:
        return int(self.starts[-1])


@dataclass
class LazyStore:
    """The records of a big JSON-lines file, tokenized one by one when a batch reads them (as mlx-lm does).

    Tokenizing every record first costs ~0.3 ms a record on a CPU core, minutes for a million rows, before
    the first step. A lazy store knows each record's line and bytes from one scan of the file, and its
    length only as an estimate (bytes x the tokens per byte of a sample): batches are planned on the
    estimates, built from the real tokens. Truncation (`limit`) is applied as a record is read; a record
    with nothing left to train comes back with an all-False mask and adds nothing to a loss.
    """

    key: str
    fmt: str
    lines: np.ndarray  # int64 (n,): each record's line number
    offsets: np.ndarray  # int64 (n,): where its line starts in the file
    nbytes: np.ndarray  # int64 (n,): its line's length in bytes
    estimate: np.ndarray  # int32 (n,): estimated tokens
    read: Callable[[list[tuple[int, bytes]]], list[tuple[Sequence[int], Sequence[bool]]]]  # raw lines -> records
    path: Path
    dtype: np.dtype
    limit: tuple[int, int | None] | None = None  # (max_seq_length, BOS id) of the truncation, set by `truncated`
    keep_recent: int = 4096  # records kept tokenized in memory (a batch is often read twice: plan, then step)
    lines_check: LineCheck | None = None  # every line checked in the background once reading starts

    def __post_init__(self):
        self._recent: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.lines)

    @property
    def lengths(self) -> np.ndarray:
        return self.estimate

    def record(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if self.lines_check is not None:
            self.lines_check.start(self)
            self.lines_check.raise_found()
        hit = self._recent.get(i)
        if hit is not None:
            self._recent.move_to_end(i)
            return hit
        [(ids, mask)] = self.read(raw_lines(self.path, self.lines, self.offsets, self.nbytes, [i]))
        out = np.asarray(ids, self.dtype), np.asarray(mask, np.bool_)
        self._recent[i] = out
        if len(self._recent) > self.keep_recent:
            self._recent.popitem(last=False)
        return out

    def truncated_record(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Record i cut to `limit`; a record truncation would drop keeps no trained token."""
        ids, mask = self.record(i)
        return truncate_record(ids, mask, *self.limit) if self.limit is not None else (ids, mask)


class LineCheck:
    """Every line of a lazy file parsed and format-checked on a background thread once batches start reading it.

    Why: a lazy file's records are checked as batches read them, so a bad line near row 900,000 of a random
    order stops a run hours in; and since mending the line changes the data, the run cannot be resumed. Parsing
    without tokenizing takes ~3 s a million chats, so the whole file is checked within seconds of the first
    batch, and the first bad line is raised from the next record read. It starts with reading rather than at
    load, so loading a file stays one scan.
    """

    CHUNK = 1024  # lines a read: the stop flag is looked at between chunks

    def __init__(self, check: Callable[[list[tuple[int, bytes]]], None]):
        self.check = check  # raises the DataError of the first bad line among those it is given
        self.found: Exception | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self, store: LazyStore) -> None:
        """Once; records are read on one thread (the training loop's), so no lock."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, args=(store,), name="mlxtune-line-check", daemon=True)
            # a daemon thread still reading the file when the interpreter finalizes can abort the process
            atexit.register(self.stop)
            self._thread.start()

    def _run(self, store: LazyStore) -> None:
        # a lazy store's records are its file's lines in order (one scan): the first bad line is the one named
        try:
            for at in range(0, len(store), self.CHUNK):
                if self._stop.is_set():
                    return
                self.check(raw_lines(store.path, store.lines, store.offsets, store.nbytes,
                                     range(at, min(at + self.CHUNK, len(store)))))
        except MlxtuneError as e:
            self.found = e
        except OSError:
            pass  # the file went away or changed: the batch that reads it says so itself

    def raise_found(self) -> None:
        if self.found is not None:
            raise self.found

    def stop(self) -> None:
        self._stop.set()
        self.wait()

    def wait(self) -> None:
        """Until every line is checked (or a bad one found)."""
        if self._thread is not None:
            self._thread.join()


def raw_lines(path: Path, lines: np.ndarray, offsets: np.ndarray, nbytes: np.ndarray,
              indices: Iterable[int]) -> list[tuple[int, bytes]]:
    """(line number, bytes) of some records of a JSON-lines file found by a scan of it, line 1's BOM taken off."""
    out = []
    with open(path, "rb") as f:
        for i in indices:
            f.seek(int(offsets[i]))
            raw = f.read(int(nbytes[i]))
            line = int(lines[i])
            out.append((line, raw[len(codecs.BOM_UTF8):] if line == 1 and raw.startswith(codecs.BOM_UTF8) else raw))
    return out


def truncate_record(ids: np.ndarray, mask: np.ndarray, max_seq_length: int,
                    bos: int | None) -> tuple[np.ndarray, np.ndarray]:
    """One record fit into max_seq_length tokens, cutting prompt tokens from the start first.

    A leading BOS (`bos`) and the token just before the first target stay; if the targets alone are too long,
    the end is cut too. Nothing trained may be left (the caller drops or ignores such a record). `truncated`
    does the same to many records of a store at once.
    """
    if len(ids) <= max_seq_length:
        return ids, mask
    keep = 1 if bos is not None and ids[0] == bos else 0
    cut = min(len(ids) - max_seq_length, max(0, _first_true(mask) - 1 - keep))
    ids = np.concatenate([ids[:keep], ids[keep + cut:]])[:max_seq_length]
    mask = np.concatenate([mask[:keep], mask[keep + cut:]])[:max_seq_length]
    mask[0] = False
    return ids, mask


class CacheWriteError(Exception):
    """The cache folder cannot take a new entry (full disk, read-only, permissions): tokenize without it."""


class StoreWriter:
    """Collects tokenized records chunk by chunk; `finish()` gives the Store.

    With `folder`, tokens stream to files in a temporary folder beside it that is renamed into place by
    `finish()` (an interrupted run leaves no entry); without, they are kept in memory. Any failure to write
    the cache is a CacheWriteError.
    """

    def __init__(self, key: str, dtype: np.dtype, folder: Path | None = None):
        self.key, self.dtype, self.folder = key, np.dtype(dtype), folder
        self.count = 0
        self.tokens = 0
        self._index_parts: dict[str, list[np.ndarray]] = {"lengths": [], "lines": [], "first": [], "head": []}
        self._ids: list[np.ndarray] = []
        self._mask: list[np.ndarray] = []
        self._stack = contextlib.ExitStack()
        self._files = None
        if folder is not None:
            with self._cache_errors():
                tmp = self._stack.enter_context(atomic_dir(folder, force=True))
                self._files = (self._stack.enter_context(open(tmp / IDS, "wb")),
                               self._stack.enter_context(open(tmp / MASK, "wb")))
                self._tmp = tmp

    @contextlib.contextmanager
    def _cache_errors(self):
        try:
            yield
        except (OSError, MlxtuneError) as e:
            raise CacheWriteError(f"{self.folder}: {getattr(e, 'strerror', None) or e}") from None

    def add(self, records: Sequence[tuple[Sequence[int], Sequence[bool]]], lines: Sequence[int]) -> None:
        """Append (ids, mask) records and the source line of each."""
        self.add_packed(pack_records(records, self.dtype), lines)

    def add_packed(self, packed: dict[str, np.ndarray], lines: Sequence[int]) -> None:
        """Append records given as `pack_records` arrays."""
        n = len(packed["lengths"])
        if not n:
            return
        for name in ("lengths", "first", "head"):
            self._index_parts[name].append(packed[name])
        self._index_parts["lines"].append(np.asarray(lines, np.int64))
        if self._files is not None:
            with self._cache_errors():
                self._files[0].write(packed["ids"].tobytes())
                self._files[1].write(packed["mask"].tobytes())
        else:
            self._ids.append(packed["ids"])
            self._mask.append(packed["mask"])
        self.count += n
        self.tokens += int(packed["lengths"].sum())

    def _index(self) -> dict[str, np.ndarray]:
        def cat(name, dtype):
            parts = self._index_parts[name]
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

        lengths = cat("lengths", np.int64)
        return {"starts": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), "lines": cat("lines", np.int64),
                "first": cat("first", np.int32), "head": cat("head", np.int32)}

    def finish(self, fmt: str) -> Store:
        index = self._index()
        if self._files is None:
            ids = np.concatenate(self._ids) if self._ids else np.zeros(0, self.dtype)
            mask = np.concatenate(self._mask) if self._mask else np.zeros(0, np.bool_)
            return Store(self.key, fmt, ids, mask, **index)
        with self._cache_errors():
            for f in self._files:
                f.close()
            np.savez(self._tmp / INDEX, **index)
            meta = {"version": FORMAT_VERSION, "key": self.key, "format": fmt, "dtype": self.dtype.name,
                    "records": self.count, "tokens": self.tokens}
            (self._tmp / META).write_text(json.dumps(meta) + "\n")
            self._stack.close()  # renames the finished folder into place
        store = open_store(self.folder)
        if store is None:
            raise CacheWriteError(f"{self.folder}: written but cannot be read back")
        return store

    def abort(self, exc: BaseException) -> None:
        """Drop everything written so far (the temporary folder included); `exc` is why."""
        self._stack.__exit__(type(exc), exc, exc.__traceback__)


def pack_records(records: Sequence[tuple[Sequence[int], Sequence[bool]]], dtype: np.dtype) -> dict[str, np.ndarray]:
    """(ids, mask) records as the flat arrays a Store keeps: lengths, ids, mask, first trained token, first id."""
    n = len(records)
    lengths = np.fromiter((len(ids) for ids, _ in records), np.int64, n)
    total = int(lengths.sum())
    ids = np.fromiter(chain.from_iterable(ids for ids, _ in records), np.int64, total)
    if total and (ids.min() < 0 or ids.max() > np.iinfo(dtype).max):
        raise ValueError(f"token id {int(ids.max())} does not fit the cache's {np.dtype(dtype)} ids")
    return {"lengths": lengths, "ids": ids.astype(dtype),
            "mask": np.fromiter(chain.from_iterable(mask for _, mask in records), np.bool_, total),
            "first": np.fromiter((_first_true(mask) for _, mask in records), np.int32, n),
            "head": np.fromiter((ids[0] if len(ids) else -1 for ids, _ in records), np.int32, n)}


def _first_true(mask) -> int:
    if isinstance(mask, np.ndarray):
        hits = np.flatnonzero(mask)
        return int(hits[0]) if hits.size else len(mask)
    try:
        return mask.index(True)
    except ValueError:
        return len(mask)


def open_store(folder: Path) -> Store | None:
    """The store cached in `folder`, memory-mapped; None when it is missing, from another version or damaged."""
    try:
        meta = json.loads((folder / META).read_text())
        if meta.get("version") != FORMAT_VERSION:
            return None
        dtype = np.dtype(meta["dtype"])
        with np.load(folder / INDEX) as z:
            index = {k: z[k] for k in ("starts", "lines", "first", "head")}
        tokens = int(meta["tokens"])
        n = int(meta["records"])
        if (index["starts"].shape != (n + 1,) or int(index["starts"][-1]) != tokens
                or (folder / IDS).stat().st_size != tokens * dtype.itemsize or (folder / MASK).stat().st_size != tokens):
            return None
        if tokens:
            ids = np.memmap(folder / IDS, dtype=dtype, mode="r", shape=(tokens,))
            mask = np.memmap(folder / MASK, dtype=np.bool_, mode="r", shape=(tokens,))
        else:
            ids, mask = np.zeros(0, dtype), np.zeros(0, np.bool_)
        return Store(meta["key"], meta["format"], ids, mask, **index)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------------------------- record sets


@dataclass
class RecordSet(Sequence):
    """Records chosen from stores, each possibly truncated; a `Sequence` of `data.Record` read on demand.

    Item k is store `stores[part[k]]`, record `row[k]`, read as `ids[:keep] + ids[keep + cut:][:length - keep]`
    with the mask's first position cleared when `cut` or the length changed it (see `truncate_record`).
    """

    stores: list[Store | LazyStore]
    part: np.ndarray  # int32: which store
    row: np.ndarray  # int64: which record of it
    cut: np.ndarray  # int32: prompt tokens removed after the kept BOS (0: none)
    keep: np.ndarray  # int8: 1 when a leading BOS is kept in front of a cut
    length: np.ndarray  # int32: tokens after truncation

    @classmethod
    def empty(cls) -> RecordSet:
        return cls([], *(np.zeros(0, t) for t in (np.int32, np.int64, np.int32, np.int8, np.int32)))

    @classmethod
    def whole(cls, store: Store, rows: np.ndarray | None = None) -> RecordSet:
        """Records of `store` as they are (no truncation), all or `rows`."""
        rows = np.arange(len(store), dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
        return cls([store], np.zeros(len(rows), np.int32), rows, np.zeros(len(rows), np.int32),
                   np.zeros(len(rows), np.int8), store.lengths[rows].astype(np.int32))

    @classmethod
    def concat(cls, sets: Sequence[RecordSet]) -> RecordSet:
        sets = [s for s in sets if len(s)]
        if not sets:
            return cls.empty()
        stores: list[Store] = []
        parts = []
        for s in sets:
            remap = []
            for st in s.stores:
                if not any(st is x for x in stores):
                    stores.append(st)
                remap.append(next(i for i, x in enumerate(stores) if x is st))
            parts.append(np.asarray(remap, np.int32)[s.part] if len(s.part) else s.part)
        return cls(stores, np.concatenate(parts).astype(np.int32), np.concatenate([s.row for s in sets]),
                   np.concatenate([s.cut for s in sets]), np.concatenate([s.keep for s in sets]),
                   np.concatenate([s.length for s in sets]))

    def take(self, index) -> RecordSet:
        index = np.asarray(index, np.int64) if not isinstance(index, slice) else index
        return RecordSet(self.stores, self.part[index], self.row[index], self.cut[index], self.keep[index],
                         self.length[index])

    def __len__(self) -> int:
        return len(self.row)

    @property
    def lengths(self) -> np.ndarray:
        return self.length

    def arrays(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and loss mask of item k (as numpy arrays)."""
        store = self.stores[int(self.part[k])]
        if isinstance(store, LazyStore):
            return store.truncated_record(int(self.row[k]))
        ids, mask = store.record(int(self.row[k]))
        cut, keep, length = int(self.cut[k]), int(self.keep[k]), int(self.length[k])
        if cut == 0 and length == len(ids):
            return np.asarray(ids), np.asarray(mask)
        if cut:
            ids = np.concatenate([ids[:keep], ids[keep + cut:keep + cut + length - keep]])
            mask = np.concatenate([mask[:keep], mask[keep + cut:keep + cut + length - keep]])
        else:
            ids, mask = np.asarray(ids[:length]), np.array(mask[:length])
        mask = np.array(mask)
        if len(mask):
            mask[0] = False
        return ids, mask

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.take(k)
        n = len(self)
        if not -n <= k < n:
            raise IndexError(k)
        ids, mask = self.arrays(k % n)
        return Record(ids.tolist(), mask.tolist())

    def __iter__(self) -> Iterator:
        return (self[k] for k in range(len(self)))

    def __eq__(self, other) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __add__(self, other) -> list:
        """A plain list of the records of both (for small sets: it reads every record)."""
        return list(self) + list(other)

    def __radd__(self, other) -> list:
        return list(other) + list(self)

    __hash__ = None  # mutable arrays inside; equality is by content

    def __repr__(self) -> str:
        return f"RecordSet({len(self)} records from {len(self.stores)} sources)"

    def fingerprint(self) -> str:
        """What the records are, exactly, without reading a token: source keys, choice and truncation."""
        h = hashlib.sha256()
        for st in self.stores:
            h.update(st.key.encode() + b"|")
            if isinstance(st, LazyStore):
                h.update(repr(st.limit).encode() + b"|")
        for a in (self.part, self.row, self.cut, self.keep, self.length):
            h.update(np.ascontiguousarray(a).tobytes())
            h.update(b"|")
        return h.hexdigest()[:16]


def truncated(store: Store, rows: np.ndarray, max_seq_length: int, bos: int | None) -> tuple[RecordSet, int, int]:
    """`truncate_record` of records `rows` of `store`, done on the per-record arrays: (kept, truncated, dropped).

    Prompt tokens after a leading BOS are cut first (up to the token before the first target), then the end.
    A LazyStore is cut as its records are read (nothing is counted then).
    """
    rows = np.asarray(rows, np.int64)
    if isinstance(store, LazyStore):
        store.limit = (max_seq_length, bos)
        n = len(rows)
        return RecordSet([store], np.zeros(n, np.int32), rows, np.zeros(n, np.int32), np.zeros(n, np.int8),
                         np.minimum(store.estimate[rows], max_seq_length).astype(np.int32)), 0, 0
    lengths = store.lengths[rows]
    first = store.first[rows].astype(np.int64)
    any_trained = first < lengths
    excess = lengths - max_seq_length
    long = excess > 0
    keep = ((store.head[rows] == bos) & long).astype(np.int8) if bos is not None else np.zeros(len(rows), np.int8)
    cut = np.where(long, np.minimum(excess, np.maximum(0, first - 1 - keep)), 0)
    new_len = np.minimum(lengths - cut, max_seq_length)
    # After a cut the first target lands at first - cut (it is never the first position): kept if inside.
    kept = any_trained & (~long | (first - cut < max_seq_length))
    out = RecordSet([store], np.zeros(int(kept.sum()), np.int32), rows[kept], cut[kept].astype(np.int32),
                    keep[kept], new_len[kept].astype(np.int32))
    return out, int((long & kept).sum()), int((~kept).sum())


def content_key(*parts: bytes | str, files: Sequence[Path] = ()) -> str:
    """A hash of some strings and the bytes of some files (read in chunks, never whole)."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
        h.update(b"\0")
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]
