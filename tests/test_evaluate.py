"""eval on a tiny random llama: exact match is 1.0 on a dataset whose answers are the model's own greedy
replies and 0 on wrong answers, batching does not change replies, and the test loss equals a direct
cross-entropy over the assistant tokens."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import mlxtune
from mlxtune.errors import ConfigError, DataError, FallbackWarning
from mlxtune.evaluation import cannot_match, greedy_batch
from mlxtune.generation import render_prompt
from mlxtune.models import load

QUESTIONS = [f"Set a timer for {n} minutes called {name}" for n, name in
             zip(range(3, 15), ["tea", "eggs", "pasta", "rice", "bread", "nap", "run", "call", "soup", "pizza",
                                "cake", "beans"])]
SYSTEM = "You call tools."
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    return load(tiny_llama)


@pytest.fixture(scope="module")
def own_answers(loaded):
    """What the model itself says greedily to each question (the dataset it must score 1.0 on)."""
    model, tok = loaded
    return [mlxtune.generate(model, tok, q, system=SYSTEM, max_tokens=MAX_TOKENS) for q in QUESTIONS]


def write_split(folder, answers, split="test"):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{split}.jsonl", "w") as f:
        for q, a in zip(QUESTIONS, answers):
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
                        {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return folder


def test_exact_match_is_one_on_own_answers_and_zero_on_wrong(loaded, own_answers, tmp_path):
    model, tok = loaded
    assert all(a.strip() for a in own_answers), "the tiny model must say something for this test to mean anything"
    good = evaluate_no_loss(model, tok, write_split(tmp_path / "good", own_answers))
    assert good.exact_match == 1.0 and good.correct == good.n == len(QUESTIONS) and not good.mismatches
    assert good.predictions == own_answers
    saved = good.save(tmp_path / "replies.jsonl")
    assert [json.loads(line)["got"] for line in open(saved)] == own_answers
    with pytest.raises(ConfigError, match="already exists"):
        good.save(saved)  # never overwrite what the user has without --force
    good.save(saved, force=True)
    wrong = [f"<tool_call name=\"timer\" minutes=\"{i}\"/>" for i in range(len(QUESTIONS))]
    bad = evaluate_no_loss(model, tok, write_split(tmp_path / "bad", wrong), show=2)
    assert bad.exact_match == 0.0 and len(bad.mismatches) == len(QUESTIONS)
    m = bad.mismatches[0]
    assert m.line == 1 and m.expected == wrong[0] and QUESTIONS[0] in m.prompt
    # The first `show` mismatches are the full replies; the rest stopped where they went wrong.
    assert [m.got for m in bad.mismatches[:2]] == own_answers[:2]
    assert all(m.got.endswith("...") and len(m.got) < len(a) + 3 for m, a in zip(bad.mismatches[2:], own_answers[2:]))
    full = evaluate_no_loss(model, tok, tmp_path / "bad", early_stop=False)
    assert full.exact_match == 0.0 and full.predictions == own_answers
    # Half right, half wrong: the score is a fraction, and --limit counts only the first rows.
    mixed = own_answers[:6] + wrong[6:]
    assert evaluate_no_loss(model, tok, write_split(tmp_path / "mixed", mixed)).exact_match == 0.5
    assert evaluate_no_loss(model, tok, tmp_path / "mixed", limit=4).exact_match == 1.0


def evaluate_no_loss(model, tok, data, **kw):
    return mlxtune.evaluate(model, tok, data=data, max_tokens=MAX_TOKENS, loss=False, progress=False, **kw)


def test_batched_replies_equal_one_at_a_time(loaded, monkeypatch):
    import mlxtune.evaluation as evaluation

    model, tok = loaded
    prompts = [render_prompt(tok, q + " please" * (i % 4)) for i, q in enumerate(QUESTIONS)]
    one = greedy_batch(model, tok, prompts, max_tokens=MAX_TOKENS, batch_size=1)

    def not_one_by_one(*args, **kwargs):
        raise AssertionError("batch_size > 1 generated one prompt at a time")

    monkeypatch.setattr(evaluation, "_greedy_one", not_one_by_one)  # the batched path is the one taken
    many = greedy_batch(model, tok, prompts, max_tokens=MAX_TOKENS, batch_size=5)
    assert one == many
    assert one == [mlxtune.generate(model, tok, q + " please" * (i % 4), max_tokens=MAX_TOKENS)
                   for i, q in enumerate(QUESTIONS)]


def test_architectures_that_do_not_batch_fall_back(tmp_path):
    from hf_models import make_hf_model

    model, tok = load(make_hf_model(tmp_path / "gemma2", "gemma2"))  # mlx-lm 0.32 cannot batch gemma2
    prompts = [render_prompt(tok, q) for q in QUESTIONS[:6]]
    one = greedy_batch(model, tok, prompts, max_tokens=MAX_TOKENS, batch_size=1)
    with pytest.warns(FallbackWarning, match="one prompt at a time: mlx-lm's gemma2 attention"):
        assert greedy_batch(model, tok, prompts, max_tokens=MAX_TOKENS, batch_size=3) == one


def test_replies_stop_once_they_cannot_match(loaded, own_answers):
    model, tok = loaded
    prompts = [render_prompt(tok, q, system=SYSTEM) for q in QUESTIONS]
    answers = ["\u2603never"] * len(own_answers)
    for bs in (1, 4):
        cut = greedy_batch(model, tok, prompts, max_tokens=MAX_TOKENS, batch_size=bs, answers=answers)
        for got, full in zip(cut, own_answers):
            # Cut short (marked "...") a few characters in, as a prefix of what the model would have said.
            assert got.endswith("...") and full.startswith(got[:-3]) and len(got) - 3 < len(full), (got, full)
    assert cannot_match(" ab", "abc") is False and cannot_match("abdx", "abc") is True
    assert cannot_match("abd", "abc") is False  # the last character may still change
    assert cannot_match("abc \n", "abc") is False and cannot_match("ab\ufffd\ufffd", "abc") is False


def direct_loss(model, tok, data_file):
    """Mean cross-entropy over assistant tokens, computed here from the chat template and the raw model."""
    from mlxtune.templates import chat_to_ids

    total, count = 0.0, 0
    for line in open(data_file):
        ids, mask = chat_to_ids(tok, json.loads(line)["messages"])
        logits = model(mx.array([ids[:-1]]))[0].astype(mx.float32)
        logp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        for t in range(1, len(ids)):
            if mask[t]:
                total -= float(logp[t - 1, ids[t]])
                count += 1
    return total / count


def test_loss_and_perplexity_equal_direct_computation(loaded, own_answers, tmp_path):
    model, tok = loaded
    folder = write_split(tmp_path / "d", own_answers)
    result = mlxtune.evaluate(model, tok, data=folder, max_tokens=MAX_TOKENS, progress=False, batch_size=4)
    expected = direct_loss(model, tok, folder / "test.jsonl")
    assert result.test_loss == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-3)


def test_limit_scores_loss_and_generation_on_the_same_rows(loaded, own_answers, tmp_path):
    """--limit k is the first k rows for both numbers, even when truncation leaves out a row before k."""
    model, tok = loaded
    folder = write_split(tmp_path / "all", own_answers)
    rows = (folder / "test.jsonl").read_text().splitlines()
    first = tmp_path / "first"
    first.mkdir()
    (first / "test.jsonl").write_text("\n".join(rows[:3]) + "\n")
    limited = mlxtune.evaluate(model, tok, data=folder, limit=3, max_tokens=MAX_TOKENS, progress=False)
    alone = mlxtune.evaluate(model, tok, data=first, max_tokens=MAX_TOKENS, progress=False)
    assert limited.n == 3 and limited.predictions == alone.predictions
    assert limited.test_loss == pytest.approx(alone.test_loss, rel=1e-6)


def test_bad_data_is_a_clear_error(loaded, tmp_path):
    model, tok = loaded
    with pytest.raises(DataError, match="has no valid.jsonl"):
        evaluate_no_loss(model, tok, write_split(tmp_path / "d", ["x"] * len(QUESTIONS)), split="valid")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "test.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n'
                                               '{"text": "plain"}\n')
    with pytest.raises(DataError, match=r"test.jsonl:1"):
        evaluate_no_loss(model, tok, tmp_path / "e")


def test_cli_eval_prints_score_and_mismatches(tiny_llama, own_answers, tmp_path):
    folder = write_split(tmp_path / "cli", own_answers[:3] + ["wrong answer"] * (len(QUESTIONS) - 3))
    r = subprocess.run([sys.executable, "-m", "mlxtune", "eval", "--model", str(tiny_llama), "--data", str(folder),
                        "--max-tokens", str(MAX_TOKENS), "--no-loss", "--show", "2", "--batch-size", "4",
                        "--output", str(tmp_path / "replies.jsonl")],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert f"Exact match: 25.0% (3/{len(QUESTIONS)})" in r.stdout
    assert r.stdout.count("expected: wrong answer") == 2 and f"{folder / 'test.jsonl'}:4" in r.stdout
    rows = [json.loads(line) for line in open(tmp_path / "replies.jsonl")]
    assert [r["match"] for r in rows] == [True] * 3 + [False] * (len(QUESTIONS) - 3)
    assert [r["got"] for r in rows[:3]] == own_answers[:3] and rows[3] == {**rows[3], "line": 4,
                                                                            "expected": "wrong answer"}


def test_adapter_file_is_applied(tiny_llama, own_answers, tmp_path):
    from mlxtune.adapters import save_adapter
    from mlxtune.layers import apply_lora

    model, tok = load(tiny_llama)
    apply_lora(model, lora_layers=2, rank=4, alpha=32.0)
    mx.random.seed(2)
    for _, layer in model.named_modules():
        if hasattr(layer, "lora_b"):
            layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.5
    adapter = save_adapter(model, tmp_path / "a" / "adapters.npz")
    tuned = [mlxtune.generate(model, tok, q, system=SYSTEM, max_tokens=MAX_TOKENS) for q in QUESTIONS]
    assert tuned != own_answers
    folder = write_split(tmp_path / "d", tuned)
    result = mlxtune.evaluate(str(tiny_llama), data=folder, adapter_file=str(adapter.parent), max_tokens=MAX_TOKENS,
                              loss=False, progress=False)
    assert result.exact_match == 1.0
    base = mlxtune.evaluate(str(tiny_llama), data=folder, max_tokens=MAX_TOKENS, loss=False, progress=False)
    assert base.exact_match < 1.0


def test_replies_say_whether_they_stopped_at_the_end_of_the_turn():
    from mlxtune.defaults import DEFAULT_MODEL
    from mlxtune.evaluation import greedy_replies

    model, tok = load(DEFAULT_MODEL)  # trained: it ends its turns with <|im_end|>
    prompts = [render_prompt(tok, q) for q in QUESTIONS[:4]]
    for batch_size in (1, 4):
        cut = greedy_replies(model, tok, prompts, max_tokens=2, batch_size=batch_size)
        full = greedy_replies(model, tok, prompts, max_tokens=64, batch_size=batch_size)
        assert not any(r.stopped for r in cut) and all(r.stopped for r in full)
        assert [r.text for r in full] == greedy_batch(model, tok, prompts, max_tokens=64, batch_size=batch_size)
        assert all(f.text.startswith(c.text) for c, f in zip(cut, full))
