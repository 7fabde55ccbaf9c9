"""Text generation and an interactive chat loop: `mlxtune generate`, `mlxtune chat`, `mlxtune.generate(...)`.

Prompts go through the tokenizer's chat template by default (what the model was tuned on), and generation
stops at the first EOS or end-of-turn token. The one thing to know: temperature 0 means greedy decoding,
which is deterministic; the token loop and KV cache are mlx-lm's `generate_step` (or, for a transformers
model on `--backend torch`, `mlxtune.torch_generation.stream`), the stop rules are ours.
"""

from __future__ import annotations

import builtins
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TextIO

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler as _make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .adapters import load_adapter
from .backends import is_torch_model, select_backend, torch_module
from .errors import ConfigError
from .models import load_model
from .templates import prompt_ids

# End-of-turn markers of common chat templates. Many configs name only the end-of-text token as EOS, so a
# chat model would run on past its turn; these are added to the stop set when the vocabulary has them.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|end|>", "<|endoftext|>",
                      "</s>", "<|eom_id|>")


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    generate_seconds: float = 0.0
    finish_reason: str = "length"  # "stop" (EOS / end of turn) or "length" (hit max_tokens)

    @property
    def tokens_per_sec(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds > 0 else 0.0

    @property
    def prompt_tokens_per_sec(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    def summary(self) -> str:
        return (f"Prompt: {self.prompt_tokens} tokens, {self.prompt_tokens_per_sec:.1f} tokens/sec | "
                f"Generation: {self.generated_tokens} tokens, {self.tokens_per_sec:.1f} tokens/sec")


@dataclass
class Generation:
    text: str
    stats: GenerationStats = field(default_factory=GenerationStats)


def wrap_tokenizer(tokenizer):
    """mlx-lm's TokenizerWrapper around a plain Hugging Face tokenizer (a wrapper is returned as is)."""
    return tokenizer if isinstance(tokenizer, TokenizerWrapper) else TokenizerWrapper(tokenizer)


def stop_token_ids(tokenizer) -> set[int]:
    """EOS ids of the tokenizer/config plus the end-of-turn tokens its vocabulary has."""
    stops = set(getattr(tokenizer, "eos_token_ids", None) or [])
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    if hf.eos_token_id is not None:
        stops.add(hf.eos_token_id)
    # Only as special tokens: in some vocabularies "</s>" is also plain text.
    special = dict(hf.get_added_vocab())
    vocab = hf.get_vocab()
    special.update({t: vocab[t] for t in getattr(hf, "all_special_tokens", []) if t in vocab})
    for token in END_OF_TURN_TOKENS:
        if token in special:
            stops.add(special[token])
    return stops


def resolve(model, tokenizer=None, adapter_file=None, backend: str = "auto"):
    """(model, tokenizer) from a loaded pair, or load them from a path / hub id (with an optional adapter).

    A path is loaded by `backend` (auto, mlx or torch; `mlxtune.backends`); a loaded model keeps its own.
    """
    if isinstance(model, (str, os.PathLike)):
        chosen = select_backend(backend)
        if chosen.name == "torch":
            loaded = torch_module("torch_models").load_torch_model(model, device=chosen.device)
        else:
            loaded = load_model(model)
        model, tokenizer = loaded.model, loaded.tokenizer
    elif tokenizer is None:
        raise ConfigError("generate(model, tokenizer, ...): pass the tokenizer with a loaded model, or a model path")
    if adapter_file is not None:
        if is_torch_model(model):
            torch_module("torch_models").load_adapter(model, adapter_file, dropout=0.0)
        else:
            load_adapter(model, adapter_file, dropout=0.0)
    return model, wrap_tokenizer(tokenizer)


def render_messages(tokenizer, messages: list[dict], *, tools: list | None = None,
                    chat_template: str | None = None) -> list[int]:
    """Token ids of `messages` through the chat template, ending with the assistant's generation prompt.

    The same rendering training uses (`mlxtune.templates`): the tokenizer's own template, or ChatML when
    it has none, encoded without extra special tokens since the template writes BOS itself.
    """
    return prompt_ids(tokenizer, messages, tools=tools, template=chat_template)


def render_prompt(tokenizer, prompt: str, *, system: str | None = None, chat: bool = True,
                  history: list[dict] | None = None) -> list[int]:
    """Prompt token ids: chat template over [system] + history + user prompt, or the plain text with BOS."""
    if not chat:
        if system:
            raise ConfigError("--system needs the chat template: drop --no-chat or put the system text in the prompt")
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        ids = list(hf.encode(prompt, add_special_tokens=True))
        if not ids:
            raise ConfigError("the prompt is empty: pass some text with --prompt")
        return ids
    messages = ([{"role": "system", "content": system}] if system else []) + list(history or [])
    messages.append({"role": "user", "content": prompt})
    return render_messages(tokenizer, messages)


def make_sampler(temp: float = 0.0, top_p: float = 0.0):
    if temp < 0:
        raise ConfigError(f"--temp must be >= 0 (0 = greedy), got {temp}")
    if not 0.0 <= top_p <= 1.0:
        raise ConfigError(f"--top-p must be between 0 and 1, got {top_p}")
    return _make_sampler(temp=temp, top_p=top_p)


def generate_ids(model, tokenizer, prompt_ids: list[int], *, max_tokens: int = 256, temp: float = 0.0,
                 top_p: float = 0.0, seed: int | None = None, on_text: Callable[[str], None] | None = None,
                 stops: Iterable[int] | None = None) -> Generation:
    """Generate from token ids with a KV cache; `on_text` receives each decoded piece as it arrives."""
    if max_tokens <= 0:
        raise ConfigError(f"--max-tokens must be a positive integer, got {max_tokens}")
    if not prompt_ids:
        raise ConfigError("the prompt is empty: pass some text with --prompt")
    tokenizer = wrap_tokenizer(tokenizer)
    sampler = make_sampler(temp, top_p)
    if is_torch_model(model):
        tokens = torch_module("torch_generation").stream(model, prompt_ids, max_tokens=max_tokens, temp=temp, top_p=top_p,
                                                         seed=seed)
    else:
        if seed is not None:
            mx.random.seed(seed)
        tokens = (t for t, _ in generate_step(mx.array(prompt_ids), model, max_tokens=max_tokens, sampler=sampler))
    stops = stop_token_ids(tokenizer) if stops is None else set(stops)
    detok = tokenizer.detokenizer
    stats = GenerationStats(prompt_tokens=len(prompt_ids))
    pieces: list[str] = []

    def emit(piece: str) -> None:
        if piece:
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)

    start = time.perf_counter()
    first = None
    for n, token in enumerate(tokens):
        if first is None:  # the first token arrives when the prompt has been processed
            first = time.perf_counter()
            stats.prompt_seconds = first - start
        if token in stops:
            stats.finish_reason = "stop"
            break
        detok.add_token(token)
        stats.generated_tokens = n + 1
        emit(detok.last_segment)
    detok.finalize()
    emit(detok.last_segment)
    if first is not None:
        stats.generate_seconds = time.perf_counter() - first
    return Generation(text="".join(pieces), stats=stats)


def generate_with_stats(model, tokenizer=None, prompt: str = "", *, adapter_file=None, max_tokens: int = 256,
                        temp: float = 0.0, top_p: float = 0.0, seed: int | None = None, system: str | None = None,
                        chat: bool = True, messages: list[dict] | None = None,
                        on_text: Callable[[str], None] | None = None, backend: str = "auto") -> Generation:
    """Like `generate` but also returns token counts and timings."""
    model, tokenizer = resolve(model, tokenizer, adapter_file, backend)
    if messages is not None:
        ids = render_messages(tokenizer, messages)
    else:
        ids = render_prompt(tokenizer, prompt, system=system, chat=chat)
    return generate_ids(model, tokenizer, ids, max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed,
                        on_text=on_text)


def generate(model, tokenizer=None, prompt: str = "", *, adapter_file=None, max_tokens: int = 256,
             temp: float = 0.0, top_p: float = 0.0, seed: int | None = None, system: str | None = None,
             chat: bool = True, messages: list[dict] | None = None, verbose: bool = False,
             backend: str = "auto") -> str:
    """Generate a reply and return its text.

    `model` is a loaded model (then pass `tokenizer`) or a model path / hub id (then `adapter_file` may
    name a LoRA adapter to apply). By default the prompt goes through the chat template as a user turn
    (after `system`, if given); `chat=False` sends it as plain text; `messages` gives a whole conversation.
    `temp=0` is greedy and deterministic; `seed` fixes sampling at `temp > 0`. `verbose` streams to stdout.
    `backend` (auto, mlx, torch) loads a model path with MLX or with transformers (`mlxtune.backends`).
    """
    def show(piece: str) -> None:
        print(piece, end="", flush=True)

    result = generate_with_stats(model, tokenizer, prompt, adapter_file=adapter_file, max_tokens=max_tokens,
                                 temp=temp, top_p=top_p, seed=seed, system=system, chat=chat, messages=messages,
                                 on_text=show if verbose else None, backend=backend)
    if verbose:
        print()
        print(result.stats.summary())
    return result.text


def chat(model, tokenizer=None, *, adapter_file=None, system: str | None = None, max_tokens: int = 512,
         temp: float = 0.0, top_p: float = 0.0, seed: int | None = None, input: TextIO | None = None,
         output: TextIO | None = None, prompt_marker: str = ">> ") -> list[dict]:
    """Interactive multi-turn chat; returns the conversation.

    Reads one user message per line from `input` (the terminal or a notebook's input box by default; piped
    stdin works too); the model's reply streams to `output`. `/reset` forgets the conversation, `/exit`
    (or end of input, Ctrl-D) ends it; in a terminal Ctrl-C stops a reply and keeps the conversation.
    """
    model, tokenizer = resolve(model, tokenizer, adapter_file)
    input = input or sys.stdin
    output = output or sys.stdout
    # A terminal, or a notebook (whose stdin is not a tty but whose input() asks the user).
    interactive = (hasattr(input, "isatty") and input.isatty()) or (input is sys.stdin and "ipykernel" in sys.modules)
    if seed is not None:
        mx.random.seed(seed)
    history: list[dict] = []

    def write(text: str) -> None:
        output.write(text)
        output.flush()

    if interactive:
        write("Chat with the model: /reset starts over, /exit or Ctrl-D quits, Ctrl-C stops a reply.\n")
    while True:
        text = _read_line(input, prompt_marker if interactive else None, output)
        if text is None:  # end of input
            break
        if not text.strip():
            continue
        command = text.strip().lower()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            history = []
            write("[conversation reset]\n")
            continue
        ids = render_prompt(tokenizer, text, system=system, history=history)
        pieces: list[str] = []

        def show(piece: str, pieces: list[str] = pieces) -> None:
            pieces.append(piece)
            write(piece)

        try:
            reply = generate_ids(model, tokenizer, ids, max_tokens=max_tokens, temp=temp, top_p=top_p,
                                 on_text=show).text
        except KeyboardInterrupt:
            if not interactive:
                raise
            reply = "".join(pieces)  # keep what was said so far; the conversation goes on
            write(" [stopped]")
        write("\n")
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
    return ([{"role": "system", "content": system}] if system else []) + history


def _read_line(input: TextIO, marker: str | None, output: TextIO) -> str | None:
    """One line of user input without its newline, or None at end of input.

    The terminal goes through `input()` so that line editing and history (readline) work.
    """
    if marker is not None and input is sys.stdin:
        try:
            import readline  # noqa: F401  (line editing for input())
        except ImportError:
            pass
        try:
            return builtins.input(marker)
        except EOFError:
            output.write("\n")
            output.flush()
            return None
    if marker is not None:
        output.write(marker)
        output.flush()
    line = input.readline()
    return line.rstrip("\n") if line else None
