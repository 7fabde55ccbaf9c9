"""`mlxtune compare` / `mlxtune.compare(...)`: did the fine-tune survive each stage, from base model to chat app?

The same held-out prompts go through every stage: the base model, base + adapter, the fused model, and each
GGUF file in llama.cpp with the file's own chat template (as LM Studio renders it). Each stage is scored
against the reference answers (exact match; valid-JSON rate and field match for JSON / tool-call answers;
teacher-forced loss) and against the adapter stage (greedy agreement, mean KL), and by the share of replies
that stopped at an end-of-turn token. `check` fails a GGUF stage that lost the fine-tune.

The one thing to know: the adapter stage is the reference, and it runs through exactly the code `mlxtune
eval` runs (same prompts, batched greedy generation, stop tokens, training's loss positions), so its exact
match and loss are eval's. Loss and KL feed every stage the same token ids, those training produced, so they
measure the weights alone; replies in a GGUF stage come from the file's own template and stop tokens, so
exact match, agreement and `stopped` also catch a chat template or stop token that differs from training.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import structured
from .data import batch_of, load_dataset, read_records, record_tools, split_prompt_answer
from .defaults import fill_in
from .display import table_html
from .errors import CheckError, ConfigError, DataError, ExportError
from .evaluation import greedy_replies, prompts_and_answers, split_file
from .files import write_text_atomic
from .generation import resolve
from .gguf import runner
from .gguf.quants import FileType
from .layers import lora_disabled
from .loss import target_logits
from .models import load_model
from .templates import read_template_option

KEEP = 0.95  # a GGUF stage must keep this share of the adapter's exact match and of its stopped replies
MAX_KL = 0.1  # nats per answer token from the adapter stage; see docs/compare.md for the measured values
CHUNK = 16  # records per teacher-forced batch
# From riskiest to safest; "q4_k_m+keep" is q4_k_m written with --keep-adapter.
SAFER = ["q4_0", "q4_k_m", "q4_k_m+keep", "q6_k", "q8_0", "f16", "f32"]


@dataclass
class Row:
    line: int  # line of the record in the data file
    prompt: str  # the conversation before the answer, one "role: content" line per message
    reference: str


@dataclass
class StageResult:
    stage: str  # "base", "adapter", "fused" or "gguf:FILENAME"
    exact_match: float  # share of replies equal to the reference after stripping whitespace
    agreement: float  # share of replies equal to the adapter stage's reply (stripped)
    mean_kl: float | None  # KL(adapter || stage) in nats, averaged over the reference answers' tokens
    stopped: float  # share of replies that ended at an end-of-turn token rather than at max_tokens
    loss: float | None  # mean cross-entropy per reference answer token (training's loss)
    json_valid: float | None = None  # over rows whose reference is JSON / a tool call: share of valid replies
    field_match: float | None = None  # over the same rows: mean share of matching fields
    replies: list[str] = field(default_factory=list, repr=False)
    stops: list[bool] = field(default_factory=list, repr=False)
    path: Path | None = None
    file_type: str | None = None  # GGUF stages: f16, q8_0, q4_k_m, q4_k_m+keep, ...

    def to_json(self) -> dict:
        return {"stage": self.stage, "exact_match": self.exact_match, "agreement": self.agreement,
                "mean_kl": self.mean_kl, "stopped": self.stopped, "loss": self.loss}


@dataclass
class Comparison:
    n: int
    rows: list[Row]
    stages: list[StageResult]
    data: str = ""
    notes: list[str] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # GGUF files not run (no llama.cpp)

    def stage(self, name: str) -> StageResult:
        return next(s for s in self.stages if s.stage == name)

    def to_json(self) -> dict:
        """The `--json` document: {"n": N, "stages": [{"stage", "exact_match", "agreement", "mean_kl", "stopped", "loss"}]}."""
        return {"n": self.n, "stages": [s.to_json() for s in self.stages]}

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        """(header, one row per stage): what both the terminal table and the notebook's HTML table show."""
        structured_rows = any(s.json_valid is not None for s in self.stages)
        head = ["stage", "exact match"] + (["JSON valid", "fields"] if structured_rows else []) + [
            "agreement", "mean KL", "stopped", "loss"]
        lines = []
        for s in self.stages:
            cells = [s.stage, _pct(s.exact_match)]
            if structured_rows:
                cells += [_pct(s.json_valid), _pct(s.field_match)]
            cells += [_pct(s.agreement), _num(s.mean_kl), _pct(s.stopped), _num(s.loss)]
            lines.append(cells)
        return head, lines

    def table(self) -> str:
        """The terminal table, one line per stage."""
        head, lines = self._cells()
        widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]

        def fmt(cells):
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, lines)])

    def __repr__(self) -> str:
        return "\n".join([f"Comparison on {self.n} rows of {self.data}", self.table(), *self.notes])

    def _repr_html_(self) -> str:
        head, lines = self._cells()
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.notes)
        return table_html(head, lines, title=f"mlxtune.compare: {self.n} rows of {self.data}") + (
            f"<ul>{notes}</ul>" if notes else "")

    def failures(self, keep: float = KEEP, max_kl: float = MAX_KL) -> list[str]:
        """One line per GGUF stage that lost the fine-tune, naming the stage and a safer type to try."""
        ref = self.stage("adapter")
        base = next((s for s in self.stages if s.stage == "base"), None)
        out = []
        for s in self.stages:
            if not s.stage.startswith("gguf:"):
                continue
            why = []
            if s.exact_match < keep * ref.exact_match:
                share = s.exact_match / ref.exact_match if ref.exact_match else 0.0
                why.append(f"keeps {share:.0%} of the adapter's exact match ({_pct(s.exact_match)} vs "
                           f"{_pct(ref.exact_match)}; needs {keep:.0%})")
            if s.mean_kl is not None and s.mean_kl > max_kl:
                why.append(f"mean KL {s.mean_kl:.3g} > {max_kl:g}")
            if s.stopped < keep * ref.stopped:
                why.append(f"{_pct(s.stopped)} of replies stop at the end of the turn vs {_pct(ref.stopped)}")
            if why:
                out.append(f"{s.stage} {', '.join(why)}: {_advice(s, ref, base)}")
        return out

    def check(self, keep: float = KEEP, max_kl: float = MAX_KL) -> None:
        """Raise CheckError naming each GGUF stage that lost the fine-tune."""
        if self.skipped:
            raise CheckError(f"check impossible: {len(self.skipped)} GGUF file(s) were not run "
                             f"({runner.llama_cpp_missing() or 'llama.cpp missing'})")
        failed = self.failures(keep, max_kl)
        if failed:
            raise CheckError("check failed: " + "; ".join(failed))

    def write_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        write_text_atomic(path, json.dumps(self.to_json(), indent=2) + "\n")
        return path


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}" if x < 100 else f"{x:.3g}"


