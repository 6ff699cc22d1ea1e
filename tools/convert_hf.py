"""Convert a Hugging Face model (local directory or hub id) to a latro-jax checkpoint.

    python tools/convert_hf.py meta-llama/Llama-3.1-8B-Instruct checkpoints/llama31-8b
    python tools/convert_hf.py ./my-hf-model checkpoints/mine --param-dtype float32
"""

from __future__ import annotations


import _cli


def main() -> None:
    parser = _cli.ArgumentParser(description=__doc__)
    parser.add_argument("source", help="HF model directory with *.safetensors, or a hub id to download")
    parser.add_argument("output", help="checkpoint directory to create (must not exist)")
    parser.add_argument("--param-dtype", choices=["float32", "bfloat16", "float16"],
                        help="dtype to store params in (default: the checkpoint's own)")
    args = parser.parse_args()
    from latro_jax.convert.hf import convert_hf

    config = convert_hf(args.source, args.output, param_dtype=args.param_dtype)
    print(f"{args.source} -> {args.output}: {config.model_type}, {config.num_layers} layers, "
          f"hidden {config.hidden_size}, vocab {config.vocab_size}, params {config.param_dtype}")


if __name__ == "__main__":
    _cli.run(main)
