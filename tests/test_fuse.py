"""mlxtune fuse: checked merges of float and 4-bit bases, re-quantization measurement, atomic output."""

import importlib
import json
import shutil
import warnings

import mlx.core as mx
import numpy as np
import pytest

from mlxtune.adapters import save_adapter
from mlxtune.errors import AdapterError, ExportError, MlxtuneError
from mlxtune.fusion import RequantizationWarning, fuse
from mlxtune.layers import apply_lora, lora_modules
from mlxtune.models import load

from tiny import make_tiny_model

IDS = mx.array([[1, 17, 42, 99, 7, 256, 300, 12, 5, 88]])


def make_adapter(base, out, *, b_scale=0.1, lora_layers=-1, seed=0, targets=None, base_name=None):
    """A LoRA adapter on `base` with random (non-zero) B; returns (adapter file, base+adapter logits)."""
    model, _ = load(base)
    mx.random.seed(seed)
    apply_lora(model, lora_layers=lora_layers, rank=4, alpha=8, target_modules=targets)
    for m in lora_modules(model).values():
        m.lora_b = mx.random.normal(m.lora_b.shape) * b_scale
    file = save_adapter(model, out / "adapters.npz", base_model=str(base) if base_name is None else base_name)
    return file, np.array(model(IDS).astype(mx.float32))


def make_quantized(src, dst, bits=4, group_size=32):
    """A 4-bit float16 copy of `src`, made the way users make one (mlxtune convert -q)."""
    from mlxtune.conversion import convert

    convert(src, dst, quantize=True, q_bits=bits, q_group_size=group_size, dtype="float16", progress=False)
    return dst


@pytest.fixture(scope="module")
def q4_base(tiny_llama, tmp_path_factory):
    return make_quantized(tiny_llama, tmp_path_factory.mktemp("q4") / "q4")


def logits(path, adapter=None):
    model, _ = load(path, adapter_file=adapter)
    return np.array(model(IDS).astype(mx.float32))


def test_fuse_float_base_matches_base_plus_adapter_and_loads_everywhere(tiny_llama, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, expected = make_adapter(tiny_llama, tmp_path / "ad")
    out = tmp_path / "fused"
    result = fuse(tiny_llama, adapter, out, max_shard_size=200_000)  # small shards: exercise the index

    assert result.parity is not None and result.parity <= 1e-4 and result.reload_diff == 0.0
    assert result.dtype == "float32" and not result.quantized_base
    # mlx-lm / mlxtune load it, and it answers like base+adapter, not like the base
    fused = logits(out)
    np.testing.assert_allclose(fused, expected, atol=1e-4)
    assert np.abs(fused - logits(tiny_llama)).max() > 1e-2
    # sharded safetensors with an index naming every tensor
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    # mlx-lm's own loader too
    import mlx_lm

    lm, _ = mlx_lm.load(str(out))
    np.testing.assert_allclose(np.array(lm(IDS)), expected, atol=1e-4)
    # transformers loads the same directory and agrees
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        hf_logits = hf(torch.tensor(np.array(IDS))).logits.numpy()
    np.testing.assert_allclose(hf_logits, expected, atol=1e-4)
    # tokenizer and chat template came along; README states base, adapter and settings
    tok = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    readme = (out / "README.md").read_text()
    assert str(tiny_llama) in readme and str(adapter) in readme and "rank / alpha / scale | 4 / 8 / 2" in readme
    assert "quantization" not in json.loads((out / "config.json").read_text())


def test_fuse_4bit_base_de_quantized_is_float16_and_exact(q4_base, tmp_path):
    adapter, expected = make_adapter(q4_base, tmp_path / "ad")
    out = tmp_path / "fused"
    result = fuse(q4_base, adapter, out, de_quantize=True)

    assert result.quantized_base and result.de_quantized and result.dtype == "float16"
    assert result.parity <= 1e-4  # judged in float32, before the float16 cast
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    assert config["torch_dtype"] == "float16"
    weights = mx.load(str(out / "model.safetensors"))
    assert not any(k.endswith((".scales", ".biases")) for k in weights)
    assert {v.dtype for v in weights.values()} == {mx.float16}
    np.testing.assert_allclose(logits(out), expected, atol=5e-2)  # float16 storage


def test_fuse_4bit_base_requantized_keeps_a_large_update_without_warning(q4_base, tmp_path):
    adapter, _ = make_adapter(q4_base, tmp_path / "ad", b_scale=0.5)
    out = tmp_path / "fused"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RequantizationWarning)
        result = fuse(q4_base, adapter, out)
    assert result.requantized and result.mean_kept > 0.8 and len(result.layers) == 8
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    assert any(k.endswith(".scales") for k in mx.load(str(out / "model.safetensors")))
    assert np.abs(logits(out) - logits(q4_base)).max() > 1e-2  # the fine-tune is in there


