"""The LaTRO update's pieces: rewards through the KV cache against a full re-score, micro-batch
accumulation, skipped non-finite updates, and the number of model passes per update.
Tolerances: 1e-4 on sums of ~30 token log-probs (f32; the cached and uncached paths differ in
summation order); 1e-6 on params after micro-batched vs whole-batch accumulation."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import latro_jax.model
import latro_jax.sampling
import latro_jax.scoring
from latro_jax.config import ModelConfig
from latro_jax.experiment import OptimSpec
from latro_jax.model import init_params
from latro_jax.objective import AnswerLogprobs, ObjectiveConfig, rollout_advantages
from latro_jax.sampling import SamplingConfig, sample_tokens
from latro_jax.scoring import masked_sum, token_logprobs
from latro_jax.rollout import Questions, pad_questions, question_slots, rollout, score_rows
from latro_jax.sharding import micro_batches, unmicro_batches
from latro_jax.update import applied_updates, latro_rows_loss, make_optimizer, reference_params, update

CONFIG = ModelConfig("llama", 64, 32, 48, 2, 4, 2, 8)
OBJECTIVE = ObjectiveConfig(beta=0.05)
SAMPLING = SamplingConfig(max_new_tokens=12, num_samples=4, stop_token_ids=(2,), stop_sequences=((7, 8),))
PROMPTS = [[1, 5, 6, 7], [1, 9, 10]]
ANSWERS = [[11, 12, 2], [13, 2]]


def questions(prompts, answers, sampling: SamplingConfig) -> Questions:
    """Questions from token lists, padded as a run pads them (one process, one device)."""
    return pad_questions(prompts, answers, question_slots(prompts, answers, sampling), sampling.pad_token_id)


def rows_of(scored):
    return dict(tokens=scored.tokens, attention_mask=scored.attention_mask, rationale_mask=scored.rationale_mask,
                answer_mask=scored.answer_mask, advantages=scored.advantages)


@pytest.fixture(scope="module")
def scored():
    params = init_params(CONFIG, seed=0)
    ref = init_params(CONFIG, seed=1)  # a different reference, so the KL term is not zero
    result, out = rollout(CONFIG, OBJECTIVE, SAMPLING, params, ref, questions(PROMPTS, ANSWERS, SAMPLING), jax.random.key(0))
    return params, ref, result, out


def rescored(objective, params, ref, result, out):
    """(advantages, rewards) of a rollout's packed rows computed again from scratch: every score
    from full forwards over the packed sequences (not the sampler's log-probs or its cache), the
    advantages over all rows at once."""
    logprobs = token_logprobs(CONFIG, params, result.tokens, result.attention_mask)
    answer_sums = masked_sum(logprobs, result.answer_mask)
    context = np.asarray(result.attention_mask & ~result.answer_mask)
    last_context = context.shape[1] - 1 - np.argmax(context[:, ::-1], axis=1)
    last_context_logprob = np.asarray(logprobs)[np.arange(len(last_context)), last_context]
    policy = masked_sum(logprobs, result.rationale_mask)
    ref_sums = masked_sum(token_logprobs(CONFIG, ref, result.tokens, result.attention_mask), result.rationale_mask)
    advantages, rewards, _ = rollout_advantages(objective, SAMPLING.num_samples, policy, ref_sums, answer_sums,
                                                out.finished, jnp.asarray(last_context_logprob))
    return advantages, rewards, policy


def assert_finished_and_not(out):
    """Some rows stopped and some did not: the answer reward of a finished row enters r as it
    is, an unfinished row's is the non-stop penalty (whose mean spans every row's)."""
    finished = np.asarray(out.finished)
    assert 0 < finished.sum() < finished.size, finished


@pytest.mark.parametrize("reference_compat", [False, True])
def test_cached_answer_reward_equals_full_rescoring(scored, reference_compat):
    """R from the sampler's cache continuation (and, for reference_compat, the released code's
    extra token: the last one before the answer) equals the same quantities scored over the
    packed sequence from scratch; compared through the rewards r of each row (finished rows: R
    itself; unfinished: the non-stop penalty of the mean R) and the advantages they produce."""
    params, ref, _, _ = scored
    objective = ObjectiveConfig(beta=0.05, reference_compat=reference_compat)
    result, out = rollout(CONFIG, objective, SAMPLING, params, ref, questions(PROMPTS, ANSWERS, SAMPLING), jax.random.key(0))
    assert_finished_and_not(out)
    expected, rewards, policy = rescored(objective, params, ref, result, out)
    np.testing.assert_allclose(np.asarray(result.rewards), np.asarray(rewards), atol=1e-4)
    np.testing.assert_allclose(np.asarray(result.advantages), np.asarray(expected), atol=1e-4)
    # The sampler's own log-probs are the policy's (on-policy).
    np.testing.assert_allclose(np.asarray(out.logprobs.sum(1)), np.asarray(policy), atol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_reference_params_score_as_the_float32_params(dtype):
    """pi_0 is kept in the compute dtype (half the bytes under bfloat16): its log-probs equal the
    float32 params' bit for bit, since the model casts every weight to the compute dtype where it
    uses it (tied embeddings and biases too; test_sharding's meshes run the scanned layers). It
    is a copy: updates donate the params."""
    config = CONFIG.replace(dtype=dtype, tie_word_embeddings=True, qkv_bias=True)
    params = init_params(config, seed=3)
    reference = reference_params(config, params)
    assert {x.dtype for x in jax.tree.leaves(reference)} == {jnp.dtype(dtype)}
    for ours, theirs in zip(jax.tree.leaves(reference), jax.tree.leaves(params)):
        assert ours.unsafe_buffer_pointer() != theirs.unsafe_buffer_pointer()
    tokens = jax.random.randint(jax.random.key(0), (3, 10), 0, config.vocab_size)
    mask = jnp.arange(10)[None] >= jnp.array([[0], [2], [5]])  # left padding
    expected = token_logprobs(config, params, tokens, mask)
    np.testing.assert_array_equal(np.asarray(token_logprobs(config, reference, tokens, mask)), np.asarray(expected))
    assert np.count_nonzero(np.asarray(expected)) == int(jnp.sum(mask[:, 1:] & mask[:, :-1]))  # real scores


def test_micro_batches_give_the_whole_batch_gradient(scored):
    params, _, result, out = scored
    optimizer = make_optimizer(OptimSpec(learning_rate=1e-3), 10)
    results = []
    for micro_batch in (2, 8):
        p = jax.tree.map(jnp.copy, params)
        new, _, metrics = update(CONFIG, OBJECTIVE, optimizer, micro_batch, latro_rows_loss, int(out.prompt_slots), p,
                                 optimizer.init(p), rows_of(result))
        results.append((new, metrics))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), results[0][0], results[1][0])
    np.testing.assert_allclose(results[0][1]["loss"], results[1][1]["loss"], rtol=1e-5)
    assert int(results[0][1]["skipped"]) == 0
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), results[0][0], params)
    assert max(jax.tree.leaves(moved)) > 0


def gradient_recorder() -> optax.GradientTransformation:
    """An optax transformation that applies nothing and keeps in its state the gradient it was
    given: what `update` accumulated, read back from the returned optimizer state."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
    )


