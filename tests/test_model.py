"""The Flax decoder against transformers' PyTorch models: logits, their gradients, and KV-cache
decoding.

Tolerances: max |logit difference| <= 1e-4 for transformers parity (f32 both sides, different
summation orders over 64-wide layers give ~1e-6); gradients within 1e-4 of the largest entry of
each weight's gradient (the same summation-order noise, relative); 1e-5 for cached vs uncached
decoding (same code, same order of operations up to the attention's reduction length)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_models import FAMILIES, VOCAB, convert, hf_logits, make_hf_model, mixed_batch, within_original_context
from latro_jax.config import ConfigError, ModelConfig
from latro_jax.convert.weights import flat_params, hf_tensor
from latro_jax.model import dense, forward, init_cache, init_params, positions_from_mask

forward_jit = jax.jit(forward, static_argnums=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(family, tmp_path):
    model = make_hf_model(family)
    config, params = convert(model, tmp_path)
    ids, mask, positions = mixed_batch()
    expected = hf_logits(model, ids, mask, positions)
    logits, _ = forward_jit(config, params, jnp.asarray(ids.numpy()), jnp.asarray(positions.numpy()),
                            jnp.asarray(mask.numpy().astype(bool)))
    real = mask.numpy().astype(bool)
    assert np.abs(np.asarray(logits) - expected)[real].max() <= 1e-4


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gradients_match_transformers(family, tmp_path):
    """The weights' gradients of a loss on the logits (a fixed random combination of the real
    positions' logits), against PyTorch's backward through the same transformers model: checks
    `dense`'s hand-written backward pass and every weight's layout in the gradient."""
    model = make_hf_model(family)
    config, params = convert(model, tmp_path)
    ids, mask, positions = mixed_batch()
    coefficients = torch.randn(*ids.shape, VOCAB, generator=torch.Generator().manual_seed(1)) * mask[..., None]
    hf_positions = positions.masked_fill(mask == 0, 1)
    (model(input_ids=ids, attention_mask=mask, position_ids=hf_positions).logits * coefficients).sum().backward()

    def loss(params):
        logits, _ = forward(config, params, jnp.asarray(ids.numpy()), jnp.asarray(positions.numpy()),
                            jnp.asarray(mask.numpy().astype(bool)))
        return jnp.sum(logits * jnp.asarray(coefficients.numpy()))

    grads = flat_params(jax.jit(jax.grad(loss))(params))
    for name, weight in model.named_parameters():
        ours = hf_tensor(config, grads, name)
        expected = weight.grad.numpy()
        assert ours.shape == expected.shape, name
        assert np.abs(ours - expected).max() <= 1e-4 * np.abs(expected).max(), name


@pytest.mark.parametrize("n, preferred", [(1, None), (2, None), (1, jnp.float32)])
def test_dense_backward_equals_autodiff(n, preferred):
    """`dense` (a tensordot with a hand-written backward) against autodiff of lax.dot_general,
    in float32 and with bfloat16 inputs and float32 outputs (the LM head's mixed precision)."""
    keys = jax.random.split(jax.random.key(0), 3)
    dtype = jnp.float32 if preferred is None else jnp.bfloat16
    x = jax.random.normal(keys[0], (3, 5, 6) if n == 1 else (3, 5, 4, 6), dtype)
    w = jax.random.normal(keys[1], x.shape[x.ndim - n:] + (7, 2), dtype)
    out_grad = jax.random.normal(keys[2], x.shape[: x.ndim - n] + (7, 2), jnp.float32)

    def reference(x, w):
        dims = ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ()))
        return jax.lax.dot_general(x, w, dims, preferred_element_type=preferred)

    out, vjp = jax.vjp(lambda x, w: dense(x, w, n, preferred), x, w)
    expected_out, expected_vjp = jax.vjp(reference, x, w)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected_out, np.float32))
    for ours, expected in zip(vjp(out_grad.astype(out.dtype)), expected_vjp(out_grad.astype(out.dtype))):
        assert ours.dtype == expected.dtype
        np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(expected, np.float32), rtol=1e-5, atol=1e-5)


def test_family_features_are_exercised():
    """The parity configs reach the code paths that differ between families."""
    ids, mask, positions = mixed_batch()
    longest = int(positions.max()) + 1
    phi = FAMILIES["phi3"]["rope_parameters"]
    assert longest > phi["original_max_position_embeddings"]  # LongRoPE's long factors
    assert FAMILIES["mistral"]["sliding_window"] < longest
    config = ModelConfig.from_hf(make_hf_model("qwen2").config.to_dict())
    assert config.tie_word_embeddings and config.qkv_bias
    assert ModelConfig.from_hf(make_hf_model("qwen3").config.to_dict()).qk_norm
    assert ModelConfig.from_hf(make_hf_model("llama").config.to_dict()).rope.type == "llama3"


def test_left_padding_does_not_change_logits():
    config = ModelConfig("llama", 64, 32, 48, 2, 4, 2, 8)
    params = init_params(config, seed=1)
    tokens = jnp.arange(3, 10)[None]
    plain, _ = forward_jit(config, params, tokens, jnp.arange(7)[None])
    padded_tokens = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), tokens], axis=1)
    mask = jnp.arange(10)[None] >= 3
    padded, _ = forward_jit(config, params, padded_tokens, positions_from_mask(mask), mask)
    np.testing.assert_allclose(padded[:, 3:], plain, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kv_cache_decoding_matches_full_forward(family, tmp_path):
    config, params = convert(make_hf_model(family, **within_original_context(family)), tmp_path)
    ids, mask, positions = mixed_batch(length=14)
    ids, mask, positions = (jnp.asarray(t.numpy()) for t in (ids, mask, positions))
    mask = mask.astype(bool)
    # Prompts: the first 6 slots (left padding in row 0); then 8 tokens decoded one at a time.
    # Every row is real from slot 6 on, as after a left-padded prompt.
    mask = mask.at[:, 6:].set(True)
    positions = positions_from_mask(mask)
    full, _ = forward_jit(config, params, ids, positions, mask)

    cache = init_cache(config, batch=ids.shape[0], max_len=16)
    step = jax.jit(forward, static_argnums=0)
    logits, cache = step(config, params, ids[:, :6], positions[:, :6], mask[:, :6], cache)
    decoded = [logits]
    for t in range(6, 14):
        logits, cache = step(config, params, ids[:, t : t + 1], positions[:, t : t + 1], mask[:, t : t + 1], cache)
        decoded.append(logits)
    decoded = jnp.concatenate(decoded, axis=1)
    np.testing.assert_allclose(np.asarray(decoded)[np.asarray(mask)], np.asarray(full)[np.asarray(mask)], atol=1e-5)
    assert int(cache.index) == 14


def test_unknown_model_type_is_named():
    with pytest.raises(ConfigError, match="'gpt2'"):
        ModelConfig.from_hf({"model_type": "gpt2"})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "'yarn'"),
        ({"mlp_bias": True}, "mlp_bias"),
    ],
)
def test_unsupported_options_are_named(change, message):
    config = {**make_hf_model("llama").config.to_dict(), **change}
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(config)
