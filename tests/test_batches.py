"""What a training run draws and feeds its update.

`data.batches.batch_indices`: over several epochs (the SFT recipes run 3), each epoch draws every
example once, also where a batch straddles two epochs; each epoch has its own order and each
seed its own; the draw is a pure function of (step, seed), so a resumed run continues exactly.

The SFT baseline's rows (LATRO.md, "SFT baseline"): what `train.run` feeds its first update for
`train.method=sft`, captured at the update on a tiny stand-in of each family with its real
tokenizer and real GSM8K / ARC-Challenge rows. The reference is built by hand from the jsonl row:
the prompt is the chat template's own tokenization (transformers') of the task's user message,
the completion the GSM8K solution with "####" replaced by "The answer is", or "The answer is
{gold option}." (ARC, or `data.sft_target=answer`), closed by the model's end token.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from latro_jax import train
from latro_jax.experiment import load_experiment
from latro_jax.data.batches import batch_indices, sft_rows
from latro_jax.update import sft_rows_loss
from test_experiments import stand_ins, tiny  # noqa: F401 (stand_ins: a fixture)

# ---- batch_indices -----------------------------------------------------------------------------


def drawn(num_examples: int, batch: int, steps: int, seed: int = 0) -> np.ndarray:
    """The examples of updates 0..steps-1, one after another."""
    return np.concatenate([batch_indices(num_examples, batch, step, seed) for step in range(steps)])


def epochs_of(stream: np.ndarray, num_examples: int) -> list[np.ndarray]:
    return [stream[i : i + num_examples] for i in range(0, len(stream), num_examples)]


@pytest.mark.parametrize("num_examples, batch", [(10, 4), (7, 3), (3, 8), (5, 5)])
def test_each_epoch_draws_every_example_once(num_examples, batch):
    """More than 3 epochs; 10 / 4 and 7 / 3 straddle epochs mid-batch, 3 / 8 spans three epochs
    in one batch, 5 / 5 ends each epoch with a batch."""
    steps = 4 * num_examples // batch + 2
    stream = drawn(num_examples, batch, steps)
    assert all(len(batch_indices(num_examples, batch, step, 0)) == batch for step in range(steps))
    *whole, last = epochs_of(stream, num_examples)
    assert len(whole) >= 3
    for epoch in whole:
        assert sorted(epoch.tolist()) == list(range(num_examples))
    assert len(set(last.tolist())) == len(last) and set(last.tolist()) <= set(range(num_examples))
    # each epoch its own order, not the first one's again (3 examples have 6 orders: not all one)
    orders = {tuple(epoch.tolist()) for epoch in whole}
    assert len(orders) == len(whole) if num_examples > 3 else len(orders) > 1


@pytest.mark.parametrize("name, num_examples", [("gsm8k_llama_sft", 7473 - 500), ("arc_llama_sft", 1119)])
def test_the_sft_recipes_draw_each_example_once_an_epoch(name, num_examples):
    """The recipes' 3 epochs of 24 questions (GSM8K: the train split less its 500 held out):
    two whole epochs, each every example once, then the third without a repeat."""
    t = load_experiment(name).train
    stream = drawn(num_examples, t.questions_per_update, t.updates)
    first, second, third = epochs_of(stream, num_examples)
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(num_examples))
    assert len(set(third.tolist())) == len(third) > num_examples - t.questions_per_update
    assert not np.array_equal(first, second)


def test_batches_are_consecutive_slices_of_one_stream():
    """Batches of 4 are the stream that batches of one example draw, cut in fours: the batch
    straddling the epoch boundary (update 2 of 10 examples: draws 8..11) takes the last two of
    epoch 0's order, then the first two of epoch 1's."""
    singles = drawn(10, 1, 24, seed=3)
    for step in range(6):
        np.testing.assert_array_equal(batch_indices(10, 4, step, 3), singles[4 * step : 4 * step + 4])
    straddling = batch_indices(10, 4, 2, 3)
    np.testing.assert_array_equal(straddling[:2], singles[8:10])
    np.testing.assert_array_equal(straddling[2:], singles[10:12])


def test_the_draw_is_a_pure_function_of_step_and_seed():
    """A resumed run asks for its next steps only, in a fresh process (its epoch orders not
    cached): the same examples as the run that went on. Asked in any order, the same draws."""
    in_order = [batch_indices(10, 4, step, 7).tolist() for step in range(12)]
    backwards = [batch_indices(10, 4, step, 7).tolist() for step in reversed(range(12))][::-1]
    assert backwards == in_order
    resumed = [batch_indices(10, 4, step, 7).tolist() for step in (5, 11, 0, 6)]
    assert resumed == [in_order[step] for step in (5, 11, 0, 6)]


def test_seeds_give_different_orders():
    orders = {seed: epochs_of(drawn(10, 5, 8, seed), 10) for seed in (0, 1, 2)}
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert all(not np.array_equal(x, y) for x, y in zip(orders[a], orders[b])), (a, b)


# ---- the SFT baseline's rows ------------------------------------------------------------------


def test_sft_rows_by_hand():
    """Two rows laid out left-aligned and right-padded (pad 0) in 7 slots."""
    rows = sft_rows([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], 0, 7)
    np.testing.assert_array_equal(rows["tokens"], [[5, 6, 7, 9, 10, 0, 0], [8, 11, 12, 13, 0, 0, 0]])
    np.testing.assert_array_equal(rows["attention_mask"], [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(rows["completion_mask"], [[0, 0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0, 0]])


class Captured(Exception):
    """Raised in place of the first update, once its arguments are recorded."""


def first_update_arguments(monkeypatch, exp, tokenizer) -> dict:
    """What `run(exp)` passes its first update (the rows as numpy), without running it."""
    seen = {}

    def update_jit(params, opt_state):
        def update(config, objective, optimizer, micro_batch, rows_loss, score_from, params, opt_state, rows,
                   frozen=None):
            seen.update(rows={k: np.asarray(v) for k, v in rows.items()}, rows_loss=rows_loss, score_from=score_from)
            raise Captured

        return update

    monkeypatch.setattr(train, "update_jit", update_jit)
    with pytest.raises(Captured):
        train.run(exp, tokenizer=tokenizer, progress=False)
    return seen


# The model's end of turn (closes every completion) and pad token, as LATRO.md names them.
END_TOKEN = {"llama": "<|eot_id|>", "phi": "<|end|>"}
PAD_TOKEN = {"llama": "<|end_of_text|>", "phi": "<|endoftext|>"}
USER_MESSAGE = {
    "gsm8k": lambda row: f"{row['question']} Let's think step by step.",
    "arc_challenge": lambda row: (f"Question: {row['question']}\nOptions: {row['choices']['text']}\n"
                                  "Let's think step by step first then print your answer like "
                                  "'The answer is (one of the options)'."),
}


def gold_option(row: dict) -> str:
    return row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])]


def expected_completion(task: str, target: str, row: dict) -> str:
    if task == "gsm8k" and target == "rationale":
        return row["answer"].replace("####", "The answer is")
    answer = row["answer"].rsplit("#### ", 1)[1].replace(",", "") if task == "gsm8k" else gold_option(row)
    return f"The answer is {answer}."


def chat_prompt_ids(tokenizer, message: str) -> list[int]:
    """transformers' own tokenization of the rendered chat, with one BOS in front (Phi-3.5's
    template writes none; the model is trained with one)."""
    ids = list(tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"])
    return ids if ids[:1] == [tokenizer.bos_token_id] else [tokenizer.bos_token_id] + ids


@pytest.mark.parametrize("name, target", [
    ("gsm8k_llama_sft", "rationale"),  # the recipe: the gold rationale
    ("gsm8k_llama_sft", "answer"),  # data.sft_target=answer: the answer suffix only
    ("arc_phi_sft", "rationale"),  # ARC has no rationale: the answer suffix
])
def test_sft_rows_fed_to_the_update(name, target, stand_ins, test_data, tmp_path, monkeypatch):  # noqa: F811
    task, model = ("gsm8k" if name.startswith("gsm8k") else "arc_challenge"), name.split("_")[-2]
    checkpoint, tokenizer = stand_ins(model)
    exp = tiny(name, checkpoint, tmp_path, test_data)
    exp = dataclasses.replace(exp, data=dataclasses.replace(exp.data, sft_target=target),
                              train=dataclasses.replace(exp.train, questions_per_update=4))
    assert exp.train.method == "sft"
    seen = first_update_arguments(monkeypatch, exp, tokenizer)
    assert seen["rows_loss"] is sft_rows_loss and seen["score_from"] == 1
    rows = seen["rows"]
    assert rows["tokens"].shape[0] == 4 and rows["tokens"].shape == rows["completion_mask"].shape
    with open(os.path.join(exp.data.source, "train.jsonl")) as f:
        jsonl = [json.loads(line) for line in f]
    end, pad = (tokenizer.convert_tokens_to_ids(t) for t in (END_TOKEN[model], PAD_TOKEN[model]))
    slots = rows["tokens"].shape[1]
    questions = set()
    for tokens, attention, completion in zip(rows["tokens"], rows["attention_mask"], rows["completion_mask"]):
        length, prompt_length = int(attention.sum()), int((attention & ~completion).sum())
        # Left-aligned, then padding; the completion is the tail of the real tokens, closed by the end token.
        np.testing.assert_array_equal(attention, np.arange(slots) < length)
        np.testing.assert_array_equal(completion, (np.arange(slots) >= prompt_length) & (np.arange(slots) < length))
        assert (tokens[length:] == pad).all() and tokens[length - 1] == end
        prompt, completed = tokens[:prompt_length].tolist(), tokens[prompt_length:length].tolist()
        # The jsonl rows whose user message this prompt is, by transformers' tokenization of it
        # (a question asked twice: either row's completion).
        decoded = tokenizer.decode(prompt)
        same = [r for r in jsonl
                if r["question"] in decoded and chat_prompt_ids(tokenizer, USER_MESSAGE[task](r)) == prompt]
        assert same, f"the prompt is no jsonl row's chat prompt: {decoded!r}"
        questions.add(same[0]["question"])
        assert tokenizer.decode(completed) in {expected_completion(task, target, r) + END_TOKEN[model] for r in same}
        assert completed.count(end) == 1
    assert len(questions) == 4
