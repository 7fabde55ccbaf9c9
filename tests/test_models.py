"""Loading models: mlxtune.load gives the same logits as transformers, and bad inputs give one clear error.

Checkpoints are tiny random models written by transformers 5 (RoPE settings under `rope_parameters`,
non-default bases), so a base that mlx-lm silently ignores shows up as a logit difference.
"""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlxtune.errors import ModelLoadError
from mlxtune.model_files import normalize_config
from mlxtune.models import load, load_model

from hf_models import ARCHS, TEST_IDS, cached_hf_logits, cached_hf_model

# Every architecture within 1e-4 of transformers; Gemma 1 needs mlxtune's tanh-GELU swap for that
# (mlx-lm's gemma uses exact GELU: ~1.2e-4 on these logits without it).
TOLERANCE: dict[str, float] = {}


def mlx_logits(model, ids):
    return np.array(model(mx.array(np.atleast_2d(ids))).astype(mx.float32))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_load_matches_transformers(arch, tmp_path_factory):
    path = cached_hf_model(tmp_path_factory, arch)
    model, tokenizer = load(path)
    diff = np.abs(mlx_logits(model, TEST_IDS) - cached_hf_logits(path, TEST_IDS)).max()
    assert diff <= TOLERANCE.get(arch, 1e-4), f"{arch}: max abs logit difference {diff:.2e}"
    assert tokenizer.encode("hello world") == tokenizer._tokenizer.encode("hello world")


SCALINGS = {
    "qwen2-yarn": ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                             "rope_theta": 1e6}),
    "llama-linear": ("llama", {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e5}),
    "llama-dynamic": ("llama", {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e5}),
    "mistral-llama3": ("mistral", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                   "rope_theta": 5e5}),
}


@pytest.mark.parametrize("case", list(SCALINGS))
def test_rope_scalings_match_transformers(case, tmp_path_factory):
    arch, rope = SCALINGS[case]
    extra = {"max_position_embeddings": 8} if rope["rope_type"] == "dynamic" else {}  # 12 tokens > 8: scaled
    path = cached_hf_model(tmp_path_factory, arch, rope_parameters=rope, **extra)
    model, _ = load(path)
    assert np.abs(mlx_logits(model, TEST_IDS) - cached_hf_logits(path, TEST_IDS)).max() <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "llama3", "gemma2", "phi3", "gemma3"])
def test_without_normalization_the_logits_differ(arch, tmp_path_factory):
    """Guards the test above: plain mlx-lm on the raw transformers-5 config is measurably wrong."""
    from mlx_lm.utils import load_model as mlx_load_model

    path = cached_hf_model(tmp_path_factory, arch)
    model, _ = mlx_load_model(path)
    if arch == "gemma3":
        # Without the sliding_window_pattern derived from layer_types, mlx-lm assumes its default 6-layer
        # pattern, which does not even fit the 2-layer test model.
        with pytest.raises(IndexError):
            mlx_logits(model, TEST_IDS)
        return
    assert np.abs(mlx_logits(model, TEST_IDS) - cached_hf_logits(path, TEST_IDS)).max() > 1e-3


def test_normalize_config_rope_parameters():
    cfg = normalize_config({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 64}})
    assert cfg["rope_theta"] == 5e5
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_scaling"]["factor"] == 8.0
    assert "rope_theta" not in cfg["rope_scaling"]

    cfg = normalize_config({"rope_parameters": {"rope_type": "default", "rope_theta": 3e4}})
    assert cfg["rope_theta"] == 3e4 and "rope_scaling" not in cfg

    # legacy keys written alongside win
    cfg = normalize_config({"rope_theta": 1.0, "rope_parameters": {"rope_type": "default", "rope_theta": 2.0}})
    assert cfg["rope_theta"] == 1.0


def test_normalize_config_per_layer_type_and_partial_rotary():
    cfg = normalize_config({
        "layer_types": ["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 3 + ["full_attention"],
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}})
    assert cfg["rope_theta"] == 1e6 and cfg["rope_local_base_freq"] == 1e4
    assert cfg["rope_scaling"]["type"] == "linear" and cfg["rope_scaling"]["factor"] == 8.0
    assert cfg["sliding_window_pattern"] == 4
    # an irregular interleave is not a pattern: leave it to the model's own reading of layer_types
    assert "sliding_window_pattern" not in normalize_config({"layer_types": ["full_attention", "sliding_attention",
                                                                             "sliding_attention"]})
    cfg = normalize_config({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}})
    assert cfg["partial_rotary_factor"] == 0.5
    text = normalize_config({"text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}})
    assert text["text_config"]["rope_theta"] == 7.0


def test_load_model_returns_normalized_config(tmp_path_factory):
    loaded = load_model(cached_hf_model(tmp_path_factory, "llama3"))
    assert loaded.config["rope_theta"] == 500_000.0
    assert loaded.config["rope_scaling"]["rope_type"] == "llama3"


# ---------------------------------------------------------------- errors


@pytest.fixture
def model_copy(tmp_path, tmp_path_factory):
    dst = tmp_path / "m"
    shutil.copytree(cached_hf_model(tmp_path_factory, "llama"), dst)
    return dst


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load(tmp_path / "nope")


def test_missing_config(model_copy):
    (model_copy / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load(model_copy)


def test_unknown_architecture_lists_supported(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    (model_copy / "config.json").write_text(json.dumps(dict(cfg, model_type="not_a_model")))
    with pytest.raises(ModelLoadError, match=r"'not_a_model'.*not supported.*supported: .*llama"):
        load(model_copy)


def test_corrupt_safetensors(model_copy):
    (model_copy / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="not a valid safetensors"):
        load(model_copy)


def test_missing_tokenizer(model_copy):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_copy / name).unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        load(model_copy)


def test_offline_hub_id(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path), raising=False)
    with pytest.raises(ModelLoadError, match="offline|cannot be reached|could not fetch"):
        load("nobody-xyz/no-such-model-xyz")
