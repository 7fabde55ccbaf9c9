"""The tokenizer half of a GGUF file: vocabulary, scores, types, merges, special tokens, chat template.

Two kinds exist for llama.cpp: SentencePiece (`tokenizer.ggml.model = llama`, from `tokenizer.model` or
a SentencePiece-style `tokenizer.json`) and byte-level BPE (`gpt2`, from `tokenizer.json`). The one thing
to know: a BPE file also names a *pre-tokenizer* (`tokenizer.ggml.pre`), a regex compiled into llama.cpp.
We pick it from the structure of tokenizer.json (not from a table of hashes, so custom tokenizers work),
then re-tokenize check strings the way llama.cpp would and compare with the Hugging Face tokenizer; the
result is reported in `TokenizerInfo.notes`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import regex
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Tokenizer

from ..errors import ConfigError, ExportError
from ..model_files import read_json
from ..templates import read_model_template

# gguf.TokenType values (identical to SentencePiece's piece types).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Turn markers llama.cpp should treat as end of generation (written as tokenizer.ggml.eot_token_id).
EOT_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")

# --- llama.cpp's BPE pre-tokenizers (src/llama-vocab.cpp): the regexes it runs, in order ---------------
GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# llama.cpp's regex engine has no (?i:...) group, so it spells the contractions out; we compare that way.
CONTRACTIONS_CI = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT4_TAIL = r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_RE = CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|" + _GPT4_TAIL
QWEN2_RE = CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|" + _GPT4_TAIL

# Long-established names first: old Ollama / LM Studio builds reject newer ones.
KNOWN_PRE: dict[str, list[str]] = {
    "gpt-2": [GPT2_RE],
    "llama-bpe": [LLAMA3_RE],
    "qwen2": [QWEN2_RE],
    "starcoder": [r"\p{N}", GPT2_RE],
    "default": [r"[\p{P}\$\+<=>\^~\|]+", GPT2_RE, r"\p{N}+", "[0-9][0-9][0-9]"],
}
# Names llama.cpp accepts whose regexes we do not simulate (accepted with --pre-tokenizer, unchecked).
OTHER_PRE = ("deepseek-llm", "deepseek-coder", "falcon", "mpt", "refact", "command-r", "olmo", "dbrx",
             "smaug-bpe", "stablelm2", "chatglm-bpe", "smollm", "codeshell", "tekken", "poro-chat",
             "bloom", "gpt3-finnish", "exaone", "viking", "jais", "chameleon", "minerva-7b")
# Other names llama.cpp runs with one of the regex sets above (its pre-type switch), for reading GGUF
# files back; `pre_regexes` resolves them.
PRE_ALIASES = {
    "llama3": "llama-bpe", "llama-v3": "llama-bpe", "falcon3": "llama-bpe",
    "smollm": "starcoder", "refact": "starcoder", "command-r": "starcoder", "codeshell": "starcoder",
    "exaone": "starcoder", "minerva-7b": "starcoder",
    "mpt": "gpt-2", "olmo": "gpt-2", "jais": "gpt-2", "phi-2": "gpt-2", "roberta-bpe": "gpt-2",
    "stablelm2": "qwen2", "megrez": "qwen2",
}
# llama.cpp takes a pre-tokenized word that is itself a token whole for these (tokenizer.json's ignore_merges).
IGNORE_MERGES_PRE = ("llama-bpe",)
# ... and adds BOS by default (when the file has no add_bos_token key); SentencePiece always does.
ADD_BOS_PRE = ("llama-bpe", "tekken", "chameleon")


def pre_regexes(name: str) -> tuple[str, list[str]] | None:
    """(canonical name, regexes llama.cpp runs) for pre-tokenizer `name`, or None if we do not know them."""
    name = PRE_ALIASES.get(name, name)
    return (name, KNOWN_PRE[name]) if name in KNOWN_PRE else None

CHECK_STRINGS = [
    "Hello world! How are you today?",
    "  leading spaces,   runs of   spaces\tand\ttabs  ",
    "line one\nline two\n\n\n  indented\r\nwindows",
    "Numbers: 0 7 42 1234567 3.14159 -12,000",
    "I'm sure you're right; WE'LL see what THEY'VE done, isn't it?",
    "Ünïcödé façade naïve café — “quotes” 🙂 日本語 Привет",
    "def add(a, b):\n    return a + b  # sum\n",
    "SELECT name FROM users WHERE age > 30;",
]


@dataclass
class TokenizerInfo:
    """What was (or will be) written to the GGUF file; `notes` say what was chosen and why."""

    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str | None
    tokens: list[str] = field(repr=False)
    types: list[int] = field(repr=False)
    scores: list[float] | None = field(default=None, repr=False)
    merges: list[str] | None = field(default=None, repr=False)
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    eot_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | list | None = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


def add_tokenizer(writer, model_dir, config: dict, pre_tokenizer: str | None = None) -> TokenizerInfo:
    """Read the tokenizer in `model_dir` and write its `tokenizer.*` keys into a `gguf.GGUFWriter`.

    `config` is the model's config.json (its `vocab_size` pads the token list to the embedding rows).
    `pre_tokenizer` overrides the detected BPE pre-tokenizer name. Raises ExportError / ConfigError.
    """
    info = read_tokenizer(model_dir, config, pre_tokenizer)
    write_tokenizer(writer, info)
    return info


def write_tokenizer(writer, info: TokenizerInfo) -> None:
    writer.add_tokenizer_model(info.model)
    if info.pre:
        writer.add_tokenizer_pre(info.pre)
    writer.add_token_list(info.tokens)
    if info.scores is not None:
        writer.add_token_scores(info.scores)
    writer.add_token_types(info.types)
    if info.merges is not None:
        writer.add_token_merges(info.merges)
    for key, value in (("bos", info.bos_id), ("eos", info.eos_id), ("unk", info.unk_id),
                       ("pad", info.pad_id), ("eot", info.eot_id)):
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(value)
    writer.add_add_bos_token(info.add_bos)
    writer.add_add_eos_token(info.add_eos)
    if info.add_space_prefix is not None:
        writer.add_add_space_prefix(info.add_space_prefix)
    if info.chat_template:
        writer.add_chat_template(info.chat_template)


def read_tokenizer(model_dir, config: dict | None = None, pre_tokenizer: str | None = None) -> TokenizerInfo:
    """Everything `add_tokenizer` writes, without a writer (useful to inspect or test)."""
    model_dir = Path(model_dir)
    config = config or {}
    tok_json = read_json(model_dir / "tokenizer.json")
    tok_config = read_json(model_dir / "tokenizer_config.json") or {}
    kind = (tok_json or {}).get("model", {}).get("type")
    byte_level = kind == "BPE" and not _is_spm_style(tok_json)
    spm_file = model_dir / "tokenizer.model"
    if tok_json is None and not spm_file.exists():
        raise ExportError(f"{model_dir} has neither tokenizer.model nor tokenizer.json: copy the tokenizer "
                          "files of the base model into it")
    if tok_json is not None and kind not in ("BPE", "Unigram"):
        raise ExportError(f"{model_dir / 'tokenizer.json'}: tokenizer model type {kind!r} cannot be written "
                          "to GGUF (supported: byte-level BPE and SentencePiece)")
    if byte_level:  # tokenizer.json decides: a stray tokenizer.model (e.g. tiktoken) beside it is not the tokenizer
        info = _from_bpe_json(tok_json)
    elif spm_file.exists():
        try:
            info = _from_sentencepiece(spm_file, tok_json, tok_config)
        except ExportError:
            if tok_json is None:
                raise
            info = _from_spm_json(tok_json, tok_config)
            info.notes.append(f"{spm_file} is not a SentencePiece model: vocabulary read from tokenizer.json")
    else:
        info = _from_spm_json(tok_json, tok_config)

    if info.model == "llama" and info.add_space_prefix and tok_json and \
            '"prepend_scheme": "first"' in json.dumps(tok_json.get("pre_tokenizer")):
        info.notes.append("llama.cpp starts text that follows a special token with a space (SentencePiece's dummy "
                          "prefix) where this tokenizer.json does not (prepend_scheme=first): such prompts tokenize "
                          "slightly differently")
    _pad_to_vocab(info, _vocab_size(config), model_dir)
    _make_unique(info)
    _special_tokens(info, tok_config, config)
    _add_flags(info, model_dir, tok_config)
    info.chat_template = read_model_template(model_dir, tok_config)
    if info.model == "gpt2":
        _choose_pre(info, tok_json, pre_tokenizer, model_dir)
    elif pre_tokenizer:
        info.notes.append(f"--pre-tokenizer {pre_tokenizer} ignored: SentencePiece tokenizers have none")
    return info


# --- readers -------------------------------------------------------------------------------------------

def _added_tokens(tok_json, tok_config) -> dict[int, tuple[str, bool]]:
    """id -> (content, special) from tokenizer.json and tokenizer_config.json's added_tokens_decoder."""
    added: dict[int, tuple[str, bool]] = {}
    for tok in (tok_json or {}).get("added_tokens", []):
        added[int(tok["id"])] = (tok["content"], bool(tok.get("special")))
    for i, tok in (tok_config.get("added_tokens_decoder") or {}).items():
        added.setdefault(int(i), (tok["content"], bool(tok.get("special"))))
    return added


