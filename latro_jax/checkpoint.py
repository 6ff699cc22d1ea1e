"""Model checkpoints on disk: Orbax params, the model config, and the HF files that travel with them.

Layout of a model checkpoint directory:

    params/              Orbax PyTree checkpoint of the params (a pure dict of arrays)
    model_config.json    latro-jax `ModelConfig`
    hf/                  the source's config.json, generation_config.json and tokenizer files,
                         verbatim, so that an export gives back what came in

A checkpoint is written into a temporary sibling directory and renamed into place only when
complete: a failure leaves no partial checkpoint behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator

import jax
import orbax.checkpoint as ocp
from flax import nnx

from latro_jax.config import ConfigError, ModelConfig, RopeConfig
from latro_jax.model import abstract_params
from latro_jax.sharding import param_shardings

PARAMS_DIR = "params"
CONFIG_FILE = "model_config.json"
HF_DIR = "hf"


def config_to_json(config: ModelConfig) -> str:
    return json.dumps(dataclasses.asdict(config), indent=1)


def config_from_json(text: str) -> ModelConfig:
    fields = json.loads(text)
    rope = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.pop("rope").items()}
    fields["sliding_windows"] = tuple(fields["sliding_windows"])
    fields["eos_token_ids"] = tuple(fields["eos_token_ids"])
    return ModelConfig(rope=RopeConfig(**rope), **fields)


def current_umask() -> int:
    """The process's umask. Linux shows it in /proc/self/status; elsewhere reading it means
    setting it, and setting it back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a latro-jax model checkpoint directory."""
    return os.path.isfile(os.path.join(os.fspath(path), CONFIG_FILE))


def check_output(path: str | os.PathLike, overwrite: bool = False) -> None:
    """That an output can be made at `path`, checked before any long work so that a bad path is the
    first thing said: nothing is there yet (an output directory is never overwritten; `overwrite`
    lets a file be replaced), and the nearest folder above it that exists is a directory this
    process may write in (missing folders between are made when the output is written)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another output path or remove it")
    if os.path.isdir(path):
        raise FileExistsError(f"{path} is a directory; give a file's path")
    folder = os.path.dirname(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path} cannot be created: {folder} is a file, not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{path} cannot be created: {folder} is not writable (read-only, or another user's)")


def write_permissions(path: str | os.PathLike) -> None:
    """Give the file `path` the permissions open() would (the umask's), where its writer made it private."""
    os.chmod(path, 0o666 & ~current_umask())


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary directory that replaces `path` only if the block completes. Temporary
    directories of `path` that an earlier, killed attempt left (a converted 8B model is 32 GB)
    are removed first: one writer makes a given output at a time."""
    path = os.path.abspath(os.fspath(path))
    check_output(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    for stale in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(os.path.basename(path))}.partial-*")):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.partial-", dir=parent)
    os.chmod(tmp, 0o777 & ~current_umask())  # as os.makedirs would make it (mkdtemp's is private: 0700)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_params(path: str | os.PathLike, params: nnx.State) -> None:
    """Orbax PyTree save of the params; blocks until written."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(os.fspath(path)), nnx.to_pure_dict(params))
        checkpointer.wait_until_finished()


def on_one_device(abstract, device=None):
    """Abstract arrays (anything with .shape and .dtype) as `jax.ShapeDtypeStruct`s placed on
    `device` (default: this process's first device): a restore target that reads a checkpoint onto
    one device, whatever mesh saved it."""
    sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)


def restore_params(path: str | os.PathLike, config: ModelConfig, shardings=None, device=None) -> nnx.State:
    """Restore params saved by `save_params` into the structure (and dtypes) `config` describes.

    `shardings`, a pytree of `jax.sharding.Sharding` matching the params, restores each array
    straight into its shards; None places everything on `device` (default: this process's first).
    """
    abstract = abstract_params(config)
    target = nnx.to_pure_dict(abstract)
    if shardings is None:
        target = on_one_device(target, device)
    else:
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, nnx.to_pure_dict(shardings)
        )
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(os.path.abspath(os.fspath(path)), target)
    nnx.replace_by_pure_dict(abstract, restored)
    return abstract


def save_model(
    path: str | os.PathLike, config: ModelConfig, params: nnx.State, hf_files: dict[str, str] | None = None
) -> None:
    """Write a model checkpoint directory; `hf_files` maps names under hf/ to files to copy."""
    with atomic_directory(path) as tmp:
        save_params(os.path.join(tmp, PARAMS_DIR), params)
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            f.write(config_to_json(config))
        os.makedirs(os.path.join(tmp, HF_DIR))
        for name, source in (hf_files or {}).items():
            shutil.copyfile(source, os.path.join(tmp, HF_DIR, name))


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """The numbered subdirectories of `directory`: the steps of a folder of checkpoints, such as a
    run's checkpoints/ and best/."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def check_not_steps(path: str | os.PathLike) -> None:
    """Where `path`, given as one model, is a folder of checkpoint steps (a run's best/ or
    checkpoints/, or the run's directory holding those) or a step that is not there: a
    FileNotFoundError that lists the steps there are."""
    path = os.path.normpath(os.fspath(path))
    steps = [str(s) for s in checkpoint_steps(path)]
    if not steps and os.path.isdir(path):  # a run's directory: the steps of its best/ and checkpoints/
        steps = [os.path.join(sub, str(s)) for sub in sorted(os.listdir(path))
                 for s in checkpoint_steps(os.path.join(path, sub))]
    if steps:
        raise FileNotFoundError(f"{path} holds checkpoint steps ({', '.join(steps)}): give one, e.g. "
                                f"{os.path.join(path, steps[-1])}")
    parent = os.path.dirname(path)
    steps = [str(s) for s in checkpoint_steps(parent or ".")]
    if steps and not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint step; {parent or '.'} holds steps {', '.join(steps)}")


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of the model checkpoint directory `path`, without its weights."""
    config_path = os.path.join(os.fspath(path), CONFIG_FILE)
    if not os.path.isfile(config_path):
        check_not_steps(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{os.fspath(path)}: no such directory")
        raise FileNotFoundError(
            f"{os.fspath(path)} is not a latro-jax model checkpoint (no {CONFIG_FILE}); convert HF weights with "
            "`make convert SRC=<hf dir or hub id> OUT=<dir>`"
        )
    with open(config_path) as f:
        text = f.read()
    try:
        return config_from_json(text)
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # ConfigError is a ValueError: its text names the field
        raise ConfigError(f"{config_path}: {type(e).__name__}: {e}") from None


def load_model(path: str | os.PathLike, mesh=None, device=None, **config_overrides) -> tuple[ModelConfig, nnx.State]:
    """Read a model checkpoint directory. `config_overrides` (e.g. dtype="bfloat16") apply on load;
    a different `param_dtype` casts the stored params. `mesh`: restore each array straight into
    its shards on it (`sharding.param_shardings`); None: onto `device` (default: this process's
    first)."""
    path = os.fspath(path)
    stored = read_config(path)
    shardings = None if mesh is None else param_shardings(mesh, abstract_params(stored))
    params = restore_params(os.path.join(path, PARAMS_DIR), stored, shardings, device)
    config = stored.replace(**config_overrides)
    if config.param_dtype != stored.param_dtype:
        params = jax.tree.map(lambda x: x.astype(config.param_dtype), params)
    return config, params
