"""Sampler, scorer and train-step throughput of latro-jax beside transformers, on the same weights.

    python tools/bench.py                          # cpu-small: a ~20M-parameter Llama, float32, CPU
    python tools/bench.py --config llama8b         # Llama-3.1-8B shape, random bf16 weights (a GPU)
    python tools/bench.py --config llama8b --parts train   # the 8B train step alone (see below)
    python tools/bench.py --config llama8b --parts train --layers 16   # 8B layers, half of them
    python tools/bench.py --config llama8b-tiny    # the llama8b code path at a toy size (any CPU)
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

The train step is `update.update` with `update.latro_rows_loss` (policy forward+backward over
prompt+rationale+answer rows in micro-batches, then AdamW) beside transformers' forward,
the same surrogate (-advantage x the rationale's summed log-probs / rows, LM head only past the
prompt via `logits_to_keep`), `.backward()` per micro-batch and one `torch.optim.AdamW` step,
with gradient checkpointing where the config asks for it (llama8b: every layer is recomputed, as
transformers measured in the goal). latro-jax's backward pass recomputes what the experiments
set (`--remat`; llama8b: "projections", the paper recipes' setting, recomputes the attention and
elementwise work but no projection). Its model FLOP utilisation (MFU) is 3 x the forward's
FLOPs (no recomputation counted) per second over the measured matmul rate. transformers' step
runs in this process, then its model and optimizer state are dropped, and latro-jax's step
runs in a child process of its own (`--train-child`) on the same rows and
weights: an 8B model's bf16 weights, gradients and AdamW moments are 64 GB, and neither torch's
caching allocator nor JAX's (which keeps what it has grown) returns memory to the other within
one process. The matmul rate is measured after both, in this process.
"""

from __future__ import annotations

import os
import sys

# torch and JAX share the GPU: JAX must not reserve most of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from latro_jax.checkpoint import load_model, read_config  # noqa: E402
from latro_jax.config import REMAT_MODES, ModelConfig  # noqa: E402
from latro_jax.convert.hf import convert_hf  # noqa: E402
from latro_jax.experiment import OptimSpec  # noqa: E402
from latro_jax.objective import ObjectiveConfig  # noqa: E402
from latro_jax.sampling import SamplingConfig, sample_padded  # noqa: E402
from latro_jax.scoring import token_logprobs  # noqa: E402
from latro_jax.update import commit, latro_rows_loss, make_optimizer, update_jit  # noqa: E402


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """A model shape (LlamaConfig keyword arguments) and the workload run on it."""

    llama: dict
    dtype: str  # params and compute
    batch: int
    prompt_len: int
    new_tokens: int
    score_batch: int  # the scorer's batch: transformers materialises [batch, seq, vocab] logits
    train_batch: int  # rows of one train step
    train_len: int  # tokens per row: prompt_len of prompt, train_answer_len of answer, rationale between
    train_answer_len: int
    micro_batch: int  # rows per forward+backward on both sides; gradients add up over the batch
    hf_gradient_checkpointing: bool  # transformers recomputes each layer in the backward pass
    remat: str  # what latro-jax's backward pass recomputes (ModelConfig.remat), as the experiments set it
    repeats: int
    matmul_size: int  # side of the square matmul that measures the FLOP rate
    copy_bytes: int  # size of the copy that measures memory bandwidth
    # Products timed per call, one after another in one program: a GPU does an 8192^2 bf16
    # product in ~1.4 ms, near the host's dispatch and wait; a CPU takes ~100 ms for one.
    matmul_chain: int = 1


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
        train_batch=16,
        train_len=128,
        train_answer_len=16,
        micro_batch=4,
        hf_gradient_checkpointing=False,
        remat="none",
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
        # transformers measured 8,721 tokens/s (53% of matmul peak) for this shape with gradient
        # checkpointing on an H100.
        train_batch=16,
        train_len=512,
        train_answer_len=16,
        micro_batch=4,
        hf_gradient_checkpointing=True,
        remat="projections",  # as the paper recipes (experiments/_recipe.py)
        repeats=3,
        matmul_size=8192,
        copy_bytes=1 << 32,
        matmul_chain=16,
    ),
}
# The llama8b code path (bfloat16, grouped KV heads, recomputation in the backward pass) at a
# size any CPU runs in a minute: runs the GPU command before a GPU is lent.
CONFIGS["llama8b-tiny"] = dataclasses.replace(
    CONFIGS["llama8b"],
    llama={**CONFIGS["llama8b"].llama, "vocab_size": 4096, "hidden_size": 128, "intermediate_size": 448,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32},
    batch=4, prompt_len=16, new_tokens=8, score_batch=4, train_batch=4, train_len=64, micro_batch=2, repeats=1,
    matmul_size=512, copy_bytes=1 << 24, matmul_chain=2,
)
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


