"""LoRA: train low-rank adapters on the attention and MLP projections of a frozen base model.

Full fine-tuning keeps float32 params, their gradient and AdamW's two moments: 16 bytes per
parameter, ~130 GB for Llama-3.1-8B. With LoRA the base is frozen (and may be stored in
bfloat16) and only the adapters, ~0.5% of the parameters at rank 16, have a gradient and
optimizer state. The frozen base is also LaTRO's pi_0: no second copy of the model is kept for
the reference log-probs.

Each targeted weight W, stored as [in..., out...] (see `latro_jax.model.AXES`), gets

    W' = W + (alpha / rank) * A @ B,    A: [in..., rank], B: [rank, out...]

with B = 0 at initialisation, so the adapted model starts exactly equal to the base.

The adapters are applied as a params transform, `merge`, rather than inside the forward pass:
the model's pure functions (`model.forward`, `scoring.token_logprobs`, `sampling.sample`) then
run unchanged on `merge(lora, base, adapters)`. The sampler gets the merged weights once per
rollout (decoding is as fast as the base's), and the training loss merges inside
`jax.value_and_grad` so that the gradient flows to A and B only (`LoraRowsLoss`). The cost: the
merged copy of the targeted weights exists during the forward and backward passes, in the base's
dtype (~14 GB for Llama-3.1-8B in bfloat16; `tools/plan.py` counts it), and in a bfloat16 base a
delta smaller than a weight's rounding step (~0.4% of it) is rounded away in the forward pass
(the gradient still reaches the adapters).

Adapters are a plain pytree mirroring the params' paths, float32:
    {"layers": {i: {"attn": {"q_proj": {"a": A, "b": B}, ...}, "mlp": {"down_proj": ...}}}}
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from latro_jax.config import ModelConfig
from latro_jax.model import abstract_params

# Projection -> (its module in a layer, number of leading input dims of its weight).
TARGETS = {
    "q_proj": ("attn", 1),
    "k_proj": ("attn", 1),
    "v_proj": ("attn", 1),
    "o_proj": ("attn", 2),  # [heads, head_dim, embed]
    "gate_proj": ("mlp", 1),
    "up_proj": ("mlp", 1),
    "down_proj": ("mlp", 1),
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r and alpha (the delta is scaled by alpha / r); `targets`, the projections adapted in
    every layer (names of `TARGETS`). Hashable: a static argument of jitted functions."""

    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = tuple(TARGETS)

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"LoraConfig.rank={self.rank!r} is invalid; must be an int >= 1")
        if not isinstance(self.alpha, (int, float)) or not np.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoraConfig.alpha={self.alpha!r} is invalid; must be a finite number > 0")
        unknown = [t for t in self.targets if t not in TARGETS]
        if not self.targets or unknown or len(set(self.targets)) != len(self.targets):
            raise ValueError(
                f"LoraConfig.targets={self.targets!r} is invalid; must be distinct names from {', '.join(TARGETS)}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_config(model) -> LoraConfig | None:
    """The LoRA config an experiment's `ModelSpec` asks for (`lora_rank` > 0), else None."""
    return LoraConfig(model.lora_rank, model.lora_alpha) if model.lora_rank else None


def _adapted_weights(config: ModelConfig, lora: LoraConfig) -> list[tuple[tuple, int]]:
    """(path of an adapted weight in the params, e.g. ("layers", 0, "attn", "q_proj"), its number
    of input dims), in a fixed order."""
    return [
        (("layers", i, TARGETS[name][0], name), TARGETS[name][1])
        for i in range(config.num_layers)
        for name in lora.targets
    ]


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def adapter_shapes(config: ModelConfig, lora: LoraConfig) -> dict:
    """{"layers": {i: {module: {name: {"a": [in..., rank], "b": [rank, out...]}}}}} as shape
    tuples, read off the base weights' shapes (the model is the one description of them)."""
    base = nnx.to_pure_dict(abstract_params(config))
    shapes: dict = {}
    for path, in_dims in _adapted_weights(config, lora):
        w = base["layers"][path[1]][path[2]][path[3]].shape
        _set(shapes, path, {"a": (*w[:in_dims], lora.rank), "b": (lora.rank, *w[in_dims:])})
    return shapes


@functools.partial(jax.jit, static_argnums=(0, 1))
def init_adapters(config: ModelConfig, lora: LoraConfig, key: jax.Array) -> dict:
    """Float32 adapters: A ~ normal with variance 1 / (3 fan_in), PEFT's kaiming-uniform variance;
    B = 0, so that the adapted model equals the base."""
    shapes = adapter_shapes(config, lora)
    paths = [path for path, _ in _adapted_weights(config, lora)]
    a_shapes = [shapes["layers"][p[1]][p[2]][p[3]]["a"] for p in paths]
    # One draw sliced up: a random draw per shape costs a compile of the generator each (seconds).
    sizes = [int(np.prod(shape)) for shape in a_shapes]
    draws = jnp.split(jax.random.normal(key, (sum(sizes),), jnp.float32), np.cumsum(sizes)[:-1])
    adapters: dict = {}
    for path, shape, draw in zip(paths, a_shapes, draws):
        fan_in = int(np.prod(shape[:-1]))
        b = jnp.zeros(shapes["layers"][path[1]][path[2]][path[3]]["b"], jnp.float32)
        _set(adapters, path, {"a": draw.reshape(shape) / np.sqrt(3 * fan_in), "b": b})
    return adapters


def abstract_adapters(config: ModelConfig, lora: LoraConfig) -> dict:
    """The adapters as float32 `jax.ShapeDtypeStruct`s (for memory planning and checkpoint restore)."""
    return jax.tree.map(
        lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32),
        adapter_shapes(config, lora),
        is_leaf=lambda x: isinstance(x, tuple),
    )


def merge(lora: LoraConfig, base: nnx.State, adapters: dict) -> nnx.State:
    """The adapted params, W + (alpha / rank) A @ B for every adapted weight, in the base's dtype
    (the delta is added in float32). Differentiable w.r.t. the adapters; a plain params state, so
    it runs through every model function and exports like any params."""

    def adapted(path, weight):
        node = adapters
        for key in path:
            if not isinstance(key, jax.tree_util.DictKey):  # the Variable's `.value`
                break
            node = node.get(key.key, {})
        if "a" not in node:
            return weight
        delta = jnp.tensordot(node["a"], node["b"], axes=1) * lora.scale
        return (weight.astype(jnp.float32) + delta).astype(weight.dtype)

    return jax.tree.map_with_path(adapted, base)


merge_jit = jax.jit(merge, static_argnums=0)


@dataclasses.dataclass(frozen=True)
class LoraRowsLoss:
    """An `update.update` rows_loss over the adapters: `update(..., rows_loss=LoraRowsLoss(
    latro_rows_loss, lora), params=adapters, opt_state, rows, frozen=base)` differentiates
    `rows_loss` at the merged params w.r.t. the adapters only; the optimizer state covers the
    adapters only. Hashable by value, so a new instance does not recompile the update."""

    rows_loss: Callable
    lora: LoraConfig

    def __call__(self, config, objective, num_rows, score_from, adapters, rows, frozen):
        return self.rows_loss(config, objective, num_rows, score_from, merge(self.lora, frozen, adapters), rows)
