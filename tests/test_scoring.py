"""The chunked log-prob scorer against transformers, against the plain unchunked computation, and
against itself when continuing a KV cache; plus a bound on its compiled memory.

Tolerances: 1e-5 absolute on log-probs and gradients. Both sides are float32 with the same
weights; log-probs here are about -5 (vocab 128) and only summation order differs (64-wide
matmuls, a 128-way logsumexp), which moves them by ~1e-6. Cached vs uncached uses the same code
up to the attention's reduction length, as in test_model.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_models import FAMILIES, VOCAB, convert, hf_logits, make_hf_model, mixed_batch
from latro_jax.config import ModelConfig
from latro_jax.model import abstract_params, forward, init_cache, positions_from_mask
from latro_jax.scoring import continuation_logprobs, masked_sum, token_logprobs

token_logprobs_jit = jax.jit(token_logprobs, static_argnames=("config", "chunk_size"))
continuation_jit = jax.jit(continuation_logprobs, static_argnames=("config", "chunk_size"))
forward_jit = jax.jit(forward, static_argnums=0)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (transformers model, config, params), converted once per module."""

    @functools.cache
    def get(family):
        model = make_hf_model(family)
        return (model, *convert(model, tmp_path_factory.mktemp(family)))

    return get


def as_jax(ids, mask, positions):
    return jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy().astype(bool)), jnp.asarray(positions.numpy())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_token_logprobs_match_transformers(family, converted):
    model, config, params = converted(family)
    ids, mask, positions = mixed_batch()
    logits = torch.from_numpy(hf_logits(model, ids, mask, positions))
    expected = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0].numpy()
    tokens, attention_mask, _ = as_jax(ids, mask, positions)
    # 11 scored positions in chunks of 5: three chunks, the last one padded.
    got = np.asarray(token_logprobs_jit(config, params, tokens, attention_mask, chunk_size=5))

    real = mask.numpy().astype(bool)
    scored = real[:, 1:] & real[:, :-1]
    assert got.shape == real.shape and got.dtype == np.float32
    np.testing.assert_allclose(got[:, 1:][scored], expected[scored], atol=1e-5)
    assert not got[:, 0].any() and not got[:, 1:][~scored].any()


def test_score_from_skips_only_the_prompt(converted):
    """score_from=k gives the full result's entries from slot k on, and 0 before."""
    _, config, params = converted("llama")
    tokens, attention_mask = (jnp.asarray(t.numpy()) for t in mixed_batch()[:2])
    attention_mask = attention_mask.astype(bool)
    full = np.asarray(token_logprobs_jit(config, params, tokens, attention_mask, chunk_size=5))
    for k in (1, 5, 9):
        part = np.asarray(jax.jit(token_logprobs, static_argnames=("config", "chunk_size", "score_from"))(
            config, params, tokens, attention_mask, chunk_size=5, score_from=k))
        np.testing.assert_allclose(part[:, k:], full[:, k:], atol=1e-6)
        assert (part[:, :k] == 0).all()


def test_masked_sum():
    values = jnp.array([[0.5, -1.0, 2.0, 4.0], [-3.0, 1.5, 0.25, 8.0]])
    rationale_mask = jnp.array([[True, False, True, False], [False, True, True, True]])
    np.testing.assert_array_equal(masked_sum(values, rationale_mask), [0.5 + 2.0, 1.5 + 0.25 + 8.0])


def plain_token_logprobs(config, params, tokens, attention_mask):
    """The unchunked reference: full log_softmax of the logits, gathered at the next token."""
    logits, _ = forward(config, params, tokens, positions_from_mask(attention_mask), attention_mask)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], axis=-1)[..., 0]
    scored = attention_mask[:, 1:] & attention_mask[:, :-1]
    return jnp.pad(jnp.where(scored, logprobs, 0.0), ((0, 0), (1, 0)))


def test_gradients_match_unchunked(converted):
    _, config, params = converted("llama")  # untied: embed and lm_head are separate weights
    tokens, attention_mask, _ = as_jax(*mixed_batch())
    rationale_mask = attention_mask & (jnp.arange(tokens.shape[1]) >= 5)

    def loss(params, scorer):
        return masked_sum(scorer(config, params, tokens, attention_mask), rationale_mask).sum()

    chunked = functools.partial(token_logprobs, chunk_size=4)
    value, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, chunked)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, plain_token_logprobs)

    np.testing.assert_allclose(value, ref_value, atol=1e-5)
    for grad in (grads["embed"], grads["layers"][0]["attn"]["q_proj"], grads["lm_head"]):
        grad = np.asarray(grad[...])
        assert np.isfinite(grad).all() and np.abs(grad).max() > 1e-3
    chex.assert_trees_all_close(grads, ref_grads, atol=1e-5, rtol=0)


MEMORY_CONFIG = ModelConfig(
    "llama", vocab_size=32000, hidden_size=64, intermediate_size=128, num_layers=1,
    num_heads=1, num_kv_heads=1, head_dim=64, max_position_embeddings=1024,
)


def grad_temp_bytes(batch: int, seq: int, chunk: int, vocab: int = MEMORY_CONFIG.vocab_size) -> int:
    """Scratch memory of the compiled gradient of a summed token_logprobs (abstract shapes only)."""
    config = MEMORY_CONFIG.replace(vocab_size=vocab)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    attention_mask = jax.ShapeDtypeStruct((batch, seq), jnp.bool_)

    def loss(params, tokens, attention_mask):
        logprobs = token_logprobs(config, params, tokens, attention_mask, chunk_size=chunk)
        return masked_sum(logprobs, attention_mask).sum()

    compiled = jax.jit(jax.grad(loss)).lower(abstract_params(config), tokens, attention_mask).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        pytest.skip(f"memory_analysis() is not available on {jax.default_backend()}")
    return stats.temp_size_in_bytes


