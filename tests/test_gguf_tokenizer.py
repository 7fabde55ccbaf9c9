"""GGUF tokenizer metadata: read back with gguf.GGUFReader, and tokenized by llama.cpp itself.

llama.cpp's tokenization (`Llama(path, vocab_only=True).tokenize`) must equal the Hugging Face tokenizer's on
strings with unicode, digits, whitespace runs and special tokens, for a SentencePiece tokenizer (trained here
with byte fallback) and a byte-level BPE one.
"""

from __future__ import annotations

import json
import re
import shutil

import gguf
import pytest

from mlxtune.errors import ConfigError, ExportError
from mlxtune.gguf.tokenizer import (
    BYTE,
    CONTROL,
    GPT2_RE,
    LLAMA3_RE,
    NORMAL,
    QWEN2_RE,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    pre_tokenizer_regexes,
    read_tokenizer,
)

from spm import make_spm_tokenizer, write_vocab_gguf
from tiny import CHATML_TEMPLATE, make_bpe_tokenizer

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Numbers: 0 1 2 3 42 1000 3.14 and 1234567890",
    "  two leading spaces,   three inside\tand a tab  ",
    "new\nlines\n\n\nand\r\nwindows",
    "Ünïcödé façade naïve café — “quotes” 🙂 日本語",
    "def add(a, b):\n    return a + b\n",
    "I'm sure you're right, WE'LL see",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>more <|im_start|> spaced",
]


def field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return make_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    return make_spm_tokenizer(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def spm_json_dir(spm_dir, tmp_path_factory):
    """The same SentencePiece tokenizer as transformers 5 saves it: tokenizer.json only."""
    out = tmp_path_factory.mktemp("spm_json")
    for f in spm_dir.iterdir():
        if f.name != "tokenizer.model":
            shutil.copy(f, out / f.name)
    return out


def hf_ids(model_dir, text):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))(text, add_special_tokens=False)["input_ids"]


def test_bpe_metadata(bpe_dir, tmp_path):
    vocab = json.loads((bpe_dir / "tokenizer.json").read_text())["model"]
    path = tmp_path / "bpe.gguf"
    info = write_vocab_gguf(path, bpe_dir, {"vocab_size": len(vocab["vocab"]) + 12})
    reader = gguf.GGUFReader(str(path))
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert len(tokens) == len(vocab["vocab"]) + 12 == info.n_tokens
    assert tokens[: len(vocab["vocab"])] == sorted(vocab["vocab"], key=vocab["vocab"].get)
    assert tokens[-1] == f"[PAD{len(tokens) - 1}]"
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[:6] == [CONTROL] * 6 and types[6] == NORMAL and types[-1] == UNUSED
    assert field(reader, "tokenizer.ggml.merges") == [" ".join(m) for m in vocab["merges"]]
    assert "tokenizer.ggml.scores" not in reader.fields
    assert (field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id")) == (1, 5)
    assert (field(reader, "tokenizer.ggml.unknown_token_id"), field(reader, "tokenizer.ggml.padding_token_id")) == (0, 3)
    assert field(reader, "tokenizer.ggml.eot_token_id") == 5
    assert field(reader, "tokenizer.ggml.add_bos_token") is False  # the tokenizer adds none
    assert field(reader, "tokenizer.chat_template") == CHATML_TEMPLATE
    assert any("gpt-2" in n and "8/8" in n for n in info.notes), info.notes


def test_spm_metadata(spm_dir, tmp_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    path = tmp_path / "spm.gguf"
    write_vocab_gguf(path, spm_dir, {"vocab_size": sp.get_piece_size() + 4})
    reader = gguf.GGUFReader(str(path))
    tokens = field(reader, "tokenizer.ggml.tokens")
    scores = field(reader, "tokenizer.ggml.scores")
    types = field(reader, "tokenizer.ggml.token_type")
    n = sp.get_piece_size()
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert tokens[:n] == [sp.id_to_piece(i) for i in range(n)]
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, n + 4)] and types[n:] == [UNUSED] * 4
    assert scores[n:] == [-10000.0] * 4
    normal = [i for i in range(n) if types[i] == NORMAL]
    assert normal and all(scores[i] == pytest.approx(sp.get_score(i)) for i in normal)
    assert types[0] == UNKNOWN and types[1] == CONTROL and types[2] == CONTROL
    assert types[tokens.index("<0x41>")] == BYTE and sum(t == BYTE for t in types) == 256
    assert types[tokens.index("<|im_end|>")] == CONTROL
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    assert field(reader, "tokenizer.ggml.add_space_prefix") is True
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokens.index("<|im_end|>")


