"""The training loop, in the order of the paper's Algorithm 1: set up, then for each update

    questions -> rollout (sample K rationales, score them, RLOO advantages) -> one optimizer step
              -> log, save, evaluate

(`train.method=sft`: the gold completions -> one optimizer step; the SFT baseline). The pieces
live in `rollout` (steps 1-3 of an update), `update` (the optimizer step) and `runs` (the run
directory: checkpoints, logs, what a rerun resumes).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from latro_jax.checkpoint import HF_DIR, load_model
from latro_jax.config import ModelConfig
from latro_jax.convert.hf import convert_hf
from latro_jax.data.batches import Batches
from latro_jax.data.prompts import PromptFormat, load_tokenizer, prompt_format
from latro_jax.data.tasks import Task
from latro_jax.evaluate import evaluate
from latro_jax.experiment import Experiment, ExperimentError, TrainSpec
from latro_jax.lora import LoraConfig, LoraRowsLoss, init_adapters, lora_config, merge_jit
from latro_jax.pretrain import pretrained_base
from latro_jax.rollout import rollout, rollout_samples
from latro_jax.runs import (
    Checkpoints, Interrupted, RunLog, asked_to_stop, base_checkpoint, start_run_dir, stop_requests,
)
from latro_jax.sampling import SamplingConfig
from latro_jax.sharding import global_max, is_primary, micro_batch_rows, opt_state_shardings, to_host
from latro_jax.startup import checked_start, removed_on_failure, require_checkpoint
from latro_jax.update import (
    applied_updates, commit, latro_rows_loss, make_optimizer, policy_param_dtype, reference_params, schedule,
    sft_rows_loss, update_jit,
)

# Random streams apart from the updates' fold_in(key, step), step < 2**31 - 2: the LoRA adapters'
# initialisation, and the evaluations' (then folded with the step evaluated).
ADAPTERS_STREAM, EVAL_STREAM = 2**31 - 2, 2**31 - 1


def starting_checkpoint(exp: Experiment, progress: bool = True) -> str:
    """The checkpoint a run of `exp` starts from (`runs.base_checkpoint`), made on first use:
    model.hf converted into the run directory, or the base pre-trained (`pretrain`)."""
    checkpoint = base_checkpoint(exp)
    if exp.pretrain.updates:
        pretrained_base(exp, run, progress)
    elif exp.model.hf and not os.path.isdir(checkpoint):
        if jax.process_count() > 1:
            raise ExperimentError(
                f"{checkpoint} does not exist yet and a multi-process run does not convert HF weights: "
                f"`make convert SRC={exp.model.hf} OUT={checkpoint}` once (one process), or set model.checkpoint"
            )
        convert_hf(exp.model.hf, checkpoint, param_dtype="float32")
    return require_checkpoint(checkpoint)


def load_policy(exp: Experiment, progress: bool = True, mesh=None) -> tuple[ModelConfig, Any, str]:
    """The starting weights (restored straight into their shards on `mesh`) in the dtype
    `update.policy_param_dtype` keeps them, and the directory holding the tokenizer files."""
    checkpoint = starting_checkpoint(exp, progress)
    config, params = load_model(checkpoint, mesh=mesh, dtype=exp.model.dtype,
                                param_dtype=policy_param_dtype(exp.model), remat=exp.model.remat,
                                attention=exp.model.attention)
    return config, params, exp.model.tokenizer or os.path.join(checkpoint, HF_DIR)


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every update of a run reads and none changes."""

    exp: Experiment
    mesh: jax.sharding.Mesh
    config: ModelConfig
    task: Task
    tokenizer: Any
    fmt: PromptFormat
    sampling: SamplingConfig
    optimizer: Any
    schedule: Any  # the optimizer's learning rate at its applied-update count, for the logs
    lora: LoraConfig | None
    base: Any  # LoRA: the frozen base params, which are also pi_0; else None
    ref_params: Any  # pi_0 (None for SFT)
    micro_rows: int
    batches: Batches
    eval_set: list

    def policy(self, params):
        """The full params the model runs with: the base with the adapters merged, under LoRA."""
        return merge_jit(self.lora, self.base, params) if self.lora else params