def test_grad_memory_stays_below_one_logits_tensor():
    """The compiled gradient's scratch memory is a fraction of one f32 logits tensor.

    On XLA:CPU the head's backward holds two chunk-sized f32 buffers at once (the recomputed
    logits' softmax and a transposed copy for the head-gradient matmul), and the decoder keeps a
    few [batch, seq, seq] attention buffers. So the chunk is 1/32 of the sequence here: at 64
    positions (1/8) the total is ~0.4 of the full tensor (unchunked it is ~4 full tensors).
    """
    batch, seq = 8, 512
    temp = grad_temp_bytes(batch, seq, chunk=16)
    logits_bytes = batch * seq * MEMORY_CONFIG.vocab_size * 4
    print(f"grad temp memory {temp / 2**20:.1f} MiB; one f32 logits tensor {logits_bytes / 2**20:.1f} MiB")
    assert temp < logits_bytes / 4


def test_grad_memory_does_not_grow_with_sequence_times_vocab():
    """With the chunk fixed, doubling the sequence grows memory by the decoder's own activations
    (hidden states, [seq, seq] attention scores), the same at any vocabulary; the part that
    depends on the vocabulary must not grow with the sequence. Measured as the growth at
    vocab 32,000 minus the growth at vocab 512, against the logits of the added positions."""
    batch, chunk = 4, 32

    def growth(vocab):
        return grad_temp_bytes(batch, 256, chunk, vocab) - grad_temp_bytes(batch, 128, chunk, vocab)

    vocab_dependent = growth(MEMORY_CONFIG.vocab_size) - growth(512)
    extra_logits = batch * 128 * MEMORY_CONFIG.vocab_size * 4
    print(f"vocab-dependent growth from seq 128 to 256: {vocab_dependent / 2**20:.2f} MiB; "
          f"logits of the 128 added positions {extra_logits / 2**20:.1f} MiB")
    assert vocab_dependent < extra_logits / 20


def test_continuation_matches_full_sequence(converted):
    """Prompt (row 0 left-padded) prefilled, 4 rationale tokens decoded; rows then keep 0, 2 and
    4 of them, and the answer continues from each row's last kept token."""
    _, config, params = converted("llama")
    rng = np.random.default_rng(0)
    batch, prompt_slots, rationale_slots, answer_len = 3, 6, 4, 3
    prompt = rng.integers(3, VOCAB, (batch, prompt_slots))
    prompt_mask = np.ones((batch, prompt_slots), bool)
    prompt_mask[0, :2] = False
    rationale = rng.integers(3, VOCAB, (batch, rationale_slots))
    kept = np.array([0, 2, 4])
    answer = rng.integers(3, VOCAB, (batch, answer_len))
    answer_mask = np.ones((batch, answer_len), bool)
    answer_mask[1, 2:] = False  # right-padded answer

    prompt_lens = prompt_mask.sum(1)
    cache = init_cache(config, batch, prompt_slots + rationale_slots + 1 + answer_len)
    _, cache = forward_jit(config, params, jnp.asarray(prompt), positions_from_mask(jnp.asarray(prompt_mask)),
                           jnp.asarray(prompt_mask), cache)
    rationale_positions = prompt_lens[:, None] + np.arange(rationale_slots)
    _, cache = forward_jit(config, params, jnp.asarray(rationale), jnp.asarray(rationale_positions), None, cache)

    rows = range(batch)
    context = [np.concatenate([prompt[b][prompt_mask[b]], rationale[b, : kept[b]]]) for b in rows]
    refed = np.array([c[-1] for c in context])
    refed_positions = np.array([len(c) - 1 for c in context])
    tokens = np.concatenate([refed[:, None], answer], axis=1)
    positions = refed_positions[:, None] + np.arange(1 + answer_len)
    mask = np.concatenate([np.ones((batch, 1), bool), answer_mask], axis=1)
    got, new_cache = continuation_jit(config, params, cache, jnp.asarray(tokens), jnp.asarray(positions),
                                      jnp.asarray(mask), chunk_size=2)

    # Reference: each row's whole real sequence, right-padded, scored in one pass.
    full = [np.concatenate([c, answer[b][answer_mask[b]]]) for b, c in zip(rows, context)]
    width = max(map(len, full))
    full_tokens = np.zeros((batch, width), np.int64)
    full_mask = np.zeros((batch, width), bool)
    for b, seq in enumerate(full):
        full_tokens[b, : len(seq)], full_mask[b, : len(seq)] = seq, True
    reference = np.asarray(token_logprobs_jit(config, params, jnp.asarray(full_tokens), jnp.asarray(full_mask),
                                              chunk_size=4))
    expected = np.stack([reference[b, len(context[b]) : len(context[b]) + answer_len] for b in rows])
    expected[~answer_mask] = 0.0
    assert got.shape == (batch, answer_len) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)

    # The contract: the earlier copy of the re-fed token and the slots past each row's cut are
    # empty in the returned cache; the prompt and the kept rationale are untouched.
    slots = np.asarray(new_cache.positions)
    old = np.asarray(cache.positions)
    for b in rows:
        refed_slot = prompt_slots + kept[b] - 1
        assert (slots[b, refed_slot : prompt_slots + rationale_slots] == -1).all()
        np.testing.assert_array_equal(slots[b, :refed_slot], old[b, :refed_slot])
    assert int(new_cache.index) == prompt_slots + rationale_slots + 1 + answer_len
