"""Hugging Face safetensors <-> latro-jax model checkpoints.

`convert_hf` reads an HF model directory (or downloads a hub id), one tensor at a time, into a
latro-jax checkpoint (see latro_jax.checkpoint). `export_hf` writes a checkpoint back as an HF
directory that `AutoModelForCausalLM.from_pretrained` and vLLM load: config.json,
generation_config.json, tokenizer files, and safetensors shards (about 5 GB each) with an index.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil

import jax
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from latro_jax.checkpoint import HF_DIR, atomic_directory, check_output, load_model, save_model, write_permissions
from latro_jax.config import ModelConfig, eos_for_hf
from latro_jax.convert.weights import (
    WeightError,
    check_names,
    flat_params,
    hf_shape,
    hf_tensor,
    params_from_tensors,
    weight_map,
)
from latro_jax.model import abstract_params

# Files copied verbatim from an HF directory into a checkpoint and back out on export.
HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_DTYPES = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16, "float16": np.float16}


def resolve_source(source: str) -> str:
    """A local HF directory as is; anything else is taken as a hub id and downloaded: the
    safetensors files its index lists (a repository may hold the weights twice, as Mistral's
    14 GB consolidated.safetensors beside its shards), or all of them where it has no index."""
    if os.path.isdir(source):
        return source
    if os.path.exists(source):
        raise WeightError(f"{source}: expected an HF model directory, found a file")
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, RemoteEntryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        raise WeightError(f"{source}: no such directory (nor a Hugging Face hub id)") from None
    try:
        try:
            with open(huggingface_hub.hf_hub_download(source, SAFETENSORS_INDEX)) as f:
                weights = sorted(set(json.load(f)["weight_map"].values()))
        except RemoteEntryNotFoundError:
            weights = ["*.safetensors"]
        return huggingface_hub.snapshot_download(source, allow_patterns=[*weights, SAFETENSORS_INDEX, *HF_SIDE_FILES])
    except (HfHubHTTPError, EntryNotFoundError) as e:
        raise WeightError(
            f"{source}: no such directory, and the Hugging Face hub did not give this model "
            f"({type(e).__name__}: {str(e).splitlines()[0]}); gated models such as Llama 3.1 need a login "
            "first (`hf auth login`)"
        ) from None


def open_safetensors(file: str):
    """`safe_open` of one safetensors file (its header is read and checked against the file's size
    here): a file cut short or not safetensors at all is a WeightError naming it."""
    try:
        return safe_open(file, framework="numpy")
    except (SafetensorError, OSError) as e:
        raise WeightError(f"{file}: not a readable safetensors file ({e})") from None


def safetensors_files(directory: str) -> dict[str, str]:
    """Tensor name -> the safetensors file in `directory` that holds it (index or scan). Every
    file's header is read: a damaged file is named before any tensor is read."""
    index = os.path.join(directory, SAFETENSORS_INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                listed = json.load(f).get("weight_map")
        except (ValueError, AttributeError) as e:
            raise WeightError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        if not isinstance(listed, dict):
            raise WeightError(f"{index}: no 'weight_map' object")
        listed = {name: os.path.join(directory, file) for name, file in listed.items()}
        files = sorted(set(listed.values()))
        for file in files:
            if not os.path.isfile(file):
                raise WeightError(f"{index}: lists {os.path.basename(file)}, which is not in {directory}")
    else:
        listed = None
        files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        other = sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.bin")))
        hint = f" (found {other}: PyTorch .bin weights are not read; save with safe_serialization)" if other else ""
        raise WeightError(f"{directory}: no *.safetensors weights{hint}")
    held = {}
    for file in files:
        with open_safetensors(file) as f:
            held[file] = set(f.keys())
    if listed is None:
        return {name: file for file in files for name in held[file]}
    for name, file in listed.items():
        if name not in held[file]:
            raise WeightError(f"{index}: lists tensor {name!r} in {os.path.basename(file)}, which does not hold it")
    return listed


def dtype_of_hf_config(hf_config: dict) -> str | None:
    dtype = hf_config.get("dtype") or hf_config.get("torch_dtype")
    return dtype if dtype in TORCH_DTYPES else None


def convert_hf(
    source: str,
    output: str | os.PathLike,
    param_dtype: str | None = None,
) -> ModelConfig:
    """HF model (directory or hub id) -> latro-jax checkpoint at `output`. Returns its config.

    `param_dtype` defaults to the checkpoint's own dtype (config.json `dtype`/`torch_dtype`).
    """
    check_output(output)  # before any download or read, not after
    directory = resolve_source(source)
    config_path = os.path.join(directory, "config.json")
    config = ModelConfig.from_hf(config_path)
    with open(config_path) as f:
        stored_dtype = dtype_of_hf_config(json.load(f))
    config = config.replace(param_dtype=param_dtype or stored_dtype or "float32")

    located = safetensors_files(directory)
    check_names(config, set(located), directory)
    handles: dict[str, object] = {}
    progress = tqdm(total=len(weight_map(config)), desc="convert", unit="tensor", leave=False)

    def read(name: str) -> tuple[np.ndarray, str]:
        file = located[name]
        if file not in handles:
            handles[file] = open_safetensors(file).__enter__()
        progress.update()
        return handles[file].get_tensor(name), file

    side_files = {
        name: os.path.join(directory, name)
        for name in HF_SIDE_FILES
        if os.path.isfile(os.path.join(directory, name))
    }
    # In host memory, whatever the default device: a float32 8B model is 32 GB, more than one
    # TPU chip's memory, and nothing here needs an accelerator.
    with jax.default_device(jax.devices("cpu")[0]):
        try:
            params = params_from_tensors(config, abstract_params(config), read)
        finally:
            progress.close()
            for handle in handles.values():
                handle.__exit__(None, None, None)
        save_model(output, config, params, side_files)
    return config


def _generation_config(config: ModelConfig) -> dict:
    return {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos_for_hf(config.eos_token_ids),
        "pad_token_id": config.pad_token_id,
    }


SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # huggingface_hub's max_shard_size units


def shard_size(size: int | str, name: str = "max_shard_size") -> int:
    """A largest shard in bytes: an int, or a size such as 5GB or 500MB; `name` is the setting's,
    for the error."""
    if isinstance(size, int):
        num_bytes = size
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]{2})\s*", size)
        unit = match and SIZE_UNITS.get(match.group(2).upper())
        num_bytes = int(float(match.group(1)) * unit) if unit else 0
    if num_bytes < 1:
        raise WeightError(f"{name} {size!r}: expected a size such as 5GB or 500MB (KB, MB, GB or TB)")
    return num_bytes


