"""Which training examples each update draws (a pure function of (update, seed), so that a
resumed run draws exactly what the interrupted one would have), and their token rows."""

from __future__ import annotations

import functools

import numpy as np

from latro_jax.data.prompts import PromptFormat, encode_answers, encode_prompts, encode_texts
from latro_jax.data.tasks import Example, Task
from latro_jax.experiment import Experiment
from latro_jax.rollout import pad_questions, question_slots
from latro_jax.sampling import SamplingConfig, bucket
from latro_jax.sharding import global_max, process_rows, rows_from_processes

# SFT rows pad to a power of two or 1.5 times one: at most a third of a row is padding (not half),
# for about twice the programs of powers of two alone.
SFT_BUCKETS = tuple(sorted({b for p in range(4, 14) for b in (2**p, 3 * 2 ** (p - 1))}))


def batch_indices(num_examples: int, batch: int, step: int, seed: int) -> np.ndarray:
    """The examples of update `step`: consecutive slices of a stream of per-epoch permutations,
    a pure function of (step, seed) so that a resumed run continues exactly."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), num_examples)
        order = _epoch_order(num_examples, seed, epoch)
        out.extend(order[offset : offset + batch - len(out)].tolist())
    return np.asarray(out)


@functools.lru_cache(maxsize=2)  # the epoch being drawn (and the next): ~2 ms an update for 50,000 examples
def _epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    order = np.random.default_rng((seed, epoch)).permutation(num_examples)
    order.flags.writeable = False
    return order


class Batches:
    """Each update's training examples (`batch_indices`) as global arrays with rows split over the
    mesh: padded questions for a rollout, or SFT rows (prompt + gold completion). Each process
    tokenizes only the rows its devices hold, each example once, when first drawn."""

    def __init__(self, exp: Experiment, task: Task, examples: list[Example], tokenizer, fmt: PromptFormat, mesh,
                 sampling: SamplingConfig):
        self.exp, self.tokenizer, self.fmt, self.mesh, self.sampling = exp, tokenizer, fmt, mesh, sampling
        self.task, self.examples = task, examples
        self.sft = exp.train.method == "sft"
        self.mine = process_rows(mesh, exp.train.questions_per_update)  # the same rows of every update
        self.tokenized: dict[int, tuple[list[int], list[int]]] = {}

    def __call__(self, step: int):
        t = self.exp.train
        indices = batch_indices(len(self.examples), t.questions_per_update, step, t.seed)
        prompts, targets = (list(x) for x in zip(*self.encoded([int(indices[i]) for i in self.mine])))
        if self.sft:
            (longest,) = global_max([max(len(p) + len(c) for p, c in zip(prompts, targets))])
            local = sft_rows(prompts, targets, self.fmt.pad_token_id, bucket(longest, SFT_BUCKETS))
        else:
            local = pad_questions(prompts, targets, question_slots(prompts, targets, self.sampling),
                                  self.fmt.pad_token_id)
        return rows_from_processes(self.mesh, len(indices), self.mine, local)

    def encoded(self, indices: list[int]) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, target ids) of training examples. SFT's target is the gold rationale where
        the task has one and data.sft_target allows it; otherwise, and for LaTRO, the answer."""
        new = [i for i in dict.fromkeys(indices) if i not in self.tokenized]
        if new:
            tokenizer, fmt = self.tokenizer, self.fmt
            examples = [self.examples[i] for i in new]
            prompts = encode_prompts(tokenizer, fmt, [e.question for e in examples])
            gold = [self.sft and self.exp.data.sft_target != "answer" and e.rationale is not None for e in examples]
            answers = iter(encode_answers(tokenizer, fmt, [e.answer for e, g in zip(examples, gold) if not g],
                                          self.task.answer_template))
            rationales = iter(encode_texts(tokenizer, [e.rationale + fmt.end_token
                                                       for e, g in zip(examples, gold) if g]))
            targets = [next(rationales) if g else next(answers) for g in gold]
            self.tokenized.update(zip(new, zip(prompts, targets)))
        return [self.tokenized[i] for i in indices]


def sft_rows(prompts: list[list[int]], completions: list[list[int]], pad_id: int, slots: int) -> dict:
    """Prompt + completion, left-aligned and right-padded to `slots`; the loss is on the completion."""
    n = len(prompts)
    tokens = np.full((n, slots), pad_id, np.int32)
    completion_mask = np.zeros((n, slots), bool)
    attention_mask = np.zeros((n, slots), bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        tokens[i, : len(p) + len(c)] = p + c
        attention_mask[i, : len(p) + len(c)] = True
        completion_mask[i, len(p) : len(p) + len(c)] = True
    return {"tokens": tokens, "attention_mask": attention_mask, "completion_mask": completion_mask}
