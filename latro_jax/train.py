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

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from latro_jax.config import ModelConfig
from latro_jax.experiment import OptimSpec
from latro_jax.objective import ObjectiveConfig, rollout_advantages, surrogate_loss
from latro_jax.sampling import SampleOutput, SamplingConfig, bucket, pad_prompts, sample
from latro_jax.scoring import continuation_logprobs, masked_sum, token_logprobs

ANSWER_BUCKETS = (16, 32, 64, 128, 256)


class Rollout(NamedTuple):
    """A scored batch of N = questions x K rows, ready for the gradient pass.

    tokens, attention_mask: [N, S] prompt (left-padded) + rationale + answer, contiguous, then
    right padding; rationale_mask, answer_mask: [N, S] the tokens of z and of y;
    advantages [N] (constants); metrics: scalars.
    """

    tokens: jax.Array
    attention_mask: jax.Array
    rationale_mask: jax.Array
    answer_mask: jax.Array
    advantages: jax.Array
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


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def score_rollout(
    config: ModelConfig,
    objective: ObjectiveConfig,
    k: int,
    params: nnx.State,
    ref_params: nnx.State,
    out: SampleOutput,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    answers: jax.Array,
    answer_lengths: jax.Array,
) -> Rollout:
    """Steps 2-3 of the update, and the advantages. prompt_tokens/mask [N, P] as sampled;
    answers [N, A] right-padded with `answer_lengths` [N] (each question's repeated K times)."""
    pad_id = 0
    tokens, attention_mask, rationale_mask, answer_mask = pack_sequences(
        prompt_tokens, prompt_mask, out.tokens, out.lengths, answers, answer_lengths, pad_id
    )
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
    last_context_logprob = cont_logprobs[:, 0]
    answer_reward = masked_sum(cont_logprobs[:, 1:], cont_mask[:, 2:])

    context = p + out.tokens.shape[1]
    ref_logprobs = token_logprobs(config, ref_params, tokens[:, :context], attention_mask[:, :context])
    ref_sums = masked_sum(ref_logprobs, rationale_mask[:, :context])
    policy_sums = jnp.sum(out.logprobs, axis=1)
    advantages, metrics = rollout_advantages(
        objective, k, policy_sums, ref_sums, answer_reward, out.finished, last_context_logprob
    )
    metrics["rationale_length_mean"] = jnp.mean(out.lengths.astype(jnp.float32))
    metrics["rationale_length_max"] = jnp.max(out.lengths)
    return Rollout(tokens, attention_mask, rationale_mask, answer_mask, advantages, metrics)


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


def learning_rate(spec: OptimSpec, updates: int, step: int) -> float:
    if step < spec.warmup_steps:
        return spec.learning_rate * step / spec.warmup_steps
    return spec.learning_rate * max(0.0, 1 - (step - spec.warmup_steps) / (updates - spec.warmup_steps))


def latro_rows_loss(config, objective, num_rows, params, rows):
    """The surrogate loss of some rows of a Rollout (a micro-batch)."""
    logprobs = token_logprobs(config, params, rows["tokens"], rows["attention_mask"])
    return surrogate_loss(
        objective, rows["advantages"], logprobs, rows["rationale_mask"], logprobs, rows["answer_mask"], num_rows
    )


def sft_rows_loss(config, objective, num_rows, params, rows):
    """Cross-entropy on the completion (gold rationale + answer) only, summed per row, / num_rows."""
    logprobs = token_logprobs(config, params, rows["tokens"], rows["attention_mask"])
    nll = -jnp.sum(masked_sum(logprobs, rows["completion_mask"])) / num_rows
    tokens = jnp.sum(rows["completion_mask"])
    return nll, {"sft_loss": jax.lax.stop_gradient(nll), "completion_tokens": tokens}


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4), donate_argnums=(5, 6))
def update(
    config: ModelConfig,
    objective: ObjectiveConfig,
    optimizer: optax.GradientTransformation,
    micro_batch: int,
    rows_loss,
    params: nnx.State,
    opt_state,
    rows: dict,
):
    """Gradient of the whole batch's loss, accumulated over micro-batches of `micro_batch` rows
    (a `lax.scan`), then one optimizer step. A non-finite loss or gradient skips the step:
    params and optimizer state come back unchanged and metrics["skipped"] is 1.

    rows: dict of [N, ...] arrays; rows_loss(config, objective, N, params, micro_rows) -> (loss, terms).
    """
    n = jax.tree.leaves(rows)[0].shape[0]
    micro = jax.tree.map(lambda x: x.reshape(n // micro_batch, micro_batch, *x.shape[1:]), rows)
    grad_fn = jax.value_and_grad(functools.partial(rows_loss, config, objective, n), has_aux=True)

    def accumulate(carry, micro_rows):
        grads, loss = carry
        (micro_loss, terms), micro_grads = grad_fn(params, micro_rows)
        return (jax.tree.map(jnp.add, grads, micro_grads), loss + micro_loss), terms

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, loss), terms = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32)), micro)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    metrics = {name: jnp.sum(value) for name, value in terms.items()}
    metrics.update(loss=loss, grad_norm=grad_norm, skipped=(~finite).astype(jnp.int32))
    return keep(new_params, params), keep(new_opt_state, opt_state), metrics


def rollout(
    config: ModelConfig,
    objective: ObjectiveConfig,
    sampling: SamplingConfig,
    params: nnx.State,
    ref_params: nnx.State,
    prompts: list[list[int]],
    answers: list[list[int]],
    rng: jax.Array,
) -> tuple[Rollout, SampleOutput]:
    """Sample K rationales per prompt and score them (steps 1-3). prompts, answers: token lists."""
    k = sampling.num_samples
    answer_slots = bucket(max(map(len, answers)), ANSWER_BUCKETS)
    sampling = dataclasses.replace(sampling, cache_room=answer_slots + 2)
    out = sample(config, params, prompts, rng, sampling)
    prompt_tokens, prompt_mask = pad_prompts(prompts, int(out.prompt_slots), sampling.pad_token_id)
    answer_tokens, _ = pad_prompts([a[::-1] for a in answers], answer_slots, sampling.pad_token_id)
    answer_tokens = answer_tokens[:, ::-1]  # right-padded
    repeat = functools.partial(np.repeat, repeats=k, axis=0)
    scored = score_rollout(
        config, objective, k, params, ref_params, out,
        jnp.asarray(repeat(prompt_tokens)), jnp.asarray(repeat(prompt_mask)),
        jnp.asarray(repeat(np.ascontiguousarray(answer_tokens))),
        jnp.asarray(repeat(np.array([len(a) for a in answers], np.int32))),
    )
    return scored, out
