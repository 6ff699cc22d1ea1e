"""Steps 1-3 of a LaTRO update: from padded questions to a scored `Rollout` with the fewest model
passes (LATRO.md, "Cost, and where a faster design wins").

  1. sample K rationales per question (one prefill per question, then the decode loop): the
     sampler also returns log pi_theta(z|x) of every sampled token (same params: on-policy);
  2. the answer reward R = log pi_theta(y|x+z) continues the sampler's KV cache by the answer
     tokens (a forward over ~answer-length tokens, not the whole sequence);
  3. one reference forward over prompt+rationale for log pi_0(z|x);
  (with `ObjectiveConfig.reward_baseline="no_rationale"`, one policy forward over prompt+answer
  per question for the reward of the answer without a rationale;)
then the self-rewards, KL-penalised rewards and RLOO advantages over the whole batch (`objective`).
The released code runs generate and three scoring forwards for the same quantities.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from latro_jax.config import ModelConfig
from latro_jax.objective import AnswerLogprobs, ObjectiveConfig, rollout_advantages
from latro_jax.sampling import SampleOutput, SamplingConfig, bucket, pad_prompts, sample_tokens
from latro_jax.scoring import continuation_logprobs, masked_sum, token_logprobs
from latro_jax.sharding import constrain, global_max, micro_batches, to_host, unmicro_batches


ANSWER_BUCKETS = (16, 32, 64, 128, 256)


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


class RowScores(NamedTuple):
    """What the advantages of sampled rows are computed from, [N] unless said: log pi(z|x) (the
    sampler's), log pi_0(z|x), R = log pi(y|x+z), the log-prob of the last context token (for
    `reference_compat`), whether the row stopped, the rationale's length, the answer's per-token
    log-probs and its mask [N, A] (the rewards other than the sum), and, for the no-rationale
    baseline, the answer's log-probs right after each question ([Q, A] rows; None without it)."""

    policy: jax.Array
    reference: jax.Array
    answer: jax.Array
    last_context: jax.Array
    finished: jax.Array
    lengths: jax.Array
    answer_logprobs: jax.Array
    answer_mask: jax.Array
    no_rationale: AnswerLogprobs | None


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("score_batch", "no_rationale"))
def score_rows(
    config: ModelConfig,
    params: nnx.State,
    ref_params: nnx.State,
    out: SampleOutput,
    questions: Questions,
    score_batch: int = 0,
    no_rationale: bool = False,
) -> tuple[tuple[jax.Array, ...], RowScores]:
    """Steps 2-3 of the update for sampled rows: (tokens, attention_mask, rationale_mask,
    answer_mask) of the packed rows, and their RowScores. `out`: the N = Q x K rows sampled
    for the Q `questions` (K consecutive rows per question).
    `score_batch` (static): rows per reference forward (`micro_batches`, one after another, so
    that one forward's activations and attention scores are alive at a time); 0 = all N at once.
    `no_rationale` (static): also score each question's answer right after its prompt (one
    policy forward over the Q questions' prompt+answer) for the no-rationale baseline."""
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
        finished=out.finished, lengths=out.lengths, answer_logprobs=cont_logprobs[:, 1:], answer_mask=cont_mask[:, 2:],
        no_rationale=no_rationale_logprobs(config, params, questions) if no_rationale else None,
    )
    return packed, scores


def no_rationale_logprobs(config: ModelConfig, params: nnx.State, questions: Questions) -> AnswerLogprobs:
    """The Q questions' answers scored right after their prompts, with no rationale: [Q, A] rows.
    Prompts are left-padded to P slots, so slot P-1 is the last prompt token, the token before
    the answer (`reference_compat`'s extra one), and the answer fills slots P..P+A-1."""
    p = questions.prompt_tokens.shape[1]
    answer_mask = jnp.arange(questions.answers.shape[1])[None] < questions.answer_lengths[:, None]
    tokens = jnp.concatenate([questions.prompt_tokens, questions.answers], axis=1)
    mask = jnp.concatenate([questions.prompt_mask.astype(bool), answer_mask], axis=1)
    logprobs = token_logprobs(config, params, tokens, mask, score_from=p - 1)
    return AnswerLogprobs(logprobs[:, p:], answer_mask, logprobs[:, p - 1])


@functools.partial(jax.jit, static_argnums=(0, 1))
def advantages_of(objective: ObjectiveConfig, k: int, packed: tuple[jax.Array, ...], scores: RowScores) -> Rollout:
    """The rollout of packed rows and their scores: advantages over all of them at once (the
    non-stop penalty's mean spans the batch; RLOO groups are K consecutive rows)."""
    advantages, rewards, metrics = rollout_advantages(
        objective, k, scores.policy, scores.reference, scores.answer, scores.finished, scores.last_context,
        answer_logprobs=AnswerLogprobs(scores.answer_logprobs, scores.answer_mask, scores.last_context),
        no_rationale=scores.no_rationale,
    )
    metrics["rationale_length_mean"] = jnp.mean(scores.lengths.astype(jnp.float32))
    metrics["empty_rationale_fraction"] = jnp.mean((scores.lengths == 0).astype(jnp.float32))
    metrics["rationale_length_max"] = jnp.max(scores.lengths)
    return Rollout(*packed, advantages, rewards, metrics)


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
    """Sample K rationales per question and score them (steps 1-3). `questions`: padded
    (`pad_questions`); `score_batch`: rows per reference forward (`score_rows`); `rollout_batch`:
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
        parts.append(jax.block_until_ready(score_rows(config, params, ref_params, out, part, score_batch=score_batch,
                                                      no_rationale=objective.reward_baseline == "no_rationale")))
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
