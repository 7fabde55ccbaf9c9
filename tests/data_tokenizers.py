"""Tiny tokenizers with the chat templates of the main model families, for the masking tests.

Each is a byte-level BPE trained on the shared tiny corpus, with that family's special tokens and a
template written in the same shape as the family's own (ChatML, Llama 3, Mistral [INST], Gemma).
`END_OF_TURN` names the token that closes an assistant turn and must be trained with it.
"""

from __future__ import annotations

from pathlib import Path

from tiny import CHATML_TEMPLATE, CORPUS

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# ChatML that lists the tools in a system block, like Qwen's templates do.
TOOLS_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\n# Tools\n' + (tools | tojson) + '<|im_end|>\n' }}{% endif %}" + CHATML_TEMPLATE
)
# Drops the content of every assistant turn but the last (as reasoning templates drop old thoughts):
# turns are then not rendered as growing prefixes, and masking must refuse it.
NON_PREFIX_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' and not loop.last %}"
    "{{ '<|im_start|>assistant\n<|im_end|>\n' }}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Like Qwen3: only the final assistant turn carries an (empty) <think> block, so an earlier turn renders
# differently once later turns exist; masking finds that turn's text after its header instead.
FINAL_THINK_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% if loop.last %}{{ '<think>\n\n</think>\n\n' }}{% endif %}{{ message['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Plain-text roles: the answer's first token swallows the space that ends "Assistant: ", so the prompt's
# tokens are not a prefix of the conversation's and the boundary has to be placed by character offsets.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}"
    "{% else %}{{ 'Assistant: ' + m['content'] + eos_token + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)

STYLES = {
    # style: (special tokens, bos, eos, end-of-turn, template)
    "chatml": (["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"], "<s>", "<|im_end|>", "<|im_end|>",
               CHATML_TEMPLATE),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<pad>"], "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", LLAMA3_TEMPLATE),
    "mistral": (["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "</s>", MISTRAL_TEMPLATE),
    "gemma": (["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<end_of_turn>",
              GEMMA_TEMPLATE),
}


def make_style_tokenizer(out: Path, style: str, template: str | None = None) -> Path:
    """A tokenizer directory for `style`; `template=""` saves it without any chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos, _, own = STYLES[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    chosen = own if template is None else template
    if chosen:
        fast.chat_template = chosen
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out


def load_style_tokenizer(out: Path, style: str, template: str | None = None):
    from mlxtune.models import load_tokenizer

    return load_tokenizer(make_style_tokenizer(out, style, template))
