"""mlxtune compare: every stage from the base model to GGUF files run in the real llama.cpp, the check, the JSON
and HTML outputs (the page rendered in headless Chromium), export --verify, and compare without llama.cpp.

The one fixture that costs time (~30 s): a 40-step LoRA run on the bundled model as it comes out of a q4_0
GGUF (its weights sit on q4_0's grid, `tiny.gguf_rounded_copy`), the model a user holding a q4_0 file would
fine-tune. Such an early adapter has small margins, and writing the fused model as q4_0 again rounds much of
its update back onto the grid: a q4_0 file whose fine-tune was rounded away, measured, not simulated. Half
of the reference answers are the adapter's own greedy replies (its exact match is then ~50%, so keeping 95%
of it means something) and half are the bundled task's answers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import gguf
import pytest

import mlxtune
from mlxtune import structured
from mlxtune.defaults import DEFAULT_DATA, DEFAULT_LORA_CONFIG, DEFAULT_MODEL
from mlxtune.errors import CheckError, ConfigError, ExportError
from mlxtune.evaluation import greedy_batch, prompts_and_answers
from mlxtune.html_report import diff_html

from tiny import gguf_rounded_copy

N = 24  # rows compared
MAX_TOKENS = 48
QUIET = dict(progress=False, log=lambda msg: None)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """The q4_0-grid base, a 40-step adapter on it, its fused model, GGUF files and a data folder."""
    from mlxtune.data import read_records
    from mlxtune.models import load

    work = tmp_path_factory.mktemp("compare")
    base = gguf_rounded_copy(DEFAULT_MODEL, work / "tiny-chat-q4_0", "q4_0")
    adapter = mlxtune.lora(str(base), str(DEFAULT_DATA), config=DEFAULT_LORA_CONFIG, iters=40,
                           adapter_file=work / "adapters" / "adapters.npz", steps_per_eval=0, val_batches=1,
                           save_every=0, verbose=False).adapter_file
    rows = read_records(DEFAULT_DATA / "test.jsonl")[:N]
    model, tok = load(base, adapter_file=adapter)
    prompts, _ = prompts_and_answers(tok, rows, DEFAULT_DATA / "test.jsonl")
    own = greedy_batch(model, tok, prompts, max_tokens=MAX_TOKENS)
    data = work / "data"
    data.mkdir()
    with open(data / "test.jsonl", "w") as f:
        for i, ((_, record), reply) in enumerate(zip(rows, own)):
            messages = record["messages"][:-1] + [{"role": "assistant", "content": reply if i % 2 == 0 else
                                                   record["messages"][-1]["content"]}]
            f.write(json.dumps({"messages": messages}) + "\n")
    shutil.copy(DEFAULT_DATA / "train.jsonl", data / "train.jsonl")
    fused = work / "fused"
    mlxtune.fuse(base, adapter, fused, log=QUIET["log"])
    files = {
        "fused-f16": mlxtune.to_gguf(fused, work / "fused-f16.gguf", "f16", **QUIET),
        "fused-q4_0": mlxtune.to_gguf(fused, work / "fused-q4_0.gguf", "q4_0", **QUIET),
        "base-f16": mlxtune.to_gguf(base, work / "base-f16.gguf", "f16", **QUIET),
    }
    return dict(work=work, base=base, adapter=adapter, fused=fused, data=data, files=files)


def run_cli(*args, env=None, code=None):
    """`python -m mlxtune ARGS` (or the Python `code` instead of the module), returning the finished process."""
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "mlxtune", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})})


class _Tables(HTMLParser):
    """Rows of each <table id=...> in a document (as Chromium serialises it), and the text of every id'd element."""

    def __init__(self):
        super().__init__()
        self.rows: dict[str, int] = {}
        self.text: dict[str, str] = {}
        self._table = self._id = None
        self._in_body = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = attrs.get("id")
            self.rows.setdefault(self._table, 0)
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body and self._table:
            self.rows[self._table] += 1
        if "id" in attrs and tag != "table":
            self._id = attrs["id"]
            self.text[self._id] = ""

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False
        if tag == "table":
            self._table = None
        if tag == "span":
            self._id = None

    def handle_data(self, data):
        if self._id:
            self.text[self._id] += data


