"""A decoder-only transformer of the Llama family in Flax NNX, and its pure forward function.

Every parameter is an `nnx.Param` whose `out_sharding` metadata holds logical axis names
(`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`); `latro_jax.sharding` maps them to
mesh axes. With no mesh the names are inert and the model runs on one device.

The library works on the split form: `graphdef, params = nnx.split(model)` once, outside jit;
`forward(config, params, ...)` merges inside, so params are an ordinary pytree argument.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from latro_jax.config import ModelConfig
from latro_jax.rope import apply_rotary, rotary_tables
from latro_jax.sharding import CACHE_KV, CACHE_POSITIONS, HIDDEN, constrain, param_shardings

# Logical axis names, one per array dimension, for each kind of weight.
AXES = {
    "embedding": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "norm": ("embed",),
    "head_norm": ("head_dim",),
    "q_proj": ("embed", "heads", "head_dim"),
    "kv_proj": ("embed", "kv_heads", "head_dim"),
    "q_bias": ("heads", "head_dim"),
    "kv_bias": ("kv_heads", "head_dim"),
    "o_proj": ("heads", "head_dim", "embed"),
    "o_bias": ("embed",),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
}


def _param(rngs: nnx.Rngs, shape, axes: str, dtype, init: str = "normal") -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, out_sharding=AXES[axes])


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, axes: str, *, dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = _param(rngs, (dim,), axes, dtype, init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = _param(rngs, (d, h, hd), "q_proj", dtype)
        self.k_proj = _param(rngs, (d, kv, hd), "kv_proj", dtype)
        self.v_proj = _param(rngs, (d, kv, hd), "kv_proj", dtype)
        self.o_proj = _param(rngs, (h, hd, d), "o_proj", dtype)
        if cfg.qkv_bias:
            self.q_bias = _param(rngs, (h, hd), "q_bias", dtype, init="zeros")
            self.k_bias = _param(rngs, (kv, hd), "kv_bias", dtype, init="zeros")
            self.v_bias = _param(rngs, (kv, hd), "kv_bias", dtype, init="zeros")
        if cfg.o_bias:
            self.o_bias = _param(rngs, (d,), "o_bias", dtype, init="zeros")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, "head_norm", dtype=dtype, rngs=rngs)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, "head_norm", dtype=dtype, rngs=rngs)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.gate_proj = _param(rngs, (cfg.hidden_size, cfg.intermediate_size), "up_proj", dtype)
        self.up_proj = _param(rngs, (cfg.hidden_size, cfg.intermediate_size), "up_proj", dtype)
        self.down_proj = _param(rngs, (cfg.intermediate_size, cfg.hidden_size), "down_proj", dtype)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "norm", dtype=dtype, rngs=rngs)
        self.attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "norm", dtype=dtype, rngs=rngs)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)


class Transformer(nnx.Module):
    """Parameters of the decoder. Computation lives in `forward`, a pure function."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.param_dtype)
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), "embedding", dtype)
        self.layers = nnx.List([Block(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "norm", dtype=dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), "lm_head", dtype)


def _build(config: ModelConfig, seed: int) -> Transformer:
    # Logical axis names are metadata for latro_jax.sharding; no mesh is needed to build.
    with nnx.use_eager_sharding(False):
        return Transformer(config, rngs=nnx.Rngs(seed))


def init_params(config: ModelConfig, seed: int = 0, mesh: jax.sharding.Mesh | None = None) -> nnx.State:
    """Randomly initialised params (normal, std 0.02; norms 1, biases 0).

    With a `mesh`, each array is created in its shards (`sharding.param_shardings`) by one jitted
    init: no device ever holds a whole copy. The draws are those without a mesh, up to float32
    rounding (jit fuses the scaling).
    """
    if mesh is None:
        return nnx.state(_build(config, seed))
    shardings = param_shardings(mesh, abstract_params(config))
    return jax.jit(lambda: nnx.state(_build(config, seed)), out_shardings=shardings)()


def abstract_params(config: ModelConfig) -> nnx.State:
    """The params' structure as `jax.ShapeDtypeStruct`s (with metadata); allocates nothing."""
    return nnx.state(nnx.eval_shape(lambda: _build(config, 0)))


@functools.lru_cache(maxsize=None)
def graphdef(config: ModelConfig) -> nnx.GraphDef:
    # Built outside any mesh: under one, flax would place the abstract params by their logical
    # axis names, which are not mesh axes. The graphdef holds no arrays, so no mesh applies.
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        return nnx.split(nnx.eval_shape(lambda: _build(config, 0)))[0]


class KVCache(NamedTuple):
    """Keys and values of past tokens.

    k, v: one [batch, kv_heads, max_len, head_dim] array per layer: heads before slots, so the
    attention contractions read the cache in place (a [batch, max_len, kv_heads, ...] layout makes
    XLA transpose the whole cache of every layer at every decode step).
    positions: [batch, max_len] int32, the position of the token in each slot; -1 = empty or padding.
    index: [] int32, the next slot to write (all rows write the same slot: prompts are padded); the
    Python int 0 in a fresh cache (`init_cache`), so that the first forward (a prefill) knows at
    trace time that nothing is cached and attends over its own tokens only.
    Callers size max_len for everything they will write: a write past the end is clamped by
    XLA (it would overwrite the last slots), so the sampler allocates prompt + generation + room.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    positions: jax.Array
    index: jax.Array


def init_cache(config: ModelConfig, batch: int, max_len: int) -> KVCache:
    shape = (batch, config.num_kv_heads, max_len, config.head_dim)
    dtype = jnp.dtype(config.dtype)
    return KVCache(
        k=tuple(constrain(jnp.zeros(shape, dtype), CACHE_KV) for _ in range(config.num_layers)),
        v=tuple(constrain(jnp.zeros(shape, dtype), CACHE_KV) for _ in range(config.num_layers)),
        positions=constrain(jnp.full((batch, max_len), -1, jnp.int32), CACHE_POSITIONS),
        index=0,
    )


def grow_cache(cache: KVCache, max_len: int) -> KVCache:
    """The cache with empty slots appended up to `max_len` (a copy, made one layer at a time: each
    layer's old arrays are dead once copied)."""
    extra = max_len - cache.positions.shape[1]
    grow = functools.partial(jnp.pad, pad_width=((0, 0), (0, 0), (0, extra), (0, 0)))
    return cache._replace(
        k=tuple(constrain(grow(k), CACHE_KV) for k in cache.k),
        v=tuple(constrain(grow(v), CACHE_KV) for v in cache.v),
        positions=constrain(jnp.pad(cache.positions, ((0, 0), (0, extra)), constant_values=-1), CACHE_POSITIONS),
    )


def _contract(a: jax.Array, b: jax.Array, a_dims, b_dims, preferred) -> jax.Array:
    """a and b contracted over a_dims and b_dims; the free dims in order, a's then b's."""
    return jax.lax.dot_general(a, b, ((tuple(a_dims), tuple(b_dims)), ((), ())), preferred_element_type=preferred)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dense(x: jax.Array, w: jax.Array, n: int = 1, preferred=None) -> jax.Array:
    """A projection: x's last `n` dims contracted with w's first `n`, [..., in...] x [in..., out...]
    -> [..., out...], in `preferred` (e.g. float32 logits) or the inputs' dtype.

    `jnp.tensordot` with a backward pass written out: the same products autodiff forms, except
    that the weight's gradient is formed directly as [in..., out...] (x's rows contracted with the
    output gradient's). Autodiff forms [out..., in...] and transposes it, which XLA's CPU backend
    lays out as a transposed copy of the output gradient and a generic matmul about 2x slower
    than its own (the LM head's backward at vocabulary 32,000; the CPU bench's train step went
    from 0.73-0.95x to 1.11-1.17x transformers' speed). The products are autodiff's own, so
    GPUs and TPUs should not lose; there the two forms have not been compared.
    """
    return _contract(x, w, range(x.ndim - n, x.ndim), range(n), preferred)


def _dense_fwd(x, w, n, preferred):
    return dense(x, w, n, preferred), (x, w)


def _dense_bwd(n, preferred, residuals, g):
    x, w = residuals
    batch = x.ndim - n
    dx = _contract(g, w, range(batch, g.ndim), range(n, w.ndim), preferred).astype(x.dtype)
    dw = _contract(x, g, range(batch), range(batch), preferred).astype(w.dtype)
    return dx, dw


dense.defvjp(_dense_fwd, _dense_bwd)


def _saved(projection: jax.Array) -> jax.Array:
    """A projection's output that `remat="projections"` keeps for the backward pass. With these
    (q, k, v, o, gate, up) the backward pass recomputes only the attention scores, norms, rotary
    and activation, not a matmul against a weight: the down projection's output is not needed
    (its gradient is the residual stream's) and its input is silu(gate) * up."""
    return checkpoint_name(projection, "projection")


_REMAT_POLICIES = {"full": None, "projections": jax.checkpoint_policies.save_only_these_names("projection")}


def _remat(config: ModelConfig, layer_fn, **checkpoint_args):
    """A layer's function as `config.remat` asks the backward pass to treat it (config.REMAT_MODES)."""
    if config.remat == "none":
        return layer_fn
    return jax.checkpoint(layer_fn, policy=_REMAT_POLICIES[config.remat], **checkpoint_args)


def _allowed(q_pos: jax.Array, k_pos: jax.Array, window) -> jax.Array:
    """Which keys each query may attend to: [B, T, S] from q_pos [B, T] and k_pos [B, S] (-1 =
    empty or padding). `window`: None = full attention; a layer's traced int under a scan (0 = full)."""
    allowed = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])
    if isinstance(window, jax.Array):
        allowed &= (window <= 0) | (k_pos[:, None, :] > q_pos[:, :, None] - window)
    elif window is not None:
        allowed &= k_pos[:, None, :] > q_pos[:, :, None] - window
    return allowed


