"""Tasks as data, and the `Example`s of one split of a task.

A `Task` says where its rows come from, which fields hold the question, the gold answer, an
optional gold rationale (for SFT) and optional options (multiple choice), the user message's
template, the answer text LaTRO appends after each rationale, and how an extracted answer is
compared with the gold one (`latro_jax.data.extraction.AnswerRule`). The built-in tasks are
instances: GSM8K, ARC-Challenge and the synthetic arithmetic of the demo.

    load_task("gsm8k", "train")                          # HF hub: openai/gsm8k, config main
    load_task("gsm8k", "test", "data/gsm8k")             # local {train,test}.jsonl
    load_task("arc_challenge", "validation", "tfds")     # TFDS ai2_arc (optional dependency)
    load_split(Task("custom", path="my_qa.jsonl", question_field="q", answer_field="a"), "validation")

A task's own rows (`Task.path`) are read by `datasets.load_dataset`: a local .jsonl / .json /
.csv / .parquet file (its one split is "train") or a directory of such files (split by file
name: train.jsonl, validation.csv, ...), or a hub dataset id with `Task.config`. Splits are the
source's; a source without a "validation" split has one held out of "train" by hash, as
GSM8K's: `VALIDATION_SIZE` questions (or a tenth of a train split under ten times that), chosen
by a salted SHA-256 of the user message (so the choice depends neither on row order nor on the
source); "train" is then the rest and "train_full" the whole. GSM8K (no validation split
upstream) is split so.

Every row is checked; a row that cannot be used raises `DataError` naming the file (or hub
dataset), the row (1-based; the line of a built-in task's jsonl) and the problem. Nothing is
dropped, unless the task says `skip_bad_rows`: such rows are then skipped and counted in a line
on stderr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import string
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

from tqdm.auto import tqdm

from latro_jax.data.example import Example
from latro_jax.data.extraction import MATCH_RULES, AnswerRule, canonical_number
from latro_jax.data.prompts import ANSWER_TEMPLATE, STOP_STRINGS

GSM8K_HUB = ("openai/gsm8k", "main")
ARC_HUB = ("allenai/ai2_arc", "ARC-Challenge")
ARC_TFDS = "ai2_arc/ARC-Challenge"
SPLITS = {  # the built-in tasks' splits
    "gsm8k": ("train", "validation", "test", "train_full"),
    "arc_challenge": ("train", "validation", "test"),
    "arithmetic": ("train", "validation", "test"),  # synthetic (latro_jax.data.synthetic), for the demo
}
CUSTOM = "custom"  # the task whose rows, fields, templates and match rule an experiment's data.* settings give
TASK_NAMES = (*SPLITS, CUSTOM)

VALIDATION_SIZE = 500  # held out of the upstream train split (or a tenth of a smaller one)
VALIDATION_SEED = 0
GSM8K_PROMPT = "{question} Let's think step by step."
ARC_PROMPT = (
    "Question: {question}\nOptions: {options}\n"
    "Let's think step by step first then print your answer like 'The answer is (one of the options)'."
)
FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """A malformed data row or source; the message names the file (or dataset), the row and the problem."""


@dataclasses.dataclass(frozen=True)
class Task:
    """A task (see the module docstring). Field names are those of an experiment's `data.*`.

    path: a local file or directory, or a hub dataset id (a built-in task: its source, "" = the
        hub); config: the hub dataset's config name.
    question_field, answer_field: the fields holding the question and the gold answer (a number
        is read as its text). rationale_field: the gold rationale (SFT's target), optional.
        options_field: a list of option texts (multiple choice), optional. id_field: each row's
        id, optional (default "<task>/<split>/<0-based row>").
    template: the user message, rendered by the model's chat template: {question} is the
        question field's text, {options} the options as a Python list, any other {name} the
        row's field of that name.
    answer_template: the text appended after each rationale, with {answer} the gold answer; its
        text before {answer} (the marker, "The answer is") also stops a rollout's rationale and
        is where answers are read from in generations.
    match: one of MATCH_RULES (`AnswerRule`).
    skip_bad_rows: skip (and count) rows that cannot be used instead of stopping.
    """

    name: str
    path: str = ""
    config: str = ""
    question_field: str = "question"
    answer_field: str = "answer"
    rationale_field: str = ""
    options_field: str = ""
    id_field: str = ""
    template: str = "{question}"
    answer_template: str = ANSWER_TEMPLATE
    match: str = "normalized"
    skip_bad_rows: bool = False

    def __post_init__(self):
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None]
            answer_names = [n for _, n, _, _ in string.Formatter().parse(self.answer_template) if n is not None]
        except ValueError as e:
            raise ValueError(f"data.template={self.template!r} or data.answer_template={self.answer_template!r} "
                             f"is not a valid template ({e})") from None
        if not names or any(not n or not n.isidentifier() for n in names):
            raise ValueError(f"data.template={self.template!r} must name fields, e.g. '{{question}}', and only "
                             "plain field names")
        if answer_names != ["answer"] or not self.answer_template.split("{answer}")[0].strip():
            raise ValueError(f"data.answer_template={self.answer_template!r} must hold {{answer}} once, after some "
                             "text (e.g. 'The answer is {answer}.'): that text ends a rollout's rationale")
        if self.match not in MATCH_RULES:
            raise ValueError(f"data.match={self.match!r} is not a match rule; allowed: {', '.join(MATCH_RULES)}")
        if self.match == "choice" and not self.options_field:
            raise ValueError("data.match='choice' needs data.options_field (the field holding each row's options)")

    @property
    def rule(self) -> AnswerRule:
        marker, closing = self.answer_template.split("{answer}")
        return AnswerRule(self.match, marker.strip(), closing.strip())

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """The strings that end a rollout's rationale: the released ones, and this task's marker."""
        marker = self.rule.marker
        return STOP_STRINGS if marker in STOP_STRINGS else (*STOP_STRINGS, marker)

    def describe(self) -> str:
        return self.name if self.name in SPLITS else self.path


class _Builtin(NamedTuple):
    """A built-in task's reader: its upstream splits, their (row, where) pairs from a source, and
    the row's fields in the task's terms."""

    splits: tuple[str, ...]
    rows: Callable[[str, Any], Iterator[tuple[Any, str]]]
    prepare: Callable[[Any, str], dict] | None


def gsm8k_fields(row: Any, where: str) -> dict:
    """An upstream GSM8K row {"question", "answer"} as {"question", "answer": the number after
    "#### " (commas removed), "rationale": the solution with "####" replaced by "The answer is"
    (as the released SFT script: calculator annotations <<...>> kept)}."""
    question, solution = _field(row, "question", str, where), _field(row, "answer", str, where)
    if "#### " not in solution:
        raise DataError(f"{where}: GSM8K answer has no '#### ' line: {solution[-60:]!r}")
    gold = solution.rsplit("#### ", 1)[1].strip().replace(",", "")
    if canonical_number(gold) is None:
        raise DataError(f"{where}: GSM8K gold answer {gold!r} is not a number")
    return {"question": question, "answer": gold, "rationale": solution.replace("####", "The answer is")}


def arc_fields(row: Any, where: str) -> dict:
    """An ARC row, in the HF layout {"id", "question", "choices": {"text": [...], "label": [...]},
    "answerKey"} or AI2's original {"question": {"stem", "choices": [{"text", "label"}...]}}, as
    {"id", "question": the stem, "options": the option texts, "answer": the correct one's text}.
    {options} renders as Python's str(list), as the released code's f-string `{choices["text"]}`
    does: "['dry palms', 'wet palms', ...]"."""
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
    return {"id": example_id, "question": stem, "options": texts, "answer": texts[labels.index(key)]}


def _synthetic_rows(split: str, source) -> Iterator[tuple[dict, str]]:
    from latro_jax.data.synthetic import load_synthetic

    if source:
        raise ValueError("the arithmetic task is generated; it has no data source")
    for e in load_synthetic(split):
        yield {"id": e.id, "question": e.question, "answer": e.answer, "rationale": e.rationale}, e.id


BUILTINS = {
    "gsm8k": _Builtin(("train", "test"), lambda split, source: _rows(GSM8K_HUB, None, split, source), gsm8k_fields),
    "arc_challenge": _Builtin(("train", "validation", "test"),
                              lambda split, source: _rows(ARC_HUB, ARC_TFDS, split, source), arc_fields),
    "arithmetic": _Builtin(("train", "validation", "test"), _synthetic_rows, None),
}
TASKS = {
    "gsm8k": Task("gsm8k", template=GSM8K_PROMPT, match="number", rationale_field="rationale"),
    "arc_challenge": Task("arc_challenge", template=ARC_PROMPT, match="choice", options_field="options",
                          id_field="id"),
    "arithmetic": Task("arithmetic", match="number", rationale_field="rationale", id_field="id"),
}


def builtin_task(name: str, source: str | os.PathLike | None = None) -> Task:
    """The built-in task `name` reading from `source`: None for the HF hub (`datasets.load_dataset`);
    "tfds" for TensorFlow Datasets (ARC only); or a local path: a directory holding {split}.jsonl
    in the HF layout (ARC may also be AI2's original ARC-Challenge-{Train,Dev,Test}.jsonl), or one
    .jsonl file read as that split's upstream file (for GSM8K validation/train: the upstream train file)."""
    if name not in TASKS:
        raise ValueError(f"task {name!r} is not one of {tuple(TASKS)}")
    return dataclasses.replace(TASKS[name], path=os.fspath(source) if source else "")


def task_of(data) -> Task:
    """The task an experiment's `data` settings (`experiment.DataSpec`) describe."""
    if data.task != CUSTOM:
        return builtin_task(data.task, data.source or None)
    return Task(CUSTOM, **{f.name: getattr(data, f.name) for f in dataclasses.fields(Task) if f.name != "name"})


def load_task(name: str, split: str, source: str | os.PathLike | None = None) -> list[Example]:
    """The examples of one split of the built-in task `name` ("gsm8k", "arc_challenge" or the
    synthetic "arithmetic"), in upstream order; `source` as `builtin_task`'s."""
    return load_split(builtin_task(name, source), split)


def load_split(task: Task, split: str) -> list[Example]:
    """The examples of one split of `task`, in the source's order."""
    builtin = BUILTINS.get(task.name)
    dataset = None if builtin else _dataset(task)
    upstream = builtin.splits if builtin else tuple(dataset)
    held_out = "validation" not in upstream and "train" in upstream
    splits = upstream + (("validation", "train_full") if held_out else ())
    if split not in splits:
        raise DataError(f"{task.describe()} has no split {split!r}; its splits are {splits}")
    read = "train" if held_out and split in ("train", "validation", "train_full") else split
    if builtin:
        rows = builtin.rows(read, task.path or None)
    else:
        name = task.path if len(dataset) == 1 else f"{task.path} ({read})"
        _check_fields(task, dataset[read], name)
        rows = ((row, f"{name} row {i}") for i, row in enumerate(dataset[read], start=1))
    examples, skipped = [], []
    for index, (row, where) in enumerate(rows):
        try:
            examples.append(_example(task, builtin.prepare(row, where) if builtin and builtin.prepare else row,
                                     where, f"{task.name}/{read}/{index}"))
        except DataError as e:
            if not task.skip_bad_rows:
                raise
            skipped.append(str(e))
    if skipped:
        tqdm.write(f"{task.describe()} ({read}): skipped {len(skipped)} of {len(skipped) + len(examples)} rows "
                   f"(data.skip_bad_rows); the first: {skipped[0]}", file=sys.stderr)
    if not held_out or split == "train_full" or read != "train":
        return examples
    validation = held_out_ids(examples)
    return [e for e in examples if (e.id in validation) == (split == "validation")]


def run_data(data) -> tuple[Task, list[Example], list[Example]]:
    """A training run's task, and its training and evaluation examples (the first data.eval_size),
    from an experiment's `data` settings (`experiment.DataSpec`); an empty split is an error."""
    task = task_of(data)
    splits = {}
    for field in ("train_split", "eval_split"):
        examples = load_split(task, getattr(data, field))
        if not examples:
            raise DataError(f"data.{field}={getattr(data, field)!r}: {task.describe()} has no questions in it (a "
                            "validation split held out of train is a tenth of a train split under "
                            f"{10 * VALIDATION_SIZE:,} rows)")
        splits[field] = examples
    return task, splits["train_split"], splits["eval_split"][: data.eval_size or None]


def held_out_ids(train: list[Example]) -> frozenset[str]:
    """Ids of the validation questions held out of a train split: the VALIDATION_SIZE (or, for a
    train list under ten times that, a tenth of it) smallest SHA-256("{seed}\\n{user message}")."""
    size = min(VALIDATION_SIZE, len(train) // 10)

    def rank(e: Example) -> str:
        return hashlib.sha256(f"{VALIDATION_SEED}\n{e.question}".encode()).hexdigest()

    return frozenset(e.id for e in sorted(train, key=rank)[:size])



def _example(task: Task, row: Any, where: str, default_id: str) -> Example:
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    question = _text(row, task.question_field, "question", where)
    answer = _text(row, task.answer_field, "answer", where)
    rationale = _text(row, task.rationale_field, "rationale", where) if task.rationale_field else None
    options = tuple(_options(row, task.options_field, where)) if task.options_field else ()
    if task.match == "number" and canonical_number(answer) is None:
        raise DataError(f"{where}: answer {answer!r} is not a number (data.match=number)")
    if task.match == "choice" and answer not in options:
        raise DataError(f"{where}: answer {answer!r} is not one of the options {list(options)}")
    fields = {**row, "question": question, "options": str(list(options))}
    try:
        message = task.template.format_map(fields)
    except KeyError as e:
        raise DataError(f"{where}: data.template names {{{e.args[0]}}}, which is not a field of the row "
                        f"(fields: {', '.join(map(str, row))})") from None
    example_id = _text(row, task.id_field, "id", where) if task.id_field else default_id
    return Example(task=task.name, id=example_id, question=message, answer=answer, rationale=rationale,
                   options=options)


def _text(row: Mapping, field: str, role: str, where: str) -> str:
    """A field's text: a string, or a number read as its text; missing, null or blank is an error."""
    value = row.get(field)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        value = str(value)
    if field not in row or value is None or (isinstance(value, float) and not math.isfinite(value)):
        raise DataError(f"{where}: missing field {field!r} (the {role}; fields: {', '.join(map(str, row))})")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} (the {role}) has type {type(value).__name__}, not text")
    if not value.strip():
        raise DataError(f"{where}: empty {role} (field {field!r})")
    return value


def _options(row: Mapping, field: str, where: str) -> list[str]:
    options = row.get(field)
    if not isinstance(options, (list, tuple)) or len(options) < 2 or not all(isinstance(o, str) for o in options):
        raise DataError(f"{where}: field {field!r} (the options) must be a list of at least two texts, "
                        f"got {options!r}")
    return list(options)


def _check_fields(task: Task, split, where: str) -> None:
    """Every field a task names is a column of the split (a column exists in every row: a row
    without it holds null there, reported by the row)."""
    columns = list(split.column_names)
    named = {f"data.{f}": getattr(task, f) for f in ("question_field", "answer_field", "rationale_field",
                                                     "options_field", "id_field") if getattr(task, f)}
    named.update({f"data.template {{{n}}}": n for _, n, _, _ in string.Formatter().parse(task.template)
                  if n and n not in ("question", "options")})
    for setting, field in named.items():
        if field not in columns:
            raise DataError(f"{where}: no field {field!r} ({setting}); its fields: {', '.join(columns)}")
    if not split.num_rows:
        raise DataError(f"{where}: no rows")


def _is_local(path: str) -> bool:
    """Whether data.path names a local file or directory rather than a hub dataset id."""
    return (os.path.exists(path) or os.path.splitext(path)[1].lower() in FILE_TYPES
            or path.startswith(("/", ".", "~")))


@contextlib.contextmanager
def _quiet_datasets(local: bool):
    """datasets' logging off while it reads (its errors become one DataError line), and its
    progress bars for local files (seconds at most; a hub download keeps them)."""
    import datasets
    from datasets.utils import logging as datasets_logging

    level, bars_were_off = datasets_logging.get_verbosity(), datasets.are_progress_bars_disabled()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)
    if local:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets_logging.set_verbosity(level)
        if local and not bars_were_off:
            datasets.enable_progress_bars()


def _dataset(task: Task):
    """The task's rows as a `datasets.DatasetDict` (one Dataset per split)."""
    import datasets

    path = os.path.expanduser(task.path)
    if not path:
        raise DataError("data.path is empty: set it to a .jsonl/.json/.csv/.parquet file or directory, or an HF "
                        "hub dataset id")
    local = _is_local(path)
    if local and not os.path.exists(path):
        raise DataError(f"data.path={path!r}: no such file or directory")
    file_type = FILE_TYPES.get(os.path.splitext(path)[1].lower())
    if os.path.isfile(path) and file_type is None:
        raise DataError(f"{path}: not a data file this reads ({', '.join(FILE_TYPES)})")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise DataError(f"{path}: empty file")
    try:
        with _quiet_datasets(local):
            if os.path.isfile(path):
                return datasets.load_dataset(file_type, data_files=path)
            return datasets.load_dataset(path, task.config or None)
    except Exception as e:  # datasets' and pyarrow's errors alike: one line naming the source
        raise DataError(f"{path}: {_unreadable(path, e)}") from None


def _unreadable(path: str, error: Exception) -> str:
    """Why a source could not be read: the bad line of a jsonl file, else the innermost error."""
    if path.endswith(".jsonl") and os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                try:
                    if line.strip():
                        json.loads(line)
                except json.JSONDecodeError as e:
                    return f"line {number}: invalid JSON ({e.msg} at column {e.colno})"
    return f"cannot be read ({_innermost(error)})"


def _innermost(error: BaseException) -> str:
    """The innermost cause of an error, as "Type: first line of its message"."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0]}"


def _rows(hub: tuple[str, str], tfds_name: str | None, split: str, source) -> Iterator[tuple[Mapping, str]]:
    """(row, where) pairs of one upstream split of a built-in task, `where` naming the row for error messages."""
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

    try:
        with _quiet_datasets(local=False):
            rows = datasets.load_dataset(repo, config, split=split)
    except Exception as e:  # no network, no access, a moved dataset: one line, and the way round it
        raise DataError(f"{repo} ({config}, {split}) could not be loaded from the HF hub ({_innermost(e)}); without "
                        f"network access set data.source to a local copy (a directory with {split}.jsonl)") from None
    for number, row in enumerate(rows, start=1):
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