def test_fuse_4bit_base_warns_when_requantization_erases_a_tiny_update(q4_base, tmp_path):
    adapter, _ = make_adapter(q4_base, tmp_path / "ad", b_scale=1e-4)
    with pytest.warns(RequantizationWarning, match=r"keeps only \d+% .*--de-quantize") as record:
        result = fuse(q4_base, adapter, tmp_path / "fused")
    assert result.mean_kept < 0.5
    assert "worst: model.layers." in str(record[0].message)


def test_cli_fuse_prints_warning_and_summary(q4_base, tmp_path, capsys):
    from mlxtune.cli import run

    adapter, _ = make_adapter(q4_base, tmp_path / "ad", b_scale=1e-4)
    try:
        run(["fuse", "--model", str(q4_base), "--adapter-file", str(adapter.parent), "--save-path", str(tmp_path / "o")])
    except SystemExit as e:
        assert e.code in (None, 0)
    captured = capsys.readouterr()
    assert "warning: re-quantizing the fused weights keeps only" in captured.err
    assert "Re-quantized with the base's settings; share of each update kept: mean" in captured.out
    assert f"Saved 4-bit (float16 scales) model to {tmp_path / 'o'}" in captured.out
    assert (tmp_path / "o" / "config.json").exists()


def test_mismatched_adapters_are_clear_errors(tiny_llama, tmp_path):
    # another architecture size: shapes differ
    other = make_tiny_model(tmp_path / "wide", hidden_size=32, intermediate_size=64)
    wrong_shape, _ = make_adapter(other, tmp_path / "a1", base_name=str(tiny_llama))
    with pytest.raises(AdapterError, match=r"does not fit this model: .*lora_a \(32, 4\).*needs \(64, 4\)"):
        fuse(tiny_llama, wrong_shape, tmp_path / "o1")
    # more layers than the base has: module names differ
    deep = make_tiny_model(tmp_path / "deep", num_layers=4)
    wrong_names, _ = make_adapter(deep, tmp_path / "a2", base_name=str(tiny_llama))
    with pytest.raises(AdapterError, match=r"model.layers.[23].* is not a linear layer of this model"):
        fuse(tiny_llama, wrong_names, tmp_path / "o2")
    # recorded for another base: refused unless asked, then names and shapes still decide
    same_shape, expected = make_adapter(tiny_llama, tmp_path / "a3", base_name="org/some-other-model")
    with pytest.raises(AdapterError, match=r"trained on 'org/some-other-model'.*--ignore-base-name"):
        fuse(tiny_llama, same_shape, tmp_path / "o3")
    fuse(tiny_llama, same_shape, tmp_path / "o3", ignore_base_name=True)
    np.testing.assert_allclose(logits(tmp_path / "o3"), expected, atol=1e-4)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    # the CLI: one line, exit 1
    from mlxtune.cli import run

    with pytest.raises(SystemExit) as exit_:
        run(["fuse", "--model", str(tiny_llama), "--adapter-file", str(wrong_shape), "--save-path", str(tmp_path / "o4")])
    assert exit_.value.code == 1


def test_interrupted_write_leaves_no_partial_output_and_keeps_the_old_one(tiny_llama, tmp_path, monkeypatch):
    fuse_mod = importlib.import_module("mlxtune.fusion")  # mlxtune.fuse is the function

    adapter, _ = make_adapter(tiny_llama, tmp_path / "ad")
    out = tmp_path / "fused"
    real_save = fuse_mod.save_weights

    def crash_after_writing(tmp, model, **kw):
        real_save(tmp, model, **kw)
        assert any(tmp.glob("*.safetensors"))  # the crash really is mid-write
        raise KeyboardInterrupt

    monkeypatch.setattr(fuse_mod, "save_weights", crash_after_writing)
    with pytest.raises(KeyboardInterrupt):
        fuse(tiny_llama, adapter, out)
    assert list(tmp_path.glob("*fused*")) == []  # neither the output nor a temp dir

    monkeypatch.setattr(fuse_mod, "save_weights", real_save)
    fuse(tiny_llama, adapter, out)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    monkeypatch.setattr(fuse_mod, "save_weights", crash_after_writing)
    with pytest.raises(KeyboardInterrupt):
        fuse(tiny_llama, adapter, out, force=True)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert [p.name for p in tmp_path.glob("*fused*")] == ["fused"]
    with pytest.raises(MlxtuneError, match="already exists.*--force"):
        fuse(tiny_llama, adapter, out)