def export_hf(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
) -> None:
    """latro-jax checkpoint -> HF directory at `output`.

    `dtype` defaults to the source HF checkpoint's dtype when known, else the params' dtype.
    Shards hold at most `max_shard_size` bytes each (huggingface_hub's splitting rule). A bad
    output path or size is an error before the checkpoint is read.
    """
    check_output(output)
    shard_size(max_shard_size)
    config, params = load_model(checkpoint)
    export_params(config, params, os.path.join(os.fspath(checkpoint), HF_DIR), output, dtype, max_shard_size)


def export_params(
    config: ModelConfig,
    params,
    side: str | os.PathLike,
    output: str | os.PathLike,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
) -> None:
    """Params of `config` -> HF directory at `output`, with the HF side files (config.json,
    tokenizer files, generation config) of the directory `side` where it has them; as `export_hf`."""
    from huggingface_hub import split_state_dict_into_shards_factory

    side = os.fspath(side)
    hf_config_path = os.path.join(side, "config.json")
    if os.path.isfile(hf_config_path):
        with open(hf_config_path) as f:
            hf_config = json.load(f)
    else:
        hf_config = config.to_hf()
    dtype = dtype or dtype_of_hf_config(hf_config) or config.param_dtype
    np_dtype = np.dtype(TORCH_DTYPES[dtype])
    rewrite_config = dtype_of_hf_config(hf_config) != dtype or not os.path.isfile(hf_config_path)
    if rewrite_config:
        hf_config["dtype"] = dtype
        hf_config.pop("torch_dtype", None)

    shapes = {name: hf_shape(pieces) for name, pieces in weight_map(config).items()}
    split = split_state_dict_into_shards_factory(
        shapes,
        get_storage_size=lambda shape: int(np.prod(shape)) * np_dtype.itemsize,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=shard_size(max_shard_size),
    )
    flat = flat_params(params)
    with atomic_directory(output) as tmp:
        for file, names in tqdm(split.filename_to_tensors.items(), desc="export", unit="shard", leave=False):
            tensors = {name: hf_tensor(config, flat, name, np_dtype) for name in names}
            save_file(tensors, os.path.join(tmp, file), metadata={"format": "pt"})
            write_permissions(os.path.join(tmp, file))  # safetensors writes 0600: others' servers read it too
            del tensors
        if split.is_sharded:
            index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
            with open(os.path.join(tmp, SAFETENSORS_INDEX), "w") as f:
                json.dump(index, f, indent=2)
        for name in HF_SIDE_FILES:
            if os.path.isfile(os.path.join(side, name)) and not (name == "config.json" and rewrite_config):
                shutil.copyfile(os.path.join(side, name), os.path.join(tmp, name))
        if rewrite_config:
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(hf_config, f, indent=2)
        if not os.path.isfile(os.path.join(tmp, "generation_config.json")):
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump(_generation_config(config), f, indent=2)
