"""A jitted KV-cache sampler: one prefill per prompt, then a `lax.while_loop` of one-token steps.

- Prompts are left-padded to a length bucket, so a run compiles one program per
  (prompt bucket, generation bucket, batch) however its prompt lengths vary.
- The K samples of a prompt share its prefill: the prompt's cache is computed once and repeated
  K times along the batch.
- A decode step attends over the whole cache it is given, so the cache grows with the generation:
  the loop runs in up to MAX_SEGMENTS segments (`decode_segments`), each with a cache just long
  enough for it, and a step's cost follows the tokens generated so far, not the generation
  bucket or the room kept after it (`cache_room`, added once the loop ends). Each segment is its
  own loop in the program, so the decode step is compiled once per segment.
- Each row stops at its first stop token or stop sequence (matched as token sequences on the
  generated tokens); the returned rationale excludes the stop and everything after it, and the
  row is marked finished. The loop ends as soon as every row has stopped.
- Log-probs of the sampled tokens are under the model's own distribution (temperature 1, no
  top-k/top-p), which is log pi(z|x) for LaTRO's default T=1 sampling.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from latro_jax.config import ModelConfig
from latro_jax.model import KVCache, grow_cache, hidden_states, init_cache, lm_head_weight, positions_from_mask
from latro_jax.sharding import mesh_of, place_rows

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
MAX_SEGMENTS = 4  # decode loops a generation is split into, each with its own cache length
MIN_SEGMENT = 32  # steps: a shorter generation is one loop


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample. Hashable: it is a static argument of the jitted loop.

    temperature 0 is greedy. top_k 0 and top_p 1.0 disable those filters.
    stop_token_ids: EOS ids and end-of-turn tokens. stop_sequences: token-id sequences (each
    tokenization of each stop string). cache_room: extra cache slots kept after the
    generation, for continuing the cache with the answer tokens.
    """

    max_new_tokens: int = 500
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_samples: int = 1
    stop_token_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    pad_token_id: int = 0
    prompt_buckets: tuple[int, ...] = DEFAULT_BUCKETS
    length_buckets: tuple[int, ...] = DEFAULT_BUCKETS
    cache_room: int = 0

    def __post_init__(self):
        checks = {
            "max_new_tokens": self.max_new_tokens >= 1,
            "temperature": self.temperature >= 0,
            "top_k": self.top_k >= 0,
            "top_p": 0 < self.top_p <= 1,
            "num_samples": self.num_samples >= 1,
            "stop_sequences": all(len(s) >= 1 for s in self.stop_sequences),
            "cache_room": self.cache_room >= 0,
        }
        for field, ok in checks.items():
            if not ok:
                raise ValueError(f"SamplingConfig.{field}={getattr(self, field)!r} is out of range")


