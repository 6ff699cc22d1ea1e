"""The typed configuration of a training run, and `key=value` overrides from the command line.

An experiment is a Python file in `experiments/` whose `config()` returns an `Experiment`;
`make train EXP=name key=value ...` applies overrides such as `train.updates=2` or
`rollout.num_samples=4`, then `validate` checks every field once at start-up, naming the field.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys
import typing

from latro_jax.config import attention_mode, remat_mode
from latro_jax.data.prompts import ANSWER_TEMPLATE
from latro_jax.data.tasks import CUSTOM, TASK_NAMES, task_of
from latro_jax.objective import ObjectiveConfig
from latro_jax.sharding import DistributedSpec, MeshSpec


class ExperimentError(ValueError):
    """A bad experiment name, override or field value."""


# The DataSpec fields that describe a custom task (data.task=custom); the built-in tasks fix them.
CUSTOM_FIELDS = ("path", "config", "question_field", "answer_field", "rationale_field", "options_field", "id_field",
                 "template", "answer_template", "match", "skip_bad_rows")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Where the policy's weights come from: a latro-jax checkpoint directory (`make convert`
    output), or an HF directory / hub id converted on first use into `<run>/base_model`."""

    checkpoint: str = ""
    hf: str = ""
    tokenizer: str = ""  # HF tokenizer directory or hub id; default: the checkpoint's hf/ files
    dtype: str = "bfloat16"  # compute dtype; params are always float32 while training
    lora_rank: int = 0  # 0 = full fine-tuning; r > 0 trains rank-r adapters on a frozen base (latro_jax.lora)
    lora_alpha: float = 16.0  # the adapters' delta is scaled by lora_alpha / lora_rank
    # what the backward pass recomputes: none | full (each layer; least memory, ~1/3 more compute) |
    # projections (keeps each layer's projection outputs; recomputes attention and elementwise work)
    remat: str = "none"
    # attention over whole sequences (prefill, scoring, training): xla | cudnn (NVIDIA GPUs, bfloat16)
    attention: str = "xla"

    def __post_init__(self):
        for field, mode in (("remat", remat_mode), ("attention", attention_mode)):
            try:
                object.__setattr__(self, field, mode(getattr(self, field)))
            except ValueError as e:
                raise ExperimentError(f"model.{field}={getattr(self, field)!r} is invalid; {e}") from None


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The task and its splits. The built-in tasks (gsm8k, arc_challenge, arithmetic) read
    `source`; `task=custom` is the user's own (latro_jax.data.tasks.Task, README "Your own task"):
    rows from `path`, fields, templates and match rule from the settings after it."""

    task: str = "gsm8k"  # gsm8k | arc_challenge | arithmetic (synthetic, the demo's) | custom
    source: str = ""  # built-in tasks: "" = the HF hub; or a local jsonl directory
    train_split: str = "train"
    eval_split: str = "validation"  # held out of train by hash where the source has no validation split
    eval_size: int = 200  # questions evaluated during training (0 = the whole split)
    sft_target: str = "rationale"  # SFT on the gold rationale (where the task has one) or on the answer alone
    # task=custom only:
    path: str = ""  # a .jsonl/.json/.csv/.parquet file or a directory of them, or an HF hub dataset id
    config: str = ""  # the hub dataset's config name
    question_field: str = "question"
    answer_field: str = "answer"
    rationale_field: str = ""  # the gold rationale (SFT's target); "" = none
    options_field: str = ""  # a list of option texts (multiple choice); "" = none
    id_field: str = ""  # "" = the row's number
    template: str = "{question}"  # the user message: {question}, {options} or any field of the row
    answer_template: str = ANSWER_TEMPLATE  # appended after each rationale; its text before {answer} stops one
    match: str = "normalized"  # number | exact | normalized | contains | choice
    skip_bad_rows: bool = False  # skip (and count) rows that cannot be used, instead of stopping


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
    num_samples: int = 16  # K rationales per question
    max_new_tokens: int = 500  # L
    temperature: float = 1.0


@dataclasses.dataclass(frozen=True)
class OptimSpec:
    learning_rate: float = 5e-7
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    clip_norm: float = 0.0  # 0 = no clipping (the released recipe)


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    method: str = "latro"  # latro | sft
    questions_per_update: int = 24
    # at most this many rows per forward+backward on each batch shard (mesh data x fsdp; the paper's
    # 4 per GPU); the update accumulates the gradient over all rows (sharding.micro_batch_rows)
    micro_batch: int = 4
    score_batch: int = 0  # rows per reference forward when scoring a rollout; 0 = all rows at once
    rollout_batch: int = 0  # questions sampled and scored at a time (their KV cache); 0 = all at once
    updates: int = 117
    seed: int = 0
    eval_every: int = 20
    save_every: int = 20
    keep_last: int = 2
    maj_k: int = 8
    output_dir: str = "runs"
    wandb_project: str = ""  # log to Weights & Biases too (needs `pip install wandb`)


@dataclasses.dataclass(frozen=True)
class PretrainSpec:
    """A base model trained from scratch before the run (latro_jax.pretrain; the demo's stage 1):
    a Llama-architecture model of this size, SFT on the task's training rationales, cached."""

    updates: int = 0  # 0 = none: the base model is model.checkpoint / model.hf
    hidden_size: int = 64
    num_layers: int = 4
    head_dim: int = 32
    batch: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 20


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    rollout: RolloutSpec = RolloutSpec()
    objective: ObjectiveConfig = ObjectiveConfig(beta=0.05)
    optim: OptimSpec = OptimSpec()
    train: TrainSpec = TrainSpec()
    pretrain: PretrainSpec = PretrainSpec()
    mesh: MeshSpec = MeshSpec()  # devices along data, fsdp, tensor; -1 = the rest (default: fsdp over all)
    distributed: DistributedSpec = DistributedSpec()  # a multi-host run's processes (default: one process)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.train.output_dir, self.name)


def _check(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ExperimentError(f"{field}={value!r} is invalid; {allowed}")


def validate_data(d: DataSpec) -> DataSpec:
    """Check the data settings: the task, and a custom task's fields, templates and match rule."""
    _check(d.task in TASK_NAMES, "data.task", d.task, f"allowed: {', '.join(TASK_NAMES)}")
    _check(not (d.task == "arithmetic" and d.source), "data.source", d.source,
           "must be empty: the arithmetic task is generated, it reads no data")
    if d.task != CUSTOM:
        default = DataSpec()
        for field in CUSTOM_FIELDS:
            _check(getattr(d, field) == getattr(default, field), f"data.{field}", getattr(d, field),
                   f"is a setting of data.task={CUSTOM} (the task {d.task!r} has its own)")
    else:
        _check(bool(d.path), "data.path", d.path,
               "set it to your task's .jsonl/.json/.csv/.parquet file or directory, or an HF hub dataset id")
        _check(not d.source, "data.source", d.source, "is for the built-in tasks; a custom task reads data.path")
        try:
            task_of(d)
        except ValueError as e:
            raise ExperimentError(str(e)) from None
    _check(d.sft_target in ("rationale", "answer"), "data.sft_target", d.sft_target, "allowed: rationale, answer")
    _check(d.eval_size >= 0, "data.eval_size", d.eval_size, "must be >= 0")
    return d


def validate(exp: Experiment) -> Experiment:
    """Check every field once; the error names the field and what is allowed."""
    for section in dataclasses.fields(exp):
        values = getattr(exp, section.name)
        for field in dataclasses.fields(values) if dataclasses.is_dataclass(values) else ():
            value = getattr(values, field.name)
            _check(not isinstance(value, float) or math.isfinite(value), f"{section.name}.{field.name}", value,
                   "must be a finite number")
    m, d, r, o, t, p = exp.model, exp.data, exp.rollout, exp.optim, exp.train, exp.pretrain
    if p.updates:
        _check(not m.checkpoint and not m.hf, "model.checkpoint/model.hf", (m.checkpoint, m.hf),
               "must be empty when pretrain.updates > 0 (the base model is trained from scratch)")
        _check(p.hidden_size % p.head_dim == 0, "pretrain.hidden_size", p.hidden_size,
               f"must be a multiple of pretrain.head_dim={p.head_dim}")
        for field in ("num_layers", "batch", "learning_rate"):
            _check(getattr(p, field) > 0, f"pretrain.{field}", getattr(p, field), "must be > 0")
        _check(0 <= p.warmup_steps < p.updates, "pretrain.warmup_steps", p.warmup_steps, f"must be in [0, {p.updates})")
    else:
        _check(bool(m.checkpoint) != bool(m.hf), "model.checkpoint/model.hf", (m.checkpoint, m.hf),
               "set exactly one: a latro-jax checkpoint directory or an HF directory / hub id")
    _check(p.updates >= 0, "pretrain.updates", p.updates, "must be >= 0")
    _check(m.dtype in ("float32", "bfloat16"), "model.dtype", m.dtype, "allowed: float32, bfloat16")
    _check(m.lora_rank >= 0, "model.lora_rank", m.lora_rank, "must be >= 0 (0 = full fine-tuning)")
    _check(m.lora_alpha > 0, "model.lora_alpha", m.lora_alpha, "must be > 0")
    validate_data(d)
    _check(r.num_samples >= 2 or t.method == "sft", "rollout.num_samples", r.num_samples,
           "LaTRO's leave-one-out baseline needs >= 2")
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens", r.max_new_tokens, "must be >= 1")
    _check(r.temperature > 0, "rollout.temperature", r.temperature, "must be > 0 for training rollouts")
    _check(o.learning_rate > 0, "optim.learning_rate", o.learning_rate, "must be > 0")
    _check(o.clip_norm >= 0, "optim.clip_norm", o.clip_norm, "must be >= 0 (0 = off)")
    _check(0 <= o.warmup_steps < t.updates, "optim.warmup_steps", o.warmup_steps, f"must be in [0, {t.updates})")
    _check(t.method in ("latro", "sft"), "train.method", t.method, "allowed: latro, sft")
    _check(t.questions_per_update >= 1, "train.questions_per_update", t.questions_per_update, "must be >= 1")
    _check(t.micro_batch >= 1, "train.micro_batch", t.micro_batch,
           "must be >= 1 (at most this many rows per batch shard in each forward+backward)")
    # 0, or at least the whole, means all at once; a smaller chunk must divide the whole
    chunk = min(t.rollout_batch or t.questions_per_update, t.questions_per_update)
    _check(t.rollout_batch >= 0 and t.questions_per_update % chunk == 0, "train.rollout_batch", t.rollout_batch,
           f"must be 0 (all at once) or divide train.questions_per_update={t.questions_per_update}")
    scored = chunk * r.num_samples  # rows scored at a time
    _check(t.score_batch >= 0 and scored % min(t.score_batch or scored, scored) == 0, "train.score_batch",
           t.score_batch, f"must be 0 (all rows at once) or divide the {scored} rows scored at a time")
    _check(t.updates >= 1, "train.updates", t.updates, "must be >= 1")
    g = exp.objective.nonstop_group
    _check(g == 0 or t.questions_per_update % g == 0, "objective.nonstop_group", g,
           f"must be 0 (the whole batch) or divide train.questions_per_update={t.questions_per_update}")
    for field in ("eval_every", "save_every", "keep_last", "maj_k"):
        _check(getattr(t, field) >= 1, f"train.{field}", getattr(t, field), "must be >= 1")
    return exp


def _parse(text: str, kind, field: str):
    origin = typing.get_origin(kind)
    if kind is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ExperimentError(f"{field}={text!r}: expected true or false")
    try:
        if kind in (int, float, str):
            return kind(text)
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            for option in typing.get_args(kind):
                if option is not type(None):
                    return _parse(text, option, field)
    except ValueError:
        raise ExperimentError(f"{field}={text!r}: expected {kind.__name__}") from None
    raise ExperimentError(f"{field}: cannot be set from the command line")


def apply_overrides(exp: Experiment, overrides: list[str]) -> Experiment:
    """Apply `section.field=value` overrides (e.g. `train.updates=2`), type-checked by field. Each
    section is rebuilt once with all of its overrides, so that a section's own checks across its
    fields (e.g. objective.reward with objective.nonstop_coef) do not depend on their order. The
    starting weights are one setting: model.checkpoint=<dir> alone clears the experiment's
    model.hf, and model.hf=<id> alone its model.checkpoint."""
    changes: dict[str, dict] = {}
    given: dict[str, list[str]] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        path = key.split(".")
        if not sep or len(path) != 2:
            raise ExperimentError(f"override {item!r}: expected section.field=value, e.g. train.updates=2")
        section_name, field = path
        section = getattr(exp, section_name, None)
        if section is None or not dataclasses.is_dataclass(section):
            sections = [f.name for f in dataclasses.fields(exp) if dataclasses.is_dataclass(getattr(exp, f.name))]
            raise ExperimentError(f"override {item!r}: unknown section {section_name!r}; sections: {sections}")
        hints = typing.get_type_hints(type(section))
        if field not in hints:
            raise ExperimentError(f"override {item!r}: {section_name} has no field {field!r}; fields: {sorted(hints)}")
        value = _parse(text, hints[field], key)
        changes.setdefault(section_name, {})[field] = value
        given.setdefault(section_name, []).append(f"{key}={value!r}")
    model = changes.get("model", {})
    for given_field, other in (("checkpoint", "hf"), ("hf", "checkpoint")):
        if model.get(given_field) and other not in model:
            model[other] = ""
    for section_name, fields in changes.items():
        try:
            exp = dataclasses.replace(exp, **{section_name: dataclasses.replace(getattr(exp, section_name), **fields)})
        except ExperimentError:
            raise
        except ValueError as e:  # a section's own check (MeshSpec, ObjectiveConfig)
            raise ExperimentError(f"{', '.join(given[section_name])} is invalid; {e}") from None
    return exp


def experiment_from_dict(fields: dict) -> Experiment:
    """The inverse of `dataclasses.asdict` (a run's config.json)."""
    sections = {f.name: f.type for f in dataclasses.fields(Experiment)}
    hints = typing.get_type_hints(Experiment)
    return Experiment(
        name=fields["name"],
        **{name: hints[name](**fields[name]) for name in sections if name != "name" and name in fields},
    )


def experiment_module(name: str, directory: str | None = None):
    """The module `experiments/<name>.py`. Its `config()` returns the Experiment; an optional
    `run(exp, progress)` runs it in place of `latro_jax.train.run` (the demo's three stages)."""
    directory = directory or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
    if not os.path.isdir(directory):
        raise ExperimentError(f"no experiments folder at {directory}: experiments are read from the repository's "
                              "experiments/; install latro-jax from a checkout, editable (pip install -e <repo>, as "
                              "make setup does)")
    path = os.path.join(directory, f"{name}.py")
    if not os.path.isfile(path):
        available = sorted(f[:-3] for f in os.listdir(directory) if f.endswith(".py") and not f.startswith("_"))
        raise ExperimentError(f"no experiment {name!r} ({path}); available: {', '.join(available)}")
    if directory not in sys.path:
        sys.path.insert(0, directory)  # experiments import their shared recipe module
    spec = importlib.util.spec_from_file_location(f"experiments.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_experiment(name: str, overrides: list[str] = (), directory: str | None = None) -> Experiment:
    """Import `experiments/<name>.py`, call its `config()`, apply overrides, validate."""
    return validate(apply_overrides(experiment_module(name, directory).config(), list(overrides)))
