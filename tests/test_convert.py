"""mlxtune convert: fidelity against transformers per architecture, quantization, streaming output, errors.

Float bounds are stated relative to the logit scale in units of the output dtype's unit roundoff u
(float16: 2^-11, bfloat16: 2^-8): every weight and every intermediate is rounded once or a few times
on the way to the logits of these 2-block models, and the measured error is 1-2 u; 4 u leaves margin
while a real mistake (a dropped norm, a wrong cast) is of order 1. Quantized models are held to
top-1 agreement and mean KL(transformers || mlx) bounds; the measured numbers per architecture are in
docs/benchmarks.md (`python benchmarks/convert.py --fidelity`).
"""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxtune.conversion import convert, dequantize_model_dir
from mlxtune.errors import ConfigError, MlxtuneError, ModelLoadError

from hf_models import ARCHS, TEST_IDS, cached_hf_logits, cached_hf_model

# These logits come from plain mlx_lm.load, whose gemma uses exact GELU where transformers uses the tanh
# approximation (~1.2e-4 here); mlxtune.load swaps in tanh GELU and meets 1e-4 (tests/test_models.py).
FLOAT32_TOL = {"gemma": 5e-4}
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}
QUANT_BOUNDS = {4: dict(top1=0.7, kl=0.2), 8: dict(top1=0.95, kl=1e-3)}  # (group size 32 / 64 below)

BATCH = np.random.default_rng(0).integers(6, 400, size=(2, 24))


def logits(path, ids):
    import mlx_lm

    model, _ = mlx_lm.load(str(path))  # plain mlx-lm: the output must not need mlxtune to load
    return np.array(model(mx.array(np.atleast_2d(ids))).astype(mx.float32))


def log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def quant_stats(ref, out):
    lp, lq = log_softmax(ref), log_softmax(out)
    kl = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    return float((ref.argmax(-1) == out.argmax(-1)).mean()), kl


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """convert(arch, **settings) once per module."""
    cache = {}

    def get(arch, **kw):
        key = (arch, json.dumps(kw, sort_keys=True))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"mlx_{arch}") / "m"
            convert(cached_hf_model(tmp_path_factory, arch), out, progress=False, **kw)
            cache[key] = out
        return cache[key]

    return get


# ---------------------------------------------------------------- fidelity per architecture


@pytest.mark.parametrize("arch", list(ARCHS))
def test_float32_matches_transformers(arch, converted, tmp_path_factory):
    ref = cached_hf_logits(cached_hf_model(tmp_path_factory, arch), TEST_IDS)
    out = logits(converted(arch, dtype="float32"), TEST_IDS)
    assert np.abs(out - ref).max() <= FLOAT32_TOL.get(arch, 1e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_half_precision_within_roundoff(arch, dtype, converted, tmp_path_factory):
    path = converted(arch, dtype=dtype)
    assert all(v.dtype == getattr(mx, dtype) for v in mx.load(str(path / "model.safetensors")).values())
    ref = cached_hf_logits(cached_hf_model(tmp_path_factory, arch), BATCH)
    out = logits(path, BATCH)
    bound = 4 * UNIT_ROUNDOFF[dtype] * np.abs(ref).max()
    assert np.abs(out - ref).max() <= bound
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 64)])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_quantized_top1_and_kl(arch, bits, group, converted, tmp_path_factory):
    path = converted(arch, quantize=True, q_bits=bits, q_group_size=group, dtype="float32")
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"] == {"group_size": group, "bits": bits, "mode": "affine"}
    ref = cached_hf_logits(cached_hf_model(tmp_path_factory, arch), BATCH)
    top1, kl = quant_stats(ref, logits(path, BATCH))
    print(f"{arch} q{bits}: top-1 {top1:.3f}, mean KL {kl:.2e}")
    assert top1 >= QUANT_BOUNDS[bits]["top1"] and kl <= QUANT_BOUNDS[bits]["kl"]


def test_more_bits_is_closer(converted, tmp_path_factory):
    """The quantization error shrinks with bits, so a wrongly-applied bits setting shows."""
    ref = cached_hf_logits(cached_hf_model(tmp_path_factory, "llama"), BATCH)
    kls = [quant_stats(ref, logits(converted("llama", quantize=True, q_bits=b, q_group_size=64), BATCH))[1]
           for b in (3, 4, 8)]
    assert kls[0] > kls[1] > kls[2]


# ---------------------------------------------------------------- quantization details


