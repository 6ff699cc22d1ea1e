"""One whole LaTRO update of the released recipe's shape, on random weights: sample, score, update,
each phase timed, with the device's peak memory.

    python tools/bench_update.py                   # Llama-3.1-8B shape, bf16 base + LoRA r=16 (one GPU)
    python tools/bench_update.py --config tiny     # the same code path at a toy size (any CPU, ~1 min)
    python tools/bench_update.py --json update.json

The recipe (experiments/_recipe.py): 24 questions x K=16 rationales of up to L=500 tokens, the
answer reward continuing the sampler's cache, one reference forward (the frozen base is pi_0),
then one AdamW step on the adapters over the 384 rows in micro-batches of 4, bf16 compute with
`remat="projections"`. Random weights never sample a stop token, so every rationale runs the
whole 500 tokens: the update's worst case. Prompts are random tokens of `--prompt-len` (GSM8K's
prompts with the chat template run ~150-250 tokens; the bucket is 256), answers of 8 tokens.

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

from latro_jax.config import ModelConfig, RopeConfig
from latro_jax.experiment import OptimSpec
from latro_jax.lora import LoraConfig, LoraRowsLoss, init_adapters, merge
from latro_jax.model import init_params
from latro_jax.objective import ObjectiveConfig
from latro_jax.rollout import Questions, rollout
from latro_jax.sampling import SamplingConfig
from latro_jax.update import commit, latro_rows_loss, make_optimizer, update_jit


@dataclasses.dataclass(frozen=True)
class UpdateShape:
    model: ModelConfig
    questions: int
    samples: int
    new_tokens: int
    prompt_len: int
    answer_len: int
    micro_batch: int
    score_batch: int
    lora_rank: int


LLAMA_8B = ModelConfig(
    "llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
    num_kv_heads=8, head_dim=128, max_position_embeddings=131072,
    rope=RopeConfig(theta=500000.0, type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192),
    dtype="bfloat16", param_dtype="bfloat16", remat="projections",
)
SHAPES = {
    "recipe-8b": UpdateShape(LLAMA_8B, questions=24, samples=16, new_tokens=500, prompt_len=200, answer_len=8,
                             micro_batch=4, score_batch=16, lora_rank=16),
    "tiny": UpdateShape(
        LLAMA_8B.replace(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, sliding_windows=(None, None)),
        questions=4, samples=4, new_tokens=40, prompt_len=20, answer_len=8, micro_batch=4, score_batch=8,
        lora_rank=4,
    ),
}
RECIPE = ObjectiveConfig(beta=0.05, sft_coef=0.0)
OPTIM = OptimSpec(learning_rate=5e-7, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)


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
    config = shape.model
    print(f"{args.config}: {shape.questions} questions x K={shape.samples}, L={shape.new_tokens}, prompts of "
          f"{shape.prompt_len} tokens, LoRA r={shape.lora_rank}, {config.num_layers} layers, {config.dtype}; "
          f"{jax.devices()}", flush=True)

    began = time.perf_counter()
    base = init_params(config, seed=0)  # the frozen base, which is also pi_0
    lora = LoraConfig(shape.lora_rank, 16.0)
    adapters = init_adapters(config, lora, jax.random.key(1))
    optimizer = make_optimizer(OPTIM, updates=117)
    state = list(commit((adapters, optimizer.init(adapters))))
    jax.block_until_ready(base)
    print(f"random weights in {time.perf_counter() - began:.0f} s; peak memory {peak_memory_gib()} GiB", flush=True)

    rng = np.random.default_rng(0)
    q, a = shape.questions, shape.answer_len
    questions = Questions(
        prompt_tokens=rng.integers(3, config.vocab_size, (q, shape.prompt_len)).astype(np.int32),
        prompt_mask=np.ones((q, shape.prompt_len), bool),
        answers=rng.integers(3, config.vocab_size, (q, a)).astype(np.int32),
        answer_lengths=np.full((q,), a, np.int32),
    )
    sampling = SamplingConfig(max_new_tokens=shape.new_tokens, num_samples=shape.samples, temperature=1.0)
    update_step = update_jit(*state)
    rows_loss = LoraRowsLoss(latro_rows_loss, lora)
    merge_jit = jax.jit(merge, static_argnums=0)

    def one_update(step: int) -> dict:
        started = time.perf_counter()
        policy = jax.block_until_ready(merge_jit(lora, base, state[0]))
        merged = time.perf_counter()
        scored, out = rollout(config, RECIPE, sampling, policy, base, questions, jax.random.key(step),
                              shape.score_batch, args.rollout_batch)
        del policy
        rows = dict(tokens=scored.tokens, attention_mask=scored.attention_mask, rationale_mask=scored.rationale_mask,
                    answer_mask=scored.answer_mask, advantages=scored.advantages)
        update_started = time.perf_counter()
        params, opt_state, metrics = update_step(config, RECIPE, optimizer, shape.micro_batch, rows_loss,
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
              "devices": str(jax.devices()), "jax": jax.__version__, "first_update": first, "update": timed,
              "peak_memory_gib": peak_memory_gib(), "sampler_tokens_per_s": timed["generated_tokens"] / timed["sample_s"]}
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
