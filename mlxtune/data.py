"""Datasets: every supported file format becomes one internal `Record` (token ids + loss mask), here only.

The one thing to know: `Record.mask[i]` says whether token `ids[i]` is a training target (predicted from
`ids[:i]`). Chat-like formats (chat, ShareGPT, Alpaca, instruction/response pairs, prompt/completion) are
turned into messages and rendered with the tokenizer's chat template (`mlxtune.templates`), training the
assistant tokens of every assistant turn; `text` trains on everything. Formats are detected per record over
the whole file, and every problem is reported as `file:LINE: ...` with the offending record shortened.

Files are read as a stream (line by line, or element by element for a JSON array) and tokenized in chunks
into compact arrays cached on disk (`mlxtune.token_cache`), so a million rows never become a million Python
objects. Then: split (fixed seed), truncate from the prompt side (counted), and batch with length buckets or
packing (`iterate_batches`, deterministic and resumable from any step), reading records as batches need them.
"""

from __future__ import annotations

import bisect
import codecs
import collections
import contextlib
import gc
import hashlib
import json
import math
import multiprocessing
import os
import signal
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tqdm.auto import tqdm

from . import hf_datasets, templates
from .errors import ConfigError, DataError, FallbackWarning
from .files import atomic_dir, atomic_file
from .model_files import read_config
from .token_cache import (
    CacheWriteError,
    LazyStore,
    LineCheck,
    Record,
    RecordSet,
    Source,
    Store,
    StoreWriter,
    content_key,
    id_dtype,
    open_store,
    pack_records,
    raw_lines,
    truncate_record,
    truncated,
)

CACHE_VERSION = 4  # bump whenever the records a file turns into change (masking, text EOS, ...)
CHUNK = 1024  # records tokenized per batch call
TOKENIZE_BAR_MIN = {"B": 1 << 20, "rows": 2000}  # smaller sources tokenize without a progress bar
PARALLEL_MIN_BYTES = 32 << 20  # files from this size are tokenized by worker processes (one per core)
MAX_WORKERS = 8
LAZY_MIN_BYTES = 64 << 20  # JSON-lines files from this size are tokenized lazily (MLXTUNE_LAZY_TOKENIZE=0/1 decides)
LAZY_SAMPLE = 1000  # records tokenized up front from a lazy file: its format, and its tokens per byte
MAX_RECORD_BYTES = 16 << 20  # a longer line (or JSON array element) is refused: nothing that long can train
BOM = codecs.BOM_UTF8
NEWLINE = "\n"
PAD_MULTIPLE = 8  # batch lengths are rounded up to this so the compiled train step sees few shapes
SPLITS = ("train", "valid", "test")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function_call": "assistant", "observation": "tool"}
PAIR_PROMPTS = ("instruction", "question", "prompt")
PAIR_ANSWERS = ("response", "answer")


class Format(str, Enum):
    TEXT = "text"
    COMPLETIONS = "completions"
    CHAT = "chat"
    ALPACA = "alpaca"
    SHAREGPT = "sharegpt"
    PAIRS = "instruction-response"


FORMAT_HELP = ('{"text"}, {"prompt", "completion"}, {"messages": [{"role", "content"}]}, '
               '{"instruction", "input", "output"} (Alpaca), {"conversations": [{"from", "value"}]} (ShareGPT), '
               '{"instruction"|"question"|"prompt", "response"|"answer"}')


@dataclass
class DataSplits:
    train: RecordSet  # a Sequence of Record, read from the cached arrays on demand
    valid: RecordSet
    test: RecordSet
    truncated: int = 0  # examples shortened to max_seq_length
    dropped: int = 0  # examples with no trained token (after truncation), left out
    formats: dict[str, str] = field(default_factory=dict)  # file -> detected format name
    held_out: int = 0  # valid examples taken from a directory's train.jsonl because it has no valid.jsonl
    lazy: list[str] = field(default_factory=list)  # files tokenized as batches read them (LazyStore)

    def summary(self) -> str:
        """One line for the start of training: sizes, formats and the truncation counts."""
        files = ", ".join(f"{Path(f).name}: {fmt}" for f, fmt in self.formats.items())
        text = f"{len(self.train)} train, {len(self.valid)} valid, {len(self.test)} test examples ({files})"
        if self.held_out:
            text += f"; no valid.jsonl, so {self.held_out} valid examples were held out of train (--valid-split)"
        if self.truncated:
            text += f"; {self.truncated} examples truncated"
        if self.dropped:
            text += f"; {self.dropped} dropped (no trained token left)"
        if self.lazy:
            text += (f"; {', '.join(Path(f).name for f in self.lazy)} tokenized as batches read it (lengths "
                     "estimated from bytes, truncation not counted; MLXTUNE_LAZY_TOKENIZE=0 tokenizes it first)")
        return text


@dataclass(frozen=True)
class Keys:
    """Field names, mappable from the command line (`--prompt-key question --completion-key answer`)."""

    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"


# ----------------------------------------------------------------------------------------------- reading


def _short(record: Any, limit: int = 100) -> str:
    text = json.dumps(record, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fail(where: str, what: str, record: Any = None) -> DataError:
    return DataError(f"{where}: {what}" + (f"; the record: {_short(record)}" if record is not None else ""))


def read_records(path: str | os.PathLike) -> list[tuple[int, Any]]:
    """(line number, parsed JSON) for each record of a .jsonl file or a .json array; blank lines skipped.

    Reads the whole file into a list: for small files (evaluation rows). Training streams with `iter_records`.
    """
    return list(iter_records(path))


def iter_records(path: str | os.PathLike, progress=None) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) of each record, streamed: a .jsonl file line by line, a .json array
    element by element. A BOM and CRLF line ends are accepted; NUL bytes, bytes that are not UTF-8 and
    records over MAX_RECORD_BYTES are refused at their line. `progress` (a tqdm bar) gets the bytes read."""
    path = Path(path)
    if _is_json_array(path):
        yield from _json_array(path, progress)
        return
    seen = False
    for n, raw in _raw_lines(path, progress):
        record = _parse_line(path, n, raw, seen)
        if record is not _BLANK:
            seen = True
            yield n, record
    if not seen:
        raise DataError(f"{path}: the file is empty: it needs one JSON record per line")


def _is_json_array(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    return head.lstrip(BOM).lstrip().startswith(b"[")


def _raw_lines(path: Path, progress) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of each line of a JSON-lines file, a BOM taken off; over-long lines refused."""
    with open(path, "rb") as f:
        n = 0
        while raw := f.readline(MAX_RECORD_BYTES + 1):
            n += 1
            if progress is not None:
                progress.update(len(raw))
            if len(raw) > MAX_RECORD_BYTES:
                raise DataError(f"{path}:{n}: the line is longer than {MAX_RECORD_BYTES >> 20} MB: a record that long "
                                "cannot train (split the document into several records)")
            yield n, raw[len(BOM):] if n == 1 and raw.startswith(BOM) else raw


_BLANK = object()
_DECODER = json.JSONDecoder()


def _parse_line(path: Path, n: int, raw: bytes, seen: bool) -> Any:
    """The JSON record on line n, or _BLANK. `seen`: a record came before (else a failure may mean that the
    file is one pretty-printed object, which is said instead)."""
    if b"\0" in raw:
        column = raw.index(b"\0") + 1
        raise DataError(f"{path}:{n}: the line holds NUL bytes (byte {column}): this is not a text "
                        "file of JSON records (a binary or UTF-16 file?): save it as UTF-8 JSON lines")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{n}: not UTF-8 text (byte {e.start + 1} of the line is {raw[e.start:e.start + 1]!r}): "
                        "save the file as UTF-8") from None
    if not line.strip():
        return _BLANK
    try:
        return _DECODER.decode(line)
    except json.JSONDecodeError as e:
        if not seen and _is_one_object(path):
            raise DataError(f"{path} holds one JSON object, not records: give a JSON array of records "
                            "or one record per line (JSON lines)") from None
        # (json ends some messages with "at", as in "Invalid control character at": one "at" is enough)
        raise DataError(f"{path}:{n}: not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno}): "
                        f"{line[:80].rstrip()}") from None


