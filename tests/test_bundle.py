"""The bundled default: data/tiny-chat (model + SentencePiece tokenizer) and data/toolcall (the task).

Checks that the bundle loads through mlxtune, stays small, renders its chat template, that the dataset
needs its input (every argument value is copied from the request), that the base model fails the task but
can copy (what makes it learnable), and that scripts/build_default.py regenerates the committed dataset
and can pretrain a model from nothing.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from mlxtune.defaults import DEFAULT_DATA, DEFAULT_LORA_CONFIG, DEFAULT_MODEL

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import build_default  # noqa: E402
import pretrain_corpus  # noqa: E402
import toolcall_task  # noqa: E402

CALL = re.compile(r"""^<tool_call name="([a-z_]+)" arguments='(\{.*\})'/>$""")
SPLITS = ("train", "valid", "test")


def rows(split: str) -> list[dict]:
    return [json.loads(line) for line in (DEFAULT_DATA / f"{split}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def loaded():
    from mlxtune.models import load_model

    return load_model(DEFAULT_MODEL)


def test_bundle_is_small_llama_in_hf_layout(loaded):
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.iterdir())
    assert size <= 20 * 1024 * 1024, f"data/tiny-chat is {size / 2**20:.1f} MB"
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= {
        f.name for f in DEFAULT_MODEL.iterdir()}
    assert loaded.config["model_type"] == "llama"
    assert type(loaded.model).__module__ == "mlx_lm.models.llama"


def test_tokenizer_is_sentencepiece_and_matches_hf(loaded):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(DEFAULT_MODEL / "tokenizer.model"))
    assert sp.get_piece_size() == loaded.config["vocab_size"]
    tok = loaded.tokenizer
    assert type(tok._tokenizer).__name__ == "LlamaTokenizer"
    for text in ["Remind me to call Dana at 5:30pm tomorrow", "  two  spaces\nand a newline",
                 "Ünïcödé 🙂 <tool_call name=\"x\" arguments='{\"a\": 1}'/>"]:
        ids = tok.encode(text)
        assert ids == sp.encode(text)  # transformers' conversion tokenizes exactly like SentencePiece
        assert tok.decode(ids) == text
    assert sp.piece_to_id("<|im_start|>") == 4 and sp.piece_to_id("<|im_end|>") == 5
    assert tok.eos_token_ids == {5}


def test_chat_template_renders_chatml(loaded):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Call Omar"}]
    text = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCall Omar<|im_end|>\n<|im_start|>assistant\n"
    assert text == build_default.render_chat(messages, add_generation_prompt=True)
    ids = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert ids[0] == 4 and ids.count(5) == 2  # specials are single tokens, no BOS is added


def test_dataset_splits_are_chat_rows_with_disjoint_requests():
    sizes = {s: len(rows(s)) for s in SPLITS}
    assert sizes["train"] >= 2000 and sizes["valid"] >= 100 and sizes["test"] >= 100
    seen = {}
    for split in SPLITS:
        for i, row in enumerate(rows(split)):
            roles = [m["role"] for m in row["messages"]]
            assert roles == ["user", "assistant"], f"{split}.jsonl line {i + 1}"
            assert all(isinstance(m["content"], str) and m["content"] for m in row["messages"])
            user = row["messages"][0]["content"]
            assert seen.setdefault(user, split) == split, f"{user!r} is in both {seen[user]} and {split}"


def test_answers_copy_every_value_from_the_request():
    from collections import Counter

    answers, tools = Counter(), set()
    for split in SPLITS:
        for i, row in enumerate(rows(split)):
            user, answer = row["messages"][0]["content"], row["messages"][1]["content"]
            match = CALL.match(answer)
            assert match, f"{split}.jsonl line {i + 1}: {answer!r} is not one tool call"
            name, args = match.group(1), json.loads(match.group(2))
            assert name in toolcall_task.TOOLS and args
            for key, value in args.items():
                assert str(value) in user, f"{split}.jsonl line {i + 1}: {key}={value!r} is not in {user!r}"
            answers[answer] += 1
            tools.add(name)
    assert tools == set(toolcall_task.TOOLS)
    total = sum(answers.values())
    assert answers.most_common(1)[0][1] < 0.01 * total  # no constant answer can score
    assert len(answers) > 0.7 * total


def test_build_script_regenerates_the_committed_dataset(tmp_path):
    counts = build_default.write_dataset(tmp_path, seed=1234)
    for split in SPLITS:
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (DEFAULT_DATA / f"{split}.jsonl").read_bytes()
        assert counts[split] == len(rows(split))


def test_pretraining_corpus_never_shows_the_tool_call_format():
    texts = build_default.corpus_texts(3000, seed=7)
    assert texts == build_default.corpus_texts(3000, seed=7)  # deterministic
    assert not any("tool_call" in t or "arguments=" in t for t in texts)
    assert sum(t.startswith("<|im_start|>") for t in texts) > 2000  # mostly chats, some plain text


def test_default_lora_settings_are_training_arguments():
    import yaml

    from mlxtune.settings import training_args

    settings = yaml.safe_load(DEFAULT_LORA_CONFIG.read_text())
    args = training_args(DEFAULT_LORA_CONFIG)  # raises on an unknown key
    for key, value in settings.items():
        assert getattr(args, key) == value


def test_base_model_fails_the_task():
    from mlxtune.evaluation import evaluate

    result = evaluate(DEFAULT_MODEL, data=DEFAULT_DATA, limit=24, max_tokens=48, loss=False, progress=False)
    assert result.n == 24
    assert result.exact_match <= 0.05
    # It is a chat model, not a broken one: it answers in words, copying the request's values.
    assert not any(p.startswith("<tool_call") for p in result.predictions)


def test_base_model_copies_words_it_has_never_seen_together(loaded):
    """What makes the task learnable in 1000 LoRA steps: the base model copies a message into its answer.

    Teacher-forced on "Repeat after me: <2-8 random words and numbers>", its greedy next token must be right
    on nearly every answer token. A model whose copying heads did not form (the bundle before lr 1e-3 and
    4000 pretraining steps) scored ~0.45 here: it predicts the spaces and guesses the words.
    """
    import random

    import mlx.core as mx
    import numpy as np

    rng = random.Random(2024)
    sp = loaded.tokenizer._tokenizer
    hits = total = 0
    for _ in range(40):
        phrase = pretrain_corpus.words(rng, rng.randint(2, 8))
        chat = [{"role": "user", "content": f"Repeat after me: {phrase}"}, {"role": "assistant", "content": phrase}]
        prompt = sp.encode(build_default.render_chat(chat[:1], add_generation_prompt=True), add_special_tokens=False)
        ids = sp.encode(build_default.render_chat(chat), add_special_tokens=False)
        pred = np.array(loaded.model(mx.array([ids[:-1]])).argmax(-1))[0]
        answer = slice(len(prompt) - 1, len(ids) - 2)  # the phrase and its <|im_end|>
        hits += int((pred[answer] == np.array(ids[1:])[answer]).sum())
        total += answer.stop - answer.start
    assert hits / total >= 0.95, f"copies {hits}/{total} answer tokens"


def test_script_pretrains_a_loadable_model_from_nothing(tmp_path):
    from mlxtune.models import load_model

    texts = build_default.corpus_texts(300, seed=3)
    out = tmp_path / "m"
    out.mkdir()
    build_default.train_tokenizer(texts, out, vocab_size=400)
    stream, vocab = build_default.token_stream(texts, out / "tokenizer.model")
    losses = build_default.pretrain(out, stream, vocab, steps=40, batch_size=4, seq_len=32, lr=3e-3, seed=0,
                                    progress=False, snapshot_every=20, snapshot_to=tmp_path / "snap")
    assert len(losses) == 40
    assert abs(losses[0] - math.log(400)) < 0.7  # a random model: about uniform over the vocabulary
    assert np.mean(losses[-10:]) < np.mean(losses[:3]) - 1.5  # it learns the corpus (measured: 6.1 -> 4.0)
    assert load_model(tmp_path / "snap-step20").config["vocab_size"] == 400  # a tuning snapshot, tokenizer included
    loaded = load_model(out)
    assert loaded.config["vocab_size"] == vocab == 400
    assert loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])[0] == 4
