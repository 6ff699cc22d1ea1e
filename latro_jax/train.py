"""One LaTRO update with the fewest model passes, and the SFT baseline's update.

A LaTRO update (LATRO.md, "Cost, and where a faster design wins"):
  1. sample K rationales per question (one prefill per question, then the decode loop): the
     sampler also returns log pi_theta(z|x) of every sampled token (same params: on-policy);
  2. the answer reward R = log pi_theta(y|x+z) continues the sampler's KV cache by the answer
     tokens (a forward over ~answer-length tokens, not the whole sequence);
  3. one reference forward over prompt+rationale for log pi_0(z|x);
  4. one policy forward+backward over prompt+rationale+answer, in micro-batches whose gradients
     add up to the whole batch's, then one AdamW step on float32 master params.
The released code runs generate, three scoring forwards, then two forwards and a backward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import signal
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from latro_jax.checkpoint import CONFIG_FILE, HF_DIR, load_model, on_one_device, read_config
from latro_jax.config import ModelConfig
from latro_jax.convert.hf import convert_hf
from latro_jax.data.prompts import encode_answers, encode_prompts, encode_texts, load_tokenizer, prompt_format
from latro_jax.data.tasks import load_task
from latro_jax.evaluate import evaluate
from latro_jax.lora import LoraRowsLoss, abstract_adapters, init_adapters, lora_config, merge
from latro_jax.model import abstract_params
from latro_jax.experiment import Experiment, ExperimentError, OptimSpec, experiment_from_dict
from latro_jax.objective import ObjectiveConfig, rollout_advantages, surrogate_loss
from latro_jax.pretrain import pretrained_base, pretrained_path
from latro_jax.sampling import SampleOutput, SamplingConfig, bucket, pad_prompts, sample_tokens
from latro_jax.scoring import continuation_logprobs, masked_sum, token_logprobs
from latro_jax.sharding import (
    batch_shards, constrain, global_max, is_primary, make_mesh, opt_state_shardings, place_rows, process_rows,
    rows_from_processes, to_host,
)

ANSWER_BUCKETS = (16, 32, 64, 128, 256)
merge_jit = jax.jit(merge, static_argnums=0)
# SFT rows pad to a power of two or 1.5 times one: at most a third of a row is padding (not half),
# for about twice the programs of powers of two alone.
SFT_BUCKETS = tuple(sorted({b for p in range(4, 14) for b in (2**p, 3 * 2 ** (p - 1))}))


class Rollout(NamedTuple):
    """A scored batch of N = questions x K rows, ready for the gradient pass.

    tokens, attention_mask: [N, S] prompt (left-padded) + rationale + answer, contiguous, then
    right padding; rationale_mask, answer_mask: [N, S] the tokens of z and of y;
    advantages [N] (constants); rewards [N]: r, the KL-penalised self-reward; metrics: scalars.
    """

    tokens: jax.Array
    attention_mask: jax.Array
    rationale_mask: jax.Array
    answer_mask: jax.Array
    advantages: jax.Array
    rewards: jax.Array
    metrics: dict


def pack_sequences(prompt_tokens, prompt_mask, rationale, rationale_lengths, answer, answer_lengths, pad_id):
    """Lay out prompt [N, P] (left-padded) + rationale [N, L] (first `rationale_lengths` valid) +
    answer [N, A] (first `answer_lengths` valid) contiguously: -> tokens, attention_mask,
    rationale_mask, answer_mask, each [N, P + L + A]."""
    n, p = prompt_tokens.shape
    span = rationale.shape[1] + answer.shape[1]
    j = jnp.arange(span)[None]  # index after the prompt
    in_rationale = j < rationale_lengths[:, None]
    answer_index = j - rationale_lengths[:, None]
    in_answer = (answer_index >= 0) & (answer_index < answer_lengths[:, None])
    rationale_part = jnp.take_along_axis(rationale, jnp.clip(j, 0, rationale.shape[1] - 1).repeat(n, 0), axis=1)
    answer_part = jnp.take_along_axis(answer, jnp.clip(answer_index, 0, answer.shape[1] - 1), axis=1)
    tail = jnp.where(in_rationale, rationale_part, jnp.where(in_answer, answer_part, pad_id))
    no = jnp.zeros((n, p), bool)
    return (
        jnp.concatenate([prompt_tokens, tail], axis=1),
        jnp.concatenate([prompt_mask, in_rationale | in_answer], axis=1),
        jnp.concatenate([no, in_rationale], axis=1),
        jnp.concatenate([no, in_answer], axis=1),
    )


def micro_batches(rows, micro_batch: int):
    """Rows [N, ...] -> [N // micro_batch, micro_batch, ...], micro-batch j holding rows j, j + M,
    j + 2M, ... (M = N // micro_batch). Strided, not consecutive: with rows split over devices
    (blocks of consecutive rows), every micro-batch takes its share from each device, so each scan
    step keeps all devices busy instead of one."""
    def split(x):
        x = x.reshape(micro_batch, x.shape[0] // micro_batch, *x.shape[1:]).swapaxes(0, 1)
        return constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(split, rows)


def micro_batch_rows(micro_batch: int, rows: int, mesh: jax.sharding.Mesh) -> int:
    """Rows per forward+backward of an update of `rows` rows. `train.micro_batch` is at most that
    many rows on each batch shard (a group of devices holding the same rows: mesh data x fsdp), as
    the paper's "micro-batches of 4" are per GPU, so that every device works on rows of its own:
    the shards times the largest count <= micro_batch that divides each shard's rows. Where the
    rows do not split evenly over the shards (a row is then computed on several devices; plan.py
    says so), the largest divisor of the rows <= micro_batch x shards."""
    shards = batch_shards(mesh)

    def largest_divisor(n: int, at_most: int) -> int:
        return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)

    if rows % shards == 0:
        return shards * largest_divisor(rows // shards, micro_batch)
    return largest_divisor(rows, micro_batch * shards)


def unmicro_batches(values):
    """The inverse of `micro_batches`: [M, micro_batch, ...] -> [N, ...] in the original row order."""
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:]), values)


class Questions(NamedTuple):
    """Q questions padded for a rollout: prompt_tokens, prompt_mask [Q, P] (left-padded),
    answers [Q, A] (right-padded) with answer_lengths [Q]."""

    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    answers: jax.Array
    answer_lengths: jax.Array


def question_slots(prompts: list[list[int]], answers: list[list[int]], sampling: SamplingConfig) -> tuple[int, int]:
    """The padded widths (prompt, answer) of a batch of questions: buckets of the longest over
    every process's share (a collective in a multi-process run)."""
    prompt_len, answer_len = global_max([max(map(len, prompts)), max(map(len, answers))])
    return bucket(prompt_len, sampling.prompt_buckets), bucket(answer_len, ANSWER_BUCKETS)


def pad_questions(prompts: list[list[int]], answers: list[list[int]], slots: tuple[int, int], pad_id: int) -> Questions:
    """Token lists -> numpy Questions of widths `slots` (from `question_slots`)."""
    prompt_tokens, prompt_mask = pad_prompts(prompts, slots[0], pad_id)
    answer_tokens = np.full((len(answers), slots[1]), pad_id, np.int32)
    for i, a in enumerate(answers):
        answer_tokens[i, : len(a)] = a
    return Questions(prompt_tokens, prompt_mask, answer_tokens, np.array([len(a) for a in answers], np.int32))


def questions(prompts: list[list[int]], answers: list[list[int]], sampling: SamplingConfig, mesh=None) -> Questions:
    """Questions from token lists held whole by every process, rows split over `mesh` if given."""
    return place_rows(mesh, pad_questions(prompts, answers, question_slots(prompts, answers, sampling),
                                          sampling.pad_token_id))


class RowScores(NamedTuple):
    """What the advantages of sampled rows are computed from, all [N]: log pi(z|x) (the sampler's),
    log pi_0(z|x), R = log pi(y|x+z), the log-prob of the last context token (for
    `reference_compat`), whether the row stopped, and the rationale's length."""

    policy: jax.Array
    reference: jax.Array
    answer: jax.Array
    last_context: jax.Array
    finished: jax.Array
    lengths: jax.Array


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("score_batch",))
def score_rows(
    config: ModelConfig,
    params: nnx.State,
    ref_params: nnx.State,
    out: SampleOutput,
    questions: Questions,
    score_batch: int = 0,
) -> tuple[tuple[jax.Array, ...], RowScores]:
    """Steps 2-3 of the update for sampled rows: (tokens, attention_mask, rationale_mask,
    answer_mask) of the packed rows, and their RowScores. `out`: the N = Q x K rows sampled
    for the Q `questions` (K consecutive rows per question).
    `score_batch` (static): rows per reference forward (`micro_batches`, one after another, so
    that one forward's activations and attention scores are alive at a time); 0 = all N at once."""
    pad_id = 0
    k = out.tokens.shape[0] // questions.prompt_tokens.shape[0]
    prompt_tokens, prompt_mask, answers, answer_lengths = (
        constrain(jnp.repeat(x, k, axis=0), ("batch",) + (None,) * (x.ndim - 1)) for x in questions
    )
    packed = pack_sequences(prompt_tokens, prompt_mask, out.tokens, out.lengths, answers, answer_lengths, pad_id)
    tokens, attention_mask, rationale_mask, _ = packed
    n, p = prompt_tokens.shape
    a = answers.shape[1]
    # Continue the cache from the last two context tokens: the first re-fed token's hidden state
    # scores the last context token (the released code's extra token), the second scores y_1.
    last = p + out.lengths - 1  # slot of the last context token (the last prompt slot if z is empty)
    ctx = jnp.stack([last - 1, last], axis=1)
    ctx_tokens = jnp.take_along_axis(tokens, ctx, axis=1)
    ctx_mask = jnp.take_along_axis(attention_mask, ctx, axis=1)
    last_position = out.prompt_lengths + out.lengths - 1
    cont_tokens = jnp.concatenate([ctx_tokens, answers], axis=1)  # [N, 2 + A]
    cont_mask = jnp.concatenate([ctx_mask, jnp.arange(a)[None] < answer_lengths[:, None]], axis=1)
    cont_positions = last_position[:, None] - 1 + jnp.arange(a + 2)[None]
    cont_logprobs, _ = continuation_logprobs(config, params, out.cache, cont_tokens, cont_positions, cont_mask)

    context = p + out.tokens.shape[1]

    def reference_sums(rows):
        logprobs = token_logprobs(config, ref_params, rows[0], rows[1], score_from=p)
        return masked_sum(logprobs, rows[2])

    ref_rows = (tokens[:, :context], attention_mask[:, :context], rationale_mask[:, :context])
    if 0 < score_batch < n and n % score_batch == 0:
        ref_sums = unmicro_batches(jax.lax.map(reference_sums, micro_batches(ref_rows, score_batch)))
    else:
        ref_sums = reference_sums(ref_rows)
    scores = RowScores(
        policy=jnp.sum(out.logprobs, axis=1), reference=ref_sums,
        answer=masked_sum(cont_logprobs[:, 1:], cont_mask[:, 2:]), last_context=cont_logprobs[:, 0],
        finished=out.finished, lengths=out.lengths,
    )
    return packed, scores


@functools.partial(jax.jit, static_argnums=(0, 1))
def advantages_of(objective: ObjectiveConfig, k: int, packed: tuple[jax.Array, ...], scores: RowScores) -> Rollout:
    """The rollout of packed rows and their scores: advantages over all of them at once (the
    non-stop penalty's mean spans the batch; RLOO groups are K consecutive rows)."""
    advantages, rewards, metrics = rollout_advantages(
        objective, k, scores.policy, scores.reference, scores.answer, scores.finished, scores.last_context
    )
    metrics["rationale_length_mean"] = jnp.mean(scores.lengths.astype(jnp.float32))
    metrics["rationale_length_max"] = jnp.max(scores.lengths)
    return Rollout(*packed, advantages, rewards, metrics)


def make_optimizer(spec: OptimSpec, updates: int) -> optax.GradientTransformation:
    """AdamW with linear decay to 0 after an optional linear warm-up; optional global-norm clipping."""
    decay = optax.linear_schedule(spec.learning_rate, 0.0, updates - spec.warmup_steps)
    schedule = decay
    if spec.warmup_steps:
        warmup = optax.linear_schedule(0.0, spec.learning_rate, spec.warmup_steps)
        schedule = optax.join_schedules([warmup, decay], [spec.warmup_steps])
    adamw = optax.adamw(schedule, b1=spec.b1, b2=spec.b2, eps=spec.eps, weight_decay=spec.weight_decay)
    if spec.clip_norm:
        return optax.chain(optax.clip_by_global_norm(spec.clip_norm), adamw)
    return adamw


def applied_updates(opt_state) -> int:
    """How many updates the optimizer has applied (a skipped, non-finite one is not counted): the
    step its learning-rate schedule is at."""
    counts = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]
              if isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "count"]
    return int(to_host(counts[0]))


