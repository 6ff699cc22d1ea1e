"""The user's own task (data.task=custom): sources read through `datasets.load_dataset`, fields,
templates, the answer rules against hand-written cases, bad data answered with one line before
anything is written, and end-to-end runs on task files these tests write (free-text answers), with
a tiny stand-in model: train, stop, resume to the params of an uninterrupted run, evaluate."""

from __future__ import annotations

import csv
import json
import os
import re
import runpy
import subprocess
import sys

import jax
import numpy as np
import pytest

import latro_jax.evaluate as evaluate_module
from latro_jax.data.example import Example
from latro_jax.data.extraction import AnswerRule, final_answer, normalize
from latro_jax.data.prompts import STOP_STRINGS, encode_answers, prompt_format
from latro_jax.data.tasks import DataError, Task, load_split, run_data
from latro_jax.evaluate import evaluate, score
from latro_jax.experiment import DataSpec, ExperimentError, load_experiment
from latro_jax.train import run
from test_experiments import REPO, stand_ins  # noqa: F401 (stand_ins: a fixture)

# Recall questions with one-word answers: reasoning does not help, the gold is free text.
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
            ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Norway", "Oslo"), ("Greece", "Athens"),
            ("Cuba", "Havana"), ("Iran", "Tehran"), ("Nepal", "Kathmandu"), ("Ghana", "Accra"), ("Fiji", "Suva"),
            ("Laos", "Vientiane"), ("Mali", "Bamako"), ("Oman", "Muscat"), ("Chad", "N'Djamena"), ("Togo", "Lome")]


def qa_rows(n: int = 20) -> list[dict]:
    return [{"q": f"What is the capital of {country}?", "a": city, "region": "world"}
            for country, city in CAPITALS[:n]]


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def write_csv(path, rows) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


# ---- sources, fields and templates -------------------------------------------------------------

def test_a_jsonl_file_gives_train_and_a_held_out_validation_split(tmp_path):
    task = Task("custom", path=write_jsonl(tmp_path / "qa.jsonl", qa_rows()), question_field="q", answer_field="a",
                template="Answer briefly. {question} ({region})")
    train, validation = load_split(task, "train"), load_split(task, "validation")
    whole = load_split(task, "train_full")
    assert len(whole) == 20 and len(validation) == 2 and len(train) == 18  # a tenth held out, by hash
    assert {e.id for e in train} | {e.id for e in validation} == {e.id for e in whole}
    assert whole[0].question == "Answer briefly. What is the capital of France? (world)"
    assert (whole[0].answer, whole[0].id, whole[0].rationale, whole[0].options) == ("Paris", "custom/train/0", None, ())
    reordered = Task("custom", path=write_jsonl(tmp_path / "reordered.jsonl", qa_rows()[::-1]), question_field="q",
                     answer_field="a", template=task.template)
    assert [e.answer for e in load_split(reordered, "validation")] == [e.answer for e in validation][::-1]


def test_csv_parquet_json_and_directory_sources_give_the_same_examples(tmp_path):
    rows = qa_rows(12)
    fields = dict(question_field="q", answer_field="a")
    expected = load_split(Task("custom", path=write_jsonl(tmp_path / "qa.jsonl", rows), **fields), "train_full")
    import pandas as pd

    pd.DataFrame(rows).to_parquet(tmp_path / "qa.parquet")
    (tmp_path / "qa.json").write_text(json.dumps(rows))
    for path in (write_csv(tmp_path / "qa.csv", rows), str(tmp_path / "qa.parquet"), str(tmp_path / "qa.json")):
        assert load_split(Task("custom", path=path, **fields), "train_full") == expected, path
    directory = tmp_path / "splits"
    directory.mkdir()
    write_jsonl(directory / "train.jsonl", rows[:8])
    write_jsonl(directory / "test.jsonl", rows[8:])  # a split per file name; no validation file: held out of train
    task = Task("custom", path=str(directory), **fields)
    assert [e.answer for e in load_split(task, "test")] == [r["a"] for r in rows[8:]]
    assert len(load_split(task, "train_full")) == 8 and len(load_split(task, "validation")) == 0
    with pytest.raises(DataError, match=re.escape(f"{directory} has no split 'dev'; its splits are")):
        load_split(task, "dev")