def whole_batch_loss(objective, rows, prompt_slots, params):
    """The LaTRO loss of all rows written out from the model's logits (LATRO.md, "Gradient"):
    mean over rows of -A * log pi(z|x) + sft_coef * mean over rows of -log pi(y|x+z), the sums
    over each row's tokens of log_softmax of the logits that predict them."""
    mask = rows["attention_mask"]
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, _ = latro_jax.model.forward(CONFIG, params, rows["tokens"], positions, mask)
    predicted = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), rows["tokens"][:, 1:, None], axis=-1)[..., 0]
    rationale = jnp.sum(jnp.where(rows["rationale_mask"][:, 1:], predicted, 0.0), axis=1)
    answer = jnp.sum(jnp.where(rows["answer_mask"][:, 1:], predicted, 0.0), axis=1)
    assert prompt_slots > 0 and not np.asarray(rows["rationale_mask"][:, :prompt_slots]).any()
    return jnp.mean(-rows["advantages"] * rationale) + objective.sft_coef * jnp.mean(-answer)


@pytest.mark.parametrize("clip", [False, True])
def test_update_accumulates_the_whole_batch_gradient(scored, clip):
    """The gradient `update` hands the optimizer is jax.grad of the whole batch's loss written
    out independently (`whole_batch_loss`), whatever the micro-batch (1 row, 2 rows, all 8): the
    micro-batches' gradients add up (averaging them would divide it by the number of
    micro-batches). With clip_norm at half its norm, the optimizer gets it scaled to that norm
    (so the gradient's size, not only its direction, decides the step). grad_norm is the norm
    before clipping. 1e-5 relative, 1e-6 absolute (entries reach 0.2): float32 sums in another order."""
    params, _, result, out = scored
    objective = ObjectiveConfig(beta=0.05, sft_coef=0.3)  # both terms of the loss
    rows = rows_of(result)
    expected = jax.grad(functools.partial(whole_batch_loss, objective, rows, int(out.prompt_slots)))(params)
    norm = float(optax.global_norm(expected))
    assert norm > 1e-3
    clip_norm = norm / 2
    if clip:
        expected = jax.tree.map(lambda g: g * clip_norm / norm, expected)
    for micro_batch in (1, 2, 8):
        optimizer = optax.chain(optax.clip_by_global_norm(clip_norm), gradient_recorder()) if clip else gradient_recorder()
        p = jax.tree.map(jnp.copy, params)
        new, state, metrics = update(CONFIG, objective, optimizer, micro_batch, latro_rows_loss, int(out.prompt_slots),
                                     p, optimizer.init(p), rows)
        recorded = state[-1] if clip else state
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), recorded, expected)
        np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["loss"]), float(whole_batch_loss(objective, rows, int(out.prompt_slots),
                                                                                  params)), rtol=1e-5)
        jax.tree.map(np.testing.assert_array_equal, new, params)  # the recorder applies nothing


