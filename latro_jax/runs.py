"""A run directory and what is read back from it: config.json, checkpoints/ (the last N) and
best/ (by validation greedy accuracy), metrics.jsonl, TensorBoard events, samples.txt,
eval_<step>.json, and a saved step's model for `make eval` and `make export`; how a run stops
(SIGTERM, Ctrl-C) so that the same command resumes it."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import glob
import inspect
import itertools
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
from typing import NamedTuple

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
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


def _metrics_up_to(step: int, evaluation: bool = True):
    """A `_keep_lines` filter of metrics.jsonl: the records of updates up to `step`, the record of
    `step`'s evaluation only if `evaluation`; a line cut short (a kill while writing) or otherwise
    unreadable is dropped."""

    def keep(line: str) -> bool:
        try:
            record = json.loads(line)
            at = int(record["step"])
        except (ValueError, KeyError, TypeError):
            return False
        return at < step or at == step and (evaluation or not any(k.startswith("eval/") for k in record))

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


def _json_value(value):
    """A metric as JSON has it: a non-finite float (a skipped update's loss) as null."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


class RunLog:
    """metrics.jsonl (one JSON record a line: an update's metrics, or an evaluation's "eval/..."
    accuracies; a non-finite value, such as a skipped update's loss, is null), TensorBoard events
    (the values as they are), Weights & Biases (if `wandb_project` is set), and samples.txt: at
    each update due an evaluation, LaTRO's rollout (rationales and rewards, logged with the
    update) or the SFT baseline's greedy completions (logged with the evaluation: its updates
    sample nothing)."""

    def __init__(self, run_dir: str, exp: Experiment, step: int = 0, redo_evaluation: bool = False):
        """`step`: the update the run resumes after. What an earlier attempt logged after it (updates
        that its checkpoint did not keep, which this run redoes) is dropped from metrics.jsonl,
        samples.txt and TensorBoard, so each update is logged once. `redo_evaluation`: the run
        redoes `step`'s evaluation (`train.evaluation_pending`), whose record (and the SFT
        baseline's samples) an earlier attempt may have logged before it was killed: they are
        dropped too."""
        from tensorboardX import SummaryWriter

        self.evaluation_samples = exp.train.method == "sft"  # its updates sample nothing
        if exp.train.wandb_project:  # checked on every process: one failing alone would leave the others waiting
            try:
                import wandb
            except ImportError:
                raise ExperimentError("train.wandb_project is set but wandb is not installed: pip install wandb")
        self.enabled = is_primary()  # one process of a multi-host run writes
        if not self.enabled:
            return
        metrics_path, samples_path = os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "samples.txt")
        _keep_lines(metrics_path, _metrics_up_to(step, evaluation=not redo_evaluation))
        _keep_lines(samples_path, _samples_up_to(step - 1 if redo_evaluation and self.evaluation_samples else step))
        self.metrics = open(metrics_path, "a")
        self.samples = open(samples_path, "a")
        # TensorBoard drops the events from purge_step on (those of `step`'s update, kept in
        # metrics.jsonl, are then written again). The file name's own timestamp is in seconds: a
        # rerun within the second would overwrite the last one's file.
        self.tensorboard = SummaryWriter(os.path.join(run_dir, "tensorboard"), filename_suffix=f".{time.time_ns()}",
                                         purge_step=step if redo_evaluation else step + 1)
        if redo_evaluation:
            with open(metrics_path) as f:
                for record in map(json.loads, f):
                    if record["step"] == step:
                        self._add_scalars(step, {k: math.nan if v is None else v for k, v in record.items()
                                                 if k != "step"})
        self.wandb = None
        if exp.train.wandb_project:
            self.wandb = wandb.init(project=exp.train.wandb_project, name=exp.name, config=dataclasses.asdict(exp),
                                    resume="allow", id=exp.name)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _json_value(v) for k, v in metrics.items()}}
        self.metrics.write(json.dumps(record, allow_nan=False) + "\n")
        self.metrics.flush()
        self._add_scalars(step, metrics)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def _add_scalars(self, step: int, metrics: dict) -> None:
        for name, value in metrics.items():
            self.tensorboard.add_scalar(name, value, step)
        self.tensorboard.flush()

    def write_evaluation(self, step: int, accuracies: dict, greedy_texts: list[str]) -> None:
        """An evaluation's record, and the SFT baseline's samples: the evaluation's first greedy
        completions."""
        self.write(step, {f"eval/{k}": v for k, v in accuracies.items()})
        if self.evaluation_samples:
            self.write_samples(step, greedy_texts)

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


