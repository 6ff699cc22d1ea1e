"""Every experiment end to end on CPU: a tiny random stand-in of its model family with the
family's real tokenizer and chat template, and real GSM8K / ARC rows from the shared data.
Two updates, save; resume and two more; the params then equal an uninterrupted 4-update run's
bit for bit. Also: the run writes metrics.jsonl, TensorBoard events, evaluations and samples."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import require
from hf_models import assert_exported_logits, make_hf_model
from latro_jax.config import ConfigError, ModelConfig
from latro_jax.convert.hf import convert_hf
from latro_jax.experiment import ExperimentError, experiment_from_dict, load_experiment
from latro_jax.runs import check_resumable, load_run_step
from latro_jax.train import run
from shared_tokenizers import built

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
EXPERIMENTS = sorted(  # the paper's experiments; the demo makes its own model (tests/test_demo.py), custom
    f[:-3] for f in os.listdir(os.path.join(os.path.dirname(__file__), "..", "experiments"))  # (test_tasks.py)
    if f.endswith(".py") and not f.startswith("_") and f not in ("demo.py", "custom.py")
)
STAND_INS = {  # experiment's model -> (HF model_type of the stand-in, tokenizer in the shared data)
    "llama": ("llama", "llama3"),
    "mistral": ("mistral", "mistral_v0.3"),
    "phi": ("phi3", "phi3_5_mini"),
}


@pytest.fixture(scope="module")
def stand_ins(test_data, tmp_path_factory):
    """A converted tiny random model per family, sized to its real tokenizer's vocabulary."""
    made = {}

    def get(model):
        if model not in made:
            family, tokenizer_name = STAND_INS[model]
            _, tokenizer, _ = built(test_data, tokenizer_name)
            # Narrow (width 16): the real vocabularies (up to 128,256) make the LM head the cost.
            overrides = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                             head_dim=8)
            if family == "phi3":  # Phi-3.5's LongRoPE with its real original context
                overrides.update(original_max_position_embeddings=4096, max_position_embeddings=8192,
                                 rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                                      short_factor=[1.0] * 4, long_factor=[2.0] * 4,
                                                      original_max_position_embeddings=4096))
            hf = make_hf_model(family, vocab_size=len(tokenizer), **overrides)
            directory = tmp_path_factory.mktemp(model)
            hf.save_pretrained(directory / "hf")
            convert_hf(str(directory / "hf"), directory / "ckpt")
            made[model] = (str(directory / "ckpt"), tokenizer)
        return made[model]

    return get


def tiny(name, checkpoint, output_dir, test_data, overrides=("objective.sft_coef=1.0",)):
    """`name` at a tiny size. By default with the paper's SFT term (Eq. 4): a random model finishes
    no 8-token rationale, so every row gets the same non-stop penalty and the advantages vanish;
    the SFT term keeps a gradient flowing. `overrides=()` keeps the recipe's objective."""
    task_dir = "gsm8k" if name.startswith("gsm8k") else "arc_challenge"
    source = os.path.dirname(require(os.path.join(test_data, task_dir, "train.jsonl")))
    return load_experiment(name, [
        f"model.checkpoint={checkpoint}", "model.hf=", "model.dtype=float32", f"data.source={source}",
        "data.eval_size=2", "rollout.num_samples=2", "rollout.max_new_tokens=8", "train.questions_per_update=2",
        "train.micro_batch=2", "train.updates=4", "train.eval_every=4", "train.save_every=2", "train.maj_k=2",
        f"train.output_dir={output_dir}", "optim.learning_rate=1e-3", *overrides,
    ])


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_runs_saves_and_resumes_exactly(name, stand_ins, test_data, tmp_path):
    checkpoint, tokenizer = stand_ins(name.split("_")[1])
    interrupted = tiny(name, checkpoint, tmp_path / "interrupted", test_data)
    first = run(interrupted, tokenizer=tokenizer, stop_after=2, progress=False)
    assert first["step"] == 2
    resumed = run(interrupted, tokenizer=tokenizer, progress=False)
    assert resumed["step"] == 4
    straight = run(tiny(name, checkpoint, tmp_path / "straight", test_data), tokenizer=tokenizer, progress=False)
    jax.tree.map(np.testing.assert_array_equal, resumed["params"], straight["params"])
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         straight["params"], run_start_params(checkpoint))
    assert max(jax.tree.leaves(moved)) > 0  # training changed the model
    # What `make eval` and `make export` read back from a run's checkpoint step: the params only,
    # the very ones the run ended with (the stop and the resume saved steps 2 and 4).
    step = load_run_step(os.path.join(interrupted.run_dir, "checkpoints", "4") + os.sep)
    jax.tree.map(np.testing.assert_array_equal, step.params, straight["params"])
    assert step.config.dtype == "float32" and step.hf_files == os.path.join(checkpoint, "hf")

    run_dir = interrupted.run_dir
    lines = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3, 4]
    assert os.listdir(os.path.join(run_dir, "tensorboard"))
    evaluation = json.load(open(os.path.join(run_dir, "eval_4.json")))
    assert evaluation["examples"] == 2 and 0 <= evaluation["greedy_accuracy"] <= 1 and "maj@2_accuracy" in evaluation
    assert os.path.getsize(os.path.join(run_dir, "samples.txt")) > 0


