"""The demo: LaTRO improving a model on a laptop CPU in minutes (`make train EXP=demo`).

No pretrained model can be assumed, so the demo makes one that can reason but often slips:

  stage 1  (latro_jax.pretrain, cached) a small Llama-family model trained from scratch on
           synthetic arithmetic word problems whose rationales forget a carry or a borrow more
           often than not (latro_jax.data.synthetic), the stated answer following the rationale;
  stage 2  LaTRO from that model on (question, gold answer) pairs only, and beside it the SFT
           baseline trained on question -> "The answer is y." with the same questions and budget;
  stage 3  greedy and maj@k accuracy of the three models on held-out test questions, written to
           <run>/seed<seed>/results.md (a table) and curves.png (accuracy, reward and KL over
           updates), with the time each stage took.

The stages use the library's trainer, configs, checkpoints and evaluation unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import numpy as np

from latro_jax.data.prompts import load_tokenizer, prompt_format
from latro_jax.data.tasks import load_split, run_data, task_of
from latro_jax.evaluate import evaluate
from latro_jax.experiment import Experiment, ExperimentError, PretrainSpec
from latro_jax.pretrain import pretrained_base, pretrained_path
from latro_jax.sharding import make_mesh
from latro_jax.startup import check_writable, run_mesh
from latro_jax.train import load_policy, run

MODELS = ("base", "sft", "latro")
LABELS = {"base": "base model (stage 1)", "sft": "SFT baseline (question -> answer)", "latro": "LaTRO"}


def stage_experiments(exp: Experiment) -> dict[str, Experiment]:
    """The LaTRO run and its SFT baseline: same base model, questions, optimizer and number of
    updates; the baseline's loss is on "The answer is y." after the question, with no rationale."""
    t = exp.train
    out = os.path.join(exp.run_dir, f"seed{t.seed}")
    latro = dataclasses.replace(
        exp, name="latro", train=dataclasses.replace(t, output_dir=out),
        model=dataclasses.replace(exp.model, checkpoint=pretrained_path(exp)), pretrain=PretrainSpec(),
    )
    sft = dataclasses.replace(
        latro, name="sft",
        data=dataclasses.replace(exp.data, sft_target="answer"),
        train=dataclasses.replace(latro.train, method="sft", micro_batch=math.gcd(t.micro_batch, t.questions_per_update)),
    )
    return {"latro": latro, "sft": sft}


