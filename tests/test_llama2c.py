"""llama2.c import against Karpathy's real stories260K model.

The reference is expected_greedy_t0.json beside the checkpoint: 256 greedy tokens from BOS that a
plain numpy forward with llama2.c's interleaved RoPE produced, decoding to the text Karpathy
documents for this model. Greedy decoding must match token for token (argmax, no tolerance).
"""

from __future__ import annotations

import functools
import json
import os
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from latro_jax.checkpoint import load_model
from latro_jax.config import ModelConfig
from latro_jax.convert.llama2c import (
    FLOAT,
    HEADER,
    HEADER_FIELDS,
    convert_llama2c,
    interleaved_to_half_split,
    load_llama2c,
    tensor_layout,
)
from latro_jax.convert.weights import WeightError
from latro_jax.model import forward, init_cache
from latro_jax.rope import apply_rotary, rotary_tables


@pytest.fixture(scope="module")
def stories(test_data):
    """The stories260K folder: checkpoint, tokenizer and expected greedy output."""
    path = os.path.join(test_data, "models", "stories260K")
    if not os.path.isdir(path):
        pytest.skip(f"stories260K not found at {path} (set LATRO_TEST_DATA to the shared/data folder)")
    return path


@pytest.fixture(scope="module")
def model(stories):
    return load_llama2c(os.path.join(stories, "stories260K.bin"))


@pytest.fixture(scope="module")
def expected(stories):
    with open(os.path.join(stories, "expected_greedy_t0.json")) as f:
        return json.load(f)


@functools.partial(jax.jit, static_argnums=0)
def greedy_step(config, params, token, position, cache):
    """token, position: [1, 1] -> the argmax next token [1, 1] and the updated cache."""
    logits, cache = forward(config, params, token, position, cache=cache)
    return jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32), cache


def greedy(config, params, first_token: int, steps: int) -> list[int]:
    """`first_token` at position 0, then each greedy token fed back through the KV cache."""
    cache = init_cache(config, batch=1, max_len=steps + 1)
    token = jnp.full((1, 1), first_token, jnp.int32)
    generated = []
    for position in range(steps):
        token, cache = greedy_step(config, params, token, jnp.full((1, 1), position, jnp.int32), cache)
        generated.append(token)
    return [int(t) for t in jnp.concatenate(generated, axis=1)[0]]


def test_greedy_decoding_matches_reference(model, expected):
    config, params = model
    assert expected["prompt_tokens"] == [config.bos_token_id] and expected["temperature"] == 0.0
    tokens = greedy(config, params, config.bos_token_id, expected["steps"])
    assert tokens == expected["generated_tokens"]


def test_greedy_tokens_decode_to_reference_text(stories, expected):
    import sentencepiece as spm

    tokenizer = spm.SentencePieceProcessor(model_file=os.path.join(stories, "tok512.model"))
    assert tokenizer.decode(expected["generated_tokens"]) == expected["decoded_text"]
    assert expected["decoded_text"].startswith("Once upon a time, there was a little girl named Lily.")


def test_row_permutation_turns_interleaved_rope_into_half_split():
    heads, head_dim, dim, position = 3, 8, 5, 7
    config = ModelConfig("llama", vocab_size=4, hidden_size=dim, intermediate_size=4, num_layers=1,
                         num_heads=heads, num_kv_heads=heads, head_dim=head_dim)
    weight = np.random.default_rng(0).normal(size=(heads * head_dim, dim)).astype(np.float32)
    x = np.random.default_rng(1).normal(size=(dim,)).astype(np.float32)

    # llama2.c run.c: rotate (q[2i], q[2i+1]) by position * theta^(-2i/head_dim)
    q = (weight @ x).reshape(heads, head_dim // 2, 2)
    angle = position * 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)
    cos, sin = np.cos(angle), np.sin(angle)
    rotated = np.stack([q[..., 0] * cos - q[..., 1] * sin, q[..., 0] * sin + q[..., 1] * cos], axis=-1)

    q_ours = (interleaved_to_half_split(weight, heads) @ x).reshape(1, 1, heads, head_dim)
    cos_ours, sin_ours = rotary_tables(config, jnp.full((1, 1), position))
    ours = np.asarray(apply_rotary(jnp.asarray(q_ours), cos_ours, sin_ours))[0, 0]
    # The same vectors, each head's features reordered evens-then-odds; attention scores are equal.
    np.testing.assert_allclose(ours, rotated.transpose(0, 2, 1).reshape(heads, head_dim), atol=1e-5)


def test_untied_classifier_is_read_from_the_end(tmp_path):
    header = (16, 24, 2, 4, 2, -32, 10)  # negative vocab_size: wcls [32, 16] follows the RoPE tables
    _, size = tensor_layout(dict(zip(HEADER_FIELDS, header)))
    floats = np.random.default_rng(0).normal(size=(size - len(header) * HEADER.itemsize) // FLOAT.itemsize)
    floats = floats.astype(FLOAT)
    path = tmp_path / "untied.bin"
    path.write_bytes(np.asarray(header, HEADER).tobytes() + floats.tobytes())
    config, params = load_llama2c(path)
    assert not config.tie_word_embeddings and config.vocab_size == 32
    np.testing.assert_array_equal(np.asarray(params["lm_head"][...]), floats[-32 * 16:].reshape(32, 16).T)
    np.testing.assert_array_equal(np.asarray(params["embed"][...]), floats[: 32 * 16].reshape(32, 16))


@pytest.mark.parametrize("change", ["truncated", "extra bytes"])
def test_wrong_size_file_raises_naming_it(stories, tmp_path, change):
    source = os.path.join(stories, "stories260K.bin")
    data = open(source, "rb").read()
    broken = tmp_path / "broken.bin"
    broken.write_bytes(data[:-100] if change == "truncated" else data + b"\0" * 4)
    with pytest.raises(WeightError, match=f"{re.escape(str(broken))}.*{len(data)}") as error:
        load_llama2c(broken)
    assert str(os.path.getsize(broken)) in str(error.value)


def test_convert_then_load_gives_the_same_params(stories, model, tmp_path):
    config, params = model
    tokenizer = os.path.join(stories, "tok512.model")
    convert_llama2c(os.path.join(stories, "stories260K.bin"), tmp_path / "ckpt", tokenizer_model=tokenizer)
    loaded_config, loaded = load_model(tmp_path / "ckpt")
    assert loaded_config == config
    chex.assert_trees_all_equal(nnx.to_pure_dict(loaded), nnx.to_pure_dict(params))
    with open(tmp_path / "ckpt" / "hf" / "tokenizer.model", "rb") as copied, open(tokenizer, "rb") as original:
        assert copied.read() == original.read()