def _is_one_object(path: Path) -> bool:
    if path.stat().st_size > MAX_RECORD_BYTES:
        return False
    try:
        return isinstance(json.loads(path.read_bytes().lstrip(BOM)), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def _json_array(path: Path, progress) -> Iterator[tuple[int, Any]]:
    """The elements of a JSON array file, decoded one at a time from a window that is read in blocks."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        buf, pos, line, eof, started, seen = "", 0, 1, False, False, False

        def more() -> None:
            nonlocal buf, pos, line, eof
            line += buf.count("\n", 0, pos)
            buf, pos = buf[pos:], 0
            block = f.read(max(1 << 20, len(buf)))
            if progress is not None:
                progress.update(len(block))
            try:
                buf += utf8.decode(block, final=not block)
            except UnicodeDecodeError as e:
                at = f.tell() - len(block) + e.start + 1
                raise DataError(f"{path}:{line + buf.count(NEWLINE)}: not UTF-8 text (near byte {at} of the file): "
                                "save the file as UTF-8") from None
            if "\0" in buf:
                at = line + buf.count("\n", 0, buf.index("\0"))
                raise DataError(f"{path}:{at}: the file holds NUL bytes: this is not a text file of JSON records "
                                "(a binary or UTF-16 file?): save it as UTF-8 JSON")
            eof = not block

        def skip() -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n\ufeff":
                    pos += 1
                if pos < len(buf) or eof:
                    return
                more()

        def where() -> int:
            return line + buf.count("\n", 0, pos)

        more()
        while True:
            skip()
            if not started:
                pos += 1  # the "["
                started = True
                continue
            if pos >= len(buf):
                raise DataError(f"{path}:{where()}: not valid JSON (the array is not closed with ']')")
            if buf[pos] == "]":
                break
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as e:
                    if not eof and len(buf) - pos <= MAX_RECORD_BYTES:  # the record may go on in the next block
                        more()
                        continue
                    if not eof:
                        raise DataError(f"{path}:{where()}: a record longer than {MAX_RECORD_BYTES >> 20} MB, or not "
                                        f"valid JSON ({e.msg}): split long documents into several records") from None
                    raise DataError(f"{path}:{line + buf.count(NEWLINE, 0, e.pos)}: not valid JSON ({e.msg})") from None
                if end == len(buf) and not eof:  # a value at the window's edge may go on in the next block
                    more()
                    continue
                break
            yield where(), value
            seen = True
            pos = end
            skip()
            if pos < len(buf) and buf[pos] == ",":
                pos += 1
            elif pos >= len(buf) or buf[pos] != "]":
                raise DataError(f"{path}:{where()}: not valid JSON (expected ',' or ']' between records)")
        pos += 1
        skip()
        if pos < len(buf):
            raise DataError(f"{path}:{where()}: not valid JSON (text after the closing ']')")
    if not seen:
        raise DataError(f"{path}: the JSON array is empty")


def detect_format(record: Any, keys: Keys = Keys()) -> Format | None:
    """The format one record is in, or None. Structured formats win over a stray "text" field."""
    if not isinstance(record, dict):
        return None
    if keys.messages in record:
        return Format.CHAT
    if "conversations" in record:
        return Format.SHAREGPT
    if keys.prompt in record and keys.completion in record:
        return Format.COMPLETIONS
    if "instruction" in record and "output" in record:
        return Format.ALPACA
    if any(k in record for k in PAIR_PROMPTS) and any(k in record for k in PAIR_ANSWERS):
        return Format.PAIRS
    if keys.text in record:
        return Format.TEXT
    return None


class _FormatCheck:
    """The one format of a whole source, checked record by record: a source mixing formats is refused."""

    def __init__(self, name: str | os.PathLike, keys: Keys):
        self.name, self.keys = name, keys
        self.first: tuple[int, Format] | None = None

    def __call__(self, line: int, record: Any) -> Format:
        fmt = detect_format(record, self.keys)
        if fmt is None:
            raise _fail(f"{self.name}:{line}", f"record matches no known format (expected one of {FORMAT_HELP}; "
                        "map other field names with --prompt-key/--completion-key)", record)
        if self.first is None:
            self.first = (line, fmt)
        elif fmt != self.first[1]:
            raise _fail(f"{self.name}:{line}", f"record is in {fmt.value} format but line {self.first[0]} is "
                        f"{self.first[1].value}: a file must use one format (split it, or convert with "
                        "`mlxtune data convert`)", record)
        return fmt

    def chunk(self, records: list[tuple[int, Any]]) -> Format:
        for line, record in records:
            fmt = self(line, record)
        return fmt


def detect_file_format(path: str | os.PathLike, records: list[tuple[int, Any]], keys: Keys = Keys()) -> Format:
    """The one format of a whole file: every record is checked, a file mixing formats is refused."""
    return _FormatCheck(path, keys).chunk(records)


def _string(value: Any, what: str, where: str, record: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)  # OpenAI-style content parts
    raise _fail(where, f"{what} must be a string, not {type(value).__name__}", record)


def _check_messages(messages: Any, where: str, record: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise _fail(where, "messages must be a non-empty list of {\"role\", \"content\"} objects", record)
    out = []
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or "role" not in m:
            raise _fail(where, f"message {i} must be an object with \"role\" and \"content\"", record)
        role = m["role"]
        if role not in ROLES:
            raise _fail(where, f"message {i} has unknown role {role!r} (expected system, user, assistant or tool)",
                        record)
        m = dict(m)
        if m.get("content") is None and (role == "assistant" and m.get("tool_calls")):
            m["content"] = ""
        elif "content" not in m:
            raise _fail(where, f"message {i} ({role}) has no \"content\"", record)
        else:
            m["content"] = _string(m["content"], f"message {i} content", where, record)
        out.append(m)
    if not any(m["role"] == "assistant" for m in out):
        raise _fail(where, "chat has no assistant turn, so there is nothing to train on", record)
    return out


def _tools(record: dict, where: str) -> list | None:
    tools = record.get("tools")
    if isinstance(tools, str):  # some ShareGPT exports store tools as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise _fail(where, "\"tools\" is a string that is not JSON", record) from None
    if tools is not None and not isinstance(tools, list):
        raise _fail(where, "\"tools\" must be a list of tool definitions", record)
    return tools or None


def to_messages(record: dict, fmt: Format, where: str = "record", keys: Keys = Keys()) -> tuple[list[dict], list | None]:
    """A chat-like record as (messages, tools); the single place where formats map to roles."""
    if fmt == Format.CHAT:
        return _check_messages(record[keys.messages], where, record), _tools(record, where)
    if fmt == Format.SHAREGPT:
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            raise _fail(where, "conversations must be a non-empty list of {\"from\", \"value\"} objects", record)
        messages = []
        for i, t in enumerate(turns, 1):
            if not isinstance(t, dict) or "from" not in t or "value" not in t:
                raise _fail(where, f"conversation turn {i} must be an object with \"from\" and \"value\"", record)
            role = SHAREGPT_ROLES.get(t["from"])
            if role is None:
                raise _fail(where, f"conversation turn {i} has unknown \"from\" {t['from']!r} "
                            "(expected human, gpt or system)", record)
            messages.append({"role": role, "content": _string(t["value"], f"turn {i} value", where, record)})
        return _check_messages(messages, where, record), _tools(record, where)
    if fmt == Format.COMPLETIONS:
        prompt = _string(record[keys.prompt], f"\"{keys.prompt}\"", where, record)
        answer = _string(record[keys.completion], f"\"{keys.completion}\"", where, record)
    elif fmt == Format.ALPACA:
        prompt = _string(record["instruction"], "\"instruction\"", where, record)
        extra = record.get("input") or ""
        if extra:
            prompt += "\n\n" + _string(extra, "\"input\"", where, record)
        answer = _string(record["output"], "\"output\"", where, record)
    elif fmt == Format.PAIRS:
        pk = next(k for k in PAIR_PROMPTS if k in record)
        ak = next(k for k in PAIR_ANSWERS if k in record)
        prompt = _string(record[pk], f"\"{pk}\"", where, record)
        answer = _string(record[ak], f"\"{ak}\"", where, record)
    else:
        raise _fail(where, f"{fmt.value} records are plain text, not a conversation", record)
    messages = []
    if isinstance(record.get("system"), str) and record["system"]:
        messages.append({"role": "system", "content": record["system"]})
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return messages, _tools(record, where)


def split_prompt_answer(record_json: dict | str) -> tuple[list[dict], str]:
    """(messages before the final assistant turn, that turn's text): a prompt and its expected answer.

    Takes a chat-like record (dict or JSON line) in any supported format; used for exact-match evaluation.
    """
    record = json.loads(record_json) if isinstance(record_json, str) else record_json
    fmt = detect_format(record)
    if fmt is None or fmt == Format.TEXT:
        raise DataError(f"not a chat-like record (expected one of {FORMAT_HELP}): {_short(record)}")
    messages, _ = to_messages(record, fmt)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def record_tools(record_json: dict | str) -> list | None:
    """The `tools` a chat-like record offers the model (to render its prompt like in training)."""
    record = json.loads(record_json) if isinstance(record_json, str) else record_json
    return _tools(record, "record") if isinstance(record, dict) else None


# ------------------------------------------------------------------------------------------- tokenizing


@dataclass
class _Options:
    template: str | None  # None: the tokenizer has no chat template (plain prompt + completion + EOS)
    train_on_inputs: bool
    keys: Keys


def file_source(path: str | os.PathLike) -> Source:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    raw = None if _is_json_array(path) else (lambda bar: _raw_lines(path, bar))
    return Source(str(path), lambda bar: iter_records(path, bar), lambda: content_key(files=[path]),
                  path.stat().st_size, raw_lines=raw)


def _text_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    hf = templates.hf_tokenizer(tokenizer)
    try:  # with the tokenizer's own BOS: plain text is used as the model saw it in pre-training
        batch = [list(ids) for ids in hf(texts)["input_ids"]] if texts else []
    except (TypeError, NotImplementedError):
        batch = [list(hf.encode(t)) for t in texts]
    eos = hf.eos_token_id
    for ids in batch:
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)  # so the model learns where a document ends
    return batch


def records_from(tokenizer, raw: list[tuple[int, Any]], fmt: Format, opts: _Options, name: str | os.PathLike,
                 specials: set[int] | None = None) -> list[tuple[list[int], list[bool]]]:
    """(ids, mask) of some (line, JSON) pairs of one source, all of format `fmt`; the first problem is raised."""
    with _gc_paused():
        return _records_from(tokenizer, raw, fmt, opts, name, specials)


@contextlib.contextmanager
def _gc_paused():
    """Python's cycle collector paused while a chunk is tokenized. A chunk allocates tens of containers a
    record (parsed JSON, messages, id and mask lists) that form no cycles, and each few hundred allocations
    made the collector walk them again: ~15% of the CPU time of tokenizing. It runs once after the chunk."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _records_from(tokenizer, raw: list[tuple[int, Any]], fmt: Format, opts: _Options, name: str | os.PathLike,
                  specials: set[int] | None) -> list[tuple[list[int], list[bool]]]:
    if fmt == Format.TEXT:
        texts = [_string(rec[opts.keys.text], f"\"{opts.keys.text}\"", f"{name}:{line}", rec) for line, rec in raw]
        return [(ids, [False] + [True] * (len(ids) - 1)) for ids in _text_ids(tokenizer, texts)]
    convs: list = []
    for line, rec in raw:
        try:
            convs.append(to_messages(rec, fmt, f"{name}:{line}", opts.keys))
        except DataError as e:
            convs.append(e)
    ok = [c for c in convs if not isinstance(c, DataError)]
    if opts.template is None:
        done = iter(_plain_records(tokenizer, ok, fmt, opts))
    else:
        done = iter(templates.chat_to_ids_many(tokenizer, ok, template=opts.template,
                                               train_on_inputs=opts.train_on_inputs, specials=specials))
    out = []
    for (line, rec), conv in zip(raw, convs):
        result = conv if isinstance(conv, DataError) else next(done)
        if isinstance(result, templates.TemplateMaskError):
            raise templates.TemplateMaskError(str(_fail(f"{name}:{line}", str(result), rec)))
        if isinstance(result, DataError):
            raise result if str(result).startswith(f"{name}:") else _fail(f"{name}:{line}", str(result), rec)
        out.append(result)
    return out


def _plain_records(tokenizer, conversations, fmt: Format, opts: _Options) -> list:
    """No chat template: prompt/completion-like records as prompt + completion + EOS; chats are an error."""
    out: list = []
    for messages, tools in conversations:
        if fmt in (Format.CHAT, Format.SHAREGPT) or tools or [m["role"] for m in messages] != ["user", "assistant"]:
            out.append(DataError(templates.NO_TEMPLATE))
        else:
            out.append(templates.plain_ids(tokenizer, messages[0]["content"], messages[1]["content"],
                                           opts.train_on_inputs))
    return out


def _tokenizer_fingerprint(tokenizer) -> str:
    hf = templates.hf_tokenizer(tokenizer)
    h = hashlib.sha256()
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(hf.get_vocab().items())).encode())
    h.update(repr((hf.bos_token, hf.eos_token, sorted(templates.special_ids(tokenizer)))).encode())
    return h.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("MLXTUNE_CACHE", Path.home() / ".cache" / "mlxtune")) / "data"


