"""Data, prompts and answer extraction against the real GSM8K / ARC-Challenge files and the real
tokenizers of the paper's three models, built from the shared files:

- Llama 3.1: the tiktoken BPE ranks + Meta's special tokens + the Llama-3.1-8B-Instruct template.
- Mistral v0.3: its sentencepiece model (control tokens [INST]... included) through transformers'
  LlamaTokenizer, and the single-turn output of the HF v0.3 template: "<s>[INST] {user}[/INST]".
  (transformers' sentencepiece->BPE conversion splits runs of two spaces differently from
  sentencepiece; none of the texts here has one.)
- Phi-3.5-mini: the Llama 2 sentencepiece model through sentencepiece itself (so ids are exact)
  + Phi-3's special tokens 32000..32010 with their right-strip (whitespace after <|user|>,
  <|end|>, <|assistant|> is absorbed, as llama.cpp and HF do) + the Phi-3.5 template.
The Llama 3 and Phi-3 builds are checked against llama.cpp's test vectors from the HF tokenizers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import pytest

from conftest import require
from latro_jax.data.extraction import (
    arc_choice,
    arc_correct,
    canonical_number,
    extract_arc,
    extract_gsm8k,
    gsm8k_correct,
    majority_vote,
)
from latro_jax.data.prompts import (
    STOP_STRINGS,
    encode_answers,
    encode_prompts,
    load_tokenizer,
    render_prompt,
)
from latro_jax.data.tasks import DataError, Example, load_task
from latro_jax.evaluate import score
from latro_jax.sampling import SamplingConfig
from scripted import scripted_cuts, stops_of
from shared_tokenizers import MODELS, build_mistral_v03, built

NATALIA = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May? Let's think step by step."
)


# ---------------------------------------------------------------------------------------------
# Tasks


@pytest.fixture(scope="module")
def gsm8k_dir(test_data):
    return os.path.dirname(require(os.path.join(test_data, "gsm8k", "train.jsonl")))


@pytest.fixture(scope="module")
def arc_dir(test_data):
    return os.path.dirname(require(os.path.join(test_data, "arc_challenge", "train.jsonl")))


def test_gsm8k_splits_and_gold(gsm8k_dir):
    full = load_task("gsm8k", "train_full", gsm8k_dir)
    train, validation = load_task("gsm8k", "train", gsm8k_dir), load_task("gsm8k", "validation", gsm8k_dir)
    test = load_task("gsm8k", "test", gsm8k_dir)
    assert (len(full), len(test)) == (7473, 1319)
    assert (len(train), len(validation)) == (6973, 500)
    assert {e.id for e in train}.isdisjoint(e.id for e in validation)
    assert sorted(train + validation, key=lambda e: int(e.id.rsplit("/", 1)[1])) == full
    # The held-out questions are pinned: changing the selection rule must be deliberate.
    assert [e.id for e in validation[:3]] == ["gsm8k/train/8", "gsm8k/train/9", "gsm8k/train/21"]
    assert hashlib.sha256(",".join(e.id for e in validation).encode()).hexdigest()[:16] == "d564aae929481c5b"

    first = full[0]
    assert first.id == "gsm8k/train/0"
    assert first.question == NATALIA
    assert first.answer == "72"
    assert first.rationale == (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
        "The answer is 72"
    )
    assert full[345].answer == "1080"  # upstream "#### 1,080"
    assert (test[0].id, test[0].answer) == ("gsm8k/test/0", "18")


def test_arc_splits_and_prompt(arc_dir):
    splits = {s: load_task("arc_challenge", s, arc_dir) for s in ("train", "validation", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 1119, "validation": 299, "test": 1172}
    first = splits["train"][0]
    assert first.id == "Mercury_SC_415702"
    assert first.question == (
        "Question: George wants to warm his hands quickly by rubbing them. "
        "Which skin surface will produce the most heat?\n"
        "Options: ['dry palms', 'wet palms', 'palms covered with oil', 'palms covered with lotion']\n"
        "Let's think step by step first then print your answer like 'The answer is (one of the options)'."
    )
    assert (first.answer, first.rationale) == ("dry palms", None)
    numeric_labels = splits["train"][16]  # labels "1".."4", answerKey "2"
    assert (numeric_labels.id, numeric_labels.answer) == ("NYSEDREGENTS_2004_8_31", "bubbles when acid is placed on it")
    # An option with an apostrophe is written the way Python's str(list) writes it.
    planet = next(e.question for e in splits["train"] if "core temperature" in e.question)
    assert "\"a planet's core temperature\"" in planet
    # AI2's original files (other schema, other names) give the same examples.
    original = os.path.join(arc_dir, "original")
    if os.path.isdir(original):
        for split, examples in splits.items():
            assert load_task("arc_challenge", split, original) == examples


GOOD_GSM8K = {"question": "What is 3+4?", "answer": "3+4=7\n#### 7"}
GOOD_ARC = {"id": "q1", "question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"}


@pytest.mark.parametrize(
    "task, lines, line, problem",
    [
        ("gsm8k", [GOOD_GSM8K, '{"question": "x", "answer": '], 2, "invalid JSON"),
        ("gsm8k", [{"question": "What is 3+4?"}], 1, "missing field 'answer'"),
        ("gsm8k", [GOOD_GSM8K, GOOD_GSM8K, {"question": "q", "answer": "7"}], 3, "no '#### ' line"),
        ("gsm8k", [{"question": "q", "answer": "so\n#### seven"}], 1, "'seven' is not a number"),
        ("gsm8k", [GOOD_GSM8K, {"question": 3, "answer": "#### 3"}], 2, "field 'question' has type int"),
        ("gsm8k", [GOOD_GSM8K, "   "], 2, "empty line"),
        ("arc_challenge", [GOOD_ARC, dict(GOOD_ARC, answerKey="E")], 2, "answerKey 'E' is not among the labels"),
        ("arc_challenge", [dict(GOOD_ARC, choices={"text": ["a"], "label": ["A", "B"]})], 1, "1 texts and 2 labels"),
        ("arc_challenge", [["not", "an", "object"]], 1, "expected a JSON object, got list"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, task, lines, line, problem):
    path = tmp_path / "test.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    with pytest.raises(DataError, match=re.escape(f"{path}:{line}: ") + ".*" + re.escape(problem)):
        load_task(task, "test", tmp_path)
    assert issubclass(DataError, ValueError)


def test_hub_source_and_validation_carving(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []
    rows = [{"question": f"q{i}?", "answer": f"#### {i}"} for i in range(30)]

    def fake_load_dataset(repo, config, split):
        calls.append((repo, config, split))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    validation = load_task("gsm8k", "validation")
    train = load_task("gsm8k", "train")
    assert calls == [("openai/gsm8k", "main", "train")] * 2
    assert len(validation) == 3 and len(train) == 27  # a tenth of a train split under 5,000 rows
    rows[4] = {"question": "q4?", "answer": "4"}
    with pytest.raises(DataError, match=re.escape("openai/gsm8k (main, test) row 5: GSM8K answer has no '#### '")):
        load_task("gsm8k", "test")


def test_source_and_split_errors(tmp_path):
    with pytest.raises(ValueError, match="arc_challenge has no split 'train_full'"):
        load_task("arc_challenge", "train_full", tmp_path)
    with pytest.raises(ValueError, match="task 'mmlu'"):
        load_task("mmlu", "test")
    with pytest.raises(FileNotFoundError, match="no test.jsonl"):
        load_task("gsm8k", "test", tmp_path)
    with pytest.raises(ValueError, match="no TFDS source"):
        load_task("gsm8k", "test", "tfds")
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
            load_task("arc_challenge", "test", "tfds")


@pytest.fixture(params=MODELS)
def model(request, test_data):
    return built(test_data, request.param)


@pytest.mark.parametrize("name, vectors", [("llama3", "llama-bpe"), ("phi3_5_mini", "phi-3")])
def test_tokenizer_builds_match_hf_test_vectors(test_data, name, vectors):
    """The builds above reproduce llama.cpp's test vectors, generated from the HF tokenizers."""
    folder = os.path.join(test_data, "tokenizers", "test_vectors")
    with open(require(os.path.join(folder, "ggml-vocab-llama-bpe.gguf.inp"))) as f:
        texts = f.read().split("\n__ggml_vocab_test__\n")[:-1]
    with open(require(os.path.join(folder, f"ggml-vocab-{vectors}.gguf.out"))) as f:
        expected = [[int(t) for t in line.split()] for line in f.read().splitlines()]
    _, tokenizer, _ = built(test_data, name)
    assert [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts] == expected