def learning_rate(spec: OptimSpec, updates: int, step: int) -> float:
    if step < spec.warmup_steps:
        return spec.learning_rate * step / spec.warmup_steps
    return spec.learning_rate * max(0.0, 1 - (step - spec.warmup_steps) / (updates - spec.warmup_steps))


def latro_rows_loss(config, objective, num_rows, score_from, params, rows):
    """The surrogate loss of some rows of a Rollout (a micro-batch); the prompt fills the slots
    before `score_from`."""
    logprobs = token_logprobs(config, params, rows["tokens"], rows["attention_mask"], score_from=score_from)
    return surrogate_loss(
        objective, rows["advantages"], logprobs, rows["rationale_mask"], logprobs, rows["answer_mask"], num_rows
    )


def sft_rows_loss(config, objective, num_rows, score_from, params, rows):
    """Cross-entropy on the completion (gold rationale + answer) only, summed per row, / num_rows."""
    logprobs = token_logprobs(config, params, rows["tokens"], rows["attention_mask"], score_from=score_from)
    nll = -jnp.sum(masked_sum(logprobs, rows["completion_mask"])) / num_rows
    tokens = jnp.sum(rows["completion_mask"])
    return nll, {"sft_loss": jax.lax.stop_gradient(nll), "completion_tokens": tokens}


