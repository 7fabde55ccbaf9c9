"""Adapter interop: PEFT export/import checked against peft itself on transformers models, and adapter info."""

import json

import mlx.core as mx
import numpy as np
import pytest

import mlxtune
from mlxtune.adapters import adapter_info, export_peft, import_peft, read_peft, save_adapter
from mlxtune.errors import AdapterError
from mlxtune.fusion import fuse
from mlxtune.layers import apply_lora, lora_modules
from mlxtune.models import load

from hf_models import TEST_IDS, make_hf_model

IDS = np.array([TEST_IDS])


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Transformers-written tiny checkpoints, built once per architecture."""
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = make_hf_model(tmp_path_factory.mktemp(arch) / arch, arch)
        return cache[arch]

    return get


def mlx_logits(model_dir, adapter=None):
    model, _ = load(model_dir, adapter_file=adapter)
    return np.array(model(mx.array(IDS)).astype(mx.float32))


def torch_model(model_dir, peft_dir=None):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    if peft_dir is not None:
        model = PeftModel.from_pretrained(model, peft_dir)
    return model.eval()


def torch_logits(model):
    import torch

    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.float().numpy()


def trained_adapter(base, out, *, lora_layers=-1, targets="all-linear", modules=None, seed=0):
    model, _ = load(base)
    mx.random.seed(seed)
    apply_lora(model, lora_layers=lora_layers, rank=4, alpha=8, target_modules=targets, modules=modules)
    for m in lora_modules(model).values():
        m.lora_b = mx.random.normal(m.lora_b.shape) * 0.2
    return save_adapter(model, out / "adapters.npz", base_model=str(base))


@pytest.mark.parametrize("arch,lora_layers,targets", [
    ("llama", -1, "all-linear"),  # every linear of every block
    ("qwen2", 1, "attention"),  # biased q/k/v, last block only: layers_to_transform
    ("phi3", -1, "all-linear"),  # fused qkv_proj and gate_up_proj
])
def test_export_to_peft_matches_mlxtune_and_imports_back_exactly(hf_dirs, tmp_path, arch, lora_layers, targets):
    base = hf_dirs(arch)
    adapter = trained_adapter(base, tmp_path / "ad", lora_layers=lora_layers, targets=targets)
    ours = mlx_logits(base, adapter)
    assert np.abs(ours - mlx_logits(base)).max() > 1e-2  # the adapter does something

    peft_dir = export_peft(adapter, tmp_path / "peft")
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["base_model_name_or_path"] == str(base)
    theirs = torch_logits(torch_model(base, peft_dir))
    np.testing.assert_allclose(theirs, ours, atol=1e-4)

    back = import_peft(peft_dir, tmp_path / "back" / "adapters.npz")
    with np.load(adapter) as a, np.load(back) as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_allclose(mlx_logits(base, back), ours, atol=1e-5)


def test_export_of_an_uneven_module_set_names_modules_exactly(hf_dirs, tmp_path):
    base = hf_dirs("llama")
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    adapter = trained_adapter(base, tmp_path / "ad", modules=modules)
    peft_dir = export_peft(adapter, tmp_path / "peft")
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(modules) and cfg["layers_to_transform"] is None
    peft_model = torch_model(base, peft_dir)
    from peft.tuners.lora import LoraLayer

    wrapped = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer))
    assert wrapped == sorted(modules)  # PEFT adapts exactly these, nothing more
    np.testing.assert_allclose(torch_logits(peft_model), mlx_logits(base, adapter), atol=1e-4)


@pytest.fixture(scope="module")
def peft_made(hf_dirs, tmp_path_factory):
    """An adapter written by peft itself, with per-module ranks and alphas and rsLoRA scaling."""
    import torch
    from peft import LoraConfig, get_peft_model

    base = hf_dirs("llama")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}, use_rslora=True,
                        task_type="CAUSAL_LM")
    model = get_peft_model(torch_model(base), config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: give the adapter an effect
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    out = tmp_path_factory.mktemp("peft") / "peft_adapter"
    model.save_pretrained(out)
    return base, out, torch_logits(model.eval())


def test_peft_written_adapter_reads_and_fuses_with_parity(peft_made, tmp_path):
    base, peft_dir, expected = peft_made
    config, weights = read_peft(peft_dir)
    assert config.rank == 4 and len(config.modules) == 6
    assert weights["model.layers.0.mlp.down_proj.lora_a"].shape == (128, 4)  # rank 2 zero-padded to 4
    np.testing.assert_allclose(mlx_logits(base, peft_dir), expected, atol=1e-4)  # read_adapter -> read_peft

    out = tmp_path / "fused"
    result = fuse(base, peft_dir, out)  # peft recorded the base directory: the name check passes
    assert result.parity <= 1e-4
    np.testing.assert_allclose(torch_logits(torch_model(out)), expected, atol=1e-4)  # transformers loads it

    npz = import_peft(peft_dir, tmp_path / "imported" / "adapters.npz")
    np.testing.assert_allclose(mlx_logits(base, npz), expected, atol=1e-4)


def test_adapter_info_for_each_format(hf_dirs, tmp_path, peft_made):
    base = hf_dirs("llama")
    adapter = trained_adapter(base, tmp_path / "ad", lora_layers=1, targets="attention")
    info = adapter_info(adapter.parent)
    assert (info.format, info.rank, info.alpha, info.scale) == ("mlxtune-lora", 4, 8.0, 2.0)
    assert info.layers == [1] and info.target_modules == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert info.n_modules == 4 and info.base_model == str(base)
    # q: 64x64, k/v: 64x32 (2 kv heads of 16), o: 64x64 -> rank 4 * (in + out) each
    assert info.parameters == 4 * ((64 + 64) + (64 + 32) * 2 + (64 + 64))
    assert "layers:      1 (1 blocks)" in info.summary()
    peft_info = adapter_info(peft_made[1])
    assert peft_info.format == "peft" and peft_info.layers == [0, 1] and peft_info.n_modules == 6


def test_bad_peft_directories_are_clear_errors(peft_made, tmp_path):
    _, peft_dir, _ = peft_made
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes((peft_dir / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        read_peft(bad)
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    for change, message in [({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                            ({"peft_type": "IA3"}, "only LORA"), ({"bias": "all"}, "bias='none'")]:
        (bad / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(AdapterError, match=message):
            read_peft(bad)
    # importing into the PEFT directory itself would overwrite its config
    with pytest.raises(AdapterError, match="inside the PEFT directory"):
        import_peft(peft_dir, peft_dir / "adapters.npz")
    out = import_peft(peft_dir, tmp_path / "x" / "adapters.npz")
    with pytest.raises(AdapterError, match="already exists.*--force"):
        import_peft(peft_dir, out)
    # exporting over the adapter's own directory would delete it, --force or not
    with pytest.raises(AdapterError, match="holds the adapter being exported"):
        export_peft(out, tmp_path / "x", force=True)
    assert out.exists()
    # an architecture whose mlx-lm names differ from transformers' is refused, not exported wrongly
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(AdapterError, match="does not support gpt2"):
        export_peft(out, tmp_path / "p_gpt2", base_model=str(gpt2))
    assert not (tmp_path / "p_gpt2").exists()


def cli(*args) -> int:
    """Run `mlxtune ARGS` in this process; the exit code."""
    from mlxtune.cli import run

    try:
        run(list(args))
    except SystemExit as e:
        return e.code or 0
    return 0


def test_cli_adapters_verbs(peft_made, tmp_path, capsys):
    base, peft_dir, expected = peft_made

    npz = tmp_path / "ad" / "adapters.npz"
    assert cli("adapters", "import", str(peft_dir), "--to", str(npz)) == 0
    assert cli("adapters", "info", str(npz)) == 0
    out = capsys.readouterr().out
    assert "rank:        4" in out and "modules:     down_proj, q_proj, v_proj (6 in all)" in out
    assert cli("adapters", "export", "--adapter-file", str(npz), "--to", "peft", str(tmp_path / "p2")) == 0
    np.testing.assert_allclose(torch_logits(torch_model(base, tmp_path / "p2")), expected, atol=1e-4)
    assert cli("adapters", "export", "--adapter-file", str(npz), "--to", "peft", str(tmp_path / "p2")) == 1
    assert "error: " in capsys.readouterr().err
    assert cli("adapters", "export", "--adapter-file", str(npz), "--to", "gguf") == 1
    assert "--to gguf needs --model BASE and --outfile" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["qwen2", "gemma3", "phi3"])
def test_transformers_fused_model_equals_transformers_base_plus_exported_adapter(hf_dirs, tmp_path, arch):
    """All on the transformers side: fuse's output vs the PEFT export of the same adapter on the base."""
    base = hf_dirs(arch)
    adapter = trained_adapter(base, tmp_path / "ad", lora_layers=-1, targets="all-linear")
    fuse(base, adapter, tmp_path / "fused")
    peft_dir = export_peft(adapter, tmp_path / "peft")
    expected = torch_logits(torch_model(base, peft_dir))
    assert np.abs(expected - torch_logits(torch_model(base))).max() > 1e-2
    np.testing.assert_allclose(torch_logits(torch_model(tmp_path / "fused")), expected, atol=1e-4)