def set_up(exp: Experiment, mesh, data: tuple, tokenizer, progress: bool) -> tuple[Setup, dict]:
    """The run's model on `mesh`, its `data` (`checked_start`) and optimizer; and its starting state
    {"params", "opt_state"}: the full params, or a LoRA run's adapters (replicated: ~0.5% of the
    params, so that each device's update is local), and the optimizer state, in the shardings
    every update keeps."""
    t, sft = exp.train, exp.train.method == "sft"
    config, params, tokenizer_dir = load_policy(exp, progress, mesh)
    tokenizer = tokenizer or load_tokenizer(tokenizer_dir)
    task, train_set, eval_set = data
    fmt = prompt_format(tokenizer, task.stop_strings)
    sampling = SamplingConfig(
        max_new_tokens=exp.rollout.max_new_tokens, temperature=exp.rollout.temperature,
        num_samples=exp.rollout.num_samples, stop_token_ids=fmt.stop_token_ids,
        stop_sequences=fmt.stop_sequences, pad_token_id=fmt.pad_token_id,
    )
    optimizer = make_optimizer(exp.optim, t.updates)
    lora, base = lora_config(exp.model), None
    if lora:
        base = params
        init = functools.partial(init_adapters, config, lora)
        replicated = NamedSharding(mesh, PartitionSpec())
        params = jax.jit(init, out_shardings=replicated)(jax.random.fold_in(jax.random.key(t.seed), ADAPTERS_STREAM))
    ref_params = None if sft else base if lora else reference_params(config, params)
    params_shardings = jax.tree.map(lambda x: x.sharding, params)
    opt_shardings = opt_state_shardings(mesh, optimizer, jax.eval_shape(optimizer.init, params), params_shardings)
    params, opt_state = commit((params, jax.jit(optimizer.init, out_shardings=opt_shardings)(params)))
    rows = t.questions_per_update * (1 if sft else exp.rollout.num_samples)
    batches = Batches(exp, task, train_set, tokenizer, fmt, mesh, sampling)
    setup = Setup(exp, mesh, config, task, tokenizer, fmt, sampling, optimizer, schedule(exp.optim, t.updates), lora,
                  base, ref_params, micro_batch_rows(t.micro_batch, rows, mesh), batches, eval_set)
    return setup, {"params": params, "opt_state": opt_state}


def optimizer_step(setup: Setup, update_step, rows_loss, score_from: int, state: dict, rows: dict, started: float,
                   rollout_metrics: dict | None = None):
    """One optimizer step of `update` on `rows`: the new state and the metrics (`rollout_metrics`
    and the update's, read from the devices together), with the real tokens per second since
    `started` (the batch in hand: rollout and update)."""
    exp = setup.exp
    if setup.lora:
        rows_loss = LoraRowsLoss(rows_loss, setup.lora)
    update_started = time.perf_counter()
    params, opt_state, metrics = update_step(setup.config, exp.objective, setup.optimizer, setup.micro_rows,
                                             rows_loss, score_from, state["params"], state["opt_state"], rows,
                                             setup.base)
    jax.block_until_ready(metrics["loss"])
    now = time.perf_counter()
    metrics, tokens = to_host(({**(rollout_metrics or {}), **metrics}, jnp.sum(rows["attention_mask"])))
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics.update(time_update_s=now - update_started, tokens_per_s=int(tokens) / (now - started),
                   micro_batch_rows=setup.micro_rows)
    return {"params": params, "opt_state": opt_state}, metrics


def latro_step(setup: Setup, update_step, state: dict, step: int, key):
    """LaTRO's update `step`: K rationales per question sampled and scored, then one optimizer step
    on the surrogate loss. Returns the new state, the metrics and the rollout (for samples.txt)."""
    t = setup.exp.train
    questions = setup.batches(step)
    started = time.perf_counter()
    scored, out = rollout(setup.config, setup.exp.objective, setup.sampling, setup.policy(state["params"]),
                          setup.ref_params, questions, jax.random.fold_in(key, step), t.score_batch, t.rollout_batch)
    rows = dict(tokens=scored.tokens, attention_mask=scored.attention_mask, rationale_mask=scored.rationale_mask,
                answer_mask=scored.answer_mask, advantages=scored.advantages)
    state, metrics = optimizer_step(setup, update_step, latro_rows_loss, int(out.prompt_slots), state, rows,
                                    started, scored.metrics)
    return state, metrics, (scored, out)


def sft_step(setup: Setup, update_step, state: dict, step: int, key):
    """The SFT baseline's update `step`: one optimizer step on the gold completions."""
    rows = setup.batches(step)
    state, metrics = optimizer_step(setup, update_step, sft_rows_loss, 1, state, rows, time.perf_counter())
    return state, metrics, None


STEPS: dict[str, Callable] = {"latro": latro_step, "sft": sft_step}
# The progress bar's metrics; rationales shrinking to nothing (on a recall task, where reasoning
# does not raise the answer's likelihood) show there as they do.
POSTFIX = {"loss": "loss", "reward_mean": "reward_mean", "kl_mean": "kl_mean", "rationale_length_mean": "len",
           "empty_rationale_fraction": "empty"}


def eval_due(t: TrainSpec, step: int) -> bool:
    return step % t.eval_every == 0 or step == t.updates


def evaluation_pending(exp: Experiment, step: int) -> bool:
    """Whether update `step`, which the run resumes after, was due an evaluation that a stop (or a
    crash) cut short: eval_<step>.json is written last. A collective."""
    (pending,) = global_max([step > 0 and eval_due(exp.train, step) and is_primary()
                             and not os.path.isfile(os.path.join(exp.run_dir, f"eval_{step}.json"))])
    return bool(pending)