def _from_sentencepiece(path: Path, tok_json, tok_config) -> TokenizerInfo:
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:
        raise ExportError(f"{path} is not a SentencePiece model ({e}): restore it from the base model") from None
    if not proto.pieces:
        raise ExportError(f"{path} is not a SentencePiece model (no pieces): restore it from the base model")
    tokens = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) if 1 <= int(p.type) <= 6 else NORMAL for p in proto.pieces]
    # SentencePiece turns U+2581 into a space when it decodes any piece, user-defined ones included;
    # llama.cpp prints a USER_DEFINED token's text as it is. A user-defined "▁" (the bundled model has
    # one) would print as "▁" in every chat app, so such pieces are typed NORMAL, which llama.cpp unescapes.
    types = [NORMAL if t == USER_DEFINED and "\u2581" in piece else t for t, piece in zip(types, tokens)]
    _apply_added(tokens, types, scores, _added_tokens(tok_json, tok_config))
    info = TokenizerInfo("llama", "default", tokens, types, scores=scores)
    info.add_space_prefix = bool(proto.normalizer_spec.add_dummy_prefix)
    if proto.trainer_spec.model_type == 1:  # UNIGRAM
        info.notes.append("SentencePiece unigram model: llama.cpp merges pieces by score instead of the unigram "
                          "lattice, so some words may be split differently")
    if proto.normalizer_spec.name not in ("identity", ""):
        info.notes.append(f"SentencePiece normalizer {proto.normalizer_spec.name!r} is not applied by llama.cpp")
    return info


