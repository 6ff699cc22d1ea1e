"""LaTRO on arc_challenge with mistral, the released recipe."""

from _recipe import latro


def config():
    return latro("arc_mistral", "mistral", "arc_challenge")
