import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxtune.adapters import load_adapter, save_adapter
from mlxtune.errors import AdapterError, ConfigError
from mlxtune.layers import LoRALinear, apply_lora, count_parameters, lora_modules
from mlxtune.models import load


def test_lora_layer_starts_as_identity_and_fuses_exactly():
    mx.random.seed(0)
    base = nn.Linear(16, 8)
    x = mx.random.normal((3, 16))
    layer = LoRALinear.from_base(base, rank=4, alpha=8)
    assert mx.allclose(layer(x), base(x)).item()
    layer.lora_b = mx.random.normal(layer.lora_b.shape)
    fused = layer.fuse()
    assert isinstance(fused, nn.Linear)
    np.testing.assert_allclose(np.array(fused(x)), np.array(layer(x)), atol=1e-5)
    assert not mx.allclose(fused(x), base(x)).item()


def test_qlora_layer_wraps_quantized_linear():
    mx.random.seed(1)
    base = nn.QuantizedLinear.from_linear(nn.Linear(64, 32), group_size=32, bits=4)
    layer = LoRALinear.from_base(base, rank=4)
    x = mx.random.normal((2, 64))
    assert mx.allclose(layer(x), base(x)).item()
    layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
    deq = layer.fuse(dequantize=True)
    assert isinstance(deq, nn.Linear)
    np.testing.assert_allclose(np.array(deq(x)), np.array(layer(x)), atol=1e-4)


def test_apply_save_and_reload_adapter(tiny_llama, tmp_path):
    model, tok = load(tiny_llama)
    ids = mx.array([[1, 10, 20, 30]])
    before = model(ids)
    modules = apply_lora(model, lora_layers=1, rank=4, alpha=8)
    assert sorted(modules) == sorted(f"model.layers.1.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert mx.allclose(model(ids), before).item()  # step 0 equals the base
    trainable, total = count_parameters(model)
    assert 0 < trainable < total
    for m in lora_modules(model).values():
        m.lora_b = mx.random.normal(m.lora_b.shape) * 0.1
    after = model(ids)
    save_adapter(model, tmp_path / "adapters.npz")
    fresh, _ = load(tiny_llama)
    load_adapter(fresh, tmp_path / "adapters.npz")
    np.testing.assert_allclose(np.array(fresh(ids)), np.array(after), atol=1e-5)


def test_bad_lora_settings(tiny_llama):
    model, _ = load(tiny_llama)
    with pytest.raises(ConfigError, match="--lora-layers 5 is larger"):
        apply_lora(model, lora_layers=5)
    with pytest.raises(ConfigError, match="--rank"):
        apply_lora(model, rank=0)
    with pytest.raises(ConfigError, match="no such linear layer"):
        apply_lora(model, lora_layers=-1, target_modules="nope_proj")
    with pytest.raises(AdapterError):
        load_adapter(model, "/nonexistent/adapters.npz")
