"""Rotary position embeddings: default, linear, Llama 3.1 frequency scaling and Phi-3 LongRoPE.

Inverse frequencies depend only on the config, so they are computed once on the host in numpy
(float32, as transformers does) and enter the traced program as constants.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from latro_jax.config import ModelConfig, RopeConfig


def _base_inv_freq(rope: RopeConfig, dim: int) -> np.ndarray:
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (1.0 / (np.float32(rope.theta) ** exponents)).astype(np.float32)


def _llama3_inv_freq(rope: RopeConfig, inv_freq: np.ndarray) -> np.ndarray:
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def inv_frequencies(config: ModelConfig) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Returns (inv_freq, long_inv_freq or None, attention_factor); inv_freq is [rotary_dim/2].

    `long_inv_freq` is LongRoPE's set for contexts past `original_max_position_embeddings`.
    """
    rope, dim = config.rope, config.rotary_dim
    inv_freq = _base_inv_freq(rope, dim)
    if rope.type == "default":
        return inv_freq, None, 1.0
    if rope.type == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32), None, 1.0
    if rope.type == "llama3":
        return _llama3_inv_freq(rope, inv_freq), None, 1.0
    # longrope
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    powers = np.float32(rope.theta) ** exponents

    def scaled(factors):
        return (1.0 / (np.asarray(factors, np.float32) * powers)).astype(np.float32)

    attention_factor = rope.attention_factor
    if attention_factor is None:
        factor = rope.factor
        attention_factor = (
            1.0
            if factor <= 1.0
            else math.sqrt(1 + math.log(factor) / math.log(rope.original_max_position_embeddings))
        )
    return scaled(rope.short_factor), scaled(rope.long_factor), float(attention_factor)


def rotary_tables(config: ModelConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin for `positions` [batch, seq] -> two [batch, seq, rotary_dim] float32 arrays.

    LongRoPE follows transformers: the long factors apply to the whole call when its largest
    position reaches `original_max_position_embeddings`.
    """
    inv_freq, long_inv_freq, attention_factor = inv_frequencies(config)
    inv = jnp.asarray(inv_freq)
    if long_inv_freq is not None:
        use_long = jnp.max(positions) + 1 > config.rope.original_max_position_embeddings
        inv = jnp.where(use_long, jnp.asarray(long_inv_freq), inv)
    angles = positions.astype(jnp.float32)[..., None] * inv
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate the first rotary_dim features of x [batch, seq, heads, head_dim] (half-split layout)."""
    rot_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    half = rot_dim // 2
    rotated_half = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return jnp.concatenate([x_rot * cos + rotated_half * sin, x_pass], axis=-1)