def test_remat_gives_the_same_update(scored):
    """Recomputing in the backward pass (ModelConfig.remat: each layer, or all but the
    projections; the paper recipes' memory settings) changes what is stored, not the gradient:
    its norm agrees within 1e-6 relative (AdamW's first step moves each param by about lr x the
    gradient's sign, so the params, within 1e-6, check the direction and the norm the size)."""
    params, _, result, out = scored
    optimizer = make_optimizer(OptimSpec(learning_rate=1e-3), 10)
    results = []
    for remat in ("none", "full", "projections"):
        p = jax.tree.map(jnp.copy, params)
        results.append(update(CONFIG.replace(remat=remat), OBJECTIVE, optimizer, 4, latro_rows_loss,
                              int(out.prompt_slots), p, optimizer.init(p), rows_of(result)))
    for other in results[1:]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), results[0][0], other[0])
        np.testing.assert_allclose(results[0][2]["loss"], other[2]["loss"], rtol=1e-6)
        np.testing.assert_allclose(results[0][2]["grad_norm"], other[2]["grad_norm"], rtol=1e-6)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), results[1][0], params)
    assert max(jax.tree.leaves(moved)) > 0


def test_projections_remat_recomputes_no_projection():
    """remat="projections" keeps the q, k, v, o, gate and up projections for the backward pass,
    which then recomputes only the attention (scores and weighted sum) and elementwise work.
    Counted by XLA's cost analysis of the compiled gradient, against no remat: at least the
    attention's two matmuls per layer (it does recompute them rather than keep the [T, T] scores)
    and at most half as much again for the elementwise ops (seen: 10.9M FLOPs, bounds 8.4M and
    12.6M). One projection left to be recomputed, even the smallest (k, 4.2M here), exceeds it;
    full remat adds ~102M."""
    config = ModelConfig("llama", 256, 128, 512, 2, 4, 2, 32)
    batch, length = 2, 64
    params = init_params(config, seed=0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, length)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)

    def flops(remat):
        def loss(p):
            return latro_jax.model.forward(config.replace(remat=remat), p, tokens, positions)[0].mean()
        return jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()["flops"]

    none, full, projections = flops("none"), flops("full"), flops("projections")
    attention = config.num_layers * 2 * (2 * batch * config.num_heads * length**2 * config.head_dim)
    assert full - none > 10 * attention, (none, full)  # full remat does recompute the projections
    assert attention <= projections - none <= 1.5 * attention, (none, projections, attention)