def test_a_stop_saves_before_the_evaluation_and_the_resume_does_it(stand_ins, test_data, tmp_path):
    """An update that is due an evaluation is saved before it; a stop then skips the evaluation
    (minutes at the paper's sizes, past a preemption's grace period), and the resumed run does it
    first, as an uninterrupted run did. Logs an earlier attempt wrote past the resumed checkpoint
    (here: a crash after update 3 was logged) are dropped, so each update is logged once."""
    checkpoint, tokenizer = stand_ins("llama")
    exp = tiny("gsm8k_llama", checkpoint, tmp_path / "stopped", test_data)
    exp = dataclasses.replace(exp, train=dataclasses.replace(exp.train, updates=2, eval_every=2, save_every=2))
    assert run(exp, tokenizer=tokenizer, stop_after=2, progress=False)["step"] == 2
    run_dir = exp.run_dir
    assert os.listdir(os.path.join(run_dir, "checkpoints")) == ["2"] and not os.listdir(os.path.join(run_dir, "best"))
    assert not os.path.exists(os.path.join(run_dir, "eval_2.json"))
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:  # and a line a kill cut short
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + '{"step": 3, "lo')
    with open(os.path.join(run_dir, "samples.txt"), "a") as f:
        f.write("==== update 3\nlost\n")

    resumed = run(exp, tokenizer=tokenizer, progress=False)
    assert resumed["step"] == 2 and "greedy_accuracy" in resumed
    assert os.listdir(os.path.join(run_dir, "best")) == ["2"]
    straight = dataclasses.replace(exp, train=dataclasses.replace(exp.train, output_dir=str(tmp_path / "straight")))
    run(straight, tokenizer=tokenizer, progress=False)
    evaluations = [json.load(open(os.path.join(d, "eval_2.json"))) for d in (run_dir, straight.run_dir)]
    assert evaluations[0]["rows"] == evaluations[1]["rows"]
    lines = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [(m["step"], "loss" in m) for m in lines] == [(1, True), (2, True), (2, False)]
    assert "eval/greedy_accuracy" in lines[2]
    samples = open(os.path.join(run_dir, "samples.txt")).read()
    assert "==== update 3" not in samples and samples.count("==== update 2") == 1


def plant_stop(model, stop_id: int, logit: float) -> None:
    """Make a random transformers model end a rationale now and then, as a real one does: every
    token's embedding gets a large constant first component, which dominates the final norm's
    output, and only `stop_id`'s LM-head row reads it, so the stop token's logit is about
    `logit` at every step, against logits near 0 for the rest of the vocabulary."""
    import torch

    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[stop_id, 0] = logit / 4.0  # the normed component is ~sqrt(hidden) = 4


