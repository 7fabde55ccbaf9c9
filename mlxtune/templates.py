"""Chat templates: render a conversation with the tokenizer's own Jinja template and find the assistant tokens.

The one thing to know: the loss mask is found by rendering the conversation again up to each assistant
turn (with and without that turn) and checking that those token ids are a prefix of the whole rendering.
Tokens between "prompt up to the turn" and "prompt plus the turn" are the turn's answer (when a token
spans that boundary, character offsets place it: it belongs to the answer); anything a
template writes after the turn's last special token (ChatML's newline after `<|im_end|>`) is not trained.
A template that renders a turn differently once later turns exist (Qwen3 marks only the final turn with
an empty <think> block) is handled by finding the turn's own text after its header; when even that is
impossible (the template drops earlier answers) we say so (`TemplateMaskError`) instead of guessing.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, DataError, FallbackWarning
from .model_files import read_json

# `--chat-template chatml`: ChatML, for a model without a template of its own that should learn one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TemplateMaskError(DataError):
    """The chat template does not render a conversation's turns as growing prefixes."""


def hf_tokenizer(tokenizer):
    """The Hugging Face tokenizer inside an mlx-lm TokenizerWrapper (or the argument itself)."""
    # A transformers tokenizer also has `_tokenizer` (the Rust one), so look for the HF API behind it.
    inner = getattr(tokenizer, "_tokenizer", None)
    return inner if hasattr(inner, "apply_chat_template") else tokenizer


def read_template_option(template: str | Path | None) -> str | None:
    """The `--chat-template` option: a file holding a Jinja template, the template text itself, or `chatml`."""
    if template is None:
        return None
    text = str(template)
    if text == "chatml":
        return CHATML_TEMPLATE
    if "{{" in text or "{%" in text:
        return text
    path = Path(text).expanduser()
    if not path.is_file():
        raise ConfigError(f"--chat-template {text}: no such file (give a Jinja template file)")
    return path.read_text()