def _attend(q, k, v, q_pos, k_pos, window) -> jax.Array:
    """q: [B, T, H, D]; k, v: [B, KV, S, D]; q_pos [B, T], k_pos [B, S] -> [B, T, H, D]."""
    b, t, h, d = q.shape
    kv = k.shape[1]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * (d**-0.5)
    scores = jnp.where(_allowed(q_pos, k_pos, window)[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def _attend_fused(q, k, v, q_pos, window, implementation: str) -> jax.Array:
    """`jax.nn.dot_product_attention` of a whole sequence over itself (no cache): q [B, T, H, D],
    k, v [B, T, KV, D] -> [B, T, H, D]. The mask holds the padding, causality and window (by
    positions, as `_attend`); cuDNN takes it as an additive bias."""
    mask = _allowed(q_pos, q_pos, window)[:, None]  # [B, 1, T, T]: the same for every head
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def _attention_block(attn: Attention, cfg: ModelConfig, x, cos, sin, q_pos, k_pos, cache_kv, index, window):
    """A layer's attention: its output and its cache entry, (k, v) with this call's tokens written
    at `index` (None without a cache). A Python int `index` of 0 is a fresh cache (`init_cache`):
    the tokens attend over themselves, as without a cache; otherwise over the cache's filled slots."""
    dtype = x.dtype
    q = _saved(dense(x, attn.q_proj[...].astype(dtype)))
    k = _saved(dense(x, attn.k_proj[...].astype(dtype)))
    v = _saved(dense(x, attn.v_proj[...].astype(dtype)))
    if cfg.qkv_bias:
        q = q + attn.q_bias[...].astype(dtype)
        k = k + attn.k_bias[...].astype(dtype)
        v = v + attn.v_bias[...].astype(dtype)
    if cfg.qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    new_k, new_v = k.swapaxes(1, 2), v.swapaxes(1, 2)  # [B, KV, T, D], the cache layout
    if cache_kv is not None:
        cache_kv = tuple(
            constrain(jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), index, axis=2), CACHE_KV)
            for c, new in zip(cache_kv, (new_k, new_v))
        )
    if cache_kv is not None and not isinstance(index, int):  # attend over everything cached
        out = _attend(q, cache_kv[0].astype(dtype), cache_kv[1].astype(dtype), q_pos, k_pos, window)
    elif cfg.attention == "cudnn":
        out = _attend_fused(q, k, v, q_pos, window, "cudnn")
    else:
        out = _attend(q, new_k, new_v, q_pos, q_pos, window)
    out = _saved(dense(out, attn.o_proj[...].astype(dtype), 2))
    if cfg.o_bias:
        out = out + attn.o_bias[...].astype(dtype)
    return out, cache_kv


