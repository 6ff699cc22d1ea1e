"""Convert a llama2.c checkpoint (Karpathy's legacy v0 `.bin` export) to a latro-jax checkpoint.

    python tools/convert_llama2c.py stories260K.bin checkpoints/stories260K --tokenizer tok512.model
"""

from __future__ import annotations


import _cli


def main() -> None:
    parser = _cli.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint", help="llama2.c .bin file (legacy v0 export)")
    parser.add_argument("output", help="checkpoint directory to create (must not exist)")
    parser.add_argument("--tokenizer", help="the sentencepiece tokenizer.model to store with it (hf/tokenizer.model)")
    parser.add_argument("--param-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype to store params in (default: float32, the file's own)")
    args = parser.parse_args()
    from latro_jax.convert.llama2c import convert_llama2c

    config = convert_llama2c(args.checkpoint, args.output, args.tokenizer, param_dtype=args.param_dtype)
    print(f"{args.checkpoint} -> {args.output}: llama, {config.num_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_heads} heads ({config.num_kv_heads} kv), vocab {config.vocab_size}, "
          f"{'tied' if config.tie_word_embeddings else 'untied'} embeddings, params {config.param_dtype}, "
          f"{'tokenizer stored' if args.tokenizer else 'no tokenizer'}")


if __name__ == "__main__":
    _cli.run(main)
