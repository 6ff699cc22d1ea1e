"""The decode loop at speed: a cache that grows with the generation, the fused-attention switch,
and what the compiler does with the weights inside the loop.

Tolerances: 1e-5 absolute on float32 log-probs, as the model's parity tests; the two sides differ
only in the order of float32 sums (~1e-7)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_on_devices
from hf_models import convert, make_hf_model
from latro_jax import hlo
from latro_jax import model as model_module
from latro_jax.config import ConfigError, ModelConfig
from latro_jax.experiment import ExperimentError, ModelSpec
from latro_jax.model import forward, init_params
from latro_jax.sampling import SamplingConfig, decode_segments, sample, sample_padded
from latro_jax.scoring import token_logprobs
from test_sampling import PROMPTS, hf_generate_greedy

NEW_TOKENS = 48  # two decode segments: (32, 48)
ROOM = 20


def test_decode_segments_split_long_generations():
    assert decode_segments(NEW_TOKENS) == (32, 48)
    assert decode_segments(16) == (16,)
    assert decode_segments(512) == (128, 256, 384, 512)  # the released recipe's bucket: 4 loops
    for steps in (1, 33, 100, 500, 1024):
        ends = decode_segments(steps)
        assert ends[-1] == steps and list(ends) == sorted(set(ends)) and len(ends) <= 4


# Phi-3 is left out: past its original context (32 positions here) LongRoPE switches factors for
# the whole sequence, and transformers' generate re-prefills; 48 new tokens go past it.
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_growing_cache_matches_transformers_and_the_full_forward(family, tmp_path):
    """Greedy tokens across two segments equal transformers' generate (Mistral's window of 5 is
    far shorter than the generation; 4 heads over 2 KV heads; left-padded prompts), and sampled
    tokens' log-probs equal a forward over the whole sequence without a cache."""
    hf_model = make_hf_model(family)
    config, params = convert(hf_model, tmp_path)
    greedy = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.0, cache_room=ROOM, length_buckets=(NEW_TOKENS,))
    out = sample(config, params, PROMPTS, jax.random.key(0), greedy)
    np.testing.assert_array_equal(np.asarray(out.tokens), hf_generate_greedy(hf_model, PROMPTS, NEW_TOKENS))

    k = 2
    sampled = sample(config, params, PROMPTS, jax.random.key(1),
                     SamplingConfig(max_new_tokens=NEW_TOKENS, num_samples=k, cache_room=ROOM,
                                    length_buckets=(NEW_TOKENS,)))
    width = max(map(len, PROMPTS))
    rows = [p for p in PROMPTS for _ in range(k)]
    tokens = np.array([[0] * (width - len(p)) + p for p in rows])
    mask = np.array([[False] * (width - len(p)) + [True] * len(p) for p in rows])
    tokens = np.concatenate([tokens, np.asarray(sampled.tokens)], axis=1)
    mask = np.concatenate([mask, np.ones(sampled.tokens.shape, bool)], axis=1)
    full = token_logprobs(config, params, jnp.asarray(tokens), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(sampled.logprobs), np.asarray(full)[:, width:], atol=1e-5)

    # The returned cache: prompt bucket + generation + room, the room empty for the answer.
    slots = sampled.cache.positions.shape[1]
    assert slots == sampled.prompt_slots + NEW_TOKENS + ROOM
    assert (np.asarray(sampled.cache.positions)[:, -ROOM:] == -1).all()
    assert int(sampled.cache.index) == sampled.prompt_slots + NEW_TOKENS


# ---- the attention switch ---------------------------------------------------------------------

CONFIG = ModelConfig("mistral", vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, sliding_windows=(4, None))


def test_attention_modes_are_validated():
    with pytest.raises(ConfigError, match="attention='flash'; allowed: xla, cudnn"):
        CONFIG.replace(attention="flash")
    with pytest.raises(ExperimentError, match="model.attention='flash' is invalid; allowed: xla, cudnn"):
        ModelSpec(attention="flash")


def test_fused_attention_path_equals_the_einsum_path(monkeypatch):
    """attention="cudnn" runs `jax.nn.dot_product_attention`; here its XLA implementation (the CPU
    has no cuDNN) stands in, so what is checked is this project's side of the call: layouts,
    grouped heads, the mask of left padding, causality and a sliding window. Logits, gradients
    and greedy samples (whose prefill takes the same path) equal the einsum path's."""
    fused = model_module._attend_fused
    calls = []

    def on_cpu(q, k, v, q_pos, window, implementation):
        calls.append(implementation)
        return fused(q, k, v, q_pos, window, "xla")

    monkeypatch.setattr(model_module, "_attend_fused", on_cpu)
    params = init_params(CONFIG, seed=3)
    rng = np.random.default_rng(0)
    mask = np.arange(12)[None] >= np.array([0, 3, 5])[:, None]  # left padding of 0, 3 and 5
    tokens = jnp.asarray(np.where(mask, rng.integers(1, 96, (3, 12)), 0))
    positions = jnp.asarray(np.maximum(np.cumsum(mask, 1) - 1, 0) * mask)
    mask = jnp.asarray(mask)

    def loss(params, config):
        logits, _ = forward(config, params, tokens, positions, mask)
        return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(logits), 0.0)), logits

    fused_config = CONFIG.replace(attention="cudnn")
    (_, expected), expected_grads = jax.value_and_grad(loss, has_aux=True)(params, CONFIG)
    (_, got), got_grads = jax.value_and_grad(loss, has_aux=True)(params, fused_config)
    assert calls and set(calls) == {"cudnn"}
    np.testing.assert_allclose(np.asarray(got)[np.asarray(mask)], np.asarray(expected)[np.asarray(mask)], atol=1e-5)
    for g, e in zip(jax.tree.leaves(got_grads), jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=1e-5)

    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)
    expected_tokens = sample(CONFIG, params, PROMPTS, jax.random.key(0), greedy).tokens
    got_tokens = sample(fused_config, params, PROMPTS, jax.random.key(0), greedy).tokens
    np.testing.assert_array_equal(np.asarray(got_tokens), np.asarray(expected_tokens))


