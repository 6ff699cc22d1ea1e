"""The LaTRO objective against hand-computed numbers, and its gradient against the REINFORCE-with-
RLOO estimator assembled in numpy from the analytic log-softmax gradient (onehot - softmax).

Expected values are literals worked out by hand (the working is in the comments), not the same
formula run twice. Tolerances: float32 against exact decimals, 1e-6.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latro_jax.objective import (
    AnswerLogprobs, ObjectiveConfig, answer_rewards, kl_penalised_rewards, rloo_advantages, rollout_advantages,
    self_rewards, surrogate_loss,
)
from latro_jax.scoring import masked_sum

ATOL = 1e-6


def close(got, expected):
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected, np.float32), atol=ATOL, rtol=0)


# --- RLOO ------------------------------------------------------------------------------------


def test_rloo_k2_is_the_difference_to_the_other():
    # K=2: A_k = r_k - r_other. Groups (1, 3) and (-2, 0.5).
    got = rloo_advantages(jnp.array([1.0, 3.0, -2.0, 0.5]), 2)
    close(got, [-2.0, 2.0, -2.5, 2.5])


def test_rloo_k4_by_hand():
    # Group (1, 2, 3, 6): sum 12, A = r - (12 - r)/3 -> -8/3, -4/3, 0, 4.
    # Group (0, 0, 0, 4): sum 4,  A = r - (4 - r)/3  -> -4/3, -4/3, -4/3, 4.
    got = rloo_advantages(jnp.array([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0]), 4)
    close(got, [-2.6666667, -1.3333333, 0.0, 4.0, -1.3333333, -1.3333333, -1.3333333, 4.0])


def test_rloo_k16_against_a_double_loop():
    k, groups = 16, 3
    r = np.random.default_rng(0).normal(size=groups * k).astype(np.float32)
    expected = np.zeros_like(r, np.float64)
    for g in range(groups):
        for i in range(k):
            others = [float(r[g * k + j]) for j in range(k) if j != i]
            expected[g * k + i] = r[g * k + i] - sum(others) / len(others)
    got = np.asarray(rloo_advantages(jnp.asarray(r), k))
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    np.testing.assert_allclose(got.reshape(groups, k).sum(axis=1), 0.0, atol=1e-5)


@pytest.mark.parametrize("k", [0, 1])
def test_rloo_needs_two_per_group(k):
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(jnp.zeros(4), k)


def test_rloo_needs_whole_groups():
    with pytest.raises(ValueError, match="multiple of k=4"):
        rloo_advantages(jnp.zeros(6), 4)


# --- rewards ---------------------------------------------------------------------------------


def test_kl_penalty_by_hand():
    rewards = jnp.array([-1.0, -2.0])
    policy, ref = jnp.array([-10.0, -12.0]), jnp.array([-11.0, -12.5])  # log pi - log pi0 = 1, 0.5
    # r = R - 0.5 * (1, 0.5) = (-1.5, -2.25)
    close(kl_penalised_rewards(rewards, policy, ref, 0.5), [-1.5, -2.25])
    close(kl_penalised_rewards(rewards, policy, ref, 0.0), [-1.0, -2.0])


def test_nonstop_penalty_by_hand():
    # mean R over all four rows (before replacement) = -12/4 = -3; unfinished row 2 gets 2 * -3.
    r = jnp.array([-1.0, -2.0, -3.0, -6.0])
    finished = jnp.array([True, True, False, True])
    close(answer_rewards(r, finished), [-1.0, -2.0, -6.0, -6.0])
    close(answer_rewards(r, finished, nonstop_coef=1.0), [-1.0, -2.0, -3.0, -6.0])
    close(answer_rewards(r, jnp.ones(4, bool)), r)
    # Groups of 2 rows (the released code's per-GPU mean): means -1.5 and -4.5.
    close(answer_rewards(r, jnp.array([False, True, False, True]), group_rows=2), [-3.0, -2.0, -9.0, -6.0])
    close(answer_rewards(r, finished, group_rows=4), [-1.0, -2.0, -6.0, -6.0])  # one group: the whole batch
    with pytest.raises(ValueError, match="groups of 3 rows do not divide the 4 rows"):
        answer_rewards(r, finished, group_rows=3)


def test_nonstop_group_counts_questions():
    """ObjectiveConfig.nonstop_group is in questions: K rows each. 2 questions x K=2, one group per
    question: the unfinished rows get 2 x their own question's mean (-1.5 and -4.5)."""
    policy = ref = jnp.zeros(4)
    r = jnp.array([-1.0, -2.0, -3.0, -6.0])
    finished = jnp.array([False, True, True, False])
    _, rewards, _ = rollout_advantages(ObjectiveConfig(beta=0.0, nonstop_group=1), 2, policy, ref, r, finished)
    close(rewards, [-3.0, -2.0, -3.0, -9.0])
    _, rewards, _ = rollout_advantages(ObjectiveConfig(beta=0.0), 2, policy, ref, r, finished)
    close(rewards, [-6.0, -2.0, -3.0, -6.0])  # the whole batch's mean, -3


