"""Answers out of generated text, correctness, and majority votes (maj@k).

GSM8K: the first number after the last "the answer is" (case-insensitive), otherwise the last
number in the text; commas between digit groups removed; a minus sign right after a digit or
"." is a subtraction, not the next number's sign ("10-5" holds 10 and 5); numbers compared by
value, so "7.0", "7" and "$7" agree. Answers are canonical decimal strings ("1000", "-3", "0.5").

ARC: the lower-cased text after the last "the answer is"; correct if the lower-cased gold option
text is in it. Without "the answer is" nothing is extracted and the answer is wrong. For majority
votes an ARC answer is the option it names (`arc_choice`), so "dry palms." and "(A) dry palms"
vote together.
"""

from __future__ import annotations

import re
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


def extract_gsm8k(text: str) -> str | None:
    """The canonical number a GSM8K rationale answers, or None if the text has no number."""
    occurrences = list(ANSWER_IS.finditer(text))
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


def extract_arc(text: str) -> str | None:
    """The lower-cased text after the last "the answer is", or None if there is none."""
    parts = text.lower().rsplit("the answer is", 1)
    return parts[1] if len(parts) == 2 else None


def arc_correct(text: str, gold: str) -> bool:
    """Whether the lower-cased gold option text occurs in the extracted answer."""
    answer = extract_arc(text)
    return answer is not None and gold.lower() in answer


def arc_choice(text: str, options: Sequence[str]) -> str | None:
    """The option the extracted answer names: of the options whose lower-cased text occurs in it,
    the one occurring first, the longest on a tie ("heat and light" over "heat"); None if none."""
    answer = extract_arc(text)
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