class SaveError(Exception):
    """A checkpoint that could not be written (a full disk, say): the run stops, and the message
    names the update, the directory and the cause on one line."""


def _cause(error: BaseException) -> str:
    """The root cause of `error` on one line (orbax and TensorStore wrap the OS's)."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split())
    text = text if len(text) <= 300 else text[:300] + "..."
    return text if isinstance(error, OSError) else f"{type(error).__name__}: {text}"


@contextlib.contextmanager
def _quiet_failed_reads():
    """Orbax leaves the reads of a restore that failed behind: coroutines and tasks whose errors
    Python prints as it collects them, TensorStore callbacks into a closed event loop. Each
    repeats the damage that `Checkpoints.restore` names in one line (with a TensorStore spec:
    thousands of lines at 8B), so they are dropped; other errors pass."""
    previous, asyncio_log = sys.unraisablehook, logging.getLogger("asyncio")

    def hook(unraisable):
        if not (inspect.iscoroutine(unraisable.object) or "Event loop is closed" in str(unraisable.exc_value)):
            previous(unraisable)

    def unretrieved(record: logging.LogRecord) -> bool:
        return "exception was never retrieved" not in record.getMessage()

    sys.unraisablehook = hook
    asyncio_log.addFilter(unretrieved)
    try:
        yield
    finally:
        gc.collect()  # a failed restore's coroutines and tasks, now
        asyncio_log.removeFilter(unretrieved)
        sys.unraisablehook = previous


def _require_room(directory: str, state) -> None:
    """ENOSPC, before anything is written, where the disk of `directory` has less room than the
    bytes of `state` (at most what a saved step takes: orbax compresses). A disk that fills up
    midway (another writer) fails the save in orbax's threads, which print their tracebacks."""
    needed, free = sum(x.nbytes for x in jax.tree.leaves(state)), shutil.disk_usage(directory).free
    if needed > free:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({_size(needed)} to write, {_size(free)} free)")


def _remove_for_good(pattern: str, settle_s: float = 1.0, limit_s: float = 60.0) -> None:
    """Remove the directories that match `pattern` (a failed save's temporary one), again while
    they come back: once one write of a save fails, orbax does not wait for the others it began,
    and TensorStore's threads make their directories again as they finish. Done once none has
    come back for `settle_s` (at most `limit_s`: what comes back later, the next start removes)."""
    paths, deadline = glob.glob(pattern), time.monotonic() + limit_s
    while paths and time.monotonic() < deadline:
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)
        time.sleep(settle_s)
        paths = glob.glob(pattern)


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


