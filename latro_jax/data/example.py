"""One question of a task, as every task's loader gives it."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Example:
    """One question.

    question: the user message, before the chat template (GSM8K_PROMPT / ARC_PROMPT filled in).
    answer: the gold answer (GSM8K: the number after "#### ", commas removed; ARC: the text of
        the correct option); LaTRO appends "The answer is {answer}." after each rationale.
    rationale: the SFT baseline's target, the GSM8K solution with "####" replaced by "The
        answer is" (as the released SFT script: calculator annotations <<...>> kept, answer as
        written upstream). None for ARC, which has no gold rationales.
    options: ARC option texts in their listed order (for majority votes); () for GSM8K.
    id: "gsm8k/{upstream split}/{0-based row}" or the ARC question id.
    """

    task: str
    id: str
    question: str
    answer: str
    rationale: str | None = None
    options: tuple[str, ...] = ()