def latro_loss(
    cfg: ObjectiveConfig,
    k: int,
    rationale_logprobs: jax.Array,
    rationale_mask: jax.Array,
    answer_logprobs: jax.Array,
    answer_mask: jax.Array,
    ref_rationale_logprob_sums: jax.Array,
    finished: jax.Array,
    reward_answer_logprob_sums: jax.Array | None = None,
    last_context_logprob: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The LaTRO loss of a whole batch and its metrics, as an update computes them in two steps:
    `rollout_advantages` over the batch, then `surrogate_loss` (here of all rows at once).

    rationale_logprobs [N, L], answer_logprobs [N, A]: per-token log pi from the policy forward
    pass over x+z+y (differentiable). rationale_mask [N, L], answer_mask [N, A]: the tokens of z
    and of y. ref_rationale_logprob_sums [N]: log pi_0(z|x). finished [N] bool.
    reward_answer_logprob_sums [N] (optional): log pi(y|x+z) already computed with the same
    params (the sampler's cache continuation); used for R instead of the answer_logprobs sum.
    last_context_logprob [N]: required with `cfg.reference_compat`.

    loss = mean(-A * log pi(z|x)) + sft_coef * mean(-log pi(y|x+z)), with A a constant.
    Metrics: those of `rollout_advantages`, the rationale length, and pg_loss / sft_loss (the two
    terms unweighted; sft_loss = mean answer NLL, reported whatever sft_coef).
    """
    n = rationale_logprobs.shape[0]
    chex.assert_axis_dimension(answer_logprobs, 0, n)
    rationale_logprob = masked_sum(rationale_logprobs.astype(jnp.float32), rationale_mask)
    if reward_answer_logprob_sums is None:
        reward_answer_logprob_sums = masked_sum(answer_logprobs.astype(jnp.float32), answer_mask)
    advantages, _, metrics = rollout_advantages(
        cfg, k, rationale_logprob, ref_rationale_logprob_sums, reward_answer_logprob_sums, finished,
        last_context_logprob,
    )
    loss, terms = surrogate_loss(cfg, advantages, rationale_logprobs, rationale_mask, answer_logprobs, answer_mask)
    metrics["rationale_length_mean"] = jnp.mean(jnp.sum(rationale_mask.astype(jnp.float32), axis=-1))
    return loss, {**metrics, **terms}


# --- latro_loss on a hand example ------------------------------------------------------------
# One question, K=2, finished rows.
#   rationale tokens (-1, -2 | masked 99) and (-0.5, -0.5, -1): log pi(z|x) = (-3, -2)
#   answer tokens (-0.5, -1 | masked -7) and (-2, -0.25, -0.25):  R = (-1.5, -2.5)
#   log pi0(z|x) = (-4, -2.5), so log pi - log pi0 = (1, 0.5), KL mean 0.75
#   beta 0.5: r = (-1.5 - 0.5, -2.5 - 0.25) = (-2, -2.75); A = (0.75, -0.75)
#   pg = mean(-0.75 * -3, 0.75 * -2) = mean(2.25, -1.5) = 0.375
#   sft = mean answer NLL = mean(1.5, 2.5) = 2


def hand_batch(**overrides):
    batch = {
        "rationale_logprobs": jnp.array([[-1.0, -2.0, 99.0], [-0.5, -0.5, -1.0]]),
        "rationale_mask": jnp.array([[True, True, False], [True, True, True]]),
        "answer_logprobs": jnp.array([[-0.5, -1.0, -7.0], [-2.0, -0.25, -0.25]]),
        "answer_mask": jnp.array([[True, True, False], [True, True, True]]),
        "ref_rationale_logprob_sums": jnp.array([-4.0, -2.5]),
        "finished": jnp.array([True, True]),
    }
    return batch | overrides


def test_loss_and_metrics_by_hand():
    loss, metrics = latro_loss(ObjectiveConfig(beta=0.5), 2, **hand_batch())
    close(loss, 0.375)
    expected = {
        "reward_mean": -2.375,
        "reward_std": 0.375,
        "answer_reward_mean": -2.0,
        "kl_mean": 0.75,
        "advantage_mean": 0.0,
        "advantage_std": 0.75,
        "advantage_min": -0.75,
        "advantage_max": 0.75,
        "rationale_length_mean": 2.5,
        "finished_fraction": 1.0,
        "pg_loss": 0.375,
        "sft_loss": 2.0,
    }
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        close(metrics[name], value)


def test_micro_batches_add_up_to_the_batch_loss():
    """Per-row micro-batches of the hand example (A = (0.75, -0.75), given), each divided by the
    batch's 2 rows: pg terms 2.25/2 and -1.5/2, sft terms 1.5/2 and 2.5/2."""
    cfg = ObjectiveConfig(beta=0.5, sft_coef=1.0)
    b = hand_batch()
    advantages = jnp.array([0.75, -0.75])
    parts = [
        surrogate_loss(cfg, advantages[i : i + 1], b["rationale_logprobs"][i : i + 1], b["rationale_mask"][i : i + 1],
                       b["answer_logprobs"][i : i + 1], b["answer_mask"][i : i + 1], num_rows=2)
        for i in range(2)
    ]
    close(parts[0][0], 2.25 / 2 + 1.5 / 2)
    close(parts[1][0], -1.5 / 2 + 2.5 / 2)
    whole, _ = latro_loss(cfg, 2, **b)
    close(parts[0][0] + parts[1][0], whole)  # 0.375 + 2


def test_sft_coef_adds_the_mean_answer_nll():
    loss0, metrics0 = latro_loss(ObjectiveConfig(beta=0.5, sft_coef=0.0), 2, **hand_batch())
    loss1, metrics1 = latro_loss(ObjectiveConfig(beta=0.5, sft_coef=1.0), 2, **hand_batch())
    close(loss1 - loss0, 2.0)
    close(loss1, 2.375)
    close(metrics0["sft_loss"], 2.0)
    close(metrics1["pg_loss"], metrics0["pg_loss"])


def test_reference_compat_adds_the_token_before_the_answer():
    # R = (-1.5 - 0.5, -2.5 - 1.5) = (-2, -4); r = (-2.5, -4.25); A = (1.75, -1.75)
    # pg = mean(-1.75 * -3, 1.75 * -2) = mean(5.25, -3.5) = 0.875
    cfg = ObjectiveConfig(beta=0.5, reference_compat=True)
    loss, metrics = latro_loss(cfg, 2, **hand_batch(), last_context_logprob=jnp.array([-0.5, -1.5]))
    close(metrics["answer_reward_mean"], -3.0)
    close(metrics["reward_mean"], -3.375)
    close(metrics["advantage_max"], 1.75)
    close(loss, 0.875)
    close(metrics["sft_loss"], 2.0)  # the extra token is in R only, not in the SFT term


def test_reference_compat_without_last_context_logprob_is_an_error():
    with pytest.raises(ValueError, match="last_context_logprob"):
        latro_loss(ObjectiveConfig(beta=0.5, reference_compat=True), 2, **hand_batch())


def test_given_reward_sums_replace_the_answer_sum():
    # R = (-1, -1); r = (-1.5, -1.25); A = (-0.25, 0.25); pg = mean(-0.75, 0.5) = -0.125
    loss, metrics = latro_loss(
        ObjectiveConfig(beta=0.5), 2, **hand_batch(), reward_answer_logprob_sums=jnp.array([-1.0, -1.0])
    )
    close(loss, -0.125)
    close(metrics["answer_reward_mean"], -1.0)
    close(metrics["sft_loss"], 2.0)


def test_unfinished_row_in_the_loss():
    # Row 1 unfinished: R = (-1.5, 2 * -2) = (-1.5, -4); r = (-2, -4.25); A = (2.25, -2.25)
    # pg = mean(-2.25 * -3, 2.25 * -2) = mean(6.75, -4.5) = 1.125
    loss, metrics = latro_loss(ObjectiveConfig(beta=0.5), 2, **hand_batch(finished=jnp.array([True, False])))
    close(loss, 1.125)
    close(metrics["finished_fraction"], 0.5)
    close(metrics["answer_reward_mean"], -2.0)


def test_values_under_a_zero_mask_change_nothing():
    cfg = ObjectiveConfig(beta=0.5, sft_coef=1.0)
    base = hand_batch()
    noise = np.random.default_rng(1)
    changed = dict(base)
    for values, mask in (("rationale_logprobs", "rationale_mask"), ("answer_logprobs", "answer_mask")):
        junk = jnp.asarray(noise.normal(scale=50.0, size=base[values].shape), jnp.float32)
        changed[values] = jnp.where(base[mask], base[values], junk)
    chex.assert_trees_all_close(latro_loss(cfg, 2, **changed), latro_loss(cfg, 2, **base), atol=0, rtol=0)

    def loss_of(rationale_logprobs, answer_logprobs):
        batch = base | {"rationale_logprobs": rationale_logprobs, "answer_logprobs": answer_logprobs}
        return latro_loss(cfg, 2, **batch)[0]

    grad_r, grad_a = jax.grad(loss_of, argnums=(0, 1))(base["rationale_logprobs"], base["answer_logprobs"])
    assert np.all(np.asarray(grad_r)[~np.asarray(base["rationale_mask"])] == 0)
    assert np.all(np.asarray(grad_a)[~np.asarray(base["answer_mask"])] == 0)


# --- gradient against the REINFORCE-with-RLOO estimator --------------------------------------
# Toy policy: rationale token t has logits rationale_table[t]; answer token a of row n has logits
# answer_table[a] + context_table[z_n,0] (so the answer depends on the rationale). The gradient of
# log softmax(l)[i] w.r.t. l is onehot(i) - softmax(l).

B, K, L, A, V = 2, 4, 5, 3, 7


def toy_problem(seed):
    rng = np.random.default_rng(seed)
    params = {
        "rationale_table": rng.normal(size=(L, V)).astype(np.float32),
        "answer_table": rng.normal(size=(A, V)).astype(np.float32),
        "context_table": rng.normal(size=(V, V)).astype(np.float32),
    }
    z = rng.integers(0, V, size=(B * K, L))
    lengths = rng.integers(1, L + 1, size=B * K)
    rationale_mask = np.arange(L)[None] < lengths[:, None]
    y = np.repeat(rng.integers(0, V, size=(B, A)), K, axis=0)
    answer_mask = np.ones((B * K, A), bool)
    answer_mask[1, -1] = False  # one shorter answer
    data = {
        "z": z,
        "y": y,
        "rationale_mask": rationale_mask,
        "answer_mask": answer_mask,
        "ref": rng.normal(loc=-8.0, size=B * K).astype(np.float32),
        "finished": np.array([True, True, False, True, True, True, True, True]),
    }
    return params, data


def toy_logprobs(params, data):
    """Per-token log-probs [N, L] and [N, A] of the toy policy (differentiable)."""
    rationale = jax.nn.log_softmax(params["rationale_table"])  # [L, V]
    rationale_logprobs = jnp.take_along_axis(rationale[None], data["z"][..., None], axis=-1)[..., 0]
    answer_logits = params["answer_table"][None] + params["context_table"][data["z"][:, 0]][:, None]  # [N, A, V]
    answer_logprobs = jnp.take_along_axis(jax.nn.log_softmax(answer_logits), data["y"][..., None], axis=-1)[..., 0]
    return rationale_logprobs, answer_logprobs


def toy_loss(params, data, cfg):
    rationale_logprobs, answer_logprobs = toy_logprobs(params, data)
    return latro_loss(
        cfg,
        K,
        rationale_logprobs,
        jnp.asarray(data["rationale_mask"]),
        answer_logprobs,
        jnp.asarray(data["answer_mask"]),
        jnp.asarray(data["ref"]),
        jnp.asarray(data["finished"]),
    )[0]


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def reinforce_rloo_gradient(params, data, beta, sft_coef, nonstop_coef=2.0):
    """(1/N) sum_k -A_k grad log pi(z_k) + sft_coef (1/N) sum_k -grad log pi(y|z_k), in float64 numpy."""
    p = {name: value.astype(np.float64) for name, value in params.items()}
    n = B * K
    eye = np.eye(V)
    rationale_probs = softmax(p["rationale_table"])  # [L, V]
    logpi = np.array(
        [
            sum(np.log(rationale_probs[t, data["z"][i, t]]) for t in range(L) if data["rationale_mask"][i, t])
            for i in range(n)
        ]
    )
    answer_probs = softmax(p["answer_table"][None] + p["context_table"][data["z"][:, 0]][:, None])  # [N, A, V]
    answer_logpi = np.array(
        [
            sum(np.log(answer_probs[i, a, data["y"][i, a]]) for a in range(A) if data["answer_mask"][i, a])
            for i in range(n)
        ]
    )

    rewards = np.where(data["finished"], answer_logpi, nonstop_coef * answer_logpi.mean())
    r = rewards - beta * (logpi - data["ref"])
    adv = np.array([r[i] - np.mean([r[j] for j in range(i // K * K, i // K * K + K) if j != i]) for i in range(n)])

    grad = {name: np.zeros_like(value) for name, value in p.items()}
    for i in range(n):
        for t in range(L):
            if data["rationale_mask"][i, t]:
                grad["rationale_table"][t] += -adv[i] / n * (eye[data["z"][i, t]] - rationale_probs[t])
        for a in range(A):
            if data["answer_mask"][i, a]:
                d = -sft_coef / n * (eye[data["y"][i, a]] - answer_probs[i, a])
                grad["answer_table"][a] += d
                grad["context_table"][data["z"][i, 0]] += d
    return grad


@pytest.mark.parametrize("beta,sft_coef", [(0.0, 0.0), (0.25, 0.0), (0.25, 1.0)])
def test_gradient_is_reinforce_with_rloo(beta, sft_coef):
    params, data = toy_problem(seed=2)
    cfg = ObjectiveConfig(beta=beta, sft_coef=sft_coef)
    grad_fn = jax.jit(jax.grad(toy_loss), static_argnums=2)
    got = grad_fn(jax.tree.map(jnp.asarray, params), {k: jnp.asarray(v) for k, v in data.items()}, cfg)
    expected = reinforce_rloo_gradient(params, data, beta, sft_coef)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, jax.tree.map(jnp.asarray, params))
    chex.assert_trees_all_close(jax.tree.map(np.asarray, got), expected, atol=ATOL, rtol=0)
    if sft_coef == 0:
        assert np.all(np.asarray(got["answer_table"]) == 0)


# --- jit and config --------------------------------------------------------------------------


def test_jit_traces_once_per_shape():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, data):
        return toy_loss(params, data, ObjectiveConfig(beta=0.25, sft_coef=1.0))

    chex.clear_trace_counter()
    params, data = toy_problem(seed=3)
    data = {k: jnp.asarray(v) for k, v in data.items()}
    eager = toy_loss(jax.tree.map(jnp.asarray, params), data, ObjectiveConfig(beta=0.25, sft_coef=1.0))
    close(step(jax.tree.map(jnp.asarray, params), data), eager)
    for seed in (4, 5):
        other_params, other_data = toy_problem(seed)
        step(jax.tree.map(jnp.asarray, other_params), {k: jnp.asarray(v) for k, v in other_data.items()})

    jitted = jax.jit(latro_loss, static_argnums=(0, 1))
    chex.assert_trees_all_close(
        jitted(ObjectiveConfig(beta=0.5), 2, **hand_batch()),
        latro_loss(ObjectiveConfig(beta=0.5), 2, **hand_batch()),
        atol=ATOL,
    )


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"beta": -0.1}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"beta": 0.1, "sft_coef": -1.0}, "sft_coef"),
        ({"beta": 0.1, "nonstop_coef": float("inf")}, "nonstop_coef"),
        ({"beta": 0.1, "nonstop_group": -1}, "nonstop_group"),
        ({"beta": 0.1, "reference_compat": 1}, "reference_compat"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"ObjectiveConfig.{field}="):
        ObjectiveConfig(**kwargs)


# --- self-reward variants and the no-rationale baseline ----------------------------------------
# Per-token answer log-probs chosen as logs of powers of 2, so every reward is exact in ln 2.
#   row 0: (log 1/2, log 1/4 | masked 99), |T| = 2; row 1: (log 1/4, log 1/4, log 1/2), |T| = 3
#   tokens before the answer (reference_compat's extra one): row 0 log 1/2, row 1 log 1/4

LN2 = float(np.log(2.0))


def hand_answers():
    return AnswerLogprobs(
        logprobs=jnp.log(jnp.array([[0.5, 0.25, 1.0], [0.25, 0.25, 0.5]])).at[0, 2].set(99.0),
        mask=jnp.array([[True, True, False], [True, True, True]]),
        last_context=jnp.log(jnp.array([0.5, 0.25])),
    )


@pytest.mark.parametrize(
    "reward,expected,expected_compat",
    [
        # row 0: sum = log(1/2 * 1/4) = -3 ln2; with the extra 1/2: -4 ln2.
        # row 1: sum = log(1/4 * 1/4 * 1/2) = -5 ln2; with the extra 1/4: -7 ln2.
        ("logprob", [-3 * LN2, -5 * LN2], [-4 * LN2, -7 * LN2]),
        # the sums over |T| = (2, 3); with the extra token |T| = (3, 4).
        ("mean_logprob", [-3 * LN2 / 2, -5 * LN2 / 3], [-4 * LN2 / 3, -7 * LN2 / 4]),
        # exp(sum): 1/8, 1/32; with the extra token 1/16, 1/128.
        ("prob", [0.125, 0.03125], [0.0625, 0.0078125]),
        # mean of the probabilities: (1/2 + 1/4) / 2 = 0.375, (1/4 + 1/4 + 1/2) / 3 = 1/3;
        # with the extra token (1/2 + 1/2 + 1/4) / 3 = 5/12, (1/4 + 1/4 + 1/4 + 1/2) / 4 = 0.3125.
        ("mean_prob", [0.375, 1 / 3], [5 / 12, 0.3125]),
    ],
)
def test_self_rewards_by_hand(reward, expected, expected_compat):
    nonstop = {"nonstop_coef": 0.0}
    got = self_rewards(ObjectiveConfig(beta=0.0, reward=reward, **nonstop), hand_answers())
    assert got.dtype == jnp.float32
    close(got, expected)
    close(self_rewards(ObjectiveConfig(beta=0.0, reward=reward, reference_compat=True, **nonstop), hand_answers()),
          expected_compat)


def test_self_rewards_of_a_row_without_answer_tokens_are_finite():
    answers = AnswerLogprobs(jnp.zeros((1, 2)), jnp.zeros((1, 2), bool), jnp.zeros(1))
    for reward in ("logprob", "mean_logprob", "mean_prob"):
        close(self_rewards(ObjectiveConfig(beta=0.0, reward=reward, nonstop_coef=0.0), answers), [0.0])


def test_no_rationale_baseline_by_hand():
    """reward="logprob" with the no-rationale baseline, 2 questions x K=2, row 2 unfinished.
    R(z) = (-1, -3 | -1, -0.5). R(empty) from the per-token log-probs of each question's answer
    after the bare prompt: (-1 - 1, -1.5) = (-2, -1.5). R' = max(0, R(z) - R(empty)):
    (1, -1 -> 0 | 0.5, 1), the second row clipped; mean R' = 2.5 / 4 = 0.625.
    Non-stop penalty, coef 0.5: row 2 gets 0.5 * 0.625 = 0.3125 -> (1, 0, 0.3125, 1).
    KL: log pi - log pi0 = (1, 0, 0.5, 0), beta 0.5: r = (0.5, 0, 0.0625, 1).
    RLOO, K=2: A = (0.5, -0.5, 0.0625 - 1, 1 - 0.0625) = (0.5, -0.5, -0.9375, 0.9375)."""
    cfg = ObjectiveConfig(beta=0.5, nonstop_coef=0.5, reward_baseline="no_rationale")
    no_rationale = AnswerLogprobs(
        logprobs=jnp.array([[-1.0, -1.0, 42.0], [-1.5, 42.0, 42.0]]),
        mask=jnp.array([[True, True, False], [True, False, False]]),
        last_context=jnp.array([-7.0, -7.0]),  # not counted without reference_compat
    )
    advantages, rewards, metrics = rollout_advantages(
        cfg, 2, jnp.array([-10.0, -12.0, -8.0, -9.0]), jnp.array([-11.0, -12.0, -8.5, -9.0]),
        jnp.array([-1.0, -3.0, -1.0, -0.5]), jnp.array([True, True, False, True]), no_rationale=no_rationale,
    )
    close(rewards, [0.5, 0.0, 0.0625, 1.0])
    close(advantages, [0.5, -0.5, -0.9375, 0.9375])
    close(metrics["answer_reward_mean"], 0.625)  # R', before the non-stop penalty
    close(metrics["no_rationale_reward_mean"], -1.75)
    close(metrics["reward_mean"], 1.5625 / 4)


def test_prob_reward_with_the_baseline_and_the_extra_token_by_hand():
    """reward="prob", reference_compat, the no-rationale baseline, one question x K=2, row 1
    unfinished, beta 0. Extra tokens count: R(z) = (1/2 * 1/2 * 1/2, 1/2 * 1/2) = (0.125, 0.25);
    R(empty) = 1/2 * 1/2 * 1/4 = 0.0625; R' = (0.0625, 0.1875). Non-stop coef 0: row 1 gets 0.
    r = (0.0625, 0); A = (0.0625, -0.0625). The positional answer sums (the "logprob" reward's)
    are not used."""
    cfg = ObjectiveConfig(beta=0.0, nonstop_coef=0.0, reward="prob", reward_baseline="no_rationale",
                          reference_compat=True)
    half = float(np.log(0.5))
    answer = AnswerLogprobs(jnp.array([[half, half], [half, 99.0]]), jnp.array([[True, True], [True, False]]),
                            jnp.array([half, half]))
    empty = AnswerLogprobs(jnp.array([[half, 2 * half]]), jnp.array([[True, True]]), jnp.array([half]))
    advantages, rewards, metrics = rollout_advantages(
        cfg, 2, jnp.zeros(2), jnp.zeros(2), jnp.array([5.0, 5.0]), jnp.array([True, False]),
        answer_logprobs=answer, no_rationale=empty,
    )
    close(rewards, [0.0625, 0.0])
    close(advantages, [0.0625, -0.0625])
    close(metrics["answer_reward_mean"], 0.125)
    close(metrics["no_rationale_reward_mean"], 0.0625)


@pytest.mark.parametrize("reference_compat", [False, True])
def test_default_reward_ignores_the_new_arguments_bit_for_bit(reference_compat):
    """The default (reward="logprob", no baseline) is LaTRO's R, from the given sums: passing the
    per-token log-probs too changes no bit of the advantages, rewards or metrics."""
    rng = np.random.default_rng(7)
    n, k, a = 8, 4, 5
    policy, ref, sums, last = (jnp.asarray(rng.normal(loc=-5.0, size=n), jnp.float32) for _ in range(4))
    finished = jnp.asarray(rng.random(n) < 0.7)
    answer = AnswerLogprobs(jnp.asarray(rng.normal(size=(n, a)), jnp.float32), jnp.ones((n, a), bool), last)
    empty = AnswerLogprobs(answer.logprobs[: n // k], answer.mask[: n // k], last[: n // k])
    cfg = ObjectiveConfig(beta=0.05, reference_compat=reference_compat)
    for run in (rollout_advantages, jax.jit(rollout_advantages, static_argnums=(0, 1))):  # eager, then compiled
        before = run(cfg, k, policy, ref, sums, finished, last)
        after = run(cfg, k, policy, ref, sums, finished, last, answer_logprobs=answer, no_rationale=empty)
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, after), jax.tree.map(np.asarray, before))


def test_self_rewards_need_their_inputs():
    zeros, finished = jnp.zeros(4), jnp.ones(4, bool)
    answer = AnswerLogprobs(jnp.zeros((4, 3)), jnp.ones((4, 3), bool), jnp.zeros(4))
    with pytest.raises(ValueError, match="reward='mean_prob' needs answer_logprobs"):
        rollout_advantages(ObjectiveConfig(beta=0.0, reward="mean_prob", nonstop_coef=0.0), 2, zeros, zeros, zeros,
                           finished)
    baseline = ObjectiveConfig(beta=0.0, reward_baseline="no_rationale", nonstop_coef=0.0)
    with pytest.raises(ValueError, match="reward_baseline='no_rationale' needs no_rationale"):
        rollout_advantages(baseline, 2, zeros, zeros, zeros, finished)
    with pytest.raises(ValueError, match="N/k = 4/2 questions"):  # one row per question: 2, not 4
        rollout_advantages(baseline, 2, zeros, zeros, zeros, finished, no_rationale=answer)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"beta": 0.1, "reward": "sum"}, "reward"),
        ({"beta": 0.1, "reward": None}, "reward"),
        ({"beta": 0.1, "reward_baseline": "empty"}, "reward_baseline"),
        ({"beta": 0.1, "reward": "prob"}, "nonstop_coef"),  # the default nonstop_coef, 2
        ({"beta": 0.1, "reward": "mean_prob", "nonstop_coef": 2.0}, "nonstop_coef"),
        ({"beta": 0.1, "reward_baseline": "no_rationale", "nonstop_coef": 2.0}, "nonstop_coef"),
        ({"beta": 0.1, "reward": "mean_logprob", "reward_baseline": "no_rationale", "nonstop_coef": 1.0},
         "nonstop_coef"),
    ],
)
def test_reward_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"ObjectiveConfig.{field}=") as error:
        ObjectiveConfig(**kwargs)
    if field == "nonstop_coef":
        assert "a penalty only with nonstop_coef < 1" in str(error.value)
        assert "ObjectiveConfig.nonstop_coef=0" in str(error.value)