def read_model_template(model_dir: Path, tok_config: dict | None = None) -> str | None:
    """A model directory's own template: tokenizer_config.json's chat_template, else chat_template.jinja,
    else chat_template.json (the places transformers looks, in its order)."""
    model_dir = Path(model_dir)
    if tok_config is None:
        tok_config = read_json(model_dir / "tokenizer_config.json") or {}
    template = tok_config.get("chat_template")
    if template:
        return template
    if (model_dir / "chat_template.jinja").exists():
        return (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    data = read_json(model_dir / "chat_template.json")
    if isinstance(data, dict) and data.get("chat_template"):
        return data["chat_template"]
    return None


def template_for(tokenizer, override: str | None = None) -> str | None:
    """The template text used for `tokenizer`: the override, else its own; None when it has none.

    Without a template nothing is invented: prompt/completion data trains `prompt + completion + EOS`
    (see `plain_ids`) and chat data is an error that suggests --chat-template.
    """
    if override:
        return override
    own = getattr(hf_tokenizer(tokenizer), "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one is what generation uses
        own = own.get("default") or next(iter(own.values()), None)
    return own or None


def describe_rendering(tokenizer, override: str | None = None) -> str:
    """One line saying how conversations become text for this tokenizer, and why."""
    if override:
        return "the --chat-template given"
    if template_for(tokenizer) is not None:
        return "the tokenizer's own chat template"
    return ("no chat template (the tokenizer has none): prompt + completion + EOS, as plain text; chat data "
            "needs --chat-template FILE (or --chat-template chatml)")


NO_TEMPLATE = ("this model's tokenizer has no chat template, so a conversation (chat messages, a system "
               "prompt or tools) cannot be rendered: pass --chat-template FILE (or --chat-template chatml), or "
               "give prompt/completion records, which train as prompt + completion + EOS")


def document_ids(tokenizer, text: str) -> list[int]:
    """Plain text as one document: the tokenizer's BOS (if it adds one), the text, then EOS."""
    hf = hf_tokenizer(tokenizer)
    ids = list(hf.encode(text, add_special_tokens=True))
    if hf.eos_token_id is not None and (not ids or ids[-1] != hf.eos_token_id):
        ids.append(hf.eos_token_id)
    return ids


def plain_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """What generation starts from without a chat template: BOS (if the tokenizer adds one) + the prompt."""
    hf = hf_tokenizer(tokenizer)
    ids = list(hf.encode(prompt, add_special_tokens=True))
    if ids and hf.eos_token_id is not None and ids[-1] == hf.eos_token_id and len(ids) > 1:
        ids = ids[:-1]  # a tokenizer that appends EOS to every encoding: generation must not start after it
    return ids


def plain_ids(tokenizer, prompt: str, completion: str, train_on_inputs: bool = False) -> tuple[list[int], list[bool]]:
    """Without a chat template: ids of `prompt + completion + EOS`, the completion and EOS trained.

    Prompt and completion are joined as they are (the separator is the data's, as in mlx-lm's completions).
    Where a token spans the join, it belongs to the completion.
    """
    full = document_ids(tokenizer, prompt + completion)
    if train_on_inputs:
        return full, [False] + [True] * (len(full) - 1)
    head = plain_prompt_ids(tokenizer, prompt)
    if full[: len(head)] == head:
        start = len(head)
    else:
        hf = hf_tokenizer(tokenizer)
        enc = hf(prompt + completion, add_special_tokens=True, return_offsets_mapping=True)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        start = next((k for k, (_, e) in enumerate(offsets) if e > len(prompt)), len(offsets))
    return full, [False] * start + [True] * (len(full) - start)


def render(tokenizer, messages: list[dict], *, tools: list | None = None, template: str,
           add_generation_prompt: bool = False) -> str:
    """The text of `messages` under `template`, exactly as the tokenizer's `apply_chat_template` writes it."""
    return renderer(tokenizer, template)(messages, tools, add_generation_prompt)


# Message keys transformers rewrites before rendering (it copies a message's reasoning under each name),
# so a conversation holding one is rendered by transformers itself.
_REASONING_KEYS = frozenset(("reasoning_content", "thinking", "reasoning"))
_SCALARS = (str, int, float, bool)


def _plain(value) -> bool:
    """JSON made of exact built-in types (what a data file parses to): transformers passes it on unchanged."""
    kind = type(value)
    if kind in _SCALARS or value is None:
        return True
    if kind is list:
        return all(_plain(v) for v in value)
    if kind is dict:
        return all(type(k) is str and _plain(v) for k, v in value.items())
    return False


def _unchanged_by_transformers(messages, tools) -> bool:
    """Whether apply_chat_template would hand these to the template as they are (only copied): plain JSON,
    no None-valued message field (it drops those) and no reasoning field (it aliases those)."""
    if type(messages) is not list or not (tools is None or type(tools) is list):
        return False
    for m in messages:
        if type(m) is not dict or not _REASONING_KEYS.isdisjoint(m):
            return False
        for k, v in m.items():
            if v is None or type(k) is not str or not (type(v) is str or _plain(v)):
                return False
    return tools is None or all(type(t) is dict and _plain(t) for t in tools)


def _transformers_compiler():
    """transformers' template compiler (a private helper: absent from some versions), or None."""
    # transformers is heavy, and every tokenizer that has a chat template brought it in already.
    try:
        from transformers.utils import chat_template_utils
    except ImportError:
        return None
    return getattr(chat_template_utils, "_compile_jinja_template", None)


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
    """transformers' own compiled template for `template` (its sandboxed environment, `tojson`,
    `raise_exception`, `strftime_now`, loop controls), compiled once per template text; None without it."""
    compile_template = _transformers_compiler()
    if compile_template is None:
        warnings.warn(FallbackWarning("chat templates render through apply_chat_template, one call a conversation "
                                      "(slower): this transformers has no _compile_jinja_template"), stacklevel=3)
        return None
    return compile_template(template)


def renderer(tokenizer, template: str) -> Callable[[list[dict], list | None, bool], str]:
    """`render` for many conversations: (messages, tools, add_generation_prompt) -> text.

    Rendering is the template compiled once by transformers and called with what `apply_chat_template`
    passes it (the messages, tools, `documents=None`, `add_generation_prompt` and the special tokens:
    `bos_token`, `eos_token`, ...), so the text is the same without its per-call conversions. Input that
    those conversions would change (message objects, None fields, reasoning fields) goes through
    `apply_chat_template` itself.
    """
    hf = hf_tokenizer(tokenizer)

    def slow(messages, tools, add_generation_prompt):
        try:
            return hf.apply_chat_template(messages, tools=tools or None, chat_template=template, tokenize=False,
                                          add_generation_prompt=add_generation_prompt)
        except Exception as e:  # Jinja raise_exception(...) and template bugs
            raise _cannot_render(e) from None

    own = getattr(hf, "chat_template", None)
    if isinstance(own, dict) and template in own:  # a template's name: transformers looks it up
        return slow
    try:
        compiled = _compiled(template)
    except Exception as e:  # a syntax error: said per conversation, as apply_chat_template says it
        error = _cannot_render(e)

        def broken(messages, tools, add_generation_prompt):
            raise error

        return broken
    if compiled is None:
        return slow
    # What `compiled.render(**variables)` does, with the template's globals (`raise_exception`, `namespace`,
    # ...) merged into one dict once: Jinja merges them from a ChainMap on every call, half of a render.
    env = compiled.environment
    variables = {**compiled.globals, **hf.special_tokens_map}

    def fast(messages, tools, add_generation_prompt):
        tools = tools or None
        if not _unchanged_by_transformers(messages, tools):
            return slow(messages, tools, add_generation_prompt)
        context = compiled.new_context({**variables, "messages": messages, "tools": tools, "documents": None,
                                        "add_generation_prompt": add_generation_prompt}, shared=True)
        try:
            return env.concat(compiled.root_render_func(context))
        except Exception as e:
            raise _cannot_render(e) from None

    return fast if not env.is_async else slow


def _cannot_render(e: Exception) -> DataError:
    return DataError(f"the chat template cannot render this conversation: {type(e).__name__}: {e}")


def encode(tokenizer, text: str) -> list[int]:
    # The template already wrote BOS and friends as text, so the tokenizer must not add them again.
    return list(hf_tokenizer(tokenizer).encode(text, add_special_tokens=False))


def special_ids(tokenizer) -> set[int]:
    """Ids of special tokens (end-of-turn markers among them) plus the EOS ids mlx-lm stops on."""
    hf = hf_tokenizer(tokenizer)
    ids = set(getattr(hf, "all_special_ids", []) or [])
    for i, tok in (getattr(hf, "added_tokens_decoder", {}) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    eos = getattr(tokenizer, "eos_token_ids", None)  # mlx-lm: a set; some HF tokenizers: one int
    ids.update([eos] if isinstance(eos, int) else eos or [])
    return ids


def prompt_ids(tokenizer, messages: list[dict], *, tools: list | None = None, template: str | None = None) -> list[int]:
    """Token ids of `messages` followed by the assistant header: what generation starts from.

    Without a chat template only a single user message can be a prompt (its plain text, as trained).
    """
    template = template_for(tokenizer, template)
    if template is None:
        if tools or len(messages) != 1 or messages[0].get("role") != "user":
            raise DataError(NO_TEMPLATE)
        return plain_prompt_ids(tokenizer, messages[0].get("content") or "")
    return encode(tokenizer, render(tokenizer, messages, tools=tools, template=template, add_generation_prompt=True))


@dataclass
class _Plan:
    """A rendered conversation: its text and, per assistant turn, the texts that end before/after it."""

    messages: list[dict]
    full_text: str
    turns: list[tuple[int, str, str | None]]  # (message index, prompt text, prompt+turn text or None)
    train_on_inputs: bool


def _plan(render, messages: list[dict], tools: list | None, train_on_inputs: bool) -> _Plan:
    """`render`: a `renderer` of the template."""
    full_text = render(messages, tools, False)
    turns = []
    if not train_on_inputs:
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = render(messages[:i], tools, True)
            if not full_text.startswith(before):
                raise _not_prefix(i)
            # The conversation up to its last message is the whole conversation: no second rendering.
            after = full_text if i == len(messages) - 1 else render(messages[: i + 1], tools, False)
            turns.append((i, before, after if full_text.startswith(after) else None))
    return _Plan(messages, full_text, turns, train_on_inputs)


class _Offsets:
    """Character spans of the tokens of one rendered text, for placing the prompt/answer boundaries.

    A fast tokenizer's encoding knows them (and answers `char_to_token` without building the whole list);
    a slow one is asked for an offset mapping once, when a boundary is actually needed.
    """

    def __init__(self, tokenizer, text: str, ids: list[int], encoding=None):
        self.tokenizer, self.text, self.ids, self.encoding = tokenizer, text, ids, encoding
        self._list: list[tuple[int, int]] | None = None

    def spans(self) -> list[tuple[int, int]]:
        if self._list is None:
            if self.encoding is not None:
                self._list = [tuple(o) for o in self.encoding.offsets]
            else:
                self._list = _offsets(self.tokenizer, self.text, self.ids)
        return self._list

    def _near(self, pos: int, answer_side: bool) -> int | None:
        """`boundary` from the token at character `pos` and its neighbours (None: ask the whole span list)."""
        k = self.encoding.char_to_token(pos)
        span = self.encoding.token_to_chars(k) if k is not None else None
        if span is None:
            return None
        # Spans are in text order, but several byte tokens can share one character's span: step back over
        # the tokens that still end after `pos` (answer side) or start at or after it.
        while k > 0:
            before = self.encoding.token_to_chars(k - 1)
            if before is None:
                return None
            if (before[1] if answer_side else before[0]) < pos + (1 if answer_side else 0):
                break
            k, span = k - 1, before
        if answer_side:
            return k
        return k if span[0] >= pos else k + 1

    def boundary(self, pos: int, answer_side: bool) -> int:
        """Token index where the text prefix of length `pos` ends; a token spanning it goes to the answer.

        answer_side: the first token that ends after `pos`; otherwise the first that starts at or after it.
        """
        n = len(self.ids)
        if pos >= len(self.text):
            return n
        if self.encoding is not None:
            k = self._near(pos, answer_side)
            if k is not None:
                return k
        spans = self.spans()
        if answer_side:
            return next((k for k, (_, e) in enumerate(spans) if e > pos), n)
        return next((k for k, (b, _) in enumerate(spans) if b >= pos), n)


def _mask(tokenizer, plan: _Plan, full: list[int], offsets: _Offsets, specials: set[int],
          decoded: dict) -> tuple[list[int], list[bool]]:
    full_text = plan.full_text
    if plan.train_on_inputs:
        return full, [False] + [True] * (len(full) - 1)
    mask = [False] * len(full)
    for i, before, after in plan.turns:
        message = plan.messages[i]
        start = offsets.boundary(len(before), answer_side=True)
        if after is not None:
            end = offsets.boundary(len(after), answer_side=False)
            # Stop after the turn's last special token (its end-of-turn) when only whitespace follows it.
            last = next((j for j in range(end - 1, start - 1, -1) if full[j] in specials), None)
            if last is not None:
                tail = tuple(full[last + 1: end])
                if tail not in decoded:
                    decoded[tail] = hf_tokenizer(tokenizer).decode(list(tail)).strip()
                if not decoded[tail]:
                    end = last + 1
        else:
            # The template renders this turn differently when it is not the last one (Qwen3 adds an empty
            # <think> block only to the final turn): find the turn's text after its header instead.
            content = message.get("content") or ""
            at = full_text.find(content, len(before)) if content.strip() and not message.get("tool_calls") else -1
            if at < 0:
                raise _not_prefix(i)
            end = next((k for k, (b, _) in enumerate(offsets.spans()) if b >= at + len(content)), len(full))
            if end < len(full) and full[end] in specials:
                end += 1  # the end-of-turn token
        first = max(start, 1)
        if end > first:
            mask[first:end] = [True] * (end - first)
    return full, mask


def encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    """`encode` of many texts at once (a fast tokenizer spreads the batch over all cores)."""
    return [ids for ids, _ in _encode_many(tokenizer, texts)]


def _encode_many(tokenizer, texts: list[str]) -> list[tuple[list[int], object]]:
    """(ids, the fast tokenizer's Encoding or None) of each text."""
    hf = hf_tokenizer(tokenizer)
    if not texts:
        return []
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is not None and not getattr(hf, "split_special_tokens", False):
        # The Rust tokenizer directly: what `hf.encode` runs, without its per-text Python overhead.
        return [(e.ids, e) for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [(encode(tokenizer, t), None) for t in texts]


def chat_to_ids_many(tokenizer, conversations: list[tuple[list[dict], list | None]], *, template: str | None = None,
                     train_on_inputs: bool = False, specials: set[int] | None = None) -> list:
    """`chat_to_ids` of many (messages, tools) pairs: one result per pair, a DataError where it failed.

    Only each whole conversation is tokenized: where a prompt ends inside it is read from the token
    offsets (a prompt that tokenizes as a prefix of the whole ends exactly at a token boundary there).
    """
    template = template_for(tokenizer, template)
    if template is None:
        return [DataError(NO_TEMPLATE)] * len(conversations)
    specials = special_ids(tokenizer) if specials is None else specials
    render = renderer(tokenizer, template)
    plans: list = []
    for messages, tools in conversations:
        try:
            plans.append(_plan(render, messages, tools, train_on_inputs))
        except DataError as e:
            plans.append(e)
    texts = list(dict.fromkeys(p.full_text for p in plans if isinstance(p, _Plan)))
    encoded = dict(zip(texts, _encode_many(tokenizer, texts)))
    decoded: dict = {}
    out = []
    for p in plans:
        if isinstance(p, DataError):
            out.append(p)
            continue
        ids, encoding = encoded[p.full_text]
        try:
            out.append(_mask(tokenizer, p, list(ids), _Offsets(tokenizer, p.full_text, ids, encoding), specials, decoded))
        except DataError as e:
            out.append(e)
    return out


def chat_to_ids(tokenizer, messages: list[dict], *, tools: list | None = None, template: str | None = None,
                train_on_inputs: bool = False, specials: set[int] | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of the whole conversation and the mask of the assistant tokens (every assistant turn).

    Each assistant turn trains its content and its end-of-turn token; with `train_on_inputs` every
    token but the first is trained. Raises DataError (TemplateMaskError) when that cannot be done.
    """
    [result] = chat_to_ids_many(tokenizer, [(messages, tools)], template=template, train_on_inputs=train_on_inputs,
                                specials=specials)
    if isinstance(result, DataError):
        raise result
    return result


def _not_prefix(i: int) -> TemplateMaskError:
    return TemplateMaskError(
        f"the chat template renders turn {i + 1} differently once later turns are added, so its assistant "
        "tokens cannot be found (templates that drop earlier turns' reasoning or tool calls do this): "
        "pass --chat-template FILE with a template that renders turns as prefixes, or --train-on-inputs"
    )


def _offsets(tokenizer, text: str, ids: list[int]) -> list[tuple[int, int]]:
    hf = hf_tokenizer(tokenizer)
    try:
        enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    except Exception:  # slow (Python) tokenizers have no offsets
        enc = None
    if enc is None or list(enc["input_ids"]) != ids:
        raise TemplateMaskError(
            "a token spans the end of the prompt and the start of the answer and this tokenizer gives no "
            "character offsets to split it: pass --chat-template FILE whose assistant header ends with a "
            "newline or special token, or --train-on-inputs"
        )
    return [tuple(o) for o in enc["offset_mapping"]]
