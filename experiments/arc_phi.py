"""LaTRO on arc_challenge with phi, the released recipe."""

from _recipe import latro


def config():
    return latro("arc_phi", "phi", "arc_challenge")