def _apply_added(tokens, types, scores, added) -> None:
    """Added tokens: appended after the base vocabulary or retyped in place (score -1000, as llama.cpp's converter)."""
    for i in sorted(added):
        content, special = added[i]
        while len(tokens) <= i:
            tokens.append(f"[PAD{len(tokens)}]")
            types.append(UNUSED)
            if scores is not None:
                scores.append(-1000.0)
        if types[i] in (UNKNOWN, BYTE) and tokens[i] == content:
            continue  # <unk> and <0xNN> keep their own type
        tokens[i] = content
        types[i] = CONTROL if special else USER_DEFINED
        if scores is not None:
            scores[i] = -1000.0


def _is_spm_style(tok_json) -> bool:
    """A SentencePiece tokenizer saved as tokenizer.json (▁ for spaces and <0xNN> byte fallback)."""
    model = tok_json.get("model", {})
    if model.get("byte_fallback"):
        return True
    text = json.dumps([tok_json.get("normalizer"), tok_json.get("pre_tokenizer")], ensure_ascii=False)
    return "Metaspace" in text or "\u2581" in text


def _from_spm_json(tok_json, tok_config) -> TokenizerInfo:
    model = tok_json["model"]
    added = _added_tokens(tok_json, tok_config)
    notes = []
    if model["type"] == "Unigram":
        notes.append("unigram tokenizer: llama.cpp merges pieces by score instead of the unigram lattice, "
                     "so some words may be split differently")
        pieces = [(p, float(s)) for p, s in model["vocab"]]
        tokens = [p for p, _ in pieces]
        scores = [s for _, s in pieces]
    else:
        vocab = model["vocab"]
        tokens = [f"[PAD{i}]" for i in range(max(vocab.values()) + 1)]
        for t, i in vocab.items():
            tokens[i] = t
        # No SentencePiece scores survive in a BPE tokenizer.json; llama.cpp's SentencePiece tokenizer merges
        # the highest-scoring pair first, so -rank of the merge that makes a token reproduces BPE order.
        merges = _merge_strings(model.get("merges", []))
        rank: dict[str, int] = {}
        for r, m in enumerate(merges):
            left, _, right = m.partition(" ")
            rank.setdefault(left + right, r)
        n = len(merges)
        scores = [-float(rank[t]) if t in rank else -float(n + i) for i, t in enumerate(tokens)]
    unk = model.get("unk_token") or _token_text(tok_config.get("unk_token")) if model["type"] == "BPE" else None
    unk_id = model.get("unk_id") if model["type"] == "Unigram" else None
    types = []
    for i, t in enumerate(tokens):
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
            types.append(BYTE)
        elif t == unk or i == unk_id:
            types.append(UNKNOWN)
        else:
            types.append(NORMAL)
    _apply_added(tokens, types, scores, added)
    info = TokenizerInfo("llama", "default", tokens, types, scores=scores)
    text = json.dumps([tok_json.get("normalizer"), tok_json.get("pre_tokenizer")], ensure_ascii=False)
    # transformers 4 wrote a Prepend("▁") normalizer; tokenizers >= 0.14 a Metaspace prepend_scheme
    # (older files: add_prefix_space without a scheme).
    info.add_space_prefix = ('"Prepend"' in text or '"prepend_scheme": "always"' in text
                             or '"prepend_scheme": "first"' in text
                             or ('"add_prefix_space": true' in text and "prepend_scheme" not in text))
    info.notes.extend(notes or ["SentencePiece vocabulary read from tokenizer.json (no tokenizer.model): "
                                "scores rebuilt from the merge order"])
    return info


