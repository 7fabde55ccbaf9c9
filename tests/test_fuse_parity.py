"""The fuse parity check never refuses a correct merge and always refuses a wrong one.

Correct merges: adapters really trained (every test architecture, a high learning rate, a long run, a
wider model, QLoRA de-quantized) all fuse. Wrong merges, injected into the merge step: one merged weight
perturbed well above float32 rounding, a wrong scale, a transposed update, a layer left unmerged; each
is refused and nothing is written.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

import mlxtune
import mlxtune.fusion as fusion
from mlxtune.errors import ExportError
from mlxtune.layers import LoRALinear

from hf_models import ARCHS, cached_hf_model, make_hf_model
from tiny import write_chat_data

QUIET = dict(verbose=False, steps_per_eval=0, save_every=0, plot=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_chat_data(tmp_path_factory.mktemp("parity-data"), seed=3, turns=3,
                           sizes=(("train", 32), ("valid", 4)))


def _train(base, data, out, **settings):
    settings = {"iters": 30, "batch_size": 4, "learning_rate": 2e-2, "lora_layers": -1,
                "target_modules": "all-linear", **QUIET, **settings}
    return mlxtune.lora(str(base), str(data), adapter_file=out / "adapters.npz", **settings).adapter_file


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_trained_adapters_of_every_architecture_fuse(arch, data, tmp_path, tmp_path_factory):
    base = cached_hf_model(tmp_path_factory, arch)
    adapter = _train(base, data, tmp_path / "a")
    result = mlxtune.fuse(base, adapter, tmp_path / "fused", dtype="float32")
    assert result.parity is not None and result.parity < 1e-3


def test_high_learning_rate_long_run_and_wider_model_fuse(data, tmp_path, tmp_path_factory):
    tiny = cached_hf_model(tmp_path_factory, "llama")
    # the model of the report that started this check: 4 blocks, hidden 256, 8 heads / 4 KV heads, vocab 1000
    wide = make_hf_model(tmp_path / "wide", "llama", num_hidden_layers=4, hidden_size=256, num_attention_heads=8,
                         num_key_value_heads=4, intermediate_size=512, vocab_size=1000)
    runs = {"wide": (wide, dict(iters=30, learning_rate=2e-3, lora_layers=4, target_modules="attention")),
            "hot": (wide, dict(iters=10, learning_rate=1e-1, max_grad_norm=0)),
            "long": (tiny, dict(iters=300, learning_rate=1e-2))}
    for name, (base, settings) in runs.items():
        adapter = _train(base, data, tmp_path / name, **settings)
        for dtype in ("float32", None):
            result = mlxtune.fuse(base, adapter, tmp_path / f"fused-{name}-{dtype}", dtype=dtype)
            assert result.parity is not None, name


def test_qlora_adapter_fuses_de_quantized(data, tmp_path, tmp_path_factory):
    q4 = tmp_path / "q4"
    mlxtune.convert(cached_hf_model(tmp_path_factory, "qwen2"), q4, quantize=True, q_group_size=32, progress=False)
    adapter = _train(q4, data, tmp_path / "qa", learning_rate=1e-2)
    result = mlxtune.fuse(q4, adapter, tmp_path / "fused", de_quantize=True, dtype="float32")
    assert result.parity is not None and result.de_quantized


def _wrong_merges():
    """Each breaks the merge of one (square) layer in its own way."""

    def perturbed(layer: LoRALinear, merged: nn.Linear) -> None:  # one weight, 1e-3 of the layer's largest
        w = merged.weight
        merged.weight = w + mx.zeros_like(w).at[0, 0].add(1e-3 * mx.abs(w).max())

    def wrong_scale(layer: LoRALinear, merged: nn.Linear) -> None:
        merged.weight = merged.weight + 0.1 * layer.delta().astype(merged.weight.dtype)

    def transposed(layer: LoRALinear, merged: nn.Linear) -> None:
        delta = layer.delta().astype(merged.weight.dtype)
        merged.weight = merged.weight - delta + delta.T

    def unmerged(layer: LoRALinear, merged: nn.Linear) -> None:
        merged.weight = merged.weight - layer.delta().astype(merged.weight.dtype)

    return {"perturbed": perturbed, "wrong scale": wrong_scale, "transposed": transposed, "unmerged": unmerged}


@pytest.mark.parametrize("kind", list(_wrong_merges()))
def test_wrong_merges_are_refused(kind, data, tmp_path, tmp_path_factory, monkeypatch):
    base = cached_hf_model(tmp_path_factory, "llama")
    adapter = _train(base, data, tmp_path / "a", iters=10)
    real_fuse, breaks = LoRALinear.fuse, _wrong_merges()[kind]
    broken = []

    def fuse_one(self, dequantize=False):
        merged = real_fuse(self, dequantize)
        if not broken and merged.weight.shape[0] == merged.weight.shape[1]:  # the first square layer
            breaks(self, merged)
            broken.append(True)
        return merged

    monkeypatch.setattr(LoRALinear, "fuse", fuse_one)
    with pytest.raises(ExportError, match=r"differs from base\+adapter by .* at probe \d+ position \d+"):
        mlxtune.fuse(base, adapter, tmp_path / "fused", dtype="float32")
    assert broken and not (tmp_path / "fused").exists()


def test_the_bound_follows_each_positions_rounding_noise(monkeypatch):
    """A position whose float32 rounding noise is large may differ by that much, another may not."""
    ref64 = mx.zeros((1, 2, 4), mx.float64)
    ref32 = mx.array([[[0.0, 1e-3, 0, 0], [0.0, 1e-7, 0, 0]]], mx.float32)  # position 0 is ill-conditioned
    reference = fusion._Reference(ref32, ref64)
    tokens = mx.zeros((1, 2), mx.int32)
    for moved, ok in (((1e-3, 0.0), True), ((0.0, 5e-5), False)):
        fused = mx.array([[[moved[0], 0, 0, 0], [moved[1], 0, 0, 0]]], mx.float64)
        monkeypatch.setattr(fusion, "_float64_logits", lambda net, tokens, f=fused: f)
        if ok:
            assert fusion._parity(None, tokens, reference) == pytest.approx(1e-3)
        else:
            with pytest.raises(ExportError, match="at probe 0 position 1"):
                fusion._parity(None, tokens, reference)