def test_spm_from_tokenizer_json_only(spm_dir, spm_json_dir):
    """transformers 5 writes no tokenizer.model: the vocabulary and types come out the same from tokenizer.json."""
    a, b = read_tokenizer(spm_dir), read_tokenizer(spm_json_dir)
    assert b.model == "llama" and b.tokens == a.tokens and b.types == a.types
    assert b.add_bos and b.add_space_prefix
    assert any("scores rebuilt" in n for n in b.notes)


def _with_pre_tokenizer(src, dst, pre_tokenizer):
    shutil.copytree(src, dst)
    data = json.loads((dst / "tokenizer.json").read_text())
    data["pre_tokenizer"] = pre_tokenizer
    (dst / "tokenizer.json").write_text(json.dumps(data))
    return dst


def _split(regex):
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


LLAMA3_HF = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
             "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def test_pre_tokenizer_from_structure(bpe_dir, tmp_path):
    assert pre_tokenizer_regexes(json.loads((bpe_dir / "tokenizer.json").read_text())) == [GPT2_RE]
    llama3 = _with_pre_tokenizer(bpe_dir, tmp_path / "l3", _split(LLAMA3_HF))
    info = read_tokenizer(llama3)
    assert info.pre == "llama-bpe" and "matches tokenizer.json" in info.notes[0] and "8/8" in info.notes[0]
    qwen2 = _with_pre_tokenizer(bpe_dir, tmp_path / "q2", _split(LLAMA3_HF.replace("\\p{N}{1,3}", "\\p{N}")))
    assert read_tokenizer(qwen2).pre == "qwen2"
    digits = _with_pre_tokenizer(bpe_dir, tmp_path / "sc", {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]})
    assert read_tokenizer(digits).pre == "starcoder"
    assert pre_tokenizer_regexes(json.loads((qwen2 / "tokenizer.json").read_text())) == [QWEN2_RE]
    assert LLAMA3_RE != QWEN2_RE


def test_pre_tokenizer_unknown_structure_is_chosen_by_tokenizing(bpe_dir, tmp_path):
    # The GPT-2 regex with the alternatives in another order: same splits, not a structure llama.cpp names.
    custom = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{N}+| ?\\p{L}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
    odd = _with_pre_tokenizer(bpe_dir, tmp_path / "odd", _split(custom))
    info = read_tokenizer(odd)
    assert info.pre == "gpt-2"
    assert "chose by comparing tokenizations" in info.notes[-1] and "gpt-2 8/8" in info.notes[-1]


def test_pre_tokenizer_override(bpe_dir):
    info = read_tokenizer(bpe_dir, pre_tokenizer="qwen2")
    assert info.pre == "qwen2"
    assert "from --pre-tokenizer" in info.notes[0] and "8/8" not in info.notes[0]
    assert read_tokenizer(bpe_dir, pre_tokenizer="deepseek-llm").pre == "deepseek-llm"
    with pytest.raises(ConfigError, match="--pre-tokenizer nonsense.*gpt-2"):
        read_tokenizer(bpe_dir, pre_tokenizer="nonsense")


def test_vocab_mismatch_is_an_error(bpe_dir):
    with pytest.raises(ExportError, match="config.json vocab_size is 100"):
        read_tokenizer(bpe_dir, {"vocab_size": 100})


def test_added_user_token_and_duplicates(bpe_dir, tmp_path):
    d = shutil.copytree(bpe_dir, tmp_path / "dup")
    data = json.loads((d / "tokenizer.json").read_text())
    n = len(data["model"]["vocab"])
    data["added_tokens"].append({"id": n, "content": "<tool>", "special": False, "single_word": False,
                                 "lstrip": False, "rstrip": False, "normalized": False})
    data["added_tokens"].append({"id": n + 1, "content": "<|im_end|>", "special": True, "single_word": False,
                                 "lstrip": False, "rstrip": False, "normalized": False})
    (d / "tokenizer.json").write_text(json.dumps(data))
    info = read_tokenizer(d)
    assert info.tokens[n] == "<tool>" and info.types[n] == USER_DEFINED
    assert info.tokens[n + 1] == f"[PAD{n + 1}]" and info.types[n + 1] == UNUSED  # a duplicate would abort llama.cpp
    assert len(set(info.tokens)) == len(info.tokens)


# --- llama.cpp itself ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spm_gemma_dir(tmp_path_factory):
    """Gemma-style SentencePiece: no dummy prefix (add_space_prefix=false)."""
    return make_spm_tokenizer(tmp_path_factory.mktemp("spm_gemma"), add_dummy_prefix=False)


