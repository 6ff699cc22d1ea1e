"""The SFT baseline on gsm8k with phi."""

from _recipe import sft


def config():
    return sft("gsm8k_phi_sft", "phi", "gsm8k")
