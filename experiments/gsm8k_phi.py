"""LaTRO on gsm8k with phi, the released recipe."""

from _recipe import latro


def config():
    return latro("gsm8k_phi", "phi", "gsm8k")
