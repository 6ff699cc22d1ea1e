"""`tools/bench.py` end to end at a tiny workload: it runs (the train step in its child process),
writes its JSON, prints the train-step ratio, and both sides compute the same thing on the same
weights and rows, so the ratios compare like with like. No timing is asserted (timings are the
benchmark's to report, not the tests' to judge).

Tolerances: both sides run float32 on the CPU, the same weights and tokens; only the order of
summations differs (measured: scorer log-probs within 1e-6, the train loss equal to 7 digits).
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--layers", "1", "--batch", "2", "--prompt-len", "8", "--new-tokens", "4", "--score-batch", "2",
        "--train-batch", "4", "--train-len", "32", "--micro-batch", "2", "--repeats", "1"]


def test_bench_compares_equal_work_and_reports_the_train_ratio(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"), *TINY, "--json", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "train step latro-jax / transformers:" in result.stdout
    report = json.loads(out.read_text())
    assert report["parts"] == ["sampler", "scorer", "train"]
    assert report["workload"]["llama"]["num_hidden_layers"] == 1 and report["workload"]["train_batch"] == 4
    # The same work on both sides: the scorer's log-probs and the surrogate loss before the step.
    assert report["scorer_max_abs_logprob_diff"] < 1e-4
    losses = report["train_loss_before_step"]
    assert abs(losses["latro_jax"]) > 1.0  # a real loss: random advantages x summed log-probs
    assert abs(losses["latro_jax"] - losses["transformers"]) <= 1e-4 * abs(losses["transformers"])
    for metric in ("sampler_tokens_per_s", "scorer_tokens_per_s", "train_tokens_per_s", "train_mfu"):
        assert report[metric]["latro_jax"] > 0 and report[metric]["transformers"] > 0, metric
