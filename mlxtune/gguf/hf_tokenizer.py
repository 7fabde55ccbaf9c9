"""A GGUF file's tokenizer as Hugging Face files (tokenizer.json, tokenizer_config.json) that tokenize
the way llama.cpp does.

Built with the `tokenizers` library from the `tokenizer.ggml.*` keys:

- `gpt2` (byte-level BPE): the token list and merges, the pre-tokenizer regexes llama.cpp runs for
  `tokenizer.ggml.pre` (the table in `tokenizer.py`, shared with the writer), then byte-level mapping.
- `llama` (SentencePiece): llama.cpp merges the adjacent pair whose joined text is the highest-scoring
  token, falling back to `<0xNN>` byte tokens. That is BPE whose merges are every split of every token,
  ranked by the joined token's score; spaces become `▁`, with one prepended to each run of text when
  `add_space_prefix` is set (llama.cpp does it again after every special token, as a normalizer does
  per segment).

The one thing to know: the reference is llama.cpp, not the original Hugging Face tokenizer (which the
file may not describe exactly): tokens typed CONTROL, USER_DEFINED or UNKNOWN are matched in the text
before anything else, as llama.cpp does when it parses special tokens, and BOS/EOS are added as the
file's `add_bos_token`/`add_eos_token` (or llama.cpp's defaults) say.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ..errors import ModelLoadError
from .reader import GGUFFile
from .tokenizer import (
    ADD_BOS_PRE,
    BYTE,
    CONTROL,
    EOT_TOKENS,
    IGNORE_MERGES_PRE,
    KNOWN_PRE,
    NORMAL,
    PRE_ALIASES,
    UNKNOWN,
    USER_DEFINED,
    pre_regexes,
)

# Texts llama.cpp treats as end-of-generation tokens and retypes as CONTROL whatever the file says.
CONTROL_LOOKING = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
                   "<EOT>", "_<EOT>", "<|end_of_text|>", "<｜end▁of▁sentence｜>")


@dataclass
class ImportedTokenizer:
    """What was written, and notes on choices the summary line should mention."""

    model: str  # gpt2 | llama
    pre: str | None
    n_tokens: int
    bos_id: int | None
    eos_ids: list[int]
    add_bos: bool
    add_eos: bool
    chat_template: bool
    notes: list[str] = field(default_factory=list)


def _key(g: GGUFFile, name: str, default=None):
    return g.fields.get(f"tokenizer.ggml.{name}", default)


def _token_id(g: GGUFFile, name: str, n: int) -> int | None:
    value = _key(g, f"{name}_token_id")
    return int(value) if value is not None and 0 <= int(value) < n else None


def build_tokenizer(g: GGUFFile) -> tuple[Tokenizer, ImportedTokenizer]:
    """The `tokenizers` Tokenizer for `g`'s vocabulary, and a summary."""
    kind = _key(g, "model")
    tokens = _key(g, "tokens")
    if kind not in ("gpt2", "llama"):
        raise ModelLoadError(f"{g.path}: tokenizer.ggml.model {kind!r} cannot be imported "
                             "(supported: gpt2 = byte-level BPE, llama = SentencePiece)")
    if not isinstance(tokens, list) or not tokens:
        raise ModelLoadError(f"{g.path}: tokenizer.ggml.tokens is missing or empty: the file has no vocabulary")
    n = len(tokens)
    types = _key(g, "token_type")
    types = [int(t) for t in types] if types is not None else [NORMAL] * n
    if len(types) != n:
        raise ModelLoadError(f"{g.path}: tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
    for i, t in enumerate(tokens):
        if t in CONTROL_LOOKING and types[i] not in (CONTROL, UNKNOWN):
            types[i] = CONTROL
    info = ImportedTokenizer(kind, None, n, _token_id(g, "bos", n), [], False, False, False)
    eos, eot = _token_id(g, "eos", n), _token_id(g, "eot", n)
    if eot is None:  # llama.cpp also stops at a turn marker it finds by its text
        eot = next((tokens.index(t) for t in EOT_TOKENS if t in tokens), None)
    info.eos_ids = [i for i in (eos, eot) if i is not None]
    info.eos_ids = list(dict.fromkeys(info.eos_ids))

    if kind == "gpt2":
        tok = _byte_level(g, tokens, info)
    else:
        tok = _sentencepiece(g, tokens, types, info)

    # Special and user-defined tokens are matched in raw text first, like llama.cpp's partition step.
    added = [AddedToken(tokens[i], special=types[i] in (CONTROL, UNKNOWN), normalized=False)
             for i in range(n) if types[i] in (CONTROL, USER_DEFINED, UNKNOWN)]
    tok.add_tokens(added)

    default_bos = kind == "llama" or info.pre in ADD_BOS_PRE
    info.add_bos = bool(_key(g, "add_bos_token", default_bos)) and info.bos_id is not None
    info.add_eos = bool(_key(g, "add_eos_token", False)) and eos is not None
    single = ([f"{tokens[info.bos_id]}:0"] if info.add_bos else []) + ["$A:0"] + ([f"{tokens[eos]}:0"] if info.add_eos else [])
    pair = single + ["$B:1"] + ([f"{tokens[eos]}:1"] if info.add_eos else [])
    specials = {tokens[i]: i for i in ([info.bos_id] if info.add_bos else []) + ([eos] if info.add_eos else [])}
    if specials:
        tok.post_processor = processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair),
                                                           special_tokens=list(specials.items()))
    return tok, info


