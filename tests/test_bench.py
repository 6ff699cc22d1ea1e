"""`tools/bench.py` end to end at a tiny workload: it runs (the train step in its child process),
writes its JSON, prints the train-step ratio, and both sides compute the same thing on the same
weights and rows (the same loss and gradient; what each recomputes in the backward pass is its
own: the bench reports both settings). Two paths: cpu-small (float32) cut to one
layer, and llama8b-tiny, which runs the llama8b code path (bfloat16, grouped KV heads,
transformers' gradient checkpointing, our remat="projections") at a toy size, so the GPU command is run before a GPU is lent. (Its
Llama 3 RoPE scaling barely acts on 64-token rows: the parity tests check the RoPE variants.) No timing is
asserted (timings are the benchmark's to report, not the tests' to judge).

Tolerances: the same weights and tokens on both sides, so only rounding differs.
- float32: the order of summations (measured: log-probs within 1e-6, the loss equal to 7 digits).
- bfloat16: each rounding keeps 8 bits (relative 2^-8 = 0.004), on log-probs near -8 (a 4,096
  vocabulary) about 0.03 at one rounding; measured 0.0041 on log-probs, 4e-5 relative on the loss
  (checked to 1e-3: 25 times that).
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--layers", "1", "--batch", "2", "--prompt-len", "8", "--new-tokens", "4", "--score-batch", "2",
        "--train-batch", "4", "--train-len", "32", "--micro-batch", "2", "--repeats", "1"]


@pytest.mark.parametrize("args, logprob_atol, loss_rtol", [
    (TINY, 1e-4, 1e-4),
    (["--config", "llama8b-tiny"], 5e-2, 1e-3),
], ids=["cpu-small-float32", "llama8b-tiny-bfloat16"])
def test_bench_compares_equal_work_and_reports_the_train_ratio(tmp_path, args, logprob_atol, loss_rtol):
    out = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"), *args, "--json", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "train step latro-jax / transformers:" in result.stdout
    report = json.loads(out.read_text())
    assert report["parts"] == ["sampler", "scorer", "train"]
    assert report["workload"]["train_batch"] == 4 and report["workload"]["micro_batch"] == 2  # 2 micro-batches
    # The same work on both sides: the scorer's log-probs and the surrogate loss before the step.
    assert report["scorer_max_abs_logprob_diff"] < logprob_atol
    losses = report["train_loss_before_step"]
    assert abs(losses["latro_jax"]) > 1.0  # a real loss: random advantages x summed log-probs
    assert abs(losses["latro_jax"] - losses["transformers"]) <= loss_rtol * abs(losses["transformers"])
    for metric in ("sampler_tokens_per_s", "scorer_tokens_per_s", "train_tokens_per_s", "train_mfu"):
        assert report[metric]["latro_jax"] > 0 and report[metric]["transformers"] > 0, metric