def update(config, objective, optimizer, micro_batch, rows_loss, score_from, params, opt_state, rows, frozen=None):
    """One optimizer step on `rows`: `_update` (its arguments, types and result) jitted with
    explicit out_shardings. The new params and optimizer state come back in exactly the shardings
    `params` and `opt_state` came in (and are donated from), so each update runs in place in the
    layout the run placed, and the next update reuses the compiled program (as does, in the same
    process, a checkpoint of another mesh restored into those shardings). The jitted function of
    a layout, to call or `.lower`: `update_jit(params, opt_state)`."""
    return update_jit(params, opt_state)(config, objective, optimizer, micro_batch, rows_loss, score_from, params,
                                         opt_state, rows, frozen)


def update_jit(params, opt_state):
    """The jitted `_update` whose outputs keep the shardings of `params` and `opt_state` (arrays
    or `jax.ShapeDtypeStruct`s with shardings, for `.lower`); metrics are left to XLA."""
    leaves, treedef = jax.tree.flatten(jax.tree.map(lambda x: x.sharding, (params, opt_state)))
    return _update_jit(treedef, tuple(leaves))


# jax.jit has no "outputs in the inputs' shardings" option: one jit per layout of params and
# optimizer state, cached so that its compiled programs are reused (a run has one layout; 32
# covers the tests' meshes and runs in one process).
@functools.lru_cache(maxsize=32)
def _update_jit(treedef, leaves: tuple):
    params_shardings, opt_shardings = jax.tree.unflatten(treedef, leaves)
    return jax.jit(_update, static_argnums=(0, 1, 2, 3, 4, 5), donate_argnums=(6, 7),
                   out_shardings=(params_shardings, opt_shardings, None))


