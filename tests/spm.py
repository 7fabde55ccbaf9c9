"""A tiny SentencePiece tokenizer for tests, trained on the spot (nothing is downloaded), and a vocab-only GGUF.

Trained with the `sentencepiece` library (BPE with byte fallback, like Llama/Mistral/Gemma), then turned
into a Hugging Face tokenizer by transformers' own converter. `tokenizer.model` is kept beside the HF files
as real checkpoints ship it, unless `keep_model=False` (what transformers 5 `save_pretrained` leaves).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

from tiny import CHATML_TEMPLATE, CORPUS

SPM_SPECIAL = ["<|im_start|>", "<|im_end|>"]


def make_spm_tokenizer(out: Path, vocab_size: int = 500, chat_template: str = CHATML_TEMPLATE,
                       keep_model: bool = True, add_dummy_prefix: bool = True) -> Path:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=0.99, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=SPM_SPECIAL, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", add_dummy_prefix=add_dummy_prefix,
        hard_vocab_limit=False, minloglevel=2)
    # Convert in a scratch dir: the HF tokenizer is built from tokenizer.model by transformers' converter.
    scratch = out / ".spm-src"
    scratch.mkdir(exist_ok=True)
    (scratch / "tokenizer.model").write_bytes(buf.getvalue())
    (scratch / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "<|im_end|>", '
        f'"unk_token": "<unk>", "add_bos_token": true, "legacy": false, "add_prefix_space": {str(add_dummy_prefix).lower()}}}')
    tok = AutoTokenizer.from_pretrained(str(scratch))
    tok.chat_template = chat_template
    tok.save_pretrained(str(out))
    if keep_model:
        shutil.copy(scratch / "tokenizer.model", out / "tokenizer.model")
    shutil.rmtree(scratch)
    return out


def write_vocab_gguf(path: Path, model_dir: Path, config: dict | None = None, pre_tokenizer: str | None = None):
    """A GGUF holding only llama hyper-parameters and the tokenizer: enough for `Llama(path, vocab_only=True)`."""
    import gguf

    from mlxtune.gguf.tokenizer import add_tokenizer

    config = config or {}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("vocab-only")
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(16)
    info = add_tokenizer(writer, model_dir, config, pre_tokenizer)
    writer.add_vocab_size(info.n_tokens)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return info
