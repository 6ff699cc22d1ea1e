"""Synthetic multi-step arithmetic word problems, and a small word-level tokenizer for them.

The demo (`experiments/demo.py`) needs a base model that can reason but often slips, like the
paper's base models, without downloading one. Its training rationales come from here:

    Q: Ann has 47 apples. Ann buys 5 more. Ann gives away 8. How many apples now?
    gold:    47 + 5 = 52. 52 - 8 = 44. The answer is 44.
    slipped: 47 + 5 = 42. 42 - 8 = 34. The answer is 34.      (a forgotten carry; 34 is wrong)

The base model is pre-trained on such text as running text. LaTRO then cuts a sampled rationale
at "The answer is" and appends "The answer is {gold}." tokenized on its own, as the released code
does; so, as with the paper's models and tokenizers, the suffix's first token ("The") is not the
one running text has there ("▁The").

Each step adds or takes away a one-digit number from a running total in [1, 99]. About half the
additions carry (47 + 5); in the rationales a model is pre-trained on, such a step forgets its
carry with probability `slip` (> 1/2 by default: greedy decoding then inherits the slip), and
every later step and the stated answer follow the slipped value. Only carries slip, so two slips
never cancel out. The gold answer is always the true total. LaTRO sees only (question, gold
answer) pairs.

Splits are pure functions of (split, size, slip): "train" problems never share their numbers
(start value and steps) with a "validation" or "test" problem.
"""

from __future__ import annotations

import functools
import hashlib
import os

import numpy as np

from latro_jax.data.example import Example

VERSION = 3  # part of the cache key of a model pre-trained on these problems: bump on any change
NAMES = ("Ann", "Ben", "Cal", "Dan", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jo")
ITEMS = ("apples", "books", "coins", "pens", "cards", "stamps", "shells", "rocks")
ADD = ("buys {n} more", "finds {n} more", "gets {n} more")
TAKE = ("gives away {n}", "loses {n}", "sells {n}")
SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}
SPLIT_SIZES = {"train": 50_000, "validation": 200, "test": 500}
HELD_OUT_BUCKETS = 10  # 1 in 10 number patterns is reserved for validation/test

SPECIAL_TOKENS = ("<unk>", "<pad>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _held_out(start: int, steps: tuple[int, ...]) -> bool:
    """Whether a problem's numbers belong to the held-out (validation/test) patterns."""
    digest = hashlib.sha256(repr((start, steps)).encode()).digest()
    return digest[0] % HELD_OUT_BUCKETS == 0


def _carries(value: int, step: int) -> bool:
    """Whether adding `step` (> 0) to `value` carries into the tens."""
    return step > 0 and value % 10 + step >= 10


def make_problem(rng: np.random.Generator, slip: float) -> tuple[str, str, str, int, tuple[int, ...]]:
    """One problem: (question, rationale ending "The answer is ...", gold answer, start, steps)."""
    name, item = NAMES[rng.integers(len(NAMES))], ITEMS[rng.integers(len(ITEMS))]
    start = int(rng.integers(10, 90))
    total, steps = start, []
    for _ in range(int(rng.integers(2, 4))):
        n = int(rng.integers(2, 10))
        add = total + n <= 99 and (total - n < 1 or rng.random() < 0.5)
        steps.append(n if add else -n)
        total += steps[-1]
    sentences = [f"{name} has {start} {item}."]
    for step in steps:
        verb = (ADD if step > 0 else TAKE)[rng.integers(3)]
        sentences.append(f"{name} {verb.format(n=abs(step))}.")
    sentences.append(f"How many {item} now?")
    written, value = [], start
    for step in steps:
        new = value + step - 10 * (_carries(value, step) and rng.random() < slip)  # the carry forgotten
        written.append(f"{value} {'+' if step > 0 else '-'} {abs(step)} = {new}.")
        value = new
    rationale = " ".join(written) + f" The answer is {value}."
    return " ".join(sentences), rationale, str(total), start, tuple(steps)


def load_synthetic(split: str, size: int | None = None, slip: float = 0.6) -> list[Example]:
    """`size` problems of `split` (train / validation / test), deterministic. Training rationales
    slip with probability `slip` on each carrying addition; held-out splits carry gold rationales."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"arithmetic has no split {split!r}; its splits are {tuple(SPLIT_SEEDS)}")
    if not 0 <= slip <= 1:
        raise ValueError(f"slip={slip} must be a probability in [0, 1]")
    return list(_generate(split, SPLIT_SIZES[split] if size is None else size, slip))


@functools.lru_cache(maxsize=8)  # the demo's stages load the same splits again (50,000 problems: ~5 s)
def _generate(split: str, size: int, slip: float) -> tuple[Example, ...]:
    rng = np.random.default_rng((20241107, SPLIT_SEEDS[split]))
    held_out = split != "train"
    examples: list[Example] = []
    while len(examples) < size:
        question, rationale, answer, start, steps = make_problem(rng, slip if not held_out else 0.0)
        if _held_out(start, steps) != held_out:
            continue
        examples.append(Example(
            task="arithmetic", id=f"arithmetic/{split}/{len(examples)}",
            question=question, answer=answer, rationale=rationale,
        ))
    return tuple(examples)


def _corpus() -> list[str]:
    """Every word form the tokenizer must know, in context: problems, the answer template, and
    the stop strings the trainer tokenizes (latro_jax.data.prompts.STOP_STRINGS)."""
    from latro_jax.data.prompts import STOP_STRINGS

    texts = []
    for name in NAMES:
        for item in ITEMS:
            verbs = " ".join(f"{name} {v.format(n=5)}." for v in ADD + TAKE)
            texts.append(f"{name} has 47 {item}. {verbs} How many {item} now?")
    texts.append("0 1 2 3 4 5 6 7 8 9 0123456789 + - = . ? The answer is 44.\n")
    texts += [f"x{s}\n{s} {s}" for s in STOP_STRINGS]
    return texts


def build_tokenizer(directory: str | os.PathLike):
    """Write a word-level HF tokenizer (one token a digit) with a chat template to `directory` and
    return it loaded. Words and numbers keep their leading space as "▁" ("▁apples", "▁4" "7"), so
    decoding restores the text; punctuation marks (with their space) and line breaks are tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Metaspace(prepend_scheme="never"),
        # a digit or punctuation mark, with the space before it: " 47 + 5." -> "▁4" "7" "▁+" "▁5" "."
        pre_tokenizers.Split(Regex("\u2581?[0-9]|\u2581?[^\\w\u2581]"), behavior="isolated"),
    ])
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="never")
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1)
    tokenizer.train_from_iterator(_corpus(), trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", eos_token="<|endoftext|>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"], chat_template=CHAT_TEMPLATE,
    )
    wrapped.save_pretrained(os.fspath(directory))
    return AutoTokenizer.from_pretrained(os.fspath(directory))