def _update(
    config: ModelConfig,
    objective: ObjectiveConfig,
    optimizer: optax.GradientTransformation,
    micro_batch: int,
    rows_loss,
    score_from: int,
    params: nnx.State,
    opt_state,
    rows: dict,
    frozen=None,
):
    """Gradient of the whole batch's loss, accumulated over micro-batches of `micro_batch` rows
    (a `lax.scan`), then one optimizer step. A non-finite loss or gradient skips the step:
    params and optimizer state come back unchanged and metrics["skipped"] is 1.

    rows: dict of [N, ...] arrays; rows_loss(config, objective, N, score_from, params, micro_rows)
    -> (loss, terms); `score_from`: the first slot whose token is scored (after the prompt).
    `frozen`: a pytree the loss reads but does not train (LoRA's base weights, with params the
    adapters: `lora.LoraRowsLoss`), passed as rows_loss's `frozen` keyword when not None.
    """
    n = jax.tree.leaves(rows)[0].shape[0]
    micro = micro_batches(rows, micro_batch)
    loss_fn = functools.partial(rows_loss, config, objective, n, score_from)
    if frozen is not None:
        loss_fn = functools.partial(loss_fn, frozen=frozen)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(carry, micro_rows):
        grads, loss = carry
        (micro_loss, terms), micro_grads = grad_fn(params, micro_rows)
        return (jax.tree.map(jnp.add, grads, micro_grads), loss + micro_loss), terms

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, loss), terms = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32)), micro)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def step(state):
        params, opt_state = state
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt_state

    # A branch, not a select between the new and old states: a select keeps both alive, about 1.5x
    # the params' bytes more at the peak (XLA's memory analysis); the branch updates in place.
    new_params, new_opt_state = jax.lax.cond(finite, step, lambda state: state, (params, opt_state))
    metrics = {name: jnp.sum(value) for name, value in terms.items()}
    metrics.update(loss=loss, grad_norm=grad_norm, skipped=(~finite).astype(jnp.int32))
    return new_params, new_opt_state, metrics


def rollout(
    config: ModelConfig,
    objective: ObjectiveConfig,
    sampling: SamplingConfig,
    params: nnx.State,
    ref_params: nnx.State,
    questions: Questions,
    rng: jax.Array,
    score_batch: int = 0,
    rollout_batch: int = 0,
) -> tuple[Rollout, SampleOutput]:
    """Sample K rationales per question and score them (steps 1-3). `questions`: padded (see
    `questions()`); `score_batch`: rows per reference forward (`score_rows`); `rollout_batch`:
    questions sampled and scored at a time (0 = all), so that one chunk's KV cache is alive at a
    time; the advantages are computed over all chunks together. The returned SampleOutput has
    no cache."""
    k = sampling.num_samples
    num_questions = questions.prompt_tokens.shape[0]
    sampling = dataclasses.replace(sampling, cache_room=questions.answers.shape[1] + 2)
    chunk = rollout_batch if 0 < rollout_batch < num_questions else num_questions
    timings = {"time_sample_s": 0.0, "time_score_s": 0.0}
    parts, outs = [], []
    for start in range(0, num_questions, chunk):
        part = questions if chunk == num_questions else jax.tree.map(lambda x: x[start:start + chunk], questions)
        began = time.perf_counter()
        chunk_rng = rng if chunk == num_questions else jax.random.fold_in(rng, start)
        out = jax.block_until_ready(sample_tokens(config, params, part.prompt_tokens, part.prompt_mask, chunk_rng,
                                                  sampling))
        sampled = time.perf_counter()
        parts.append(jax.block_until_ready(score_rows(config, params, ref_params, out, part, score_batch=score_batch)))
        outs.append(out._replace(cache=None))  # the chunk's KV cache is freed here
        timings["time_sample_s"] += sampled - began
        timings["time_score_s"] += time.perf_counter() - sampled
    concat = functools.partial(jax.tree.map, lambda *x: x[0] if len(x) == 1 else jnp.concatenate(x))
    scored = advantages_of(objective, k, *concat(*parts))
    out = outs[0] if len(outs) == 1 else outs[0]._replace(
        **{f: concat(*(getattr(o, f) for o in outs)) for f in ("tokens", "lengths", "finished", "logprobs",
                                                               "prompt_lengths")},
        steps=max(o.steps for o in outs),
    )
    return scored._replace(metrics={**scored.metrics, **timings}), out


# ---- the training run ------------------------------------------------------------------------


class Interrupted(Exception):
    """Raised after SIGTERM/Ctrl-C once the current update is finished and saved."""


@contextlib.contextmanager
def stop_requests():
    """SIGTERM and a first Ctrl-C ask the loop to stop after the current update (whose params
    were donated, so it must finish to be saved); a second Ctrl-C aborts at once, unsaved.
    Yields a dict whose "signal" is set when a stop was asked for."""
    stop = {"signal": None}

    def request(signum, _frame):
        stop["signal"] = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        tqdm.write("stopping after this update and saving; Ctrl-C again aborts without saving")

    previous = {s: signal.signal(s, request) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def commit(tree):
    """Each array committed to the device(s) it is on, as `update`'s outputs are: otherwise the
    second update sees different input shardings and compiles again."""
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding), tree)


def reference_dtype(config: ModelConfig, dtype) -> jnp.dtype:
    """The dtype pi_0 keeps a param of `dtype` in (`reference_params`): floating ones in the compute dtype."""
    return jnp.dtype(config.dtype) if jnp.issubdtype(dtype, jnp.floating) else jnp.dtype(dtype)


def reference_params(config: ModelConfig, params: nnx.State) -> nnx.State:
    """pi_0 of full fine-tuning: a copy of the starting params in the compute dtype, in their
    shardings. The model casts each weight to the compute dtype where it uses it, so a forward over
    this copy equals one over the float32 params bit for bit, in half the bytes under bfloat16
    (16 GB less for an 8B model). A copy, never the params' own buffers, which updates donate."""

    def copy(x):
        dtype = reference_dtype(config, x.dtype)
        return x.astype(dtype) if x.dtype != dtype else jnp.copy(x)

    return jax.tree.map(copy, params)


def load_policy(exp: Experiment, progress: bool = True, mesh=None) -> tuple[ModelConfig, nnx.State, str]:
    """The starting weights (restored straight into their shards on `mesh`) and the directory
    holding the tokenizer files. The compute dtype is the experiment's; params are float32 master
    weights, except a LoRA run's frozen base, which is stored in the compute dtype (only the
    adapters train)."""
    spec = exp.model
    checkpoint = base_checkpoint(exp, progress)
    config, params = load_model(checkpoint, mesh=mesh, dtype=spec.dtype,
                                param_dtype=spec.dtype if spec.lora_rank else "float32", remat=spec.remat)
    return config, params, spec.tokenizer or os.path.join(checkpoint, HF_DIR)


