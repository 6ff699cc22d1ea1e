"""The run loop's bookkeeping, each against a reference of its own: which step best/ keeps over
several evaluations (scripted accuracies) and how many checkpoints/ keeps; the logged learning
rate against optax's schedule, across an update skipped for a non-finite loss; model.hf
converted into the run directory once; a SIGTERM or Ctrl-C to `tools/train.py`, then the same
command again, resuming to the params of an uninterrupted run."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import latro_jax.train as train
from latro_jax.checkpoint import CONFIG_FILE, load_model
from latro_jax.convert.hf import convert_hf
from latro_jax.experiment import load_experiment
from latro_jax.runs import load_run_step
from latro_jax.train import run
from test_experiments import REPO, cli_overrides, stand_ins, tiny  # noqa: F401 (stand_ins: a fixture)

# Scripted validation greedy accuracy after each update: best at 2 and 3 (a tie), the last lower.
ACCURACY = [0.25, 0.75, 0.75, 0.5]


@pytest.fixture(scope="module", autouse=True)
def one_optimizer_per_schedule():
    """run() makes its optimizer afresh, and the jitted update is keyed on that object: the runs
    of this module with the same optim spec and train.updates share one, so that the update
    compiles once for them."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "make_optimizer", functools.lru_cache(train.make_optimizer))
        yield


def with_train(exp, **fields):
    return dataclasses.replace(exp, train=dataclasses.replace(exp.train, **fields))


def lines(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def saved_steps(run_dir, manager):
    return sorted(int(d) for d in os.listdir(os.path.join(run_dir, manager)) if d.isdigit())


def assert_same_params(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def optimizer_counts(opt_state) -> set[int]:
    """Every `count` in an optax state (Adam's moments' and the schedule's), read independently of
    update.applied_updates."""
    return {int(np.asarray(leaf)) for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]
            if getattr(path[-1], "name", None) == "count"}


def scripted_evaluate(accuracies, evaluated):
    """A stand-in for train.evaluate (same arguments, the same keys as evaluate.score returns):
    the i-th call (from 1) returns accuracies[i - 1] and records the params it was given as
    evaluated[i]."""

    def evaluate(config, params, tokenizer, fmt, examples, task, max_new_tokens, maj_k, rng, batch_size=64,
                 progress=True):
        at = len(evaluated) + 1
        evaluated[at] = jax.device_get(params)  # a host copy: the next update donates the buffers
        return {"examples": len(examples), "greedy_accuracy": accuracies[at - 1], f"maj@{maj_k}_accuracy": 0.0,
                "maj_k": maj_k, "tie_rule": "scripted", "rows": []}

    return evaluate


@pytest.fixture(scope="module")
def evaluated_run(stand_ins, test_data, tmp_path_factory):  # noqa: F811
    """Four updates of a tiny run, evaluated after each (scripted accuracies), saved after each,
    keeping the last two; no warm-up."""
    checkpoint, tokenizer = stand_ins("llama")
    exp = tiny("gsm8k_llama", checkpoint, tmp_path_factory.mktemp("evaluated"), test_data)
    exp = with_train(exp, updates=4, eval_every=1, save_every=1, keep_last=2)
    evaluated = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "evaluate", scripted_evaluate(ACCURACY, evaluated))
        result = run(exp, tokenizer=tokenizer, progress=False)
    return exp, evaluated, result


def test_best_keeps_the_most_accurate_step_and_checkpoints_the_last_few(evaluated_run):
    """best/ holds the params of the step with the highest validation greedy accuracy, not the
    last step's. Of equal best accuracies (steps 2 and 3) it keeps the later step: orbax's BestN
    sorts the steps by the metric, stably in step order, and keeps the end of that list.
    checkpoints/ holds the last train.keep_last=2 steps."""
    exp, evaluated, result = evaluated_run
    run_dir = exp.run_dir
    assert sorted(evaluated) == [1, 2, 3, 4]
    assert [m["eval/greedy_accuracy"] for m in lines(run_dir) if "eval/greedy_accuracy" in m] == ACCURACY
    assert saved_steps(run_dir, "best") == [3]
    assert_same_params(load_run_step(os.path.join(run_dir, "best", "3")).params, evaluated[3])
    # The evaluated params moved between the steps, so the comparison above tells them apart.
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(evaluated[3]),
                                                       jax.tree.leaves(evaluated[4])))
    assert saved_steps(run_dir, "checkpoints") == [3, 4]
    assert_same_params(load_run_step(os.path.join(run_dir, "checkpoints", "4")).params, result["params"])
    assert_same_params(result["params"], evaluated[4])


