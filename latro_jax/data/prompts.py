"""Token ids for LaTRO: the chat-formatted prompt, the gold-answer suffix, and the stops.

    tokenizer = load_tokenizer("meta-llama/Llama-3.1-8B-Instruct")    # or a checkpoint / HF dir
    fmt = prompt_format(tokenizer)
    prompts = encode_prompts(tokenizer, fmt, [e.question for e in examples])
    answers = encode_answers(tokenizer, fmt, [e.answer for e in examples])
    SamplingConfig(stop_token_ids=fmt.stop_token_ids, stop_sequences=fmt.stop_sequences,
                   pad_token_id=fmt.pad_token_id, ...)

A prompt is the user message rendered by the model's chat template with its generation prompt,
then tokenized without adding special tokens, and starts with exactly one BOS where the model
uses one (the released code tokenized the rendered text with special tokens on, which gives
Llama 3.1 and Mistral a second BOS; that is not reproduced).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# The released trainer's stop strings for reasoning tasks (it also lists "The function call
# is..." strings, for a task this project does not have).
STOP_STRINGS = (
    "Answer:",
    " Answer:",
    "\nAnswer:",
    "The answer is",
    " The answer is",
    "\nThe answer is",
    "The answer is:",
    " The answer is:",
    "\nThe answer is:",
    " the answer is",
    "so the final answer is",
    "So, the answer is",
    "Therefore, the answer is",
)
# End-of-turn / end-of-text tokens that stop a rationale wherever the vocabulary has them.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end|>", "<|im_end|>", "<|endoftext|>", "<|end_of_text|>")
ANSWER_TEMPLATE = "The answer is {answer}."


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How one tokenizer's prompts, answers and stops look; its stop and pad fields are
    `latro_jax.sampling.SamplingConfig`'s.

    bos_token_id: prepended to a rendered prompt that does not start with it (the model uses a
        BOS but its chat template does not write one, e.g. Phi-3.5); None if the model has none.
    end_token: closes the gold answer: "<|end|>" for Phi-3/3.5, otherwise the tokenizer's EOS.
    stop_token_ids: EOS, pad, end_token and the END_OF_TURN_TOKENS in the vocabulary.
    stop_sequences: each stop string's token ids as it occurs in running text after a line break
        or punctuation and, for a string that does not start with whitespace, after a space.
    pad_token_id: the tokenizer's pad, else "<|end_of_text|>" (Llama 3), else unk (Mistral), else
        EOS: the released code's choices, never a token of a prompt or rationale.
    """

    bos_token_id: int | None
    end_token: str
    stop_token_ids: tuple[int, ...]
    stop_sequences: tuple[tuple[int, ...], ...]
    pad_token_id: int


def load_tokenizer(path_or_hub_id: str | os.PathLike) -> PreTrainedTokenizerBase:
    """AutoTokenizer for an HF directory, a hub id, or a latro-jax checkpoint (its hf/ folder)."""
    from transformers import AutoTokenizer

    from latro_jax.checkpoint import HF_DIR, is_checkpoint

    path = os.fspath(path_or_hub_id)
    if is_checkpoint(path):
        path = os.path.join(path, HF_DIR)
    return AutoTokenizer.from_pretrained(path)


def prompt_format(
    tokenizer: PreTrainedTokenizerBase,
    stop_strings: Sequence[str] = STOP_STRINGS,
    end_token: str | None = None,
) -> PromptFormat:
    """The PromptFormat of `tokenizer`; `end_token` overrides the end-of-answer token."""
    vocab = tokenizer.get_vocab()
    if end_token is None:
        end_token = "<|end|>" if "<|end|>" in vocab else tokenizer.eos_token
    if end_token not in vocab:
        raise ValueError(f"end token {end_token!r} is not in the tokenizer's vocabulary")
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = vocab.get("<|end_of_text|>", tokenizer.unk_token_id)
    if pad is None:
        pad = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    stops = [tokenizer.eos_token_id, pad, vocab[end_token]] + [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
    sequences = [stop_sequence_ids(tokenizer, s) for s in stop_strings]
    sequences += [stop_sequence_ids(tokenizer, " " + s) for s in stop_strings if not s[0].isspace()]
    return PromptFormat(
        bos_token_id=bos if adds_bos else None,
        end_token=end_token,
        stop_token_ids=tuple(dict.fromkeys(t for t in stops if t is not None)),
        stop_sequences=tuple(dict.fromkeys(sequences)),
        pad_token_id=pad,
    )


def stop_sequence_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[int, ...]:
    """`text`'s token ids as they occur in running text, not at the start of a string.

    Tokenizers may tokenize the start of a string differently (SentencePiece adds a space there:
    "The" -> "▁The"), so `text` is tokenized behind a context whose tokens are then removed:
    "\\n" before a word (the text as it appears after a line break or punctuation), "x" before
    whitespace (so that a leading "\\n" cannot fuse with the context).
    """
    context = "x" if text[:1].isspace() else "\n"
    head, ids = encode_texts(tokenizer, [context, context + text])
    if ids[: len(head)] != head or len(ids) == len(head):
        raise ValueError(f"cannot tokenize stop string {text!r} apart from its context {context!r}")
    return tuple(ids[len(head) :])


def render_prompt(tokenizer: PreTrainedTokenizerBase, user_message: str) -> str:
    """The user message in the model's chat template, with the generation prompt."""
    if not tokenizer.chat_template:
        raise ValueError("the tokenizer has no chat template; LaTRO prompts are rendered with the model's")
    messages = [{"role": "user", "content": user_message}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat, user_messages: Sequence[str]
) -> list[list[int]]:
    """Prompt token ids, one list per message, each starting with exactly one BOS where the model uses one."""
    encoded = encode_texts(tokenizer, [render_prompt(tokenizer, m) for m in user_messages])
    bos = fmt.bos_token_id
    return [[bos] + ids if bos is not None and ids[:1] != [bos] else ids for ids in encoded]


def encode_answers(
    tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat, answers: Sequence[str], template: str = ANSWER_TEMPLATE
) -> list[list[int]]:
    """Token ids of "The answer is {answer}." (`template`) + end token, tokenized on their own
    without special tokens added (as released: the suffix is tokenized apart from the rationale
    it follows)."""
    return encode_texts(tokenizer, [template.format(answer=a) + fmt.end_token for a in answers])


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added: one batched call (a fast tokenizer
    encodes the batch in Rust, several times faster than text by text)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