def matmul_rate(size: int, dtype: str, chain: int) -> float:
    """Measured FLOP/s of [size, size] @ [size, size] matmuls in `dtype`: `chain` of them per
    timed call, each multiplying the last one's product (by a random matrix scaled by
    1/sqrt(size), so values stay near 1 and are never zeros or infinities)."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    b = (jax.random.normal(jax.random.key(1), (size, size), jnp.float32) / size**0.5).astype(dtype)
    matmuls = jax.jit(lambda a, b: jax.lax.fori_loop(0, chain, lambda _, x: x @ b, a))

    def run():
        return matmuls(a, b).block_until_ready()

    result = run()
    if not bool(jnp.all(jnp.isfinite(result))):
        raise RuntimeError("the matmul rate's products overflowed")
    [seconds] = median_seconds(run, repeats=5)
    return 2 * size**3 * chain / seconds


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


def matmul_params(config: ModelConfig, num_params: int) -> int:
    """Parameters every token is multiplied by: all but the embedding table (a tied table counts
    once, as the LM head)."""
    embed = config.vocab_size * config.hidden_size
    return num_params - (0 if config.tie_word_embeddings else embed)


def attention_flops(config: ModelConfig, context: float) -> float:
    """QK^T and PV for one query over `context` keys, all layers."""
    return 2 * 2 * config.num_layers * context * config.num_heads * config.head_dim


def kv_bytes(config: ModelConfig, tokens: float) -> float:
    return tokens * config.num_layers * 2 * config.num_kv_heads * config.head_dim * jnp.dtype(config.dtype).itemsize


def generation_work(config: ModelConfig, num_params: int, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """The prefill (prompt tokens, logits of the last one), then new_tokens - 1 decode steps at the
    average context prompt_len + new_tokens / 2; weights are read once per forward."""
    n = matmul_params(config, num_params)
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


def scoring_work(config: ModelConfig, num_params: int, batch: int, length: int) -> Work:
    n = matmul_params(config, num_params)
    flops = batch * (length * 2 * n + attention_flops(config, (length + 1) / 2) * length)
    return Work(flops=flops, bytes=n * jnp.dtype(config.dtype).itemsize)


def train_flops(config: ModelConfig, num_params: int, batch: int, length: int, score_from: int) -> float:
    """Model FLOPs of a forward+backward (3 x the forward; recomputation not counted) over
    `length` tokens per row, the LM head applied past the prompt only (targets from `score_from`)."""
    n = matmul_params(config, num_params)
    head = config.vocab_size * config.hidden_size
    attention = attention_flops(config, (length + 1) / 2) * length
    forward = length * 2 * (n - head) + (length - score_from) * 2 * head + attention
    return 3 * batch * forward


# ---------------------------------------------------------------- the two implementations


def build_models(bench: BenchConfig, directory: str, device: torch.device):
    """A random transformers Llama on `device`, and the path of the same weights as a latro-jax
    checkpoint (`load_model` it when JAX needs them: see the train step's memory, above)."""
    hf_config = LlamaConfig(
        **bench.llama, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(hf_config, attn_implementation="sdpa", dtype=TORCH_DTYPES[bench.dtype])
    model.eval()
    model.save_pretrained(os.path.join(directory, "hf"))
    checkpoint = os.path.join(directory, "latro")
    convert_hf(os.path.join(directory, "hf"), checkpoint, param_dtype=bench.dtype)  # in host memory
    return model, checkpoint


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latro_sampler(config, params, prompts: np.ndarray, new_tokens: int, greedy: bool,
                  cache_room: int = 0) -> Callable[[], object]:
    """A call of the jitted sampler generating exactly new_tokens per row (no stop tokens),
    compiled and checked; `cache_room` extra cache slots are kept after the generation."""
    sampling = SamplingConfig(
        max_new_tokens=new_tokens, temperature=0.0 if greedy else 1.0, pad_token_id=0,
        prompt_buckets=(prompts.shape[1],), length_buckets=(new_tokens,), cache_room=cache_room,
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


def train_rows(bench: BenchConfig, vocab_size: int, rng: np.random.Generator) -> dict:
    """A batch of LaTRO rows as `update.update` takes them, all tokens real: [train_batch, train_len]
    tokens and masks (prompt_len of prompt, then rationale, then train_answer_len of answer) and
    [train_batch] advantages."""
    n, length = bench.train_batch, bench.train_len
    slot = np.arange(length)[None].repeat(n, 0)
    answer_from = length - bench.train_answer_len
    return dict(
        tokens=rng.integers(1, vocab_size, (n, length), dtype=np.int32),
        attention_mask=np.ones((n, length), bool),
        rationale_mask=(slot >= bench.prompt_len) & (slot < answer_from),
        answer_mask=slot >= answer_from,
        advantages=rng.standard_normal(n).astype(np.float32),
    )


OBJECTIVE = ObjectiveConfig(beta=0.05)  # the released recipe: sft_coef 0, so the loss is the rationale term
OPTIM = OptimSpec()


def latro_train_step(config, params, rows: dict, micro_batch: int, score_from: int) -> Callable[[], float]:
    """A call of the update program `train.run` runs (`update.update_jit`: LaTRO rows loss, AdamW)
    on `rows`, returning the loss before the step. `params` are donated: each call replaces them
    and the optimizer state."""
    optimizer = make_optimizer(OPTIM, updates=1_000_000)  # the learning rate barely decays over the timed calls
    state = list(commit((params, optimizer.init(params))))  # as train.run does: update compiles once
    rows = {name: jnp.asarray(value) for name, value in rows.items()}
    update = update_jit(*state)

    def run():
        new_params, opt_state, metrics = update(
            config, OBJECTIVE, optimizer, micro_batch, latro_rows_loss, score_from, *state, rows
        )
        state[:] = jax.block_until_ready((new_params, opt_state))
        return float(metrics["loss"])

    return run


def latro_train_in_child(bench: BenchConfig, checkpoint: str, batch: dict, directory: str) -> tuple[float, float]:
    """latro-jax's train step timed in a child process of its own (`--train-child`) on `batch`
    and the weights at `checkpoint`; -> (median seconds, loss before the first step)."""
    work = os.path.join(directory, "train-child")
    os.makedirs(work, exist_ok=True)
    np.savez(os.path.join(work, "rows.npz"), **batch)
    with open(os.path.join(work, "job.json"), "w") as f:
        json.dump({"bench": dataclasses.asdict(bench), "checkpoint": checkpoint}, f)
    print("latro-jax's train step, in a process of its own ...", flush=True)
    child = subprocess.run([sys.executable, os.path.abspath(__file__), "--train-child", work])
    if child.returncode:
        sys.exit(f"error: latro-jax's train step failed in its process (exit code {child.returncode}; its "
                 "output is above); transformers' step had finished")
    with open(os.path.join(work, "result.json")) as f:
        result = json.load(f)
    return result["seconds"], result["loss"]


def train_child(work: str) -> None:
    """The child's side of `latro_train_in_child`: load, compile, warm up, time; write result.json."""
    with open(os.path.join(work, "job.json")) as f:
        job = json.load(f)
    bench = BenchConfig(**job["bench"])
    with np.load(os.path.join(work, "rows.npz")) as saved:
        batch = dict(saved)
    config, params = load_model(job["checkpoint"], dtype=bench.dtype, remat=bench.remat)
    ours = latro_train_step(config, params, batch, bench.micro_batch, bench.prompt_len)
    del params  # donated to the first update
    loss = ours()
    [seconds] = median_seconds(ours, repeats=bench.repeats)
    with open(os.path.join(work, "result.json"), "w") as f:
        json.dump({"seconds": seconds, "loss": loss}, f)


def hf_train_step(
    model, rows: dict, micro_batch: int, score_from: int, checkpointing: bool, device
) -> Callable[[], float]:
    """transformers' forward over each micro-batch (logits past the prompt only), the same
    surrogate loss and `.backward()` (gradients accumulate in .grad), then one AdamW step;
    returns the loss before the step."""
    ids = torch.as_tensor(rows["tokens"], dtype=torch.long, device=device)
    attention = torch.as_tensor(rows["attention_mask"], dtype=torch.long, device=device)
    rationale = torch.as_tensor(rows["rationale_mask"][:, score_from:], device=device)
    advantages = torch.as_tensor(rows["advantages"], device=device)
    n = ids.shape[0]
    keep = ids.shape[1] - score_from + 1  # the hidden state before slot t predicts token t
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=OPTIM.learning_rate, betas=(OPTIM.b1, OPTIM.b2), eps=OPTIM.eps,
        weight_decay=OPTIM.weight_decay,
    )

    def run():
        total = torch.zeros((), device=device)
        for start in range(0, n, micro_batch):
            part = slice(start, start + micro_batch)
            logits = model(ids[part], attention_mask=attention[part], logits_to_keep=keep).logits[:, :-1]
            targets = ids[part, score_from:]
            logprobs = -torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), targets.flatten(), reduction="none"
            ).view(targets.shape)
            loss = -(advantages[part] * (logprobs * rationale[part]).sum(1)).sum() / n
            loss.backward()
            total += loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return float(total)

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


