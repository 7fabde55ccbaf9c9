"""Token generation on the torch backend, for `generate --backend torch` and `eval --backend torch`.

The prompt rendering, stop tokens, detokenizing and answer matching stay in `mlxtune.generation` and
`mlxtune.evaluation`; this module only turns prompt ids into next tokens with a transformers model (our
LoRA layers inside it). The one thing to know: temperature 0 is greedy (argmax) and so deterministic, as on
MLX; batched greedy decoding left-pads the prompts and lets transformers' `generate` keep the KV cache.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator

import torch
from transformers import GenerationConfig


def _device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def _sample(logits: torch.Tensor, temp: float, top_p: float) -> int:
    if temp == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temp, dim=-1)
    if 0 < top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        drop = torch.cumsum(sorted_probs, -1) - sorted_probs >= top_p  # keep the smallest set reaching top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1))


def stream(model, prompt_ids: list[int], *, max_tokens: int, temp: float = 0.0, top_p: float = 0.0,
           seed: int | None = None) -> Iterator[int]:
    """Next tokens after `prompt_ids`, one at a time, with a KV cache (the caller stops at EOS)."""
    if seed is not None:
        torch.manual_seed(seed)
    model.eval()
    ids = torch.tensor([prompt_ids], device=_device(model))
    # transformers 5.24 renamed past_key_values to cache (the old name warns); earlier 5.x only knows the old one
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    past = None
    with torch.no_grad():
        for _ in range(max_tokens):
            out = model(input_ids=ids, use_cache=True, **{name: past})
            past = getattr(out, name)
            token = _sample(out.logits[0, -1].float(), temp, top_p)
            yield token
            ids = torch.tensor([[token]], device=ids.device)


def greedy_batch(model, prompts: list[list[int]], *, max_tokens: int, batch_size: int, stops: Iterable[int],
                 pad_id: int, progress=None) -> list[list[int]]:
    """Greedy replies (token ids, without the stop token) to every prompt, `batch_size` prompts at a time."""
    stops = sorted(set(stops))
    config = GenerationConfig(do_sample=False, max_new_tokens=max_tokens, eos_token_id=stops or None,
                              pad_token_id=pad_id)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: less padding
    out: list[list[int]] = [[] for _ in prompts]
    model.eval()
    device = _device(model)
    for lo in range(0, len(order), max(1, batch_size)):
        rows = order[lo:lo + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]):] = 1
        with torch.no_grad():
            generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                       generation_config=config)
        for r, i in enumerate(rows):
            tokens = generated[r, width:].tolist()
            cut = next((k for k, t in enumerate(tokens) if t in stops), len(tokens))
            out[i] = tokens[:cut]
        if progress is not None:
            progress.update(len(rows))
    return out