# (experiment, the recipe's beta and non-stop coefficient as LATRO.md gives them, the planted stop's logit:
# about 1 chance in 10 a step over the vocabulary of Llama 3 (128,256) and Phi-3.5 (32,064))
RECIPE_OBJECTIVES = [("gsm8k_llama", 0.05, 2.0, 9.5), ("arc_phi", 0.25, 2.0, 8.5)]


@pytest.mark.parametrize("name, beta, nonstop_coef, logit", RECIPE_OBJECTIVES)
def test_recipe_objective_on_rows_that_finish(name, beta, nonstop_coef, logit, test_data, tmp_path, monkeypatch):
    """An experiment with its own objective (sft_coef 0, the task's beta, the non-stop penalty) on
    a stand-in that ends some rationales with its end-of-turn token: each update's rewards and
    advantages, taken from the run, equal LATRO.md's formulas computed here from full forwards
    over the packed rows with the policy and pi_0 the run sampled with (1e-4: float32 sums of
    a few log-probs in another order):
        R = log pi(y|x+z), or nonstop_coef * mean(R) for a row that did not finish,
        r = R - beta (log pi(z|x) - log pi_0(z|x)),  A_k = r_k - mean_{j != k} r_j.
    Some rows finish and some do not, and the policy has moved from pi_0 by the second update,
    so that each part of r counts."""
    import jax.numpy as jnp

    import latro_jax.train
    from latro_jax.scoring import masked_sum, token_logprobs

    family, tokenizer_name = STAND_INS[name.split("_")[1]]
    _, tokenizer, fmt = built(test_data, tokenizer_name)
    hf = make_hf_model(family, vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=8, max_position_embeddings=8192,
                       **({"original_max_position_embeddings": 4096,
                           "rope_parameters": dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 4,
                                                   long_factor=[2.0] * 4, original_max_position_embeddings=4096)}
                          if family == "phi3" else {}))
    plant_stop(hf, tokenizer.convert_tokens_to_ids(fmt.end_token), logit)
    hf.save_pretrained(tmp_path / "hf")
    convert_hf(str(tmp_path / "hf"), tmp_path / "ckpt")
    exp = tiny(name, tmp_path / "ckpt", tmp_path / "run", test_data,
               overrides=("rollout.num_samples=4", "train.updates=2", "train.eval_every=2"))
    assert (exp.objective.beta, exp.objective.sft_coef, exp.objective.nonstop_coef) == (beta, 0.0, nonstop_coef)
    assert not exp.objective.reference_compat and exp.objective.nonstop_group == 0

    seen = []
    original = latro_jax.train.rollout

    def recording(config, objective, sampling, params, ref_params, *args, **kwargs):
        copies = jax.tree.map(jnp.copy, (params, ref_params))  # before the update donates them
        scored, out = original(config, objective, sampling, params, ref_params, *args, **kwargs)
        seen.append((config, *copies, scored, out))
        return scored, out

    monkeypatch.setattr(latro_jax.train, "rollout", recording)
    run(exp, tokenizer=tokenizer, progress=False)
    assert len(seen) == 2
    k = exp.rollout.num_samples
    finished_rows = []
    for config, params, ref, scored, out in seen:
        def sums(p, mask):
            return np.asarray(masked_sum(token_logprobs(config, p, scored.tokens, scored.attention_mask), mask),
                              np.float64)

        answer, policy = sums(params, scored.answer_mask), sums(params, scored.rationale_mask)
        kl = policy - sums(ref, scored.rationale_mask)
        finished = np.asarray(out.finished)
        reward = np.where(finished, answer, nonstop_coef * answer.mean()) - beta * kl
        groups = reward.reshape(-1, k)
        advantages = (groups - (groups.sum(1, keepdims=True) - groups) / (k - 1)).reshape(-1)
        np.testing.assert_allclose(np.asarray(scored.rewards), reward, atol=1e-4)
        np.testing.assert_allclose(np.asarray(scored.advantages), advantages, atol=1e-4)
        finished_rows.append(finished)
    finished = np.concatenate(finished_rows)
    assert 0 < finished.sum() < finished.size, finished
    assert np.abs(kl).max() > 1e-2  # at the second update: the policy has moved from pi_0