def _cache_key(source: Source, fingerprint: str, opts: _Options, identity: str | None = None) -> str:
    return content_key(identity or source.identity(), f"{CACHE_VERSION}|{fingerprint}|{opts.train_on_inputs}|{opts.keys}|",
                       opts.template if opts.template is not None else "\0no template")


def _vocab_size(tokenizer) -> int:
    hf = templates.hf_tokenizer(tokenizer)
    try:
        return len(hf)
    except TypeError:
        return int(getattr(hf, "vocab_size", 1 << 31))


def tokenize_file(path: str | os.PathLike, tokenizer, opts: _Options, cache_dir: Path | None = None,
                  fingerprint: str | None = None) -> Store:
    """Every record of one file as a Store of compact arrays, from the cache when it is fresh."""
    return tokenize_source(file_source(path), tokenizer, opts, cache_dir, fingerprint, lazy=False)


def tokenize_source(source: Source, tokenizer, opts: _Options, cache_dir: Path | None = None,
                    fingerprint: str | None = None, lazy: bool = True) -> Store | LazyStore:
    """Every record of `source`, tokenized in streamed chunks into a Store (cached in `cache_dir/KEY`);
    with `lazy`, a big JSON-lines file becomes a LazyStore instead (see `lazy_tokenizing`)."""
    fingerprint = fingerprint or _tokenizer_fingerprint(tokenizer)
    if lazy and lazy_tokenizing(source):
        return _lazy_store(source, tokenizer, opts, fingerprint)
    key = _cache_key(source, fingerprint, opts)
    folder = None
    if cache_dir is not None:
        store = open_store(cache_dir / key)
        if store is not None:
            return store
        folder = cache_dir / key
    try:
        return _tokenize(source, tokenizer, opts, key, folder)
    except CacheWriteError as e:  # a full disk or a read-only cache only costs speed
        warnings.warn(FallbackWarning(f"cannot write the tokenization cache ({e}): tokenizing {source.name} again "
                                      "without it"), stacklevel=2)
        return _tokenize(source, tokenizer, opts, key, None)


