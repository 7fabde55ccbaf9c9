"""Fine-tune-aware quantization (`--keep-adapter`): importance-weighted encoders, the promotion plan, and files
that llama.cpp loads and that stay closer to the fused model than the plain recipe's.

The model here has 256-wide rows so that q4_k_m really writes Q4_K and Q6_K (the bundled model's rows are 128
and 384 wide, which llama-quantize's recipe writes as Q5_0 / Q8_0).
"""

from __future__ import annotations

import json

import gguf
import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants
from test_fuse import make_adapter

import mlxtune
from mlxtune.errors import ConfigError
from mlxtune.gguf.quants import encode

import llamacpp
from tiny import make_tiny_model

QUIET = dict(progress=False, log=lambda msg: None)
QUESTIONS = [f"Set a timer for {n} minutes called {w}" for n, w in zip(range(3, 19), "tea eggs pasta rice bread nap run "
                                                                         "call soup pizza cake beans leek kale corn pea".split())]


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q5_0, Q.Q4_0])
def test_importance_weighted_encoders(qtype):
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((16, 512)) * 0.05).astype(np.float32)
    importance = np.exp(rng.standard_normal(512) * 1.5).astype(np.float32)

    def weighted_error(data):
        # decoded by the gguf package's reference decoder, which is ggml's layout
        back = gguf_quants.dequantize(data, qtype).reshape(rows.shape)
        return float((((back - rows) ** 2) * importance).mean())

    plain, weighted = encode(rows, qtype), encode(rows, qtype, importance)
    assert weighted.shape == plain.shape and weighted.dtype == np.uint8
    assert weighted_error(weighted) < 0.85 * weighted_error(plain)
    # uniform importance is a plain (if differently weighted) encoding: no worse than the reference one
    uniform = gguf_quants.dequantize(encode(rows, qtype, np.ones(512, np.float32)), qtype).reshape(rows.shape)
    reference = gguf_quants.dequantize(plain, qtype).reshape(rows.shape)
    assert ((uniform - rows) ** 2).mean() <= 1.05 * ((reference - rows) ** 2).mean()
    assert np.array_equal(encode(rows, Q.Q8_0, importance), encode(rows, Q.Q8_0))  # Q8_0 ignores it, as ggml


@pytest.fixture(scope="module")
def fused_256(tmp_path_factory):
    """A 2-block llama with 256-wide rows, a random adapter fused into it, and chat data about its task."""
    work = tmp_path_factory.mktemp("keep")
    base = make_tiny_model(work / "base", hidden_size=256, intermediate_size=512)
    adapter, _ = make_adapter(base, work / "adapter", b_scale=0.05, targets="all-linear")
    data = work / "data"
    data.mkdir()
    with open(data / "train.jsonl", "w") as f:
        for q in QUESTIONS:
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": f"<tool_call name=\"timer\" "
                                                                              f"arguments='{{\"q\": \"{q}\"}}'/>"}]}) + "\n")
    fused = work / "fused"
    mlxtune.fuse(base, adapter, fused, log=QUIET["log"])
    return dict(work=work, base=base, adapter=adapter, data=data, fused=fused)