def base_checkpoint(exp: Experiment, progress: bool = True, create: bool = True) -> str:
    """The model checkpoint directory a run of `exp` starts from: model.checkpoint, the
    conversion of model.hf in the run directory, or the pre-trained base. With `create`, made on
    first use (HF weights converted, the base pre-trained); without, an error if it is missing."""
    spec = exp.model
    checkpoint = spec.checkpoint
    if exp.pretrain.updates:
        checkpoint = pretrained_base(exp, progress) if create else pretrained_path(exp)
    elif spec.hf:
        checkpoint = os.path.join(exp.run_dir, "base_model")
        if not os.path.isdir(checkpoint) and create:
            if jax.process_count() > 1:
                raise ExperimentError(
                    f"{checkpoint} does not exist yet and a multi-process run does not convert HF weights: "
                    f"`make convert SRC={spec.hf} OUT={checkpoint}` once (one process), or set model.checkpoint"
                )
            convert_hf(spec.hf, checkpoint, param_dtype="float32")
    if not os.path.isfile(os.path.join(checkpoint, CONFIG_FILE)):
        if not create:
            raise ExperimentError(f"{checkpoint} (the model the run started from) is not a latro-jax checkpoint "
                                  "any more: its weights are needed to read the run's checkpoints")
        raise ExperimentError(
            f"model.checkpoint={checkpoint!r} is not a latro-jax checkpoint. Convert the HF weights first "
            f"(`make convert SRC=<HF dir or hub id> OUT={checkpoint}`), or set model.hf=<HF dir or hub id> "
            "to convert on first use"
        )
    return checkpoint


def is_run_step(path: str | os.PathLike) -> bool:
    """Whether `path` is a checkpoint step of a training run (runs/<exp>/{best,checkpoints}/<step>)."""
    return os.path.isdir(os.path.join(os.fspath(path), "state"))


class RunStep(NamedTuple):
    """The model of a training run's checkpoint step (`load_run_step`)."""

    config: ModelConfig  # compute dtype as asked; param_dtype the params'
    params: nnx.State  # float32 master weights; a LoRA run's: the adapters merged into its base (compute dtype)
    tokenizer: str  # tokenizer directory or hub id
    hf_files: str  # the base model's HF side files (config.json, tokenizer, generation config)


