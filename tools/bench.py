"""Sampler and scorer throughput of latro-jax beside transformers, on the same weights.

    python tools/bench.py                          # cpu-small: a ~20M-parameter Llama, float32, CPU
    python tools/bench.py --config llama8b         # Llama-3.1-8B shape, random bf16 weights (a GPU)
    python tools/bench.py --batch 8 --new-tokens 32 --repeats 5 --json bench.json

One transformers `LlamaForCausalLM` is initialised at random, saved with `save_pretrained`,
converted with `convert_hf` and loaded with `load_model`, so both sides hold identical weights.
Both generate exactly `--new-tokens` tokens per row from the same random prompts (no stop
tokens, no EOS) by sampling at temperature 1 with no top-k/top-p (`--greedy`: argmax on both).
Times exclude compilation: one warm-up call, then the median of `--repeats` timed calls.

The hardware bound is a roofline per phase: the prefill and each decode step take at least
max(FLOPs / matmul rate, bytes read / memory bandwidth). The matmul rate (a large square matmul
in the compute dtype) and the bandwidth (a large on-device copy) are measured in the same run. On
CPU the FLOP term dominates; on a GPU a decode step's bytes (weights + KV cache) usually do.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# torch and JAX share the GPU: JAX must not reserve most of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from latro_jax.checkpoint import load_model  # noqa: E402
from latro_jax.config import ModelConfig  # noqa: E402
from latro_jax.convert.hf import convert_hf  # noqa: E402
from latro_jax.sampling import SamplingConfig, sample_padded  # noqa: E402
from latro_jax.scoring import token_logprobs  # noqa: E402


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """A model shape (LlamaConfig keyword arguments) and the workload run on it."""

    llama: dict
    dtype: str  # params and compute
    batch: int
    prompt_len: int
    new_tokens: int
    score_batch: int  # the scorer's batch: transformers materialises [batch, seq, vocab] logits
    repeats: int
    matmul_size: int  # side of the square matmul that measures the FLOP rate
    copy_bytes: int  # size of the copy that measures memory bandwidth


CONFIGS = {
    "cpu-small": BenchConfig(
        llama=dict(
            vocab_size=32000,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=64,
            max_position_embeddings=2048,
        ),
        dtype="float32",
        batch=16,
        prompt_len=64,
        new_tokens=64,
        score_batch=16,
        repeats=3,
        matmul_size=2048,
        copy_bytes=1 << 28,
    ),
    "llama8b": BenchConfig(
        llama=dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
        ),
        dtype="bfloat16",
        batch=256,
        prompt_len=128,
        new_tokens=256,
        score_batch=16,
        repeats=3,
        matmul_size=8192,
        copy_bytes=1 << 32,
    ),
}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------- timing and hardware rates


def median_seconds(*runs: Callable[[], object], repeats: int) -> list[float]:
    """Median wall time of each run, which must block until its work is done and must have been
    called once already (compiled, warmed up). The runs take turns, so a change in background
    load slows all of them alike."""
    times = [[] for _ in runs]
    for _ in range(repeats):
        for run, run_times in zip(runs, times):
            start = time.perf_counter()
            run()
            run_times.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def matmul_rate(size: int, dtype: str) -> float:
    """Measured FLOP/s of a [size, size] @ [size, size] matmul in `dtype`."""
    a, b = (jax.random.normal(jax.random.key(i), (size, size), dtype) for i in range(2))
    matmul = jax.jit(jnp.matmul)

    def run():
        return matmul(a, b).block_until_ready()

    run()
    [seconds] = median_seconds(run, repeats=5)
    return 2 * size**3 / seconds


def copy_bandwidth(num_bytes: int) -> float:
    """Measured bytes/s of an on-device copy, each byte read once and written once. The buffer is
    donated and rewritten in place: a fresh output each call would time the allocator's page
    faults on CPU, not memory."""
    step = jax.jit(lambda x: x + 1, donate_argnums=0)
    buffer = [jnp.zeros(num_bytes // 4, jnp.float32)]

    def run():
        buffer[0] = step(buffer[0]).block_until_ready()

    run()
    [seconds] = median_seconds(run, repeats=5)
    return 2 * num_bytes / seconds


# ---------------------------------------------------------------- model work (FLOPs, bytes)


@dataclasses.dataclass(frozen=True)
class Work:
    """What one forward over some tokens must compute and read, for the roofline."""

    flops: float
    bytes: float

    def seconds(self, flop_rate: float, bandwidth: float) -> float:
        return max(self.flops / flop_rate, self.bytes / bandwidth)


def matmul_params(config: ModelConfig, params) -> int:
    """Parameters every token is multiplied by: all but the embedding table (a tied table counts
    once, as the LM head)."""
    total = sum(x.size for x in jax.tree.leaves(params))
    embed = config.vocab_size * config.hidden_size
    return total - (0 if config.tie_word_embeddings else embed)


def attention_flops(config: ModelConfig, context: float) -> float:
    """QK^T and PV for one query over `context` keys, all layers."""
    return 2 * 2 * config.num_layers * context * config.num_heads * config.head_dim


def kv_bytes(config: ModelConfig, tokens: float) -> float:
    return tokens * config.num_layers * 2 * config.num_kv_heads * config.head_dim * jnp.dtype(config.dtype).itemsize


def generation_work(config: ModelConfig, params, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """The prefill (prompt tokens, logits of the last one), then new_tokens - 1 decode steps at the
    average context prompt_len + new_tokens / 2; weights are read once per forward."""
    n = matmul_params(config, params)
    head = config.vocab_size * config.hidden_size
    itemsize = jnp.dtype(config.dtype).itemsize
    context = prompt_len + new_tokens / 2
    token_flops = 2 * n + attention_flops(config, context)
    prefill = Work(
        flops=batch * (prompt_len * 2 * (n - head) + 2 * head + attention_flops(config, (prompt_len + 1) / 2) * prompt_len),
        bytes=n * itemsize + kv_bytes(config, batch * prompt_len),
    )
    step = Work(flops=batch * token_flops, bytes=n * itemsize + kv_bytes(config, batch * context))
    return dict(token_flops=token_flops, context=context, prefill=prefill, step=step, steps=new_tokens - 1)


def scoring_work(config: ModelConfig, params, batch: int, length: int) -> Work:
    n = matmul_params(config, params)
    flops = batch * (length * 2 * n + attention_flops(config, (length + 1) / 2) * length)
    return Work(flops=flops, bytes=n * jnp.dtype(config.dtype).itemsize)


# ---------------------------------------------------------------- the two implementations


def build_models(bench: BenchConfig, directory: str, device: torch.device):
    """A random transformers Llama on `device`, and the same weights as latro-jax (config, params)."""
    hf_config = LlamaConfig(
        **bench.llama, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(hf_config, attn_implementation="sdpa", dtype=TORCH_DTYPES[bench.dtype])
    model.eval()
    model.save_pretrained(os.path.join(directory, "hf"))
    checkpoint = os.path.join(directory, "latro")
    convert_hf(os.path.join(directory, "hf"), checkpoint, param_dtype=bench.dtype)
    config, params = load_model(checkpoint, dtype=bench.dtype)
    return model, config, params


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latro_sampler(config, params, prompts: np.ndarray, new_tokens: int, greedy: bool) -> Callable[[], object]:
    """A call of the jitted sampler generating exactly new_tokens per row (no stop tokens),
    compiled and checked."""
    sampling = SamplingConfig(
        max_new_tokens=new_tokens, temperature=0.0 if greedy else 1.0, pad_token_id=0,
        prompt_buckets=(prompts.shape[1],), length_buckets=(new_tokens,),
    )
    tokens = jnp.asarray(prompts)
    mask = jnp.ones(prompts.shape, bool)
    rng, limit = jax.random.key(0), jnp.int32(new_tokens)

    def run():
        return jax.block_until_ready(sample_padded(config, sampling, new_tokens, params, tokens, mask, rng, limit))

    if not bool(jnp.all(run().lengths == new_tokens)):
        raise RuntimeError("latro-jax stopped early; the benchmark needs fixed-length generation")
    return run


def hf_generate(model, prompts: np.ndarray, new_tokens: int, greedy: bool, device) -> Callable[[], object]:
    """A call of transformers `generate` producing exactly new_tokens per row (no EOS), warmed up
    and checked."""
    ids = torch.as_tensor(prompts, dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)

    @torch.inference_mode()
    def run():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            eos_token_id=None, pad_token_id=0, **sampling,
        )
        synchronize(device)
        return out

    if run().shape != (ids.shape[0], ids.shape[1] + new_tokens):
        raise RuntimeError("transformers did not generate exactly new_tokens tokens")
    return run


def latro_scorer(config, params, sequences: np.ndarray) -> Callable[[], np.ndarray]:
    """A call of the jitted `token_logprobs` over whole sequences, forward only; compiled."""
    score = jax.jit(token_logprobs, static_argnames=("config", "chunk_size"))
    tokens = jnp.asarray(sequences)
    mask = jnp.ones(sequences.shape, bool)

    def run():
        return score(config, params, tokens, mask).block_until_ready()

    run()
    return run


def hf_scorer(model, sequences: np.ndarray, device) -> Callable[[], torch.Tensor]:
    """transformers' forward, then the log-softmax gathered at the next tokens: [batch, seq - 1];
    warmed up."""
    ids = torch.as_tensor(sequences, dtype=torch.long, device=device)

    @torch.inference_mode()
    def run():
        logits = model(ids).logits[:, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        synchronize(device)
        return logprobs

    run()
    return run


# ---------------------------------------------------------------- report


def report(rows: list[tuple[str, float, float]], lines: list[str]) -> None:
    width = max(len(name) for name, _, _ in rows)
    print(f"\n{'metric':<{width}} | {'latro-jax':>12} | {'transformers':>12} | {'ratio':>7}")
    print(f"{'-' * width}-+-{'-' * 12}-+-{'-' * 12}-+-{'-' * 7}")
    for name, ours, theirs in rows:
        print(f"{name:<{width}} | {ours:>12.5g} | {theirs:>12.5g} | {ours / theirs:>6.2f}x")
    print()
    for line in lines:
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu-small")
    parser.add_argument("--batch", type=int, help="rows sampled at once")
    parser.add_argument("--prompt-len", type=int, help="prompt tokens per row")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per row")
    parser.add_argument("--score-batch", type=int, help="rows scored at once")
    parser.add_argument("--repeats", type=int, help="timed calls after the warm-up; the median is reported")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding on both sides instead of sampling")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    overrides = {
        field: getattr(args, field)
        for field in ("batch", "prompt_len", "new_tokens", "score_batch", "repeats")
        if getattr(args, field) is not None
    }
    bench = dataclasses.replace(CONFIGS[args.config], **overrides)

    jax_device = jax.devices()[0]
    if jax_device.platform == "gpu" and not torch.cuda.is_available():
        sys.exit("error: JAX runs on a GPU but this torch build has no CUDA; both must run on the same device")
    device = torch.device("cuda" if jax_device.platform == "gpu" else "cpu")
    torch_device = f"{torch.cuda.get_device_name(device)} (cuda)" if device.type == "cuda" else "cpu"
    print(f"config {args.config}: batch {bench.batch}, prompt {bench.prompt_len}, new tokens {bench.new_tokens}, "
          f"score batch {bench.score_batch}, {bench.dtype}, median of {bench.repeats} after a warm-up")
    print(f"jax {jax.__version__}: {jax.devices()}")
    # Other processes on the same cores slow torch's OpenMP far more than XLA: a busy machine
    # inflates the ratios, so the load is part of the record.
    print(f"torch {torch.__version__}: {torch_device}, {torch.get_num_threads()} threads; "
          f"os.cpu_count() {os.cpu_count()}, 1-minute load average {os.getloadavg()[0]:.1f}")

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="latro-bench-") as directory:
        model, config, params = build_models(bench, directory, device)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"model: {num_params / 1e6:.1f}M params, {config.num_layers} layers, hidden {config.hidden_size}, "
          f"vocab {config.vocab_size} (built, saved, converted in {time.perf_counter() - start:.1f} s)")

    rng = np.random.default_rng(0)
    prompts = rng.integers(1, config.vocab_size, (bench.batch, bench.prompt_len), dtype=np.int32)
    sequences = rng.integers(
        1, config.vocab_size, (bench.score_batch, bench.prompt_len + bench.new_tokens), dtype=np.int32
    )
    flop_rate = matmul_rate(bench.matmul_size, bench.dtype)
    bandwidth = copy_bandwidth(bench.copy_bytes)

    start = time.perf_counter()
    latro_sample_s, hf_sample_s = median_seconds(
        latro_sampler(config, params, prompts, bench.new_tokens, args.greedy),
        hf_generate(model, prompts, bench.new_tokens, args.greedy, device),
        repeats=bench.repeats,
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()  # generate's cache blocks, before the scorer's [batch, seq, vocab] logits
    ours, theirs = latro_scorer(config, params, sequences), hf_scorer(model, sequences, device)
    latro_score_s, hf_score_s = median_seconds(ours, theirs, repeats=bench.repeats)
    score_diff = float(np.max(np.abs(np.asarray(ours())[:, 1:] - theirs().float().cpu().numpy())))
    wall = time.perf_counter() - start

    generated = bench.batch * bench.new_tokens
    scored = bench.score_batch * (bench.prompt_len + bench.new_tokens)
    gen = generation_work(config, params, bench.batch, bench.prompt_len, bench.new_tokens)
    prefill_s = gen["prefill"].seconds(flop_rate, bandwidth)
    step_s = gen["step"].seconds(flop_rate, bandwidth)
    bound_tps = generated / (prefill_s + gen["steps"] * step_s)
    score_bound_tps = scored / scoring_work(config, params, bench.score_batch, sequences.shape[1]).seconds(
        flop_rate, bandwidth
    )
    mode = "greedy" if args.greedy else "temperature 1"
    results = {
        "config": args.config,
        "workload": dataclasses.asdict(bench) | {"greedy": args.greedy},
        "devices": {"jax": str(jax.devices()), "torch": torch_device, "torch_threads": torch.get_num_threads()},
        "load_average_at_end": os.getloadavg()[0],
        "params": int(num_params),
        "sampler_tokens_per_s": {"latro_jax": generated / latro_sample_s, "transformers": generated / hf_sample_s},
        "sampler_seconds": {"latro_jax": latro_sample_s, "transformers": hf_sample_s},
        "scorer_tokens_per_s": {"latro_jax": scored / latro_score_s, "transformers": scored / hf_score_s},
        "scorer_max_abs_logprob_diff": score_diff,
        "measured": {"matmul_flops_per_s": flop_rate, "copy_bytes_per_s": bandwidth},
        "bound": {
            "flops_per_generated_token": gen["token_flops"],
            "average_context": gen["context"],
            "step_flops": gen["step"].flops,
            "step_bytes": gen["step"].bytes,
            "step_seconds_compute": gen["step"].flops / flop_rate,
            "step_seconds_memory": gen["step"].bytes / bandwidth,
            "prefill_seconds": prefill_s,
            "sampler_tokens_per_s": bound_tps,
            "scorer_tokens_per_s": score_bound_tps,
        },
    }
    sampler, scorer = results["sampler_tokens_per_s"], results["scorer_tokens_per_s"]
    report(
        [
            (f"sampler tokens/s ({mode})", sampler["latro_jax"], sampler["transformers"]),
            ("scorer tokens/s (forward + log-probs)", scorer["latro_jax"], scorer["transformers"]),
            ("sampler fraction of bound", sampler["latro_jax"] / bound_tps, sampler["transformers"] / bound_tps),
            ("scorer fraction of bound", scorer["latro_jax"] / score_bound_tps, scorer["transformers"] / score_bound_tps),
        ],
        [
            f"seconds per sampler call: latro-jax {latro_sample_s:.3f}, transformers {hf_sample_s:.3f}; "
            f"per scorer call: latro-jax {latro_score_s:.3f}, transformers {hf_score_s:.3f}",
            f"measured: {flop_rate / 1e9:.1f} GFLOP/s {bench.dtype} matmul ({bench.matmul_size}^2), "
            f"{bandwidth / 1e9:.1f} GB/s copy ({bench.copy_bytes >> 20} MiB)",
            f"bound: {gen['token_flops'] / 1e6:.1f} MFLOP per generated token "
            f"(2 x {matmul_params(config, params) / 1e6:.2f}M matmul params + attention at average context "
            f"{gen['context']:.0f}); decode step of {bench.batch} rows >= "
            f"max({gen['step'].flops / flop_rate * 1e3:.2f} ms compute, {gen['step'].bytes / bandwidth * 1e3:.2f} ms "
            f"memory for {gen['step'].bytes / 1e6:.1f} MB weights + KV), prefill >= {prefill_s * 1e3:.1f} ms "
            f"-> {bound_tps:.0f} generated tokens/s",
            f"scorer bound {score_bound_tps:.0f} tokens/s; scorer log-probs max |latro-jax - transformers| "
            f"= {score_diff:.2g}",
            f"timing took {wall:.0f} s (compilation and warm-ups included); 1-minute load average now "
            f"{os.getloadavg()[0]:.1f}",
        ],
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