def test_nonnegative_rewards_accept_a_nonstop_coef_below_one():
    for reward in ("prob", "mean_prob"):
        ObjectiveConfig(beta=0.1, reward=reward, nonstop_coef=0.0)
    ObjectiveConfig(beta=0.1, reward_baseline="no_rationale", nonstop_coef=0.5)
    ObjectiveConfig(beta=0.1, reward="mean_logprob")  # a log-prob: the default coef 2 is a penalty


# --- the SFT term under reference_compat -------------------------------------------------------
# The released code scores the answer of its SFT term with the function of its R, whose sum
# starts one token early: the token before the answer counts in the SFT term too. The hand
# example with A = (0.75, -0.75) given, sft_coef 0.5, tokens before the answer (-0.5, -1.5):
#   pg = sum(-A * log pi(z|x)) / 2 = (2.25 - 1.5) / 2 = 0.375
#   sft = sum(-log pi(y|x+z)) / 2 = (1.5 + 2.5) / 2 = 2; with the extra tokens (2 + 4) / 2 = 3
#   loss = 0.375 + 0.5 * 2 = 1.375; with the extra tokens 0.375 + 0.5 * 3 = 1.875
#   d loss / d rationale token = -A_i / 2: -0.375 on row 0's tokens, 0.375 on row 1's
#   d loss / d answer token = -0.5 / 2 = -0.25; d loss / d extra token = -0.25 (0 without compat)


