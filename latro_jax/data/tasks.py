"""GSM8K and ARC-Challenge as lists of `Example`s: the user message LaTRO prompts with, the gold
answer, and (GSM8K) the gold rationale for the SFT baseline.

    load_task("gsm8k", "train")                          # HF hub: openai/gsm8k, config main
    load_task("gsm8k", "test", "data/gsm8k")             # local {train,test}.jsonl
    load_task("arc_challenge", "validation", "tfds")     # TFDS ai2_arc (optional dependency)

Splits are train / validation / test for both tasks. GSM8K has no validation split upstream, so
`GSM8K_VALIDATION_SIZE` questions are held out of the upstream train split (chosen by a salted
SHA-256 of the question text, so the choice depends neither on row order nor on the source) and
"train" is the rest; "train_full" is the whole upstream train split (7,473), as the paper used.

Every row is checked; a malformed one raises `DataError` naming the file (or hub dataset), the
1-based line (or row) and the problem. Nothing is dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

from latro_jax.data.example import Example
from latro_jax.data.extraction import canonical_number

GSM8K_HUB = ("openai/gsm8k", "main")
ARC_HUB = ("allenai/ai2_arc", "ARC-Challenge")
ARC_TFDS = "ai2_arc/ARC-Challenge"
SPLITS = {
    "gsm8k": ("train", "validation", "test", "train_full"),
    "arc_challenge": ("train", "validation", "test"),
    "arithmetic": ("train", "validation", "test"),  # synthetic (latro_jax.data.synthetic), for the demo
}
NUMERIC_TASKS = ("gsm8k", "arithmetic")  # answers are numbers, compared by value

GSM8K_VALIDATION_SIZE = 500  # held out of the upstream train split (or a tenth of a smaller file)
GSM8K_VALIDATION_SEED = 0
GSM8K_PROMPT = "{question} Let's think step by step."
ARC_PROMPT = (
    "Question: {question}\nOptions: {options}\n"
    "Let's think step by step first then print your answer like 'The answer is (one of the options)'."
)


class DataError(ValueError):
    """A malformed data row; the message names the file (or dataset), the 1-based line and the problem."""


def load_task(name: str, split: str, source: str | os.PathLike | None = None) -> list[Example]:
    """The examples of one split of `name` ("gsm8k", "arc_challenge" or the synthetic
    "arithmetic"), in upstream order.

    source: None for the HF hub (`datasets.load_dataset`); "tfds" for TensorFlow Datasets (ARC
    only); or a local path: a directory holding {split}.jsonl in the HF layout (ARC may also be
    AI2's original ARC-Challenge-{Train,Dev,Test}.jsonl), or one .jsonl file read as that split's
    upstream file (for GSM8K validation/train: the upstream train file).
    """
    if name not in SPLITS:
        raise ValueError(f"task {name!r} is not one of {tuple(SPLITS)}")
    if split not in SPLITS[name]:
        raise ValueError(f"{name} has no split {split!r}; its splits are {SPLITS[name]}")
    if name == "gsm8k":
        return _load_gsm8k(split, source)
    if name == "arithmetic":
        from latro_jax.data.synthetic import load_synthetic

        if source:
            raise ValueError("the arithmetic task is generated; it has no data source")
        return load_synthetic(split)
    return [arc_example(row, where) for row, where in _rows(ARC_HUB, ARC_TFDS, split, source)]


def gsm8k_example(row: Any, where: str, example_id: str) -> Example:
    """An Example from an upstream GSM8K row {"question", "answer"}; `where` names the row in errors."""
    question, solution = _field(row, "question", str, where), _field(row, "answer", str, where)
    if "#### " not in solution:
        raise DataError(f"{where}: GSM8K answer has no '#### ' line: {solution[-60:]!r}")
    gold = solution.rsplit("#### ", 1)[1].strip().replace(",", "")
    if canonical_number(gold) is None:
        raise DataError(f"{where}: GSM8K gold answer {gold!r} is not a number")
    return Example(
        task="gsm8k",
        id=example_id,
        question=GSM8K_PROMPT.format(question=question),
        answer=gold,
        rationale=solution.replace("####", "The answer is"),
    )


def arc_example(row: Any, where: str) -> Example:
    """An Example from an ARC row, in the HF layout {"id", "question", "choices": {"text": [...],
    "label": [...]}, "answerKey"} or AI2's original {"question": {"stem", "choices": [{"text",
    "label"}...]}}. {options} is rendered as Python's str(list), as the released code's f-string
    `{choices["text"]}` does: "['dry palms', 'wet palms', ...]"."""
    example_id, key = _field(row, "id", str, where), _field(row, "answerKey", str, where)
    question = _field(row, "question", (str, dict), where)
    if isinstance(question, dict):  # AI2 original layout
        stem = _field(question, "stem", str, where)
        choices = _field(question, "choices", list, where)
        texts = [_field(c, "text", str, where) for c in choices]
        labels = [_field(c, "label", str, where) for c in choices]
    else:
        stem = question
        choices = _field(row, "choices", dict, where)
        texts, labels = _field(choices, "text", list, where), _field(choices, "label", list, where)
        if not all(isinstance(x, str) for x in texts + labels):
            raise DataError(f"{where}: ARC choices text/label must be lists of strings")
    if len(texts) != len(labels) or not texts:
        raise DataError(f"{where}: ARC choices have {len(texts)} texts and {len(labels)} labels")
    if key not in labels:
        raise DataError(f"{where}: ARC answerKey {key!r} is not among the labels {labels}")
    return Example(
        task="arc_challenge",
        id=example_id,
        question=ARC_PROMPT.format(question=stem, options=str(texts)),
        answer=texts[labels.index(key)],
        options=tuple(texts),
    )


def _load_gsm8k(split: str, source) -> list[Example]:
    upstream = "test" if split == "test" else "train"
    examples = [
        gsm8k_example(row, where, f"gsm8k/{upstream}/{i}")
        for i, (row, where) in enumerate(_rows(GSM8K_HUB, None, upstream, source))
    ]
    if split in ("test", "train_full"):
        return examples
    held_out = gsm8k_validation_ids(examples)
    return [e for e in examples if (e.id in held_out) == (split == "validation")]


def gsm8k_validation_ids(train: list[Example]) -> frozenset[str]:
    """Ids of the GSM8K validation questions: the GSM8K_VALIDATION_SIZE (or, for a train list
    under ten times that, a tenth of it) smallest SHA-256("{seed}\\n{question}")."""
    size = min(GSM8K_VALIDATION_SIZE, len(train) // 10)

    def rank(e: Example) -> str:
        return hashlib.sha256(f"{GSM8K_VALIDATION_SEED}\n{e.question}".encode()).hexdigest()

    return frozenset(e.id for e in sorted(train, key=rank)[:size])


def _rows(hub: tuple[str, str], tfds_name: str | None, split: str, source) -> Iterator[tuple[Mapping, str]]:
    """(row, where) pairs of one upstream split, `where` naming the row for error messages."""
    if source is None:
        yield from _hub_rows(*hub, split)
    elif source == "tfds":
        if tfds_name is None:
            raise ValueError(f"{hub[0]} has no TFDS source; use the HF hub (source=None) or a local path")
        yield from _tfds_rows(tfds_name, split)
    else:
        yield from _jsonl_rows(_split_file(os.fspath(source), split))


def _split_file(source: str, split: str) -> str:
    if os.path.isfile(source):
        return source
    if not os.path.isdir(source):
        raise FileNotFoundError(f"{source}: no such data file or directory")
    ai2 = {"train": "Train", "validation": "Dev", "test": "Test"}[split]
    for name in (f"{split}.jsonl", f"ARC-Challenge-{ai2}.jsonl"):
        if os.path.isfile(os.path.join(source, name)):
            return os.path.join(source, name)
    raise FileNotFoundError(f"{source}: no {split}.jsonl in this directory")


def _jsonl_rows(path: str) -> Iterator[tuple[Mapping, str]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            where = f"{path}:{number}"
            if not line.strip():
                raise DataError(f"{where}: empty line")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            yield row, where


def _hub_rows(repo: str, config: str, split: str) -> Iterator[tuple[Mapping, str]]:
    import datasets

    for number, row in enumerate(datasets.load_dataset(repo, config, split=split), start=1):
        yield row, f"{repo} ({config}, {split}) row {number}"


def _tfds_rows(name: str, split: str) -> Iterator[tuple[Mapping, str]]:
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError(
            "source='tfds' needs TensorFlow Datasets: pip install tensorflow-datasets "
            "(or use the HF hub, source=None, or a local jsonl directory)"
        ) from None
    for number, row in enumerate(tfds.as_numpy(tfds.load(name, split=split)), start=1):
        # TFDS yields bytes, and the choices as a dict of arrays like the HF layout.
        yield {
            "id": row["id"].decode(),
            "question": row["question"].decode(),
            "choices": {k: [t.decode() for t in row["choices"][k]] for k in ("text", "label")},
            "answerKey": row["answerKey"].decode(),
        }, f"tfds {name} ({split}) row {number}"


def _field(row: Any, key: str, kind, where: str):
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if key not in row:
        raise DataError(f"{where}: missing field {key!r}")
    if not isinstance(row[key], kind):
        raise DataError(f"{where}: field {key!r} has type {type(row[key]).__name__}")
    return row[key]