def lazy_tokenizing(source: Source) -> bool:
    """Whether `source` is tokenized as batches read it: JSON-lines files of LAZY_MIN_BYTES and more, unless
    MLXTUNE_LAZY_TOKENIZE says otherwise (1: every JSON-lines file, 0: none).

    Why: tokenizing is ~0.3 ms a record on one CPU core, so a million rows cost minutes before the first
    step. Lazily, training starts after one scan of the file; what it gives up: batches are grouped by
    each line's byte length (an estimate of its token length), a bad line is reported seconds into training
    (`LineCheck`) rather than before it, and no token cache is written.
    """
    setting = os.environ.get("MLXTUNE_LAZY_TOKENIZE", "").strip()
    if setting not in ("", "0", "1"):
        raise ConfigError(f"MLXTUNE_LAZY_TOKENIZE={setting!r} must be 0 (tokenize every file first) or 1 "
                          "(tokenize every JSON-lines file as batches read it)")
    if source.raw_lines is None:
        return False
    return setting == "1" if setting else source.size >= LAZY_MIN_BYTES


def _scan_lines(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(line numbers, byte offsets, byte lengths) of the non-blank lines of a JSON-lines file, read in blocks,
    and a hash of its bytes (the same pass: a second read of a big file cost ~0.5 s before the first step)."""
    ends = []
    size = 0
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
            ends.append(np.flatnonzero(np.frombuffer(block, np.uint8) == 10) + (size + 1))
            size += len(block)
    end = np.concatenate(ends) if ends else np.zeros(0, np.int64)
    if not len(end) or end[-1] != size:
        end = np.append(end, size)  # the last line has no newline
    start = np.concatenate([[0], end[:-1]]).astype(np.int64)
    nbytes = end - start
    too_long = np.flatnonzero(nbytes > MAX_RECORD_BYTES)
    if len(too_long):
        raise DataError(f"{path}:{too_long[0] + 1}: the line is longer than {MAX_RECORD_BYTES >> 20} MB: a record "
                        "that long cannot train (split the document into several records)")
    # Short lines may be blank (whitespace only): look at those; a long blank line becomes an empty record.
    blank = np.zeros(len(start), bool)
    with open(path, "rb") as f:
        for k in np.flatnonzero(nbytes <= 16).tolist():
            f.seek(int(start[k]))
            blank[k] = not f.read(int(nbytes[k])).strip()
    keep = ~blank & (nbytes > 0)
    return np.flatnonzero(keep).astype(np.int64) + 1, start[keep], nbytes[keep], digest.hexdigest()


def _lazy_store(source: Source, tokenizer, opts: _Options, fingerprint: str) -> LazyStore:
    path = Path(source.name)
    lines, offsets, nbytes, digest = _scan_lines(path)
    if not len(lines):
        raise DataError(f"{path}: the file is empty: it needs one JSON record per line")
    specials = templates.special_ids(tokenizer)
    check = _FormatCheck(source.name, opts.keys)

    def parse(n: int, line: bytes) -> Any:
        """The record on line n, None for a long line of whitespace (nothing to train); a bad line raises."""
        record = _parse_line(path, n, line, n != lines[0])
        if record is _BLANK:
            return None
        check(n, record)  # the first record read fixes the file's format, as for a whole file
        return record

    def check_lines(raw: list[tuple[int, bytes]]) -> None:  # every check short of tokenizing: for LineCheck
        for n, line in raw:
            parse(n, line)  # not kept: keeping each chunk's records doubled the check (5.7 s a million lines, not 3.3)

    def read(raw: list[tuple[int, bytes]]) -> list:
        records = [(n, parse(n, line)) for n, line in raw]
        kept = [r for r in records if r[1] is not None]
        done = iter(records_from(tokenizer, kept, check.first[1], opts, source.name, specials) if kept else ())
        return [([0], [False]) if record is None else next(done) for _, record in records]

    # The first records, tokenized now: the file's format (every later record must match it) and its tokens
    # per byte, which turn each line's bytes into the length estimate batches are planned on.
    sample = min(LAZY_SAMPLE, len(lines))
    tokens = sum(len(ids) for ids, _ in read(raw_lines(path, lines, offsets, nbytes, range(sample))))
    if check.first is None:
        raise DataError(f"{path}: the first {sample} lines hold only whitespace: it needs one JSON record per line")
    per_byte = tokens / max(1, int(nbytes[:sample].sum()))
    estimate = np.maximum(2, np.ceil(nbytes * per_byte)).astype(np.int32)
    key = content_key(_cache_key(source, fingerprint, opts, identity=digest), "lazy")
    return LazyStore(key, check.first[1].value, lines, offsets, nbytes, estimate, read, path,
                     id_dtype(_vocab_size(tokenizer)), lines_check=LineCheck(check_lines))


def _tokenize(source: Source, tokenizer, opts: _Options, key: str, folder: Path | None) -> Store:
    writer = StoreWriter(key, id_dtype(_vocab_size(tokenizer)), folder)
    specials = templates.special_ids(tokenizer)
    check = _FormatCheck(source.name, opts.keys)
    workers = _worker_count(source)
    try:
        with tqdm(total=source.size, unit=source.unit, unit_scale=True, desc=f"tokenizing {Path(source.name).name}",
                  leave=False, disable=source.size < TOKENIZE_BAR_MIN.get(source.unit, 0)) as bar:
            if workers:
                _tokenize_in_workers(source, tokenizer, opts, specials, check, writer, workers, bar)
            else:
                for chunk in _batched(source.records(bar), CHUNK):
                    fmt = check.chunk(chunk)
                    writer.add(records_from(tokenizer, chunk, fmt, opts, source.name, specials), [n for n, _ in chunk])
        if check.first is None:
            raise DataError(f"{source.name}: the dataset is empty")
        return writer.finish(check.first[1].value)
    except BaseException as e:
        writer.abort(e)
        raise


def _worker_count(source: Source) -> int:
    """Worker processes for tokenizing `source`: none for small sources (starting one costs seconds)."""
    setting = os.environ.get("MLXTUNE_TOKENIZE_WORKERS")
    if source.raw_lines is None:
        return 0
    if setting is not None:
        try:
            return max(0, int(setting))
        except ValueError:
            raise ConfigError(f"MLXTUNE_TOKENIZE_WORKERS={setting!r} must be a whole number (0: no worker "
                              "processes)") from None
    cores = os.cpu_count() or 1
    return min(MAX_WORKERS, cores) if cores > 1 and source.size >= PARALLEL_MIN_BYTES else 0


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer, opts: _Options, specials: set[int], name: str, dtype) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool
    # One worker per core already keeps every core busy: the tokenizer's own threads would only contend.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER.update(tokenizer=tokenizer, opts=opts, specials=specials, name=name, dtype=dtype)


def _worker_chunk(lines: list[tuple[int, bytes]], seen: bool):
    """In a worker process: parse and tokenize some raw lines -> (format, packed arrays, line numbers), or
    (None, None, lines) when the chunk is not in one format (the parent then reports it exactly)."""
    w = _WORKER
    path = Path(w["name"])
    records = []
    for n, raw in lines:
        record = _parse_line(path, n, raw, seen or bool(records))
        if record is not _BLANK:
            records.append((n, record))
    if not records:
        return None, None, []
    formats = {detect_format(r, w["opts"].keys) for _, r in records}
    if len(formats) != 1 or None in formats:
        return None, None, [n for n, _ in records]
    fmt = formats.pop()
    out = records_from(w["tokenizer"], records, fmt, w["opts"], w["name"], w["specials"])
    return fmt, pack_records(out, w["dtype"]), [n for n, _ in records]


def _tokenize_in_workers(source: Source, tokenizer, opts: _Options, specials: set[int], check: _FormatCheck,
                         writer: StoreWriter, workers: int, bar) -> None:
    """Chunks of raw lines go to `workers` processes and come back as arrays, in file order; a few chunks
    per worker are in flight, so memory does not grow with the file."""
    hf = templates.hf_tokenizer(tokenizer)
    context = multiprocessing.get_context("spawn")  # fork is unsafe once MLX or tokenizers threads exist
    pending: collections.deque = collections.deque()
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                               initargs=(hf, opts, specials, source.name, writer.dtype))
    try:
        chunks = _batched(source.raw_lines(bar), CHUNK)
        submitted = 0
        while True:
            while len(pending) < 3 * workers:
                lines = next(chunks, None)
                if lines is None:
                    break
                pending.append((pool.submit(_worker_chunk, lines, submitted > 0), lines))
                submitted += 1
            if not pending:
                break
            future, lines = pending.popleft()
            fmt, packed, numbers = future.result()
            if not numbers:
                continue
            if fmt is None or (check.first is not None and fmt != check.first[1]):
                # Not the file's one format somewhere in this chunk: find and report the record as a single
                # process would.
                path = Path(source.name)
                for n, raw in lines:
                    record = _parse_line(path, n, raw, True)
                    if record is not _BLANK:
                        check(n, record)
            if check.first is None:
                check.first = (numbers[0], fmt)
            writer.add_packed(packed, numbers)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _batched(items: Iterable, n: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ------------------------------------------------------------------------------- splitting and truncating


def is_lazy(records) -> bool:
    """Whether some of `records` are tokenized only when read (a LazyStore's)."""
    return isinstance(records, RecordSet) and any(isinstance(st, LazyStore) for st in records.stores)


def records_fingerprint(records: Sequence[Record]) -> str:
    """A short hash of exactly what training sees: every record's token ids and loss mask, in order.

    A RecordSet answers from its arrays without reading a token (its stores' cache keys already hash the
    source content, tokenizer and options; its items say which records, cut how).
    """
    if isinstance(records, RecordSet):
        return records.fingerprint()
    h = hashlib.sha256()
    for r in records:
        h.update(np.asarray(r.ids, np.int32).tobytes())
        h.update(np.packbits(np.asarray(r.mask, bool)).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def split_indices(n: int, valid_split: float, test_split: float, seed: int) -> dict[str, np.ndarray]:
    """Which records of an n-record file go to train/valid/test (sorted arrays); fixed by the seed."""
    for name, frac in (("--valid-split", valid_split), ("--test-split", test_split)):
        if not 0 <= frac < 1:
            raise ConfigError(f"{name} {frac} must be a fraction in [0, 1)")
    n_test = int(round(n * test_split)) if test_split else 0
    n_valid = int(round(n * valid_split)) if valid_split else 0
    if valid_split and n_valid == 0 and n > 1:
        n_valid = 1
    if test_split and n_test == 0 and n - n_valid > 1:
        n_test = 1
    if n - n_valid - n_test < 1:
        raise DataError(f"{n} examples are too few to split off {n_valid} valid and {n_test} test examples")
    order = np.random.default_rng(seed).permutation(n)
    return {"train": np.sort(order[n_test + n_valid:]), "valid": np.sort(order[n_test:n_test + n_valid]),
            "test": np.sort(order[:n_test])}


def truncate(record: Record, max_seq_length: int, bos_id: int | None = None) -> Record | None:
    """Fit `record` into max_seq_length tokens (`token_cache.truncate_record`); None when nothing trained is left."""
    ids, mask = truncate_record(np.asarray(record.ids, np.int64), np.asarray(record.mask, bool), max_seq_length, bos_id)
    return Record(ids.tolist(), mask.tolist()) if mask.any() else None


def _bos_id(tokenizer) -> int | None:
    return getattr(templates.hf_tokenizer(tokenizer), "bos_token_id", None)


def _resolve_inputs(data) -> list[tuple[Source, str | None]]:
    """(source, split) for each input: split None means "split me" (a lone file), and "train+valid" a
    directory's train file when the directory has no valid file (validation is held out of it).

    An input is a data file, a folder of train/valid/test.jsonl, a folder written by the `datasets`
    library's `save_to_disk`, or a Hugging Face dataset id.
    """
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not items:
        raise ConfigError("--data: no data files given")
    out: list[tuple[Source, str | None]] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir() and hf_datasets.is_saved_dataset(p):
            out += hf_datasets.dataset_sources(p)
        elif p.is_dir():
            found = {s: next((p / f"{s}{ext}" for ext in (".jsonl", ".json") if (p / f"{s}{ext}").is_file()), None)
                     for s in SPLITS}
            if found["train"] is None:
                raise DataError(f"{p} has no train.jsonl: a data directory needs train.jsonl "
                                "(and optionally valid.jsonl, test.jsonl), or a dataset saved by `datasets`")
            if found["valid"] is None:
                found["train+valid"] = found.pop("train")
            out += [(file_source(f), s) for s, f in found.items() if f is not None]
        elif p.is_file():
            if p.suffix not in (".jsonl", ".json"):
                raise DataError(f"{p}: data files must be .jsonl (one JSON record per line) or .json (an array)")
            out.append((file_source(p), None))
        elif hf_datasets.looks_like_hub_id(str(item)):
            out += hf_datasets.dataset_sources(str(item))
        else:
            raise DataError(f"--data {item}: no such file or directory")
    return out


def _load_untruncated(data, tokenizer, *, valid_split, test_split, seed, train_on_inputs, chat_template,
                      keys: Keys, cache, lazy: bool = True) -> tuple[dict[str, list[tuple[Store, np.ndarray]]],
                                                                      dict[str, str], int]:
    """The records of each split as (store, rows) pairs, the format of each source, and how many valid
    records were held out of a train file. `lazy`: big JSON-lines files may become LazyStores."""
    opts = _options(tokenizer, chat_template, train_on_inputs, keys)
    cache_dir = None
    if cache:
        cache_dir = default_cache_dir() if cache is True else Path(cache)
    fingerprint = _tokenizer_fingerprint(tokenizer)
    splits: dict[str, list[tuple[Store, np.ndarray]]] = {s: [] for s in SPLITS}
    formats = {}
    held_out = 0
    for source, split in _resolve_inputs(data):
        store = tokenize_source(source, tokenizer, opts, cache_dir, fingerprint, lazy=lazy)
        formats[source.name] = store.fmt
        if split in SPLITS:
            splits[split].append((store, np.arange(len(store), dtype=np.int64)))
            continue
        # A lone file is split three ways; a directory's train file without a valid file gives up only
        # validation examples, so training still reports a validation loss.
        parts = split_indices(len(store), valid_split, test_split if split is None else 0.0, seed)
        for name, idx in parts.items():
            splits[name].append((store, idx))
        if split is not None:
            held_out += len(parts["valid"])
    return splits, formats, held_out


def _options(tokenizer, chat_template, train_on_inputs: bool, keys: Keys) -> _Options:
    template = templates.template_for(tokenizer, templates.read_template_option(chat_template))
    return _Options(template=template, train_on_inputs=train_on_inputs, keys=keys)


def file_records(path: str | os.PathLike, tokenizer, *, limit: int | None = None, max_seq_length: int = 2048,
                 chat_template: str | None = None) -> RecordSet:
    """The records of the first `limit` rows of one file, in file order, truncated as training truncates them
    (a row with nothing left to train is left out). What evaluation scores the loss on: the same rows it
    generates for, whatever truncation drops."""
    store = tokenize_file(path, tokenizer, _options(tokenizer, chat_template, False, _keys()))
    rows = np.arange(len(store) if limit is None else min(limit, len(store)), dtype=np.int64)
    return truncated(store, rows, max_seq_length, _bos_id(tokenizer))[0]


def _keys(prompt_key=None, completion_key=None, text_key=None, messages_key=None) -> Keys:
    return Keys(text=text_key or "text", prompt=prompt_key or "prompt", completion=completion_key or "completion",
                messages=messages_key or "messages")


def _truncate_splits(splits: dict[str, list[tuple[Store, np.ndarray]]], max_seq_length: int,
                     bos: int | None) -> tuple[dict[str, RecordSet], int, int]:
    """Truncate every record; return the kept records per split and the truncated and dropped counts."""
    out: dict[str, RecordSet] = {}
    n_truncated = n_dropped = 0
    for name, parts in splits.items():
        kept = []
        for store, rows in parts:
            records, t, d = truncated(store, rows, max_seq_length, bos)
            kept.append(records)
            n_truncated, n_dropped = n_truncated + t, n_dropped + d
        out[name] = RecordSet.concat(kept)
    return out, n_truncated, n_dropped


def load_dataset(data, tokenizer, *, valid_split: float = 0.1, test_split: float = 0.0, seed: int = 0,
                 max_seq_length: int = 2048, train_on_inputs: bool = False, chat_template: str | None = None,
                 prompt_key: str | None = None, completion_key: str | None = None, text_key: str | None = None,
                 messages_key: str | None = None, cache: bool | str | os.PathLike = True) -> DataSplits:
    """Read, check, tokenize, split and truncate a dataset.

    `data`: a directory with train/valid/test.jsonl (without valid.jsonl, valid_split of train is held
    out for validation), one .jsonl/.json file (split with valid_split, test_split and seed), a folder
    saved by the `datasets` library or a Hugging Face dataset id (`pip install mlxtune[datasets]`;
    HF_HUB_OFFLINE=1 uses only the local cache), or a list of such inputs to mix.
    `tokenizer`: mlx-lm TokenizerWrapper or a Hugging Face tokenizer.
    `chat_template`: template text or a file, overriding the tokenizer's.
    `cache`: True (~/.cache/mlxtune/data, or $MLXTUNE_CACHE/data), False, or a directory. The splits are
    RecordSets over the cached arrays: records are read when a batch needs them. A big JSON-lines file is
    tokenized as batches read it instead (`lazy_tokenizing`).
    """
    if max_seq_length < 2:
        raise ConfigError(f"--max-seq-length {max_seq_length} must be at least 2")
    keys = _keys(prompt_key, completion_key, text_key, messages_key)
    splits, formats, held_out = _load_untruncated(data, tokenizer, valid_split=valid_split, test_split=test_split,
                                                  seed=seed, train_on_inputs=train_on_inputs,
                                                  chat_template=chat_template, keys=keys, cache=cache)
    lazy = list(dict.fromkeys(str(st.path) for parts in splits.values() for st, _ in parts if isinstance(st, LazyStore)))
    out, n_truncated, n_dropped = _truncate_splits(splits, max_seq_length, _bos_id(tokenizer))
    return DataSplits(out["train"], out["valid"], out["test"], truncated=n_truncated, dropped=n_dropped,
                      formats=formats, held_out=held_out, lazy=lazy)


# ------------------------------------------------------------------------------------------------ batching


@dataclass
class Batch:
    """One batch as numpy arrays, the same for every engine (MLX, torch) and every rank."""

    inputs: np.ndarray  # int32 (B, L): ids[:-1] of each row, right-padded with 0
    targets: np.ndarray  # int32 (B, L): ids[1:]
    loss_mask: np.ndarray  # float32 (B, L): 1.0 where targets[b, t] is trained; 0 on padding
    segments: np.ndarray | None  # int32 (B, L) with packing: 1, 2, .. = example of each position, 0 = padding
    n_real: int  # non-padding input positions (for tokens/sec)


def round_up(n: int, k: int) -> int:
    """The smallest multiple of k that is >= n."""
    return -(-n // k) * k


def _padded_length(n: int) -> int:
    return max(PAD_MULTIPLE, round_up(n, PAD_MULTIPLE))


def _pack(order: Sequence[int], sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: rows of record indices whose sizes sum to at most capacity."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in sorted(order, key=lambda i: -sizes[i]):  # stable: ties keep the shuffled order
        k = bisect.bisect_left(free, (sizes[i], -1))
        if k == len(free):
            rows.append([i])
            bisect.insort(free, (capacity - sizes[i], len(rows) - 1))
        else:
            room, row = free.pop(k)
            rows[row].append(i)
            bisect.insort(free, (room - sizes[i], row))
    return rows


def _by_size_then_jitter(sizes: np.ndarray, jitter: np.ndarray) -> np.ndarray:
    """`np.lexsort((jitter, sizes))`, in two stable sorts: the lengths (which fit 16 bits below 65536 tokens)
    are radix-sorted, 2x faster at a million records; the order is the same, ties included."""
    by_jitter = np.argsort(jitter, kind="stable")
    key = sizes[by_jitter]
    if len(key) and 0 <= key.min() and key.max() < 1 << 16:
        key = key.astype(np.uint16)
    return by_jitter[np.argsort(key, kind="stable")]


def _epoch_plan(sizes: np.ndarray, batch_size: int, seed: int, epoch: int, shuffle: bool, pack: bool,
                capacity: int, order: str = "length") -> list:
    """One epoch as batches, a pure function of its arguments. A batch is a list of rows of record indices
    when packing, else an array of record indices (one per row). `order="random"` (unpacked) draws each
    batch's rows at random instead of grouping similar lengths."""
    n = len(sizes)
    rng = np.random.default_rng([seed, epoch])
    jitter = rng.random(n) if shuffle else np.arange(n, dtype=float)
    if order == "random" and not pack:
        # Rows in the order of the same per-epoch draw that breaks length ties: one permutation, then batches.
        order_ = np.argsort(jitter, kind="stable")
        batches: list = [order_[i:i + batch_size] for i in range(0, n, batch_size)]
    elif pack:
        order = np.argsort(jitter, kind="stable").tolist()
        size_list = sizes.tolist()
        rows = _pack(order, size_list, capacity)
        fill = [sum(size_list[i] for i in row) for row in rows]
        by_len = sorted(range(len(rows)), key=lambda r: fill[r])
        rows = [rows[r] for r in by_len]
        batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    else:
        # Sort by padded width, ties broken randomly per epoch, so each batch holds rows of one width. Rows of
        # one width cost the same padding in any order, so among them a batch is drawn at random: sorting by
        # exact length made batches of near-copies where length goes with content (every request for one
        # tool), and such batches train worse (docs/training.md, "Batch order").
        order = _by_size_then_jitter(-(-sizes // PAD_MULTIPLE), jitter)
        batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches)).tolist()]
    return batches


def _record_arrays(records, i: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(records, RecordSet):
        return records.arrays(i)
    r = records[i]
    return np.asarray(r.ids, np.int64), np.asarray(r.mask, bool)


def _make_batch(records, rows, max_seq_length: int, pack: bool) -> Batch:
    if isinstance(rows, np.ndarray):
        rows = [[i] for i in rows.tolist()]
    cut = [[_record_arrays(records, i) for i in row] for row in rows]
    cut = [[(ids[:max_seq_length], mask[:max_seq_length]) for ids, mask in row] for row in cut]
    length = _padded_length(max(sum(len(ids) - 1 for ids, _ in row) for row in cut))
    shape = (len(rows), length)
    inputs, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    loss_mask, segments = np.zeros(shape, np.float32), np.zeros(shape, np.int32)
    for b, row in enumerate(cut):
        t = 0
        for s, (ids, mask) in enumerate(row, 1):
            n = len(ids) - 1
            inputs[b, t:t + n] = ids[:-1]
            targets[b, t:t + n] = ids[1:]
            loss_mask[b, t:t + n] = mask[1:]
            segments[b, t:t + n] = s
            t += n
    return Batch(inputs=inputs, targets=targets, loss_mask=loss_mask, segments=segments if pack else None,
                 n_real=int((segments > 0).sum()))


def batch_of(records: Sequence[Record], max_seq_length: int = 2048) -> Batch:
    """One unpacked batch of `records`, row b holding records[b]: for scores that must line up row by row."""
    return _make_batch(records, [[i] for i in range(len(records))], max_seq_length, False)


def _check_batching(records, batch_size: int, max_seq_length: int) -> np.ndarray:
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be at least 1")
    if max_seq_length < 2:
        raise ConfigError(f"--max-seq-length {max_seq_length} must be at least 2")
    if isinstance(records, RecordSet):
        lengths = records.lengths.astype(np.int64)
    else:
        lengths = np.fromiter((len(r.ids) for r in records), np.int64, len(records))
    # Input positions per record (ids[:-1]); a one-token record has nothing to predict.
    return np.maximum(0, np.minimum(lengths, max_seq_length) - 1)


def iterate_batches(records: Sequence[Record], batch_size: int, *, max_seq_length: int = 2048, seed: int = 0,
                    start_step: int = 0, loop: bool = True, shuffle: bool = True, pack: bool = False,
                    order: str = "length") -> Iterator[Batch]:
    """Length-bucketed (or packed, or with `order="random"` random) batches in shuffled order, deterministic
    given `seed`.

    `records`: a RecordSet (read from the cache as batches need them) or a list of Records.
    `start_step=k` yields exactly what a fresh iterator yields from its k-th batch on (for --resume).
    `loop=False` makes one pass (for evaluation). With `pack`, rows hold several examples and
    `Batch.segments` says which; attention must stay inside a segment.
    """
    sizes = _check_batching(records, batch_size, max_seq_length)
    keep = np.flatnonzero(sizes > 0)
    if not len(keep):
        if loop:
            raise DataError("no examples to train on (all are empty or were dropped)")
        return
    if len(keep) < len(sizes):
        records = records.take(keep) if isinstance(records, RecordSet) else [records[i] for i in keep.tolist()]
        sizes = sizes[keep]
    skip, epoch = max(0, start_step), 0
    per_epoch = None if pack else math.ceil(len(sizes) / batch_size)
    if per_epoch:
        epoch, skip = divmod(skip, per_epoch)
        if not loop and epoch > 0:
            return
    while True:
        plan = _epoch_plan(sizes, batch_size, seed, epoch, shuffle, pack, max_seq_length, order)
        for rows in plan[skip:]:
            yield _make_batch(records, rows, max_seq_length, pack)
        skip = max(0, skip - len(plan))
        epoch += 1
        if not loop:
            return


def batch_rows(batch: Batch, rows, width: int | None = None) -> Batch:
    """Rows `rows` (a slice or indices) of a batch, its first `width` columns: a micro-batch, or a rank's share
    (n_real, a report number, stays the batch's)."""
    cols = slice(None, width)
    seg = None if batch.segments is None else batch.segments[rows][:, cols]
    return replace(batch, inputs=batch.inputs[rows][:, cols], targets=batch.targets[rows][:, cols],
                   loss_mask=batch.loss_mask[rows][:, cols], segments=seg)


def micro_batches(batch: Batch, accumulation: int) -> list[Batch]:
    """The rows of `batch` in `accumulation` parts (gradient accumulation), or [batch] itself.

    The rows go in order of length and each part is cut to its own longest row (to a multiple of 8): the
    summed loss and gradients do not depend on which rows share a part, so a random batch's short rows
    stop being padded to its longest one. A row's length ends at its last trained token (or packed
    token): attention is causal, so nothing after it changes the loss."""
    if accumulation == 1:
        return [batch]
    used = batch.loss_mask > 0 if batch.segments is None else batch.segments > 0
    ends = np.where(used.any(1), used.shape[1] - np.argmax(used[:, ::-1], axis=1), 0)
    order = np.argsort(ends, kind="stable")
    size = -(-len(order) // accumulation)
    parts = []
    for lo in range(0, len(order), size):
        rows = np.sort(order[lo:lo + size])  # the batch's own row order inside a part
        parts.append(batch_rows(batch, rows, _padded_length(int(ends[rows].max()))))
    return parts


def evaluation_batches(records, batch_size: int, max_seq_length: int, num_batches: int = -1, *,
                       share: tuple[int, int] = (0, 1), every_rank_runs: bool = False) -> Iterator[Batch]:
    """What an evaluation scores: the first `num_batches` batches of `records` (-1 = all), unpacked, in order.
    `share=(rank, size)`: only rows rank::size of each batch (a rank's part of the sums); a rank with no row
    in a short last batch skips it, or with `every_rank_runs` gets a row that counts nothing (under FSDP
    every forward is a collective of all ranks)."""
    if not records:
        raise DataError("no records to evaluate (the split is empty)")
    rank, size = share
    batches = iterate_batches(records, min(batch_size, len(records)), max_seq_length=max_seq_length, seed=0,
                              start_step=0, loop=False, shuffle=False, pack=False)
    for i, batch in enumerate(batches):
        if num_batches != -1 and i >= num_batches:
            return
        if size > 1:
            if len(batch.inputs) > rank:
                batch = batch_rows(batch, slice(rank, None, size))
            elif every_rank_runs:
                batch = batch_rows(batch, slice(0, 1))
                batch = replace(batch, loss_mask=np.zeros_like(batch.loss_mask))
            else:
                continue
        yield batch


def padding_fraction(records: Sequence[Record], batch_size: int, *, max_seq_length: int = 2048, seed: int = 0,
                     pack: bool = False, order: str = "length") -> float:
    """Share of batch positions that are padding over one epoch (what to report before training)."""
    sizes = _check_batching(records, batch_size, max_seq_length)
    sizes = sizes[sizes > 0]
    if not len(sizes):
        return 0.0
    if not pack and order == "random":
        plan = _epoch_plan(sizes, batch_size, seed, 0, True, False, max_seq_length, order)
        longest = np.array([sizes[rows].max() for rows in plan])
        padded = np.maximum(PAD_MULTIPLE, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
        return float(1.0 - sizes.sum() / (padded * np.array([len(rows) for rows in plan])).sum())
    if not pack:  # batches are runs of the length-sorted sizes; their order does not change the share
        ordered = np.sort(sizes)
        starts = np.arange(0, len(ordered), batch_size)
        longest = np.maximum.reduceat(ordered, starts)
        counts = np.diff(np.append(starts, len(ordered)))
        padded = np.maximum(PAD_MULTIPLE, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
        return float(1.0 - ordered.sum() / (counts * padded).sum())
    real = total = 0
    size_list = sizes.tolist()
    for rows in _epoch_plan(sizes, batch_size, seed, 0, True, pack, max_seq_length):
        fills = [sum(size_list[i] for i in row) for row in rows]
        real += sum(fills)
        total += len(rows) * _padded_length(max(fills))
    return 1.0 - real / total


# ------------------------------------------------------------------------------ inspect, convert, split


@dataclass
class DataReport:
    """What `mlxtune data inspect` shows: formats, sizes, token lengths and what truncation will do."""

    formats: dict[str, str]  # file -> format
    lengths: dict[str, np.ndarray]  # split -> token lengths before truncation
    max_seq_length: int
    truncated: int  # examples longer than max_seq_length that are kept, shortened
    dropped: int  # examples that will be left out (no trained token)
    examples: list[Record]  # the first n training examples as they will be trained (after truncation)
    tokenizer: Any = None  # the tokenizer used, to decode `examples` (see `highlight`)
    padding: dict[str, float] = field(default_factory=dict)  # "random"/"bucketed"/"packed" -> train batches' padding
    rendering: str = ""  # how conversations become text, and why (templates.describe_rendering)

    def length_stats(self, split: str) -> dict[str, int]:
        x = np.asarray(self.lengths[split])
        if not len(x):
            return {}
        return {"min": int(x.min()), "median": int(np.median(x)), "p95": int(np.percentile(x, 95)),
                "max": int(x.max())}


def _tokenizer_of(model_or_tokenizer):
    if not isinstance(model_or_tokenizer, (str, os.PathLike)):
        return model_or_tokenizer
    # Imported here: mlx-lm brings torch in through transformers (seconds), and the worker processes that
    # tokenize big files import this module but never load a model.
    from .gguf.sources import resolve_model
    from .models import load_tokenizer

    path = resolve_model(model_or_tokenizer)
    config = read_config(path) if (path / "config.json").exists() else {}
    return load_tokenizer(path, config)


def inspect_dataset(model, data, *, n: int = 3, max_seq_length: int = 2048, valid_split: float = 0.1,
                    test_split: float = 0.0, seed: int = 0, train_on_inputs: bool = False,
                    chat_template: str | None = None, prompt_key: str | None = None,
                    completion_key: str | None = None, text_key: str | None = None,
                    messages_key: str | None = None, batch_size: int = 4,
                    cache: bool | str | os.PathLike = True) -> DataReport:
    """Load `data` as training would (with the tokenizer of `model`, a path/hub id or a tokenizer) and report.

    `batch_size` is only used to estimate the padding of training batches: random, bucketed and packed.
    """
    if max_seq_length < 2:
        raise ConfigError(f"--max-seq-length {max_seq_length} must be at least 2")
    tokenizer = _tokenizer_of(model)
    keys = _keys(prompt_key, completion_key, text_key, messages_key)
    splits, formats, _ = _load_untruncated(data, tokenizer, valid_split=valid_split, test_split=test_split,
                                           seed=seed, train_on_inputs=train_on_inputs, chat_template=chat_template,
                                           keys=keys, cache=cache, lazy=False)  # exact lengths, whatever the size
    kept, truncated, dropped = _truncate_splits(splits, max_seq_length, _bos_id(tokenizer))
    train = kept["train"]
    lengths = {name: np.concatenate([store.lengths[rows] for store, rows in parts]) if parts else np.zeros(0, np.int64)
               for name, parts in splits.items()}
    padding = {}
    if len(train):
        padding = {order: padding_fraction(train, batch_size, max_seq_length=max_seq_length, seed=seed, order=o, pack=p)
                   for order, o, p in (("random", "random", False), ("bucketed", "length", False),
                                       ("packed", "length", True))}
    rendering = templates.describe_rendering(tokenizer, templates.read_template_option(chat_template))
    return DataReport(formats, lengths, max_seq_length, truncated, dropped, list(train[:n]), tokenizer, padding,
                      rendering)


def highlight(tokenizer, record: Record, color: bool = False) -> str:
    """The example's text with trained tokens marked: green on a terminal, [[double brackets]] otherwise."""
    hf = templates.hf_tokenizer(tokenizer)
    out, start = [], 0
    for i in range(1, len(record.ids) + 1):
        if i == len(record.ids) or record.mask[i] != record.mask[start]:
            text = hf.decode(record.ids[start:i])
            if record.mask[start]:
                text = f"\033[1;32m{text}\033[0m" if color else f"[[{text}]]"
            out.append(text)
            start = i
    return "".join(out)


def _from_messages(messages: list[dict], tools: list | None, to: Format, where: str, record: Any,
                   render_text) -> dict:
    if to == Format.CHAT:
        return {"messages": messages, **({"tools": tools} if tools else {})}
    if to == Format.COMPLETIONS:
        roles = [m["role"] for m in messages]
        if roles != ["user", "assistant"] or tools:
            raise _fail(where, "only a single user turn and its answer (no system message, no tools) fit "
                        "{\"prompt\", \"completion\"}: convert --to chat instead", record)
        return {"prompt": messages[0]["content"], "completion": messages[1]["content"]}
    try:
        return {"text": render_text(messages, tools)}
    except DataError as e:
        raise _fail(where, str(e), record) from None


def convert_dataset(src: str | os.PathLike, dst: str | os.PathLike, to: str, *, model=None,
                    chat_template: str | None = None, prompt_key: str | None = None,
                    completion_key: str | None = None, text_key: str | None = None,
                    messages_key: str | None = None, force: bool = False) -> int:
    """Rewrite a data file in another format (chat, completions or text); returns the record count.

    `--to text` renders conversations with the chat template of `model` (or `chat_template`, or ChatML).
    """
    try:
        target = Format(to)
    except ValueError:
        raise ConfigError(f"--to {to}: choose chat, completions or text") from None
    if target not in (Format.CHAT, Format.COMPLETIONS, Format.TEXT):
        raise ConfigError(f"--to {to}: choose chat, completions or text")
    src, dst = Path(src), Path(dst)
    if dst.exists() and (dst.resolve() == src.resolve() or not force):
        raise DataError(f"{dst} already exists: choose another output file or pass --force to replace it"
                        if dst.resolve() != src.resolve() else f"{dst} is the input file: write to another file")
    keys = _keys(prompt_key, completion_key, text_key, messages_key)
    template = templates.read_template_option(chat_template)
    tokenizer = _tokenizer_of(model) if model is not None else None

    def render_text(messages, tools):
        if tokenizer is not None:
            own = templates.template_for(tokenizer, template)
            if own is None:
                raise DataError(templates.NO_TEMPLATE)
            return templates.render(tokenizer, messages, tools=tools, template=own)
        # Sandboxed like every template we render: a data file's template must not reach Python internals.
        try:
            return ImmutableSandboxedEnvironment().from_string(template or templates.CHATML_TEMPLATE).render(
                messages=messages, tools=tools, add_generation_prompt=False)
        except jinja2.TemplateError as e:  # SecurityError (the sandbox said no), syntax and undefined names
            raise DataError(f"the chat template cannot render this record: {type(e).__name__}: {e}") from None

    check = _FormatCheck(src, keys)
    count = 0
    # Streamed: one record in memory at a time; the output appears only once every record converted.
    with atomic_file(dst) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for line, record in iter_records(src):
            fmt = check(line, record)
            where = f"{src}:{line}"
            if fmt == Format.TEXT == target:
                converted = {"text": _string(record[keys.text], f"\"{keys.text}\"", where, record)}
            elif fmt == Format.TEXT:
                raise _fail(where, f"plain text cannot become {target.value}: nothing says which part is the answer",
                            record)
            else:
                messages, tools = to_messages(record, fmt, where, keys)
                converted = _from_messages(messages, tools, target, where, record, render_text)
            out.write(json.dumps(converted, ensure_ascii=False) + "\n")
            count += 1
    return count


def split_dataset(file: str | os.PathLike, *, valid: float = 0.1, test: float = 0.0, seed: int = 0,
                  out: str | os.PathLike | None = None, force: bool = False) -> dict[str, int]:
    """Write train/valid/test.jsonl of one file into `out` (default: a folder named after the file).

    Uses the same seeded split as `load_dataset(file, valid_split=valid, test_split=test, seed=seed)`.
    """
    file = Path(file)
    out = Path(out) if out is not None else file.with_suffix("")
    if out.resolve() == file.resolve():
        raise ConfigError(f"--out {out} is the input file: choose a folder")
    n = sum(1 for _ in iter_records(file))  # a first pass counts (and checks) the records
    idx = split_indices(n, valid, test, seed)
    which = np.zeros(n, np.int8)  # record -> index into `names`
    names = [name for name, rows in idx.items() if len(rows) or name == "train"]
    for k, name in enumerate(names):
        which[idx[name]] = k
    counts = {name: len(idx[name]) for name in names}
    with atomic_dir(out, force=force) as tmp:
        files = [open(tmp / f"{name}.jsonl", "w", encoding="utf-8") for name in names]
        try:
            for k, (_, record) in enumerate(iter_records(file)):
                files[which[k]].write(json.dumps(record, ensure_ascii=False) + "\n")
        finally:
            for f in files:
                f.close()
    return counts