def run_demo(exp: Experiment, progress: bool = True) -> dict:
    """All three stages; returns the results (also written to <run>/seed<seed>/results.json)."""
    if jax.process_count() > 1:
        raise ExperimentError("the demo runs in a single process (it writes its results and plot from each one)")
    check_writable(exp.train.output_dir, "train.output_dir")  # before stage 1's minutes, as a run checks
    run_mesh(exp)
    run_data(exp.data)
    stages = stage_experiments(exp)
    out = stages["latro"].train.output_dir
    os.makedirs(out, exist_ok=True)
    timings, started = {}, time.perf_counter()
    cached = os.path.isdir(pretrained_path(exp))
    pretrained_base(exp, run, progress)
    timings["stage1_pretrain_s"] = time.perf_counter() - started
    params = {}
    for name in ("latro", "sft"):
        begun = time.perf_counter()
        params[name] = run(stages[name], progress=progress)["params"]
        timings[f"stage2_{name}_s"] = time.perf_counter() - begun

    begun = time.perf_counter()
    mesh = make_mesh(exp.mesh)
    # On the trainer's mesh, in the shardings the trained params have, and evaluated under the
    # mesh as the trainer evaluates: the samplers compiled for its evaluations serve all three.
    config, params["base"], tokenizer_dir = load_policy(exp, progress, mesh)
    tokenizer = load_tokenizer(tokenizer_dir)
    fmt = prompt_format(tokenizer)
    task = task_of(exp.data)
    test = load_split(task, "test")
    key = jax.random.key(exp.train.seed)
    with jax.set_mesh(mesh):
        evaluations = {
            name: evaluate(config, params[name], tokenizer, fmt, test, task, exp.rollout.max_new_tokens,
                           exp.train.maj_k, key, progress=progress)
            for name in MODELS
        }
    timings["stage3_eval_s"] = time.perf_counter() - begun
    timings["total_s"] = time.perf_counter() - started
    for name, result in evaluations.items():
        with open(os.path.join(out, f"test_{name}.json"), "w") as f:
            json.dump(result, f, indent=1)
    k = exp.train.maj_k
    results = {
        "seed": exp.train.seed,
        "test_questions": len(test),
        "maj_k": k,
        "accuracy": {name: {"greedy": r["greedy_accuracy"], f"maj@{k}": r[f"maj@{k}_accuracy"]}
                     for name, r in evaluations.items()},
        "stage1_cached": cached,
        "timings_s": {name: round(value, 1) for name, value in timings.items()},
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = results_table(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    plot_curves(out, os.path.join(pretrained_path(exp) + "-run"), os.path.join(out, "curves.png"))
    if progress:
        print(table)
        print(f"written to {out}/results.md, results.json and curves.png")
    return results


def results_table(results: dict) -> str:
    """A markdown table of test accuracy (%) per model, with the gain of LaTRO over the base."""
    k = results["maj_k"]
    accuracy = results["accuracy"]
    lines = [f"| model | greedy | maj@{k} |", "|---|---|---|"]
    for name in MODELS:
        a = accuracy[name]
        lines.append(f"| {LABELS[name]} | {100 * a['greedy']:.1f} | {100 * a[f'maj@{k}']:.1f} |")
    gain = {m: 100 * (accuracy["latro"][m] - accuracy["base"][m]) for m in ("greedy", f"maj@{k}")}
    lines.append(f"| LaTRO - base | {gain['greedy']:+.1f} | {gain[f'maj@{k}']:+.1f} |")
    time_text = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in results["timings_s"].items())
    cached = " (stage 1 cached)" if results["stage1_cached"] else ""
    return "\n".join(lines) + (f"\n\n{results['test_questions']} held-out test questions, seed "
                               f"{results['seed']}; times: {time_text}{cached}.")


def _read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = {row["step"]: row[key] for row in rows if key in row}  # a resumed run may repeat steps
    steps = sorted(points)
    return steps, [math.nan if points[s] is None else points[s] for s in steps]  # null: a non-finite value


def plot_curves(out: str, pretrain_run: str, path: str) -> None:
    """Validation greedy accuracy of LaTRO and the SFT baseline (the base model's at update 0),
    LaTRO's rewards, and its KL to the base model, over updates."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    latro, sft = _read_metrics(os.path.join(out, "latro")), _read_metrics(os.path.join(out, "sft"))
    base_steps, base_accuracy = _series(_read_metrics(pretrain_run), "eval/greedy_accuracy")
    start = [(0, base_accuracy[-1])] if base_accuracy else []
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for rows, label in ((latro, "LaTRO"), (sft, "SFT baseline")):
        steps, values = _series(rows, "eval/greedy_accuracy")
        points = start + list(zip(steps, values))
        axes[0].plot([s for s, _ in points], [100 * v for _, v in points], marker="o", label=label)
    axes[0].set(title="validation greedy accuracy (%)", xlabel="update")
    axes[0].legend()
    for key, label in (("answer_reward_mean", "R = log p(y | x, z)"), ("reward_mean", "r = R - beta KL, non-stop penalty")):
        steps, values = _series(latro, key)
        line, = axes[1].plot(steps, values, alpha=0.3)
        window = min(5, len(values)) or 1  # a running mean over 5 updates: each update sees few questions
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        axes[1].plot(steps[window - 1:], smooth, color=line.get_color(), label=f"{label} (mean of {window})")
    axes[1].set(title="LaTRO reward (mean over rationales)", xlabel="update")
    axes[1].legend(fontsize=8)
    axes[2].plot(*_series(latro, "kl_mean"))
    axes[2].set(title="KL(pi_theta || pi_0) per rationale", xlabel="update")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