def sft_compat_loss(cfg, rationale_logprobs, answer_logprobs, last_context_logprobs):
    b = hand_batch()
    return surrogate_loss(cfg, jnp.array([0.75, -0.75]), rationale_logprobs, b["rationale_mask"], answer_logprobs,
                          b["answer_mask"], last_context_logprobs=last_context_logprobs)


@pytest.mark.parametrize("reference_compat,loss,sft,extra_grad", [(False, 1.375, 2.0, 0.0), (True, 1.875, 3.0, -0.25)])
def test_reference_compat_sft_term_by_hand(reference_compat, loss, sft, extra_grad):
    cfg = ObjectiveConfig(beta=0.5, sft_coef=0.5, reference_compat=reference_compat)
    b = hand_batch()
    last = jnp.array([-0.5, -1.5])
    (got, terms), grads = jax.value_and_grad(sft_compat_loss, argnums=(1, 2, 3), has_aux=True)(
        cfg, b["rationale_logprobs"], b["answer_logprobs"], last
    )
    close(got, loss)
    close(terms["pg_loss"], 0.375)
    close(terms["sft_loss"], sft)
    close(grads[0], [[-0.375, -0.375, 0.0], [0.375, 0.375, 0.375]])
    close(grads[1], [[-0.25, -0.25, 0.0], [-0.25, -0.25, -0.25]])
    close(grads[2], [extra_grad, extra_grad])