def test_numbers_options_rationales_and_ids_from_fields(tmp_path):
    rows = [{"id": "a1", "problem": "2+2?", "solution": 4, "why": "2+2=4.", "choices": ["3", "four"]},
            {"id": "a2", "problem": "3+3?", "solution": 6, "why": "3+3=6.", "choices": ["6", "7"]}]
    path = write_jsonl(tmp_path / "math.jsonl", rows)
    task = Task("custom", path=path, question_field="problem", answer_field="solution", rationale_field="why",
                id_field="id", match="number", template="{question} Options: {options}")
    first, second = load_split(task, "train_full")
    assert (first.id, first.answer, first.rationale, first.question) == ("a1", "4", "2+2=4.", "2+2? Options: []")
    assert second.answer == "6"  # a number is read as its text (the number rule compares values)
    choice = Task("custom", path=path, question_field="problem", answer_field="solution", options_field="choices",
                  match="choice")
    with pytest.raises(DataError, match=re.escape(f"{path} row 1: answer '4' is not one of the options")):
        load_split(choice, "train_full")


def test_a_hub_dataset_id_is_loaded_with_its_config(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(qa_rows(10)),
                                     "test": datasets.Dataset.from_list(qa_rows(3))})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = Task("custom", path="someone/capitals", config="v2", question_field="q", answer_field="a")
    assert [e.answer for e in load_split(task, "test")] == ["Paris", "Tokyo", "Rome"]
    assert calls == [("someone/capitals", "v2", {})]
    assert [e.id for e in load_split(task, "validation")]  # held out of the hub's train split
    with pytest.raises(DataError, match=re.escape("someone/capitals (train) row 2: empty answer")):
        bad = qa_rows(10)
        bad[1]["a"] = " "
        monkeypatch.setattr(datasets, "load_dataset",
                            lambda path, name=None: datasets.DatasetDict({"train": datasets.Dataset.from_list(bad),
                                                                           "test": datasets.Dataset.from_list(bad)}))
        load_split(task, "train")


def test_bad_rows_are_skipped_and_counted_only_when_asked(tmp_path, capsys):
    rows = qa_rows(12)
    rows[3]["a"] = ""
    rows[7]["q"] = None
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(DataError, match=re.escape(f"{path} row 4: empty answer (field 'a')")):
        load_split(Task("custom", path=path, question_field="q", answer_field="a"), "train_full")
    kept = load_split(Task("custom", path=path, question_field="q", answer_field="a", skip_bad_rows=True), "train_full")
    assert len(kept) == 10 and "Chile" not in " ".join(e.question for e in kept)
    err = capsys.readouterr().err
    assert f"{path} (train): skipped 2 of 12 rows (data.skip_bad_rows); the first: {path} row 4: empty answer" in err


# ---- answer rules --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("Paris is big. The answer is Paris.", "Paris"),
    ("the answer is: New York City.\nMore text.", "New York City"),
    ("The answer is 3.5. So it is.", "3.5"),
    ("The answer is U.S.A.", "U.S.A"),
    ("The answer is Rome. No, the answer is Milan!", "Milan!"),
    ("The answer is\n  Oslo", "Oslo"),
    ("no marker here: Paris.", None),
    ("The answer is.", None),
])
def test_final_answer(text, expected):
    assert final_answer(text) == expected


def test_normalize_ignores_case_punctuation_articles_and_spacing():
    assert normalize("  The  Eiffel-Tower! ") == "eiffel tower"
    assert normalize("An apple, a day") == "apple day"
    assert normalize("Theatre") == "theatre"  # an article only as a whole word


@pytest.mark.parametrize("match, text, gold, correct", [
    ("exact", "The answer is Paris.", "Paris", True),
    ("exact", "The answer is paris.", "Paris", False),
    ("normalized", "The answer is PARIS!", "Paris", True),
    ("normalized", "The answer is the Eiffel tower.", "Eiffel Tower", True),
    ("normalized", "The answer is Paris, France.", "Paris", False),
    ("contains", "The answer is Paris, France.", "Paris", True),
    ("contains", "The answer is Parisian.", "Paris", False),  # whole words only
    ("contains", "Paris. I do not know.", "Paris", False),  # nothing after a marker: no answer
    ("number", "The answer is $1,000.", "1000", True),
    ("number", "So 7 + 3 = 10.", "10", True),  # no marker: the last number
])
def test_answer_rules(match, text, gold, correct):
    assert AnswerRule(match).correct(text, gold) is correct