def _merge_strings(merges) -> list[str]:
    # tokenizers >= 0.20 stores merges as pairs; older files as "left right". A space inside a part would
    # be read by llama.cpp as the separator, so it becomes U+0120 as in byte-level vocabularies.
    out = []
    for m in merges:
        if isinstance(m, str):
            out.append(m)
        else:
            out.append(" ".join(part.replace(" ", "\u0120") for part in m))
    return out


def _from_bpe_json(tok_json) -> TokenizerInfo:
    model = tok_json["model"]
    vocab: dict[str, int] = model["vocab"]
    added = _added_tokens(tok_json, {})
    size = max([*vocab.values(), *added.keys()]) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED] * size
    for t, i in vocab.items():
        tokens[i] = t
        types[i] = NORMAL
    _apply_added(tokens, types, None, added)
    return TokenizerInfo("gpt2", None, tokens, types, merges=_merge_strings(model.get("merges", [])))


# --- vocabulary fix-ups --------------------------------------------------------------------------------

def _vocab_size(config: dict) -> int | None:
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(size) if size else None


def _pad_to_vocab(info: TokenizerInfo, vocab_size: int | None, model_dir: Path) -> None:
    """The token list must have exactly as many entries as the embedding has rows."""
    if vocab_size is None or vocab_size == info.n_tokens:
        return
    if info.n_tokens > vocab_size:
        extra = info.tokens[vocab_size:]
        if all(t.startswith("[PAD") for t in extra):
            del info.tokens[vocab_size:], info.types[vocab_size:]
            if info.scores is not None:
                del info.scores[vocab_size:]
            return
        raise ExportError(f"{model_dir}: the tokenizer has {info.n_tokens} tokens but config.json vocab_size is "
                          f"{vocab_size}: the tokenizer does not belong to these weights")
    for i in range(info.n_tokens, vocab_size):
        info.tokens.append(f"[PAD{i}]")
        info.types.append(UNUSED)
        if info.scores is not None:
            info.scores.append(-10000.0)


def _make_unique(info: TokenizerInfo) -> None:
    # A duplicate token string aborts llama.cpp; keep the first and park the others as unused.
    seen: set[str] = set()
    dups = []
    for i, t in enumerate(info.tokens):
        if t in seen:
            info.tokens[i] = f"[PAD{i}]"
            info.types[i] = UNUSED
            dups.append(f"{t!r}@{i}")
        seen.add(t)
    if dups:
        info.notes.append(f"duplicate token strings renamed to [PAD<id>]: {', '.join(dups[:5])}")


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(info: TokenizerInfo, tok_config: dict, config: dict) -> None:
    index = {t: i for i, t in enumerate(info.tokens)}

    def lookup(name: str, config_key: str):
        text = _token_text(tok_config.get(name))
        if text is not None and text in index:
            return index[text]
        value = config.get(config_key)
        if isinstance(value, list):
            value = value[0] if value else None
        return int(value) if isinstance(value, int) and 0 <= value < info.n_tokens else None

    info.bos_id = lookup("bos_token", "bos_token_id")
    info.eos_id = lookup("eos_token", "eos_token_id")
    info.unk_id = lookup("unk_token", "unk_token_id")
    info.pad_id = lookup("pad_token", "pad_token_id")
    if info.unk_id is None and UNKNOWN in info.types:
        info.unk_id = info.types.index(UNKNOWN)
    for text in EOT_TOKENS:
        if text in index:
            info.eot_id = index[text]
            break