@pytest.mark.parametrize("sft_coef", [0.0, 1.0])
def test_default_surrogate_loss_ignores_the_extra_token_bit_for_bit(sft_coef):
    """Without reference_compat, passing the token before the answer changes no bit of the loss,
    its terms or its gradient (eager and compiled)."""
    cfg = ObjectiveConfig(beta=0.5, sft_coef=sft_coef)
    b = hand_batch()
    grad_fn = jax.value_and_grad(sft_compat_loss, argnums=(1, 2), has_aux=True)
    for run in (grad_fn, jax.jit(grad_fn, static_argnums=0)):
        before = run(cfg, b["rationale_logprobs"], b["answer_logprobs"], None)
        after = run(cfg, b["rationale_logprobs"], b["answer_logprobs"], jnp.array([-0.5, -1.5]))
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, after), jax.tree.map(np.asarray, before))


# --- the update's rows loss (update.latro_rows_loss) under reference_compat --------------------
# A tiny random model over packed rows: prompt (left-padded to P slots) + rationale + answer, one
# row with an empty rationale, whose token before the answer is the last prompt token (slot P-1,
# before the slots the loss otherwise scores).


def tiny_rows():
    from latro_jax.rollout import pack_sequences

    prompt = jnp.array([[0, 1, 5, 6], [1, 9, 10, 11], [0, 0, 1, 7], [1, 4, 4, 3]])
    rationale = jnp.array([[20, 21, 22], [30, 31, 32], [40, 41, 42], [50, 51, 52]])
    answer = jnp.array([[11, 12, 2], [13, 2, 0], [11, 12, 2], [13, 2, 0]])
    tokens, attention_mask, rationale_mask, answer_mask = pack_sequences(
        prompt, prompt != 0, rationale, jnp.array([2, 0, 3, 1]), answer, jnp.array([3, 2, 3, 2]), 0
    )
    return {"tokens": tokens, "attention_mask": attention_mask, "rationale_mask": rationale_mask,
            "answer_mask": answer_mask, "advantages": jnp.array([0.5, -1.0, 0.25, 0.25])}