def test_align_to_model_renames_multimodal_prefixes_to_what_the_model_has():
    import mlx.nn as nn

    from mlxtune.adapters import AdapterConfig, align_to_model, hf_name, mlx_name

    assert mlx_name("model.language_model.layers.0.self_attn.q_proj") == "language_model.model.layers.0.self_attn.q_proj"
    assert hf_name("language_model.model.layers.0.self_attn.q_proj") == "model.language_model.layers.0.self_attn.q_proj"

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(4, 4)

    class LM(nn.Module):  # a model that keeps transformers' spelling (like mlx-lm's gemma3n)
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.language_model = nn.Module()
            self.model.language_model.layers = [Block()]

    guessed = "language_model.model.layers.0.q_proj"
    cfg = AdapterConfig(rank=2, modules=[guessed])
    weights = {f"{guessed}.lora_a": mx.zeros((4, 2)), f"{guessed}.lora_b": mx.zeros((2, 4))}
    cfg, weights = align_to_model(cfg, weights, LM())
    assert cfg.modules == ["model.language_model.layers.0.q_proj"]
    assert sorted(weights) == ["model.language_model.layers.0.q_proj.lora_a", "model.language_model.layers.0.q_proj.lora_b"]


def test_cli_export_to_gguf_writes_a_llama_cpp_lora(hf_dirs, tmp_path, capsys):
    from gguf import GGUFReader

    base = hf_dirs("llama")
    adapter = trained_adapter(base, tmp_path / "ad", lora_layers=1, targets="attention")
    out = tmp_path / "lora.gguf"
    args = ["adapters", "export", "--adapter-file", str(adapter), "--to", "gguf", "--model", str(base), "--outfile", str(out)]
    assert cli(*args) == 0 and f"Wrote LoRA GGUF {out}" in capsys.readouterr().out
    names = sorted(t.name for t in GGUFReader(out).tensors)
    assert names == sorted(f"blk.1.{t}.weight.lora_{ab}" for t in ("attn_q", "attn_k", "attn_v", "attn_output") for ab in "ab")
    before = out.read_bytes()
    assert cli(*args) == 1 and "already exists" in capsys.readouterr().err  # kept unless --force
    assert out.read_bytes() == before