PARTS = ("sampler", "scorer", "train")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu-small")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--batch", type=int, help="rows sampled at once")
    parser.add_argument("--prompt-len", type=int, help="prompt tokens per row")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per row")
    parser.add_argument("--score-batch", type=int, help="rows scored at once")
    parser.add_argument("--train-batch", type=int, help="rows of one train step")
    parser.add_argument("--train-len", type=int, help="tokens per train row (prompt + rationale + answer)")
    parser.add_argument("--micro-batch", type=int, help="rows per forward+backward in the train step")
    parser.add_argument("--repeats", type=int, help="timed calls after the warm-up; the median is reported")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding on both sides instead of sampling")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the config's), e.g. fewer of the 8B "
                        "shape where a whole 8B train step does not fit the device")
    parser.add_argument("--remat", choices=REMAT_MODES,
                        help="what latro-jax's backward pass recomputes (default: the config's)")
    parser.add_argument("--hf-gradient-checkpointing", action=argparse.BooleanOptionalAction,
                        help="transformers recomputes each layer in the backward pass (default: the config's)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--train-child", metavar="DIR", help=argparse.SUPPRESS)  # latro_train_in_child's process
    args = parser.parse_args()
    if args.train_child:
        return train_child(args.train_child)
    parts = args.parts.split(",")
    if not parts or set(parts) - set(PARTS):
        parser.error(f"--parts {args.parts!r}: choose from {', '.join(PARTS)}")
    overrides = {
        field: getattr(args, field)
        for field in ("batch", "prompt_len", "new_tokens", "score_batch", "train_batch", "train_len", "micro_batch",
                      "repeats", "remat", "hf_gradient_checkpointing")
        if getattr(args, field) is not None
    }
    bench = dataclasses.replace(CONFIGS[args.config], **overrides)
    if args.layers:
        bench = dataclasses.replace(bench, llama={**bench.llama, "num_hidden_layers": args.layers})
    if bench.train_batch % bench.micro_batch or bench.train_len <= bench.prompt_len + bench.train_answer_len:
        parser.error("the train batch must be a multiple of --micro-batch, and --train-len must leave room for a "
                     "rationale after the prompt and before the answer")

    jax_device = jax.devices()[0]
    if jax_device.platform == "gpu" and not torch.cuda.is_available():
        sys.exit("error: JAX runs on a GPU but this torch build has no CUDA; both must run on the same device")
    device = torch.device("cuda" if jax_device.platform == "gpu" else "cpu")
    torch_device = f"{torch.cuda.get_device_name(device)} (cuda)" if device.type == "cuda" else "cpu"
    print(f"config {args.config} ({', '.join(parts)}): batch {bench.batch}, prompt {bench.prompt_len}, new tokens "
          f"{bench.new_tokens}, score batch {bench.score_batch}, train {bench.train_batch} x {bench.train_len} "
          f"tokens in micro-batches of {bench.micro_batch}, {bench.dtype}, median of {bench.repeats} after a warm-up")
    print(f"jax {jax.__version__}: {jax.devices()}")
    # Other processes on the same cores slow torch's OpenMP far more than XLA: a busy machine
    # inflates the ratios, so the load is part of the record.
    print(f"torch {torch.__version__}: {torch_device}, {torch.get_num_threads()} threads; "
          f"os.cpu_count() {os.cpu_count()}, 1-minute load average {os.getloadavg()[0]:.1f}")

    with tempfile.TemporaryDirectory(prefix="latro-bench-") as directory:
        results, rows, lines = run_parts(bench, parts, args.greedy, directory, device)
    results = {
        "config": args.config,
        "parts": parts,
        "workload": dataclasses.asdict(bench) | {"greedy": args.greedy},
        "devices": {"jax": str(jax.devices()), "torch": torch_device, "torch_threads": torch.get_num_threads()},
        "load_average_at_end": os.getloadavg()[0],
        **results,
    }
    lines.append(f"1-minute load average now {os.getloadavg()[0]:.1f}")
    report(rows, lines)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")


