"""LaTRO on gsm8k with llama, the released recipe."""

from _recipe import latro


def config():
    return latro("gsm8k_llama", "llama", "gsm8k")