def _advice(s: StageResult, ref: StageResult, base: StageResult | None) -> str:
    kind = s.file_type
    if kind in ("f32", "f16", "bf16"):
        safer = "the weights are (nearly) exact at this type"
    else:
        nxt = SAFER[SAFER.index(kind) + 1] if kind in SAFER else "q8_0"
        safer = ("write it as --type q4_k_m --keep-adapter ADAPTER (fine-tune-aware q4_k_m)" if nxt == "q4_k_m+keep"
                 else f"write it as --type {nxt}")
    if base is not None and s.replies:
        with_base = _share_equal(s.replies, base.replies, unprintable=True)
        if with_base > s.agreement:
            like = (f"it answers like the base model ({with_base:.0%} of replies equal the base's, {s.agreement:.0%} "
                    "the adapter's)")
            if kind in ("f32", "f16", "bf16"):
                return f"{like}: the fine-tune is not in this file; write the GGUF from the fused model (mlxtune fuse --gguf)"
            return f"{like}: {kind} rounded the fine-tune away (or the GGUF is not of the fused model); {safer}"
    if kind in ("f32", "f16", "bf16"):
        return f"{safer}: check the chat template and stop tokens the file carries"
    return safer


def _share_equal(a: list[str], b: list[str], unprintable: bool = False) -> float:
    """Share of equal pairs after stripping whitespace; with `unprintable`, also dropping U+FFFD.

    Bytes that are not valid UTF-8 decode as U+FFFD in MLX and are dropped by llama.cpp: between two
    stages that difference is the runtime's, not the model's. Exact match against the reference keeps them,
    like `mlxtune eval`.
    """
    def norm(text: str) -> str:
        return (text.replace("\ufffd", "") if unprintable else text).strip()

    return sum(norm(x) == norm(y) for x, y in zip(a, b)) / max(1, len(a))


# ----------------------------------------------------------------------------------------- scoring


