"""Export a latro-jax checkpoint as a Hugging Face model directory (safetensors, config,
generation config, tokenizer files) for transformers or vLLM.

    python tools/export_hf.py checkpoints/run1/final exported/llama31-latro --dtype bfloat16
"""

from __future__ import annotations

import argparse

import _cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="latro-jax model checkpoint directory")
    parser.add_argument("output", help="HF directory to create (must not exist)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the exported tensors (default: the source HF model's, else the params')")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    args = parser.parse_args()
    from latro_jax.convert.hf import export_hf

    export_hf(args.checkpoint, args.output, dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(f"{args.checkpoint} -> {args.output}")


if __name__ == "__main__":
    _cli.run(main)