def _add_flags(info: TokenizerInfo, model_dir: Path, tok_config: dict) -> None:
    """add_bos/add_eos as the Hugging Face tokenizer behaves (what transformers 5 does, without importing it)."""
    observed = _observe_specials(model_dir, info)
    if observed is not None:
        info.add_bos, info.add_eos = observed
        return
    # Only tokenizer.model: trust the config, else llama.cpp's defaults (BOS for SentencePiece).
    info.add_bos = bool(tok_config.get("add_bos_token", info.model == "llama" and info.bos_id is not None))
    info.add_eos = bool(tok_config.get("add_eos_token", False))


def _observe_specials(model_dir: Path, info: TokenizerInfo):
    """(add_bos, add_eos) from tokenizer.json, read with the `tokenizers` library, or None without one.

    transformers would cost ~300 MB and seconds to import (it pulls in torch), so we follow its rule
    instead (transformers 5): with a tokenizer.json, tokenizer_config.json's add_bos_token/add_eos_token
    are dropped and tokenizer.json's post-processor decides; we observe it by encoding one word.
    """
    path = model_dir / "tokenizer.json"
    if not path.exists():
        return None
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception:
        return None
    with_special = tok.encode("a", add_special_tokens=True).ids
    plain = tok.encode("a", add_special_tokens=False).ids
    if not plain or len(with_special) < len(plain):
        return None
    add_bos = info.bos_id is not None and with_special[:1] == [info.bos_id] and plain[:1] != [info.bos_id]
    add_eos = info.eos_id is not None and with_special[-1:] == [info.eos_id] and plain[-1:] != [info.eos_id]
    return add_bos, add_eos


# --- BPE pre-tokenizer: detect from structure, then check by tokenizing ---------------------------------

def _normalize_regex(pattern: str) -> str:
    return pattern.replace(CONTRACTIONS_CI, CONTRACTIONS)


def pre_tokenizer_regexes(tok_json) -> list[str] | None:
    """The regex list llama.cpp would have to run for tokenizer.json's pre_tokenizer, or None if not expressible."""
    pre = tok_json.get("pre_tokenizer")
    if pre is None:
        return None
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    exprs: list[str] = []
    byte_level = False
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            byte_level = True
            if step.get("use_regex", True):
                exprs.append(GPT2_RE)
            if step.get("add_prefix_space"):
                return None  # llama.cpp's BPE never prepends a space
        elif kind == "Split":
            pattern = step.get("pattern", {})
            if "Regex" in pattern:
                exprs.append(_normalize_regex(pattern["Regex"]))
            elif "String" in pattern:
                exprs.append(re.escape(pattern["String"]))
            else:
                return None
            if step.get("behavior", "Isolated") != "Isolated" or step.get("invert"):
                return None
        elif kind == "Digits":
            exprs.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        else:
            return None
    return exprs if byte_level else None


