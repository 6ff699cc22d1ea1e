"""LaTRO on arc_challenge with llama, the released recipe."""

from _recipe import latro


def config():
    return latro("arc_llama", "llama", "arc_challenge")
