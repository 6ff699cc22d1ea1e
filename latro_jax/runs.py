"""A run directory and what is read back from it: config.json, checkpoints/ (the last N) and
best/ (by validation greedy accuracy), metrics.jsonl, TensorBoard events, samples.txt,
eval_<step>.json, and a saved step's model for `make eval` and `make export`; how a run stops
(SIGTERM, Ctrl-C) so that the same command resumes it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
from typing import NamedTuple

import jax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from latro_jax.checkpoint import HF_DIR, is_checkpoint, load_model, on_one_device, read_config
from latro_jax.config import ModelConfig
from latro_jax.experiment import Experiment, ExperimentError, experiment_from_dict
from latro_jax.lora import abstract_adapters, lora_config, merge
from latro_jax.model import abstract_params
from latro_jax.pretrain import pretrained_path
from latro_jax.sharding import global_max, is_primary
from latro_jax.update import policy_param_dtype


# How a run's saved params are read: a rerun that resumes from them must not change these.
WEIGHT_SETTINGS = ("lora_rank", "lora_alpha")


def check_resumable(run_dir: str, exp: Experiment) -> None:
    """A rerun in a run directory that holds checkpoints resumes from them: the settings that say
    how their params are read (model.lora_rank and model.lora_alpha: a changed alpha would scale
    the restored adapters differently, silently) must be the run's (its config.json). Others may
    change (train.updates, to train on; model.checkpoint, a moved copy of the base); config.json
    then records the new ones."""
    config_path = os.path.join(run_dir, "config.json")
    checkpoints = os.path.join(run_dir, "checkpoints")
    if not (os.path.isfile(config_path) and os.path.isdir(checkpoints) and os.listdir(checkpoints)):
        return
    with open(config_path) as f:
        saved = json.load(f)
    model = dataclasses.asdict(exp.model)
    changed = [f"model.{field}: {saved['model'][field]!r} in the run, now {model[field]!r}"
               for field in WEIGHT_SETTINGS if field in saved.get("model", {}) and saved["model"][field] != model[field]]
    if changed:
        raise ExperimentError(f"{run_dir} holds checkpoints of a run with other weights ({'; '.join(changed)}): "
                              "rerun with the run's settings to resume it, or start another run (train.output_dir "
                              "or the experiment's name)")


def base_checkpoint(exp: Experiment) -> str:
    """The model checkpoint directory a run of `exp` starts from: model.checkpoint, the
    conversion of model.hf in the run directory, or the pre-trained base (`train.starting_checkpoint`
    makes the last two on first use)."""
    if exp.pretrain.updates:
        return pretrained_path(exp)
    if exp.model.hf:
        return os.path.join(exp.run_dir, "base_model")
    return exp.model.checkpoint


def is_run_step(path: str | os.PathLike) -> bool:
    """Whether `path` is a checkpoint step of a training run (runs/<exp>/{best,checkpoints}/<step>)."""
    return os.path.isdir(os.path.join(os.fspath(path), "state"))


class RunStep(NamedTuple):
    """The model of a training run's checkpoint step (`load_run_step`)."""

    config: ModelConfig  # compute dtype as asked; param_dtype the params'
    params: nnx.State  # float32 master weights; a LoRA run's: the adapters merged into its base (compute dtype)
    tokenizer: str  # tokenizer directory or hub id
    hf_files: str  # the base model's HF side files (config.json, tokenizer, generation config)


def run_experiment(path: str | os.PathLike) -> Experiment:
    """The experiment of the run a checkpoint step belongs to (its config.json), with the run's
    directory as it is now (the run may have moved)."""
    path = os.path.abspath(os.path.normpath(os.fspath(path)))
    run_dir = os.path.dirname(os.path.dirname(path))
    if not is_run_step(path):
        raise ExperimentError(f"{path} is not a checkpoint step of a training run (no state/ in it); expected "
                              "runs/<experiment>/best/<step> or runs/<experiment>/checkpoints/<step>")
    config_path = os.path.join(run_dir, "config.json")
    try:
        with open(config_path) as f:
            exp = experiment_from_dict(json.load(f))
    except (OSError, ValueError) as e:
        raise ExperimentError(f"{config_path}: the run's experiment could not be read ({e})") from None
    return dataclasses.replace(exp, name=os.path.basename(run_dir),
                               train=dataclasses.replace(exp.train, output_dir=os.path.dirname(run_dir)))