def test_dequantize_round_trip(converted, tmp_path, tmp_path_factory):
    """Quantize -> de-quantize gives every weight back within one quantization step of its group."""
    hf = cached_hf_model(tmp_path_factory, "qwen2")
    q = converted("qwen2", quantize=True, q_bits=4, q_group_size=64, dtype="float32")
    out = dequantize_model_dir(q, tmp_path / "dq", progress=False)
    assert out.quantization is None and out.bits_per_weight == 32
    config = json.loads((tmp_path / "dq" / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config

    orig = mx.load(str(hf / "model.safetensors"))
    qw = mx.load(str(q / "model.safetensors"))
    back = mx.load(str(tmp_path / "dq" / "model.safetensors"))
    assert set(back) == set(orig) - {"lm_head.weight"}  # tied embeddings: no separate head
    checked = 0
    for name, w in orig.items():
        if name not in back:
            continue
        p = name[: -len(".weight")]
        if f"{p}.scales" in qw:
            err = np.abs(np.array(back[name]) - np.array(w)).reshape(w.shape[0], -1, 64)
            # MLX snaps the group's edge value to the grid (scales may be negative), so an element can
            # sit up to one step (not half) from its code: the bound is |scale| per group
            step = np.abs(np.array(qw[f"{p}.scales"]))[..., None]
            assert (err <= step * 1.001 + 1e-6).all(), name
            assert err.max() > 0  # it really was quantized
            checked += 1
        else:
            np.testing.assert_array_equal(np.array(back[name]), np.array(w))
    assert checked == 15  # 7 linears x 2 blocks + embeddings
    # the float model computes exactly what the quantized one did
    np.testing.assert_allclose(logits(tmp_path / "dq", TEST_IDS), logits(q, TEST_IDS), atol=1e-4)


def test_requantize_a_quantized_model(converted, tmp_path):
    q4 = converted("llama", quantize=True, q_bits=4, q_group_size=64)
    result = convert(q4, tmp_path / "q8", quantize=True, q_bits=8, progress=False)
    assert result.quantization["bits"] == 8
    assert json.loads((tmp_path / "q8" / "config.json").read_text())["quantization"]["bits"] == 8
    with pytest.raises(ConfigError, match="already quantized.*--de-quantize"):
        convert(q4, tmp_path / "again", progress=False)


def test_non_divisible_and_kept_layers_stay_float(tmp_path, tmp_path_factory):
    hf = cached_hf_model(tmp_path_factory, "llama")
    # group 128: only down_proj (input 128) can be quantized in this hidden-64 model
    r = convert(hf, tmp_path / "g128", quantize=True, q_group_size=128, progress=False)
    assert "model.layers.0.self_attn.q_proj" in r.float_layers
    assert "not divisible by group size 128" in r.float_layers["model.layers.0.self_attn.q_proj"]
    assert not any("down_proj" in p for p in r.float_layers)
    w = mx.load(str(tmp_path / "g128" / "model.safetensors"))
    assert "model.layers.0.mlp.down_proj.scales" in w and "model.layers.0.self_attn.q_proj.scales" not in w
    assert "model.layers.0.self_attn.q_proj" in (tmp_path / "g128" / "README.md").read_text()

    r = convert(hf, tmp_path / "keep", quantize=True, keep_modules="lm_head,embed_tokens", progress=False)
    assert set(r.float_layers) == {"lm_head", "model.embed_tokens"}
    r2 = convert(hf, tmp_path / "recipe", quantize=True, keep_modules=["embeddings"], progress=False)
    assert set(r2.float_layers) == {"lm_head", "model.embed_tokens"}
    r3 = convert(hf, tmp_path / "all", quantize=True, progress=False)
    # bits per weight: what is written over the parameter count; keeping the edges costs bits
    assert r3.bits_per_weight < r.bits_per_weight < 32
    file = tmp_path / "all" / "model.safetensors"
    header = 8 + int.from_bytes(file.read_bytes()[:8], "little")
    assert r3.bits_per_weight * r3.num_parameters / 8 == pytest.approx(file.stat().st_size - header)
    for d in ("g128", "keep"):
        logits(tmp_path / d, TEST_IDS)  # mixed float/quantized directories load in mlx-lm


# ---------------------------------------------------------------- the output directory


def test_output_layout_and_loads_in_mlxtune(converted, tmp_path_factory):
    from mlxtune.layers import apply_lora
    from mlxtune.models import load_model

    hf = cached_hf_model(tmp_path_factory, "qwen3")
    out = converted("qwen3", quantize=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (hf / name).read_bytes(), name
    readme = (out / "README.md").read_text()
    assert str(hf) in readme and "4 bits, group size 64" in readme and "bits per weight" in readme
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    assert set(index["weight_map"]) == set(mx.load(str(out / "model.safetensors")))
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 1_000_000.0  # normalized, so plain mlx-lm gets the right base

    loaded = load_model(out)
    assert loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) \
        .startswith("<|im_start|>user\nhi")
    apply_lora(loaded.model, lora_layers=2, rank=4)
    x = mx.array([TEST_IDS])
    loss_grad = nn.value_and_grad(loaded.model, lambda: loaded.model(x).astype(mx.float32).square().mean())
    _, grads = loss_grad()
    names = [k for k, _ in tree_flatten(grads)]
    assert names and all("lora_" in k for k in names)  # only the adapter trains on a quantized base


def test_shards_and_index(tmp_path, tmp_path_factory):
    hf = cached_hf_model(tmp_path_factory, "llama")
    r = convert(hf, tmp_path / "s", shard_bytes=150_000, progress=False)
    assert len(r.shards) > 2 and r.shards[0] == f"model-00001-of-{len(r.shards):05d}.safetensors"
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == r.shards
    assert index["metadata"]["total_size"] == r.total_bytes
    for shard in r.shards:
        names = set(mx.load(str(tmp_path / "s" / shard)))
        assert names == {k for k, v in index["weight_map"].items() if v == shard}
    ref = cached_hf_logits(hf, TEST_IDS)
    assert np.abs(logits(tmp_path / "s", TEST_IDS) - ref).max() <= 1e-4


def test_default_dtype_is_the_checkpoints(tmp_path):
    from hf_models import make_hf_model

    hf = make_hf_model(tmp_path / "hf", "llama", dtype="bfloat16", num_hidden_layers=1)
    r = convert(hf, tmp_path / "out", progress=False)
    assert r.dtype == "bfloat16"
    assert {v.dtype for v in mx.load(str(tmp_path / "out" / "model.safetensors")).values()} == {mx.bfloat16}


def test_bin_checkpoint_needs_the_flag(tmp_path, tmp_path_factory):
    import torch

    hf = tmp_path / "bin"
    shutil.copytree(cached_hf_model(tmp_path_factory, "llama"), hf)
    state = {k: torch.from_numpy(np.array(v)) for k, v in mx.load(str(hf / "model.safetensors")).items()}
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.bfloat16)  # bf16 goes through too
    torch.save(state, hf / "pytorch_model.bin")
    (hf / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="--allow-bin"):
        convert(hf, tmp_path / "out", progress=False)
    convert(hf, tmp_path / "out", allow_bin=True, dtype="float32", progress=False)
    out = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert set(out) == set(state)
    for k, t in state.items():  # every tensor bit for bit (the bf16 one exactly upcast)
        np.testing.assert_array_equal(np.array(out[k]), t.float().numpy(), err_msg=k)
    logits(tmp_path / "out", TEST_IDS)

    torch.save({"w": torch.zeros(2), "evil": object()}, hf / "pytorch_model.bin")  # needs full pickle
    with pytest.raises(ModelLoadError, match="weights-only"):
        convert(hf, tmp_path / "out2", allow_bin=True, progress=False)


# ---------------------------------------------------------------- overwrite and atomicity


def test_refuses_existing_output_and_force_replaces(tmp_path, tmp_path_factory):
    hf = cached_hf_model(tmp_path_factory, "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(MlxtuneError, match="already exists.*--force"):
        convert(hf, out, progress=False)
    assert (out / "mine.txt").read_text() == "keep me"
    convert(hf, out, force=True, progress=False)
    assert (out / "model.safetensors").exists() and not (out / "mine.txt").exists()


def test_interrupted_run_leaves_nothing(tmp_path, tmp_path_factory, monkeypatch):
    import mlxtune.weights as weights

    hf = cached_hf_model(tmp_path_factory, "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("old")
    real = weights.write_file

    def write_then_fail(path, tensors, bar):
        real(path, tensors, bar)
        raise KeyboardInterrupt

    monkeypatch.setattr(weights, "write_file", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        convert(hf, out, force=True, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp directory left behind
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


# ---------------------------------------------------------------- bad input


@pytest.fixture
def hf_copy(tmp_path, tmp_path_factory):
    dst = tmp_path / "hf"
    shutil.copytree(cached_hf_model(tmp_path_factory, "llama"), dst)
    return dst


def test_missing_config(hf_copy, tmp_path):
    (hf_copy / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        convert(hf_copy, tmp_path / "out", progress=False)


def test_unknown_architecture(hf_copy, tmp_path):
    cfg = json.loads((hf_copy / "config.json").read_text())
    (hf_copy / "config.json").write_text(json.dumps(dict(cfg, model_type="made_up")))
    with pytest.raises(ModelLoadError, match="'made_up'.*supported: .*gemma2.*llama.*qwen2"):
        convert(hf_copy, tmp_path / "out", progress=False)


def test_mismatched_shapes(hf_copy, tmp_path):
    w = dict(mx.load(str(hf_copy / "model.safetensors")))
    w["model.layers.1.self_attn.k_proj.weight"] = mx.zeros((16, 64))
    mx.save_safetensors(str(hf_copy / "model.safetensors"), w)
    with pytest.raises(ModelLoadError, match=r"k_proj.weight in .*model.safetensors has shape \(16, 64\).*\(32, 64\)"):
        convert(hf_copy, tmp_path / "out", progress=False)
    del w["model.layers.1.self_attn.k_proj.weight"]
    mx.save_safetensors(str(hf_copy / "model.safetensors"), w)
    with pytest.raises(ModelLoadError, match="missing tensors model.layers.1.self_attn.k_proj.weight"):
        convert(hf_copy, tmp_path / "out", progress=False)


def test_corrupt_safetensors_header(hf_copy, tmp_path):
    data = (hf_copy / "model.safetensors").read_bytes()
    (hf_copy / "model.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(ModelLoadError, match="model.safetensors.*not a valid safetensors"):
        convert(hf_copy, tmp_path / "out", progress=False)


def test_unwritable_output(hf_copy, tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(MlxtuneError, match="cannot write"):
        convert(hf_copy, tmp_path / "a_file" / "out", progress=False)


def test_bad_settings(hf_copy, tmp_path):
    with pytest.raises(ConfigError, match="--q-group-size 48"):
        convert(hf_copy, tmp_path / "o", quantize=True, q_group_size=48)
    with pytest.raises(ConfigError, match="--dtype float8"):
        convert(hf_copy, tmp_path / "o", dtype="float8")
    with pytest.raises(ConfigError, match="either"):
        convert(hf_copy, tmp_path / "o", quantize=True, dequantize=True)
    with pytest.raises(ConfigError, match="--keep-modules only applies when quantizing"):
        convert(hf_copy, tmp_path / "o", keep_modules="lm_head")
    with pytest.raises(ConfigError, match="is the input model"):
        convert(hf_copy, hf_copy, force=True)


def test_cli_one_line_errors_and_success(hf_copy, tmp_path, capsys, monkeypatch):
    from mlxtune.cli import run

    def cli(*args):
        try:
            run(["convert", *args])
            return 0
        except SystemExit as e:
            return e.code or 0

    monkeypatch.setenv("MLXTUNE_NO_OPENBLAS", "1")
    out = tmp_path / "cli_out"
    assert cli("--hf-path", str(hf_copy), "--mlx-path", str(out), "-q", "--q-group-size", "128") == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "bits per weight" in printed and "kept in float" in printed
    assert cli("--hf-path", str(hf_copy), "--mlx-path", str(out)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--force" in err[0]


@pytest.mark.parametrize("arch,flags", [("phi3", dict(dtype="float16")),
                                        ("gemma2", dict(quantize=True, q_bits=4, q_group_size=64))])
def test_same_tensors_as_mlx_lm_convert(arch, flags, tmp_path, tmp_path_factory):
    """Streaming changes how, not what: names, dtypes and values equal mlx_lm.convert's, bit for bit."""
    from mlx_lm import convert as mlx_lm_convert

    import mlxtune

    hf = cached_hf_model(tmp_path_factory, arch)
    mlx_lm_convert(str(hf), str(tmp_path / "theirs"), **flags)
    mlxtune.convert(hf, tmp_path / "ours", progress=False, **flags)
    theirs, ours = mx.load(str(tmp_path / "theirs" / "model.safetensors")), mx.load(str(tmp_path / "ours" / "model.safetensors"))
    assert set(ours) == set(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype, k
        assert mx.array_equal(ours[k], theirs[k]).item(), k
    assert json.loads((tmp_path / "ours" / "config.json").read_text()).get("quantization") == \
        json.loads((tmp_path / "theirs" / "config.json").read_text()).get("quantization")


def test_dequantize_an_mlx_lm_quantized_model(tmp_path, tmp_path_factory):
    """A model quantized by mlx-lm (as on mlx-community) comes back as mlx-lm's own de-quantize gives it."""
    from mlx_lm import convert as mlx_lm_convert

    hf = cached_hf_model(tmp_path_factory, "mistral")
    mlx_lm_convert(str(hf), str(tmp_path / "q"), quantize=True, q_bits=8, q_group_size=32)
    mlx_lm_convert(str(tmp_path / "q"), str(tmp_path / "theirs"), dequantize=True)
    dequantize_model_dir(tmp_path / "q", tmp_path / "ours", progress=False)
    theirs, ours = mx.load(str(tmp_path / "theirs" / "model.safetensors")), mx.load(str(tmp_path / "ours" / "model.safetensors"))
    assert set(ours) == set(theirs) and not any(k.endswith(".scales") for k in ours)
    for k in theirs:
        assert mx.array_equal(ours[k], theirs[k]).item(), k