EXPECTED_PROMPTS = {
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{NATALIA}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "mistral_v0.3": f"<s>[INST] {NATALIA}[/INST]",
    "phi3_5_mini": f"<|user|>\n{NATALIA}<|end|>\n<|assistant|>\n",
}
# (first 5 ids, last 5 ids) of the encoded prompt. Phi-3's right-stripping special tokens absorb
# the newlines after <|user|>, <|end|> and <|assistant|>.
EXPECTED_PROMPT_IDS = {
    "llama3": ([128000, 128006, 9125, 128007, 271], [128009, 128006, 78191, 128007, 271]),
    "mistral_v0.3": ([1, 3, 24443, 1283, 4678], [4475, 1254, 4475, 29491, 4]),
    "phi3_5_mini": ([1, 32010, 26259, 423, 5239], [491, 4331, 29889, 32007, 32001]),
}
EXPECTED_FORMATS = {  # bos_token_id, end_token, stop_token_ids, pad_token_id
    "llama3": (128000, "<|eot_id|>", (128009, 128001, 128008), 128001),
    "mistral_v0.3": (1, "</s>", (2, 0), 0),
    "phi3_5_mini": (1, "<|end|>", (32000, 32007), 32000),
}
EXPECTED_ANSWER_IDS = {
    "llama3": [791, 4320, 374, 220, 5332, 13, 128009],
    "mistral_v0.3": [1183, 5140, 1117, 29473, 29555, 29518, 29491, 2],
    "phi3_5_mini": [450, 1234, 338, 29871, 29955, 29906, 29889, 32007],
}


