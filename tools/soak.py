"""Soak: a small LaTRO run of many updates that records, after every update, the process's
resident memory (RSS) and how many XLA programs it has compiled so far. Issue 23's acceptance: RSS
flat after warm-up, and no compilation after the first evaluation.

    .venv/bin/python tools/soak.py                                   # 200 updates, an evaluation every 20
    .venv/bin/python tools/soak.py --updates 30 --json soak.json --plot soak.png
    .venv/bin/python tools/soak.py --demo-base                       # from the demo's stage-1 model
    .venv/bin/python tools/soak.py rollout.max_new_tokens=24         # any section.field=value of the demo

The run is the demo's LaTRO stage (experiments/demo.py, with the overrides given) for `--updates`
updates, evaluating every `--eval-every` on `--eval-size` questions, in a temporary directory.
It starts from a random model of the demo's stage-1 size (self-contained, seconds), or with
`--demo-base` from the demo's pre-trained stage-1 model (trained first if not cached under
train.output_dir, minutes). The trainer is the library's, unchanged: this tool wraps
`runs.RunLog.write` (called after each update) and `train.evaluate_step` to take its samples.

RSS is VmRSS of /proc/self/status. A compilation is one XLA backend compile, counted from
jax.monitoring's backend-compile event: jitted functions and eager operations alike, cache hits
in memory not. Exit status 1 if anything compiled after the first evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch.BACKEND_COMPILE_EVENT
CHECKPOINTS = (10, 50, 100, 200)  # updates whose RSS the summary prints (and the last)


def rss_mib() -> float:
    """The process's resident memory now, in MiB (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmRSS in /proc/self/status")


class Recorder:
    """Compilations as they happen, and samples of RSS and the compilation count so far."""

    def __init__(self):
        self.started = time.perf_counter()
        self.compiled: list[dict] = []  # {"name", "seconds", "after_update"}
        self.updates: list[dict] = []  # after each update: {"update", "rss_mib", "compilations", "time_s"}
        self.evaluations: list[dict] = []  # after each evaluation, the same
        self.last_update = 0

    def on_duration(self, event: str, seconds: float, **kwargs) -> None:
        if event == COMPILE_EVENT:
            self.compiled.append({"name": str(kwargs.get("fun_name", "?")), "seconds": round(seconds, 3),
                                  "after_update": self.last_update})

    def sample(self, step: int) -> dict:
        return {"update": step, "rss_mib": round(rss_mib(), 1), "compilations": len(self.compiled),
                "time_s": round(time.perf_counter() - self.started, 2)}

    def after_update(self, step: int) -> None:
        self.last_update = step
        self.updates.append(self.sample(step))

    def after_evaluation(self, step: int) -> None:
        self.evaluations.append(self.sample(step))


def instrument(recorder: Recorder) -> None:
    """Hook the recorder into jax.monitoring and the trainer (module attributes, looked up at each call)."""
    import jax

    import latro_jax.train as train
    from latro_jax.runs import RunLog

    jax.monitoring.register_event_duration_secs_listener(recorder.on_duration)
    write, evaluate_step = RunLog.write, train.evaluate_step

    def write_and_sample(self, step, metrics):
        write(self, step, metrics)
        if "loss" in metrics:  # an update's metrics; an evaluation's are eval/*
            recorder.after_update(step)

    def evaluate_and_sample(setup, state, step, *args, **kwargs):
        result = evaluate_step(setup, state, step, *args, **kwargs)
        recorder.after_evaluation(step)
        return result

    RunLog.write = write_and_sample
    train.evaluate_step = evaluate_and_sample


def random_base(exp, directory: str) -> str:
    """A random Llama model of the demo's stage-1 size (`exp.pretrain`) with the arithmetic
    task's tokenizer, saved as a checkpoint under `directory`."""
    from latro_jax.checkpoint import save_model
    from latro_jax.data.synthetic import build_tokenizer
    from latro_jax.model import init_params
    from latro_jax.pretrain import base_model_config

    tokenizer_dir, path = os.path.join(directory, "tokenizer"), os.path.join(directory, "base")
    config = base_model_config(exp.pretrain, build_tokenizer(tokenizer_dir))
    files = {name: os.path.join(tokenizer_dir, name) for name in os.listdir(tokenizer_dir)}
    save_model(path, config, init_params(config, exp.train.seed), files)
    return path


def soak_experiment(args, workdir: str):
    """The demo's LaTRO stage with the soak's length, evaluations and directory."""
    from latro_jax.demo import stage_experiments
    from latro_jax.experiment import PretrainSpec, load_experiment
    from latro_jax.pretrain import pretrained_base
    from latro_jax.train import run

    settings = [f"train.updates={args.updates}", f"train.eval_every={args.eval_every}",
                f"data.eval_size={args.eval_size}"]
    exp = load_experiment("demo", settings + args.overrides)
    if args.demo_base:
        pretrained_base(exp, run, progress=args.progress)
        latro = stage_experiments(exp)["latro"]
    else:
        model = dataclasses.replace(exp.model, checkpoint=random_base(exp, workdir))
        latro = dataclasses.replace(exp, model=model, pretrain=PretrainSpec())
    return dataclasses.replace(latro, name="soak", train=dataclasses.replace(latro.train, output_dir=workdir))