def test_zero_update_warns_that_fused_equals_base(tiny_llama, tmp_path):
    adapter, _ = make_adapter(tiny_llama, tmp_path / "ad", b_scale=0.0)
    with pytest.warns(RequantizationWarning, match="update is zero"):
        fuse(tiny_llama, adapter, tmp_path / "fused")


def test_parity_failure_writes_nothing(tiny_llama, tmp_path, monkeypatch):
    fuse_mod = importlib.import_module("mlxtune.fusion")  # mlxtune.fuse is the function

    adapter, _ = make_adapter(tiny_llama, tmp_path / "ad")
    real_merge = fuse_mod.merge_layers

    def bad_merge(model, **kw):  # a merge that forgets the scale: the kind of bug verify is for
        for m in lora_modules(model).values():
            m.scale = m.scale * 2
        return real_merge(model, **kw)

    monkeypatch.setattr(fuse_mod, "merge_layers", bad_merge)
    with pytest.raises(ExportError, match="differs from base\\+adapter"):
        fuse(tiny_llama, adapter, tmp_path / "fused")
    assert not (tmp_path / "fused").exists()


def test_fuse_reads_an_adapter_written_by_mlx_lm(tiny_llama, tmp_path):
    """mlx-lm's own LoRA layers and adapter files (adapters.safetensors + lora_parameters) fuse exactly."""
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(tiny_llama)
    model.freeze()
    params = {"rank": 4, "scale": 3.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "mlp.down_proj"]}
    linear_to_lora_layers(model, 1, params)
    mx.random.seed(3)
    for name, p in tree_flatten(model.trainable_parameters()):
        if name.endswith("lora_b"):
            model.update(tree_unflatten([(name, mx.random.normal(p.shape) * 0.2)]))
    expected = np.array(model(IDS))
    assert np.abs(expected - logits(tiny_llama)).max() > 1e-2  # the adapter changes the model
    ad = tmp_path / "adapters"
    ad.mkdir()
    mx.save_safetensors(str(ad / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (ad / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": params, "model": str(tiny_llama)}))
    result = fuse(tiny_llama, ad, tmp_path / "fused")
    assert result.adapter.format == "mlx-lm" and result.adapter.scale == 3.0
    assert sorted(result.adapter.modules) == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    np.testing.assert_allclose(logits(tmp_path / "fused"), expected, atol=1e-4)


def test_fuse_then_gguf_holds_the_fused_weights(tiny_llama, tmp_path):
    from gguf import GGUFReader

    adapter, _ = make_adapter(tiny_llama, tmp_path / "ad")
    gguf_file = tmp_path / "model.gguf"
    result = fuse(tiny_llama, adapter, tmp_path / "fused", gguf=gguf_file, gguf_type="f32", log=lambda _: None)
    assert result.gguf == gguf_file
    fused = mx.load(str(tmp_path / "fused" / "model.safetensors"))
    base = mx.load(str(tiny_llama / "model.safetensors"))
    tensors = {t.name: t for t in GGUFReader(gguf_file).tensors}
    v = np.array(tensors["blk.1.attn_v.weight"].data).reshape(fused["model.layers.1.self_attn.v_proj.weight"].shape)
    np.testing.assert_array_equal(v, np.array(fused["model.layers.1.self_attn.v_proj.weight"]))
    assert np.abs(v - np.array(base["model.layers.1.self_attn.v_proj.weight"])).max() > 1e-3  # merged, not base
    # an existing GGUF file is refused before any work is done
    with pytest.raises(ExportError, match="already exists"):
        fuse(tiny_llama, adapter, tmp_path / "fused2", gguf=gguf_file)
    assert not (tmp_path / "fused2").exists()


def test_without_verify_a_write_that_lost_the_weights_is_still_caught(tiny_llama, tmp_path, monkeypatch):
    """The classic loss: a merge that saves only a config. check_saved reads the shard headers back."""
    fuse_mod = importlib.import_module("mlxtune.fusion")
    adapter, expected = make_adapter(tiny_llama, tmp_path / "ad")
    result = fuse(tiny_llama, adapter, tmp_path / "ok", verify=False)
    assert result.parity is None and result.reload_diff is None
    np.testing.assert_allclose(logits(tmp_path / "ok"), expected, atol=1e-4)

    real_save = fuse_mod.save_weights

    def forgets_a_tensor(tmp, model, **kw):
        real_save(tmp, model, **kw)
        (tmp / "model.safetensors").unlink()
        mx.save_safetensors(str(tmp / "model.safetensors"), {"lm_head.weight": mx.zeros((2, 2))})

    monkeypatch.setattr(fuse_mod, "save_weights", forgets_a_tensor)
    for verify in (False, True):
        with pytest.raises(ExportError, match="writing the fused model failed: .* is missing or has the wrong shape"):
            fuse(tiny_llama, adapter, tmp_path / "bad", verify=verify)
        assert not (tmp_path / "bad").exists()


def test_bfloat16_output_measures_and_warns_about_a_rounded_away_update(tiny_llama, tmp_path):
    adapter, _ = make_adapter(tiny_llama, tmp_path / "ad", b_scale=1e-4)
    with pytest.warns(RequantizationWarning, match=r"storing the fused weights as bfloat16 keeps only .*--dtype float32"):
        result = fuse(tiny_llama, adapter, tmp_path / "bf16", dtype="bfloat16")
    assert result.dtype == "bfloat16" and result.mean_kept < 0.5
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {v.dtype for v in mx.load(str(tmp_path / "bf16" / "model.safetensors")).values()} == {mx.bfloat16}
    with warnings.catch_warnings():  # the same tiny update survives in float32
        warnings.simplefilter("error", RequantizationWarning)
        assert fuse(tiny_llama, adapter, tmp_path / "f32").mean_kept > 0.99


def test_whole_path_qlora_train_then_fuse_de_quantized_then_gguf(q4_base, tmp_path, monkeypatch):
    """convert -q -> lora (QLoRA) -> fuse --de-quantize --gguf: the fine-tune reaches the fused model and GGUF."""
    from gguf import GGUFReader

    import mlxtune

    monkeypatch.setenv("MLXTUNE_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    data.mkdir()
    rows = [json.dumps({"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w.upper()}]})
            for w in ["fox", "dog", "cat", "table", "users", "timer", "hello", "quick"] * 3]
    for name in ("train", "valid"):
        (data / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    trained = mlxtune.lora(str(q4_base), str(data), iters=2, batch_size=2, learning_rate=1e-2, lora_layers=2,
                           steps_per_eval=0, plot=False, adapter_file=str(tmp_path / "adapters" / "adapters.npz"),
                           verbose=False)
    expected = logits(q4_base, trained.adapter_file)
    assert np.abs(expected - logits(q4_base)).max() > 1e-3  # training moved the model

    result = mlxtune.fuse(q4_base, trained.adapter_file, tmp_path / "fused", de_quantize=True,
                          gguf=tmp_path / "model.gguf", log=lambda _: None)
    assert result.parity <= 1e-4 and result.dtype == "float16"
    np.testing.assert_allclose(logits(tmp_path / "fused"), expected, atol=5e-2)
    names = {t.name for t in GGUFReader(tmp_path / "model.gguf").tensors}
    assert {"token_embd.weight", "blk.0.attn_q.weight", "blk.1.attn_output.weight"} <= names


def test_save_path_may_not_replace_the_base_or_the_adapter_even_with_force(tiny_llama, tmp_path):
    base = tmp_path / "models" / "base"
    shutil.copytree(tiny_llama, base)
    adapter, _ = make_adapter(base, tmp_path / "ad")
    before = sorted(p.name for p in base.iterdir())
    for target, what in [(base, "base model"), (tmp_path / "models", "base model"), (tmp_path / "ad", "adapter")]:
        with pytest.raises(ExportError, match=f"would replace the {what}"):
            fuse(base, adapter, target, force=True)
    assert sorted(p.name for p in base.iterdir()) == before and adapter.exists()