def _mlp(mlp: MLP, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    gate = _saved(dense(x, mlp.gate_proj[...].astype(dtype)))
    up = _saved(dense(x, mlp.up_proj[...].astype(dtype)))
    return dense(jax.nn.silu(gate) * up, mlp.down_proj[...].astype(dtype))


def _compute_weights(weights: nnx.State, dtype, leading: tuple = ()) -> nnx.State:
    """A layer's matrices cast to the compute dtype on each device's shard (pinned to the params'
    own sharding, so an fsdp all-gather moves compute-dtype bytes); vectors (norms) as they are.
    `leading`: logical names of extra leading dimensions (the layer axis of stacked weights)."""
    axes = nnx.get_partition_spec(weights)
    return jax.tree.map(
        lambda w, a: constrain(w.astype(dtype), leading + tuple(a)) if w.ndim >= 2 + len(leading) else w, weights, axes
    )


def _fence(x: jax.Array, weights: nnx.State, dtype) -> tuple[jax.Array, nnx.State]:
    """A layer's weights in the compute dtype, released no earlier than the layer's input `x` (an
    optimization barrier), which asks XLA not to gather every layer's weights up front. XLA's CPU
    compiler appears not to honour it for scheduling (its plans still gather early), hence the
    scan of `_scan_layers` where no cache is needed. Pinned on both sides of the barrier, or
    sharding propagation may gather before it. An identity on the values."""
    x, weights = jax.lax.optimization_barrier((x, _compute_weights(weights, dtype)))
    return x, _compute_weights(weights, dtype)


def _decoder_layer(config: ModelConfig, window, layer_def, weights, x, cos, sin, q_pos, k_pos, cache_kv, index):
    """One layer: x + attention, then + MLP; the layer's cache entry (None without a cache).
    `window`: the layer's sliding window (None = full attention; a traced int, 0 = full)."""
    layer = nnx.merge(layer_def, weights)
    attn_out, cache_kv = _attention_block(
        layer.attn, config, layer.input_norm(x), cos, sin, q_pos, k_pos, cache_kv, index, window
    )
    x = x + attn_out
    return constrain(x + _mlp(layer.mlp, layer.post_attn_norm(x)), HIDDEN), cache_kv


def _split_weights() -> bool:
    """Whether the params are split over devices (a mesh with fsdp or tensor > 1): then the layers
    without a cache run as a scan. On one device the unrolled loop needs no stacked copy."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and any(mesh.shape.get(axis, 1) > 1 for axis in ("fsdp", "tensor"))


def _scan_layers(config: ModelConfig, layers, x, cos, sin, q_pos) -> jax.Array:
    """Every layer without a cache (training and scoring forwards) as one `lax.scan` over the
    layers' stacked weights: under fsdp each step gathers one layer's weights, so one layer's are
    alive at a time (an unrolled loop lets XLA gather them all up front); `config.remat` says what
    the backward pass recomputes (with "full", each layer from its input, the only activation kept)."""
    dtype = jnp.dtype(config.dtype)
    layer_def = nnx.split(layers[0])[0]
    weights = [_compute_weights(nnx.state(layer), dtype) for layer in layers]
    stacked = _compute_weights(jax.tree.map(lambda *w: jnp.stack(w), *weights), dtype, leading=(None,))
    windows = jnp.array([w or 0 for w in config.sliding_windows], jnp.int32)

    def body(x, layer):
        layer_weights, window = layer
        x, _ = _decoder_layer(config, window, layer_def, layer_weights, x, cos, sin, q_pos, q_pos, None, None)
        return x, None

    body = _remat(config, body, prevent_cse=False)  # prevent_cse is unneeded under scan
    x, _ = jax.lax.scan(body, x, (stacked, windows))
    return x


def hidden_states(
    config: ModelConfig,
    params: nnx.State,
    tokens: jax.Array,
    positions: jax.Array,
    attention_mask: jax.Array | None = None,
    cache: KVCache | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """The decoder up to the final norm: [batch, seq, hidden] in the compute dtype.

    tokens, positions: [batch, seq] int; attention_mask: [batch, seq] bool (True = real token),
    None = all real. With a cache the tokens are written at slots cache.index..index+seq and
    attend to everything cached before them.
    """
    model = nnx.merge(graphdef(config), params)
    dtype = jnp.dtype(config.dtype)
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, bool)
    q_pos = jnp.where(attention_mask, positions, -1).astype(jnp.int32)
    cos, sin = rotary_tables(config, jnp.maximum(q_pos, 0))

    if cache is None:
        k_pos = q_pos
    else:
        k_pos = jax.lax.dynamic_update_slice_in_dim(cache.positions, q_pos, cache.index, axis=1)

    # Under a mesh (no-ops without one): the table is gathered whole along embed first, since XLA
    # cannot gather batch-split rows from an fsdp-split table without replicating the result;
    # activations stay split over the batch, where XLA would split hidden like the fsdp-sharded
    # weights and all-reduce every norm.
    table = constrain(model.embed[...], ("vocab", None))
    x = constrain(table[tokens].astype(dtype), HIDDEN)  # gather, then cast: never the whole table
    if cache is None and _split_weights():
        return model.final_norm(_scan_layers(config, model.layers, x, cos, sin, q_pos)), None
    new_k, new_v = [], []
    for i, layer in enumerate(model.layers):
        layer_def, weights = nnx.split(layer)
        x, weights = _fence(x, weights, dtype)
        step = functools.partial(_decoder_layer, config, config.sliding_windows[i], layer_def)
        if cache is None:  # a training forward: what the backward pass recomputes
            step = _remat(config, step)
        cache_kv = None if cache is None else (cache.k[i], cache.v[i])
        x, cache_kv = step(weights, x, cos, sin, q_pos, k_pos, cache_kv, None if cache is None else cache.index)
        if cache is not None:
            new_k.append(cache_kv[0])
            new_v.append(cache_kv[1])
    x = model.final_norm(x)
    if cache is None:
        return x, None
    return x, KVCache(tuple(new_k), tuple(new_v), k_pos, jnp.asarray(cache.index + tokens.shape[1], jnp.int32))


def lm_head_weight(config: ModelConfig, params: nnx.State) -> jax.Array:
    """The output projection as [hidden, vocab] (the transposed embedding when tied)."""
    if config.tie_word_embeddings:
        return params["embed"][...].T
    return params["lm_head"][...]


def forward(
    config: ModelConfig,
    params: nnx.State,
    tokens: jax.Array,
    positions: jax.Array,
    attention_mask: jax.Array | None = None,
    cache: KVCache | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """Logits [batch, seq, vocab] in float32, and the updated cache (None without one)."""
    x, cache = hidden_states(config, params, tokens, positions, attention_mask, cache)
    head = lm_head_weight(config, params).astype(x.dtype)
    logits = dense(x, head, 1, jnp.float32)
    return logits, cache


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Positions 0.. of the real tokens in each row of a left- or right-padded batch; 0 on padding."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0) * mask