def summary(recorder: Recorder, updates: int, window: int) -> dict:
    """RSS at the checkpoints, its growth from the first evaluation to the end, and what compiled
    after the first evaluation."""
    import numpy as np

    rss = {s["update"]: s["rss_mib"] for s in recorder.updates}
    result = {"rss_mib_at_update": {str(u): rss[u] for u in sorted({*CHECKPOINTS, updates}) if u in rss}}
    if not recorder.evaluations:
        return result
    first, last = recorder.evaluations[0], recorder.evaluations[-1]
    warm = [s for s in recorder.updates if s["update"] > first["update"]]
    after = recorder.compiled[first["compilations"]:]
    result.update(
        first_evaluation_after_update=first["update"],
        rss_mib_after_first_evaluation=first["rss_mib"],
        rss_mib_after_last_evaluation=last["rss_mib"],
        rss_growth_mib=round(last["rss_mib"] - first["rss_mib"], 1),
        compilations_before_first_evaluation=first["compilations"],
        compilations_after_first_evaluation=len(after),
        compiled_after_first_evaluation=after,
    )
    if len(warm) >= 2:
        # RSS after an update swings by ~10% with what the allocator has handed back; a trend and
        # the medians of the first and last `window` updates past warm-up are steadier than two points.
        x = np.array([s["update"] for s in warm], float)
        y = np.array([s["rss_mib"] for s in warm])
        window = min(window, len(y) // 2) or 1
        result.update(
            rss_mib_after_warmup_min=float(y.min()), rss_mib_after_warmup_max=float(y.max()),
            rss_slope_mib_per_100_updates=round(float(np.polyfit(x, y, 1)[0]) * 100, 2),
            rss_window_updates=window,
            rss_median_mib_first_window=float(np.median(y[:window])),
            rss_median_mib_last_window=float(np.median(y[-window:])),
        )
    return result


def plot(recorder: Recorder, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, rss_axis = plt.subplots(figsize=(8, 4))
    steps = [s["update"] for s in recorder.updates]
    rss_axis.plot(steps, [s["rss_mib"] for s in recorder.updates], color="tab:blue", label="RSS after update")
    rss_axis.set_xlabel("update")
    rss_axis.set_ylabel("RSS (MiB)", color="tab:blue")
    for i, e in enumerate(recorder.evaluations):
        rss_axis.axvline(e["update"], color="0.8", lw=0.8, zorder=0, label="evaluation" if i == 0 else None)
    rss_axis.plot([e["update"] for e in recorder.evaluations], [e["rss_mib"] for e in recorder.evaluations], "o",
                  color="tab:blue", mfc="none", label="RSS after evaluation")
    compile_axis = rss_axis.twinx()
    compile_axis.step(steps, [s["compilations"] for s in recorder.updates], where="post", color="tab:red")
    compile_axis.set_ylabel("XLA compilations so far", color="tab:red")
    rss_axis.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides of experiments/demo.py")
    parser.add_argument("--updates", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-size", type=int, default=32, help="questions per evaluation")
    parser.add_argument("--demo-base", action="store_true", help="start from the demo's stage-1 model")
    parser.add_argument("--json", help="write the samples and the summary here")
    parser.add_argument("--plot", help="write a PNG of RSS and compilations over updates here")
    parser.add_argument("--keep", help="run in this directory and keep it (default: a temporary one)")
    parser.add_argument("--progress", action="store_true", help="the trainer's progress bar")
    args = parser.parse_args()

    recorder = Recorder()
    instrument(recorder)  # before anything compiles
    from latro_jax.train import run

    workdir = args.keep or tempfile.mkdtemp(prefix="soak-")
    os.makedirs(workdir, exist_ok=True)
    try:
        exp = soak_experiment(args, workdir)
        start = recorder.sample(0)
        run(exp, progress=args.progress)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    result = summary(recorder, args.updates, args.eval_every)

    print(f"soak: {len(recorder.updates)} updates, {len(recorder.evaluations)} evaluations, "
          f"{time.perf_counter() - recorder.started:.0f} s; RSS before the run {start['rss_mib']:.1f} MiB")
    for update, value in result["rss_mib_at_update"].items():
        print(f"  RSS after update {update:>4}: {value:8.1f} MiB")
    if recorder.evaluations:
        print(f"  RSS after the first evaluation (update {result['first_evaluation_after_update']}): "
              f"{result['rss_mib_after_first_evaluation']:.1f} MiB; after the last: "
              f"{result['rss_mib_after_last_evaluation']:.1f} MiB; growth {result['rss_growth_mib']:+.1f} MiB")
        if "rss_slope_mib_per_100_updates" in result:
            print(f"  RSS after each update past the first evaluation: {result['rss_mib_after_warmup_min']:.1f} to "
                  f"{result['rss_mib_after_warmup_max']:.1f} MiB, trend "
                  f"{result['rss_slope_mib_per_100_updates']:+.2f} MiB per 100 updates; median of the first "
                  f"{result['rss_window_updates']} {result['rss_median_mib_first_window']:.1f} MiB, of the last "
                  f"{result['rss_window_updates']} {result['rss_median_mib_last_window']:.1f} MiB")
        print(f"  compilations: {result['compilations_before_first_evaluation']} up to the first evaluation, "
              f"{result['compilations_after_first_evaluation']} after it")
        for c in result["compiled_after_first_evaluation"]:
            print(f"    after update {c['after_update']}: {c['name']} ({c['seconds']} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": sys.argv, "experiment": dataclasses.asdict(exp), "summary": result,
                       "before_run": start, "updates": recorder.updates, "evaluations": recorder.evaluations,
                       "compiled": recorder.compiled}, f, indent=1)
    if args.plot:
        plot(recorder, args.plot)
    if result.get("compilations_after_first_evaluation"):
        sys.exit(1)


if __name__ == "__main__":
    import _cli

    _cli.run(main)