def chromium_dom(page: Path) -> str:
    """The DOM of `page` after Chromium (headless, as root: no sandbox) has loaded it and run its script."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "chromium is missing: `make system-deps` installs it (apt-get install chromium)"
    # not with the tests' preloaded OpenBLAS: Chromium's GPU process dies under it ("GPU process isn't usable")
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--dump-dom", page.resolve().as_uri()], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and "<html" in r.stdout, r.stderr[-2000:]
    return r.stdout


@pytest.mark.slow
def test_every_stage_scored_checked_and_reported(tuned, tmp_path):
    files = tuned["files"]
    out_json, out_html = tmp_path / "scores.json", tmp_path / "compare.html"
    args = ["compare", "--model", str(tuned["base"]), "--adapter-file", str(tuned["adapter"]), "--fused",
            str(tuned["fused"]), "--data", str(tuned["data"]), "-n", str(N), "--max-tokens", str(MAX_TOKENS),
            "--json", str(out_json), "--html", str(out_html), "--check"]
    for f in files.values():
        args += ["--gguf", str(f)]
    r = run_cli(*args)

    # --check: exit 1 with one line naming each failing stage and what to do instead
    assert r.returncode == 1, r.stdout + r.stderr
    error = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and error[0].startswith("error: check failed: ")
    assert "gguf:fused-q4_0.gguf keeps" in error[0] and "write it as --type q4_k_m" in error[0]
    assert re.search(r"gguf:base-f16\.gguf keeps \d+% of the adapter's exact match .*answers like the base model "
                     r".*the fine-tune is not in this file", error[0])
    assert "gguf:fused-f16.gguf" not in error[0]

    # the JSON: exactly the schema, every stage, fractions in 0..1
    doc = json.loads(out_json.read_text())
    assert set(doc) == {"n", "stages"} and doc["n"] == N
    names = ["base", "adapter", "fused", "gguf:fused-f16.gguf", "gguf:fused-q4_0.gguf", "gguf:base-f16.gguf"]
    assert [s["stage"] for s in doc["stages"]] == names
    for s in doc["stages"]:
        assert set(s) == {"stage", "exact_match", "agreement", "mean_kl", "stopped", "loss"}
        assert all(0.0 <= s[k] <= 1.0 for k in ("exact_match", "agreement", "stopped"))
        assert s["mean_kl"] >= 0.0 and s["loss"] > 0.0
    stage = {s["stage"]: s for s in doc["stages"]}

    # the adapter stage is `mlxtune eval` on the same rows: the same exact match, the same loss
    ev = mlxtune.evaluate(str(tuned["base"]), data=tuned["data"], adapter_file=str(tuned["adapter"]), limit=N,
                          max_tokens=MAX_TOKENS, progress=False)
    assert stage["adapter"]["exact_match"] == ev.exact_match and 0.4 <= ev.exact_match <= 0.7
    assert stage["adapter"]["loss"] == pytest.approx(ev.test_loss, rel=1e-5)
    assert stage["adapter"]["agreement"] == 1.0 and stage["adapter"]["mean_kl"] == 0.0
    # fused in MLX is the adapter; its f16 GGUF in llama.cpp (the file's own template) agrees on >= 90%
    assert stage["fused"]["agreement"] == 1.0 and stage["fused"]["mean_kl"] < 1e-6
    assert stage["gguf:fused-f16.gguf"]["agreement"] >= 0.9 and stage["gguf:fused-f16.gguf"]["mean_kl"] < 1e-3
    assert stage["gguf:fused-f16.gguf"]["loss"] == pytest.approx(ev.test_loss, rel=1e-2)
    # q4_0 rounded much of the update away; the base model's file has none of it
    assert stage["gguf:fused-q4_0.gguf"]["exact_match"] < 0.95 * ev.exact_match
    assert stage["gguf:base-f16.gguf"]["agreement"] <= 0.2 and stage["gguf:base-f16.gguf"]["mean_kl"] > 0.5
    assert stage["base"]["loss"] == pytest.approx(stage["gguf:base-f16.gguf"]["loss"], rel=1e-2)

    # the terminal table has every stage, and tool-call columns (the references are tool calls)
    assert "exact match  JSON valid  fields  agreement  mean KL  stopped" in r.stdout
    assert all(re.search(rf"^{re.escape(n)} ", r.stdout, re.M) for n in names)

    # the page: self-contained, renders in a real browser, both tables complete, its script ran
    text = out_html.read_text()
    assert "http://" not in text and "https://" not in text and "<link" not in text
    dom = chromium_dom(out_html)
    tables = _Tables()
    tables.feed(dom)
    assert tables.rows == {"stages": len(names), "examples": N}
    differ = int(tables.text["disagree-count"].split(" of ")[0])
    assert tables.text["disagree-count"].endswith(f" of {N}") and differ >= 1
    assert dom.count('data-stage="gguf:fused-q4_0.gguf"') == N and "<ins>" in dom and "<del>" in dom


@pytest.mark.slow
def test_export_verify_places_nothing_when_the_check_fails(tuned, tmp_path):
    lmstudio = tmp_path / "lmstudio"
    common = dict(app="both", models_dir=lmstudio, data=tuned["data"], n=12, verify=True, log=QUIET["log"])
    # q4_0, even fine-tune-aware, loses too much of this fragile adapter
    with pytest.raises(CheckError, match=r"gguf:.*q4_0\.gguf keeps \d+% .*nothing was placed into Ollama or LM Studio"):
        mlxtune.export_chat(str(tuned["base"]), tuned["adapter"], tmp_path / "q4", gguf_type="q4_0", keep_adapter=True,
                            **common)
    [written] = (tmp_path / "q4").glob("*.gguf")
    assert (tmp_path / "q4" / "fused").is_dir() and "quantize.imatrix.dataset" in gguf.GGUFReader(written).fields
    assert not (tmp_path / "q4" / "Modelfile").exists() and not lmstudio.exists()

    done = mlxtune.export_chat(str(tuned["base"]), tuned["adapter"], tmp_path / "f32", gguf_type="f32", **common)
    assert done.ollama.modelfile.exists() and done.lmstudio.read_bytes() == done.gguf.read_bytes()

    with pytest.raises(ConfigError, match="--verify needs --data"):
        mlxtune.export_chat(str(tuned["base"]), tuned["adapter"], tmp_path / "x", verify=True)


def test_without_llama_cpp_the_mlx_stages_run_and_one_line_says_why(tuned):
    # llama_cpp made unimportable in a fresh interpreter, as on a machine without the extra
    code = "import sys; sys.modules['llama_cpp'] = None; from mlxtune.cli import run; run(sys.argv[1:])"
    args = ["compare", "--model", str(tuned["base"]), "--adapter-file", str(tuned["adapter"]), "--data",
            str(tuned["data"]), "-n", "4", "--max-tokens", "8", "--no-base", "--gguf", str(tuned["files"]["fused-f16"])]
    r = run_cli(*args, code=code, env={"MLXTUNE_NO_OPENBLAS": "1"})
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stdout.splitlines() if line.startswith("note:")]
    assert notes == ["note: 1 GGUF stage(s) skipped: the GGUF stages need llama.cpp through the llama-cpp-python "
                     "package: pip install 'mlxtune[llamacpp]'"]
    assert re.search(r"^adapter ", r.stdout, re.M) and "gguf:" not in r.stdout
    r = run_cli(*args, "--check", code=code, env={"MLXTUNE_NO_OPENBLAS": "1"})
    assert r.returncode == 1 and "error: check impossible: 1 GGUF file(s) were not run" in r.stderr


def test_bad_arguments_are_one_line_errors(tuned, tmp_path):
    existing = tmp_path / "scores.json"
    existing.write_text("{}")
    with pytest.raises(ConfigError, match="already exists"):
        mlxtune.compare(str(tuned["base"]), str(tuned["adapter"]), data=tuned["data"], json_file=existing, **QUIET)
    with pytest.raises(ConfigError, match="--adapter-file is required"):
        mlxtune.compare(str(tuned["base"]), None, data=tuned["data"], **QUIET)
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(ExportError, match="llama.cpp cannot load it as a model"):
        mlxtune.compare(str(tuned["base"]), str(tuned["adapter"]), data=tuned["data"], gguf=[damaged], n=2,
                        max_tokens=4, base=False, **QUIET)
    r = run_cli("compare", "--adapter-file", str(tuned["adapter"]), "--gguf", str(tmp_path / "missing.gguf"))
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: --gguf") and "Traceback" not in r.stderr


def test_structured_answers_parse_into_fields():
    call = """<tool_call name="send_message" arguments='{"to": "Zoe", "text": "hi", "n": 2}'/>"""
    assert structured.parse(call) == {"name": "send_message", "arguments.to": "Zoe", "arguments.text": "hi",
                                      "arguments.n": 2}
    assert structured.parse('<tool_call name="t" arguments="{}"/>') == {"name": "t", "arguments": {}}
    assert structured.parse('<tool_call>{"name": "t", "arguments": {"a": [1, {"b": null}]}}</tool_call>') == {
        "name": "t", "arguments.a[0]": 1, "arguments.a[1].b": None}
    assert structured.parse('{"x": 1.0}') == {"x": 1.0}
    for text in ["OK. I told Zoe.", """<tool_call name="t" arguments='{"a": }'/>""", '{"a": 1', "42", ""]:
        assert structured.parse(text) is None, text
    ref = structured.parse(call)
    wrong_text = structured.parse(call.replace('"hi"', '"hello"'))
    extra = structured.parse(call.replace('"n": 2', '"n": 2.0, "cc": "Al"'))
    assert structured.field_match(ref, ref) == 1.0 and structured.field_match(ref, None) == 0.0
    assert structured.field_match(ref, wrong_text) == 3 / 4  # one of four fields differs
    assert structured.field_match(ref, extra) == 4 / 5  # 2 == 2.0 in JSON; the extra field counts against it
    assert structured.field_match({"a": True}, {"a": 1}) == 0.0


def test_diff_marks_changes_and_escapes_everything():
    html = diff_html('<tool_call name="a"/>', '<tool_call name="b"/><script>x</script>')
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<del>a</del><ins>b</ins>" in html
    assert diff_html("same", " same ") == "same"


def test_check_rules_and_the_safer_type_ladder():
    from mlxtune.comparison import Comparison, StageResult, _file_type

    def stage(name, em, kl=0.0, stopped=1.0, kind=None, replies=("a",)):
        return StageResult(name, em, em, kl, stopped, 1.0, replies=list(replies), stops=[True], file_type=kind)

    adapter = stage("adapter", 0.8)
    stages = [stage("base", 0.0, replies=("b",)), adapter,
              stage("gguf:ok.gguf", 0.77, kl=0.01, kind="q8_0"),  # 96% of 0.8: kept
              stage("gguf:a.gguf", 0.7, kind="q4_0"), stage("gguf:b.gguf", 0.7, kind="q4_k_m"),
              stage("gguf:c.gguf", 0.7, kind="q4_k_m+keep"), stage("gguf:d.gguf", 0.8, kl=0.5, kind="q8_0"),
              stage("gguf:e.gguf", 0.8, stopped=0.5, kind="f16"), stage("gguf:f.gguf", 0.0, kind="q4_0", replies=("b",))]
    failed = Comparison(1, [], stages).failures()
    assert [f.split(" ")[0] for f in failed] == [f"gguf:{x}.gguf" for x in "abcdef"]
    assert failed[0].endswith("write it as --type q4_k_m")
    assert "keeps 87% of the adapter's exact match" in failed[0]  # 0.7 / 0.8 in floats is 0.8749...
    assert failed[1].endswith("--type q4_k_m --keep-adapter ADAPTER (fine-tune-aware q4_k_m)")
    assert failed[2].endswith("write it as --type q6_k")
    assert "mean KL 0.5 > 0.1: write it as --type f16" in failed[3]
    assert "50.0% of replies stop at the end of the turn vs 100.0%" in failed[4] and "chat template and stop tokens" in failed[4]
    assert "answers like the base model (100% of replies equal the base's" in failed[5]
    assert "q4_0 rounded the fine-tune away" in failed[5]
    assert Comparison(1, [], stages).failures(max_kl=1.0)[3].startswith("gguf:e.gguf")
    with pytest.raises(CheckError, match=r"^check failed: gguf:a\.gguf .*; gguf:b\.gguf "):
        Comparison(1, [], stages).check()
    assert _file_type({"general.file_type": "15", "quantize.imatrix.dataset": "x"}) == "q4_k_m+keep"
    assert _file_type({"general.file_type": "2"}) == "q4_0" and _file_type({"general.file_type": "10"}) is None
