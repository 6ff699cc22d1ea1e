"""The demo's synthetic arithmetic problems and their tokenizer."""

import re

import pytest

from latro_jax.data.extraction import extract_gsm8k
from latro_jax.data.prompts import encode_answers, encode_prompts, prompt_format
from latro_jax.data.synthetic import build_tokenizer, load_synthetic
from latro_jax.data.tasks import load_task
from scripted import scripted_cuts, stops_of

STEP = re.compile(r"(\d+) ([+-]) (\d) = (-?\d+)\.")
VERBS = {"buys": 1, "finds": 1, "gets": 1, "gives": -1, "loses": -1, "sells": -1}


def solve(question: str) -> int:
    """The true total, read from the question's words independently of the generator."""
    total = int(re.search(r"has (\d+) ", question).group(1))
    for verb, n in re.findall(r"(buys|finds|gets|gives away|loses|sells) (\d)", question):
        total += VERBS[verb.split()[0]] * int(n)
    return total


def test_gold_answers_rationales_and_slips():
    train = load_synthetic("train", 3000)
    slipped_steps = carrying_steps = wrong_answers = 0
    for example in train:
        assert example.answer == str(solve(example.question))
        steps = STEP.findall(example.rationale)
        assert 2 <= len(steps) <= 3
        value = int(steps[0][0])
        for a, sign, b, result in steps:
            assert int(a) == value  # each step continues from the previous result
            a, b, result = int(a), int(b), int(result)
            true = a + b if sign == "+" else a - b
            carries = sign == "+" and a % 10 + b >= 10
            carrying_steps += carries
            if result != true:
                assert carries and result == true - 10, example  # only a forgotten carry
                slipped_steps += 1
            value = result
        stated = int(example.rationale.rsplit("The answer is ", 1)[1].rstrip("."))
        assert stated == value  # the stated answer follows the (possibly slipped) rationale
        wrong_answers += stated != int(example.answer)
    # slip = 0.6 per carrying step: greedy decoding of a model of this data inherits the slips
    assert 0.55 < slipped_steps / carrying_steps < 0.65
    assert 0.25 < wrong_answers / len(train) < 0.45


def test_splits_are_deterministic_and_held_out():
    test = load_task("arithmetic", "test")
    assert len(test) == 500 and test == load_task("arithmetic", "test")
    for example in test:  # held-out rationales are gold
        assert int(example.rationale.rsplit("The answer is ", 1)[1].rstrip(".")) == int(example.answer)

    def numbers(e):  # the start and the signed steps
        steps = re.findall(r"(buys|finds|gets|gives away|loses|sells) (\d)", e.question)
        return (int(re.search(r"has (\d+) ", e.question).group(1)),) + tuple(
            VERBS[verb.split()[0]] * int(n) for verb, n in steps)

    held_out = {numbers(e) for e in test + load_task("arithmetic", "validation")}
    assert not held_out & {numbers(e) for e in load_synthetic("train", 5000)}
    with pytest.raises(ValueError, match="no split"):
        load_task("arithmetic", "dev")


def test_tokenizer_round_trips_and_formats_prompts(tmp_path):
    tokenizer = build_tokenizer(tmp_path)
    fmt = prompt_format(tokenizer)
    assert fmt.end_token == "<|end|>" and fmt.pad_token_id == tokenizer.pad_token_id
    examples = load_synthetic("train", 200)
    for example in examples:
        ids = tokenizer(example.rationale, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == example.rationale
        digits = [t.lstrip("\u2581") for t in tokenizer.convert_ids_to_tokens(ids)]
        assert sum(t.isdigit() and len(t) == 1 for t in digits) == sum(c.isdigit() for c in example.rationale)
    (prompt,) = encode_prompts(tokenizer, fmt, [examples[0].question])
    assert tokenizer.decode(prompt) == f"<|user|>\n{examples[0].question}<|end|>\n<|assistant|>\n"
    (answer,) = encode_answers(tokenizer, fmt, ["44"])
    assert tokenizer.decode(answer) == "The answer is 44.<|end|>"
    # the sampler stops a rationale where "The answer is" begins
    ids = tokenizer("12 + 5 = 17. The answer is 17.", add_special_tokens=False)["input_ids"]
    (cut,) = scripted_cuts([ids], len(tokenizer), stops_of(fmt))
    assert tokenizer.decode(ids[:cut]) == "12 + 5 = 17."
    assert extract_gsm8k(tokenizer.decode(ids)) == "17"