def _choose_pre(info: TokenizerInfo, tok_json, override: str | None, model_dir: Path) -> None:
    if override and override not in KNOWN_PRE and override not in OTHER_PRE:
        known = ", ".join([*KNOWN_PRE, *OTHER_PRE])
        raise ConfigError(f"--pre-tokenizer {override} is not a llama.cpp pre-tokenizer; known: {known}")
    exprs = pre_tokenizer_regexes(tok_json)
    structural = next((name for name, known in KNOWN_PRE.items() if exprs == known), None)
    try:
        reference = reference_ids(tok_json)  # the HF tokenizer's ids for the check strings
    except Exception as e:  # tokenizers cannot read this file: choose without the cross-check
        info.pre = override or structural or "gpt-2"
        info.notes.append(f"warning: {model_dir / 'tokenizer.json'} could not be loaded by the tokenizers library "
                          f"({e}); pre-tokenizer {info.pre} chosen without checking tokenizations")
        return

    def score(name: str) -> tuple[int, int]:
        return _score(info, name, reference)

    if override:
        info.pre = override
        if override in KNOWN_PRE:
            ok, total = score(override)
            info.notes.append(f"pre-tokenizer {override} (from --pre-tokenizer): {ok}/{total} check strings "
                              "tokenize exactly like the Hugging Face tokenizer")
        else:
            info.notes.append(f"pre-tokenizer {override} (from --pre-tokenizer), not cross-checked")
        return

    if structural:
        ok, total = score(structural)
        info.pre = structural
        info.notes.append(f"pre-tokenizer {structural} (matches tokenizer.json's pre_tokenizer): "
                          f"{ok}/{total} check strings tokenize exactly like the Hugging Face tokenizer")
        if ok == total:
            return
    # Unknown structure (or a structural match that tokenizes differently): try each known regex set.
    results = {name: score(name) for name in KNOWN_PRE}
    best = max(results, key=lambda n: results[n][0])  # dict order breaks ties toward older names
    if structural and results[structural][0] >= results[best][0]:
        best = structural
    ok, total = results[best]
    info.pre = best
    summary = ", ".join(f"{n} {r[0]}/{r[1]}" for n, r in results.items())
    if ok == total:
        info.notes.append(f"pre-tokenizer {best}: tokenizer.json's pre_tokenizer is not one llama.cpp knows by "
                          f"structure; chose by comparing tokenizations ({summary})")
    else:
        info.notes.append(f"warning: no llama.cpp pre-tokenizer reproduces {model_dir / 'tokenizer.json'} exactly "
                          f"({summary}); using {best}, the closest. Pass --pre-tokenizer NAME to choose another")


def reference_ids(tok_json, strings=CHECK_STRINGS) -> list[list[int]]:
    """The Hugging Face tokenizer's ids for `strings` (no special tokens added)."""
    reference = Tokenizer.from_str(json.dumps(tok_json))
    return [reference.encode(s, add_special_tokens=False).ids for s in strings]


def check_pre(info: TokenizerInfo, tok_json, name: str, strings=CHECK_STRINGS) -> tuple[int, int]:
    """How many check strings llama.cpp would tokenize like the HF tokenizer with pre-tokenizer `name`."""
    return _score(info, name, reference_ids(tok_json, strings), strings)


def _score(info: TokenizerInfo, name: str, reference: list[list[int]], strings=CHECK_STRINGS) -> tuple[int, int]:
    bpe = SimulatedBPE(info.tokens, info.merges or [], KNOWN_PRE[name], ignore_merges=name == "llama-bpe")
    return sum(bpe.encode(s) == ids for s, ids in zip(strings, reference)), len(strings)


def _byte_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character table (bytes that print stay themselves).
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class SimulatedBPE:
    """llama.cpp's byte-level BPE in a few lines: split by each regex in turn, map bytes, merge by rank."""

    def __init__(self, tokens: list[str], merges: list[str], exprs: list[str], ignore_merges: bool = False):
        # llama.cpp's llama-bpe takes a word that is itself a token whole (tokenizer.json's ignore_merges)
        self.ignore_merges = ignore_merges
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges) if " " in m}
        self.exprs = [regex.compile(e) for e in exprs]
        self.byte_map = _byte_to_unicode()

    def split(self, text: str) -> list[str]:
        pieces = [text]
        for expr in self.exprs:
            out = []
            for piece in pieces:
                pos = 0
                for m in expr.finditer(piece):
                    if m.start() > pos:
                        out.append(piece[pos:m.start()])
                    if m.end() > m.start():
                        out.append(m.group())
                    pos = m.end()
                if pos < len(piece):
                    out.append(piece[pos:])
            pieces = out
        return pieces

    def encode(self, text: str) -> list[int]:
        out = []
        for word in self.split(text):
            symbols = [self.byte_map[b] for b in word.encode("utf-8")]
            if self.ignore_merges and "".join(symbols) in self.ids:
                symbols = ["".join(symbols)]
            while len(symbols) > 1:
                pairs = [(self.ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
                pairs = [(r, i) for r, i in pairs if r is not None]
                if not pairs:
                    break
                _, i = min(pairs)
                symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
            out.extend(self.ids[s] for s in symbols if s in self.ids)
        return out