def test_logged_learning_rate_is_optax_schedule_without_warmup(evaluated_run):
    """Each logged lr is the rate optax's linear decay (written here independently) has at the
    update's index, which without a skipped update is the optimizer's count."""
    exp, _, _ = evaluated_run
    schedule = optax.linear_schedule(1e-3, 0.0, 4)  # optim.learning_rate=1e-3 (tiny), decay over 4 updates
    logged = [m["lr"] for m in lines(exp.run_dir) if "loss" in m]
    np.testing.assert_allclose(logged, [float(schedule(i)) for i in range(4)], rtol=1e-6, atol=0)


SKIPPED = 2  # the third update (logged as step 3) is made non-finite


@pytest.fixture(scope="module")
def skipping_run(stand_ins, test_data, tmp_path_factory):  # noqa: F811
    """Five updates with two of warm-up; the third update's advantages are NaN. Records the
    optimizer's count before each update, and the params and count after it."""
    checkpoint, tokenizer = stand_ins("llama")
    exp = tiny("gsm8k_llama", checkpoint, tmp_path_factory.mktemp("skipping"), test_data)
    exp = with_train(exp, updates=5, eval_every=5, save_every=5)
    exp = dataclasses.replace(exp, optim=dataclasses.replace(exp.optim, warmup_steps=2))
    rollouts, before, after = [0], [], []
    real_rollout, real_update_jit = train.rollout, train.update_jit

    def rollout(*args, **kwargs):
        scored, out = real_rollout(*args, **kwargs)
        if rollouts[0] == SKIPPED:
            scored = scored._replace(advantages=jnp.full_like(scored.advantages, jnp.nan))
        rollouts[0] += 1
        return scored, out

    def update_jit(params, opt_state):
        update = real_update_jit(params, opt_state)

        def recorded(*args):  # (config, objective, optimizer, micro, rows_loss, score_from, params, opt_state, ...)
            before.append(optimizer_counts(args[7]))
            params, opt_state, metrics = update(*args)
            after.append((jax.device_get(params), optimizer_counts(opt_state)))
            return params, opt_state, metrics

        return recorded

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "rollout", rollout)
        patch.setattr(train, "update_jit", update_jit)
        patch.setattr(train, "evaluate", scripted_evaluate([0.0], {}))
        result = run(exp, tokenizer=tokenizer, progress=False)
    return exp, before, after, result


def test_a_skipped_update_leaves_params_and_the_schedule_where_they_were(skipping_run):
    """The non-finite update logs skipped=1 (its loss as null), leaves the params as they were, and
    does not advance the optimizer's count; every logged lr is the rate optax's own schedule
    (written here independently) uses at the count the update starts from, so the update after the
    skipped one logs the rate of the count that did not advance."""
    exp, before, after, result = skipping_run
    logged = [m for m in lines(exp.run_dir) if "loss" in m]
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5]
    assert [m["skipped"] for m in logged] == [0, 0, 1, 0, 0]
    assert logged[SKIPPED]["loss"] is None and np.isfinite([m["loss"] for m in logged[SKIPPED + 1:]]).all()
    assert before == [{0}, {1}, {2}, {2}, {3}]
    assert [counts for _, counts in after] == [{1}, {2}, {2}, {3}, {4}]
    assert_same_params(after[SKIPPED][0], after[SKIPPED - 1][0])
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after[SKIPPED + 1][0]),
                                                       jax.tree.leaves(after[SKIPPED][0])))
    assert_same_params(result["params"], after[-1][0])

    lr, updates, warmup = 1e-3, 5, 2
    schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                     optax.linear_schedule(lr, 0.0, updates - warmup)], [warmup])
    expected = [float(schedule(count)) for (count,) in before]
    np.testing.assert_allclose([m["lr"] for m in logged], expected, rtol=1e-6, atol=0)
    # the hand-computed rates: warm-up 0, lr/2; then lr, lr again after the skip, 2/3 lr
    np.testing.assert_allclose(expected, [0.0, lr / 2, lr, lr, lr * 2 / 3], rtol=1e-6)