class Checkpoints:
    """A run's checkpoints/ (the last train.keep_last saves) and best/ (the step of the best
    validation greedy accuracy). Each step holds the state (params and optimizer state) and
    {"step", "experiment"}; every process writes its shards, which restore onto any mesh.

    A save to checkpoints/ is asynchronous: it is written while the next updates run, and its
    outcome is checked before the next save, before an evaluation (`finish_saving`) and at close;
    a save to best/ is waited for. A save that fails removes its temporary directory and raises
    SaveError: the run stops there, keeping the older steps. The temporary directories of a save
    that a kill cut short are removed when the next run starts."""

    def __init__(self, exp: Experiment):
        self.name, self.run_dir = exp.name, exp.run_dir

        def manager(folder: str, **options):
            options = ocp.CheckpointManagerOptions(cleanup_tmp_directories=True, **options)
            return ocp.CheckpointManager(os.path.abspath(os.path.join(exp.run_dir, folder)), options=options,
                                         item_names=("state", "meta"))

        self.latest = manager("checkpoints", max_to_keep=exp.train.keep_last)
        self.best = manager("best", max_to_keep=1, best_fn=lambda m: m["greedy_accuracy"], best_mode="max")
        self.saving = {}  # folder -> the update its save in flight holds

    def restore(self, state: dict) -> tuple[dict, int]:
        """The newest intact saved state, restored into the shardings of `state` whatever mesh wrote
        it, and its step; (`state`, 0) where nothing was saved. A newer step that does not read
        back (a file cut short, one missing) is named on stderr and moved aside to
        <step>.damaged-<n>, kept for a look and out of the way of the save of that update, which
        the run redoes. None intact stops the run (ExperimentError), moving nothing."""
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        damaged = []  # (step, why), newest first
        for step in reversed(self.latest.all_steps()):
            with _quiet_failed_reads():
                try:
                    restored, why = self.latest.restore(step, args=args), None
                except Exception as e:  # whatever a damaged file makes orbax or TensorStore raise
                    restored, why = None, _cause(e)
            (failed,) = global_max([why is not None])
            if failed:
                damaged.append((step, why or "on another process"))
                continue
            self._move_aside(damaged, step)
            return restored.state, restored.meta["step"]
        if damaged:
            named = "; ".join(f"{self._path('checkpoints', s)}: {why}" for s, why in damaged)
            raise ExperimentError(f"no checkpoint of {self.run_dir} reads back ({named}): move the damaged "
                                  f"ones out of {self._path('checkpoints')} to start the run over")
        return state, 0

    def _move_aside(self, damaged: list, step: int) -> None:
        """Report each damaged step, rename it <step>.damaged-<n> and let the manager forget it."""
        if not damaged:
            return
        if is_primary():
            for bad, why in damaged:
                path = self._path("checkpoints", bad)
                aside = next(name for name in (f"{path}.damaged-{n}" for n in itertools.count(1))
                             if not os.path.exists(name))
                os.rename(path, aside)
                tqdm.write(f"{path} is damaged ({why}); resuming from {self._path('checkpoints', step)} "
                           f"(the damaged one is kept as {aside})", file=sys.stderr)
        multihost_utils.sync_global_devices("latro_jax damaged checkpoints moved aside")
        self.latest.reload()

    def save(self, step: int, state: dict) -> None:
        """Save `state` as update `step` (asynchronously), unless that step is saved already,
        once the save before it is checked."""
        self.finish_saving()
        if self.latest.latest_step() != step:
            self._save("checkpoints", step, state)

    def save_best(self, step: int, state: dict, greedy_accuracy: float) -> None:
        """Offer update `step` to best/, which keeps it if its accuracy is the best, and wait."""
        if step not in self.best.all_steps():  # a kill after best/ was written but before eval_<step>.json
            self._save("best", step, state, metrics={"greedy_accuracy": greedy_accuracy})
            self._finish("best")

    def finish_saving(self) -> None:
        """Wait for the save to checkpoints/ in flight, if any; SaveError if it failed."""
        self._finish("checkpoints")

    def close(self) -> None:
        """Wait for the saves in flight (SaveError if one failed) and close the managers."""
        try:
            self._finish("checkpoints")
            self._finish("best")
        finally:
            self.latest.close()
            self.best.close()

    def _manager(self, folder: str):
        return self.latest if folder == "checkpoints" else self.best

    def _path(self, folder: str, step: int | None = None) -> str:
        return os.path.join(self.run_dir, folder, *([] if step is None else [str(step)]))

    def _save(self, folder: str, step: int, state: dict, **options) -> None:
        """Start the save of `state` as update `step` to `folder` (`_finish` waits for it)."""
        meta = {"step": step, "experiment": self.name}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        try:
            _require_room(self._path(folder), state)
            self._manager(folder).save(step, args=args, **options)
            error = None
        except Exception as e:
            error = e
        self._raise_if_failed(folder, step, error)
        self.saving[folder] = step

    def _finish(self, folder: str) -> None:
        """Wait for `folder`'s save in flight: orbax re-raises what failed in its background
        thread (once; the older steps it would have deleted after the save are kept)."""
        if folder not in self.saving:
            return
        step = self.saving.pop(folder)
        try:
            self._manager(folder).wait_until_finished()
            error = None
        except Exception as e:
            error = e
        self._raise_if_failed(folder, step, error)

    def _raise_if_failed(self, folder: str, step: int, error: Exception | None) -> None:
        """SaveError on every process if the save of `step` to `folder` failed on any, once its
        temporary directory is removed."""
        (failed,) = global_max([error is not None])
        if not failed:
            return
        if is_primary():
            _remove_for_good(glob.escape(self._path(folder, step)) + ocp.path.atomicity_types.TMP_DIR_SUFFIX + "*")
        why = _cause(error) if error is not None else "it failed on another process"
        raise SaveError(f"saving update {step} to {self._path(folder)} failed: {why}") from error


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
