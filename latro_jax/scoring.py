"""Token log-probabilities of given sequences: the scores LaTRO needs, log pi(z|x), log pi_0(z|x)
and the self-reward log pi(y|x+z).

Why chunked: full-vocabulary logits dominate memory. At Llama-3.1's vocabulary (128,256) one
float32 logits tensor for 16 rationales of 1,000 tokens is 8.2 GB, and a plain `log_softmax`
with its backward holds two or three such tensors. Here the decoder's final hidden
states ([batch, seq, hidden], small) are computed once, then the LM head is applied to
`chunk_size` positions at a time inside `jax.lax.scan`. Each chunk gathers the target token's
logit and subtracts the logsumexp (no log_softmax is formed), so only one chunk's logits,
[batch, chunk, vocab], and in the backward pass their gradient, are alive at a time. The chunk function is rematerialised (`jax.checkpoint`), so the backward pass
recomputes a chunk's logits instead of keeping every chunk's from the forward pass.

Logits are accumulated in float32 (`preferred_element_type`) whatever the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from latro_jax.config import ModelConfig
from latro_jax.model import KVCache, dense, hidden_states, lm_head_weight, positions_from_mask


LOGITS_BYTES = 2**30  # the most float32 logits one chunk computes at once (the whole batch, all devices)


def _chunk_logprobs(head: jax.Array, hidden: jax.Array, targets: jax.Array) -> jax.Array:
    """head [hidden, vocab]; hidden [batch, chunk, hidden]; targets [batch, chunk] -> [batch, chunk] f32."""
    logits = dense(hidden, head, 1, jnp.float32)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target_logits - jax.nn.logsumexp(logits, axis=-1)


def _next_token_logprobs(
    config: ModelConfig,
    params: nnx.State,
    hidden: jax.Array,
    tokens: jax.Array,
    attention_mask: jax.Array,
    chunk_size: int,
) -> jax.Array:
    """log p(tokens[:, t+1] | hidden[:, t]) for t in 0..seq-2 -> [batch, seq-1] float32.

    hidden [batch, seq, hidden]; tokens [batch, seq]; attention_mask [batch, seq] bool. Entries
    whose target or conditioning token is padding are 0.
    """
    batch, length = tokens.shape[0], tokens.shape[1] - 1
    # A short continuation is one small chunk, not one padded to chunk_size; a wide batch takes
    # fewer positions a chunk, so that one chunk's float32 logits stay within LOGITS_BYTES.
    chunk = max(1, min(chunk_size, length, LOGITS_BYTES // (4 * batch * config.vocab_size)))
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length
    # [num_chunks, batch, chunk, ...]: scan runs over the leading axis.
    x = jnp.pad(hidden[:, :-1], ((0, 0), (0, pad), (0, 0)))
    x = x.reshape(batch, num_chunks, chunk, -1).swapaxes(0, 1)
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, pad))).reshape(batch, num_chunks, chunk).swapaxes(0, 1)
    head = lm_head_weight(config, params).astype(hidden.dtype)
    chunk_fn = jax.checkpoint(_chunk_logprobs, prevent_cse=False)  # prevent_cse is unneeded under scan

    def body(_, chunk_inputs):
        return None, chunk_fn(head, *chunk_inputs)

    _, logprobs = jax.lax.scan(body, None, (x, targets))
    logprobs = logprobs.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :length]
    scored_mask = attention_mask[:, 1:] & attention_mask[:, :-1]
    return jnp.where(scored_mask, logprobs, 0.0)


def token_logprobs(
    config: ModelConfig,
    params: nnx.State,
    tokens: jax.Array,
    attention_mask: jax.Array,
    positions: jax.Array | None = None,
    chunk_size: int = 128,
    score_from: int = 1,
) -> jax.Array:
    """Per-token log-probabilities of `tokens` under the model: [batch, seq] float32.

    tokens [batch, seq] int; attention_mask [batch, seq] (True = real token; rows may be left- or
    right-padded); positions [batch, seq], default `positions_from_mask(attention_mask)`.
    Entry t is log p(tokens[:, t] | tokens[:, :t]). It is 0 where nothing real precedes the token
    (column 0, the first real token of a left-padded row) and on padding, so sums over a mask
    such as `rationale_mask` count real predictions only. Differentiable w.r.t. params.
    `chunk_size` (static) is the most positions whose logits exist at once (fewer when the batch
    times `chunk_size` positions of logits would exceed LOGITS_BYTES). `score_from`
    (static) skips the LM head for targets before that slot (their entries are 0): LaTRO needs
    no log-probs of the prompt, often half the sequence.
    """
    attention_mask = attention_mask.astype(bool)
    if positions is None:
        positions = positions_from_mask(attention_mask)
    hidden, _ = hidden_states(config, params, tokens, positions, attention_mask)
    start = score_from - 1  # the hidden state at slot t predicts the token at t + 1
    logprobs = _next_token_logprobs(
        config, params, hidden[:, start:], tokens[:, start:], attention_mask[:, start:], chunk_size
    )
    return jnp.pad(logprobs, ((0, 0), (score_from, 0)))


def masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum over the sequence of `values` [batch, seq] where `mask` [batch, seq] is true -> [batch]."""
    return jnp.sum(jnp.where(mask.astype(bool), values, 0.0), axis=-1)


def continuation_logprobs(
    config: ModelConfig,
    params: nnx.State,
    cache: KVCache,
    tokens: jax.Array,
    positions: jax.Array,
    attention_mask: jax.Array,
    chunk_size: int = 128,
) -> tuple[jax.Array, KVCache]:
    """Scores new tokens after a cached context: ([batch, A-1] float32, the extended cache).

    tokens, positions, attention_mask: [batch, A]. tokens[:, 0] is the context's last token,
    fed again (at its own position) so that its hidden state predicts tokens[:, 1]; entry i of
    the result is log p(tokens[:, i+1] | context, tokens[:, :i+1]), 0 where tokens[:, i+1] is
    padding. The answer reward log pi(y | x+z) is this summed over the answer, continuing the
    sampler's cache instead of re-encoding x+z.

    Cache contract: the new tokens attend only to cached slots at positions before
    positions[:, 0]. Slots at or after it, the earlier copy of the re-fed token and anything a row
    sampled past its cut, are marked empty (position -1) here, per row, and stay so in the
    returned cache. The cache needs A free slots: cache.index + A <= max_len.
    """
    attention_mask = attention_mask.astype(bool)
    before_refed = cache.positions < positions[:, :1]
    cache = cache._replace(positions=jnp.where(before_refed, cache.positions, -1))
    hidden, cache = hidden_states(config, params, tokens, positions, attention_mask, cache)
    return _next_token_logprobs(config, params, hidden, tokens, attention_mask, chunk_size), cache
