"""`mlxtune eval` / `mlxtune.evaluate(...)`: exact match by greedy generation, plus test loss and perplexity.

For each chat record of the split, the prompt is every message before the final assistant turn, rendered
with the chat template and its generation prompt; the model's greedy reply counts as a match when it equals
the final assistant message after stripping whitespace. The one thing to know: prompts run in batches
(left-padded, one KV cache per batch), and a reply stops being generated as soon as it can no longer match,
so a model that rambles costs little; mismatched replies are therefore kept only up to where they diverged.
With `--backend torch` the replies come from `mlxtune.torch_generation` (whole replies, then cut the same way).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, generate_step
from tqdm.auto import tqdm

from .backends import is_torch_model, torch_module
from .data import file_records, read_records, record_tools, split_prompt_answer
from .defaults import fill_in
from .display import fields_html, fields_text, num, table_html
from .errors import ConfigError, DataError, FallbackWarning
from .files import atomic_file
from .generation import render_messages, resolve, stop_token_ids, wrap_tokenizer
from .loss import evaluate_loss
from .templates import read_template_option

# Architectures mlx-lm cannot generate for in batches, by mlx-lm model module, with the reason.
UNBATCHABLE = {"gemma2": "mlx-lm's gemma2 attention cannot take a batch's padding mask"}


@dataclass
class Mismatch:
    line: int        # line of the record in the split file
    prompt: str      # the rendered prompt text
    expected: str
    got: str         # the reply, cut where it could no longer match (then it ends with "...")


@dataclass
class Reply:
    """One greedy reply and how it ended."""

    text: str
    stopped: bool  # ended at EOS / an end-of-turn token (False: hit max_tokens, or cut by early stop)


@dataclass
class EvalResult:
    exact_match: float           # fraction of rows whose stripped reply equals the stripped answer
    n: int                       # rows scored
    correct: int
    test_loss: float | None      # mean loss per target token (None when not computed)
    perplexity: float | None
    split: str = "test"
    file: str = ""
    seconds: float = 0.0
    predictions: list[str] = field(default_factory=list, repr=False)
    answers: list[str] = field(default_factory=list, repr=False)
    lines: list[int] = field(default_factory=list, repr=False)  # line of each row in the file
    mismatches: list[Mismatch] = field(default_factory=list, repr=False)

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Write one JSON line per row (line, expected, got, match) to `path`, atomically."""
        path = Path(path)
        if path.exists() and not force:
            raise ConfigError(f"--output {path} already exists: choose another file or pass --force to replace it")
        with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for line, answer, pred in zip(self.lines, self.answers, self.predictions):
                row = {"line": line, "expected": answer, "got": pred, "match": pred.strip() == answer.strip()}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return path

    def _rows(self) -> list[tuple[str, object]]:
        return [("exact match", f"{self.exact_match:.1%} ({self.correct}/{self.n})"), ("test loss", num(self.test_loss)),
                ("perplexity", num(self.perplexity)), ("split", f"{self.split} ({self.file})"),
                ("took", f"{self.seconds:.1f} s")]

    SHOWN = 3  # mismatches a result shows; all of them are in `mismatches`

    def __repr__(self) -> str:
        lines = [fields_text("EvalResult", self._rows())]
        for m in self.mismatches[:self.SHOWN]:
            pad = " " * len(str(m.line))
            lines.append(f"  line {m.line}: expected {m.expected.strip()!r}\n  {pad}       got {m.got.strip()!r}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        out = fields_html("mlxtune.evaluate", self._rows())
        if self.mismatches:
            out += table_html(["line", "expected", "got"], [(m.line, m.expected.strip(), m.got.strip())
                                                             for m in self.mismatches[:self.SHOWN]],
                              title=f"first {min(self.SHOWN, len(self.mismatches))} of {len(self.mismatches)} mismatches",
                              numbers=False)
        return out

    def summary(self) -> str:
        parts = [f"Exact match: {self.exact_match:.1%} ({self.correct}/{self.n})"]
        if self.test_loss is not None:
            parts.append(f"Test loss {self.test_loss:.3f}, Test ppl {self.perplexity:.3f}")
        parts.append(f"took {self.seconds:.1f}s")
        return ", ".join(parts)


def split_file(data: str | os.PathLike, split: str) -> Path:
    """The JSONL file of `split`: `<dir>/<split>.jsonl`, or `data` itself when it is a file."""
    path = Path(data).expanduser()
    if path.is_file():
        return path
    if not path.exists():
        raise DataError(f"--data {path} does not exist (give a folder with {split}.jsonl or a .jsonl file)")
    for name in (f"{split}.jsonl", f"{split}.json"):
        if (path / name).is_file():
            return path / name
    raise DataError(f"{path} has no {split}.jsonl: pass --split (train, valid, test) or a .jsonl file as --data")


def prompts_and_answers(tokenizer, rows: list[tuple[int, dict]], file: Path, *,
                        chat_template: str | None = None) -> tuple[list[list[int]], list[str]]:
    """Prompt ids (chat template + generation prompt, tools included) and expected answers of the rows."""
    prompts, answers = [], []
    for lineno, record in rows:
        try:
            messages, answer = split_prompt_answer(record)
            tools = record_tools(record)
        except DataError as e:
            raise DataError(f"{file}:{lineno}: {e}") from None
        prompts.append(render_messages(tokenizer, messages, tools=tools, chat_template=chat_template))
        answers.append(answer)
    return prompts, answers


def cannot_match(text: str, answer: str) -> bool:
    """True once a partial reply can no longer equal `answer` after stripping whitespace.

    A reply f matches when f.strip() == answer.strip(), so for any prefix g of f, g.strip() is a prefix of
    the answer. Trailing replacement characters are a UTF-8 character still being assembled from byte
    tokens, so they are left out; and the last character must be past the divergence too, since a
    detokenizer may still rewrite it (spaces before punctuation).
    """
    settled = text.rstrip("\ufffd")
    answer = answer.strip()
    return not answer.startswith(settled.strip()) and not answer.startswith(settled[:-1].strip())


def greedy_batch(model, tokenizer, prompts: list[list[int]], *, max_tokens: int = 256, batch_size: int = 32,
                 answers: list[str] | None = None, progress=None) -> list[str]:
    """Greedy replies to many prompts, `batch_size` at a time, stopping at EOS / end of turn.

    With `answers`, a reply stops as soon as `cannot_match` says it cannot equal its answer.
    `progress` (a tqdm bar) is advanced by one per finished prompt.
    """
    return [r.text for r in greedy_replies(model, tokenizer, prompts, max_tokens=max_tokens, batch_size=batch_size,
                                           answers=answers, progress=progress)]


def greedy_replies(model, tokenizer, prompts: list[list[int]], *, max_tokens: int = 256, batch_size: int = 32,
                   answers: list[str] | None = None, progress=None) -> list[Reply]:
    """`greedy_batch`, with whether each reply stopped at an end-of-turn token."""
    if max_tokens <= 0:
        raise ConfigError(f"--max-tokens must be a positive integer, got {max_tokens}")
    if batch_size <= 0:
        raise ConfigError(f"--batch-size must be a positive integer, got {batch_size}")
    tokenizer = wrap_tokenizer(tokenizer)
    stops = stop_token_ids(tokenizer)
    if is_torch_model(model):
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        pad = hf.pad_token_id if hf.pad_token_id is not None else min(stops, default=0)
        replies = torch_module("torch_generation").greedy_batch(model, prompts, max_tokens=max_tokens, batch_size=batch_size,
                                                                stops=stops, pad_id=pad, progress=progress)
        return [_cut_where_it_diverges(tokenizer, tokens, answers[i] if answers else None, max_tokens)
                for i, tokens in enumerate(replies)]
    reason = UNBATCHABLE.get(type(model).__module__.rsplit(".", 1)[-1])
    if batch_size > 1 and reason:
        warnings.warn(f"generating one prompt at a time: {reason}", FallbackWarning, stacklevel=2)
        batch_size = 1
    if batch_size == 1:
        return [_greedy_one(model, tokenizer, p, max_tokens, stops, answers[i] if answers else None, progress)
                for i, p in enumerate(prompts)]
    return _greedy_batched(model, tokenizer, prompts, max_tokens, batch_size, stops, answers, progress)


def _finish(tokenizer, tokens: list[int], cut: bool, stopped: bool) -> Reply:
    text = tokenizer.decode(tokens)
    return Reply(text + "..." if cut else text, stopped and not cut)


def _cut_where_it_diverges(tokenizer, tokens: list[int], answer: str | None, max_tokens: int) -> Reply:
    """A whole reply, cut as `_greedy_one` would have stopped generating it (same text, same "...").
    A reply shorter than `max_tokens` ended at a stop token."""
    if answer is not None:
        for k in range(1, len(tokens) + 1):
            if cannot_match(tokenizer.decode(tokens[:k]), answer):
                return _finish(tokenizer, tokens[:k], True, False)
    return _finish(tokenizer, tokens, False, len(tokens) < max_tokens)


def _greedy_one(model, tokenizer, prompt, max_tokens, stops, answer, progress) -> Reply:
    tokens, cut, stopped = [], False, False
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens):
        if token in stops:
            stopped = True
            break
        tokens.append(token)
        if answer is not None and cannot_match(tokenizer.decode(tokens), answer):
            cut = True
            break
    if progress is not None:
        progress.update(1)
    return _finish(tokenizer, tokens, cut, stopped)