class SampleOutput(NamedTuple):
    """tokens [N, L] (pad after `lengths`), lengths [N], finished [N], logprobs [N, L]
    (0 after `lengths`), with N = prompts x num_samples in prompt-major order (the K samples of
    prompt i are rows i*K .. i*K+K-1). cache holds prompt (left-padded to `prompt_slots`) and
    generation: generated token s of a row sits in slot prompt_slots + s. `prompt_lengths` [N]
    counts each row's real prompt tokens; `steps` is how many decode steps the loop ran."""

    tokens: jax.Array
    lengths: jax.Array
    finished: jax.Array
    logprobs: jax.Array
    prompt_lengths: jax.Array
    prompt_slots: int
    steps: jax.Array
    cache: KVCache


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n; past the largest, the next multiple of it."""
    for b in sorted(buckets):
        if n <= b:
            return b
    largest = max(buckets)
    return -(-n // largest) * largest


def decode_segments(steps: int) -> tuple[int, ...]:
    """The step counts at which the decode loop's segments end: the generation of `steps` tokens
    in at most MAX_SEGMENTS parts of at least MIN_SEGMENT steps (a multiple of 16), the last
    ending at `steps`. More segments read less of an empty cache and compile more loops."""
    size = max(MIN_SEGMENT, -(-steps // (MAX_SEGMENTS * 16)) * 16)
    return tuple(range(size, steps, size)) + (steps,)


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Set logits outside the top-k and outside the top-p nucleus to -inf. [N, V] -> [N, V]."""
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it < top_p.
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def categorical(rng: jax.Array, logits: jax.Array, block: int = 128) -> jax.Array:
    """One draw per row from softmax(logits) [N, V] -> [N] int32, by inverse CDF in two levels.

    `jax.random.categorical` draws Gumbel noise for every vocabulary entry (V random numbers a
    row per step: most of a CPU decode step at V=32k); this draws one uniform a row. It picks a
    block of `block` tokens with probability its mass, then a token inside the block by its
    cumulative mass. u is in (0, total], and each level takes the first entry whose cumulative
    mass reaches u, so a token of zero probability (filtered, or vocabulary padding) is never drawn.
    """
    n, vocab = logits.shape
    blocks = -(-vocab // block)
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    probs = jnp.pad(probs, ((0, 0), (0, blocks * block - vocab))).reshape(n, blocks, block)
    cumulative_blocks = jnp.cumsum(probs.sum(axis=-1), axis=-1)  # [N, blocks]
    u = (1.0 - jax.random.uniform(rng, (n,))) * cumulative_blocks[:, -1]
    chosen = jnp.minimum(jnp.sum(cumulative_blocks < u[:, None], axis=-1), blocks - 1)
    mass_before = jnp.take_along_axis(cumulative_blocks, jnp.maximum(chosen - 1, 0)[:, None], axis=-1)[:, 0]
    inside = jnp.cumsum(jnp.take_along_axis(probs, chosen[:, None, None], axis=1)[:, 0], axis=-1)  # [N, block]
    rest = jnp.minimum(u - jnp.where(chosen > 0, mass_before, 0.0), inside[:, -1])
    within = jnp.minimum(jnp.sum(inside < rest[:, None], axis=-1), block - 1)
    return (chosen * block + within).astype(jnp.int32)


def choose_tokens(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Next tokens [N] from float32 logits [N, V]."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return categorical(rng, filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p))


def _head(config: ModelConfig, params: nnx.State, x: jax.Array) -> jax.Array:
    """float32 logits [N, V] from last hidden states [N, D]."""
    head = lm_head_weight(config, params).astype(x.dtype)
    return jnp.einsum("nd,dv->nv", x, head, preferred_element_type=jnp.float32)


def _stop_table(sampling: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
    """Stop sequences right-aligned in an [S, M] table (-1 = matches anything), and their lengths."""
    seqs = sampling.stop_sequences or ((-1,),)
    width = max(len(s) for s in seqs)
    table = np.full((len(seqs), width), -1, np.int32)
    for i, s in enumerate(seqs):
        table[i, width - len(s) :] = s
    lengths = np.array([len(s) if sampling.stop_sequences else 0 for s in seqs], np.int32)
    return table, lengths


class _LoopState(NamedTuple):
    step: jax.Array  # [] tokens generated so far
    history: jax.Array  # [N, M + L] generated tokens after M slots of -2 (so stops never match the prompt)
    logprobs: jax.Array  # [N, L]
    lengths: jax.Array  # [N] rationale length once stopped, else L
    stopped: jax.Array  # [N]
    logits: jax.Array  # [N, V] logits for the next token
    cache: KVCache
    rng: jax.Array


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def sample_padded(
    config: ModelConfig,
    sampling: SamplingConfig,
    max_new_tokens: int,
    params: nnx.State,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    rng: jax.Array,
    limit: jax.Array,
) -> SampleOutput:
    """The compiled sampler. prompt_tokens, prompt_mask: [B, P], left-padded.

    `max_new_tokens` (static, a length bucket) sizes the buffers; `limit` (traced, <= it) is how
    many tokens a row may generate, so every limit within a bucket shares one program. Rows
    stop as described in the module docstring.
    """
    batch, prompt_slots = prompt_tokens.shape
    k = sampling.num_samples
    n = batch * k
    positions = positions_from_mask(prompt_mask)
    prefill_cache = init_cache(config, batch, prompt_slots)  # grown with the generation, below
    x, cache = hidden_states(config, params, prompt_tokens, positions, prompt_mask, prefill_cache)
    logits = _head(config, params, x[:, -1])
    # Shared prefill: each prompt's cache and last logits serve its K rows.
    cache, logits = jax.tree.map(lambda a: jnp.repeat(a, k, axis=0) if jnp.ndim(a) else a, (cache, logits))
    prompt_lengths = jnp.repeat(prompt_mask.sum(axis=1).astype(jnp.int32), k)

    stop_ids = jnp.asarray(sampling.stop_token_ids or (-1,), jnp.int32)
    table, seq_lengths = (jnp.asarray(a) for a in _stop_table(sampling))
    width = table.shape[1]

    def body(s: _LoopState) -> _LoopState:
        rng, key = jax.random.split(s.rng)
        token = choose_tokens(s.logits, key, sampling)
        logprob = jnp.take_along_axis(jax.nn.log_softmax(s.logits), token[:, None], axis=-1)[:, 0]
        history = jax.lax.dynamic_update_slice_in_dim(s.history, token[:, None], width + s.step, axis=1)
        window = jax.lax.dynamic_slice_in_dim(history, s.step + 1, width, axis=1)  # [N, M], ends at token
        seq_hit = jnp.all((table[None] == -1) | (window[:, None] == table[None]), axis=-1) & (seq_lengths > 0)
        # A hit ending at this step cuts the rationale where the (longest) matched sequence starts.
        cut_seq = s.step + 1 - jnp.max(jnp.where(seq_hit, seq_lengths, 0), axis=-1)
        token_hit = jnp.isin(token, stop_ids)
        cut = jnp.where(token_hit, s.step, cut_seq)
        newly = ~s.stopped & (token_hit | seq_hit.any(axis=-1))
        lengths = jnp.where(newly, cut, s.lengths)
        logprobs = jax.lax.dynamic_update_slice_in_dim(s.logprobs, logprob[:, None], s.step, axis=1)
        position = (prompt_lengths + s.step)[:, None]
        x, cache = hidden_states(config, params, token[:, None], position, None, s.cache)
        return _LoopState(
            s.step + 1, history, logprobs, lengths, s.stopped | newly, _head(config, params, x[:, 0]), cache, rng
        )

    def cond(s: _LoopState) -> jax.Array:
        return (s.step < limit) & ~jnp.all(s.stopped)

    init = _LoopState(
        step=jnp.zeros((), jnp.int32),
        history=jnp.full((n, width + max_new_tokens), -2, jnp.int32),
        logprobs=jnp.zeros((n, max_new_tokens), jnp.float32),
        lengths=jnp.full((n,), limit, jnp.int32),
        stopped=jnp.zeros((n,), bool),
        logits=logits,
        cache=cache,
        rng=rng,
    )
    final = init
    for end in decode_segments(max_new_tokens):
        final = final._replace(cache=grow_cache(final.cache, prompt_slots + end))
        final = jax.lax.while_loop(lambda s, end=end: cond(s) & (s.step < end), body, final)
    kept = jnp.arange(max_new_tokens)[None] < final.lengths[:, None]
    tokens = jnp.where(kept, final.history[:, width:], sampling.pad_token_id)
    return SampleOutput(
        tokens=tokens,
        lengths=final.lengths,
        finished=final.stopped,
        logprobs=jnp.where(kept, final.logprobs, 0.0),
        prompt_lengths=prompt_lengths,
        prompt_slots=prompt_slots,
        steps=final.step,
        cache=grow_cache(final.cache, prompt_slots + max_new_tokens + sampling.cache_room),
    )


def pad_prompts(prompts: Sequence[Sequence[int]], slots: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists into [B, slots] tokens and mask."""
    tokens = np.full((len(prompts), slots), pad_id, np.int32)
    mask = np.zeros((len(prompts), slots), bool)
    for i, p in enumerate(prompts):
        if len(p):
            tokens[i, slots - len(p) :] = p
            mask[i, slots - len(p) :] = True
    return tokens, mask


def sample(
    config: ModelConfig,
    params: nnx.State,
    prompts: Sequence[Sequence[int]],
    rng: jax.Array,
    sampling: SamplingConfig,
) -> SampleOutput:
    """Sample `sampling.num_samples` continuations of each prompt (lists of token ids, the same
    on every process of a multi-host run).

    Prompts are left-padded to a bucket of `sampling.prompt_buckets` and the generation length
    rounded up to a bucket of `sampling.length_buckets` (the loop still stops after
    `max_new_tokens`: rows still running then are cut there, unfinished). Outputs have
    `max_new_tokens` columns. On params laid out on a mesh, the prompts' rows are split over it.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("sample() needs at least one prompt, each with at least one token")
    slots = bucket(max(len(p) for p in prompts), sampling.prompt_buckets)
    tokens, mask = place_rows(mesh_of(params), pad_prompts(prompts, slots, sampling.pad_token_id))
    return sample_tokens(config, params, tokens, mask, rng, sampling)


def sample_tokens(
    config: ModelConfig,
    params: nnx.State,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    rng: jax.Array,
    sampling: SamplingConfig,
) -> SampleOutput:
    """`sample` of prompts already padded: prompt_tokens, prompt_mask [B, P], left-padded."""
    steps = bucket(sampling.max_new_tokens, sampling.length_buckets)
    limit = sampling.max_new_tokens
    static = dataclasses.replace(sampling, max_new_tokens=steps)  # one program per bucket
    out = sample_padded(config, static, steps, params, prompt_tokens, prompt_mask, rng, jnp.int32(limit))
    return out._replace(tokens=out.tokens[:, :limit], logprobs=out.logprobs[:, :limit])