def evaluate_step(setup: Setup, state: dict, step: int, log: RunLog, checkpoints: Checkpoints, progress: bool) -> dict:
    """Evaluate update `step`'s params once their save is on disk (a kill during the evaluation,
    minutes at the paper's sizes, loses no update; a failed save stops the run before it): logs,
    best/, then eval_<step>.json, written last: its presence says that the evaluation of `step`
    is complete."""
    exp = setup.exp
    checkpoints.finish_saving()
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(exp.train.seed), EVAL_STREAM), step)
    result = evaluate(setup.config, setup.policy(state["params"]), setup.tokenizer, setup.fmt, setup.eval_set,
                      setup.task, exp.rollout.max_new_tokens, exp.train.maj_k, key,
                      progress=progress and is_primary())
    accuracies = {k: v for k, v in result.items() if k.endswith("accuracy")}
    log.write_evaluation(step, accuracies, [r["greedy_text"] for r in result["rows"][:4]])
    checkpoints.save_best(step, state, accuracies["greedy_accuracy"])
    if is_primary():
        with open(os.path.join(exp.run_dir, f"eval_{step}.json"), "w") as f:
            json.dump(result, f, indent=1)
    return accuracies


def run(exp: Experiment, tokenizer=None, stop_after: int | None = None, progress: bool = True) -> dict:
    """Train `exp` from scratch or from its latest checkpoint; return the last metrics.

    `stop_after` ends the run (saving) after that many updates of this call, as an interruption
    would: an evaluation due after that update is left to the resumed run, which does it first.
    The run is laid out on the mesh `exp.mesh` over every device of every process
    (`sharding.initialize_distributed` first joins a multi-host run's processes); every process
    runs this same function, process 0 writes the logs (`runs`).
    """
    t = exp.train
    mesh, tokenizer, data = checked_start(exp, tokenizer)
    with removed_on_failure(exp.run_dir):  # a failed first start leaves no directory behind
        start_run_dir(exp)
        setup, state = set_up(exp, mesh, data, tokenizer, progress)
    checkpoints = Checkpoints(exp)
    state, step = checkpoints.restore(state)  # pi_0 is the starting weights: checkpoints keep no copy
    redo_evaluation = evaluation_pending(exp, step)
    log = RunLog(exp.run_dir, exp, step, redo_evaluation)
    train_step, key = STEPS[t.method], jax.random.key(t.seed)
    update_step = update_jit(state["params"], state["opt_state"])  # outputs keep the shardings placed above
    applied = applied_updates(state["opt_state"])  # the schedule's step: it skips non-finite updates
    metrics, done_here, bar = {}, 0, tqdm(total=t.updates, initial=step, desc=exp.name, unit="update",
                                          disable=not (progress and is_primary()))
    with stop_requests() as stop, jax.set_mesh(setup.mesh):
        try:
            if redo_evaluation:
                metrics.update(evaluate_step(setup, state, step, log, checkpoints, progress))
                if asked_to_stop(stop):  # during it
                    raise Interrupted(f"stopped after evaluating update {step}; rerun the same command to resume")
            while step < t.updates:
                state, metrics, samples = train_step(setup, update_step, state, step, key)
                metrics["lr"] = float(setup.schedule(applied))
                applied += not metrics["skipped"]
                if metrics["skipped"] and is_primary():
                    tqdm.write(f"update {step}: non-finite loss or gradient; update skipped (params unchanged)")
                step, done_here = step + 1, done_here + 1
                log.write(step, metrics)
                if samples is not None and eval_due(t, step):  # LaTRO's rollout, logged with its update
                    log.write_samples(step, rollout_samples(setup.tokenizer, *samples, setup.sampling.num_samples))
                bar.update()
                bar.set_postfix({name: f"{metrics[k]:.3g}" for k, name in POSTFIX.items() if k in metrics})
                # Saved before an evaluation (minutes at the paper's sizes), so that a kill during it
                # loses no update; a stop requested by then skips the evaluation, which the resumed
                # run does first.
                if step % t.save_every == 0 or eval_due(t, step):
                    checkpoints.save(step, state)
                # Every process stops after the same update, whichever was signalled.
                if asked_to_stop(stop) or (stop_after is not None and done_here >= stop_after):
                    raise Interrupted(f"stopped after update {step}; rerun the same command to resume")
                if eval_due(t, step):
                    metrics.update(evaluate_step(setup, state, step, log, checkpoints, progress))
        except Interrupted:
            checkpoints.save(step, state)
            if stop["signal"] is not None:
                raise
        finally:
            bar.close()
            log.close()
            checkpoints.close()  # last: it raises SaveError if the last save failed
    return {"step": step, "params": setup.policy(state["params"]), **metrics}