def load_run_step(path: str | os.PathLike, dtype: str | None = None, device=None) -> RunStep:
    """The model a training run saved at one checkpoint step (runs/<exp>/best/<step> or
    runs/<exp>/checkpoints/<step>), read onto `device` (default: this process's first device)
    whatever mesh saved it, in `dtype` (default: the run's compute dtype). A LoRA run's adapters
    are merged into the base as the run sampled with them. Only the params are read, not the
    optimizer state (twice their size). The run directory may have moved: its config.json and
    the base model it started from are found beside the step."""
    path = os.path.abspath(os.path.normpath(os.fspath(path)))
    run_dir = os.path.dirname(os.path.dirname(path))
    if not is_run_step(path):
        raise ExperimentError(f"{path} is not a checkpoint step of a training run (no state/ in it); expected "
                              "runs/<experiment>/best/<step> or runs/<experiment>/checkpoints/<step>")
    config_path = os.path.join(run_dir, "config.json")
    try:
        with open(config_path) as f:
            exp = experiment_from_dict(json.load(f))
    except (OSError, ValueError) as e:
        raise ExperimentError(f"{config_path}: the run's experiment could not be read ({e})") from None
    exp = dataclasses.replace(exp, name=os.path.basename(run_dir),
                              train=dataclasses.replace(exp.train, output_dir=os.path.dirname(run_dir)))
    base = base_checkpoint(exp, create=False)
    lora = lora_config(exp.model)
    stored = read_config(base)
    # as the run held them: a LoRA run's frozen base in the compute dtype, full fine-tuning's float32
    param_dtype = exp.model.dtype if lora else "float32"
    if lora:  # the run saved its adapters
        _, base_params = load_model(base, device=device, dtype=exp.model.dtype, param_dtype=param_dtype)
        target = abstract_adapters(stored, lora)
    else:
        target = abstract_params(stored.replace(param_dtype=param_dtype))
    target = {"params": on_one_device(target, device)}
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(os.path.join(path, "state"), args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    params = restored["params"]
    if lora:
        params = jax.jit(merge, static_argnums=0)(lora, base_params, params)
    config = stored.replace(dtype=dtype or exp.model.dtype, param_dtype=param_dtype)
    return RunStep(config, params, exp.model.tokenizer or os.path.join(base, HF_DIR), os.path.join(base, HF_DIR))


def batch_indices(num_examples: int, batch: int, step: int, seed: int) -> np.ndarray:
    """The examples of update `step`: consecutive slices of a stream of per-epoch permutations,
    a pure function of (step, seed) so that a resumed run continues exactly."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), num_examples)
        order = _epoch_order(num_examples, seed, epoch)
        out.extend(order[offset : offset + batch - len(out)].tolist())
    return np.asarray(out)


@functools.lru_cache(maxsize=2)  # the epoch being drawn (and the next): ~2 ms an update for 50,000 examples
def _epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    order = np.random.default_rng((seed, epoch)).permutation(num_examples)
    order.flags.writeable = False
    return order


def _keep_lines(path: str, keep) -> None:
    """Rewrite the text file `path` (if any) with the lines `keep` accepts, atomically."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if keep(line)]
    if len(kept) < len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


def _metrics_up_to(step: int):
    """A `_keep_lines` filter of metrics.jsonl: the records of updates up to `step`; a line cut
    short (a kill while writing) or otherwise unreadable is dropped."""

    def keep(line: str) -> bool:
        try:
            record = json.loads(line)
            return int(record["step"]) <= step
        except (ValueError, KeyError, TypeError):
            return False

    return keep


def _samples_up_to(step: int):
    """A `_keep_lines` filter of samples.txt: the sections of updates up to `step`."""
    current = [0]

    def keep(line: str) -> bool:
        header = re.fullmatch(r"==== update (\d+)\n?", line)
        if header:
            current[0] = int(header.group(1))
        return current[0] <= step

    return keep


class RunLog:
    """metrics.jsonl, TensorBoard events, Weights & Biases (if `wandb_project` is set), and
    sampled rationales as text."""

    def __init__(self, run_dir: str, exp: Experiment, step: int = 0):
        """`step`: the update the run resumes after. What an earlier attempt logged after it (updates
        that its checkpoint did not keep, which this run redoes) is dropped from metrics.jsonl,
        samples.txt and TensorBoard, so each update is logged once."""
        from tensorboardX import SummaryWriter

        if exp.train.wandb_project:  # checked on every process: one failing alone would leave the others waiting
            try:
                import wandb
            except ImportError:
                raise ExperimentError("train.wandb_project is set but wandb is not installed: pip install wandb")
        self.enabled = is_primary()  # one process of a multi-host run writes
        if not self.enabled:
            return
        metrics_path, samples_path = os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "samples.txt")
        _keep_lines(metrics_path, _metrics_up_to(step))
        _keep_lines(samples_path, _samples_up_to(step))
        self.metrics = open(metrics_path, "a")
        self.samples = open(samples_path, "a")
        self.tensorboard = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=step + 1)
        self.wandb = None
        if exp.train.wandb_project:
            self.wandb = wandb.init(project=exp.train.wandb_project, name=exp.name, config=dataclasses.asdict(exp),
                                    resume="allow", id=exp.name)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps({"step": step, **metrics}) + "\n")
        self.metrics.flush()
        for name, value in metrics.items():
            self.tensorboard.add_scalar(name, value, step)
        self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def write_samples(self, step: int, texts: list[str]) -> None:
        if not self.enabled:
            return
        self.samples.write(f"==== update {step}\n" + "\n----\n".join(texts) + "\n")
        self.samples.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.metrics.close()
        self.samples.close()
        self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def rollout_samples(tokenizer, scored: Rollout, out: SampleOutput, k: int, questions: int = 2) -> list[str]:
    """The K rationales of the first questions of a rollout, decoded, with their rewards (a
    collective in a multi-process run)."""
    tokens, lengths, finished, rewards, advantages = to_host(
        (out.tokens, out.lengths, out.finished, scored.rewards, scored.advantages)
    )
    texts = []
    for i in range(min(questions * k, len(tokens))):
        text = tokenizer.decode(tokens[i, : lengths[i]], skip_special_tokens=False)
        texts.append(f"[question {i // k}, sample {i % k}] r={rewards[i]:.3f} A={advantages[i]:+.3f} "
                     f"finished={bool(finished[i])}\n{text}")
    return texts


def _checkpoint_args(state: dict, meta: dict):
    return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))