def test_reference_forward_in_row_chunks_gives_the_same_rollout(scored):
    """score_batch runs the reference forward over strided chunks of rows one after another (to
    bound its activations); the rewards and advantages, per row, are those of one forward over
    all rows (1e-5: float32, the same sums in another batch shape)."""
    params, ref, whole, _ = scored
    for score_batch in (2, 4):
        chunked, _ = rollout(CONFIG, OBJECTIVE, SAMPLING, params, ref, questions(PROMPTS, ANSWERS, SAMPLING), jax.random.key(0),
                             score_batch=score_batch)
        np.testing.assert_allclose(np.asarray(chunked.rewards), np.asarray(whole.rewards), atol=1e-5)
        np.testing.assert_allclose(np.asarray(chunked.advantages), np.asarray(whole.advantages), atol=1e-5)
        np.testing.assert_allclose(chunked.metrics["kl_mean"], whole.metrics["kl_mean"], atol=1e-5)
    assert abs(float(whole.metrics["kl_mean"])) > 1e-3  # pi_0 differs from the policy: the reference sums count


def test_rollout_in_chunks_of_questions_equals_the_whole(scored):
    """rollout_batch=1 samples and scores one question at a time (one chunk's KV cache alive);
    greedy decoding makes the samples independent of the chunk's random key, so the packed rows,
    rewards and advantages (over the whole batch: the non-stop penalty's mean spans it) equal
    those of one rollout over both questions (1e-5: float32, other batch shapes)."""
    import dataclasses

    params, ref, _, _ = scored
    greedy = dataclasses.replace(SAMPLING, temperature=0.0)
    objective = ObjectiveConfig(beta=0.05, nonstop_coef=2.0)
    whole, whole_out = rollout(CONFIG, objective, greedy, params, ref, questions(PROMPTS, ANSWERS, greedy), jax.random.key(0))
    chunked, chunked_out = rollout(CONFIG, objective, greedy, params, ref, questions(PROMPTS, ANSWERS, greedy), jax.random.key(0),
                                   rollout_batch=1)
    for field in ("tokens", "attention_mask", "rationale_mask", "answer_mask"):
        np.testing.assert_array_equal(getattr(chunked, field), getattr(whole, field))
    np.testing.assert_array_equal(chunked_out.tokens, whole_out.tokens)
    np.testing.assert_allclose(np.asarray(chunked.rewards), np.asarray(whole.rewards), atol=1e-5)
    np.testing.assert_allclose(np.asarray(chunked.advantages), np.asarray(whole.advantages), atol=1e-5)
    assert chunked_out.cache is None