def _byte_level(g: GGUFFile, tokens: list[str], info: ImportedTokenizer) -> Tokenizer:
    merges = _key(g, "merges")
    if not isinstance(merges, list):
        raise ModelLoadError(f"{g.path}: tokenizer.ggml.merges is missing: a gpt2 (BPE) tokenizer needs its merges")
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if sep:
            pairs.append((left, right))
    pre = _key(g, "pre") or "default"
    if not _key(g, "pre"):
        info.notes.append("no tokenizer.ggml.pre: llama.cpp's generic 'default' pre-tokenizer used, as llama.cpp does")
    found = pre_regexes(pre)
    if found is None:
        known = ", ".join(sorted({*KNOWN_PRE, *PRE_ALIASES}))
        raise ModelLoadError(f"{g.path}: tokenizer.ggml.pre {pre!r} is a pre-tokenizer whose splitting rules "
                             f"mlxtune does not know, so it cannot tokenize like llama.cpp (known: {known})")
    canonical, regexes = found
    info.pre = pre
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, pairs, ignore_merges=canonical in IGNORE_MERGES_PRE))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(g: GGUFFile, tokens: list[str], types: list[int], info: ImportedTokenizer) -> Tokenizer:
    n = len(tokens)
    scores = _key(g, "scores")
    scores = [float(s) for s in scores] if scores is not None else [0.0] * n
    if len(scores) != n:
        raise ModelLoadError(f"{g.path}: tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
    vocab = {t: i for i, t in enumerate(tokens)}
    # llama.cpp joins adjacent pieces into any token of the vocabulary (byte tokens excepted), best score first
    ranked = []
    for i, t in enumerate(tokens):
        if types[i] == BYTE or len(t) < 2:
            continue
        for cut in range(1, len(t)):
            left, right = t[:cut], t[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, vocab[left], left, right))
    ranked.sort()
    unk = _token_id(g, "unknown", n)
    if unk is None and UNKNOWN in types:
        unk = types.index(UNKNOWN)
    model = models.BPE(vocab, [(r[3], r[4]) for r in ranked], unk_token=tokens[unk] if unk is not None else None,
                       byte_fallback=BYTE in types, fuse_unk=True)
    tok = Tokenizer(model)
    space_prefix = bool(g.fields.get("tokenizer.ggml.add_space_prefix", True))
    replace = normalizers.Replace(" ", "\u2581")
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), replace]) if space_prefix else replace
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def write_hf_tokenizer(g: GGUFFile, out: Path) -> ImportedTokenizer:
    """Write tokenizer.json and tokenizer_config.json for `g` into directory `out`."""
    tok, info = build_tokenizer(g)
    tok.save(str(out / "tokenizer.json"))
    tokens = _key(g, "tokens")
    n = len(tokens)

    def text(i):
        return tokens[i] if i is not None else None

    template = g.fields.get("tokenizer.chat_template")
    info.chat_template = bool(template)
    pad = _token_id(g, "padding", n)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": text(info.bos_id),
        "eos_token": text(info.eos_ids[0]) if info.eos_ids else None,
        "unk_token": text(_token_id(g, "unknown", n)),
        "pad_token": text(pad),
        "add_bos_token": info.add_bos,
        "add_eos_token": info.add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(g.get("{arch}.context_length", 4096)),
    }
    config = {k: v for k, v in config.items() if v is not None}
    if template:
        config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return info