def vocab_only(model_dir, path):
    from llama_cpp import Llama

    write_vocab_gguf(path, model_dir)
    return Llama(str(path), vocab_only=True, verbose=False)


def llama_ids(llm, text):
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


@pytest.mark.parametrize("kind", ["bpe", "spm_gemma"])
def test_llama_cpp_tokenizes_like_hf(kind, request, tmp_path):
    model_dir = request.getfixturevalue(f"{kind}_dir")
    llm = vocab_only(model_dir, tmp_path / f"{kind}.gguf")
    mismatches = [(t, llama_ids(llm, t), hf_ids(model_dir, t)) for t in TEXTS if llama_ids(llm, t) != hf_ids(model_dir, t)]
    assert not mismatches, mismatches
    # add_bos as the HF tokenizer does it: SentencePiece adds <s>, this BPE tokenizer adds nothing.
    assert (llm.tokenize(b"Hello", add_bos=True, special=True)[0] == 1) == (kind != "bpe")


def _fragments(text):
    return [f for f in re.split(r"(<\|im_start\|>|<\|im_end\|>)", text) if f]


@pytest.mark.parametrize("kind", ["spm", "spm_json"])
def test_llama_cpp_tokenizes_like_sentencepiece(kind, request, spm_dir, tmp_path):
    """Llama/Mistral-style SentencePiece (dummy prefix): the original model's own tokenization.

    Two places where llama.cpp cannot follow transformers' converted tokenizer, asserted as they are:
    llama.cpp (like `sentencepiece`) keeps every leading space where transformers drops one, and it starts
    every text fragment after a special token with the dummy-prefix space (its SentencePiece rule), i.e.
    each fragment is tokenized as if it began the text.
    """
    import sentencepiece as spm

    model_dir = request.getfixturevalue(f"{kind}_dir")
    llm = vocab_only(model_dir, tmp_path / f"{kind}.gguf")
    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    special = {"<|im_start|>": 3, "<|im_end|>": 4}
    for text in TEXTS:
        got = llama_ids(llm, text)
        expected = [i for f in _fragments(text) for i in ([special[f]] if f in special else sp.encode(f))]
        assert got == expected, text
        if not any(s in text for s in special) and not text[0].isspace():
            assert got == hf_ids(model_dir, text), text
    assert llm.tokenize(b"Hello", add_bos=True, special=True)[0] == 1
    assert any("follows a special token with a space" in n for n in read_tokenizer(model_dir).notes)


PRE_VARIANTS = {
    "llama-bpe": _split(LLAMA3_HF),
    "qwen2": _split(LLAMA3_HF.replace("\\p{N}{1,3}", "\\p{N}")),
    "starcoder": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
}


@pytest.mark.parametrize("pre", list(PRE_VARIANTS))
def test_llama_cpp_detected_pre_tokenizer(pre, bpe_dir, tmp_path):
    """Each structure detected from tokenizer.json tokenizes in llama.cpp exactly like transformers."""
    model_dir = _with_pre_tokenizer(bpe_dir, tmp_path / pre, PRE_VARIANTS[pre])
    llm = vocab_only(model_dir, tmp_path / "v.gguf")
    assert gguf.GGUFReader(str(tmp_path / "v.gguf")).fields["tokenizer.ggml.pre"].contents() == pre
    for text in TEXTS:
        assert llama_ids(llm, text) == hf_ids(model_dir, text), text


def test_pre_tokenizer_nothing_fits_warns(bpe_dir, tmp_path):
    # Whitespace is dropped by this pre-tokenizer: no llama.cpp regex set can reproduce that.
    odd = _with_pre_tokenizer(bpe_dir, tmp_path / "ws", {"type": "Sequence", "pretokenizers": [
        {"type": "WhitespaceSplit"},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]})
    info = read_tokenizer(odd)
    assert info.notes[-1].startswith("warning: no llama.cpp pre-tokenizer reproduces")
    assert "--pre-tokenizer NAME" in info.notes[-1] and info.pre in ("gpt-2", "llama-bpe", "qwen2", "starcoder", "default")