def test_rollout_in_chunks_takes_advantages_over_the_whole_batch(scored):
    """Sampled (T=1) rows of two chunks of one question each, some finished and some not: the
    rewards and advantages of the chunked rollout are those computed from scratch over all its
    rows at once (the non-stop penalty's mean spans both chunks), and they are not zero (the K
    rows of a question differ). 1e-4 as test_cached_answer_reward_equals_full_rescoring."""
    params, ref, _, _ = scored
    objective = ObjectiveConfig(beta=0.05, nonstop_coef=2.0)
    chunked, out = rollout(CONFIG, objective, SAMPLING, params, ref, questions(PROMPTS, ANSWERS, SAMPLING),
                           jax.random.key(0), rollout_batch=1)
    assert_finished_and_not(out)
    finished = np.asarray(out.finished).reshape(len(PROMPTS), -1)
    assert finished.any(axis=1).all() and not finished.all(axis=1).any()  # a mix in each chunk
    advantages, rewards, _ = rescored(objective, params, ref, chunked, out)
    np.testing.assert_allclose(np.asarray(chunked.rewards), np.asarray(rewards), atol=1e-4)
    np.testing.assert_allclose(np.asarray(chunked.advantages), np.asarray(advantages), atol=1e-4)
    assert np.abs(np.asarray(advantages)).max() > 1.0  # finished rows stand apart from the rest


def test_micro_batches_are_strided_and_invertible():
    """Micro-batch j takes rows j, j + M, ...: with rows split over devices in blocks, each
    micro-batch has rows from every block; unmicro_batches restores the order."""
    rows = {"a": jnp.arange(12).reshape(12, 1), "b": jnp.arange(12)}
    micro = micro_batches(rows, 4)
    np.testing.assert_array_equal(micro["b"], [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]])
    jax.tree.map(np.testing.assert_array_equal, unmicro_batches(micro), rows)


def test_non_finite_update_is_skipped(scored):
    params, _, result, out = scored
    optimizer = make_optimizer(OptimSpec(learning_rate=1e-3), 10)
    rows = rows_of(result)
    rows["advantages"] = rows["advantages"].at[3].set(jnp.nan)
    p = jax.tree.map(jnp.copy, params)
    state = optimizer.init(p)
    new, new_state, metrics = update(CONFIG, OBJECTIVE, optimizer, 4, latro_rows_loss, int(out.prompt_slots), p, state, rows)
    assert int(metrics["skipped"]) == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new, params)
    # The learning-rate schedule stays where it was (the run logs the rate of applied_updates).
    assert applied_updates(new_state) == 0
    rows["advantages"] = rows_of(result)["advantages"]
    _, after, metrics = update(CONFIG, OBJECTIVE, optimizer, 4, latro_rows_loss, int(out.prompt_slots), new, new_state,
                               rows)
    assert int(metrics["skipped"]) == 0 and applied_updates(after) == 1


def test_model_passes_per_update(monkeypatch):
    """The decoder calls traced into an update's compiled programs, for a config nothing else
    compiles: the prefill, the decode step (the while-loop body, run once per generated token),
    the answer continuation, the reference forward, and one policy forward whose backward is
    its gradient (a single micro-batch; the scan body is traced once)."""
    calls = []
    original = latro_jax.model.hidden_states

    def counting(config, params, tokens, *args, **kwargs):
        calls.append(tokens.shape)
        return original(config, params, tokens, *args, **kwargs)

    for module in (latro_jax.sampling, latro_jax.scoring):
        monkeypatch.setattr(module, "hidden_states", counting)
    config = CONFIG.replace(vocab_size=65)
    params, ref = init_params(config, seed=0), init_params(config, seed=1)
    optimizer = make_optimizer(OptimSpec(learning_rate=1e-3), 10)
    result, out = rollout(config, OBJECTIVE, SAMPLING, params, ref, questions(PROMPTS, ANSWERS, SAMPLING), jax.random.key(0))
    n = len(PROMPTS) * SAMPLING.num_samples
    assert [shape[0] for shape in calls] == [len(PROMPTS), n, n, n]  # prefill once per question
    assert calls[1][1] == 1  # the decode step feeds one token
    update(config, OBJECTIVE, optimizer, n, latro_rows_loss, int(out.prompt_slots), params, optimizer.init(params),
           rows_of(result))
    assert len(calls) == 5 and calls[4][0] == n


