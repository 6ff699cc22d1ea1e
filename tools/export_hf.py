"""Export a model as a Hugging Face model directory (safetensors, config, generation config,
tokenizer files) for transformers or vLLM.

    python tools/export_hf.py runs/gsm8k_llama/best/117 exported/llama31-latro --dtype bfloat16

The model is a training run's checkpoint step (runs/<exp>/best/<step> or
runs/<exp>/checkpoints/<step>; a LoRA run's adapters are merged into its base) or a latro-jax
model checkpoint (`make convert` output). A run step is read onto the CPU, its params only.
"""

from __future__ import annotations


import _cli


def main() -> None:
    parser = _cli.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint", help="a training run's checkpoint step or a latro-jax model checkpoint directory")
    parser.add_argument("output", help="HF directory to create (must not exist)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the exported tensors (default: the source HF model's, else the params')")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 500MB (default 5GB)")
    args = parser.parse_args()
    import jax

    from latro_jax.checkpoint import check_output
    from latro_jax.convert.hf import export_hf, export_params, shard_size
    from latro_jax.runs import is_run_step, load_run_step

    check_output(args.output)  # a bad output or size is said before the model is read
    max_shard_size = shard_size(args.max_shard_size, "--max-shard-size")
    if is_run_step(args.checkpoint):
        step = load_run_step(args.checkpoint, device=jax.devices("cpu")[0])
        export_params(step.config, step.params, step.hf_files, args.output, args.dtype, max_shard_size)
    else:
        export_hf(args.checkpoint, args.output, dtype=args.dtype, max_shard_size=max_shard_size)
    print(f"{args.checkpoint} -> {args.output}")


if __name__ == "__main__":
    _cli.run(main)