def test_prompt_rendering_and_single_bos(model):
    name, tokenizer, fmt = model
    assert render_prompt(tokenizer, NATALIA) == EXPECTED_PROMPTS[name]
    (ids,) = encode_prompts(tokenizer, fmt, [NATALIA])
    assert (ids[:5], ids[-5:]) == EXPECTED_PROMPT_IDS[name]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_prompt_format_and_answer_suffix(model):
    name, tokenizer, fmt = model
    assert (fmt.bos_token_id, fmt.end_token, fmt.stop_token_ids, fmt.pad_token_id) == EXPECTED_FORMATS[name]
    SamplingConfig(stop_token_ids=fmt.stop_token_ids, stop_sequences=fmt.stop_sequences, pad_token_id=fmt.pad_token_id)
    assert encode_answers(tokenizer, fmt, ["72"]) == [EXPECTED_ANSWER_IDS[name]]
    assert tokenizer.decode(EXPECTED_ANSWER_IDS[name]) == "The answer is 72." + fmt.end_token


RATIONALE = "Natalia sold 48/2 = 24 clips in May, so 3+4=7."


def sampler_cuts(model, scripts):
    """Where the jitted sampler, with the model's real stops, cuts each scripted token list (None:
    no stop); `scripted_cuts` checks each row's tokens, length, pad and log-probs on the way."""
    _, tokenizer, fmt = model
    return scripted_cuts(scripts, len(tokenizer), stops_of(fmt))


def test_stop_sequences_cut_before_the_stop_string(model):
    """Each stop string, in running text after a rationale, is cut exactly where it starts (up
    to the whitespace before it, which a tokenizer may fuse into the token before the stop)."""
    _, tokenizer, _ = model
    texts = [RATIONALE + (stop if stop[0].isspace() else " " + stop) + " 7." for stop in STOP_STRINGS]
    scripts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    for stop, ids, cut in zip(STOP_STRINGS, scripts, sampler_cuts(model, scripts)):
        assert cut is not None, stop
        assert tokenizer.decode(ids[:cut]).rstrip() == RATIONALE, stop
        assert stop.strip().lower() in tokenizer.decode(ids[cut:]).lower(), stop


def first_completed(ids, fmt):
    """(end, sequences): the first token on which any stop sequence completes, and all that do,
    in `fmt.stop_sequences` order."""
    for end in range(len(ids)):
        done = [s for s in fmt.stop_sequences if len(s) <= end + 1 and tuple(ids[end + 1 - len(s) : end + 1]) == s]
        if done:
            return end, done
    return None, []