def test_add_bos_follows_the_post_processor(bpe_dir, tmp_path):
    """Llama-3 style: tokenizer.json's post_processor prepends BOS, so llama.cpp must add it too."""
    d = shutil.copytree(bpe_dir, tmp_path / "bos")
    data = json.loads((d / "tokenizer.json").read_text())
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    data["post_processor"] = {
        "type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    (d / "tokenizer.json").write_text(json.dumps(data))
    info = read_tokenizer(d)
    assert info.add_bos and not info.add_eos
    llm = vocab_only(d, tmp_path / "bos.gguf")
    from transformers import AutoTokenizer

    text = "Hello world"
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == AutoTokenizer.from_pretrained(str(d))(text)["input_ids"]


def test_stray_tokenizer_model_is_ignored(bpe_dir, spm_json_dir, tmp_path):
    """A byte-level tokenizer.json wins over a tokenizer.model beside it; an unreadable one falls back to JSON."""
    d = shutil.copytree(bpe_dir, tmp_path / "bpe")
    (d / "tokenizer.model").write_bytes(b"IQ== 0\nIg== 1\n")  # tiktoken-style ranks, not SentencePiece
    assert read_tokenizer(d).model == "gpt2"
    s = shutil.copytree(spm_json_dir, tmp_path / "spm")
    (s / "tokenizer.model").write_bytes(b"IQ== 0\nIg== 1\n")
    info = read_tokenizer(s)
    assert info.model == "llama" and any("is not a SentencePiece model" in n for n in info.notes)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExportError, match="neither tokenizer.model nor tokenizer.json"):
        read_tokenizer(empty)


def test_llama_cpp_transformers4_spm_json(spm_json_dir, tmp_path):
    """transformers-4 style SentencePiece tokenizer.json (Prepend + Replace normalizer, no pre-tokenizer)."""
    d = shutil.copytree(spm_json_dir, tmp_path / "t4")
    data = json.loads((d / "tokenizer.json").read_text())
    data["pre_tokenizer"] = None
    data["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    (d / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    info = read_tokenizer(d)
    assert info.model == "llama" and info.add_space_prefix
    llm = vocab_only(d, tmp_path / "t4.gguf")
    # the tokenizers library itself: transformers' LlamaTokenizer wrapper strips a leading space on top
    from tokenizers import Tokenizer

    fast = Tokenizer.from_file(str(d / "tokenizer.json"))
    for text in TEXTS:
        assert llama_ids(llm, text) == fast.encode(text, add_special_tokens=False).ids, text


@pytest.mark.parametrize("flags,template", [
    ({}, True), ({}, False), ({"add_bos_token": True}, False), ({"add_bos_token": False}, True),
    ({"add_eos_token": True}, True), ({"add_bos_token": True, "add_eos_token": True}, False)])
def test_add_bos_eos_like_transformers(bpe_dir, tmp_path, flags, template):
    """add_bos/add_eos are read without transformers; they must match what transformers actually does
    with tokenizer_config.json flags and tokenizer.json's post-processor (present or absent)."""
    d = shutil.copytree(bpe_dir, tmp_path / "t")
    data = json.loads((d / "tokenizer.json").read_text())
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    seq = {"Sequence": {"id": "A", "type_id": 0}}
    data["post_processor"] = {"type": "TemplateProcessing", "single": [bos, seq], "pair": [bos, seq],
                              "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}} if template else None
    (d / "tokenizer.json").write_text(json.dumps(data))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("add_bos_token", None), cfg.pop("add_eos_token", None)
    cfg.update(flags, bos_token="<s>", eos_token="</s>")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(d))
    ids, plain = hf("a")["input_ids"], hf("a", add_special_tokens=False)["input_ids"]
    info = read_tokenizer(d)
    assert (info.add_bos, info.add_eos) == (ids[0] == 1 and plain[0] != 1, ids[-1] == 2 and plain[-1] != 2)


def test_writing_does_not_import_transformers(tiny_llama, tmp_path):
    """transformers (and torch with it) would add ~300 MB and seconds to every export."""
    import subprocess
    import sys

    code = ("import sys; from mlxtune.gguf import to_gguf; "
            f"to_gguf({str(tiny_llama)!r}, {str(tmp_path / 'm.gguf')!r}, 'q8_0', progress=False, log=lambda m: None); "
            "print(sorted(m for m in ('transformers', 'torch', 'mlx_lm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_bundled_model_round_trips_text_through_llama_cpp(tmp_path):
    """The bundled SentencePiece model has '▁' as a user-defined piece; SentencePiece decodes it as a space and
    so must llama.cpp (a USER_DEFINED token is printed as its raw text, so it is written NORMAL)."""
    from mlxtune.defaults import DEFAULT_MODEL
    from mlxtune.models import load_tokenizer

    llm = vocab_only(DEFAULT_MODEL, tmp_path / "bundled.gguf")
    tok = load_tokenizer(DEFAULT_MODEL)
    for text in ["Tell Zoe: I am running late", "<tool_call name=\"send_message\" arguments='{\"to\": \"Zoe\"}'/>"]:
        ids = llama_ids(llm, text)
        assert ids == hf_ids(DEFAULT_MODEL, text)
        assert llm.detokenize(ids).decode() == tok.decode(ids) == text