def test_micro_batch_counts_rows_per_batch_shard():
    """train.micro_batch is at most that many rows per batch shard (data x fsdp), as the paper's
    4 rows per GPU: on 8 GPUs with fsdp a forward+backward takes 32 rows, 4 on each device, where
    4 rows in all would be computed whole on every device. Tensor devices share rows. Where 4 does
    not divide a shard's rows, fewer (24 rows on 4 shards: 6 each, 3 at a time); where the rows
    do not split over the shards, the largest divisor of the rows within micro_batch x shards."""
    from latro_jax.sharding import micro_batch_rows

    def mesh(data, fsdp, tensor):
        return jax.sharding.AbstractMesh((data, fsdp, tensor), ("data", "fsdp", "tensor"))

    assert micro_batch_rows(4, 384, mesh(1, 1, 1)) == 4
    assert micro_batch_rows(4, 384, mesh(1, 8, 1)) == 32
    assert micro_batch_rows(4, 384, mesh(2, 4, 1)) == 32
    assert micro_batch_rows(4, 384, mesh(1, 1, 8)) == 4
    assert micro_batch_rows(4, 384, mesh(2, 2, 2)) == 16
    assert micro_batch_rows(4, 24, mesh(1, 4, 1)) == 12  # the SFT recipe's 24 rows
    assert micro_batch_rows(8, 16, mesh(2, 2, 1)) == 16  # all rows at once
    assert micro_batch_rows(5, 384, mesh(1, 8, 1)) == 32  # 48 rows per shard: 4 at a time
    assert micro_batch_rows(4, 384, mesh(1, 5, 1)) == 16  # 384 rows do not split over 5 shards



def answers_after_context(logprobs, answer_mask, last_context):
    """AnswerLogprobs of per-token log-probs [M, S] over packed rows: each row's answer entries
    (where answer_mask [M, S]) moved to the left of an [M, A] array, A the longest answer."""
    logprobs, answer_mask = np.asarray(logprobs), np.asarray(answer_mask)
    lengths = answer_mask.sum(1)
    mask = np.arange(lengths.max())[None] < lengths[:, None]
    answer = np.zeros(mask.shape, np.float32)
    answer[mask] = logprobs[answer_mask]
    return AnswerLogprobs(jnp.asarray(answer), jnp.asarray(mask), jnp.asarray(last_context, jnp.float32))


def no_rationale_rescored(params):
    """Each question's gold answer scored right after its unpadded prompt by the model's logits
    (log_softmax of a plain forward, one question at a time): AnswerLogprobs of [Q, A] rows."""
    rows, answer_masks, last = [], [], []
    width = max(map(len, PROMPTS)) + max(map(len, ANSWERS))
    for prompt, gold in zip(PROMPTS, ANSWERS):
        tokens = jnp.asarray([prompt + gold])
        logits, _ = latro_jax.model.forward(CONFIG, params, tokens, jnp.arange(tokens.shape[1])[None])
        predicted = jnp.take_along_axis(jax.nn.log_softmax(logits[0, :-1]), tokens[0, 1:, None], axis=-1)[:, 0]
        row = np.zeros(width, np.float32)
        row[1 : tokens.shape[1]] = predicted  # entry t: log p(token t | tokens before it)
        rows.append(row)
        answer_masks.append((np.arange(width) >= len(prompt)) & (np.arange(width) < tokens.shape[1]))
        last.append(row[len(prompt) - 1])
    return answers_after_context(np.stack(rows), np.stack(answer_masks), last)