def _greedy_batched(model, tokenizer, prompts, max_tokens, batch_size, stops, answers, progress) -> list[Reply]:
    # Similar lengths side by side: less left padding in each batch.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    gen = BatchGenerator(model, max_tokens=max_tokens, stop_tokens=[[t] for t in sorted(stops)],
                         completion_batch_size=batch_size, prefill_batch_size=batch_size)
    try:
        uids = gen.insert([prompts[i] for i in order])
        row = dict(zip(uids, order))
        tokens: dict[int, list[int]] = {uid: [] for uid in uids}
        cut: set[int] = set()
        stopped: set[int] = set()
        while responses := gen.next_generated():
            for r in responses:
                if r.uid in cut:
                    continue
                if r.finish_reason != "stop":
                    tokens[r.uid].append(r.token)
                else:
                    stopped.add(r.uid)
                done = r.finish_reason is not None
                if not done and answers is not None:
                    if cannot_match(tokenizer.decode(tokens[r.uid]), answers[row[r.uid]]):
                        cut.add(r.uid)
                        gen.remove([r.uid])
                        done = True
                if done and progress is not None:
                    progress.update(1)
    finally:
        gen.close()
    out: list[Reply] = [None] * len(prompts)
    for uid, i in row.items():
        out[i] = _finish(tokenizer, tokens[uid], uid in cut, uid in stopped)
    return out