def run_start_params(checkpoint):
    from latro_jax.checkpoint import load_model

    return load_model(checkpoint, param_dtype="float32")[1]


def test_a_bad_run_step_is_named(tmp_path):
    with pytest.raises(ExperimentError, match=f"{tmp_path} is not a checkpoint step of a training run"):
        load_run_step(tmp_path)
    step = tmp_path / "run" / "best" / "3"
    (step / "state").mkdir(parents=True)
    with pytest.raises(ExperimentError, match=f"{tmp_path / 'run' / 'config.json'}: the run's experiment could not"):
        load_run_step(step)
    (tmp_path / "run" / "config.json").write_text(json.dumps(dataclasses.asdict(load_experiment(
        "gsm8k_llama", [f"model.checkpoint={tmp_path / 'gone'}", "model.hf="]))))
    with pytest.raises(ExperimentError, match="gone \\(the model the run started from\\) is not a latro-jax checkpoint"):
        load_run_step(step)


def test_a_rerun_with_other_weights_does_not_resume(tmp_path):
    """A run directory with checkpoints resumes only under the settings its params are read with:
    train.updates may change (to train on) and model.checkpoint (a moved base), model.lora_alpha
    may not."""
    exp = load_experiment("gsm8k_llama", [f"train.output_dir={tmp_path}", "model.lora_rank=16"])
    os.makedirs(os.path.join(exp.run_dir, "checkpoints", "10"))
    with open(os.path.join(exp.run_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(exp), f)
    check_resumable(exp.run_dir, dataclasses.replace(exp, train=dataclasses.replace(exp.train, updates=500),
                                                     model=dataclasses.replace(exp.model, checkpoint="/moved")))
    other = dataclasses.replace(exp, model=dataclasses.replace(exp.model, lora_alpha=32.0))
    with pytest.raises(ExperimentError, match=r"holds checkpoints of a run with other weights \(model.lora_alpha: "
                                              r"16.0 in the run, now 32.0\): rerun with the run's settings"):
        run(other, progress=False)


def test_missing_weights_say_how_to_convert(tmp_path):
    exp = load_experiment("gsm8k_llama", [f"model.checkpoint={tmp_path / 'nowhere'}", "model.hf=",
                                          f"train.output_dir={tmp_path}"])
    with pytest.raises(ExperimentError, match="make convert SRC="):
        run(exp, progress=False)


def test_a_mesh_the_devices_cannot_make_names_the_fields(tmp_path):
    exp = load_experiment("gsm8k_llama", [f"train.output_dir={tmp_path}", f"mesh.data={jax.device_count() + 1}",
                                          "mesh.fsdp=1"])
    with pytest.raises(ExperimentError, match=r"mesh: MeshSpec\(data=\d+, fsdp=1, tensor=1\) uses \d+ devices"):
        run(exp, progress=False)


@pytest.mark.parametrize("override, message", [
    ("train.updates=zero", "train.updates='zero': expected int"),
    ("train.nope=1", "train has no field 'nope'"),
    ("rollout.num_samples=1", "rollout.num_samples=1 is invalid"),
    ("train.micro_batch=0", "train.micro_batch=0 is invalid; must be >= 1"),
    ("mesh.data=0", "mesh.data=0.*MeshSpec.data=0 must be a positive device count or -1"),
    ("mesh.tensor=-1", "mesh.tensor=-1.*only one axis may be -1"),
    ("model.remat=some", "model.remat='some' is invalid; allowed: none, full, projections"),
    ("objective.nonstop_group=5", "objective.nonstop_group=5 is invalid; must be 0 .* or divide "
                                  "train.questions_per_update=24"),
])
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(ExperimentError, match=message):
        load_experiment("gsm8k_llama", [override])


def test_remat_reads_the_older_true_false():
    """model.remat was a flag before it was a mode: overrides and a run's config.json that say
    true/false still load, as full/none, in the experiment and in a checkpoint's ModelConfig."""
    assert load_experiment("gsm8k_llama", []).model.remat == "projections"
    assert load_experiment("gsm8k_llama", ["model.remat=true"]).model.remat == "full"
    assert load_experiment("gsm8k_llama", ["model.remat=False"]).model.remat == "none"
    fields = dataclasses.asdict(load_experiment("gsm8k_llama", []))
    fields["model"]["remat"] = True
    assert experiment_from_dict(fields).model.remat == "full"
    assert ModelConfig("llama", 64, 32, 48, 2, 4, 2, 8, remat=False).remat == "none"
    with pytest.raises(ConfigError, match="remat='some'; allowed: none, full, projections"):
        ModelConfig("llama", 64, 32, 48, 2, 4, 2, 8, remat="some")


def cli_overrides(checkpoint, source, output_dir, updates):
    return [f"{section}.{field}={value}" for section, field, value in [
        ("model", "checkpoint", checkpoint), ("model", "hf", ""), ("model", "dtype", "float32"),
        ("data", "source", source), ("data", "eval_size", 2), ("rollout", "num_samples", 2),
        ("rollout", "max_new_tokens", 8), ("train", "questions_per_update", 2), ("train", "micro_batch", 2),
        ("train", "updates", updates), ("train", "maj_k", 2), ("train", "output_dir", output_dir),
        ("objective", "sft_coef", 1.0), ("optim", "learning_rate", 1e-3),  # a gradient that moves the params (see tiny)
    ]]


def test_train_and_eval_command_lines(stand_ins, test_data, tmp_path):
    """`tools/train.py` (what `make train` runs) shows a progress bar and writes its logs;
    `tools/eval.py` (what `make eval` runs) evaluates the run's best checkpoint into results.json."""
    checkpoint, tokenizer = stand_ins("llama")
    tokenizer.save_pretrained(os.path.join(checkpoint, "hf"))  # the CLI loads the checkpoint's tokenizer
    exp = tiny("gsm8k_llama", checkpoint, tmp_path, test_data)
    trained = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "train.py"), "gsm8k_llama",
         *cli_overrides(checkpoint, exp.data.source, tmp_path, updates=1)],
        capture_output=True, text=True,
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "gsm8k_llama: 100%" in trained.stderr and "1/1" in trained.stderr  # the tqdm bar
    run_dir = os.path.join(tmp_path, "gsm8k_llama")
    assert os.path.isfile(os.path.join(run_dir, "metrics.jsonl"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(run_dir, "tensorboard")))

    results = tmp_path / "results.json"
    evaluated = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "eval.py"), os.path.join(run_dir, "best", "1"), "--task", "gsm8k",
         "--split", "test", "--source", exp.data.source, "--limit", "2", "--maj-k", "2", "--max-new-tokens", "8",
         "--dtype", "float32", "--out", str(results)],
        capture_output=True, text=True,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    result = json.loads(results.read_text())
    assert result["examples"] == 2 and set(result) >= {"greedy_accuracy", "maj@2_accuracy", "tie_rule"}

    # `tools/export_hf.py` (what `make export` runs) writes the run's step as an HF model (the
    # path as tab completion gives it, with a slash) that transformers loads with our logits.
    exported = tmp_path / "exported"
    done = subprocess.run([sys.executable, os.path.join(REPO, "tools", "export_hf.py"),
                           os.path.join(run_dir, "best", "1") + os.sep, str(exported)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    step = load_run_step(os.path.join(run_dir, "best", "1"))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(step.params),
                                                       jax.tree.leaves(run_start_params(checkpoint))))
    assert_exported_logits(step.config, step.params, exported)