# ---- the weights inside the compiled decode loop ----------------------------------------------

# bfloat16 compute over float32 params, as a full fine-tuning run samples: every weight is cast
# once per rollout. Widths chosen so that no activation or cache array has a weight's size.
LOOP_CONFIG = ModelConfig("llama", vocab_size=320, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=32, dtype="bfloat16")
LOOP_SAMPLING = SamplingConfig(max_new_tokens=48, num_samples=2, length_buckets=(48,), cache_room=4)


def _loop_report(params, prompts, mask, shards: int = 1) -> dict:
    """What the test asserts on, for one layout of the params: the loops' per-step weight work,
    and enough about the program to show the check is not vacuous."""
    text = hlo.decode_program(LOOP_CONFIG, LOOP_SAMPLING, params, prompts, mask)
    sizes = hlo.weight_sizes(params, shards)
    loop = hlo.loop_ops(text)
    return {
        "weight_work_in_loops": [op._asdict() for op in hlo.weight_work_in_loops(text, sizes, "bf16")],
        "loop_ops": len(loop),
        # Not vacuous: the program does cast the weights (and gather them, under fsdp), before the loops.
        "weight_work_in_program": len(hlo.weight_work_in_program(text, sizes, "bf16")),
        "loop_all_reduces": sum(op.opcode.startswith("all-reduce") for op in loop),
    }


def _prompts():
    mask = np.arange(8)[None] >= np.array([0, 3])[:, None]
    return jnp.asarray(np.where(mask, 7, 0), jnp.int32), jnp.asarray(mask)


def test_decode_loop_casts_no_weight_on_one_device():
    """A cast of a weight to the compute dtype inside the loop would repeat once per token what
    belongs before it (weights perturbed by the step, which XLA cannot hoist, make this test fail)."""
    params = init_params(LOOP_CONFIG)
    report = _loop_report(params, *_prompts())
    assert report["weight_work_in_loops"] == [], report
    # Every matrix but the embedding table (gathered by token, then cast) is cast whole.
    matrices = sum(x.ndim >= 2 for x in jax.tree.leaves(params))
    assert report["loop_ops"] > 100 and report["weight_work_in_program"] >= matrices - 1, report


def test_decode_loop_on_an_fsdp_mesh_keeps_weights_sharded():
    """On 8 simulated devices (fsdp=8): no weight all-gather and no weight cast inside the loop, the
    loop's collectives being all-reduces of activations; tokens equal the single-device sampler's.
    Run in a subprocess: XLA reads the device count once per process (see test_sharding)."""
    report = run_on_devices(__file__, 8)
    assert report["devices"] == 8 and report["q_proj_shards"] == 8
    assert report["weight_work_in_loops"] == [], report
    assert report["loop_all_reduces"] > 0 and report["weight_work_in_program"] > 0, report
    assert report["tokens_equal"] and report["distinct_tokens"] > 4, report


def _fsdp_report() -> dict:
    from latro_jax import sharding
    from latro_jax.sharding import MeshSpec

    assert jax.device_count() == 8, jax.devices()
    params = init_params(LOOP_CONFIG, seed=0)
    prompts, mask = _prompts()
    # Tokens in float32: bfloat16's rounding differs where a contraction is split over devices.
    exact, key = LOOP_CONFIG.replace(dtype="float32"), jax.random.key(0)
    expected = sample_padded(exact, LOOP_SAMPLING, 48, params, prompts, mask, key, jnp.int32(48)).tokens
    mesh = sharding.make_mesh(MeshSpec(data=1, fsdp=8))
    sharded = jax.device_put(params, sharding.param_shardings(mesh, params))
    placed = [jax.device_put(x, sharding.batch_shardings(mesh, x)) for x in (prompts, mask)]
    with jax.set_mesh(mesh):
        report = _loop_report(sharded, *placed, shards=8)
        tokens = sample_padded(exact, LOOP_SAMPLING, 48, sharded, *placed, key, jnp.int32(48)).tokens
    q_proj = sharded["layers"][0]["attn"]["q_proj"][...]
    return report | {
        "devices": jax.device_count(),
        "q_proj_shards": q_proj.size // q_proj.addressable_shards[0].data.size,
        "tokens_equal": bool(np.array_equal(np.asarray(tokens), np.asarray(expected))),
        "distinct_tokens": len(np.unique(np.asarray(expected))),
    }


if __name__ == "__main__":
    print(json.dumps(_fsdp_report()))
