"""Real tokenizers of the paper's three models, built from the shared files (see
tests/test_data.py for how each is checked against the HF test vectors)."""

from __future__ import annotations

import json
import os

from conftest import require
from latro_jax.data.prompts import prompt_format

MODELS = ("llama3", "mistral_v0.3", "phi3_5_mini")
MISTRAL_V03_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + eos_token }}{% endif %}"
    "{% endfor %}"
)

def build_llama3(folder):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    special = [
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
        "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    ] + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]  # ids 128000..128255
    backend = TikTokenConverter(os.path.join(folder, "tokenizer.model"), extra_special_tokens=special).converted()
    bos = "<|begin_of_text|>"
    add_bos = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 128000)])
    backend.post_processor = processors.Sequence([backend.post_processor, add_bos])
    with open(os.path.join(folder, "chat_template_Llama-3.1-8B-Instruct.jinja")) as f:
        template = f.read()
    # Llama-3.1-Instruct's tokenizer config: eos <|eot_id|>, no pad.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token="<|eot_id|>", chat_template=template
    )


def build_mistral_v03(folder):
    from transformers import LlamaTokenizer

    tokenizer = LlamaTokenizer.from_pretrained(folder, add_bos_token=True)
    tokenizer.chat_template = MISTRAL_V03_TEMPLATE
    return tokenizer


def build_phi35(folder):
    from transformers import AddedToken
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    class Phi3Tokenizer(SentencePieceBackend):
        def convert_tokens_to_string(self, tokens):
            """sentencepiece's own decoding, which turns byte pieces (<0x0A>) back into bytes."""
            text, run = "", []
            for token in tokens:
                if token in self.added_tokens_encoder:
                    text, run = text + self.sp_model.decode_pieces(run) + token, []
                else:
                    run.append(token)
            return text + self.sp_model.decode_pieces(run)

    with open(os.path.join(folder, "special_tokens.json")) as f:
        ids = json.load(f)
    tokenizer = Phi3Tokenizer(
        vocab_file=require(os.path.join(folder, "..", "llama2_sentencepiece", "tokenizer.model")),
        legacy=True,  # a sentencepiece dummy prefix on every text piece, as Phi-3's HF tokenizer
        special_tokens_pattern="bos",
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
    )
    # Phi-3's special tokens absorb the whitespace after them, all but <|endoftext|>.
    in_id_order = sorted(ids, key=ids.get)
    tokens = [AddedToken(t, special=True, normalized=False, rstrip=t != "<|endoftext|>") for t in in_id_order]
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    assert tokenizer.convert_tokens_to_ids(list(ids)) == list(ids.values())
    with open(os.path.join(folder, "chat_template_Phi-3.5-mini-instruct.jinja")) as f:
        tokenizer.chat_template = f.read()
    return tokenizer


BUILDERS = {
    "llama3": (build_llama3, "tokenizer.model"),
    "mistral_v0.3": (build_mistral_v03, "tokenizer.model"),
    "phi3_5_mini": (build_phi35, "special_tokens.json"),
}
_built = {}


def built(test_data, name):
    """(name, tokenizer, PromptFormat) for one of the three models, built once per session."""
    if name not in _built:
        build, marker = BUILDERS[name]
        folder = os.path.join(test_data, "tokenizers", name)
        require(os.path.join(folder, marker))
        tokenizer = build(folder)
        _built[name] = (name, tokenizer, prompt_format(tokenizer))
    return _built[name]


