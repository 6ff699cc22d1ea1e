"""The SFT baseline on arc_challenge with mistral."""

from _recipe import sft


def config():
    return sft("arc_mistral_sft", "mistral", "arc_challenge")