def load_run_step(path: str | os.PathLike, dtype: str | None = None, device=None) -> RunStep:
    """The model a training run saved at one checkpoint step (runs/<exp>/best/<step> or
    runs/<exp>/checkpoints/<step>), read onto `device` (default: this process's first device)
    whatever mesh saved it, in `dtype` (default: the run's compute dtype). A LoRA run's adapters
    are merged into the base as the run sampled with them. Only the params are read, not the
    optimizer state (twice their size). The run directory may have moved: its config.json and
    the base model it started from are found beside the step."""
    path = os.path.abspath(os.path.normpath(os.fspath(path)))
    exp = run_experiment(path)
    base = base_checkpoint(exp)
    if not is_checkpoint(base):
        raise ExperimentError(f"{base} (the model the run started from) is not a latro-jax checkpoint any more: "
                              "its weights are needed to read the run's checkpoints")
    lora = lora_config(exp.model)
    stored = read_config(base)
    param_dtype = policy_param_dtype(exp.model)  # as the run held them
    if lora:  # the run saved its adapters
        _, base_params = load_model(base, device=device, dtype=exp.model.dtype, param_dtype=param_dtype)
        target = abstract_adapters(stored, lora)
    else:
        target = abstract_params(stored.replace(param_dtype=param_dtype))
    target = {"params": on_one_device(target, device)}
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(os.path.join(path, "state"), args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    params = restored["params"]
    if lora:
        params = jax.jit(merge, static_argnums=0)(lora, base_params, params)
    config = stored.replace(dtype=dtype or exp.model.dtype, param_dtype=param_dtype)
    return RunStep(config, params, exp.model.tokenizer or os.path.join(base, HF_DIR), os.path.join(base, HF_DIR))


def _keep_lines(path: str, keep) -> None:
    """Rewrite the text file `path` (if any) with the lines `keep` accepts, atomically."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if keep(line)]
    if len(kept) < len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


def _metrics_up_to(step: int):
    """A `_keep_lines` filter of metrics.jsonl: the records of updates up to `step`; a line cut
    short (a kill while writing) or otherwise unreadable is dropped."""

    def keep(line: str) -> bool:
        try:
            record = json.loads(line)
            return int(record["step"]) <= step
        except (ValueError, KeyError, TypeError):
            return False

    return keep


def _samples_up_to(step: int):
    """A `_keep_lines` filter of samples.txt: the sections of updates up to `step`."""
    current = [0]

    def keep(line: str) -> bool:
        header = re.fullmatch(r"==== update (\d+)\n?", line)
        if header:
            current[0] = int(header.group(1))
        return current[0] <= step

    return keep


class RunLog:
    """metrics.jsonl, TensorBoard events, Weights & Biases (if `wandb_project` is set), and
    sampled rationales as text."""

    def __init__(self, run_dir: str, exp: Experiment, step: int = 0):
        """`step`: the update the run resumes after. What an earlier attempt logged after it (updates
        that its checkpoint did not keep, which this run redoes) is dropped from metrics.jsonl,
        samples.txt and TensorBoard, so each update is logged once."""
        from tensorboardX import SummaryWriter

        if exp.train.wandb_project:  # checked on every process: one failing alone would leave the others waiting
            try:
                import wandb
            except ImportError:
                raise ExperimentError("train.wandb_project is set but wandb is not installed: pip install wandb")
        self.enabled = is_primary()  # one process of a multi-host run writes
        if not self.enabled:
            return
        metrics_path, samples_path = os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "samples.txt")
        _keep_lines(metrics_path, _metrics_up_to(step))
        _keep_lines(samples_path, _samples_up_to(step))
        self.metrics = open(metrics_path, "a")
        self.samples = open(samples_path, "a")
        self.tensorboard = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=step + 1)
        self.wandb = None
        if exp.train.wandb_project:
            self.wandb = wandb.init(project=exp.train.wandb_project, name=exp.name, config=dataclasses.asdict(exp),
                                    resume="allow", id=exp.name)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps({"step": step, **metrics}) + "\n")
        self.metrics.flush()
        for name, value in metrics.items():
            self.tensorboard.add_scalar(name, value, step)
        self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def write_samples(self, step: int, texts: list[str]) -> None:
        if not self.enabled:
            return
        self.samples.write(f"==== update {step}\n" + "\n----\n".join(texts) + "\n")
        self.samples.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.metrics.close()
        self.samples.close()
        self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def start_run_dir(exp: Experiment) -> None:
    """Make the run directory, check that a rerun may resume what it holds (`check_resumable`),
    and record the experiment in config.json, atomically: the other processes of a multi-host
    run read it."""
    os.makedirs(exp.run_dir, exist_ok=True)
    check_resumable(exp.run_dir, exp)
    if is_primary():
        path = os.path.join(exp.run_dir, "config.json")
        with open(path + ".tmp", "w") as f:
            json.dump(dataclasses.asdict(exp), f, indent=1)
        os.replace(path + ".tmp", path)


class Checkpoints:
    """A run's checkpoints/ (the last train.keep_last saves) and best/ (the step of the best
    validation greedy accuracy). Each step holds the state (params and optimizer state) and
    {"step", "experiment"}; every process writes its shards, which restore onto any mesh."""

    def __init__(self, exp: Experiment):
        self.name = exp.name

        def manager(folder: str, **options):
            return ocp.CheckpointManager(os.path.abspath(os.path.join(exp.run_dir, folder)),
                                         options=ocp.CheckpointManagerOptions(**options), item_names=("state", "meta"))

        self.latest = manager("checkpoints", max_to_keep=exp.train.keep_last)
        self.best = manager("best", max_to_keep=1, best_fn=lambda m: m["greedy_accuracy"], best_mode="max")

    def restore(self, state: dict) -> tuple[dict, int]:
        """The latest saved state, restored into the shardings of `state` whatever mesh wrote it,
        and its step; (`state`, 0) where nothing was saved."""
        step = self.latest.latest_step()
        if step is None:
            return state, 0
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restored = self.latest.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
        return restored.state, restored.meta["step"]

    def save(self, step: int, state: dict) -> None:
        """Save `state` as update `step` (asynchronously), unless that step is saved already."""
        if self.latest.latest_step() != step:
            self.latest.save(step, args=self._args(step, state))

    def save_best(self, step: int, state: dict, greedy_accuracy: float) -> None:
        """Offer update `step` to best/, which keeps it if its accuracy is the best, and wait."""
        if step not in self.best.all_steps():  # a kill after best/ was written but before eval_<step>.json
            self.best.save(step, args=self._args(step, state), metrics={"greedy_accuracy": greedy_accuracy})
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()
        self.latest.close()
        self.best.close()

    def _args(self, step: int, state: dict):
        meta = {"step": step, "experiment": self.name}
        return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))


class Interrupted(Exception):
    """Raised after SIGTERM/Ctrl-C once the current update is finished and saved."""


@contextlib.contextmanager
def stop_requests():
    """SIGTERM and a first Ctrl-C ask the loop to stop after the current update (whose params
    were donated, so it must finish to be saved); a second Ctrl-C aborts at once, unsaved.
    Yields a dict whose "signal" is set when a stop was asked for."""
    stop = {"signal": None}

    def request(signum, _frame):
        stop["signal"] = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        tqdm.write("stopping after this update and saving; Ctrl-C again aborts without saving")

    previous = {s: signal.signal(s, request) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def asked_to_stop(stop: dict) -> bool:
    """Whether any process was signalled to stop (a collective: every process stops together)."""
    (stopping,) = global_max([stop["signal"] is not None])
    if stopping and stop["signal"] is None:
        stop["signal"] = "another process's"
    return bool(stopping)
