"""One optimizer step over rows: the optimizer and its schedule, the LaTRO and SFT row losses,
and the jitted update that accumulates the whole batch's gradient over micro-batches.

Params and AdamW state are float32 master weights (5e-7 steps vanish in bfloat16); the model
computes in the compute dtype. pi_0 of full fine-tuning is a copy in the compute dtype
(`reference_params`); a LoRA run's frozen base is stored in it (`policy_param_dtype`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from latro_jax.config import ModelConfig
from latro_jax.experiment import ModelSpec, OptimSpec
from latro_jax.objective import ObjectiveConfig, surrogate_loss
from latro_jax.scoring import masked_sum, token_logprobs
from latro_jax.sharding import micro_batches, to_host


def schedule(spec: OptimSpec, updates: int) -> optax.Schedule:
    """The learning rate at each applied update: linear decay to 0 after an optional linear warm-up."""
    decay = optax.linear_schedule(spec.learning_rate, 0.0, updates - spec.warmup_steps)
    if not spec.warmup_steps:
        return decay
    warmup = optax.linear_schedule(0.0, spec.learning_rate, spec.warmup_steps)
    return optax.join_schedules([warmup, decay], [spec.warmup_steps])


def make_optimizer(spec: OptimSpec, updates: int) -> optax.GradientTransformation:
    """AdamW on `schedule`; optional global-norm clipping."""
    adamw = optax.adamw(schedule(spec, updates), b1=spec.b1, b2=spec.b2, eps=spec.eps, weight_decay=spec.weight_decay)
    if spec.clip_norm:
        return optax.chain(optax.clip_by_global_norm(spec.clip_norm), adamw)
    return adamw


def applied_updates(opt_state) -> int:
    """How many updates the optimizer has applied (a skipped, non-finite one is not counted): the
    step its learning-rate schedule is at."""
    counts = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]
              if isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "count"]
    return int(to_host(counts[0]))


def latro_rows_loss(config, objective, num_rows, score_from, params, rows):
    """The surrogate loss of some rows of a Rollout (a micro-batch); the prompt fills the slots
    before `score_from`. With `objective.reference_compat` the SFT term also scores the token
    before the answer, the last prompt token (slot score_from - 1) when the rationale is empty."""
    compat = objective.reference_compat
    logprobs = token_logprobs(config, params, rows["tokens"], rows["attention_mask"],
                              score_from=max(score_from - 1, 1) if compat else score_from)
    last_context = masked_sum(logprobs, token_before(rows["answer_mask"])) if compat else None
    return surrogate_loss(
        objective, rows["advantages"], logprobs, rows["rationale_mask"], logprobs, rows["answer_mask"], num_rows,
        last_context,
    )


def token_before(answer_mask: jax.Array) -> jax.Array:
    """[M, S] bool: the slot right before each row's (contiguous) answer in `answer_mask` [M, S]."""
    following = jnp.pad(answer_mask[:, 1:].astype(bool), ((0, 0), (0, 1)))
    return following & ~answer_mask.astype(bool)


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


def commit(tree):
    """Each array committed to the device(s) it is on, as `update`'s outputs are: otherwise the
    second update sees different input shardings and compiles again."""
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding), tree)


def policy_param_dtype(model: ModelSpec) -> str:
    """The dtype a run keeps the policy's starting params in: float32 master weights for full
    fine-tuning; a LoRA run's frozen base (only the adapters train) in the compute dtype."""
    return model.dtype if model.lora_rank else "float32"


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