def _reply_scores(stage: str, replies: list[str], stops: list[bool], answers: list[str],
                  reference: list[str] | None) -> StageResult:
    exact = _share_equal(replies, answers)
    agreement = 1.0 if reference is None else _share_equal(replies, reference, unprintable=True)
    refs = [(structured.parse(a), r) for a, r in zip(answers, replies)]
    refs = [(f, r) for f, r in refs if f is not None]
    json_valid = field_match = None
    if refs:
        parsed = [(f, structured.parse(r)) for f, r in refs]
        json_valid = sum(p is not None for _, p in parsed) / len(parsed)
        field_match = sum(structured.field_match(f, p) for f, p in parsed) / len(parsed)
    return StageResult(stage, exact, agreement, None, sum(stops) / max(1, len(stops)), None, json_valid, field_match,
                       list(replies), list(stops))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def _teacher_forced(records, reference: Callable, stage: Callable | None, name: str = "",
                    progress: bool = False) -> tuple[float, float | None]:
    """(mean loss, mean KL(reference || stage)) over the target tokens of `records`, CHUNK records at a time.

    `reference` / `stage` map a list of records to (logits (N, V), targets (N,)) at the target positions;
    stage None scores the reference itself (KL 0).
    """
    nll = kl = 0.0
    count = 0
    starts = range(0, len(records), CHUNK)
    for i in tqdm(starts, desc=f"loss/KL {name}", unit="chunk", disable=not progress, leave=False):
        chunk = records[i:i + CHUNK]
        ref_logits, targets = reference(chunk)
        ref = _log_softmax(ref_logits)
        if stage is None:
            got = ref
        else:
            logits, _ = stage(chunk)
            if logits.shape != ref.shape:
                raise ExportError(f"the stage's vocabulary ({logits.shape[-1]}) differs from the adapter's "
                                  f"({ref.shape[-1]}): it is not the same model")
            got = _log_softmax(logits)
            kl += float((np.exp(ref) * (ref - got)).sum())
        nll -= float(got[np.arange(len(targets)), targets].sum())
        count += len(targets)
    if count == 0:
        raise DataError("the records carry no answer tokens to score the loss on")
    # KL is never negative; a stage equal to the reference can land a rounding error below zero
    return nll / count, (max(0.0, kl / count) if stage is not None else 0.0)


def _mlx_logits(model, base: bool = False):
    def run(chunk):
        with lora_disabled(model) if base else contextlib.nullcontext():
            logits, targets = target_logits(model, batch_of(chunk))
            return np.array(logits), targets  # evaluated here, inside the context

    return run


def _gguf_logits(loaded):
    def run(chunk):
        parts = [runner.target_logits(loaded, r.ids, r.mask) for r in chunk]
        targets = np.array([r.ids[t] for r in chunk for t in range(1, len(r.ids)) if r.mask[t]])
        return np.concatenate(parts), targets

    return run


def _prompt_text(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m.get('content') or ''}" for m in messages)


# ----------------------------------------------------------------------------------------- compare