def test_stop_on_realistic_rationales(model):
    """Realistic endings through the sampler with the model's real stops. Two stop sequences that
    complete on the same token ("\\nThe answer is" / "The answer is", "So, the answer is" or
    "Therefore, the answer is" / " the answer is", "\\nAnswer:" / "Answer:") cut at the longest
    one's start, which in each of those rows is not the start of the one listed first: taking the
    first listed hit would keep a stray "\\n", "So," or "Therefore,"."""
    _, tokenizer, fmt = model
    end = tokenizer.convert_tokens_to_ids(fmt.end_token)

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    same_token = {  # text -> what is kept
        "Natalia sold 48 + 24 = 72 clips\nThe answer is 72.": "Natalia sold 48 + 24 = 72 clips",
        "We add: 3+4=7. Therefore, the answer is 7.": "We add: 3+4=7.",
        "She has 3 apples. So, the answer is 3.": "She has 3 apples.",
        "Natalia sold 72 clips\nAnswer: 72": "Natalia sold 72 clips",
    }
    other = {
        RATIONALE + " The answer is 7.": RATIONALE,
        RATIONALE + "\n\n**The answer is 7**": RATIONALE + "\n\n**",
        "Hence 3+4=7, so the final answer is 7.": "Hence 3+4=7,",  # five tokens, one stop
        "Then 3+4=7\nThe answer is: 7": "Then 3+4=7",  # stops before the ":" variant completes
    }
    texts = list(same_token) + list(other)
    scripts = [ids(t) for t in texts]
    scripts += [
        ids(RATIONALE) + [end] + ids(" The answer is 7."),  # a stop token before a stop sequence
        ids(RATIONALE + " The answer is 7.") + [end],  # a stop sequence before a stop token
        ids(RATIONALE),  # no stop: unfinished at max_new_tokens
    ]
    cuts = sampler_cuts(model, scripts)
    for text, script, cut in zip(texts, scripts, cuts):
        assert tokenizer.decode(script[:cut]) == (same_token | other)[text], text
    for text, script, cut in zip(same_token, scripts, cuts):
        last, done = first_completed(script, fmt)
        longest = max(map(len, done))
        assert len(done) >= 2 and len(done[0]) < longest, (text, done)  # the case this test is about
        assert cut == last + 1 - longest
    stop_first, stop_after, no_stop = cuts[len(texts) :]
    assert stop_first == len(ids(RATIONALE))
    assert tokenizer.decode(scripts[-2][:stop_after]) == RATIONALE
    assert no_stop is None


def test_load_tokenizer_from_checkpoint_dir(tmp_path, test_data):
    folder = os.path.join(test_data, "tokenizers", "mistral_v0.3")
    require(os.path.join(folder, "tokenizer.model"))
    build_mistral_v03(folder).save_pretrained(tmp_path / "hf")
    (tmp_path / "model_config.json").write_text("{}")
    tokenizer = load_tokenizer(tmp_path)
    assert render_prompt(tokenizer, NATALIA) == EXPECTED_PROMPTS["mistral_v0.3"]
    assert load_tokenizer(tmp_path / "hf")("Hello")["input_ids"] == tokenizer("Hello")["input_ids"]


# ---------------------------------------------------------------------------------------------
# Answer extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3+4=7. The answer is 7.", "7"),
        ("The answer is $1,000.", "1000"),
        ("The answer is 1,234,567 people", "1234567"),
        ("the answer is -5 degrees", "-5"),
        ("The answer is 3.50 dollars", "3.5"),
        ("The answer is: 7.0", "7"),
        ("The answer is .5", "0.5"),
        ("THE ANSWER IS 42", "42"),
        ("She has 12 apples and eats 5, leaving 7", "7"),  # no "the answer is": the last number
        ("The answer is 5. Recount: 3+4=7. The answer is 7. Done.", "7"),  # the last "the answer is"
        ("The answer is 18 - 3 = 15", "18"),  # the first number after it
        ("The answer is unclear; 4 + 4 = 8.", "4"),
        ("We have 3 apples. The answer is unknown.", "3"),  # no number after it: the last number
        ("Counts 7, 8 and 9", "9"),
        ("She has 10 and gives 5 away: 10-5", "5"),  # a subtraction's minus is no sign
        ("The answer is 10-5=5", "10"),
        ("It fell to -5 and then to 2.5-3", "3"),
        ("Then x = -12", "-12"),
        ("No numbers here.", None),
        ("", None),
    ],
)
def test_extract_gsm8k(text, expected):
    assert extract_gsm8k(text) == expected


def test_gsm8k_correct_and_canonical_numbers():
    assert gsm8k_correct("The answer is 7.0", "7")
    assert gsm8k_correct("The answer is $1,000", "1000")
    assert gsm8k_correct("The answer is 1000", "1,000")
    assert gsm8k_correct("The answer is -3.", "-3")
    assert not gsm8k_correct("The answer is 8", "7")
    assert not gsm8k_correct("no idea", "7")
    assert [canonical_number(x) for x in ("1,000.50", "-0", "100", "007", "abc", "nan")] == [
        "1000.5", "0", "100", "7", None, None,
    ]