def sft_rows(prompts: list[list[int]], completions: list[list[int]], pad_id: int, slots: int) -> dict:
    """Prompt + completion, left-aligned and right-padded to `slots`; the loss is on the completion."""
    n = len(prompts)
    tokens = np.full((n, slots), pad_id, np.int32)
    completion_mask = np.zeros((n, slots), bool)
    attention_mask = np.zeros((n, slots), bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        tokens[i, : len(p) + len(c)] = p + c
        attention_mask[i, : len(p) + len(c)] = True
        completion_mask[i, len(p) : len(p) + len(c)] = True
    return {"tokens": tokens, "attention_mask": attention_mask, "completion_mask": completion_mask}


# How a run's saved params are read: a rerun that resumes from them must not change these.
WEIGHT_SETTINGS = ("lora_rank", "lora_alpha")


def check_resumable(run_dir: str, exp: Experiment) -> None:
    """A rerun in a run directory that holds checkpoints resumes from them: the settings that say
    how their params are read (model.lora_rank and model.lora_alpha: a changed alpha would scale
    the restored adapters differently, silently) must be the run's (its config.json). Others may
    change (train.updates, to train on; model.checkpoint, a moved copy of the base); config.json
    then records the new ones."""
    config_path = os.path.join(run_dir, "config.json")
    checkpoints = os.path.join(run_dir, "checkpoints")
    if not (os.path.isfile(config_path) and os.path.isdir(checkpoints) and os.listdir(checkpoints)):
        return
    with open(config_path) as f:
        saved = json.load(f)
    model = dataclasses.asdict(exp.model)
    changed = [f"model.{field}: {saved['model'][field]!r} in the run, now {model[field]!r}"
               for field in WEIGHT_SETTINGS if field in saved.get("model", {}) and saved["model"][field] != model[field]]
    if changed:
        raise ExperimentError(f"{run_dir} holds checkpoints of a run with other weights ({'; '.join(changed)}): "
                              "rerun with the run's settings to resume it, or start another run (train.output_dir "
                              "or the experiment's name)")


def run(exp: Experiment, tokenizer=None, stop_after: int | None = None, progress: bool = True) -> dict:
    """Train `exp` from scratch or from its latest checkpoint; return the last metrics.

    `stop_after` ends the run (saving) after that many updates of this call, as an interruption
    would: an evaluation due after that update is left to the resumed run, which does it first.
    The run directory holds config.json, checkpoints/ (last N), best/ (by validation greedy
    accuracy), metrics.jsonl, tensorboard/, samples.txt and eval_<step>.json.

    The run is laid out on the mesh `exp.mesh` over every device of every process
    (`sharding.initialize_distributed` first joins a multi-host run's processes): params and
    optimizer state are restored or created in their shards, and each process tokenizes only
    the questions of each update that its devices hold. Every process runs this same function;
    process 0 writes the logs, and all of them write their shards of the checkpoints, which
    restore onto any other mesh.
    """
    run_dir = exp.run_dir
    os.makedirs(run_dir, exist_ok=True)
    check_resumable(run_dir, exp)
    primary = is_primary()
    if primary:  # atomically: the other processes of a multi-host run read it (check_resumable)
        with open(os.path.join(run_dir, "config.json.tmp"), "w") as f:
            json.dump(dataclasses.asdict(exp), f, indent=1)
        os.replace(os.path.join(run_dir, "config.json.tmp"), os.path.join(run_dir, "config.json"))
    try:
        mesh = make_mesh(exp.mesh)
    except ValueError as e:
        raise ExperimentError(f"mesh: {e} (mesh.data, mesh.fsdp, mesh.tensor)") from None
    t, sft = exp.train, exp.train.method == "sft"
    micro_rows = micro_batch_rows(t.micro_batch, t.questions_per_update * (1 if sft else exp.rollout.num_samples), mesh)
    config, params, tokenizer_dir = load_policy(exp, progress, mesh)
    tokenizer = tokenizer or load_tokenizer(tokenizer_dir)
    fmt = prompt_format(tokenizer)
    source = exp.data.source or None
    train_set = load_task(exp.data.task, exp.data.train_split, source)
    eval_set = load_task(exp.data.task, exp.data.eval_split, source)
    eval_set = eval_set[: exp.data.eval_size or None]

    tokenized: dict[int, tuple[list[int], list[int]]] = {}

    def encoded(indices: list[int]) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, target ids) of training examples, tokenized in one batch when first drawn."""
        new = [i for i in dict.fromkeys(indices) if i not in tokenized]
        if new:
            examples = [train_set[i] for i in new]
            prompts = encode_prompts(tokenizer, fmt, [e.question for e in examples])
            # SFT's target is the gold rationale where the task has one; otherwise the answer.
            gold = [sft and exp.data.sft_target != "answer" and e.rationale is not None for e in examples]
            answers = iter(encode_answers(tokenizer, fmt, [e.answer for e, g in zip(examples, gold) if not g]))
            rationales = iter(encode_texts(tokenizer, [e.rationale + fmt.end_token
                                                       for e, g in zip(examples, gold) if g]))
            targets = [next(rationales) if g else next(answers) for g in gold]
            tokenized.update(zip(new, zip(prompts, targets)))
        return [tokenized[i] for i in indices]

    optimizer = make_optimizer(exp.optim, t.updates)
    lora = lora_config(exp.model)
    replicated = NamedSharding(mesh, PartitionSpec())
    if lora:  # `params` are the trained adapters; the frozen base is also pi_0, so no copy is kept
        base = params
        init = functools.partial(init_adapters, config, lora)
        params = jax.jit(init, out_shardings=replicated)(jax.random.fold_in(jax.random.key(t.seed), 2**31 - 2))
        ref_params = None if sft else base
    else:
        base = None
        ref_params = None if sft else reference_params(config, params)
    params_shardings = jax.tree.map(lambda x: x.sharding, params)
    opt_shardings = opt_state_shardings(mesh, optimizer, jax.eval_shape(optimizer.init, params), params_shardings)
    params, opt_state = commit((params, jax.jit(optimizer.init, out_shardings=opt_shardings)(params)))

    def policy(trained):
        """The full params the model runs with: the base with the adapters merged, under LoRA."""
        return merge_jit(lora, base, trained) if lora else trained
    sampling = SamplingConfig(
        max_new_tokens=exp.rollout.max_new_tokens, temperature=exp.rollout.temperature,
        num_samples=exp.rollout.num_samples, stop_token_ids=fmt.stop_token_ids,
        stop_sequences=fmt.stop_sequences, pad_token_id=fmt.pad_token_id,
    )

    mine = process_rows(mesh, t.questions_per_update)  # the same rows of every update

    def load_batch(step: int):
        """This update's questions (LaTRO) or rows (SFT) as global arrays, rows split over the
        mesh; this process tokenizes only the rows its devices hold."""
        indices = batch_indices(len(train_set), t.questions_per_update, step, t.seed)
        prompts, targets = (list(x) for x in zip(*encoded([int(indices[i]) for i in mine])))
        if sft:
            (longest,) = global_max([max(len(p) + len(c) for p, c in zip(prompts, targets))])
            local = sft_rows(prompts, targets, fmt.pad_token_id, bucket(longest, SFT_BUCKETS))
        else:
            local = pad_questions(prompts, targets, question_slots(prompts, targets, sampling), fmt.pad_token_id)
        return rows_from_processes(mesh, len(indices), mine, local)

    latest = ocp.CheckpointManager(
        os.path.abspath(os.path.join(run_dir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=t.keep_last), item_names=("state", "meta"),
    )
    best = ocp.CheckpointManager(
        os.path.abspath(os.path.join(run_dir, "best")),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["greedy_accuracy"], best_mode="max"),
        item_names=("state", "meta"),
    )
    step = 0
    if latest.latest_step() is not None:
        # Restored into this run's shardings, whatever mesh wrote the checkpoint.
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                {"params": params, "opt_state": opt_state})
        restored = latest.restore(
            latest.latest_step(),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
        # ref_params was copied from the starting weights above: pi_0 needs no copy in checkpoints.
        params, opt_state, step = restored.state["params"], restored.state["opt_state"], restored.meta["step"]
    log = RunLog(run_dir, exp, step)
    key = jax.random.key(t.seed)
    eval_key = jax.random.fold_in(key, 2**31 - 1)  # a stream apart from the updates' fold_in(key, step)

    def state_args(at: int):
        return _checkpoint_args({"params": params, "opt_state": opt_state}, {"step": at, "experiment": exp.name})

    def save(at: int) -> None:
        if latest.latest_step() != at:
            latest.save(at, args=state_args(at))

    def asked_to_stop() -> bool:
        """Whether any process was signalled to stop (a collective: every process stops together)."""
        (stopping,) = global_max([stop["signal"] is not None])
        if stopping and stop["signal"] is None:
            stop["signal"] = "another process's"
        return bool(stopping)

    def eval_due(at: int) -> bool:
        return at % t.eval_every == 0 or at == t.updates

    def run_eval(at: int) -> dict:
        """Evaluate the params of update `at` (saved already): eval_<at>.json, the logs, best/."""
        result = evaluate(config, policy(params), tokenizer, fmt, eval_set, exp.data.task, exp.rollout.max_new_tokens,
                          t.maj_k, jax.random.fold_in(eval_key, at), progress=progress and primary)
        eval_metrics = {k: v for k, v in result.items() if k.endswith("accuracy")}
        log.write(at, {f"eval/{k}": v for k, v in eval_metrics.items()})
        log.write_samples(at, rollout_samples(tokenizer, *last_rollout, sampling.num_samples)
                          if last_rollout else [r["greedy_text"] for r in result["rows"][:4]])
        if at not in best.all_steps():  # a kill after best/ was written but before eval_<at>.json
            best.save(at, args=state_args(at), metrics={"greedy_accuracy": eval_metrics["greedy_accuracy"]})
        best.wait_until_finished()
        if primary:  # written last: its presence says that the evaluation of `at` is complete
            with open(os.path.join(run_dir, f"eval_{at}.json"), "w") as f:
                json.dump(result, f, indent=1)
        return eval_metrics

    update_step = update_jit(params, opt_state)  # outputs in the shardings placed above, update after update
    applied = applied_updates(opt_state)  # the learning-rate schedule's step: it skips non-finite updates
    metrics: dict = {}
    last_rollout = None
    bar = tqdm(total=t.updates, initial=step, desc=exp.name, unit="update", disable=not (progress and primary))
    done_here = 0
    with stop_requests() as stop, jax.set_mesh(mesh):
        try:
            # An evaluation that a stop (or a crash) cut short, of the update the run resumes after.
            (pending,) = global_max([step > 0 and eval_due(step) and primary
                                     and not os.path.isfile(os.path.join(run_dir, f"eval_{step}.json"))])
            if pending:
                metrics.update(run_eval(step))
                if asked_to_stop():  # during it
                    raise Interrupted(f"stopped after evaluating update {step}; rerun the same command to resume")
            while step < t.updates:
                batch = load_batch(step)
                started = time.perf_counter()
                if sft:
                    rows, rows_loss, rollout_metrics, score_from = batch, sft_rows_loss, {}, 1
                else:
                    scored, out = rollout(config, exp.objective, sampling, policy(params), ref_params, batch,
                                          jax.random.fold_in(key, step), t.score_batch, t.rollout_batch)
                    rows = dict(tokens=scored.tokens, attention_mask=scored.attention_mask,
                                rationale_mask=scored.rationale_mask, answer_mask=scored.answer_mask,
                                advantages=scored.advantages)
                    rows_loss, rollout_metrics, score_from = latro_rows_loss, scored.metrics, int(out.prompt_slots)
                    last_rollout = (scored, out)
                update_started = time.perf_counter()
                if lora:
                    rows_loss = LoraRowsLoss(rows_loss, lora)
                params, opt_state, update_metrics = update_step(
                    config, exp.objective, optimizer, micro_rows, rows_loss, score_from, params, opt_state, rows, base
                )
                jax.block_until_ready(update_metrics["loss"])
                now = time.perf_counter()
                real_tokens = int(to_host(jnp.sum(rows["attention_mask"])))
                metrics = {k: float(v) for k, v in to_host({**rollout_metrics, **update_metrics}).items()}
                metrics.update(time_update_s=now - update_started, tokens_per_s=real_tokens / (now - started),
                               micro_batch_rows=micro_rows, lr=learning_rate(exp.optim, t.updates, applied))
                applied += not metrics["skipped"]
                if metrics["skipped"] and primary:
                    tqdm.write(f"update {step}: non-finite loss or gradient; update skipped (params unchanged)")
                step += 1
                done_here += 1
                log.write(step, metrics)
                bar.update()
                bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("loss", "reward_mean", "kl_mean") if k in metrics})
                # Saved before an evaluation (minutes at the paper's sizes), so that a kill during it
                # loses no update; a stop requested by then skips the evaluation, which the resumed
                # run does first.
                if step % t.save_every == 0 or eval_due(step):
                    save(step)
                # Every process stops after the same update, whichever was signalled.
                if asked_to_stop() or (stop_after is not None and done_here >= stop_after):
                    raise Interrupted(f"stopped after update {step}; rerun the same command to resume")
                if eval_due(step):
                    metrics.update(run_eval(step))
        except Interrupted:
            save(step)
            if stop["signal"] is not None:
                raise
        finally:
            latest.wait_until_finished()
            best.wait_until_finished()
            latest.close()
            best.close()
            bar.close()
            log.close()
    return {"step": step, "params": policy(params), **metrics}
