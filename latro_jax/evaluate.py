"""Zero-shot evaluation as in the paper: greedy accuracy and self-consistency maj@k.

Greedy: temperature 0, up to `max_new_tokens`, stopping at EOS / the end-of-turn token (not at
"The answer is": the answer must be generated). maj@k: k samples at T=1 per question, each
answer extracted, then `majority_vote` (unextractable answers do not vote; a tie goes to the
answer that occurs first among the k samples). ARC samples vote for the option they name.

Correctness is the task's `AnswerRule` (latro_jax.data.extraction). As LATRO.md states it:
GSM8K, the extracted number equals the gold number; ARC greedy, the gold option's lower-cased
text occurs in the lower-cased text after "the answer is" (`arc_correct`: "heat and light"
answers "heat" correctly, as in the paper's numbers). maj@k needs one answer per sample to vote
with, so an ARC sample's answer is the option it names first (`arc_choice`), and the vote is
correct when it is the gold option.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from tqdm.auto import tqdm

from latro_jax.config import ModelConfig
from latro_jax.data.extraction import majority_vote
from latro_jax.data.prompts import PromptFormat, encode_prompts
from latro_jax.data.tasks import Example, Task, builtin_task
from latro_jax.sampling import SamplingConfig, sample
from latro_jax.sharding import to_host


def score(task: Task | str, examples: Sequence[Example], greedy_texts: Sequence[str],
          voted_texts: Sequence[Sequence[str]], maj_k: int) -> dict:
    """Greedy and maj@k accuracy of generated texts (one greedy text and k samples per example),
    by the answer rule of `task` (a Task, or a built-in task's name), and a row per example for
    inspection."""
    rule = (task if isinstance(task, Task) else builtin_task(task)).rule
    rows, greedy_total, voted_total = [], 0, 0
    for example, text, samples in zip(examples, greedy_texts, voted_texts, strict=True):
        correct = rule.correct(text, example.answer, example.options)
        vote = majority_vote([rule.answer(s, example.options) for s in samples])
        greedy_total += correct
        voted_total += rule.agrees(vote, example.answer)
        rows.append({"id": example.id, "gold": rule.gold(example.answer),
                     "greedy_answer": rule.answer(text, example.options),
                     "greedy_correct": correct, f"maj@{maj_k}": vote, "greedy_text": text})
    n = max(1, len(examples))
    return {
        "examples": len(examples),
        "greedy_accuracy": greedy_total / n,
        f"maj@{maj_k}_accuracy": voted_total / n,
        "maj_k": maj_k,
        "tie_rule": "unextractable answers do not vote; a tie goes to the answer occurring first among the samples",
        "rows": rows,
    }


def generate_texts(config, params, tokenizer, prompts, sampling, rng, batch_size) -> list[list[str]]:
    """Decoded generations: one list of `sampling.num_samples` texts per prompt.

    Prompts go to the sampler in batches of `batch_size // num_samples` (fewer for a smaller set:
    the power of two above its size), and a short last batch is filled with copies of its last
    prompt, whose generations are dropped: every batch of every evaluation set of that size has
    one shape, so one compiled sampler per prompt-length bucket serves them all."""
    texts = []
    k = sampling.num_samples
    per_batch = min(max(1, batch_size // k), 1 << max(0, len(prompts) - 1).bit_length())
    for start in range(0, len(prompts), per_batch):
        batch = list(prompts[start : start + per_batch])
        real = len(batch)
        batch += [batch[-1]] * (per_batch - real)
        out = sample(config, params, batch, jax.random.fold_in(rng, start), sampling)
        tokens, lengths = to_host((out.tokens, out.lengths))  # gathered from every process
        decoded = [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(tokens[: real * k], lengths)]
        texts.extend(decoded[i : i + k] for i in range(0, len(decoded), k))
    return texts


def evaluate(
    config: ModelConfig,
    params,
    tokenizer,
    fmt: PromptFormat,
    examples: Sequence[Example],
    task: Task | str,
    max_new_tokens: int,
    maj_k: int,
    rng: jax.Array,
    batch_size: int = 64,
    progress: bool = True,
) -> dict:
    """Greedy and maj@k accuracy on `examples`; also the greedy generations for inspection."""
    prompts = encode_prompts(tokenizer, fmt, [e.question for e in examples])
    common = dict(
        max_new_tokens=max_new_tokens, stop_token_ids=fmt.stop_token_ids, pad_token_id=fmt.pad_token_id
    )
    greedy = SamplingConfig(temperature=0.0, **common)
    voted = SamplingConfig(temperature=1.0, num_samples=maj_k, **common)
    bar = tqdm(total=2, desc="eval", leave=False, disable=not progress)
    greedy_texts = generate_texts(config, params, tokenizer, prompts, greedy, rng, batch_size)
    bar.update()
    voted_texts = generate_texts(config, params, tokenizer, prompts, voted, jax.random.fold_in(rng, 1), batch_size)
    bar.close()
    return score(task, examples, [text for (text,) in greedy_texts], voted_texts, maj_k)
