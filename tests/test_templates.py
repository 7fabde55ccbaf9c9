"""Chat templates: the compiled-once renderer writes exactly what transformers' apply_chat_template writes.

Rendering is the hot path of tokenizing a big chat file (two renderings a row), so `templates.renderer`
calls transformers' compiled template directly; these tests hold it to apply_chat_template's text on the
suite's tokenizers and templates, for every kind of conversation the data formats produce.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from mlxtune import templates
from mlxtune.errors import DataError, FallbackWarning
from mlxtune.models import load_tokenizer

from data_tokenizers import FINAL_THINK_TEMPLATE, PLAIN_TEMPLATE, STYLES, TOOLS_TEMPLATE, load_style_tokenizer

BUNDLED = Path(__file__).resolve().parent.parent / "data" / "tiny-chat"

# Qwen2.5's template as published (tools listed as JSON, assistant tool calls, tool responses folded into
# one user turn): namespace-free but with tojson, `is defined`, loop lookbacks and whitespace control.
QWEN25_TOOLS = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or \
(message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# Reads the fields transformers rewrites (reasoning under several names) or drops (None values).
REASONING_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m.reasoning_content is defined %}"
    "{{ '<think>' + m.reasoning_content + '|' + (m.thinking or '-') + '</think>' }}{% endif %}"
    "{% if m.tool_calls is defined %}{{ 'calls: ' + (m.tool_calls | tojson) }}{% endif %}"
    "{{ (m['content'] or '') + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
SYSTEM = {"role": "system", "content": "Be brief."}
CONVERSATIONS = {
    "single turn": [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi!"}],
    "system": [SYSTEM, {"role": "user", "content": "Hello there"}, {"role": "assistant", "content": " Hi! \n"}],
    "multi-turn": [{"role": "user", "content": "One?"}, {"role": "assistant", "content": "1"},
                   {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "2"}],
    "system, multi-turn": [SYSTEM, {"role": "user", "content": "One?"}, {"role": "assistant", "content": "1"},
                           {"role": "user", "content": "Two? ünïcode ✓"}, {"role": "assistant", "content": "2 ✓"}],
    "tool calls": [SYSTEM, {"role": "user", "content": "Weather in Paris?"},
                   {"role": "assistant", "content": "",
                    "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                     "arguments": {"city": "Paris", "days": 2}}}]},
                   {"role": "tool", "content": "{\"temp\": 21.5, \"rain\": false, \"wind\": null}"},
                   {"role": "assistant", "content": "21.5 degrees, dry."}],
}
# (tokenizer style, template name or None for the style's own, conversations it can render)
CASES = [(style, None, [k for k in CONVERSATIONS if not (style in ("mistral", "gemma") and ("system" in k or "tool" in k))])
         for style in STYLES]
CASES += [("chatml", name, list(CONVERSATIONS)) for name in ("tools", "final-think", "plain", "qwen2.5")]
NAMED = {"tools": TOOLS_TEMPLATE, "final-think": FINAL_THINK_TEMPLATE, "plain": PLAIN_TEMPLATE, "qwen2.5": QWEN25_TOOLS}


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    out = {style: load_style_tokenizer(tmp_path_factory.mktemp(style), style) for style in STYLES}
    out["bundled"] = load_tokenizer(BUNDLED)
    return out


def reference(tok, messages, tools, template, add_generation_prompt):
    return templates.hf_tokenizer(tok).apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                                           add_generation_prompt=add_generation_prompt)


def no_apply_chat_template(monkeypatch, tok):
    """Make apply_chat_template fail loudly: the compiled path must not call it."""
    def refuse(*args, **kwargs):
        raise AssertionError("apply_chat_template was called")

    monkeypatch.setattr(templates.hf_tokenizer(tok), "apply_chat_template", refuse)


@pytest.mark.parametrize("style,name,which", CASES, ids=[f"{s}-{n or 'own'}" for s, n, _ in CASES])
def test_compiled_rendering_is_apply_chat_templates_text(toks, style, name, which, monkeypatch):
    tok = toks[style]
    template = NAMED[name] if name else templates.template_for(tok)
    expected = {}
    for key in which:
        messages = CONVERSATIONS[key]
        for tools in (None, TOOLS):
            for cut in (len(messages), len(messages) - 1):  # the whole chat, and its prompt up to the last answer
                for gen in (False, True):
                    expected[key, tools is None, cut, gen] = reference(tok, messages[:cut], tools, template, gen)
    no_apply_chat_template(monkeypatch, tok)
    render = templates.renderer(tok, template)
    for (key, no_tools, cut, gen), text in expected.items():
        tools = None if no_tools else TOOLS
        assert render(CONVERSATIONS[key][:cut], tools, gen) == text, (key, no_tools, cut, gen)
        assert templates.render(tok, CONVERSATIONS[key][:cut], tools=tools, template=template,
                                add_generation_prompt=gen) == text
    assert len(expected) >= 8


def test_the_bundled_models_template_renders_the_same(toks, monkeypatch):
    tok = toks["bundled"]
    template = templates.template_for(tok)
    messages = CONVERSATIONS["system, multi-turn"]
    expected = [reference(tok, messages, None, template, False), reference(tok, messages[:-1], None, template, True)]
    no_apply_chat_template(monkeypatch, tok)
    assert templates.render(tok, messages, template=template) == expected[0]
    assert templates.render(tok, messages[:-1], template=template, add_generation_prompt=True) == expected[1]
    # Special tokens reach the template as apply_chat_template passes them.
    with_bos = "{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ pad_token }}" + template
    assert templates.render(tok, messages, template=with_bos).startswith("<s>|<|im_end|>|<unk>|<pad><|im_start|>")


def test_input_transformers_rewrites_is_rendered_by_transformers(toks):
    """None fields (dropped by transformers) and reasoning fields (copied under each name) take the slow path,
    and the text is still apply_chat_template's."""
    tok = toks["chatml"]
    conversations = [
        [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because.", "reasoning_content": "hmm"}],
        [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because.", "thinking": "hmm"}],
        [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]}],
        [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "No call.", "tool_calls": None}],
        [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "A tuple.", "tool_calls": ({"name": "f"},)}],
    ]
    render = templates.renderer(tok, REASONING_TEMPLATE)
    texts = [render(messages, None, False) for messages in conversations]
    assert texts == [reference(tok, m, None, REASONING_TEMPLATE, False) for m in conversations]
    assert "<think>hmm|hmm</think>" in texts[0] and "<think>hmm|hmm</think>" in texts[1]  # aliased both ways
    assert "calls:" not in texts[3]  # the None field was dropped
    assert not templates._unchanged_by_transformers(conversations[0], None)
    assert templates._unchanged_by_transformers(CONVERSATIONS["tool calls"], TOOLS)


def test_template_errors_are_the_same_one_line_data_error(toks):
    tok = toks["mistral"]
    template = templates.template_for(tok)
    with pytest.raises(DataError, match="cannot render this conversation: TemplateError: Conversation roles must "
                                        "alternate"):
        templates.render(tok, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], template=template)
    with pytest.raises(DataError, match="cannot render this conversation: TemplateSyntaxError"):
        templates.render(tok, CONVERSATIONS["single turn"], template="{% for m in messages %}{{ m.content }}")


def test_without_transformers_compiled_template_it_says_so_and_renders_the_same(toks, monkeypatch):
    tok = toks["chatml"]
    template = templates.template_for(tok) + " "  # a template text not compiled before in this process
    messages = CONVERSATIONS["system"]
    expected = reference(tok, messages, None, template, True)
    monkeypatch.setattr(templates, "_transformers_compiler", lambda: None)  # as in a version without it
    templates._compiled.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            text = templates.render(tok, messages, template=template, add_generation_prompt=True)
    finally:
        templates._compiled.cache_clear()
    assert text == expected
    [warning] = [w for w in caught if issubclass(w.category, FallbackWarning)]
    assert "apply_chat_template" in str(warning.message)
