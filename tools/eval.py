"""Evaluate a model on a task split: greedy accuracy and maj@k, written to results.json.

    python tools/eval.py MODEL --task gsm8k --split test [--maj-k 8] [--limit 100] [--out results.json]
    python tools/eval.py runs/custom/best/40 --split test          # the run's own task settings
    python tools/eval.py MODEL --task custom data.path=my_qa.jsonl data.question_field=q data.match=normalized

MODEL is a latro-jax model checkpoint (`make convert` output), a training run's checkpoint step
(runs/<exp>/best/<step> or runs/<exp>/checkpoints/<step>), or an HF directory / hub id. The task
is --task, or a run step's own (its config.json's data settings); `data.field=value` settings
(as `make train` takes them) change it, e.g. a custom task's path, fields and match rule.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import _cli


def load(model: str, dtype: str):
    """(ModelConfig, params, tokenizer directory or hub id) for any of the accepted MODEL forms."""
    from latro_jax.checkpoint import HF_DIR, is_checkpoint, load_model
    from latro_jax.convert.hf import convert_hf
    from latro_jax.runs import is_run_step, load_run_step

    if is_checkpoint(model):
        config, params = load_model(model, dtype=dtype)
        return config, params, os.path.join(model, HF_DIR)
    if is_run_step(model):  # runs/<exp>/<best|checkpoints>/<step>: the params only, onto one device
        config, params, tokenizer, _ = load_run_step(model, dtype)
        return config, params, tokenizer
    with tempfile.TemporaryDirectory(prefix="latro-eval-") as tmp:  # an HF directory or hub id
        converted = os.path.join(tmp, "model")
        convert_hf(model, converted)
        config, params = load_model(converted, dtype=dtype)
    return config, params, model  # the HF directory (or hub id) holds the tokenizer


def task_settings(model: str, task: str | None, source: str | None, overrides: list[str]):
    """The data settings (`experiment.DataSpec`) of the evaluation: --task, or a run step's own, then
    --source and the `data.field=value` overrides."""
    from latro_jax.experiment import DataSpec, Experiment, ExperimentError, apply_overrides, validate_data
    from latro_jax.runs import is_run_step, run_experiment

    if task is None and not is_run_step(model):
        raise ExperimentError("--task is needed (gsm8k, arc_challenge, arithmetic or custom) unless MODEL is a "
                              "training run's checkpoint step, whose task is the run's")
    data = run_experiment(model).data if task is None else DataSpec(task=task)
    if source is not None:
        data = dataclasses.replace(data, source=source)
    bad = [o for o in overrides if not o.startswith("data.")]
    if bad:
        raise ExperimentError(f"{bad[0]!r}: only data.field=value settings are taken here (e.g. data.path=my_qa.jsonl)")
    return validate_data(apply_overrides(Experiment(name="eval", data=data), overrides).data)


def main() -> None:
    parser = _cli.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("settings", nargs="*", help="data.field=value: the task's settings, as make train takes them")
    parser.add_argument("--task", choices=["gsm8k", "arc_challenge", "arithmetic", "custom"], default=None,
                        help="default: a run step's own task")
    parser.add_argument("--split", default="test")
    parser.add_argument("--source", default=None, help="a built-in task's local jsonl directory (default: the HF hub)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or hub id (default: the model's)")
    parser.add_argument("--maj-k", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=500)
    parser.add_argument("--limit", type=int, default=0, help="evaluate the first N questions only")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results.json")
    args = parser.parse_intermixed_args()
    import jax

    from latro_jax.checkpoint import check_not_steps, check_output, is_checkpoint
    from latro_jax.data.prompts import load_tokenizer, prompt_format
    from latro_jax.data.tasks import load_split, task_of
    from latro_jax.evaluate import evaluate
    from latro_jax.experiment import ExperimentError
    from latro_jax.runs import is_run_step
    from latro_jax.startup import named_tokenizer

    # What the command line gets wrong is said before anything is read.
    for option, value, least in (("--maj-k", args.maj_k, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                                 ("--batch-size", args.batch_size, 1), ("--limit", args.limit, 0)):
        if value < least:
            raise ExperimentError(f"{option} {value} is invalid; must be >= {least}")
    check_output(args.out, overwrite=True)
    if not is_checkpoint(args.model) and not is_run_step(args.model):
        check_not_steps(args.model)  # a run's best/ rather than one of its steps
    task = task_of(task_settings(args.model, args.task, args.source, args.settings))
    examples = load_split(task, args.split)[: args.limit or None]  # bad data stops here, before the model loads
    tokenizer = named_tokenizer(args.tokenizer, "--tokenizer") if args.tokenizer else None  # before the model
    config, params, tokenizer_dir = load(args.model, args.dtype)
    tokenizer = tokenizer or load_tokenizer(tokenizer_dir)
    result = evaluate(config, params, tokenizer, prompt_format(tokenizer), examples, task, args.max_new_tokens,
                      args.maj_k, jax.random.key(args.seed), args.batch_size)
    result = {"model": args.model, "task": task.name, "split": args.split, **result}
    if task.name == "custom":
        result["data"] = dataclasses.asdict(task)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{task.describe()}/{args.split} ({result['examples']} questions): greedy {result['greedy_accuracy']:.4f}, "
          f"maj@{args.maj_k} {result[f'maj@{args.maj_k}_accuracy']:.4f} -> {args.out}")


if __name__ == "__main__":
    _cli.run(main)