def test_mlx_lm_own_tools_load_and_fuse_an_mlxtune_adapter_folder(tiny_llama, tmp_path):
    """The folder mlxtune lora writes is one mlx-lm's loader and mlx_lm.fuse take as they are."""
    import subprocess
    import sys

    from mlx_lm.utils import load as mlx_lm_load

    from tiny import write_chat_data

    data = write_chat_data(tmp_path / "data")
    result = mlxtune.lora(str(tiny_llama), str(data), adapter_file=tmp_path / "run" / "adapters.npz", iters=4,
                          batch_size=2, learning_rate=1e-2, lora_layers=2, target_modules="all-linear",
                          verbose=False, steps_per_eval=0, save_every=0)
    folder = result.adapter_file.parent
    assert (folder / "adapters.safetensors").exists()
    ours, _ = load(tiny_llama, adapter_file=result.adapter_file)
    expected = np.array(ours(mx.array(IDS)))
    assert np.abs(expected - np.array(load(tiny_llama)[0](mx.array(IDS)))).max() > 1e-3  # the adapter matters
    theirs, _ = mlx_lm_load(str(tiny_llama), adapter_path=str(folder))
    np.testing.assert_allclose(np.array(theirs(mx.array(IDS))), expected, atol=1e-5)
    fused = tmp_path / "mlx-lm-fused"
    proc = subprocess.run([sys.executable, "-m", "mlx_lm", "fuse", "--model", str(tiny_llama), "--adapter-path",
                           str(folder), "--save-path", str(fused)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # mlx_lm.fuse adds the update into the weights (another summation order than base + adapter): with
    # OpenBLAS on one x86 machine a logit moved by 1.2e-4; a wrong scale or a missing layer moves them by >1e-2.
    np.testing.assert_allclose(np.array(load(fused)[0](mx.array(IDS))), expected, atol=5e-4)