def test_a_custom_answer_template_moves_the_marker_the_stops_and_the_suffix(test_data):
    from shared_tokenizers import built

    task = Task("custom", path="x.jsonl", answer_template="Final answer: {answer}", match="exact")
    assert (task.rule.marker, task.rule.closing) == ("Final answer:", "")
    assert task.stop_strings == (*STOP_STRINGS, "Final answer:")
    assert Task("custom", path="x.jsonl").stop_strings == STOP_STRINGS  # the default marker is a released stop
    assert task.rule.correct("Thinking... Final answer: Lima", "Lima")
    assert not task.rule.correct("Thinking... The answer is Lima", "Lima")
    _, tokenizer, _ = built(test_data, "llama3")
    fmt = prompt_format(tokenizer, task.stop_strings)
    assert tokenizer.decode(encode_answers(tokenizer, fmt, ["Lima"], task.answer_template)[0]) == \
        "Final answer: Lima" + fmt.end_token
    assert tuple(tokenizer("\nFinal answer:", add_special_tokens=False)["input_ids"][1:]) in fmt.stop_sequences


def test_score_by_a_custom_rule():
    task = Task("custom", path="x.jsonl", match="normalized")
    examples = [Example("custom", answer, "?", answer) for answer in ("Paris", "New York")]
    result = score(task, examples, ["The answer is PARIS!", "The answer is York."],
                   [["The answer is paris", "The answer is Lyon", "The answer is the Paris."],
                    ["The answer is new york", "no idea", "The answer is York"]], 3)
    assert [r["greedy_correct"] for r in result["rows"]] == [True, False]
    assert [r["maj@3"] for r in result["rows"]] == ["paris", "new york"]
    assert [r["gold"] for r in result["rows"]] == ["paris", "new york"]
    assert result["greedy_accuracy"] == 0.5 and result["maj@3_accuracy"] == 1.0


# ---- bad data: one line, exit 2, nothing written -------------------------------------------------

def train_command(argv, monkeypatch, capsys) -> tuple[int, str]:
    """tools/train.py (what `make train` runs) in this process: its exit status and stderr."""
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    monkeypatch.syspath_prepend(os.path.join(REPO, "tools"))
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(os.path.join(REPO, "tools", "train.py"), run_name="__main__")
    return exit_.value.code, capsys.readouterr().err


def rows_with(index, **fields):
    rows = qa_rows()
    rows[index] = {k: v for k, v in {**rows[index], **fields}.items() if v is not None}
    return rows


