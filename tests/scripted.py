"""The real jitted sampler run over scripted continuations, and an independent reference of its
stop rule.

`sample_scripted` patches the model out of `latro_jax.sampling.sample_padded`: the hidden state of
row r at position p is (p, r), and the head turns it into logits that select scripts[r][p] (each
row's prompt is one token at position 0, so the prefill selects scripts[r][0], and the decode
step that feeds generated token s - 1 at position s selects scripts[r][s]). Everything else is the sampler's own program: prefill, shared-cache
repeat, the while loop, stop matching, cutting, padding. Greedy decoding of those logits makes
the draws exactly the script.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latro_jax import sampling as sampling_module
from latro_jax.config import ModelConfig
from latro_jax.sampling import SampleOutput, SamplingConfig, sample_tokens

# The scripted token's logit (every other logit is 0): finite, so that its log-prob is a known
# negative number and a log-prob the sampler kept can be told from the 0 it writes after a cut.
SCRIPTED_LOGIT = 10.0
# Each call's ModelConfig is new (max_position_embeddings counts up from here, a value no real
# config has), so jax.jit cannot hand back a program traced with the real model, and no other
# test's config can be handed this one's program.
_fresh_configs = itertools.count(7_000_001)


def stops_of(fmt) -> SamplingConfig:
    """A SamplingConfig with the stop and pad fields of a PromptFormat."""
    return SamplingConfig(stop_token_ids=fmt.stop_token_ids, stop_sequences=fmt.stop_sequences,
                          pad_token_id=fmt.pad_token_id)


def filler_token(sampling: SamplingConfig) -> int:
    """The smallest token id that is no stop token and in no stop sequence."""
    used = set(sampling.stop_token_ids) | {t for s in sampling.stop_sequences for t in s}
    return next(t for t in itertools.count() if t not in used)


def sample_scripted(scripts: Sequence[Sequence[int]], vocab_size: int, sampling: SamplingConfig) -> SampleOutput:
    """`sample_tokens` (greedy, one sample a row) whose draws are `scripts`, one row each, with
    `sampling`'s stops and pad and max_new_tokens = the longest script; shorter scripts go on
    with `filler_token(sampling)`."""
    steps = max(map(len, scripts))
    filler = filler_token(sampling)
    table = np.full((len(scripts), steps + 1), filler, np.int32)  # + 1: the loop's last step predicts one more
    for row, script in enumerate(scripts):
        table[row, : len(script)] = script
    table = jnp.asarray(table)
    traced = []

    def hidden_states(config, params, tokens, positions, attention_mask=None, cache=None):
        traced.append(tokens.shape)
        rows = jnp.broadcast_to(jnp.arange(tokens.shape[0])[:, None], tokens.shape)
        return jnp.stack([positions, rows], axis=-1).astype(jnp.float32), cache

    def head(config, params, x):
        position, row = x[:, 0].astype(jnp.int32), x[:, 1].astype(jnp.int32)
        token = table[row, jnp.minimum(position, steps)]
        return SCRIPTED_LOGIT * jax.nn.one_hot(token, vocab_size, dtype=jnp.float32)

    config = ModelConfig("llama", vocab_size, 2, 2, 1, 1, 1, 2, max_position_embeddings=next(_fresh_configs))
    run = dataclasses.replace(sampling, max_new_tokens=steps, temperature=0.0, num_samples=1)
    prompt = jnp.zeros((len(scripts), 1), jnp.int32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sampling_module, "hidden_states", hidden_states)
        patch.setattr(sampling_module, "_head", head)
        out = sample_tokens(config, {}, prompt, jnp.ones_like(prompt, bool), jax.random.key(0), run)
    assert traced, "the sampler ran a program traced before the patch"
    return out


def reference_cut(tokens: Sequence[int], stop_token_ids: Sequence[int],
                  stop_sequences: Sequence[Sequence[int]]) -> int | None:
    """Where a rationale ends, by brute force over every stop occurrence in `tokens`: a stop token
    at t spans (t, t), a stop sequence at tokens[start : end + 1] spans (start, end). The
    occurrence that ends first wins and, of those ending on the same token, the one that starts
    first (the longest sequence); the rationale is tokens[:start]. None if no stop occurs.

    A stop token that ends a stop sequence would make "the one that starts first" disagree with
    cutting at the stop token; no real format has one (stop strings are tokenized as text, stop
    tokens are special), so it is refused here rather than given a rule."""
    assert not set(stop_token_ids) & {s[-1] for s in stop_sequences}, "a stop token ends a stop sequence"
    spans = [(t, t) for t, token in enumerate(tokens) if token in stop_token_ids]
    spans += [
        (start + len(seq) - 1, start)
        for seq in stop_sequences
        for start in range(len(tokens) - len(seq) + 1)
        if tuple(tokens[start : start + len(seq)]) == tuple(seq)
    ]
    return min(spans)[1] if spans else None


def scripted_cuts(scripts: Sequence[Sequence[int]], vocab_size: int, sampling: SamplingConfig) -> list[int | None]:
    """Where the sampler cuts each script (None: it never stopped), after checking each row's
    output against `reference_cut` of the script as drawn (filler included): length (the cut, or
    max_new_tokens unfinished), finished, the kept tokens, pad after them, and log-probs the
    scripted token's before the cut and 0 after it (f32 log-softmax of [10, 0, ..., 0] is 10 minus
    a logsumexp near 10, whose f32 spacing is ~1e-6: atol 1e-5)."""
    out = sample_scripted(scripts, vocab_size, sampling)
    steps = max(map(len, scripts))
    filler = filler_token(sampling)
    tokens, lengths, finished, logprobs = (np.asarray(a) for a in (out.tokens, out.lengths, out.finished, out.logprobs))
    scripted_logprob = -np.log1p((vocab_size - 1) * np.exp(-SCRIPTED_LOGIT))
    cuts = []
    for row, script in enumerate(scripts):
        drawn = list(script) + [filler] * (steps - len(script))
        cut = reference_cut(drawn, sampling.stop_token_ids, sampling.stop_sequences)
        length = steps if cut is None else cut
        assert (int(lengths[row]), bool(finished[row])) == (length, cut is not None), (row, drawn)
        assert tokens[row, :length].tolist() == drawn[:length], row
        assert (tokens[row, length:] == sampling.pad_token_id).all(), row
        np.testing.assert_allclose(logprobs[row, :length], scripted_logprob, rtol=0, atol=1e-5)
        assert (logprobs[row, length:] == 0).all(), row
        cuts.append(cut)
    return cuts
