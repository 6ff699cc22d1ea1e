"""The sampler against transformers' generate, the model's distribution, and its own contract.

Greedy outputs must match token for token (f32 logits agree to ~1e-6, far from argmax ties on
random models). Distribution tests draw >= 20,000 next tokens and apply a chi-square test
against softmax(logits/T) computed from transformers' logits; a fixed seed makes them
deterministic, and p > 1e-3 is required (a wrong temperature, filter or shared-prefill bug gives
p ~ 0 at this sample size)."""

from __future__ import annotations

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats

from conftest import require
from hf_models import FAMILIES, convert, make_hf_model, within_original_context
from latro_jax.convert.llama2c import load_llama2c
from latro_jax.config import ModelConfig
from latro_jax.evaluate import generate_texts
from latro_jax.model import abstract_params, forward, init_params
from latro_jax.sampling import SamplingConfig, categorical, sample, sample_padded
from scripted import reference_cut, scripted_cuts

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18], [20]]


def converted(family, tmp_path, **overrides):
    model = make_hf_model(family, **overrides)
    return model, *convert(model, tmp_path)


def hf_generate_greedy(model, prompts, new_tokens):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[:, width:].numpy()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_matches_transformers_generate(family, tmp_path):
    model, config, params = converted(family, tmp_path, **within_original_context(family))
    expected = hf_generate_greedy(model, PROMPTS, 12)
    out = sample(config, params, PROMPTS, jax.random.key(0), SamplingConfig(max_new_tokens=12, temperature=0.0))
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)
    assert not np.asarray(out.finished).any() and (np.asarray(out.lengths) == 12).all()


def test_stories260k_greedy_with_the_sampler(test_data):
    directory = require(os.path.join(test_data, "models", "stories260K"))
    with open(os.path.join(directory, "expected_greedy_t0.json")) as f:
        expected = json.load(f)
    config, params = load_llama2c(os.path.join(directory, "stories260K.bin"))
    sampling = SamplingConfig(max_new_tokens=expected["steps"], temperature=0.0)
    out = sample(config, params, [expected["prompt_tokens"]], jax.random.key(0), sampling)
    assert np.asarray(out.tokens)[0].tolist() == expected["generated_tokens"]


# ---- distribution --------------------------------------------------------------------------------

DRAWS = 20_000


def reference_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """softmax(logits/T), restricted to the top-k and then the top-p nucleus, renormalised."""
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    keep = np.zeros_like(probs, bool)
    if top_k:
        keep[order[:top_k]] = True
    else:
        keep[:] = True
    probs = np.where(keep, probs, 0)
    probs /= probs.sum()
    if top_p < 1:
        order = np.argsort(-probs)
        before = np.cumsum(probs[order]) - probs[order]
        nucleus = np.zeros_like(keep)
        nucleus[order[before < top_p]] = True
        probs = np.where(nucleus, probs, 0)
        probs /= probs.sum()
    return probs


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    assert counts[probs == 0].sum() == 0, "drew a token the distribution excludes"
    expected = probs * counts.sum()
    big = expected >= 5  # pool the rare cells so the chi-square approximation holds
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    return stats.chisquare(observed, expected).pvalue


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return converted("llama", tmp_path_factory.mktemp("llama"))


PREFIX = [5, 17, 33, 2, 90, 61]


def hf_next_logits(model, prefix):
    with torch.no_grad():
        return model(input_ids=torch.tensor([prefix])).logits[0, -1].numpy()


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 10, 1.0), (0.7, 0, 0.8), (1.0, 20, 0.9)],
)
def test_next_token_frequencies_follow_the_model(llama, temperature, top_k, top_p):
    model, config, params = llama
    sampling = SamplingConfig(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p,
                              num_samples=DRAWS)
    out = sample(config, params, [PREFIX], jax.random.key(1), sampling)
    counts = np.bincount(np.asarray(out.tokens)[:, 0], minlength=config.vocab_size)
    probs = reference_probs(hf_next_logits(model, PREFIX), temperature, top_k, top_p)
    assert chi_square_p(counts, probs) > 1e-3