def run_parts(bench: BenchConfig, parts: list[str], greedy: bool, directory: str, device):
    """Build the models in `directory`, time the chosen parts; -> (results for the JSON, report
    rows, report lines). The transformers model lives only here, so the train step can free it."""
    start = time.perf_counter()
    model, checkpoint = build_models(bench, directory, device)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model: {num_params / 1e6:.1f}M params, {model.config.num_hidden_layers} layers, hidden "
          f"{model.config.hidden_size}, vocab {model.config.vocab_size} (built, saved, converted in "
          f"{time.perf_counter() - start:.1f} s)")
    results, rows, lines = {"params": int(num_params)}, [], []
    config = params = None
    rng = np.random.default_rng(0)
    vocab_size = model.config.vocab_size

    def measure_rates() -> None:
        flop_rate = matmul_rate(bench.matmul_size, bench.dtype, bench.matmul_chain)
        bandwidth = copy_bandwidth(bench.copy_bytes)
        results["measured"] = {"matmul_flops_per_s": flop_rate, "copy_bytes_per_s": bandwidth}
        lines.append(f"measured: {flop_rate / 1e9:.1f} GFLOP/s {bench.dtype} matmul ({bench.matmul_size}^2, "
                     f"{bench.matmul_chain} per call), "
                     f"{bandwidth / 1e9:.1f} GB/s copy ({bench.copy_bytes >> 20} MiB)")

    if "sampler" in parts or "scorer" in parts:
        config, params = load_model(checkpoint, dtype=bench.dtype)
        measure_rates()
        flop_rate, bandwidth = results["measured"].values()
        results["bound"] = {}
    if "sampler" in parts:
        prompts = rng.integers(1, vocab_size, (bench.batch, bench.prompt_len), dtype=np.int32)
        start = time.perf_counter()
        # The same rollout with 4x the cache's slots (room for 3x prompt + generation after it):
        # a decode step's cost must follow the tokens generated, not the cache allocated.
        room = 3 * (bench.prompt_len + bench.new_tokens)
        latro_sample_s, hf_sample_s, roomy_sample_s = median_seconds(
            latro_sampler(config, params, prompts, bench.new_tokens, greedy),
            hf_generate(model, prompts, bench.new_tokens, greedy, device),
            latro_sampler(config, params, prompts, bench.new_tokens, greedy, cache_room=room),
            repeats=bench.repeats,
        )
        wall = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.empty_cache()  # generate's cache blocks, before the scorer's [batch, seq, vocab] logits
        generated = bench.batch * bench.new_tokens
        gen = generation_work(config, num_params, bench.batch, bench.prompt_len, bench.new_tokens)
        prefill_s = gen["prefill"].seconds(flop_rate, bandwidth)
        step_s = gen["step"].seconds(flop_rate, bandwidth)
        bound_tps = generated / (prefill_s + gen["steps"] * step_s)
        results["sampler_tokens_per_s"] = {
            "latro_jax": generated / latro_sample_s, "transformers": generated / hf_sample_s
        }
        results["sampler_seconds"] = {"latro_jax": latro_sample_s, "transformers": hf_sample_s,
                                      "latro_jax_4x_cache": roomy_sample_s}
        results["bound"] |= {
            "flops_per_generated_token": gen["token_flops"],
            "average_context": gen["context"],
            "step_flops": gen["step"].flops,
            "step_bytes": gen["step"].bytes,
            "step_seconds_compute": gen["step"].flops / flop_rate,
            "step_seconds_memory": gen["step"].bytes / bandwidth,
            "prefill_seconds": prefill_s,
            "sampler_tokens_per_s": bound_tps,
        }
        sampler = results["sampler_tokens_per_s"]
        rows += [
            (f"sampler tokens/s ({'greedy' if greedy else 'temperature 1'})", *sampler.values()),
            ("sampler fraction of bound", sampler["latro_jax"] / bound_tps, sampler["transformers"] / bound_tps),
        ]
        lines += [
            f"seconds per sampler call: latro-jax {latro_sample_s:.3f}, transformers {hf_sample_s:.3f} "
            f"(timing took {wall:.0f} s with compilation and warm-ups)",
            f"latro-jax with 4x the cache slots ({room} slots of room): {roomy_sample_s:.3f} s per call, "
            f"{roomy_sample_s / latro_sample_s - 1:+.1%} (goal <= +10%)",
            f"sampler bound: {gen['token_flops'] / 1e6:.1f} MFLOP per generated token "
            f"(2 x {matmul_params(config, num_params) / 1e6:.2f}M matmul params + attention at average context "
            f"{gen['context']:.0f}); decode step of {bench.batch} rows >= "
            f"max({gen['step'].flops / flop_rate * 1e3:.2f} ms compute, {gen['step'].bytes / bandwidth * 1e3:.2f} ms "
            f"memory for {gen['step'].bytes / 1e6:.1f} MB weights + KV), prefill >= {prefill_s * 1e3:.1f} ms "
            f"-> {bound_tps:.0f} generated tokens/s",
        ]
    if "scorer" in parts:
        sequences = rng.integers(
            1, vocab_size, (bench.score_batch, bench.prompt_len + bench.new_tokens), dtype=np.int32
        )
        ours, theirs = latro_scorer(config, params, sequences), hf_scorer(model, sequences, device)
        latro_score_s, hf_score_s = median_seconds(ours, theirs, repeats=bench.repeats)
        score_diff = float(np.max(np.abs(np.asarray(ours())[:, 1:] - theirs().float().cpu().numpy())))
        del ours, theirs
        if device.type == "cuda":
            torch.cuda.empty_cache()
        scored = sequences.size
        score_bound_tps = scored / scoring_work(config, num_params, bench.score_batch, sequences.shape[1]).seconds(
            flop_rate, bandwidth
        )
        results["scorer_tokens_per_s"] = {"latro_jax": scored / latro_score_s, "transformers": scored / hf_score_s}
        results["scorer_max_abs_logprob_diff"] = score_diff
        results["bound"]["scorer_tokens_per_s"] = score_bound_tps
        scorer = results["scorer_tokens_per_s"]
        rows += [
            ("scorer tokens/s (forward + log-probs)", scorer["latro_jax"], scorer["transformers"]),
            ("scorer fraction of bound", *(tps / score_bound_tps for tps in scorer.values())),
        ]
        lines += [
            f"seconds per scorer call: latro-jax {latro_score_s:.3f}, transformers {hf_score_s:.3f}; scorer bound "
            f"{score_bound_tps:.0f} tokens/s; scorer log-probs max |latro-jax - transformers| = {score_diff:.2g}",
        ]
    if "train" in parts:
        batch = train_rows(bench, vocab_size, rng)
        score_from = bench.prompt_len
        start = time.perf_counter()
        theirs = hf_train_step(model, batch, bench.micro_batch, score_from, bench.hf_gradient_checkpointing, device)
        hf_loss = theirs()
        [hf_train_s] = median_seconds(theirs, repeats=bench.repeats)
        del theirs, model
        gc.collect()  # the model's and AdamW's tensors sit in reference cycles (checkpointing hooks)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            lines.append(f"transformers' memory still held while latro-jax's step runs: "
                         f"{torch.cuda.memory_reserved(device) / 2**30:.2f} GiB reserved")
        latro_train_s, latro_loss = latro_train_in_child(bench, checkpoint, batch, directory)
        wall = time.perf_counter() - start
        if "measured" not in results:
            measure_rates()
        if config is None:  # the weights stayed on disk in this process
            config = read_config(checkpoint)
        tokens = batch["tokens"].size
        flops = train_flops(config, num_params, bench.train_batch, bench.train_len, score_from)
        flop_rate = results["measured"]["matmul_flops_per_s"]
        results["train_tokens_per_s"] = {"latro_jax": tokens / latro_train_s, "transformers": tokens / hf_train_s}
        results["train_mfu"] = {"latro_jax": flops / latro_train_s / flop_rate,
                                "transformers": flops / hf_train_s / flop_rate}
        results["train_loss_before_step"] = {"latro_jax": latro_loss, "transformers": hf_loss}
        train = results["train_tokens_per_s"]
        rows += [
            ("train step tokens/s (fwd+bwd+AdamW)", train["latro_jax"], train["transformers"]),
            ("train step MFU (of measured matmul)", *results["train_mfu"].values()),
        ]
        checkpointing = "with" if bench.hf_gradient_checkpointing else "without"
        lines += [
            f"seconds per train step: latro-jax {latro_train_s:.3f} (remat {bench.remat}), transformers "
            f"{hf_train_s:.3f} ({checkpointing} gradient checkpointing); timing took {wall:.0f} s with compilation, "
            f"warm-ups and latro-jax's process; {flops / tokens / 1e6:.1f} MFLOP per token",
            f"train step latro-jax / transformers: {train['latro_jax'] / train['transformers']:.2f}x (goal >= 1.1x); "
            f"loss before the step: latro-jax {latro_loss:.6g}, transformers {hf_loss:.6g}",
        ]
    return results, rows, lines


if __name__ == "__main__":
    main()
