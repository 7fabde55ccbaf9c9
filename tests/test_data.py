"""Datasets: every format to records with token-exact masks, errors with file:line, truncation, caching,
splitting, and batches (bucketed, packed, deterministic, resumable), plus the `mlxtune data` verbs."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlxtune import data, templates
from mlxtune.data import Record, iterate_batches, load_dataset, padding_fraction, split_prompt_answer
from mlxtune.errors import DataError

from data_tokenizers import (
    FINAL_THINK_TEMPLATE,
    NON_PREFIX_TEMPLATE,
    PLAIN_TEMPLATE,
    STYLES,
    TOOLS_TEMPLATE,
    load_style_tokenizer,
)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXTUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    return {style: load_style_tokenizer(tmp_path_factory.mktemp(style), style) for style in STYLES}


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def enc(tok, text):
    return tok._tokenizer.encode(text, add_special_tokens=False)


def eot(tok, style):
    return tok._tokenizer.convert_tokens_to_ids(STYLES[style][3])


def runs(record):
    """The maximal runs of trained token ids, in order."""
    out, cur = [], []
    for i, m in zip(record.ids, record.mask):
        if m:
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def load_train(path, tok, **kw):
    return load_dataset(path, tok, valid_split=0.0, cache=False, **kw).train


def chat(*turns, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    for i, t in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return {"messages": msgs}


ANSWERS = ["I am fine, thank you!", "The quick brown fox"]
CONVERSATION = ["Hello, how are you today?", ANSWERS[0], "Numbers: 1 2 3", ANSWERS[1]]


# ------------------------------------------------------------------------------------------ masks


@pytest.mark.parametrize("style", list(STYLES))
def test_multi_turn_masks_train_every_assistant_turn_token_by_token(toks, style, tmp_path):
    tok = toks[style]
    system = "Be brief." if style in ("chatml", "llama3") else None
    record = chat(*CONVERSATION, system=system)
    [rec] = load_train(write_jsonl(tmp_path / "c.jsonl", [record]), tok)
    rendered = tok._tokenizer.apply_chat_template(record["messages"], tokenize=False)
    assert rec.ids == enc(tok, rendered)
    assert rec.mask[0] is False and len(rec.mask) == len(rec.ids)
    # Exactly each answer plus its end-of-turn token, nothing before or after (ChatML/Gemma newlines untrained).
    assert runs(rec) == [enc(tok, a) + [eot(tok, style)] for a in ANSWERS]
    trained_positions = [i for i, m in enumerate(rec.mask) if m]
    end_of_first = trained_positions[len(enc(tok, ANSWERS[0]))]
    assert rec.ids[end_of_first] == eot(tok, style)


def test_answer_token_spanning_the_prompt_boundary_is_placed_by_offsets(toks, tmp_path):
    tok = toks["chatml"]
    answers = ["name the fox", "you name it"]
    record = chat("Say hi", answers[0], "Again", answers[1])
    assert enc(tok, " name") == [tok._tokenizer.convert_tokens_to_ids("\u0120name")]  # one token spans the space
    [rec] = load_train(write_jsonl(tmp_path / "c.jsonl", [record]), tok, chat_template=PLAIN_TEMPLATE)
    assert rec.ids == enc(tok, "User: Say hi\nAssistant: name the fox<|im_end|>\nUser: Again\n"
                               "Assistant: you name it<|im_end|>\n")
    assert runs(rec) == [enc(tok, " " + a) + [eot(tok, "chatml")] for a in answers]


def test_train_on_inputs_trains_everything_but_the_first_token(toks, tmp_path):
    [rec] = load_train(write_jsonl(tmp_path / "c.jsonl", [chat(*CONVERSATION)]), toks["chatml"], train_on_inputs=True)
    assert rec.mask == [False] + [True] * (len(rec.ids) - 1)


def test_every_format_becomes_the_same_record_as_its_chat(toks, tmp_path):
    tok = toks["llama3"]
    end = eot(tok, "llama3")
    cases = [
        ({"prompt": "Say hi", "completion": "Hello"}, chat("Say hi", "Hello"), {}),
        ({"q": "Say hi", "a": "Hello"}, chat("Say hi", "Hello"), dict(prompt_key="q", completion_key="a")),
        ({"instruction": "Add", "input": "2 3", "output": "5"}, chat("Add\n\n2 3", "5"), {}),
        ({"instruction": "Say hi", "output": "Hello"}, chat("Say hi", "Hello"), {}),
        ({"question": "Say hi", "answer": "Hello"}, chat("Say hi", "Hello"), {}),
        ({"instruction": "Say hi", "response": "Hello"}, chat("Say hi", "Hello"), {}),
        ({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Say hi"},
                            {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Again"},
                            {"from": "gpt", "value": "Hello again"}]},
         chat("Say hi", "Hello", "Again", "Hello again", system="Be brief."), {}),
    ]
    for i, (record, as_chat, keys) in enumerate(cases):
        [got] = load_train(write_jsonl(tmp_path / f"f{i}.jsonl", [record]), tok, **keys)
        [want] = load_train(write_jsonl(tmp_path / f"c{i}.jsonl", [as_chat]), tok)
        assert (got.ids, got.mask) == (want.ids, want.mask), record
        answers = [m["content"] for m in as_chat["messages"] if m["role"] == "assistant"]
        assert runs(got) == [enc(tok, a) + [end] for a in answers]


def test_a_plain_hugging_face_tokenizer_works_too(toks, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [chat(*CONVERSATION)])
    [wrapped] = load_train(path, toks["gemma"])
    [plain] = load_train(path, toks["gemma"]._tokenizer)
    assert (plain.ids, plain.mask) == (wrapped.ids, wrapped.mask)


def test_text_trains_everything_and_ends_with_eos(toks, tmp_path):
    tok = toks["chatml"]
    splits = load_dataset(write_jsonl(tmp_path / "t.jsonl", [{"text": "The quick brown fox"}]), tok,
                          valid_split=0, cache=False)
    [rec] = splits.train
    assert splits.formats == {str(tmp_path / "t.jsonl"): "text"}
    assert rec.ids == enc(tok, "The quick brown fox") + [tok._tokenizer.eos_token_id]
    assert rec.mask == [False] + [True] * (len(rec.ids) - 1)


def test_tools_reach_the_template_and_stay_untrained(toks, tmp_path):
    tok = toks["chatml"]
    (tmp_path / "tools.jinja").write_text(TOOLS_TEMPLATE)
    tools = [{"type": "function", "function": {"name": "set_timer", "parameters": {"type": "object"}}}]
    record = dict(chat("Set a timer", '<tool_call name="timer"/>'), tools=tools)
    [rec] = load_train(write_jsonl(tmp_path / "c.jsonl", [record]), tok, chat_template=str(tmp_path / "tools.jinja"))
    text = tok._tokenizer.decode(rec.ids)
    assert text.startswith("<|im_start|>system\n# Tools\n") and "set_timer" in text
    assert runs(rec) == [enc(tok, '<tool_call name="timer"/>') + [eot(tok, "chatml")]]
    assert data.record_tools(record) == tools


def test_without_a_template_completions_train_prompt_completion_eos(tmp_path):
    bare = load_style_tokenizer(tmp_path / "bare", "chatml", template="")
    rows = [{"prompt": "table: cities\nQ: largest?\nA:", "completion": " SELECT name FROM cities"},
            {"instruction": "Name a colour.", "output": " Blue."}]
    [completion, alpaca] = load_train(write_jsonl(tmp_path / "p.jsonl", rows[:1]), bare) + load_train(
        write_jsonl(tmp_path / "a.jsonl", rows[1:]), bare)
    hf = bare._tokenizer
    for rec, (prompt, answer) in ((completion, (rows[0]["prompt"], rows[0]["completion"])),
                                  (alpaca, (rows[1]["instruction"], rows[1]["output"]))):
        assert rec.ids == hf.encode(prompt + answer, add_special_tokens=True) + [hf.eos_token_id]
        [trained] = runs(rec)
        assert hf.decode(trained[:-1]) == answer and trained[-1] == hf.eos_token_id  # the answer and EOS only
        assert "<|im_start|>" not in hf.decode(rec.ids)  # no template was invented
    # the same text is what generation starts from
    assert templates.prompt_ids(bare, [{"role": "user", "content": rows[0]["prompt"]}]) == hf.encode(
        rows[0]["prompt"], add_special_tokens=True)


def test_without_a_template_eval_and_generate_prompt_exactly_as_training_did(tmp_path):
    from mlxtune.evaluation import prompts_and_answers
    from mlxtune.generation import render_prompt, stop_token_ids

    bare = load_style_tokenizer(tmp_path / "bare", "chatml", template="")
    rows = [{"prompt": f"Q: item {i}?\nA:", "completion": f" answer {i}"} for i in range(4)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    records = load_train(path, bare)
    prompts, answers = prompts_and_answers(bare, data.read_records(path), path)
    for rec, prompt, answer, row in zip(records, prompts, answers, rows):
        start = rec.mask.index(True)
        assert prompt == rec.ids[:start]  # generation starts where training's answer started
        assert answer == row["completion"] and rec.ids[-1] in stop_token_ids(bare)  # and stops where it ended
        assert render_prompt(bare, row["prompt"]) == prompt  # mlxtune generate --prompt does the same
    with pytest.raises(DataError, match="no chat template"):
        render_prompt(bare, "hi", system="Be brief.")


def test_without_a_template_chat_data_is_refused_and_chatml_is_a_choice(toks, tmp_path):
    bare = load_style_tokenizer(tmp_path / "bare", "chatml", template="")
    path = write_jsonl(tmp_path / "c.jsonl", [chat(*CONVERSATION)])
    with pytest.raises(DataError, match=r"c\.jsonl:1: this model's tokenizer has no chat template.*--chat-template"):
        load_train(path, bare)
    with pytest.raises(DataError, match="no chat template"):  # a system prompt needs a template too
        load_train(write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "completion": "b", "system": "Be brief."}]), bare)
    [got], [want] = load_train(path, bare, chat_template="chatml"), load_train(path, toks["chatml"])
    assert (got.ids, got.mask) == (want.ids, want.mask)
    assert "no chat template" in templates.describe_rendering(bare)
    assert templates.describe_rendering(bare, "chatml") == "the --chat-template given"
    assert templates.describe_rendering(toks["chatml"]) == "the tokenizer's own chat template"


def test_turn_rendered_differently_when_not_last_is_found_by_its_text(toks, tmp_path):
    tok = toks["chatml"]
    [rec] = load_train(write_jsonl(tmp_path / "c.jsonl", [chat(*CONVERSATION)]), tok, chat_template=FINAL_THINK_TEMPLATE)
    assert tok._tokenizer.decode(rec.ids).count("<think>") == 1
    assert runs(rec) == [enc(tok, ANSWERS[0]) + [eot(tok, "chatml")],
                         enc(tok, "<think>\n\n</think>\n\n" + ANSWERS[1]) + [eot(tok, "chatml")]]


def test_template_that_rewrites_earlier_turns_is_refused_with_file_and_line(toks, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [chat("Say hi", "Hello"), chat(*CONVERSATION)])
    with pytest.raises(templates.TemplateMaskError, match=r"c\.jsonl:2: .*renders turn 2 differently"):
        load_train(path, toks["chatml"], chat_template=NON_PREFIX_TEMPLATE)
    # A single turn is a prefix either way, so it still works (and only the answer is trained).
    [rec] = load_train(write_jsonl(tmp_path / "one.jsonl", [chat("Say hi", "Hello")]), toks["chatml"],
                       chat_template=NON_PREFIX_TEMPLATE)
    assert runs(rec) == [enc(toks["chatml"], "Hello") + [eot(toks["chatml"], "chatml")]]


# ----------------------------------------------------------------------------------------- errors

LONG = "x" * 300
ERRORS = [
    ([{"text": "a"}, chat("q", "a")], r"x\.jsonl:2: record is in chat format but line 1 is text"),
    ([{"text": "a"}, {"foo": 1}], r"x\.jsonl:2: record matches no known format .*\{\"foo\": 1\}"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}],
     r"x\.jsonl:1: message 2 has unknown role 'bot'"),
    ([{"messages": [{"role": "user", "content": "q"}]}], r"x\.jsonl:1: chat has no assistant turn"),
    ([{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}],
     r"x\.jsonl:1: message 1 content must be a string"),
    ([{"conversations": [{"from": "robot", "value": "q"}]}], r"x\.jsonl:1: conversation turn 1 has unknown \"from\""),
    ([{"text": "a"}, "", '{"text": "b"'], r"x\.jsonl:3: not valid JSON"),
    ([], r"x\.jsonl: the file is empty"),
    ([chat("q", "a", system="s")], r"x\.jsonl:1: the chat template cannot render .*System role not supported"),
    ([{"text": "a"}, {"foo": LONG}], r"x\.jsonl:2: .*\.\.\.$"),
]


@pytest.mark.parametrize("records,pattern", ERRORS)
def test_bad_records_name_file_and_line(toks, tmp_path, records, pattern):
    path = write_jsonl(tmp_path / "x.jsonl", records)
    with pytest.raises(DataError, match=pattern) as e:
        load_train(path, toks["gemma"])
    assert "\n" not in str(e.value) and LONG not in str(e.value) and len(str(e.value)) < len(str(path)) + 500


def test_json_array_errors_keep_line_numbers(toks, tmp_path):
    path = tmp_path / "x.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b"},\n  {"nothing": 1}\n]\n')
    with pytest.raises(DataError, match=r"x\.json:4: record matches no known format"):
        load_train(path, toks["chatml"])
    path.write_text('[{"text": "a"},\n {"text": "b"}]')
    assert len(load_train(path, toks["chatml"])) == 2
    path.write_text('{\n  "train": [{"text": "a"}]\n}\n')
    with pytest.raises(DataError, match=r"x\.json holds one JSON object, not records"):
        load_train(path, toks["chatml"])


def test_missing_paths_are_clear(toks, tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match=r"d has no train\.jsonl"):
        load_dataset(tmp_path / "d", toks["chatml"])
    with pytest.raises(DataError, match=r"--data .*nope\.jsonl: no such file"):
        load_dataset(tmp_path / "nope.jsonl", toks["chatml"])


# ---------------------------------------------------------------------------- truncation and splits


def test_truncation_cuts_the_prompt_side_and_counts(toks, tmp_path):
    tok = toks["chatml"]
    long_prompt = chat("The quick brown fox jumps over the lazy dog. " * 6, "Hello")
    long_text = {"text": "Hello, how are you today? I am fine, thank you! " * 4}
    path = write_jsonl(tmp_path / "c.jsonl", [long_prompt, chat("Say hi", "Hi")])
    [full_chat, short] = load_train(path, tok)
    [full_text] = load_train(write_jsonl(tmp_path / "t.jsonl", [long_text]), tok)
    splits = load_dataset([path, tmp_path / "t.jsonl"], tok, valid_split=0, max_seq_length=30, cache=False)
    assert (splits.truncated, splits.dropped) == (2, 0)
    cut_chat, kept_short, cut_text = splits.train
    assert (kept_short.ids, kept_short.mask) == (short.ids, short.mask)
    # Prompt side: the start of the prompt removed, the answer and its header intact (ChatML has no BOS).
    assert cut_chat.ids == full_chat.ids[-30:] and runs(cut_chat) == runs(full_chat)
    # Text has no prompt side: its end is cut.
    assert cut_text.ids == full_text.ids[:30] and cut_text.mask == full_text.mask[:30]
    assert "2 examples truncated" in splits.summary()
    # A template that writes BOS keeps it in front.
    llama = toks["llama3"]
    lpath = write_jsonl(tmp_path / "l.jsonl", [long_prompt])
    [full_llama] = load_train(lpath, llama)
    [cut_llama] = load_dataset(lpath, llama, valid_split=0, max_seq_length=30, cache=False).train
    bos = llama._tokenizer.bos_token_id
    assert full_llama.ids[0] == bos and cut_llama.ids == [bos] + full_llama.ids[-29:]
    assert runs(cut_llama) == runs(full_llama)
    # Nothing to train on: an empty text, and chats squeezed to BOS + the token before the answer.
    write_jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": "Hello"}])
    assert load_dataset(tmp_path / "e.jsonl", tok, valid_split=0, cache=False).dropped == 1
    write_jsonl(lpath, [long_prompt, chat("Say hi", "Hi")])
    squeezed = load_dataset(lpath, llama, valid_split=0, max_seq_length=2, cache=False)
    assert (squeezed.dropped, squeezed.truncated, squeezed.train) == (2, 0, [])
    assert "2 dropped" in squeezed.summary()


def _key(r):
    return tuple(r.ids)


def test_single_file_split_is_seeded_and_matches_data_split(toks, tmp_path):
    tok = toks["chatml"]
    path = write_jsonl(tmp_path / "all.jsonl", [{"text": f"Numbers: {i} {i + 1}"} for i in range(20)])
    a = load_dataset(path, tok, valid_split=0.25, test_split=0.1, seed=3, cache=False)
    assert (len(a.train), len(a.valid), len(a.test)) == (13, 5, 2)
    every = [_key(r) for r in a.train + a.valid + a.test]
    assert sorted(every) == sorted(_key(r) for r in load_train(path, tok)) and len(set(every)) == 20
    b = load_dataset(path, tok, valid_split=0.25, test_split=0.1, seed=3, cache=False)
    c = load_dataset(path, tok, valid_split=0.25, test_split=0.1, seed=4, cache=False)
    assert [_key(r) for r in b.valid] == [_key(r) for r in a.valid] != [_key(r) for r in c.valid]
    # `mlxtune data split` writes the very same split into a folder.
    counts = data.split_dataset(path, valid=0.25, test=0.1, seed=3, out=tmp_path / "parts")
    assert counts == {"train": 13, "valid": 5, "test": 2}
    d = load_dataset(tmp_path / "parts", tok, cache=False)
    for name in ("train", "valid", "test"):
        assert [_key(r) for r in getattr(d, name)] == [_key(r) for r in getattr(a, name)]
    with pytest.raises(Exception, match="already exists"):
        data.split_dataset(path, out=tmp_path / "parts")


def test_folder_without_valid_file_holds_validation_out_of_train(toks, tmp_path):
    tok = toks["chatml"]
    folder = tmp_path / "d"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": f"Numbers: {i} {i + 1}"} for i in range(20)])
    write_jsonl(folder / "test.jsonl", [{"text": f"Test: {i}"} for i in range(3)])
    s = load_dataset(folder, tok, valid_split=0.25, seed=3, cache=False)
    assert (len(s.train), len(s.valid), len(s.test), s.held_out) == (15, 5, 3, 5)
    assert sorted(_key(r) for r in s.train + s.valid) == sorted(_key(r) for r in load_train(folder / "train.jsonl", tok))
    assert "no valid.jsonl, so 5 valid examples were held out of train" in s.summary()
    assert len(load_dataset(folder, tok, valid_split=0.0, cache=False).train) == 20
    # A folder that has valid.jsonl keeps every train example.
    write_jsonl(folder / "valid.jsonl", [{"text": "Valid: 1"}])
    s = load_dataset(folder, tok, valid_split=0.25, seed=3, cache=False)
    assert (len(s.train), len(s.valid), s.held_out) == (20, 1, 0) and "held out" not in s.summary()


def test_list_of_files_mixes_formats(toks, tmp_path):
    t = write_jsonl(tmp_path / "t.jsonl", [{"text": f"Numbers: {i}"} for i in range(10)])
    c = write_jsonl(tmp_path / "c.jsonl", [chat(f"q {i}", "Hello") for i in range(10)])
    s = load_dataset([t, c], toks["chatml"], valid_split=0.2, cache=False)
    assert s.formats == {str(t): "text", str(c): "chat"}
    assert (len(s.train), len(s.valid)) == (16, 4)


def test_tokenization_is_cached_and_invalidated_by_content(toks, tmp_path, monkeypatch):
    tok = toks["chatml"]
    path = write_jsonl(tmp_path / "c.jsonl", [chat(*CONVERSATION), chat("Say hi", "Hello")])
    cache = tmp_path / "tokcache"
    first = load_dataset(path, tok, valid_split=0, cache=cache)
    assert len(list(cache.glob("*/meta.json"))) == 1  # one entry: a folder of compact arrays

    def boom(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(templates, "chat_to_ids_many", boom)
    again = load_dataset(path, tok, valid_split=0, cache=cache)  # served from the cache
    assert [(r.ids, r.mask) for r in again.train] == [(r.ids, r.mask) for r in first.train]
    assert again.formats == first.formats
    with pytest.raises(AssertionError, match="tokenized again"):  # other options: another cache entry
        load_dataset(path, tok, valid_split=0, cache=cache, train_on_inputs=True)
    write_jsonl(path, [chat("Say hi", "Hello again")])
    with pytest.raises(AssertionError, match="tokenized again"):  # new content
        load_dataset(path, tok, valid_split=0, cache=cache)


def test_split_prompt_answer_for_chat_like_records():
    record = chat(*CONVERSATION, system="Be brief.")
    messages, answer = split_prompt_answer(json.dumps(record))
    assert answer == ANSWERS[1] and messages == record["messages"][:-1]
    assert split_prompt_answer({"instruction": "Add", "input": "2 3", "output": "5"}) == (
        [{"role": "user", "content": "Add\n\n2 3"}], "5")
    with pytest.raises(DataError, match="not a chat-like record"):
        split_prompt_answer({"text": "plain"})


# -------------------------------------------------------------------------------------------- batching


def synthetic(n=37, lo=4, hi=60, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(lo, hi))
        ids = [int(x) for x in rng.integers(1, 300, length)]
        ids[0] = 1000 + i  # makes every record recognisable
        mask = [False] + [bool(x) for x in rng.random(length - 1) < 0.7]
        mask[-1] = True
        out.append(Record(ids, mask))
    return out


def rows_of(batch):
    """Records (ids, mask) recovered from a batch: one per row, or one per segment when packed."""
    inputs, targets = np.array(batch.inputs), np.array(batch.targets)
    loss = np.array(batch.loss_mask)
    segs = np.array(batch.segments) if batch.segments is not None else (inputs != 0).astype(int) * 0 + 1
    out = []
    for b in range(inputs.shape[0]):
        for s in sorted(set(segs[b].tolist()) - {0}):
            pos = np.nonzero(segs[b] == s)[0]
            if batch.segments is None:  # unpacked rows: real length = up to the last nonzero target
                pos = pos[: int(np.nonzero(targets[b])[0].max()) + 1]
            ids = inputs[b, pos].tolist() + [int(targets[b, pos[-1]])]
            out.append((ids, [False] + (loss[b, pos] > 0).tolist()))
    return out


@pytest.mark.parametrize("pack", [False, True])
def test_one_pass_holds_every_example_once_with_exact_targets(pack):
    records = synthetic()
    batches = list(iterate_batches(records, 4, max_seq_length=64, loop=False, pack=pack))
    got = [r for b in batches for r in rows_of(b)]
    assert sorted(got) == sorted((r.ids, r.mask) for r in records)
    for b in batches:
        assert b.inputs.dtype == np.int32 and b.loss_mask.dtype == np.float32
        assert b.inputs.shape[1] % 8 == 0 and b.inputs.shape == b.targets.shape == b.loss_mask.shape
        assert b.n_real == sum(len(ids) - 1 for ids, _ in rows_of(b))
        if pack:
            segs = np.array(b.segments)
            assert b.segments.shape == b.inputs.shape
            assert np.all(np.array(b.loss_mask)[segs == 0] == 0)
            assert (segs > 0).sum(axis=1).max() <= 64
        else:
            assert b.segments is None and b.inputs.shape[0] <= 4


def _same(a, b):
    return all(np.array_equal(np.array(getattr(a, f)), np.array(getattr(b, f)))
               for f in ("inputs", "targets", "loss_mask")) and (a.segments is None) == (b.segments is None)


@pytest.mark.parametrize("pack,order", [(False, "length"), (True, "length"), (False, "random")])
def test_batches_are_deterministic_and_resume_at_any_step(pack, order):
    records = synthetic()
    kw = dict(max_seq_length=64, pack=pack, order=order)
    per_epoch = sum(1 for _ in iterate_batches(records, 4, loop=False, **kw))
    total = 2 * per_epoch + 3  # run past two epoch boundaries
    fresh = list(itertools.islice(iterate_batches(records, 4, seed=7, **kw), total))
    again = list(itertools.islice(iterate_batches(records, 4, seed=7, **kw), total))
    other = list(itertools.islice(iterate_batches(records, 4, seed=8, **kw), total))
    assert all(_same(a, b) for a, b in zip(fresh, again))
    assert not all(_same(a, b) for a, b in zip(fresh, other))
    # Epochs differ from each other (reshuffled), and each holds every example.
    assert not all(_same(a, b) for a, b in zip(fresh[:per_epoch], fresh[per_epoch:]))
    for k in (1, per_epoch - 1, per_epoch, per_epoch + 2, 2 * per_epoch):
        resumed = list(itertools.islice(
            iterate_batches(records, 4, seed=7, start_step=k, **kw), total - k))
        assert len(resumed) == total - k and all(_same(a, b) for a, b in zip(resumed, fresh[k:])), k


def test_random_batch_order_mixes_lengths_and_still_covers_every_example_once_an_epoch():
    records = synthetic(n=200, lo=4, hi=60)
    spread = {}
    for order in ("length", "random"):
        seen, gaps = [], []
        for b in iterate_batches(records, 8, max_seq_length=64, seed=3, loop=False, order=order):
            real = np.array(b.targets) != 0
            lengths = [int(np.flatnonzero(row).max()) + 1 for row in real]
            gaps.append(max(lengths) - min(lengths))
            seen += [tuple(np.array(row)[:n]) for row, n in zip(b.inputs, lengths)]
        assert sorted(seen) == sorted(tuple(r.ids[:-1]) for r in records)
        spread[order] = np.mean(gaps)
    assert spread["random"] > 5 * max(spread["length"], 1), spread
    bucketed = padding_fraction(records, 8, max_seq_length=64)
    assert padding_fraction(records, 8, max_seq_length=64, order="random") > 2 * bucketed


def test_length_batches_mix_rows_of_one_padded_width_at_no_padding_cost():
    """Rows are grouped by padded width (multiples of 8), not exact length: a batch mixes every length that pads
    to its width, and the padding is what sorting by exact length gives."""
    records = synthetic(n=400, lo=4, hi=60)
    real = cells = 0
    distinct = []
    for b in iterate_batches(records, 8, max_seq_length=64, seed=3, loop=False):
        lengths = (np.array(b.targets) != 0).sum(1)  # synthetic records train every target, none is 0
        assert b.inputs.shape[1] == max(8, -(-lengths.max() // 8) * 8)
        assert len(set(-(-lengths // 8))) <= 2  # one width, or the two a boundary batch straddles
        distinct.append(len(set(lengths.tolist())))
        real, cells = real + lengths.sum(), cells + b.inputs.size
    assert abs((1 - real / cells) - padding_fraction(records, 8, max_seq_length=64)) < 1e-12
    assert np.mean(distinct) > 4, np.mean(distinct)  # exact-length sorting: ~1.5 distinct lengths a batch


def test_micro_batches_sort_rows_by_length_and_cut_each_to_its_own_width():
    records = synthetic(n=16, lo=4, hi=60)
    batch = next(iterate_batches(records, 16, max_seq_length=64, seed=1, loop=False, order="random"))
    lengths = (np.array(batch.targets) != 0).sum(1)
    parts = data.micro_batches(batch, 4)
    assert len(parts) == 4 and data.micro_batches(batch, 1) == [batch]
    got = [(tuple(row[:n]), tuple(t[:n])) for p in parts
           for row, t, n in zip(p.inputs, p.targets, (np.array(p.targets) != 0).sum(1))]
    assert sorted(got) == sorted((tuple(r[:n]), tuple(t[:n])) for r, t, n in zip(batch.inputs, batch.targets, lengths))
    longest = [int((np.array(p.targets) != 0).sum(1).max()) for p in parts]
    assert longest == sorted(longest) and len(set(longest)) > 1
    assert [p.inputs.shape[1] for p in parts] == [max(8, -(-n // 8) * 8) for n in longest]
    assert sum(p.inputs.size for p in parts) < 0.9 * batch.inputs.size  # 0.82 here: random rows of 4-60 tokens


def test_length_buckets_and_packing_keep_padding_small():
    records = synthetic(n=200, lo=4, hi=60)
    bucketed = padding_fraction(records, 8, max_seq_length=64)
    # The same batches without sorting by length: rows of random lengths share a batch.
    rng = np.random.default_rng(0)
    order = rng.permutation(len(records))
    real = total = 0
    for i in range(0, len(order), 8):
        sizes = [len(records[j].ids) - 1 for j in order[i:i + 8]]
        real, total = real + sum(sizes), total + len(sizes) * -(-max(sizes) // 8) * 8
    naive = 1 - real / total
    assert bucketed < naive / 2, (bucketed, naive)
    short = synthetic(n=200, lo=4, hi=20)
    assert padding_fraction(short, 4, max_seq_length=64, pack=True) < 0.1 < padding_fraction(short, 4, max_seq_length=64)


def _masked_ce_sum(logits, targets, mask):
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return -(picked * mask).sum()


def test_batch_order_is_lexsorts_order_ties_included():
    """Length-bucketed batches are a fixed function of the seed (runs resume on them): the faster sort gives
    exactly np.lexsort's order, with tied lengths, tied jitter and lengths past 16 bits."""
    rng = np.random.default_rng(0)
    for n, top in ((5000, 7), (5000, 600), (3000, 70000), (1, 3), (0, 3)):
        sizes = rng.integers(0, top, n)
        for jitter in (rng.random(n), np.zeros(n), np.repeat(rng.random((n + 1) // 2), 2)[:n]):
            assert np.array_equal(data._by_size_then_jitter(sizes, jitter), np.lexsort((jitter, sizes)))


def test_packed_batch_gives_the_same_loss_as_the_examples_one_by_one(tiny_llama, tmp_path):
    from mlxtune.models import load

    model, tok = load(tiny_llama)
    path = write_jsonl(tmp_path / "c.jsonl", [chat(*CONVERSATION), chat("Say hi", "Hello"),
                                              chat("Numbers: 1 2 3", "SELECT name FROM users")])
    records = load_train(path, tok)
    [batch] = list(iterate_batches(records, 1, max_seq_length=256, loop=False, pack=True))
    assert sorted(set(np.array(batch.segments)[0].tolist()) - {0}) == [1, 2, 3]

    one_by_one = sum(
        _masked_ce_sum(model(mx.array([r.ids[:-1]])), mx.array([r.ids[1:]]), mx.array([r.mask[1:]], mx.float32)).item()
        for r in records)
    # Attention only inside each example (block-diagonal causal); RoPE is relative, so positions need no reset.
    seg = mx.array(batch.segments)
    length = seg.shape[1]
    causal = mx.arange(length)[:, None] >= mx.arange(length)[None, :]
    mask = (seg[:, :, None] == seg[:, None, :]) & causal
    h = model.model.embed_tokens(mx.array(batch.inputs))
    for layer in model.model.layers:
        h = layer(h, mask[:, None], cache=None)
    logits = model.lm_head(model.model.norm(h))
    packed = _masked_ce_sum(logits, mx.array(batch.targets), mx.array(batch.loss_mask)).item()
    assert packed == pytest.approx(one_by_one, rel=1e-4)
    # The training loop's loss on the same packed batch (mean per trained token) agrees too.
    from mlxtune.loss import loss_fn

    mean, count = loss_fn(model, batch)
    assert count.item() == sum(sum(r.mask[1:]) for r in records)
    assert mean.item() * count.item() == pytest.approx(one_by_one, rel=1e-4)
    # Without the segment mask the examples would see each other and the loss would change.
    leaky = _masked_ce_sum(model(mx.array(batch.inputs)), mx.array(batch.targets), mx.array(batch.loss_mask)).item()
    assert abs(leaky - one_by_one) > 1e-3


def test_convert_between_formats_keeps_what_is_trained(toks, tmp_path):
    tok = toks["chatml"]
    src = write_jsonl(tmp_path / "pairs.jsonl", [{"question": f"Say hi {i}", "answer": "Hello"} for i in range(3)])
    assert data.convert_dataset(src, tmp_path / "comp.jsonl", "completions") == 3
    assert json.loads((tmp_path / "comp.jsonl").read_text().splitlines()[1]) == {"prompt": "Say hi 1",
                                                                                  "completion": "Hello"}
    mapped = write_jsonl(tmp_path / "qa.jsonl", [{"q": "Say hi", "a": "Hello", "id": 7}])
    data.convert_dataset(mapped, tmp_path / "qa-out.jsonl", "completions", prompt_key="q", completion_key="a")
    assert json.loads((tmp_path / "qa-out.jsonl").read_text()) == {"prompt": "Say hi", "completion": "Hello"}
    data.convert_dataset(tmp_path / "comp.jsonl", tmp_path / "chat.jsonl", "chat")
    originals = load_train(src, tok)
    assert [(r.ids, r.mask) for r in load_train(tmp_path / "chat.jsonl", tok)] == [(r.ids, r.mask) for r in originals]
    # --to text renders with the model's template: same tokens, now all trained.
    data.convert_dataset(src, tmp_path / "text.jsonl", "text", model=tok)
    assert [r.ids[:-1] for r in load_train(tmp_path / "text.jsonl", tok)] == [r.ids for r in originals]
    with pytest.raises(DataError, match=r"text\.jsonl:1: plain text cannot become chat"):
        data.convert_dataset(tmp_path / "text.jsonl", tmp_path / "back.jsonl", "chat")
    multi = write_jsonl(tmp_path / "multi.jsonl", [chat(*CONVERSATION)])
    with pytest.raises(DataError, match=r"multi\.jsonl:1: only a single user turn"):
        data.convert_dataset(multi, tmp_path / "m.jsonl", "completions")
    assert not (tmp_path / "m.jsonl").exists()
    before = (tmp_path / "chat.jsonl").read_text()
    with pytest.raises(DataError, match="already exists"):
        data.convert_dataset(src, tmp_path / "chat.jsonl", "chat")
    assert (tmp_path / "chat.jsonl").read_text() == before


def test_highlight_marks_trained_tokens(toks):
    tok = toks["chatml"]
    ids, mask = templates.chat_to_ids(tok, chat("Say hi", "Hello")["messages"])
    plain = data.highlight(tok, Record(ids, mask))
    assert plain.endswith("assistant\n[[Hello<|im_end|>]]\n") and plain.count("[[") == 1
    assert "\033[1;32mHello<|im_end|>\033[0m" in data.highlight(tok, Record(ids, mask), color=True)


# ------------------------------------------------------------------------------------------------ CLI


def _cli(*args, env_cache):
    env = dict(os.environ, MLXTUNE_CACHE=str(env_cache))
    return subprocess.run([sys.executable, "-m", "mlxtune", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_inspect_convert_split(tiny_llama, tmp_path):
    from click.testing import CliRunner

    from mlxtune.cli import _register, main

    _register()
    run = CliRunner().invoke
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": f"Say hi {i}", "output": "Hello"} for i in range(10)]))
    r = run(main, ["data", "convert", str(alpaca), str(tmp_path / "chat.jsonl"), "--to", "chat"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (tmp_path / "chat.jsonl").read_text().splitlines()]
    assert rows[3] == chat("Say hi 3", "Hello")
    r = run(main, ["data", "split", str(tmp_path / "chat.jsonl"), "--valid", "0.2", "--test", "0.1"])
    assert r.exit_code == 0 and sorted(p.name for p in (tmp_path / "chat").iterdir()) == [
        "test.jsonl", "train.jsonl", "valid.jsonl"]
    r = run(main, ["data", "inspect", "--model", str(tiny_llama), "--data", str(tmp_path / "chat"), "-n", "1",
                   "--max-seq-length", "20"])
    assert r.exit_code == 0, r.output
    assert "chat.jsonl" not in r.output and "train.jsonl: chat" in r.output
    assert "rendering: the tokenizer's own chat template" in r.output
    assert "train: 7 examples" in r.output and "valid: 2 examples" in r.output
    assert "10 examples longer than --max-seq-length 20 will be truncated" in r.output
    assert re.search(r"padding in training batches of 4: [\d.]+% \(with --batch-order length: [\d.]+%, "
                     r"with --pack: [\d.]+%\)", r.output), r.output
    assert "[[Hello<|im_end|>]]" in r.output and "\033[" not in r.output

    # Bad data through the real entry point: one line, exit 1, file and line named.
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, chat("q", "a")])
    p = _cli("data", "inspect", "--model", tiny_llama, "--data", bad, env_cache=tmp_path / "cache")
    assert p.returncode == 1 and p.stderr.strip().count("\n") == 0
    assert p.stderr.startswith(f"error: {bad}:2: record is in chat format")


def test_convert_renders_user_templates_in_a_sandbox(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [chat("Say hi", "Hello")])
    escape = tmp_path / "escape.jinja"
    escape.write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(DataError, match=r"c\.jsonl:1: the chat template cannot render this record: SecurityError"):
        data.convert_dataset(src, tmp_path / "out.jsonl", "text", chat_template=str(escape))
    assert not (tmp_path / "out.jsonl").exists()
    fine = tmp_path / "fine.jinja"
    fine.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    data.convert_dataset(src, tmp_path / "out.jsonl", "text", chat_template=str(fine))
    assert json.loads((tmp_path / "out.jsonl").read_text()) == {"text": "user: Say hi\nassistant: Hello\n"}


# ------------------------------------------------------------------- streamed, compact, a million rows


def test_cached_records_are_memory_mapped_compact_arrays(toks, tmp_path):
    tok = toks["chatml"]
    path = write_jsonl(tmp_path / "c.jsonl", [chat(f"q {i}", f"answer {i}") for i in range(50)])
    cache = tmp_path / "tokcache"
    fresh = load_dataset(path, tok, valid_split=0.2, cache=cache)
    again = load_dataset(path, tok, valid_split=0.2, cache=cache)
    store = again.train.stores[0]
    assert isinstance(store.ids, np.memmap) and store.ids.dtype == np.uint16  # a 400-token vocabulary
    assert isinstance(store.mask, np.memmap) and store.mask.dtype == np.bool_
    assert list(fresh.train) == list(again.train) and list(fresh.valid) == list(again.valid)
    # The same records as tokenizing each conversation alone.
    for r, line in zip(again.train, again.train.stores[0].lines[again.train.row]):
        ids, mask = templates.chat_to_ids(tok, chat(f"q {line - 1}", f"answer {line - 1}")["messages"])
        assert (r.ids, r.mask) == (ids, mask)


def test_worker_processes_tokenize_exactly_like_one_process(toks, tmp_path, monkeypatch):
    tok = toks["chatml"]
    rows = [chat(f"question {i} " * (i % 7 + 1), f"answer {i}") for i in range(1200)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    monkeypatch.setenv("MLXTUNE_TOKENIZE_WORKERS", "0")
    one = load_dataset(path, tok, valid_split=0.1, cache=False)
    monkeypatch.setenv("MLXTUNE_TOKENIZE_WORKERS", "2")
    two = load_dataset(path, tok, valid_split=0.1, cache=tmp_path / "tokcache")
    assert np.array_equal(one.train.stores[0].ids, two.train.stores[0].ids)
    assert np.array_equal(one.train.stores[0].mask, two.train.stores[0].mask)
    assert np.array_equal(one.train.stores[0].lines, two.train.stores[0].lines)
    # A bad record is still reported at its line when workers read it.
    write_jsonl(path, rows[:1100] + [{"foo": 1}] + rows[1100:])
    with pytest.raises(DataError, match=r"c\.jsonl:1101: record matches no known format"):
        load_dataset(path, tok, valid_split=0.1, cache=False)


def test_worker_processes_start_without_mlx_lm_or_torch():
    """A tokenizing worker imports mlxtune.data (and the tokenizer's transformers), never what loads a model:
    mlx-lm brought torch in, seconds of start-up and hundreds of MB a worker."""
    code = "import sys, mlxtune.data; print(sorted(m for m in ('mlx_lm', 'torch', 'mlx.core') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_an_interrupted_tokenization_leaves_no_cache_entry(toks, tmp_path, monkeypatch):
    tok = toks["chatml"]
    path = write_jsonl(tmp_path / "c.jsonl", [chat(f"q {i}", "a") for i in range(3000)])
    cache = tmp_path / "tokcache"
    real, calls = data.records_from, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(data, "records_from", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_dataset(path, tok, cache=cache)
    assert not cache.exists() or list(cache.iterdir()) == []  # no entry, no temporary folder
    monkeypatch.setattr(data, "records_from", real)
    assert len(load_dataset(path, tok, valid_split=0, cache=cache).train) == 3000


def test_a_damaged_cache_entry_is_tokenized_again(toks, tmp_path):
    tok = toks["chatml"]
    path = write_jsonl(tmp_path / "c.jsonl", [chat(f"q {i}", "a") for i in range(20)])
    cache = tmp_path / "tokcache"
    first = list(load_dataset(path, tok, valid_split=0, cache=cache).train)
    [entry] = list(cache.iterdir())
    ids = entry / "ids.bin"
    ids.write_bytes(ids.read_bytes()[:-2])  # a truncated file: its size no longer matches meta.json
    assert list(load_dataset(path, tok, valid_split=0, cache=cache).train) == first


def test_a_dataset_saved_by_the_datasets_library_is_data(toks, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")  # the optional extra, installed with mlxtune[test]
    tok = toks["chatml"]
    rows = [chat(f"q {i}", f"answer {i}") for i in range(30)]
    valid = [chat(f"v {i}", f"check {i}") for i in range(5)]
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "validation": datasets.Dataset.from_list(valid)}).save_to_disk(str(folder))
    (tmp_path / "jsonl").mkdir()
    write_jsonl(tmp_path / "jsonl" / "train.jsonl", rows)
    write_jsonl(tmp_path / "jsonl" / "valid.jsonl", valid)
    from_saved = load_dataset(folder, tok, cache=tmp_path / "tokcache")
    from_files = load_dataset(tmp_path / "jsonl", tok, cache=False)
    assert list(from_saved.train) == list(from_files.train) and list(from_saved.valid) == list(from_files.valid)
    assert set(from_saved.formats) == {f"{folder}[train]", f"{folder}[validation]"}
    # A single Dataset is split like a lone file; a bad row is named by its row number.
    one = tmp_path / "one"
    datasets.Dataset.from_list(rows[:10] + [{"messages": [{"role": "user", "content": "q"}]}] + rows[10:]).save_to_disk(str(one))
    with pytest.raises(DataError, match=r"one:11: chat has no assistant turn"):
        load_dataset(one, tok, cache=False)
    # A hub id offline that is not in the local cache: one line saying so.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(DataError, match=r"--data nobody/no-such-dataset: no such file or folder.*HF_HUB_OFFLINE") as e:
        load_dataset("nobody/no-such-dataset", tok, cache=False)
    assert "\n" not in str(e.value)


def _eager_and_lazy(monkeypatch, path, tok, **kw):
    monkeypatch.setenv("MLXTUNE_LAZY_TOKENIZE", "0")
    eager = load_dataset(path, tok, cache=False, **kw)
    monkeypatch.setenv("MLXTUNE_LAZY_TOKENIZE", "1")
    lazy = load_dataset(path, tok, cache=False, **kw)
    return eager, lazy


def test_a_lazily_tokenized_file_reads_the_same_records(toks, tmp_path, monkeypatch):
    """Lazily (a big file), each record is tokenized and truncated when read: the same tokens and masks as
    tokenizing the whole file first, BOM, CRLF and blank lines included; what truncation drops reads as a
    record with nothing to train."""
    tok = toks["llama3"]
    rows = [json.dumps(chat("word " * (i % 23 + 1), f"answer {i} " * (i % 5 + 1))) for i in range(300)]
    rows[7] = "   "  # a blank line is no record
    rows[40] = json.dumps({"messages": [{"role": "user", "content": "long " * 60}, {"role": "assistant", "content": ""}]})
    path = tmp_path / "c.jsonl"
    path.write_bytes(data.BOM + "\r\n".join(rows).encode() + b"\r\n")
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": ""}, {"text": "Hello there, how are you?"}] * 5)
    eager, lazy = _eager_and_lazy(monkeypatch, [path, text], tok, valid_split=0.1, test_split=0.1, seed=2,
                                  max_seq_length=24)
    assert data.is_lazy(lazy.train) and not data.is_lazy(eager.train) and lazy.lazy == [str(path), str(text)]
    assert "tokenized as batches read it" in lazy.summary() and eager.truncated > 0 and eager.dropped == 5

    def where(records):  # (file or cache key, line) of each item
        def name(store):
            return str(store.path) if isinstance(store, data.LazyStore) else store.key
        return {(name(records.stores[p]), int(records.stores[p].lines[r])): k
                for k, (p, r) in enumerate(zip(records.part.tolist(), records.row.tolist()))}

    for name in ("train", "valid", "test"):
        e, z = getattr(eager, name), getattr(lazy, name)
        paths = {st.key: str(zst.path) for st, zst in zip(sorted(e.stores, key=lambda s: s.fmt),
                                                         sorted(z.stores, key=lambda s: s.fmt))}
        kept = {(paths[key], line): k for (key, line), k in where(e).items()}
        lines = where(z)
        assert set(kept) <= set(lines)
        for at, k in lines.items():
            ids, mask = z.arrays(k)
            assert len(ids) <= 24
            if at in kept:
                assert e[kept[at]] == Record(ids.tolist(), mask.tolist())
            else:
                assert not mask.any()  # dropped when tokenized first: nothing trains here
        assert (z.lengths > 1).all()
    assert len(lazy.train) + len(lazy.valid) + len(lazy.test) == 299 + 10


def test_lazy_batches_cover_every_record_and_match_random_order(toks, tmp_path, monkeypatch):
    tok = toks["chatml"]
    path = write_jsonl(tmp_path / "c.jsonl", [chat("q " * (i % 9 + 1), f"answer {i}") for i in range(90)])
    eager, lazy = _eager_and_lazy(monkeypatch, path, tok, valid_split=0.1)
    # Random order draws rows without lengths: with nothing dropped, the same batches either way.
    for a, b in zip(iterate_batches(eager.train, 4, order="random", loop=False),
                    iterate_batches(lazy.train, 4, order="random", loop=False), strict=True):
        assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.loss_mask, b.loss_mask)
    # Length order groups the estimated lengths; each record still comes once an epoch.
    seen = sorted(tuple(row[row > 0]) for b in iterate_batches(lazy.train, 4, loop=False) for row in b.targets)
    assert seen == sorted(tuple(np.asarray(r.ids[1:])[np.asarray(r.ids[1:]) > 0]) for r in eager.train)
    assert data.records_fingerprint(lazy.train) == data.records_fingerprint(load_dataset(path, tok, valid_split=0.1,
                                                                                         cache=False).train)


def test_a_lazy_file_names_its_first_bad_line_soon_after_reading_starts(toks, tmp_path, monkeypatch):
    tok = toks["chatml"]
    rows = [chat(f"q {i}", "a") for i in range(30)]
    path = write_jsonl(tmp_path / "c.jsonl", rows[:20] + [{"foo": 1}] + rows[20:25] + ['{"messages": ['] + rows[25:])
    monkeypatch.setenv("MLXTUNE_LAZY_TOKENIZE", "1")
    monkeypatch.setattr(data, "LAZY_SAMPLE", 10)  # the bad lines are past the records read up front
    train = load_dataset(path, tok, valid_split=0, cache=False).train
    by_line = dict(zip(train.stores[0].lines[train.row].tolist(), range(len(train))))
    # The batch that reads a bad record names it (whether the background check got there first or not)...
    with pytest.raises(DataError, match=r"c\.jsonl:21: record matches no known format"):
        train.arrays(by_line[21])
    # ...and the check that this first read started names the first bad line of the file to every later read,
    # a good record's too: a run stops within seconds, not when its batches reach the line hours in.
    train.stores[0].lines_check.wait()
    with pytest.raises(DataError, match=r"c\.jsonl:21: record matches no known format"):
        train.arrays(by_line[2])
    one_bad = write_jsonl(tmp_path / "d.jsonl", rows[:25] + ['{"messages": "a\tb"}'] + rows[25:])  # a raw tab
    train = load_dataset(one_bad, tok, valid_split=0, cache=False).train
    store = train.stores[0]
    assert store.lines_check.found is None  # loading does not start it: the first step is not delayed
    store.lines_check.start(store)
    store.lines_check.wait()
    with pytest.raises(DataError, match=r"d\.jsonl:26: not valid JSON \(Invalid control character at column 16\)"):
        train.arrays(0)
    # The first record read up front fixes the format, and a bad first line is named at once.
    path.write_text("\n".join(['{"messages": ', *map(json.dumps, rows)]))
    with pytest.raises(DataError, match=r"c\.jsonl:1: not valid JSON"):
        load_dataset(path, tok, valid_split=0, cache=False)
    path.write_text(" " * 40 + "\n" + "\n".join(map(json.dumps, rows)))  # a long blank line is no format
    assert load_dataset(path, tok, valid_split=0, cache=False).train.stores[0].fmt == "chat"
    path.write_text("\n".join([" " * 40] * 12 + [json.dumps(r) for r in rows]))
    with pytest.raises(DataError, match=r"c\.jsonl: the first 10 lines hold only whitespace"):
        load_dataset(path, tok, valid_split=0, cache=False)


def test_which_files_are_tokenized_lazily(toks, tmp_path, monkeypatch):
    tok = toks["chatml"]
    path = write_jsonl(tmp_path / "c.jsonl", [chat(f"q {i}", "a") for i in range(40)])
    array = tmp_path / "a.json"
    array.write_text(json.dumps([chat("q", "a")] * 40))
    monkeypatch.delenv("MLXTUNE_LAZY_TOKENIZE", raising=False)
    assert not load_dataset(path, tok, cache=False).lazy
    monkeypatch.setattr(data, "LAZY_MIN_BYTES", path.stat().st_size)  # from this size on
    assert load_dataset(path, tok, cache=False).lazy == [str(path)]
    # Its key (what a resumed run must match) hashes the bytes read by the one scan of the file.
    key = load_dataset(path, tok, cache=False).train.stores[0].key
    assert load_dataset(path, tok, cache=False).train.stores[0].key == key
    path.write_bytes(path.read_bytes().replace(b"q 1", b"q 7", 1))
    assert load_dataset(path, tok, cache=False).train.stores[0].key != key
    assert not load_dataset(array, tok, cache=False).lazy  # a JSON array is read as a whole
    monkeypatch.setenv("MLXTUNE_LAZY_TOKENIZE", "0")
    assert not load_dataset(path, tok, cache=False).lazy
    monkeypatch.setenv("MLXTUNE_LAZY_TOKENIZE", "yes")
    with pytest.raises(data.ConfigError, match="MLXTUNE_LAZY_TOKENIZE='yes' must be 0"):
        load_dataset(path, tok, cache=False)
