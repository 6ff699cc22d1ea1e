"""The sampler against transformers' generate, the model's distribution, and its own contract.

Greedy outputs must match token for token (f32 logits agree to ~1e-6, far from argmax ties on
random models). Distribution tests draw >= 20,000 next tokens and apply a chi-square test
against softmax(logits/T) computed from transformers' logits; a fixed seed makes them
deterministic, and p > 1e-3 is required (a wrong temperature, filter or shared-prefill bug gives
p ~ 0 at this sample size)."""

from __future__ import annotations

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
from latro_jax.model import init_params
from latro_jax.sampling import SamplingConfig, categorical, sample, sample_padded

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


def reference_cut(tokens: list[int], stop_ids, stop_seqs) -> tuple[int, bool]:
    """Where a rationale ends: before the first stop token or the first token of the first stop
    sequence to complete; (len, False) if none occurs."""
    for t, token in enumerate(tokens):
        if token in stop_ids:
            return t, True
        for seq in stop_seqs:
            if t + 1 >= len(seq) and tuple(tokens[t + 1 - len(seq) : t + 1]) == tuple(seq):
                return t + 1 - len(seq), True
    return len(tokens), False


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
        length, stopped = reference_cut(row, stop_ids, stop_seqs)
        assert (lengths[i], finished[i]) == (length, stopped), i
        assert tokens[i, :length].tolist() == row[:length]
        assert (tokens[i, length:] == 0).all()
        logprobs = np.asarray(out.logprobs)[i]
        assert (logprobs[:length] < 0).all() and (logprobs[length:] == 0).all()
    assert finished.sum() >= 4  # the stops really fired


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