def test_no_rationale_scores_equal_a_full_forward(scored):
    """score_rows(no_rationale=True) scores each question's answer after the left-padded prompt
    (one forward over Q rows): the answer's per-token log-probs and the last prompt token's
    (reference_compat's extra token) equal those of a plain forward over the unpadded prompt +
    answer (1e-5: float32, other padding). The sampled rows' scores are unchanged by it."""
    params, ref, _, _ = scored
    qs = questions(PROMPTS, ANSWERS, SAMPLING)
    sampling = dataclasses.replace(SAMPLING, cache_room=qs.answers.shape[1] + 2)
    out = sample_tokens(CONFIG, params, qs.prompt_tokens, qs.prompt_mask, jax.random.key(0), sampling)
    _, plain = score_rows(CONFIG, params, ref, out, qs)
    _, scores = score_rows(CONFIG, params, ref, out, qs, no_rationale=True)
    assert plain.no_rationale is None
    expected, got = no_rationale_rescored(params), scores.no_rationale
    width = expected.mask.shape[1]
    np.testing.assert_array_equal(np.asarray(got.mask)[:, :width], expected.mask)
    assert not np.asarray(got.mask)[:, width:].any() and not np.asarray(got.logprobs)[:, width:].any()
    np.testing.assert_allclose(np.asarray(got.logprobs)[:, :width], expected.logprobs, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got.last_context), expected.last_context, atol=1e-5)
    assert np.all(np.asarray(expected.last_context) < 0)  # real scores, not padding's zeros
    jax.tree.map(np.testing.assert_array_equal, scores._replace(no_rationale=None), plain)
    # The sampled rows' per-token answer log-probs add up to their R.
    np.testing.assert_allclose(np.asarray(masked_sum(scores.answer_logprobs, scores.answer_mask)),
                               np.asarray(scores.answer), atol=1e-6)


def test_mean_prob_with_the_no_rationale_baseline_in_chunks(scored):
    """reward="mean_prob" (RLPR), the no-rationale baseline, the extra token of reference_compat,
    nonstop_coef=0, sampled in two chunks of one question: the rewards and advantages are those
    computed from scratch over all rows at once, every log-prob from plain forwards over the
    packed rows and over each prompt + answer (1e-5: means of probabilities, float32). Some
    rows' R(z) - R(empty) is positive, so the clipped baseline leaves a signal."""
    params, ref, _, _ = scored
    objective = ObjectiveConfig(beta=0.05, nonstop_coef=0.0, reward="mean_prob", reward_baseline="no_rationale",
                                reference_compat=True)
    chunked, out = rollout(CONFIG, objective, SAMPLING, params, ref, questions(PROMPTS, ANSWERS, SAMPLING),
                           jax.random.key(0), rollout_batch=1)
    assert_finished_and_not(out)
    logprobs = token_logprobs(CONFIG, params, chunked.tokens, chunked.attention_mask)
    context = np.asarray(chunked.attention_mask & ~chunked.answer_mask)
    last_context = context.shape[1] - 1 - np.argmax(context[:, ::-1], axis=1)
    answer = answers_after_context(logprobs, chunked.answer_mask,
                                   np.asarray(logprobs)[np.arange(len(last_context)), last_context])
    policy = masked_sum(logprobs, chunked.rationale_mask)
    ref_sums = masked_sum(token_logprobs(CONFIG, ref, chunked.tokens, chunked.attention_mask), chunked.rationale_mask)
    unused_sums = jnp.full(policy.shape, jnp.nan)  # the "logprob" reward's
    advantages, rewards, metrics = rollout_advantages(objective, SAMPLING.num_samples, policy, ref_sums, unused_sums,
                                                      out.finished, answer_logprobs=answer,
                                                      no_rationale=no_rationale_rescored(params))
    np.testing.assert_allclose(np.asarray(chunked.rewards), np.asarray(rewards), atol=1e-5)
    np.testing.assert_allclose(np.asarray(chunked.advantages), np.asarray(advantages), atol=1e-5)
    for name in ("answer_reward_mean", "no_rationale_reward_mean"):
        np.testing.assert_allclose(chunked.metrics[name], metrics[name], atol=1e-6)
    assert float(metrics["answer_reward_mean"]) > 0
    np.testing.assert_allclose(chunked.metrics["empty_rationale_fraction"], np.mean(np.asarray(out.lengths) == 0))