@pytest.fixture(scope="module")
def tiny_model():
    from latro_jax.config import ModelConfig
    from latro_jax.model import init_params

    config = ModelConfig("llama", 64, 32, 48, 2, 4, 2, 8)
    return config, init_params(config, seed=0)


def test_rows_loss_default_is_the_code_before_bit_for_bit(tiny_model):
    """Without reference_compat, latro_rows_loss is what it was before the SFT term's extra token:
    surrogate_loss over one forward scored from the prompt's end; loss, terms and gradient equal
    bit for bit (compiled, as an update runs it)."""
    from latro_jax.scoring import token_logprobs
    from latro_jax.update import latro_rows_loss

    config, params = tiny_model
    rows = tiny_rows()
    objective = ObjectiveConfig(beta=0.05, sft_coef=1.0)

    def before(params, rows):
        logprobs = token_logprobs(config, params, rows["tokens"], rows["attention_mask"], score_from=4)
        return surrogate_loss(objective, rows["advantages"], logprobs, rows["rationale_mask"], logprobs,
                              rows["answer_mask"], 8)

    def after(params, rows):
        return latro_rows_loss(config, objective, 8, 4, params, rows)

    got, expected = (jax.jit(jax.value_and_grad(f, has_aux=True))(params, rows) for f in (after, before))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, got), jax.tree.map(np.asarray, expected))