def test_shared_prefill_matches_repeated_prompts(llama):
    model, config, params = llama
    probs = reference_probs(hf_next_logits(model, PREFIX), 1.0, 0, 1.0)
    shared = sample(config, params, [PREFIX], jax.random.key(2), SamplingConfig(max_new_tokens=1, num_samples=DRAWS))
    repeated = sample(config, params, [PREFIX] * DRAWS, jax.random.key(3), SamplingConfig(max_new_tokens=1))
    for out in (shared, repeated):
        counts = np.bincount(np.asarray(out.tokens)[:, 0], minlength=config.vocab_size)
        assert chi_square_p(counts, probs) > 1e-3
    # Both against each other: a two-sample chi-square over the tokens either drew.
    a = np.bincount(np.asarray(shared.tokens)[:, 0], minlength=config.vocab_size)
    b = np.bincount(np.asarray(repeated.tokens)[:, 0], minlength=config.vocab_size)
    drawn = (a + b) >= 10
    assert stats.chi2_contingency(np.stack([a[drawn], b[drawn]])).pvalue > 1e-3


def teacher_forced_logprobs(config, params, prompts, continuations):
    """Per-token log-probs [prompts, C, T] of each continuation [C, T] after each prompt, by one
    forward pass over the whole sequences, right-padded (causal attention: the padding after a
    sequence changes nothing before it): no cache, no left padding, no sampling loop."""
    width = max(map(len, prompts)) + continuations.shape[1]
    tokens = np.zeros((len(prompts), len(continuations), width), np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, :, : len(prompt)] = prompt
        tokens[i, :, len(prompt) : len(prompt) + continuations.shape[1]] = continuations
    tokens = tokens.reshape(-1, width)
    positions = np.broadcast_to(np.arange(width), tokens.shape)
    logits, _ = jax.jit(forward, static_argnums=0)(config, params, tokens, positions)
    logprobs = np.asarray(jax.nn.log_softmax(logits, axis=-1)).reshape(len(prompts), len(continuations), width, -1)
    return np.stack([
        np.take_along_axis(logprobs[i, :, len(p) - 1 : len(p) - 1 + continuations.shape[1]],
                           continuations[..., None], axis=-1)[..., 0]
        for i, p in enumerate(prompts)
    ])