def test_keep_adapter_file_loads_in_llama_cpp_and_stays_closer_to_the_fused_model(fused_256):
    from mlxtune.models import load

    f = fused_256
    lines = []
    plain = mlxtune.to_gguf(f["fused"], f["work"] / "plain.gguf", "q4_k_m", **QUIET)
    keep = mlxtune.to_gguf(f["fused"], f["work"] / "keep.gguf", "q4_k_m", keep_adapter=f["adapter"], data=f["data"],
                           progress=False, log=lines.append)
    [summary] = [line for line in lines if line.startswith("keep-adapter: ")]
    assert " adapted tensors moved up (Q" in summary and " tensors below 1x" in summary, summary

    types = {name: {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors} for name, path in
             (("plain", plain), ("keep", keep))}
    moved = {n for n in types["plain"] if types["plain"][n] != types["keep"][n]}
    up = {(Q.Q4_K, Q.Q6_K), (Q.Q6_K, Q.Q8_0)}
    assert moved and all((types["plain"][n], types["keep"][n]) in up for n in moved)
    assert all(n.startswith("blk.") for n in moved)  # only adapted tensors move
    # about PROMOTE_SHARE (a quarter) of the adapted values move up
    assert 2 <= len(moved) <= 7
    reader = gguf.GGUFReader(keep)
    assert reader.fields["quantize.imatrix.dataset"].contents() == str(f["data"] / "train.jsonl")
    assert reader.fields["quantize.imatrix.entries_count"].contents() == 15  # every linear layer and the head
    assert "quantize.imatrix.dataset" not in gguf.GGUFReader(plain).fields
    assert keep.stat().st_size > plain.stat().st_size

    # llama.cpp loads it, and its logits on the task's text stay closer to the fused float model's
    model, tok = load(f["fused"])
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True)
    want = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    err = {name: float(((llamacpp.logits(path, ids) - want) ** 2).mean()) for name, path in (("plain", plain),
                                                                                            ("keep", keep))}
    assert err["keep"] < err["plain"], err


def test_keep_adapter_through_fuse_and_the_cli(fused_256, tmp_path):
    from mlxtune.cli import _register, main

    f = fused_256
    out = mlxtune.fuse(f["base"], f["adapter"], tmp_path / "fused", gguf=tmp_path / "m.gguf", gguf_type="q4_0",
                       keep_adapter=True, data=f["data"], log=QUIET["log"])
    assert "quantize.imatrix.dataset" in gguf.GGUFReader(out.gguf).fields
    with pytest.raises(ConfigError, match="--keep-adapter quantizes the GGUF"):
        mlxtune.fuse(f["base"], f["adapter"], tmp_path / "f2", gguf=tmp_path / "m2.gguf", keep_adapter=True)
    with pytest.raises(ConfigError, match="--type f16 is not quantized"):
        mlxtune.to_gguf(f["fused"], tmp_path / "x.gguf", "f16", keep_adapter=f["adapter"], data=f["data"], **QUIET)
    with pytest.raises(ConfigError, match="needs the adapter's training data"):
        mlxtune.to_gguf(f["fused"], tmp_path / "x.gguf", "q4_0", keep_adapter=f["adapter"], **QUIET)

    _register()
    res = CliRunner().invoke(main, ["gguf", "--model", str(f["fused"]), "--outfile", str(tmp_path / "c.gguf"),
                                    "--type", "q4_k_m", "--keep-adapter", str(f["adapter"]), "--data", str(f["data"])])
    assert res.exit_code == 0, res.output
    assert "keep-adapter: " in res.output and (tmp_path / "c.gguf").exists()
    res = CliRunner().invoke(main, ["gguf", "--model", str(f["fused"]), "--outfile", str(tmp_path / "d.gguf"),
                                    "--data", str(f["data"])])
    assert res.exit_code == 2 and "--data is read only with --keep-adapter" in res.output


def test_the_plan_says_how_the_update_compares_with_the_rounding_error(tmp_path):
    from mlxtune.gguf.keep_adapter import KeepAdapterPlan, TensorScore

    scores = [TensorScore("a", Q.Q5_0, 1e-3, 2e-3), TensorScore("b", Q.Q4_K, 3e-3, 1e-3),
              TensorScore("c", Q.Q4_K, 1e-2, 1e-3)]
    plan = KeepAdapterPlan(tmp_path / "adapters", tmp_path / "train.jsonl", 100, scores=scores)
    assert plan.at_risk() == "update / rounding error 0.5x to 10x (median 3x), 1 of 3 tensors below 1x"
    assert "0 of 3 adapted tensors moved up (none); update / rounding error 0.5x" in plan.summary()
    assert KeepAdapterPlan(tmp_path, tmp_path, 0).at_risk() == "no adapted tensor is quantized"