def test_rows_loss_reference_compat_adds_the_token_before_the_answer(tiny_model):
    """With reference_compat the SFT term (sft_coef 0.5, 8 rows in the batch) adds the log-prob of
    the token before the answer: slots (5, 3, 6, 4) of the rows above, the last prompt token for
    the empty rationale of row 1, read from a forward scored from slot 1 (an independent
    reference). The policy-gradient term is unchanged; the gradient gains exactly that of
    0.5 * sum(-extra) / 8."""
    from latro_jax.scoring import token_logprobs
    from latro_jax.update import latro_rows_loss, token_before

    config, params = tiny_model
    rows = tiny_rows()
    slots = jnp.array([5, 3, 6, 4])
    np.testing.assert_array_equal(np.asarray(token_before(rows["answer_mask"])),
                                  np.arange(rows["tokens"].shape[1])[None] == np.asarray(slots)[:, None])

    def extra_term(params):
        logprobs = token_logprobs(config, params, rows["tokens"], rows["attention_mask"])
        return 0.5 * jnp.sum(-jnp.take_along_axis(logprobs, slots[:, None], axis=1)) / 8

    def loss(reference_compat):
        objective = ObjectiveConfig(beta=0.05, sft_coef=0.5, reference_compat=reference_compat)
        return jax.jit(jax.value_and_grad(lambda p: latro_rows_loss(config, objective, 8, 4, p, rows), has_aux=True))

    (compat, compat_terms), compat_grads = loss(True)(params)
    (default, default_terms), default_grads = loss(False)(params)
    extra, extra_grads = jax.value_and_grad(extra_term)(params)
    assert float(extra) > 0  # four real log-probs, the empty rationale's too
    np.testing.assert_allclose(compat - default, extra, atol=1e-6, rtol=0)
    np.testing.assert_allclose(compat_terms["sft_loss"] - default_terms["sft_loss"], 2 * extra, atol=1e-6, rtol=0)
    np.testing.assert_allclose(compat_terms["pg_loss"], default_terms["pg_loss"], atol=1e-6, rtol=0)
    chex.assert_trees_all_close(jax.tree.map(jnp.subtract, compat_grads, default_grads), extra_grads, atol=1e-6)
