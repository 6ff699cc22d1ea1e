"""The SFT baseline on arc_challenge with llama."""

from _recipe import sft


def config():
    return sft("arc_llama_sft", "llama", "arc_challenge")