def split_loss(model, tokenizer, file: Path, *, limit: int | None = None, batch_size: int = 16,
               max_seq_length: int = 2048, chat_template: str | None = None) -> float:
    """Mean loss per answer token over the first `limit` rows of a file (the rows exact match scores), with
    training's own loss."""
    records = file_records(file, tokenizer, limit=limit, max_seq_length=max_seq_length, chat_template=chat_template)
    if not records:
        raise DataError(f"{file}: no records left to compute the loss on (all longer than --max-seq-length?)")
    loss = torch_module("torch_models").evaluate_loss if is_torch_model(model) else evaluate_loss
    return float(loss(model, records, batch_size, max_seq_length))


def evaluate(model=None, tokenizer=None, *, data=None, adapter_file=None, split: str = "test",
             max_tokens: int = 256, limit: int | None = None, batch_size: int = 32, loss: bool = True,
             max_seq_length: int = 2048, chat_template: str | None = None, early_stop: bool = True,
             show: int = 0, progress: bool = True, backend: str = "auto") -> EvalResult:
    """Score a model on a chat dataset split: exact match (greedy), test loss and perplexity.

    `model` is a loaded model (with `tokenizer`) or a path / hub id (then `adapter_file` may name a LoRA
    adapter); None uses the bundled default model. `data` is a folder with `<split>.jsonl` or one .jsonl
    file (None: the bundled tool-call data). `limit` scores only the first N rows.
    `early_stop` cuts a reply once it cannot match (the score is the same; `predictions` are then cut
    too); the first `show` mismatches are generated again in full so that they can be read.
    `backend` (auto, mlx, torch) loads a model path with MLX or with transformers (`mlxtune.backends`).
    """
    filled = fill_in(model, data, verb="eval")
    if filled.note:
        print(filled.note, file=sys.stderr, flush=True)
    model, data = filled.model, filled.data
    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit must be a positive integer, got {limit}")
    model, tokenizer = resolve(str(model) if isinstance(model, Path) else model, tokenizer, adapter_file, backend)
    file = split_file(data, split)
    chat_template = read_template_option(chat_template)
    rows = read_records(file)[:limit]
    start = time.perf_counter()
    prompts, answers = prompts_and_answers(tokenizer, rows, file, chat_template=chat_template)
    with tqdm(total=len(prompts), desc=f"eval {file.name}", unit="row", disable=not progress) as bar:
        predictions = greedy_batch(model, tokenizer, prompts, max_tokens=max_tokens, batch_size=batch_size,
                                   answers=answers if early_stop else None, progress=bar)
    wrong = [i for i, (pred, answer) in enumerate(zip(predictions, answers)) if pred.strip() != answer.strip()]
    if early_stop and show > 0 and wrong:
        full = greedy_batch(model, tokenizer, [prompts[i] for i in wrong[:show]], max_tokens=max_tokens,
                            batch_size=batch_size)
        for i, text in zip(wrong, full):
            predictions[i] = text
    mismatches = [Mismatch(line=rows[i][0], prompt=tokenizer.decode(prompts[i]), expected=answers[i],
                           got=predictions[i]) for i in wrong]
    correct = len(rows) - len(mismatches)
    loss_value = ppl = None
    if loss:
        # Whole sequences through the vocabulary head cost far more memory than decoding: smaller batches.
        loss_value = split_loss(model, tokenizer, file, limit=limit, batch_size=min(batch_size, 8),
                                max_seq_length=max_seq_length, chat_template=chat_template)
        ppl = math.exp(min(loss_value, 700.0))
    return EvalResult(exact_match=correct / len(rows), n=len(rows), correct=correct, test_loss=loss_value,
                      perplexity=ppl, split=split, file=str(file), seconds=time.perf_counter() - start,
                      predictions=predictions, answers=answers, lines=[line for line, _ in rows],
                      mismatches=mismatches)