def compare(model=None, adapter_file=None, *, fused=None, gguf: Iterable = (), data=None, split: str = "test",
            n: int | None = None, base: bool = True, max_tokens: int = 256, batch_size: int = 32,
            max_seq_length: int = 2048, chat_template: str | None = None, json_file=None, html_file=None,
            check: bool = False, keep: float = KEEP, max_kl: float = MAX_KL, force: bool = False,
            progress: bool = True, log=print) -> Comparison:
    """Run the held-out prompts of `data` through each stage and score them; returns a Comparison.

    model: base model directory or hub id (None: the bundled tiny model). adapter_file: the LoRA adapter
    (required; its stage is the reference). fused: a fused model directory. gguf: GGUF files, run in
    llama.cpp when the `llamacpp` extra is installed (otherwise skipped with a note). data: folder with
    <split>.jsonl or a .jsonl file (None: the bundled tool-call data). n: only the first N rows. base:
    include the base model's stage. json_file / html_file: also write those reports (an existing file
    needs `force`). check: raise CheckError after writing them when a GGUF stage keeps less than `keep`
    of the adapter's exact match or stopped replies, or its mean KL is above `max_kl`.
    """
    if adapter_file is None:
        raise ConfigError("--adapter-file is required: compare measures what survives of an adapter")
    if n is not None and n <= 0:
        raise ConfigError(f"-n must be a positive integer, got {n}")
    ggufs = [Path(g).expanduser() for g in ([gguf] if isinstance(gguf, (str, os.PathLike)) else gguf)]
    for g in ggufs:
        if not g.is_file():
            raise ExportError(f"--gguf {g}: no such file")
    for flag, out in (("--json", json_file), ("--html", html_file)):
        if out is not None and Path(out).exists() and not force:
            raise ConfigError(f"{flag} {out} already exists: choose another file or pass --force to replace it")
    filled = fill_in(model, data, verb="eval")
    if filled.note:
        log(filled.note)
    file = split_file(filled.data, split)
    template = read_template_option(chat_template)
    rows = read_records(file)[:n]
    if not rows:
        raise DataError(f"{file} has no records to compare on")
    net, tokenizer = resolve(str(filled.model), None, adapter_file)
    prompts, answers = prompts_and_answers(tokenizer, rows, file, chat_template=template)
    records = load_dataset(str(file), tokenizer, valid_split=0.0, test_split=0.0, max_seq_length=max_seq_length,
                           chat_template=template, cache=False).train[:len(rows)]
    notes = []
    if len(records) < len(rows):
        notes.append(f"{len(rows) - len(records)} rows have no answer tokens within --max-seq-length "
                     f"{max_seq_length}: loss and KL are over the other {len(records)}")
    adapter_logits = _mlx_logits(net)

    def generate(stage_model, tok, stage_prompts, name):
        with tqdm(total=len(stage_prompts), desc=f"compare {name}", unit="row", disable=not progress) as bar:
            return greedy_replies(stage_model, tok, stage_prompts, max_tokens=max_tokens, batch_size=batch_size,
                                  progress=bar)

    replies = generate(net, tokenizer, prompts, "adapter")
    adapter = _reply_scores("adapter", [r.text for r in replies], [r.stopped for r in replies], answers, None)
    adapter.loss, adapter.mean_kl = _teacher_forced(records, adapter_logits, None, "adapter", progress)
    stages = [adapter]
    if base:
        with lora_disabled(net):
            replies = generate(net, tokenizer, prompts, "base")
        stage = _scores_with(replies, answers, adapter, "base")
        stage.loss, stage.mean_kl = _teacher_forced(records, adapter_logits, _mlx_logits(net, base=True), "base", progress)
        stages.insert(0, stage)
    if fused is not None:
        loaded = load_model(fused)
        fused_prompts, _ = prompts_and_answers(loaded.tokenizer, rows, file, chat_template=template)
        replies = generate(loaded.model, loaded.tokenizer, fused_prompts, "fused")
        stage = _scores_with(replies, answers, adapter, "fused")
        stage.path = Path(fused)
        stage.loss, stage.mean_kl = _teacher_forced(records, adapter_logits, _mlx_logits(loaded.model), "fused",
                                                    progress)
        stages.append(stage)
        del loaded
    missing = runner.llama_cpp_missing() if ggufs else None
    if missing:
        notes.append(f"{len(ggufs)} GGUF stage(s) skipped: {missing}")
    else:
        conversations = []
        for _, record in rows:
            messages, _ = split_prompt_answer(record)
            conversations.append((messages, record_tools(record)))
        longest = max([len(r.ids) for r in records] + [len(p) for p in prompts])
        for g in ggufs:
            stages.append(_gguf_stage(g, conversations, prompts, answers, adapter, records, adapter_logits,
                                      n_ctx=longest + max_tokens + 16, max_tokens=max_tokens, progress=progress,
                                      notes=notes, fallback_template=template))
    result = Comparison(n=len(rows), stages=stages, data=str(file), notes=notes, skipped=ggufs if missing else [], rows=[
        Row(line, _prompt_text(split_prompt_answer(rec)[0]), answer) for (line, rec), answer in zip(rows, answers)])
    if json_file is not None:
        result.write_json(json_file)
    if html_file is not None:
        from .html_report import write_html

        write_html(result, html_file)
    if check:
        result.check(keep, max_kl)
    return result


def _scores_with(replies, answers, adapter: StageResult, name: str) -> StageResult:
    return _reply_scores(name, [r.text for r in replies], [r.stopped for r in replies], answers, adapter.replies)


def _gguf_stage(path: Path, conversations, prompts, answers, adapter, records, adapter_logits, *, n_ctx, max_tokens,
                progress, notes, fallback_template: str | None = None) -> StageResult:
    loaded = runner.open_gguf(path, n_ctx, fallback_template)
    name = f"gguf:{path.name}"
    if not loaded.own_template:
        notes.append(f"{name} has no chat template: prompts rendered with --chat-template, which a chat app would "
                     "not know")
    replies = runner.chat_replies(loaded, conversations, max_tokens=max_tokens, progress=progress)
    differ = sum(r.prompt_ids != p for r, p in zip(replies, prompts))
    if differ:
        notes.append(f"{name}: the file's chat template and tokenizer give other prompt tokens than training on "
                     f"{differ} of {len(prompts)} rows")
    stage = _reply_scores(name, [r.text for r in replies], [r.stopped for r in replies], answers, adapter.replies)
    stage.path, stage.file_type = path, _file_type(loaded.llm.metadata)
    stage.loss, stage.mean_kl = _teacher_forced(records, adapter_logits, _gguf_logits(loaded), name, progress)
    loaded.llm.close()
    return stage


def _file_type(metadata: dict) -> str | None:
    try:
        kind = FileType.from_llama(int(metadata.get("general.file_type", -1)))
    except ValueError:
        return None
    keep = kind is FileType.Q4_K_M and "quantize.imatrix.dataset" in metadata
    return f"{kind.value}+keep" if keep else kind.value
