"""generate / chat on a tiny random llama: greedy = argmax of a cache-free forward pass, EOS stops,
adapters change the output, the chat template is what the tokenizer renders, and the CLI streams text
and prints tokens/sec."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import pytest

import mlxtune
from mlxtune.adapters import save_adapter
from mlxtune.errors import ConfigError
from mlxtune.generation import chat, generate_ids, generate_with_stats, render_prompt, stop_token_ids
from mlxtune.layers import apply_lora
from mlxtune.models import load


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    return load(tiny_llama)


def greedy_no_cache(model, ids, n):
    """Reference: argmax of a full forward pass over the whole sequence at every step (no KV cache)."""
    ids = list(ids)
    out = []
    for _ in range(n):
        logits = model(mx.array([ids]))[0, -1]
        t = int(mx.argmax(logits).item())
        out.append(t)
        ids.append(t)
    return out


def generated_ids(tokenizer, text):
    return tokenizer._tokenizer.encode(text, add_special_tokens=False)


def test_greedy_matches_uncached_argmax_and_is_deterministic(loaded):
    model, tok = loaded
    ids = render_prompt(tok, "Hello, how are you?")
    # No stops, so the whole max_tokens run is compared token by token.
    got = []
    result = generate_ids(model, tok, ids, max_tokens=12, stops=set(), on_text=got.append)
    ref = greedy_no_cache(model, ids, 12)
    assert result.stats.generated_tokens == 12 and result.stats.finish_reason == "length"
    assert result.text == tok.decode(ref)
    assert "".join(got) == result.text  # streamed pieces add up to the text
    again = generate_ids(model, tok, ids, max_tokens=12, stops=set())
    assert again.text == result.text


def test_sampling_is_seeded(loaded):
    model, tok = loaded
    a = mlxtune.generate(model, tok, "hi", temp=1.5, seed=3, max_tokens=16)
    b = mlxtune.generate(model, tok, "hi", temp=1.5, seed=3, max_tokens=16)
    c = mlxtune.generate(model, tok, "hi", temp=1.5, seed=4, max_tokens=16)
    assert a == b
    assert a != c  # 16 tokens over a ~400-word vocabulary at high temperature
    with pytest.raises(ConfigError, match="--temp"):
        mlxtune.generate(model, tok, "hi", temp=-1)


def test_stops_at_eos_from_config(tiny_llama, tmp_path, loaded):
    model, tok = loaded
    ids = render_prompt(tok, "Numbers: 1 2 3")
    ref = greedy_no_cache(model, ids, 10)
    # Make the k-th greedy token the model's EOS (config.json): generation must end just before it.
    k = next(i for i in range(1, 10) if ref[i] not in ref[:i])
    copy = tmp_path / "eos_model"
    shutil.copytree(tiny_llama, copy)
    config = json.loads((copy / "config.json").read_text())
    config["eos_token_id"] = ref[k]
    (copy / "config.json").write_text(json.dumps(config))
    result = generate_with_stats(str(copy), prompt="Numbers: 1 2 3", max_tokens=10)
    assert result.stats.finish_reason == "stop"
    assert result.stats.generated_tokens == k
    assert result.text == tok.decode(ref[:k])


def test_end_of_turn_tokens_stop(loaded):
    model, tok = loaded
    stops = stop_token_ids(tok)
    vocab = tok._tokenizer.get_vocab()
    assert vocab["<|im_end|>"] in stops and vocab["</s>"] in stops
    ids = render_prompt(tok, "Hello")
    first = greedy_no_cache(model, ids, 1)[0]
    result = generate_ids(model, tok, ids, max_tokens=10, stops={first})
    assert result.text == "" and result.stats.finish_reason == "stop"


def test_chat_template_applied(loaded):
    _, tok = loaded
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    expected = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert render_prompt(tok, "Hi there", system="Be brief.") == list(expected)
    text = tok.decode(render_prompt(tok, "Hi there"))
    assert text.startswith("<|im_start|>user\nHi there<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    plain = render_prompt(tok, "Hi there", chat=False)
    assert plain == tok._tokenizer.encode("Hi there", add_special_tokens=True)
    assert "<|im_start|>" not in tok.decode(plain)
    with pytest.raises(ConfigError, match="--system"):
        render_prompt(tok, "Hi", system="x", chat=False)


def test_adapter_changes_output(tiny_llama, tmp_path):
    model, tok = load(tiny_llama)
    base = mlxtune.generate(model, tok, "The quick brown fox", max_tokens=12)
    apply_lora(model, lora_layers=2, rank=4, alpha=32.0)
    mx.random.seed(1)
    for _, layer in model.named_modules():
        if hasattr(layer, "lora_b"):
            layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.5
    adapter = save_adapter(model, tmp_path / "adapters.npz")
    tuned_in_memory = mlxtune.generate(model, tok, "The quick brown fox", max_tokens=12)
    tuned_from_file = mlxtune.generate(str(tiny_llama), prompt="The quick brown fox", max_tokens=12,
                                       adapter_file=str(adapter))
    assert tuned_in_memory != base
    assert tuned_from_file == tuned_in_memory
    assert mlxtune.generate(str(tiny_llama), prompt="The quick brown fox", max_tokens=12) == base


def test_chat_keeps_history_and_resets(loaded):
    model, tok = loaded
    out = io.StringIO()
    history = chat(model, tok, input=io.StringIO("Hello\nhow are you?\n/reset\nHello\n/exit\nnever read\n"),
                   output=out, max_tokens=8)
    first = mlxtune.generate(model, tok, "Hello", max_tokens=8)
    second = mlxtune.generate(model, tok, messages=[{"role": "user", "content": "Hello"},
                                                     {"role": "assistant", "content": first},
                                                     {"role": "user", "content": "how are you?"}], max_tokens=8)
    assert out.getvalue() == f"{first}\n{second}\n[conversation reset]\n{first}\n"
    assert history == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first}]


def cli(*args, stdin=None):
    env = dict(os.environ, MLXTUNE_NO_OPENBLAS="0")
    return subprocess.run([sys.executable, "-m", "mlxtune", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_generate_streams_and_reports_speed(tiny_llama, loaded):
    model, tok = loaded
    r = cli("generate", "--model", str(tiny_llama), "--prompt", "Hello", "--max-tokens", "6", "--system", "Be brief.")
    assert r.returncode == 0, r.stderr
    assert r.stdout == mlxtune.generate(model, tok, "Hello", system="Be brief.", max_tokens=6) + "\n"
    assert "tokens/sec" in r.stderr and "Generation:" in r.stderr


def test_cli_chat_over_piped_stdin(tiny_llama, loaded):
    model, tok = loaded
    r = cli("chat", "--model", str(tiny_llama), "--max-tokens", "5", stdin="Hello\n/reset\nHello\n")
    assert r.returncode == 0, r.stderr
    first = mlxtune.generate(model, tok, "Hello", max_tokens=5)
    assert r.stdout == f"{first}\n[conversation reset]\n{first}\n"
