"""One whole LaTRO update of the released recipe's shape, on random weights: sample, score, update,
each phase timed, with the device's peak memory.

    python tools/bench_update.py                   # Llama-3.1-8B shape, bf16 base + LoRA r=16 (one GPU)
    python tools/bench_update.py --config tiny     # the same code path at a toy size (any CPU, ~1 min)
    python tools/bench_update.py --json update.json

The recipe is read from experiments/gsm8k_llama.py (with model.lora_rank=16): 24 questions x K=16
rationales of up to L=500 tokens, the answer reward continuing the sampler's cache, one reference
forward (the frozen base is pi_0), then one AdamW step on the adapters over the 384 rows in
micro-batches of 4, bf16 compute with remat "projections"; the model is tools/bench.py's 8B shape.
Random weights never sample a stop token, so every rationale runs the whole 500 tokens: the
update's worst case. Prompts are 200 random tokens (GSM8K's prompts with the chat template run
~150-250 tokens; the bucket is 256), answers 8.

The update runs twice: the first call compiles, the second is timed. Its phases are the ones
`train.run` logs (time_sample_s, time_score_s, time_update_s), from the same functions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import CONFIGS  # tools/bench.py, beside this file
from latro_jax.config import ModelConfig
from latro_jax.experiment import load_experiment
from latro_jax.lora import LoraRowsLoss, init_adapters, lora_config, merge_jit
from latro_jax.model import init_params
from latro_jax.rollout import Questions, rollout
from latro_jax.sampling import SamplingConfig
from latro_jax.update import commit, latro_rows_loss, make_optimizer, policy_param_dtype, update_jit


@dataclasses.dataclass(frozen=True)
class UpdateShape:
    """A model shape of tools/bench.py's, the experiment whose update runs on it (with overrides,
    as `make train` takes them), and the random questions' lengths."""

    bench_config: str
    overrides: tuple[str, ...]
    prompt_len: int
    answer_len: int


# The released recipe (experiments/_recipe.py) as gsm8k_llama runs it, with LoRA r=16 on one GPU.
SHAPES = {
    "recipe-8b": UpdateShape("llama8b", ("model.lora_rank=16",), prompt_len=200, answer_len=8),
    "tiny": UpdateShape("llama8b-tiny", ("model.lora_rank=4", "rollout.num_samples=4", "rollout.max_new_tokens=40",
                                         "train.questions_per_update=4", "train.score_batch=8"),
                        prompt_len=20, answer_len=8),
}


def peak_memory_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(SHAPES), default="recipe-8b")
    parser.add_argument("--rollout-batch", type=int, default=0,
                        help="questions sampled and scored at a time (0 = all 24), as train.rollout_batch")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    shape = SHAPES[args.config]
    exp = load_experiment("gsm8k_llama", list(shape.overrides))
    t, lora = exp.train, lora_config(exp.model)
    config = ModelConfig.from_hf({"model_type": "llama", **CONFIGS[shape.bench_config].llama}, dtype=exp.model.dtype,
                                 param_dtype=policy_param_dtype(exp.model), remat=exp.model.remat)
    print(f"{args.config}: {t.questions_per_update} questions x K={exp.rollout.num_samples}, "
          f"L={exp.rollout.max_new_tokens}, prompts of {shape.prompt_len} tokens, LoRA r={lora.rank}, "
          f"{config.num_layers} layers, {config.dtype}; {jax.devices()}", flush=True)

    began = time.perf_counter()
    base = init_params(config, seed=0)  # the frozen base, which is also pi_0
    adapters = init_adapters(config, lora, jax.random.key(1))
    optimizer = make_optimizer(exp.optim, t.updates)
    state = list(commit((adapters, optimizer.init(adapters))))
    jax.block_until_ready(base)
    print(f"random weights in {time.perf_counter() - began:.0f} s; peak memory {peak_memory_gib()} GiB", flush=True)

    rng = np.random.default_rng(0)
    q, a = t.questions_per_update, shape.answer_len
    questions = Questions(
        prompt_tokens=rng.integers(3, config.vocab_size, (q, shape.prompt_len)).astype(np.int32),
        prompt_mask=np.ones((q, shape.prompt_len), bool),
        answers=rng.integers(3, config.vocab_size, (q, a)).astype(np.int32),
        answer_lengths=np.full((q,), a, np.int32),
    )
    sampling = SamplingConfig(max_new_tokens=exp.rollout.max_new_tokens, num_samples=exp.rollout.num_samples,
                              temperature=exp.rollout.temperature)
    update_step = update_jit(*state)
    rows_loss = LoraRowsLoss(latro_rows_loss, lora)

    def one_update(step: int) -> dict:
        started = time.perf_counter()
        policy = jax.block_until_ready(merge_jit(lora, base, state[0]))
        merged = time.perf_counter()
        scored, out = rollout(config, exp.objective, sampling, policy, base, questions, jax.random.key(step),
                              t.score_batch, args.rollout_batch)
        del policy
        rows = dict(tokens=scored.tokens, attention_mask=scored.attention_mask, rationale_mask=scored.rationale_mask,
                    answer_mask=scored.answer_mask, advantages=scored.advantages)
        update_started = time.perf_counter()
        params, opt_state, metrics = update_step(config, exp.objective, optimizer, t.micro_batch, rows_loss,
                                                 int(out.prompt_slots), state[0], state[1], rows, base)
        state[:] = jax.block_until_ready((params, opt_state))
        done = time.perf_counter()
        return {
            "merge_s": merged - started, "sample_s": scored.metrics["time_sample_s"],
            "score_s": scored.metrics["time_score_s"], "update_s": done - update_started, "total_s": done - started,
            "rows": int(scored.tokens.shape[0]), "tokens_per_row": int(scored.tokens.shape[1]),
            "generated_tokens": int(jnp.sum(out.lengths)), "decode_steps": int(out.steps),
            "loss": float(metrics["loss"]), "skipped": int(metrics["skipped"]),
        }

    first = one_update(0)
    print(f"first update (compiles): {first['total_s']:.1f} s", flush=True)
    timed = one_update(1)
    result = {"config": args.config, "shape": dataclasses.asdict(shape) | {"model": str(config)},
              "experiment": dataclasses.asdict(exp), "devices": str(jax.devices()), "jax": jax.__version__,
              "first_update": first, "update": timed, "peak_memory_gib": peak_memory_gib(),
              "sampler_tokens_per_s": timed["generated_tokens"] / timed["sample_s"]}
    print(f"\nwhole update {timed['total_s']:.2f} s (goal <= 60 s on one H100/H200): merge {timed['merge_s']:.1f} s, "
          f"sample {timed['sample_s']:.1f} s ({result['sampler_tokens_per_s']:.0f} tokens/s, {timed['decode_steps']} "
          f"decode steps), score {timed['score_s']:.1f} s, update {timed['update_s']:.1f} s; {timed['rows']} rows x "
          f"{timed['tokens_per_row']} tokens; loss {timed['loss']:.4g}; peak memory {result['peak_memory_gib']} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
