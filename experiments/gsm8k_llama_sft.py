"""The SFT baseline on gsm8k with llama."""

from _recipe import sft


def config():
    return sft("gsm8k_llama_sft", "llama", "gsm8k")
