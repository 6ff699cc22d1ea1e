"""What a training run checks before anything is written or any weights load (`checked_start`):
the run directory (writable; a rerun resumes what it holds, with train.updates not below its
saved step), the mesh against the devices, the starting weights' directory, the tokenizer
(loadable, within the model's vocabulary) and the data. A failure is one ExperimentError or
DataError line naming the setting, file or split; nothing has been written then."""

from __future__ import annotations

import contextlib
import json
import os
import shutil

import jax

from latro_jax.checkpoint import HF_DIR, is_checkpoint, read_config
from latro_jax.data.prompts import load_tokenizer
from latro_jax.data.tasks import run_data
from latro_jax.experiment import Experiment, ExperimentError
from latro_jax.runs import base_checkpoint, check_resumable
from latro_jax.sharding import is_primary, make_mesh


def checked_start(exp: Experiment, tokenizer=None) -> tuple[jax.sharding.Mesh, object, tuple]:
    """The run's mesh, tokenizer (`tokenizer` if given; None for a base pre-trained by the run, whose
    tokenizer the pre-training writes) and data (`tasks.run_data`), after the checks above."""
    check_writable(exp.train.output_dir, "train.output_dir")
    check_resumable(exp.run_dir, exp)
    saved = saved_step(exp.run_dir)
    if saved is not None and saved > exp.train.updates:
        raise ExperimentError(f"train.updates={exp.train.updates} is below update {saved}, where {exp.run_dir} was "
                              f"saved: rerun with train.updates >= {saved} to train on, or start another run "
                              "(train.output_dir or the experiment's name)")
    mesh = run_mesh(exp)
    if not exp.pretrain.updates and exp.model.checkpoint:
        require_checkpoint(exp.model.checkpoint)
    data = run_data(exp.data)
    if not exp.pretrain.updates:
        tokenizer = tokenizer or run_tokenizer(exp)
        check_vocabulary(exp, tokenizer)
    return mesh, tokenizer, data


def run_mesh(exp: Experiment) -> jax.sharding.Mesh:
    try:
        return make_mesh(exp.mesh)
    except ValueError as e:
        raise ExperimentError(f"mesh: {e} (mesh.data, mesh.fsdp, mesh.tensor)") from None


def require_checkpoint(checkpoint: str) -> str:
    if not is_checkpoint(checkpoint):
        raise ExperimentError(
            f"model.checkpoint={checkpoint!r} is not a latro-jax checkpoint. Convert the HF weights first "
            f"(`make convert SRC=<HF dir or hub id> OUT={checkpoint}`), or set model.hf=<HF dir or hub id> "
            "to convert on first use"
        )
    return checkpoint


def check_writable(directory: str, setting: str) -> None:
    """`directory` exists as a writable directory or can be made: its nearest existing ancestor is
    a directory this process may write in. Nothing is created."""
    path = os.path.abspath(directory or ".")
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ExperimentError(f"{setting}={directory!r} cannot be made: {path} is a file")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ExperimentError(f"{setting}={directory!r}: {path} is not writable (permissions or a read-only "
                              "filesystem)")


def first_missing(path: str) -> str | None:
    """The outermost directory of `path` that does not exist yet (what making `path` creates), or None."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        path, missing = os.path.dirname(path), path
    return missing


@contextlib.contextmanager
def removed_on_failure(path: str):
    """Remove the directories that making `path` created if the block fails (a first start that
    fails past the checks, e.g. in the HF conversion, leaves nothing behind)."""
    created = first_missing(path)
    try:
        yield
    except BaseException:
        if created and is_primary():
            shutil.rmtree(created, ignore_errors=True)
        raise


def saved_step(run_dir: str) -> int | None:
    """The newest update saved in `run_dir`/checkpoints (by its directory names), if any."""
    folder = os.path.join(run_dir, "checkpoints")
    steps = [int(name) for name in os.listdir(folder) if name.isdigit()] if os.path.isdir(folder) else []
    return max(steps, default=None)


def run_tokenizer(exp: Experiment):
    """model.tokenizer, else the starting model's own: a checkpoint's hf/ files or the HF model's."""
    m = exp.model
    converted = base_checkpoint(exp)  # model.checkpoint, or model.hf's conversion once made
    source = m.tokenizer or (os.path.join(converted, HF_DIR) if is_checkpoint(converted) else m.hf)
    setting = "model.tokenizer" if m.tokenizer else "model.checkpoint" if m.checkpoint else "model.hf"
    return named_tokenizer(source, setting)


def named_tokenizer(source: str, setting: str):
    """The tokenizer at `source` (a directory or hub id); a failure is one line naming `setting`."""
    if not os.path.exists(source) and (os.path.isabs(source) or source.startswith((".", "~"))):
        raise ExperimentError(f"{setting}: no tokenizer at {source!r}: no such directory")
    try:
        return load_tokenizer(source)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExperimentError(f"{setting}: no tokenizer could be loaded from {source!r} ({first})") from None


def model_vocab_size(exp: Experiment) -> int | None:
    """The starting model's vocabulary size, read from its config alone (no weights); None where it
    cannot be read without a download (an HF hub id: the conversion checks it)."""
    m = exp.model
    if m.checkpoint:
        return read_config(m.checkpoint).vocab_size
    config = os.path.join(m.hf, "config.json")
    if not os.path.isfile(config):
        return None
    with open(config) as f:
        hf = json.load(f)
    return hf.get("vocab_size", hf.get("text_config", {}).get("vocab_size"))


def check_vocabulary(exp: Experiment, tokenizer) -> None:
    """Every token id the tokenizer can produce has a row in the model's embedding."""
    vocab = model_vocab_size(exp)
    if vocab is not None and len(tokenizer) > vocab:
        source = exp.model.tokenizer or "the model's own tokenizer"
        raise ExperimentError(f"model.tokenizer: {source} has {len(tokenizer):,} tokens, more than the model's "
                              f"vocabulary of {vocab:,} (its embedding rows): it is not this model's tokenizer")
