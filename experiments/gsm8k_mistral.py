"""LaTRO on gsm8k with mistral, the released recipe."""

from _recipe import latro


def config():
    return latro("gsm8k_mistral", "mistral", "gsm8k")
