"""The SFT baseline on arc_challenge with phi."""

from _recipe import sft


def config():
    return sft("arc_phi_sft", "phi", "arc_challenge")
