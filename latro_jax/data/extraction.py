"""Answers out of generated text, correctness, and majority votes (maj@k).

GSM8K: the first number after the last "the answer is" (case-insensitive), otherwise the last
number in the text; commas between digit groups removed; a minus sign right after a digit or
"." is a subtraction, not the next number's sign ("10-5" holds 10 and 5); numbers compared by
value, so "7.0", "7" and "$7" agree. Answers are canonical decimal strings ("1000", "-3", "0.5").

ARC: the lower-cased text after the last "the answer is"; correct if the lower-cased gold option
text is in it. Without "the answer is" nothing is extracted and the answer is wrong. For majority
votes an ARC answer is the option it names (`arc_choice`), so "dry palms." and "(A) dry palms"
vote together.

Other tasks (`latro_jax.data.tasks.Task`) name one of the MATCH_RULES; `AnswerRule` applies it,
with the answer marker of the task's answer template ("The answer is" unless the task says
otherwise). GSM8K and the synthetic arithmetic are the `number` rule, ARC-Challenge the `choice` rule.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections import Counter
from collections.abc import Hashable, Sequence
from decimal import Decimal, InvalidOperation
from typing import TypeVar

# A number: digits with optional thousands commas and decimals, or a bare decimal (".5"). A minus
# sign is its own only where no digit or decimal point comes just before it: "10-5" is 10 and 5
# (a subtraction), not 10 and -5; "x = -5" is -5.
NUMBER = re.compile(r"(?:(?<![\d.])-)?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
ANSWER_IS = re.compile(r"the answer is", re.IGNORECASE)

Answer = TypeVar("Answer", bound=Hashable)

MATCH_RULES = ("number", "exact", "normalized", "contains", "choice")
ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def canonical_number(text: str) -> str | None:
    """The value of a number written with optional commas as a canonical string ("1,000.50" ->
    "1000.5", "-0" -> "0"); None if `text` is not a number."""
    try:
        value = Decimal(text.strip().replace(",", ""))
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    value = value.normalize() + 0  # + 0 turns -0 into 0
    return format(value, "f")


def extract_gsm8k(text: str, marker: re.Pattern = ANSWER_IS) -> str | None:
    """The canonical number a GSM8K rationale answers, or None if the text has no number: the
    first after the last `marker`, else the last in the text."""
    occurrences = list(marker.finditer(text))
    if occurrences:
        after = NUMBER.search(text, occurrences[-1].end())
        if after is not None:
            return canonical_number(after.group())
    numbers = NUMBER.findall(text)
    return canonical_number(numbers[-1]) if numbers else None


def gsm8k_correct(text: str, gold: str) -> bool:
    """Whether the number extracted from `text` equals the gold answer's value."""
    answer = extract_gsm8k(text)
    return answer is not None and answer == canonical_number(gold)


def extract_arc(text: str, marker: str = "the answer is") -> str | None:
    """The lower-cased text after the last `marker` (any case), or None if there is none."""
    parts = text.lower().rsplit(marker.lower(), 1)
    return parts[1] if len(parts) == 2 else None


def arc_correct(text: str, gold: str, marker: str = "the answer is") -> bool:
    """Whether the lower-cased gold option text occurs in the extracted answer."""
    answer = extract_arc(text, marker)
    return answer is not None and gold.lower() in answer


def arc_choice(text: str, options: Sequence[str], marker: str = "the answer is") -> str | None:
    """The option the extracted answer names: of the options whose lower-cased text occurs in it,
    the one occurring first, the longest on a tie ("heat and light" over "heat"); None if none."""
    answer = extract_arc(text, marker)
    if answer is None:
        return None
    found = [(answer.find(o.lower()), -len(o), i) for i, o in enumerate(options) if o.lower() in answer]
    return options[min(found)[2]] if found else None


def majority_vote(answers: Sequence[Answer | None]) -> Answer | None:
    """The most frequent answer, None answers (nothing extracted) not voting; among answers tied
    for most votes the one that occurs first in `answers`. None if no answer was extracted."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    most = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == most)


def final_answer(text: str, marker: str = "The answer is", closing: str = ".") -> str | None:
    """The free-text answer a generation gives: after the last `marker` (any case; a colon after
    it skipped), to the end of its line or to the first `closing` followed by whitespace or the
    end ("The answer is Paris. It is..." -> "Paris"; "3.5." -> "3.5"), stripped. None if the
    text has no marker or nothing follows it."""
    occurrences = list(re.finditer(re.escape(marker), text, re.IGNORECASE))
    if not occurrences:
        return None
    rest = text[occurrences[-1].end():]
    rest = rest.lstrip().removeprefix(":").lstrip().split("\n", 1)[0]
    if closing:
        rest = re.split(re.escape(closing) + r"(?:\s|$)", rest, maxsplit=1)[0]
    return rest.strip() or None


def normalize(text: str) -> str:
    """Text compared by the `normalized` and `contains` rules: lower-cased, punctuation removed,
    the articles a / an / the removed, whitespace collapsed (SQuAD's answer normalisation)."""
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.lower())
    return " ".join(ARTICLES.sub(" ", text).split())


@dataclasses.dataclass(frozen=True)
class AnswerRule:
    """How a generation's answer is compared with the gold one (`match`, one of MATCH_RULES):

    number      the number after the last marker (else the last number) equals the gold number by
                value ("7.0", "$7" and "7" agree): GSM8K, arithmetic
    exact       the free-text answer (`final_answer`) equals the gold answer, both stripped
    normalized  the same after `normalize`: case, punctuation, articles and spacing ignored
    contains    the normalized gold answer occurs, as whole words, in the normalized answer
    choice      multiple choice: a generation is correct if the gold option's lower-cased text
                occurs in the lower-cased text after the marker (ARC, as the paper scored it);
                a sample votes for the option it names first (`arc_choice`)

    marker: the answer template's text before {answer} ("The answer is"); closing: its text after
    ("."). `answer` is what a sample votes with (None: nothing extracted, no vote); `agrees` tells
    whether such an answer is right; `correct` judges one generation.
    """

    match: str
    marker: str = "The answer is"
    closing: str = "."

    def __post_init__(self):
        if self.match not in MATCH_RULES:
            raise ValueError(f"unknown match rule {self.match!r}; allowed: {', '.join(MATCH_RULES)}")
        if not self.marker.strip():
            raise ValueError("the answer marker (the answer template's text before {answer}) is empty")

    def answer(self, text: str, options: Sequence[str] = ()) -> str | None:
        if self.match == "number":
            return extract_gsm8k(text, re.compile(re.escape(self.marker), re.IGNORECASE))
        if self.match == "choice":
            return arc_choice(text, options, self.marker)
        found = final_answer(text, self.marker, self.closing)
        if found is None or self.match == "exact":
            return found
        return normalize(found) or None

    def gold(self, answer: str) -> str | None:
        """The gold answer in the form `answer` gives (None: not a number, for `number`)."""
        if self.match == "number":
            return canonical_number(answer)
        if self.match in ("normalized", "contains"):
            return normalize(answer)
        return answer.strip() if self.match == "exact" else answer

    def agrees(self, answer: str | None, gold_answer: str) -> bool:
        gold = self.gold(gold_answer)
        if answer is None or gold is None:
            return False
        return f" {gold} " in f" {answer} " if self.match == "contains" else answer == gold

    def correct(self, text: str, gold_answer: str, options: Sequence[str] = ()) -> bool:
        if self.match == "choice":
            return arc_correct(text, gold_answer, self.marker)
        return self.agrees(self.answer(text, options), gold_answer)
