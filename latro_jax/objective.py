"""The LaTRO objective: self-rewards, KL penalty, RLOO advantages and the loss, over arrays.

Pure functions, no model: the caller supplies per-token log-probs from the policy forward pass
(differentiable) and the no-grad scores. Rows are prompt-major: the K rationales of question i
are rows i*K .. i*K+K-1, N = B*K.

The self-reward R of a row scores the gold answer y after the rationale z, from the per-token
log-probs lp_t = log pi(y_t | x+z, y_<t) over the answer's tokens T (with `reference_compat`, T
also holds the token before the answer, as the released code's R does); `ObjectiveConfig.reward`:

    logprob (LaTRO)      R = sum_t lp_t = log pi(y|x+z)
    mean_logprob         R = sum_t lp_t / |T|
    prob (VeriFree)      R = exp(sum_t lp_t) = pi(y|x+z)
    mean_prob (RLPR)     R = sum_t exp(lp_t) / |T|

With `reward_baseline="no_rationale"` a row's reward is R' = max(0, R(z) - R(empty)), R(empty)
the same reward of y placed directly after the question (one score per question). Then
unfinished rows get the non-stop penalty, r = R' - beta KL, and A = RLOO(r).

Everything on the reward side (R, the KL estimate, r, A) is wrapped in `stop_gradient`, so
`jax.grad(loss)` is the REINFORCE estimator with a leave-one-out baseline (LATRO.md, "Gradient"):

    (1/N) sum_k -A_k grad log pi(z_k|x)  +  sft_coef (1/N) sum_k -grad log pi(y|x+z_k)

(with `reference_compat` the SFT term's log pi(y|x+z_k) also holds the token before the answer,
as the released code's does: it scores the answer with the same function as its R).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from latro_jax.scoring import masked_sum

REWARDS = ("logprob", "mean_logprob", "prob", "mean_prob")
REWARD_BASELINES = ("none", "no_rationale")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """LaTRO loss settings. Hashable: a static argument of a jitted train step.

    beta: KL coefficient in r = R - beta (log pi - log pi_0) (0.05 GSM8K, 0.25 ARC in the release).
    sft_coef: weight c of the answer NLL term (paper Eq. 4: 1; released script: 0).
    nonstop_coef: rows that never finished get R = nonstop_coef * mean(R) (release: 2).
    nonstop_group: the questions whose rows that mean is over; 0 = the whole batch (every
    question of the update, whatever the mesh). The released code's mean is over each GPU's
    "local batch": 3 questions (24 over 8 GPUs), so nonstop_group=3 reproduces it.
    reference_compat: reproduce the released code's R, whose sum includes the log-prob of the
    last token before the answer (`rollout_advantages`' `last_context_logprob`); in every
    `reward` that token counts as one more answer token. The released code's SFT term adds the
    same token, and so does `surrogate_loss`'s (its `last_context_logprobs`, with gradient).
    reward: the self-reward R, one of REWARDS (module docstring): "logprob" (LaTRO, the sum of
    the answer's token log-probs), "mean_logprob", "prob" (VeriFree), "mean_prob" (RLPR).
    reward_baseline: "none", or "no_rationale": R' = max(0, R(z) - R(empty)), R(empty) the
    reward of the answer right after the question.
    Rewards >= 0 ("prob", "mean_prob", any reward with the "no_rationale" baseline) need
    nonstop_coef < 1, for nonstop_coef * mean(R) to be below the mean.
    """

    beta: float
    sft_coef: float = 0.0
    nonstop_coef: float = 2.0
    nonstop_group: int = 0
    reference_compat: bool = False
    reward: str = "logprob"
    reward_baseline: str = "none"

    def __post_init__(self):
        checks = {
            "beta": (self._finite(self.beta) and self.beta >= 0, "a finite number >= 0"),
            "sft_coef": (self._finite(self.sft_coef) and self.sft_coef >= 0, "a finite number >= 0"),
            "nonstop_coef": (self._finite(self.nonstop_coef) and self.nonstop_coef >= 0, "a finite number >= 0"),
            "nonstop_group": (isinstance(self.nonstop_group, int) and not isinstance(self.nonstop_group, bool)
                              and self.nonstop_group >= 0, "an int >= 0 (0 = the whole batch)"),
            "reference_compat": (isinstance(self.reference_compat, bool), "True or False"),
            "reward": (self.reward in REWARDS, f"one of {REWARDS}"),
            "reward_baseline": (self.reward_baseline in REWARD_BASELINES, f"one of {REWARD_BASELINES}"),
        }
        for field, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"ObjectiveConfig.{field}={getattr(self, field)!r} is invalid; must be {allowed}")
        if self.rewards_are_nonnegative and self.nonstop_coef >= 1:
            raise ValueError(
                f"ObjectiveConfig.nonstop_coef={self.nonstop_coef!r} is invalid with reward={self.reward!r} and "
                f"reward_baseline={self.reward_baseline!r}, whose rewards R are >= 0: the non-stop penalty gives "
                "unfinished rows nonstop_coef * mean(R), which for R >= 0 is a penalty only with nonstop_coef < 1; "
                "must be < 1 (e.g. ObjectiveConfig.nonstop_coef=0: unfinished rows get R = 0, the least reward)"
            )

    @property
    def rewards_are_nonnegative(self) -> bool:
        return self.reward in ("prob", "mean_prob") or self.reward_baseline == "no_rationale"

    @staticmethod
    def _finite(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class AnswerLogprobs(NamedTuple):
    """The gold answer's per-token log-probs after some context, M rows: logprobs [M, A] float;
    mask [M, A] bool, the answer's tokens; last_context [M]: the log-prob of the token before the
    answer (the released code's extra token, counted under `reference_compat`)."""

    logprobs: jax.Array
    mask: jax.Array
    last_context: jax.Array


def self_rewards(cfg: ObjectiveConfig, answer: AnswerLogprobs) -> jax.Array:
    """The self-reward R of `cfg.reward` (module docstring) of each row -> [M] float32.

    With `cfg.reference_compat` the token before the answer counts as one more answer token (one
    more term of the sums, one more of |T|). A row without answer tokens gets 0 from the means
    (|T| is taken as at least 1), not NaN.
    """
    chex.assert_rank(answer.logprobs, 2)
    chex.assert_equal_shape([answer.logprobs, answer.mask])
    chex.assert_shape(answer.last_context, answer.logprobs.shape[:1])
    logprobs = answer.logprobs.astype(jnp.float32)
    mask = answer.mask.astype(bool)
    if cfg.reference_compat:
        logprobs = jnp.concatenate([answer.last_context.astype(jnp.float32)[:, None], logprobs], axis=1)
        mask = jnp.concatenate([jnp.ones_like(mask[:, :1]), mask], axis=1)
    num_tokens = jnp.maximum(jnp.sum(mask, axis=1), 1).astype(jnp.float32)
    if cfg.reward == "mean_prob":
        return masked_sum(jnp.exp(logprobs), mask) / num_tokens
    total = masked_sum(logprobs, mask)
    if cfg.reward == "mean_logprob":
        return total / num_tokens
    if cfg.reward == "prob":
        return jnp.exp(total)
    return total


def answer_rewards(
    answer_logprob_sums: jax.Array, finished: jax.Array, nonstop_coef: float = 2.0, group_rows: int = 0
) -> jax.Array:
    """Self-rewards R [N] (e.g. log pi(y|x+z)), with the non-stop penalty.

    answer_logprob_sums [N]: R; finished [N] bool. Rows that never finished get
    nonstop_coef * mean(R), the mean taken before any replacement over all N rows, or with
    `group_rows` (static) over each block of that many consecutive rows. For a log-prob R
    (negative) coef 2 gives unfinished rows twice the average badness; for R >= 0 only a coef
    below 1 is a penalty (0: the least reward).
    """
    chex.assert_rank(answer_logprob_sums, 1)
    chex.assert_equal_shape([answer_logprob_sums, finished])
    n = answer_logprob_sums.shape[0]
    group = min(group_rows, n) or n
    if n % group:
        raise ValueError(f"the non-stop penalty's groups of {group_rows} rows do not divide the {n} rows")
    means = jnp.repeat(jnp.mean(answer_logprob_sums.reshape(n // group, group), axis=1), group)
    return jnp.where(finished.astype(bool), answer_logprob_sums, nonstop_coef * means)


def kl_penalised_rewards(
    rewards: jax.Array, policy_rationale_logprob: jax.Array, ref_rationale_logprob: jax.Array, beta: float
) -> jax.Array:
    """r = R - beta (log pi(z|x) - log pi_0(z|x)), all [N]."""
    chex.assert_rank(rewards, 1)
    chex.assert_equal_shape([rewards, policy_rationale_logprob, ref_rationale_logprob])
    return rewards - beta * (policy_rationale_logprob - ref_rationale_logprob)


def rloo_advantages(rewards: jax.Array, k: int) -> jax.Array:
    """Leave-one-out advantages A_k = r_k - mean_{j != k} r_j over each group of k rows.

    rewards [N] prompt-major, N a multiple of k (static, >= 2) -> [N]. No normalisation. Within
    a group the advantages sum to zero.
    """
    chex.assert_rank(rewards, 1)
    if not isinstance(k, int) or k < 2:
        raise ValueError(f"RLOO needs k >= 2 rationales per question (an int); got k={k!r}")
    n = rewards.shape[0]
    if n % k:
        raise ValueError(f"RLOO needs the number of rows ({n}) to be a multiple of k={k}")
    groups = rewards.reshape(n // k, k)
    others_mean = (jnp.sum(groups, axis=1, keepdims=True) - groups) / (k - 1)
    return (groups - others_mean).reshape(n)


def rollout_advantages(
    cfg: ObjectiveConfig,
    k: int,
    policy_rationale_logprob_sums: jax.Array,
    ref_rationale_logprob_sums: jax.Array,
    answer_logprob_sums: jax.Array,
    finished: jax.Array,
    last_context_logprob: jax.Array | None = None,
    *,
    answer_logprobs: AnswerLogprobs | None = None,
    no_rationale: AnswerLogprobs | None = None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """RLOO advantages of a whole rollout batch, all constants (no gradient). `cfg`, `k` static.

    policy_rationale_logprob_sums [N]: log pi(z|x); ref_rationale_logprob_sums [N]: log pi_0(z|x);
    answer_logprob_sums [N]: log pi(y|x+z), the "logprob" reward; finished [N] bool: the row
    stopped within the length limit. last_context_logprob [N]: log-prob of the last token before
    the answer; required with `cfg.reference_compat`, whose R adds it.
    answer_logprobs ([N, A] rows): the answer's per-token log-probs after each rationale, for the
    other rewards (`self_rewards`), which replace the two sums above. no_rationale ([N/k, A]
    rows, one per question): the answer's log-probs right after the question, for
    `cfg.reward_baseline="no_rationale"`: R' = max(0, R - R(empty)), R(empty) of a question
    taken from each of its k rows.

    Computed over the whole batch because the non-stop penalty's mean and the RLOO groups span
    it; the gradient pass may then run in micro-batches (`surrogate_loss`).
    Returns (advantages [N], rewards r [N], metrics of [] float32): reward_* are of r (after the
    non-stop penalty and KL); answer_reward_mean is of the self-reward R' (R without a
    baseline) before the non-stop penalty; no_rationale_reward_mean (with the baseline) of
    R(empty); kl_mean is mean(log pi(z|x) - log pi_0(z|x)).
    """
    n = policy_rationale_logprob_sums.shape[0]
    chex.assert_shape([policy_rationale_logprob_sums, ref_rationale_logprob_sums, answer_logprob_sums, finished], (n,))
    if cfg.reward == "logprob":
        if cfg.reference_compat and last_context_logprob is None:
            raise ValueError(
                "ObjectiveConfig.reference_compat=True needs last_context_logprob [N]: the log-prob of the "
                "token before the answer, which the released code's R includes"
            )
        raw_rewards = answer_logprob_sums.astype(jnp.float32)
        if cfg.reference_compat:
            chex.assert_shape(last_context_logprob, (n,))
            raw_rewards = raw_rewards + last_context_logprob.astype(jnp.float32)
    else:
        if answer_logprobs is None:
            raise ValueError(
                f"ObjectiveConfig.reward={cfg.reward!r} needs answer_logprobs: the answer's per-token log-probs [N, A]"
            )
        chex.assert_axis_dimension(answer_logprobs.logprobs, 0, n)
        raw_rewards = self_rewards(cfg, answer_logprobs)
    baseline_metrics = {}
    if cfg.reward_baseline == "no_rationale":
        if no_rationale is None or no_rationale.logprobs.shape[0] * k != n:
            raise ValueError(
                "ObjectiveConfig.reward_baseline='no_rationale' needs no_rationale: the answer's per-token log-probs "
                f"right after each of the N/k = {n}/{k} questions"
            )
        empty = jax.lax.stop_gradient(self_rewards(cfg, no_rationale))
        # The clip makes the baseline count: a question's constant alone cancels in RLOO.
        raw_rewards = jnp.maximum(raw_rewards - jnp.repeat(empty, k), 0.0)
        baseline_metrics["no_rationale_reward_mean"] = jnp.mean(empty)
    raw_rewards = jax.lax.stop_gradient(raw_rewards)
    policy_logprob = jax.lax.stop_gradient(policy_rationale_logprob_sums.astype(jnp.float32))
    ref_logprob = jax.lax.stop_gradient(ref_rationale_logprob_sums.astype(jnp.float32))

    rewards = answer_rewards(raw_rewards, finished, cfg.nonstop_coef, cfg.nonstop_group * k)
    penalised = kl_penalised_rewards(rewards, policy_logprob, ref_logprob, cfg.beta)
    advantages = rloo_advantages(penalised, k)
    metrics = {
        "reward_mean": jnp.mean(penalised),
        "reward_std": jnp.std(penalised),
        "answer_reward_mean": jnp.mean(raw_rewards),
        "kl_mean": jnp.mean(policy_logprob - ref_logprob),
        "advantage_mean": jnp.mean(advantages),
        "advantage_std": jnp.std(advantages),
        "advantage_min": jnp.min(advantages),
        "advantage_max": jnp.max(advantages),
        "finished_fraction": jnp.mean(finished.astype(jnp.float32)),
        **baseline_metrics,
    }
    return advantages, penalised, metrics


def surrogate_loss(
    cfg: ObjectiveConfig,
    advantages: jax.Array,
    rationale_logprobs: jax.Array,
    rationale_mask: jax.Array,
    answer_logprobs: jax.Array,
    answer_mask: jax.Array,
    num_rows: int | None = None,
    last_context_logprobs: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The differentiable loss over some rows of a rollout batch, given their constant advantages.

    advantages [M]; rationale_logprobs [M, L], answer_logprobs [M, A]: per-token log pi from the
    policy forward over x+z+y (differentiable); masks select the tokens of z and of y.
    loss = sum(-A * log pi(z|x)) / num_rows + sft_coef * sum(-log pi(y|x+z)) / num_rows, so that
    micro-batches of one batch of `num_rows` rows (default M) add up to the batch's mean loss.
    last_context_logprobs [M] (differentiable): log pi of the token before the answer (the last
    rationale token, or the last prompt token if z is empty). With `cfg.reference_compat` the SFT
    term adds it to each row's sum, as the released code does: sum(-(log pi(y|x+z) +
    last_context)) / num_rows. Unused otherwise, and when None the SFT term is the answer's alone.
    Returns (loss [], {"pg_loss", "sft_loss"}: the two terms unweighted, without gradient).
    """
    m = rationale_logprobs.shape[0]
    chex.assert_rank([rationale_logprobs, answer_logprobs], 2)
    chex.assert_equal_shape([rationale_logprobs, rationale_mask])
    chex.assert_equal_shape([answer_logprobs, answer_mask])
    chex.assert_shape(advantages, (m,))
    num_rows = m if num_rows is None else num_rows
    rationale_logprob = masked_sum(rationale_logprobs.astype(jnp.float32), rationale_mask)  # [M], with gradient
    answer_logprob = masked_sum(answer_logprobs.astype(jnp.float32), answer_mask)  # [M], with gradient
    if cfg.reference_compat and last_context_logprobs is not None:
        chex.assert_shape(last_context_logprobs, (m,))
        answer_logprob = answer_logprob + last_context_logprobs.astype(jnp.float32)
    pg_loss = jnp.sum(-jax.lax.stop_gradient(advantages) * rationale_logprob) / num_rows
    sft_loss = jnp.sum(-answer_logprob) / num_rows
    terms = {"pg_loss": jax.lax.stop_gradient(pg_loss), "sft_loss": jax.lax.stop_gradient(sft_loss)}
    return pg_loss + cfg.sft_coef * sft_loss, terms