def peaked_params(config: ModelConfig, seed: int):
    """init_params x 4 in distribution (weights N(0, 0.08^2), norm scales 4), so that logits are
    far from uniform; drawn by numpy into abstract_params' layout, which saves the seconds
    init_params spends compiling one random draw per weight shape."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if "norm" in jax.tree_util.keystr(path):
            return jnp.full(leaf.shape, 4.0, leaf.dtype)
        return jnp.asarray(0.08 * rng.normal(size=leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(config))


def test_three_token_draws_follow_the_model():
    """Three tokens a row, K = 20,000 rows for each of two prompts of different lengths: the
    frequencies of the 6^3 = 216 joint continuations of each prompt follow the exact probabilities
    (chi-square, p > 1e-3), enumerated from teacher-forced log-probs. Steps after the first use the
    cache the K rows share by repeating their prompt's prefill, and a new key each step; rows given
    another prompt's cache (tile for repeat: the two prompts' joints are 0.71 apart in total
    variation) or a key reused across steps (dependent draws) are far outside the test.
    The sampler's log-probs of the drawn tokens match the teacher-forced ones to 1e-5 (the cached
    decode and the full forward differ by f32 rounding, ~1e-6)."""
    vocab, k, new_tokens = 6, 20_000, 3
    config = ModelConfig("llama", vocab, 16, 32, 2, 2, 1, 8)
    params = peaked_params(config, 1)  # joint entropies 4.8 and 4.4 nats (uniform: log 216 = 5.4)
    prompts = [[1, 4], [2, 0, 3, 5, 1]]
    sampling = SamplingConfig(max_new_tokens=new_tokens, num_samples=k, prompt_buckets=(8,), length_buckets=(4,))
    out = sample(config, params, prompts, jax.random.key(8), sampling)
    tokens, logprobs = np.asarray(out.tokens), np.asarray(out.logprobs)
    assert tokens.shape == (len(prompts) * k, new_tokens) and (np.asarray(out.lengths) == new_tokens).all()
    continuations = np.array(list(itertools.product(range(vocab), repeat=new_tokens)))  # row index = base-6 digits
    for i, exact in enumerate(teacher_forced_logprobs(config, params, prompts, continuations)):  # [216, 3] each
        joint = np.exp(exact.astype(np.float64).sum(axis=1))
        drawn = tokens[i * k : (i + 1) * k] @ vocab ** np.arange(new_tokens)[::-1]
        assert chi_square_p(np.bincount(drawn, minlength=len(continuations)), joint / joint.sum()) > 1e-3, i
        np.testing.assert_allclose(logprobs[i * k : (i + 1) * k], exact[drawn], rtol=0, atol=1e-5)


def test_shared_prefill_does_one_kth_of_the_prefill_work():
    """Compiled FLOPs: 1 prompt x K=8 samples against 8 copies of the prompt, long prompts and one
    new token, so that prefill dominates. Shared prefill must cost close to 1/8."""
    config = ModelConfig("llama", 128, 64, 128, 2, 4, 2, 16)
    params = init_params(config)
    prompt_slots, k = 256, 8

    def flops(batch, samples):
        sampling = SamplingConfig(max_new_tokens=1, num_samples=samples)
        tokens = jnp.ones((batch, prompt_slots), jnp.int32)
        lowered = sample_padded.lower(config, sampling, 1, params, tokens, tokens > 0, jax.random.key(0), jnp.int32(1))
        return lowered.compile().cost_analysis()["flops"]

    shared, repeated = flops(1, k), flops(k, 1)
    assert repeated / shared > 0.8 * k, (shared, repeated)


# ---- stops, lengths, compilation -------------------------------------------------------------------


def test_stop_tokens_and_sequences_cut_the_rationale(llama):
    _, config, params = llama
    free = sample(config, params, PROMPTS, jax.random.key(4), SamplingConfig(max_new_tokens=16, num_samples=3))
    rows = np.asarray(free.tokens).tolist()
    # Stops taken from the free-running samples, so that each kind fires in some rows.
    stop_ids = (rows[0][5], rows[4][9])
    stop_seqs = (tuple(rows[1][3:5]), tuple(rows[7][6:9]), tuple(rows[10][12:14]))
    sampling = SamplingConfig(max_new_tokens=16, num_samples=3, stop_token_ids=stop_ids, stop_sequences=stop_seqs,
                              pad_token_id=0)
    out = sample(config, params, PROMPTS, jax.random.key(4), sampling)  # same key: same draws
    tokens, lengths, finished = (np.asarray(a) for a in (out.tokens, out.lengths, out.finished))
    for i, row in enumerate(rows):
        cut = reference_cut(row, stop_ids, stop_seqs)
        length, stopped = (len(row), False) if cut is None else (cut, True)
        assert (lengths[i], finished[i]) == (length, stopped), i
        assert tokens[i, :length].tolist() == row[:length]
        assert (tokens[i, length:] == 0).all()
        logprobs = np.asarray(out.logprobs)[i]
        assert (logprobs[:length] < 0).all() and (logprobs[length:] == 0).all()
    assert finished.sum() >= 4  # the stops really fired


def test_stop_rule_on_scripted_draws():
    """The jitted sampler made to draw given token lists (tests/scripted.py), stops (0,) and
    ((5, 6), (4, 5, 6), (9,)): each row is cut where the first stop to complete starts, the longest
    sequence when several complete on the same token (not the first listed)."""
    sampling = SamplingConfig(stop_token_ids=(0,), stop_sequences=((5, 6), (4, 5, 6), (9,)))
    cases = {  # draws -> cut (None: no stop)
        (1, 2, 4, 5, 6, 7): 2,  # (5, 6) and (4, 5, 6) complete on the same token: the longest
        (1, 5, 6, 0): 1,  # a sequence, then a stop token: the first to complete
        (1, 0, 5, 6): 1,  # a stop token, then a sequence
        (4, 5, 0, 6): 2,  # a stop token inside what would have been a sequence
        (9,): 0,  # a one-token sequence at the first draw
        (1, 2, 3): None,
    }
    assert scripted_cuts(list(cases), 16, sampling) == list(cases.values())


def test_loop_ends_when_every_row_has_stopped(llama):
    _, config, params = llama
    everything = tuple(range(config.vocab_size))
    out = sample(config, params, PROMPTS, jax.random.key(5),
                 SamplingConfig(max_new_tokens=50, stop_token_ids=everything))
    assert int(out.steps) == 1
    assert (np.asarray(out.lengths) == 0).all() and np.asarray(out.finished).all()


def test_one_compilation_per_bucket():
    config = ModelConfig("llama", 96, 32, 48, 1, 2, 1, 16)  # a config no other test compiles
    params = init_params(config)
    before = sample_padded._cache_size()
    rng = np.random.default_rng(0)
    for i in range(20):
        prompts = [rng.integers(3, 96, size=rng.integers(17, 33)).tolist() for _ in range(3)]
        sampling = SamplingConfig(max_new_tokens=int(rng.integers(9, 17)), num_samples=2)
        out = sample(config, params, prompts, jax.random.key(i), sampling)
        assert out.tokens.shape == (6, sampling.max_new_tokens)
    assert sample_padded._cache_size() - before == 1


class _IdsAsText:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("num_samples", [1, 2])
def test_evaluation_batches_share_one_compilation(num_samples):
    """generate_texts fills a short last batch with copies of its last prompt and drops their
    generations: sets of 5, 7 and 13 prompts (batches of 4 prompts) compile the sampler once, and
    each prompt's greedy texts are the ones it gets when sampled alone."""
    config = ModelConfig("llama", 97, 32, 48, 1, 2, 1, 16)  # a config no other test compiles
    params = init_params(config, 1)
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.0, num_samples=num_samples)
    rng = np.random.default_rng(1)
    before = sample_padded._cache_size()
    runs = []
    for n in (5, 7, 13):
        prompts = [rng.integers(3, 97, size=rng.integers(2, 17)).tolist() for _ in range(n)]
        texts = generate_texts(config, params, _IdsAsText(), prompts, sampling, jax.random.key(0),
                               batch_size=4 * num_samples)
        assert [len(t) for t in texts] == [num_samples] * n
        runs.append((prompts, texts))
    assert sample_padded._cache_size() - before == 1
    for prompts, texts in runs:
        for prompt, samples in zip(prompts[-3:], texts[-3:]):
            alone = sample(config, params, [prompt], jax.random.key(0), sampling)
            tokens, lengths = np.asarray(alone.tokens), np.asarray(alone.lengths)
            assert samples == [" ".join(map(str, tokens[i, : lengths[i]])) for i in range(num_samples)]


def test_block_categorical_follows_softmax_over_many_blocks():
    """`categorical` on a vocabulary of 8 partial blocks (1000 = 7 x 128 + 104), with a third of
    the tokens excluded (-inf): frequencies follow softmax and excluded tokens never appear."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=1000).astype(np.float32) * 2
    logits[rng.random(1000) < 1 / 3] = -np.inf
    draws = jax.jit(categorical)(jax.random.key(7), jnp.broadcast_to(jnp.asarray(logits), (DRAWS, 1000)))
    counts = np.bincount(np.asarray(draws), minlength=1000)
    probs = np.exp(logits - logits.max())
    assert chi_square_p(counts, probs / probs.sum()) > 1e-3