@pytest.mark.parametrize(
    "text, gold, correct",
    [
        ("Rubbing dry skin makes heat. The answer is dry palms.", "dry palms", True),
        ("The answer is (A) Dry Palms", "dry palms", True),
        ("So the answer is: 'dry palms'", "dry palms", True),
        ("dry palms rub faster", "dry palms", False),  # no "the answer is"
        ("The answer is dry palms. No wait, the answer is wet palms.", "dry palms", False),  # the last one
        ("The answer is wet palms.", "dry palms", False),
    ],
)
def test_arc_correct(text, gold, correct):
    assert arc_correct(text, gold) is correct


def test_arc_extraction_and_choice():
    options = ("heat", "heat and light", "sound")
    assert extract_arc("Thus, The answer is Dry Palms.") == " dry palms."
    assert extract_arc("no final answer") is None
    assert arc_choice("The answer is heat and light.", options) == "heat and light"  # longest at the same place
    assert arc_choice("The answer is sound, not heat.", options) == "sound"  # the first named
    assert arc_choice("The answer is none of them.", options) is None
    assert arc_choice("heat", options) is None


def test_evaluation_scores_by_latro_md_rules():
    """`evaluate.score`: greedy ARC answers are right when the gold option's text occurs after "the
    answer is" (LATRO.md), even beside another option; maj@k votes with the option each sample names
    first; GSM8K compares numbers by value. Counted by hand below."""
    options = ("heat", "heat and light", "sound")
    arc = [Example("arc_challenge", f"q{i}", "?", gold, None, options) for i, gold in enumerate(["heat", "sound", "heat"])]
    greedy = [
        "Light bulbs glow. The answer is heat and light.",  # gold "heat" occurs: right (arc_choice names "heat and light")
        "The answer is cold or sound.",  # right
        "The answer is sound.",  # wrong
    ]
    voted = [
        ["The answer is heat and light.", "The answer is heat and light.", "The answer is heat."],  # votes "heat and light": wrong
        ["The answer is sound.", "no answer", "The answer is heat."],  # tie 1-1: "sound" first: right
        ["I am not sure.", "Neither.", "The answer is heat."],  # "heat": right
    ]
    result = score("arc_challenge", arc, greedy, voted, 3)
    assert [r["greedy_correct"] for r in result["rows"]] == [True, True, False]
    assert [r["maj@3"] for r in result["rows"]] == ["heat and light", "sound", "heat"]
    assert result["greedy_accuracy"] == pytest.approx(2 / 3) and result["maj@3_accuracy"] == pytest.approx(2 / 3)
    assert result["examples"] == 3 and result["rows"][0]["greedy_answer"] == "heat and light"

    gsm = [Example("gsm8k", "g0", "?", "1,000"), Example("gsm8k", "g1", "?", "7")]
    result = score("gsm8k", gsm, ["So the answer is 1000.00", "The answer is 8"],
                   [["The answer is 7", "The answer is $1,000"], ["7", "The answer is 7.0"]], 2)
    assert [r["greedy_correct"] for r in result["rows"]] == [True, False]
    assert [r["maj@2"] for r in result["rows"]] == ["7", "7"]  # the tie goes to the first
    assert result["greedy_accuracy"] == 0.5 and result["maj@2_accuracy"] == 0.5
    with pytest.raises(ValueError):  # a missing generation is an error, not a shorter count
        score("gsm8k", gsm, ["The answer is 1000"], [["7"], ["7"]], 1)


def test_majority_vote():
    assert majority_vote(["7", "8", "7"]) == "7"
    assert majority_vote(["8", "7", "7", "8"]) == "8"  # tie: the earliest first occurrence
    assert majority_vote([None, "3", None, "4"]) == "3"  # None does not vote
    assert majority_vote([None, None, "5"]) == "5"
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None
    samples = ["The answer is 7.0", "The answer is $7", "The answer is 8", "I give up"]
    assert majority_vote([extract_gsm8k(t) for t in samples]) == "7"  # numbers vote by value
    arc = ["The answer is dry palms.", "The answer is (B) wet palms", "the answer is DRY PALMS"]
    assert majority_vote([arc_choice(t, ("dry palms", "wet palms")) for t in arc]) == "dry palms"
