"""Run a GGUF file in llama.cpp (the optional `llama-cpp-python` extra) the way a chat app does.

Prompts are rendered with the file's own chat template (`tokenizer.chat_template`) by llama-cpp-python's
Jinja2ChatFormatter, the renderer behind its chat completions, tokenized by llama.cpp with special tokens
parsed, and answered greedily until an end-of-generation token, as LM Studio does with the file. The one
thing to know: `llama_cpp` is imported only inside these functions (it is optional and heavy), and
`llama_cpp_missing()` says in one line when it cannot be.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import ConfigError, ExportError

EXTRA_HINT = "pip install 'mlxtune[llamacpp]'"


def llama_cpp_missing() -> str | None:
    """None when llama-cpp-python imports, else one line saying what is missing and how to add it."""
    try:
        import llama_cpp  # noqa: F401  (optional extra: imported only to see whether it is there)
    except ImportError:
        return f"the GGUF stages need llama.cpp through the llama-cpp-python package: {EXTRA_HINT}"
    return None


@dataclass
class GGUFReply:
    text: str
    stopped: bool  # ended at an end-of-generation token (False: max_tokens)
    prompt_ids: list[int]


@dataclass
class LoadedGGUF:
    path: Path
    llm: object  # llama_cpp.Llama
    formatter: object  # llama_cpp.llama_chat_format.Jinja2ChatFormatter over the file's template
    own_template: bool  # False: the file has no chat template and the one the comparison renders with stands in


def open_gguf(path: str | os.PathLike, n_ctx: int, fallback_template: str | None = None) -> LoadedGGUF:
    """Load `path` in llama.cpp with a context of `n_ctx` tokens and logits kept for every position.

    A file without a chat template is rendered with `fallback_template` (the `--chat-template` the MLX stages
    used); without one either, it is refused: there is no way to know how a chat app would prompt it."""
    try:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    except ImportError:
        raise ConfigError(llama_cpp_missing()) from None
    path = Path(path).expanduser()
    if not path.is_file():
        raise ExportError(f"--gguf {path}: no such file")
    try:
        with _quiet_stderr():
            llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=True, verbose=False,
                        seed=0)
    except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
        raise ExportError(f"--gguf {path}: llama.cpp cannot load it as a model ({e}); a LoRA adapter GGUF needs "
                          "its base model, and a damaged file must be written again") from None
    template = llm.metadata.get("tokenizer.chat_template")
    if not template and not fallback_template:
        llm.close()
        raise ExportError(f"--gguf {path} has no chat template (tokenizer.chat_template): pass --chat-template with "
                          "the template the model was trained with")

    def text(token: int) -> str:
        return llm.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""

    eos = llm.token_eos()
    formatter = Jinja2ChatFormatter(template=template or fallback_template, eos_token=text(eos),
                                    bos_token=text(llm.token_bos()), stop_token_ids=[eos])
    return LoadedGGUF(path, llm, formatter, own_template=bool(template))


def chat_replies(g: LoadedGGUF, conversations: list[tuple[list[dict], list | None]], *, max_tokens: int,
                 progress: bool = True) -> list[GGUFReply]:
    """Greedy replies to (messages, tools) conversations, rendered with the file's chat template."""
    replies = []
    for messages, tools in tqdm(conversations, desc=f"llama.cpp {g.path.name}", unit="row", disable=not progress):
        rendered = g.formatter(messages=messages, tools=tools)
        ids = g.llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)
        out = g.llm.create_completion(ids, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0,
                                      stop=rendered.stop, stopping_criteria=rendered.stopping_criteria)
        choice = out["choices"][0]
        replies.append(GGUFReply(choice["text"], choice["finish_reason"] == "stop", list(ids)))
    return replies


def target_logits(g: LoadedGGUF, ids: list[int], mask: list[bool]) -> np.ndarray:
    """llama.cpp's float32 logits (N, vocab) predicting each target token `ids[t]` (mask[t] True) from ids[:t]."""
    positions = [t - 1 for t in range(1, len(ids)) if mask[t]]
    g.llm.reset()
    g.llm.eval(list(ids[:-1]))
    return np.array(g.llm.scores[positions], dtype=np.float32)


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp logs to file descriptor 2 while loading, past Python's sys.stderr: silence it meanwhile."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