BAD_DATA = {  # case: (rows or a file's text, overrides, what the message must name)
    "missing field": (rows_with(2, a=None), [], ["row 3", "missing field 'a'"]),
    "empty answer": (rows_with(1, a="   "), [], ["row 2", "empty answer", "'a'"]),
    "unknown template field": (qa_rows(), ["data.template={q} in {country}"], ["'country'", "data.template"]),
    "unknown split": (qa_rows(), ["data.eval_split=dev"], ["no split 'dev'", "'train', 'validation', 'train_full'"]),
    "unknown match rule": (qa_rows(), ["data.match=fuzzy"], ["data.match='fuzzy'", "normalized"]),
    "invalid json": (qa_rows()[:3] + ['{"q": "x", "a": '], [], ["line 4: invalid JSON"]),
    "not a number": (qa_rows(), ["data.match=number"], ["row 1", "'Paris' is not a number"]),
    "unknown field": (qa_rows(), ["data.answer_field=answer"], ["no field 'answer' (data.answer_field)", "q, a"]),
    "no such file": (None, [], ["no such file", "missing.jsonl"]),
    "validation split too small": (qa_rows(5), [], ["data.eval_split='validation'", "no questions"]),
    "a built-in task's fields": (qa_rows(), ["data.task=gsm8k"], ["data.path=", "data.task=custom"]),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_gets_one_line_and_exit_2_and_nothing_is_written(case, tmp_path, monkeypatch, capsys):
    rows, overrides, named = BAD_DATA[case]
    path = tmp_path / "missing.jsonl" if rows is None else tmp_path / "task.jsonl"
    if rows is not None:
        write_jsonl(path, rows)
    output = tmp_path / "runs"
    code, err = train_command(["custom", f"data.path={path}", "data.question_field=q", "data.answer_field=a",
                               f"model.hf={tmp_path / 'not-read'}", f"train.output_dir={output}",
                               *overrides], monkeypatch, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for part in named + ([str(path)] if case not in ("unknown match rule", "a built-in task's fields") else []):
        assert part in err, (part, err)
    assert not output.exists()


# ---- end to end ----------------------------------------------------------------------------------

def custom_experiment(checkpoint, path, output_dir, *overrides):
    return load_experiment("custom", custom_overrides(checkpoint, path, output_dir, *overrides))


def custom_overrides(checkpoint, path, output_dir, *overrides):
    return [
        f"model.checkpoint={checkpoint}", "model.dtype=float32", f"data.path={path}", "data.question_field=q",
        "data.answer_field=a", "data.eval_size=0", "rollout.num_samples=2", "rollout.max_new_tokens=8",
        "train.questions_per_update=2", "train.micro_batch=2", "train.updates=2", "train.eval_every=2",
        "train.save_every=1", "train.maj_k=2", f"train.output_dir={output_dir}", "optim.learning_rate=1e-3",
        "objective.sft_coef=1.0", *overrides,  # the SFT term keeps a gradient flowing (test_experiments.tiny)
    ]


def metrics_lines(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def llama(stand_ins):  # noqa: F811
    return stand_ins("llama")


def test_a_free_text_task_trains_resumes_and_evaluates_with_normalized_matching(llama, tmp_path, monkeypatch):
    checkpoint, tokenizer = llama
    path = write_jsonl(tmp_path / "capitals.jsonl", qa_rows())
    exp = custom_experiment(checkpoint, path, tmp_path / "stopped", "data.match=normalized")
    assert run(exp, tokenizer=tokenizer, stop_after=1, progress=False)["step"] == 1
    resumed = run(exp, tokenizer=tokenizer, progress=False)
    straight = run(custom_experiment(checkpoint, path, tmp_path / "straight", "data.match=normalized"),
                   tokenizer=tokenizer, progress=False)
    assert resumed["step"] == straight["step"] == 2
    jax.tree.map(np.testing.assert_array_equal, resumed["params"], straight["params"])

    task, _, validation = run_data(exp.data)
    evaluation = json.load(open(os.path.join(exp.run_dir, "eval_2.json")))
    assert evaluation["examples"] == 2 == len(validation)
    assert [r["gold"] for r in evaluation["rows"]] == [normalize(e.answer) for e in validation]
    lines = metrics_lines(exp.run_dir)
    assert [m["step"] for m in lines if "loss" in m] == [1, 2]
    assert all({"rationale_length_mean", "empty_rationale_fraction"} <= set(m) for m in lines if "loss" in m)

    # The evaluation judges by the task's rule: generations that name the gold with other case,
    # punctuation and articles are right under `normalized`, wrong under `exact`.
    def scripted_generations(config, params, tokenizer, prompts, sampling, rng, batch_size):
        texts = [f"Let me recall. The answer is the {e.answer.upper()}!" for e in validation]
        return [[t] * sampling.num_samples for t in texts]

    monkeypatch.setattr(evaluate_module, "generate_texts", scripted_generations)
    fmt = prompt_format(tokenizer, task.stop_strings)
    normalized = evaluate(None, None, tokenizer, fmt, validation, task, 8, 2, jax.random.key(0), progress=False)
    assert normalized["greedy_accuracy"] == normalized["maj@2_accuracy"] == 1.0
    exact = evaluate(None, None, tokenizer, fmt, validation, Task("custom", path=path, match="exact"), 8, 2,
                     jax.random.key(0), progress=False)
    assert exact["greedy_accuracy"] == exact["maj@2_accuracy"] == 0.0


def test_eval_command_reads_the_run_s_task_settings(llama, tmp_path):
    """`tools/train.py` and `tools/eval.py` (what `make train` and `make eval` run) on a custom task:
    the progress bar shows the rationales' length and empty fraction; the evaluation of the run's
    step reads the run's own task settings."""
    checkpoint, tokenizer = llama
    tokenizer.save_pretrained(os.path.join(checkpoint, "hf"))  # the CLI loads the checkpoint's tokenizer
    path = write_jsonl(tmp_path / "capitals.jsonl", qa_rows())
    overrides = custom_overrides(checkpoint, path, tmp_path, "train.updates=1", "train.eval_every=1")
    trained = subprocess.run([sys.executable, os.path.join(REPO, "tools", "train.py"), "custom", *overrides],
                             capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "custom: 100%" in trained.stderr and "len=" in trained.stderr and "empty=" in trained.stderr
    exp = load_experiment("custom", overrides)
    out = tmp_path / "results.json"
    step = os.path.join(exp.run_dir, "best", "1")
    done = subprocess.run([sys.executable, os.path.join(REPO, "tools", "eval.py"), step,
                           "--split", "train", "--limit", "3", "--maj-k", "2", "--max-new-tokens", "4", "--dtype",
                           "float32", "--out", str(out), "data.match=exact"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["task"] == "custom" and result["examples"] == 3
    assert result["data"]["path"] == path and result["data"]["match"] == "exact"  # the run's, then the setting
    train = load_split(Task("custom", path=path, question_field="q", answer_field="a"), "train")
    assert [r["gold"] for r in result["rows"]] == [e.answer for e in train[:3]]


def test_a_csv_task_with_the_rlpr_reward(llama, tmp_path):
    """mean_prob with the no-rationale baseline (RLPR's debiased reward) on a CSV source."""
    checkpoint, tokenizer = llama
    path = write_csv(tmp_path / "capitals.csv", qa_rows())
    rlpr = ("objective.reward=mean_prob", "objective.reward_baseline=no_rationale", "objective.nonstop_coef=0")
    exp = custom_experiment(checkpoint, path, tmp_path / "stopped", *rlpr)
    assert run(exp, tokenizer=tokenizer, stop_after=1, progress=False)["step"] == 1
    resumed = run(exp, tokenizer=tokenizer, progress=False)
    straight = run(custom_experiment(checkpoint, path, tmp_path / "straight", *rlpr), tokenizer=tokenizer,
                   progress=False)
    jax.tree.map(np.testing.assert_array_equal, resumed["params"], straight["params"])
    updates = [m for m in metrics_lines(exp.run_dir) if "loss" in m]
    assert len(updates) == 2
    for m in updates:  # R' = max(0, R(z) - R(empty)) >= 0; R(empty) a mean probability in (0, 1)
        assert m["answer_reward_mean"] >= 0 and 0 < m["no_rationale_reward_mean"] < 1
    assert os.path.isfile(os.path.join(exp.run_dir, "eval_2.json"))


def test_overrides_of_one_section_are_checked_together_in_any_order():
    rlpr = ["objective.reward=mean_prob", "objective.reward_baseline=no_rationale", "objective.nonstop_coef=0"]
    for overrides in (rlpr, rlpr[::-1]):
        objective = load_experiment("gsm8k_llama", overrides).objective
        assert (objective.reward, objective.reward_baseline, objective.nonstop_coef) == ("mean_prob", "no_rationale", 0)
    message = "objective.reward='prob' is invalid; ObjectiveConfig.nonstop_coef"
    with pytest.raises(ExperimentError, match=re.escape(message)):
        load_experiment("gsm8k_llama", ["objective.reward=prob"])


def test_data_settings_of_a_built_in_task_are_refused():
    from latro_jax.experiment import validate_data

    message = "data.match='exact' is invalid; is a setting of data.task=custom"
    with pytest.raises(ExperimentError, match=re.escape(message)):
        validate_data(DataSpec(task="gsm8k", match="exact"))
    with pytest.raises(ExperimentError, match="data.path='' is invalid; set it to your task's"):
        validate_data(DataSpec(task="custom"))
    with pytest.raises(ExperimentError, match=re.escape("data.answer_template='Answer' must hold {answer} once")):
        validate_data(DataSpec(task="custom", path="x.jsonl", answer_template="Answer"))
    with pytest.raises(ExperimentError, match="needs data.options_field"):
        validate_data(DataSpec(task="custom", path="x.jsonl", match="choice"))


def test_the_readme_example_reads_and_its_command_validates(tmp_path):
    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme[readme.index("## Your own task"):]
    example = section[section.index("```json\n") + 8: section.index("```", section.index("```json\n") + 8)]
    path = tmp_path / "my_qa.jsonl"
    path.write_text(example)
    command = section[section.index("make train EXP=custom"): section.index("make eval")]
    overrides = [word.replace("my_qa.jsonl", str(path)) for word in command.split()[3:] if "=" in word]
    exp = load_experiment("custom", overrides + [f"train.output_dir={tmp_path}"])
    task, train, validation = run_data(exp.data)
    assert len(train) + len(validation) == 10 and len(validation) == 1
    assert {e.answer for e in train + validation} >= {"Paris", "Jane Austen", "the Pacific Ocean"}
    assert task.rule.correct("It is the largest. The answer is Pacific ocean.", "the Pacific Ocean")