def test_model_hf_is_converted_into_the_run_once(evaluated_run, stand_ins, tmp_path, monkeypatch):  # noqa: F811
    """With model.hf set and no model.checkpoint, the first run converts the HF weights into
    <run_dir>/base_model (float32, as a direct convert_hf gives them) and trains from them; a
    rerun finds the conversion, converts nothing, and resumes: after two updates the params are
    those `evaluated_run` (the same run from a checkpoint converted beforehand) had after two."""
    checkpoint, tokenizer = stand_ins("llama")
    hf = os.path.join(os.path.dirname(checkpoint), "hf")  # the HF model stand_ins converted
    exp = load_experiment("gsm8k_llama", cli_overrides("", evaluated_run[0].data.source, tmp_path / "runs", updates=4)
                          + [f"model.hf={hf}"])
    conversions = []

    def counted(*args, **kwargs):
        conversions.append(args)
        return convert_hf(*args, **kwargs)

    monkeypatch.setattr(train, "convert_hf", counted)
    base = os.path.join(exp.run_dir, "base_model")
    assert run(exp, tokenizer=tokenizer, stop_after=1, progress=False)["step"] == 1
    assert conversions == [(hf, base)]
    converted_at = os.stat(os.path.join(base, CONFIG_FILE)).st_mtime_ns

    convert_hf(hf, tmp_path / "direct", param_dtype="float32")
    assert_same_params(load_model(base)[1], load_model(tmp_path / "direct")[1])
    assert load_model(base)[0].param_dtype == "float32"

    resumed = run(exp, tokenizer=tokenizer, stop_after=1, progress=False)
    assert resumed["step"] == 2
    assert len(conversions) == 1 and os.stat(os.path.join(base, CONFIG_FILE)).st_mtime_ns == converted_at
    assert [m["step"] for m in lines(exp.run_dir)] == [1, 2]
    assert_same_params(resumed["params"], evaluated_run[1][2])


# Run in a child process before tools/train.py: after the first update this process logs, wait
# until the test has sent its signal ($SIGNAL_SENT exists), so that the stop comes after that update
# whatever the machine's speed.
WAIT_FOR_THE_SIGNAL = """
import os, runpy, sys, time
import latro_jax.train as train
write, waited = train.RunLog.write, []
def write_then_wait(self, step, metrics):
    write(self, step, metrics)
    if "loss" in metrics and not waited:
        waited.append(step)
        open(os.environ["UPDATE_LOGGED"], "w").close()
        deadline = time.time() + 300
        while not os.path.exists(os.environ["SIGNAL_SENT"]) and time.time() < deadline:
            time.sleep(0.01)
train.RunLog.write = write_then_wait
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def interrupted(command, env, signum, markers):
    """Run `command` (tools/train.py ...), send `signum` once it has logged one update; its
    exit status and stderr."""
    logged, sent = markers / f"logged_{signum}", markers / f"sent_{signum}"
    process = subprocess.Popen([sys.executable, "-c", WAIT_FOR_THE_SIGNAL, *command], stderr=subprocess.PIPE,
                               text=True, env={**env, "UPDATE_LOGGED": str(logged), "SIGNAL_SENT": str(sent)})
    deadline = time.time() + 300
    while not logged.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signum)
    sent.touch()
    _, stderr = process.communicate(timeout=300)
    return process.returncode, stderr


def test_sigterm_and_ctrl_c_save_exit_130_and_the_same_command_resumes(evaluated_run, stand_ins,  # noqa: F811
                                                                        tmp_path):
    """`tools/train.py` on SIGTERM (a scheduler's preemption) and on a first Ctrl-C (SIGINT) lets
    the current update finish, saves it, and exits 130. Here a run is stopped by SIGTERM after
    update 1, its rerun by Ctrl-C after update 2, and the same command then runs updates 3 and 4:
    each update is logged once, and the params equal those of the uninterrupted run of the same
    four updates (`evaluated_run`: its evaluations and saves do not touch the training stream)
    bit for bit."""
    straight = evaluated_run[2]["params"]
    checkpoint, tokenizer = stand_ins("llama")
    tokenizer.save_pretrained(os.path.join(checkpoint, "hf"))  # the CLI loads the checkpoint's tokenizer
    command = [os.path.join(REPO, "tools", "train.py"), "gsm8k_llama",
               *cli_overrides(checkpoint, evaluated_run[0].data.source, tmp_path, updates=4)]
    env = {**os.environ,
           # this process's matmul precision (conftest), so that the params compare bit for bit
           "JAX_DEFAULT_MATMUL_PRECISION": jax.config.jax_default_matmul_precision or "",
           # the three processes compile the same programs: once
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    run_dir = os.path.join(tmp_path, "gsm8k_llama")

    for signum, step in [(signal.SIGTERM, 1), (signal.SIGINT, 2)]:
        status, stderr = interrupted(command, env, signum, tmp_path)
        assert status == 130, stderr[-2000:]
        assert f"stopped after update {step}; rerun the same command to resume" in stderr
        assert [m["step"] for m in lines(run_dir)] == list(range(1, step + 1))
        assert saved_steps(run_dir, "checkpoints")[-1] == step

    resumed = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [m["step"] for m in lines(run_dir) if "loss" in m] == [1, 2, 3, 4]
    assert saved_steps(run_dir, "checkpoints")[-1] == 4 and os.path.isfile(os.path.join(run_dir, "eval_4.json"))
    assert_same_params(load_run_step(os.path.join(run_dir, "checkpoints", "4")).params, straight)
