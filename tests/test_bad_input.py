"""Bad input to `make train` (tools/train.py, run in this process): every case one line on stderr
naming the culprit, exit 2, no traceback, nothing written, and checked before any weights load
(the start-up checks of `latro_jax.startup` and the experiment's validation)."""

from __future__ import annotations

import json
import os
import runpy
import sys

import pytest

from conftest import require
from hf_models import make_hf_model
from latro_jax.convert.hf import convert_hf
from latro_jax.experiment import ExperimentError, load_experiment
from test_tasks import REPO, train_command, write_jsonl

GSM8K_ROW = {"question": "What is 3+4?", "answer": "3+4=7\n#### 7"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny model checkpoints with the synthetic task's tokenizer in their hf/: one whose
    vocabulary fits the tokenizer, one whose embedding is 10 rows short of it."""
    from latro_jax.data.synthetic import build_tokenizer

    folder = tmp_path_factory.mktemp("bad-input")
    tokenizer = build_tokenizer(folder / "tokenizer")
    made = {}
    for name, vocab in (("fits", len(tokenizer)), ("short", len(tokenizer) - 10)):
        hf = make_hf_model("llama", vocab_size=vocab, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=8)
        hf.save_pretrained(folder / name / "hf")
        convert_hf(str(folder / name / "hf"), folder / name / "ckpt")
        tokenizer.save_pretrained(folder / name / "ckpt" / "hf")
        made[name] = str(folder / name / "ckpt")
    made["tokenizer"] = str(folder / "tokenizer")
    return made


def gsm8k_dir(path, train_rows, test_rows=(GSM8K_ROW,)):
    path.mkdir()
    write_jsonl(path / "train.jsonl", list(train_rows)) if train_rows else (path / "train.jsonl").write_text("")
    write_jsonl(path / "test.jsonl", list(test_rows))
    return str(path)


def real_gsm8k(test_data):
    return os.path.dirname(require(os.path.join(test_data, "gsm8k", "train.jsonl")))


def offline_hub(monkeypatch):
    import datasets

    def no_network(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", no_network)


# case: (overrides, given tmp_path, test_data, checkpoints and monkeypatch; what the message must name)
CASES = {
    "tokenizer larger than the model's vocabulary": (
        lambda t, d, c, m: [f"model.checkpoint={c['short']}", f"data.source={real_gsm8k(d)}"],
        ["model.tokenizer", "more than the model's vocabulary"]),
    "another tokenizer larger than the model's vocabulary": (
        lambda t, d, c, m: [f"model.checkpoint={c['short']}", f"model.tokenizer={c['tokenizer']}",
                            f"data.source={real_gsm8k(d)}"],
        ["model.tokenizer", "tokenizer", "tokens, more than the model's vocabulary"]),
    "a learning rate of inf": (lambda t, d, c, m: ["optim.learning_rate=inf"], ["optim.learning_rate=inf"]),
    "a temperature of inf": (lambda t, d, c, m: ["rollout.temperature=inf"], ["rollout.temperature=inf"]),
    "nan where a number must be finite": (lambda t, d, c, m: ["objective.beta=nan"], ["beta"]),
    "a training file too small for a validation split": (
        lambda t, d, c, m: [f"data.source={gsm8k_dir(t / 'small', [GSM8K_ROW] * 5)}"],
        ["data.eval_split='validation'", "no questions"]),
    "an empty training file": (
        lambda t, d, c, m: [f"data.source={gsm8k_dir(t / 'empty', [])}"], ["data.train_split='train'", "no questions"]),
    "a missing tokenizer directory": (
        lambda t, d, c, m: [f"model.tokenizer={t / 'no-tokenizer'}", f"data.source={real_gsm8k(d)}"],
        ["model.tokenizer", "no-tokenizer", "no such directory"]),
    "an unknown evaluation split": (
        lambda t, d, c, m: [f"data.source={real_gsm8k(d)}", "data.eval_split=dev"], ["gsm8k has no split 'dev'"]),
    "a data source for the generated task": (
        lambda t, d, c, m: ["data.task=arithmetic", "data.source=somewhere"], ["data.source='somewhere'", "generated"]),
    "an output directory under a file": (
        lambda t, d, c, m: [f"train.output_dir={write_jsonl(t / 'a-file', [])}/runs"],
        ["train.output_dir=", "a-file is a file"]),
    "the default dataset without network": (
        lambda t, d, c, m: offline_hub(m) or [], ["openai/gsm8k", "could not be loaded from the HF hub", "data.source"]),
    "a mesh the devices cannot make": (
        lambda t, d, c, m: [f"data.source={real_gsm8k(d)}", "mesh.data=3", "mesh.fsdp=1"], ["mesh", "devices"]),
    "an unknown override": (lambda t, d, c, m: ["train.epochs=3"], ["train has no field 'epochs'"]),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_one_line_and_exit_2_and_nothing_is_written(case, checkpoints, test_data, tmp_path,
                                                                   monkeypatch, capsys):
    overrides, named = CASES[case]
    output = tmp_path / "runs"
    args = [f"model.checkpoint={checkpoints['fits']}", f"train.output_dir={output}",
            *overrides(tmp_path, test_data, checkpoints, monkeypatch)]
    code, err = train_command(["gsm8k_llama", *args], monkeypatch, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for part in named:
        assert part in err, (part, err)
    assert not output.exists()


@pytest.mark.parametrize("weights", ["none", "truncated"])
def test_a_failed_first_start_leaves_no_directory(weights, checkpoints, test_data, tmp_path, monkeypatch, capsys):
    """An HF model without weights, or with a truncated model.safetensors, fails in its conversion,
    after the run directory was made: one line naming the file, and no directory left."""
    import shutil

    source = os.path.join(os.path.dirname(checkpoints["fits"]), "hf")
    hf = tmp_path / "hf-model"
    hf.mkdir()
    shutil.copy(os.path.join(source, "config.json"), hf)
    for name in os.listdir(os.path.join(checkpoints["fits"], "hf")):  # the tokenizer's files
        if "token" in name or name.endswith(".jinja"):
            shutil.copy(os.path.join(checkpoints["fits"], "hf", name), hf)
    if weights == "truncated":
        data = open(os.path.join(source, "model.safetensors"), "rb").read()
        (hf / "model.safetensors").write_bytes(data[: len(data) // 2])
    output = tmp_path / "runs" / "here"
    code, err = train_command(["gsm8k_llama", f"model.hf={hf}", f"train.output_dir={output}",
                               f"data.source={real_gsm8k(test_data)}"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(hf) in err and "safetensors" in err
    if weights == "truncated":
        assert f"{hf / 'model.safetensors'}: not a readable safetensors file" in err, err
    assert not (tmp_path / "runs").exists()


def test_a_rerun_below_the_saved_step_stops_and_leaves_the_run_as_it_was(checkpoints, test_data, tmp_path,
                                                                         monkeypatch, capsys):
    overrides = [f"model.checkpoint={checkpoints['fits']}", f"train.output_dir={tmp_path}",
                 f"data.source={real_gsm8k(test_data)}"]
    exp = load_experiment("gsm8k_llama", overrides)
    os.makedirs(os.path.join(exp.run_dir, "checkpoints", "4"))  # a run saved at update 4
    config = os.path.join(exp.run_dir, "config.json")
    with open(config, "w") as f:
        json.dump({"saved": "by the run"}, f)
    code, err = train_command(["gsm8k_llama", *overrides, "train.updates=2"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "train.updates=2 is below update 4" in err and exp.run_dir in err
    assert json.load(open(config)) == {"saved": "by the run"}
    assert sorted(os.listdir(exp.run_dir)) == ["checkpoints", "config.json"]


def test_the_documented_command_with_model_checkpoint_validates():
    """README and tools/train.py's help: `tools/train.py gsm8k_llama ... model.checkpoint=<dir>`,
    although the recipe presets model.hf; and model.hf alone replaces a preset checkpoint."""
    exp = load_experiment("gsm8k_llama", ["train.updates=2", "model.checkpoint=ckpt/llama"])
    assert (exp.model.checkpoint, exp.model.hf) == ("ckpt/llama", "")
    assert load_experiment("arc_llama", ["model.hf=./my-hf-model"]).model.checkpoint == ""
    with pytest.raises(ExperimentError, match="set exactly one"):
        load_experiment("gsm8k_llama", ["model.checkpoint=ckpt/llama", "model.hf=meta-llama/x"])
    mesh = load_experiment("gsm8k_llama", ["mesh.data=-1", "mesh.fsdp=1"]).mesh
    assert mesh == load_experiment("gsm8k_llama", ["mesh.fsdp=1", "mesh.data=-1"]).mesh  # any order


def test_eval_of_an_unknown_split_is_one_line(checkpoints, test_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "results.json"
    monkeypatch.setattr(sys, "argv", ["eval.py", checkpoints["fits"], "--task", "gsm8k", "--source",
                                      real_gsm8k(test_data), "--split", "dev", "--out", str(out)])
    monkeypatch.syspath_prepend(os.path.join(REPO, "tools"))
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(os.path.join(REPO, "tools", "eval.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "gsm8k has no split 'dev'" in err and not out.exists()
