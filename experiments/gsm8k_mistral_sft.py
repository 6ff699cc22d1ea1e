"""The SFT baseline on gsm8k with mistral."""

from _recipe import sft


def config():
    return sft("gsm8k_mistral_sft", "mistral", "gsm8k")
