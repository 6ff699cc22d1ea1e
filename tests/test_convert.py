"""HF -> latro-jax -> HF round trips, and clear errors (with no partial output) on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM

from hf_models import FAMILIES, make_hf_model, mixed_batch
from latro_jax.checkpoint import load_model
from latro_jax.config import ConfigError
from latro_jax.convert.hf import SAFETENSORS_INDEX, convert_hf, export_hf
from latro_jax.convert.weights import WeightError

REPO = os.path.join(os.path.dirname(__file__), "..")


def read_tensors(directory) -> dict[str, np.ndarray]:
    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), framework="numpy") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), f"{name} differs"


def logits_of(model):
    ids, mask, positions = mixed_batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions.masked_fill(mask == 0, 1)).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_is_bit_exact(family, tmp_path):
    model = make_hf_model(family)
    model.save_pretrained(tmp_path / "hf")
    convert_hf(str(tmp_path / "hf"), tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "out")

    assert_same_tensors(read_tensors(tmp_path / "hf"), read_tensors(tmp_path / "out"))
    for name in ("config.json", "generation_config.json"):
        with open(tmp_path / "hf" / name) as f, open(tmp_path / "out" / name) as g:
            assert json.load(f) == json.load(g), name
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert torch.equal(logits_of(reloaded), logits_of(model))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_without_source_config_loads_in_transformers(family, tmp_path):
    """A checkpoint with no HF config beside it (trained from scratch, or from llama2.c) exports
    a config.json generated from ModelConfig that transformers reads as the same model."""
    model = make_hf_model(family)
    model.save_pretrained(tmp_path / "hf")
    convert_hf(str(tmp_path / "hf"), tmp_path / "ckpt")
    for name in ("config.json", "generation_config.json"):
        os.remove(tmp_path / "ckpt" / "hf" / name)
    export_hf(tmp_path / "ckpt", tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(reloaded) is type(model)
    torch.testing.assert_close(logits_of(reloaded), logits_of(model), atol=0, rtol=0)


def test_bf16_round_trip_through_f32_params_and_sharded_export(tmp_path):
    model = make_hf_model("llama", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    config = convert_hf(str(tmp_path / "hf"), tmp_path / "ckpt", param_dtype="float32")
    assert config.param_dtype == "float32"
    _, params = load_model(tmp_path / "ckpt")
    assert params["embed"][...].dtype == np.float32
    export_hf(tmp_path / "ckpt", tmp_path / "out", max_shard_size="60KB")  # bf16 back: the source's dtype

    shards = [n for n in os.listdir(tmp_path / "out") if n.endswith(".safetensors")]
    assert len(shards) > 1 and os.path.isfile(tmp_path / "out" / SAFETENSORS_INDEX)
    assert_same_tensors(read_tensors(tmp_path / "hf"), read_tensors(tmp_path / "out"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert torch.equal(logits_of(reloaded), logits_of(model))


def test_convert_reads_sharded_input(tmp_path):
    model = make_hf_model("mistral")
    model.save_pretrained(tmp_path / "hf", max_shard_size="50KB")
    assert os.path.isfile(tmp_path / "hf" / SAFETENSORS_INDEX)
    convert_hf(str(tmp_path / "hf"), tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "out")
    assert_same_tensors(read_tensors(tmp_path / "hf"), read_tensors(tmp_path / "out"))


def test_a_hub_id_downloads_the_shards_its_index_lists(tmp_path, monkeypatch):
    """A hub id (no internet here: huggingface_hub's two calls are stood in for) fetches the index
    first, then only the safetensors files it lists and the side files: not a second copy of the
    weights such as Mistral's consolidated.safetensors. Without an index, every safetensors file."""
    import huggingface_hub
    from huggingface_hub.errors import RemoteEntryNotFoundError

    model = make_hf_model("mistral")
    model.save_pretrained(tmp_path / "hub", max_shard_size="50KB")
    shards = sorted(n for n in os.listdir(tmp_path / "hub") if n.endswith(".safetensors"))
    asked = {}

    def snapshot_download(repo_id, allow_patterns):
        asked[repo_id] = allow_patterns
        return str(tmp_path / "hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename: str(tmp_path / "hub" / filename))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    convert_hf("mistralai/Mistral-7B-Instruct-v0.3", tmp_path / "ckpt")
    patterns = asked["mistralai/Mistral-7B-Instruct-v0.3"]
    assert len(shards) > 1 and patterns[: len(shards)] == shards and "*.safetensors" not in patterns
    assert SAFETENSORS_INDEX in patterns and "config.json" in patterns and "tokenizer.json" in patterns
    assert_same_tensors(read_tensors(tmp_path / "hub"), read_tensors_of_checkpoint(tmp_path))

    class Response:  # what huggingface_hub's HTTP errors read
        headers, request = {}, None

    def no_index(repo_id, filename):
        raise RemoteEntryNotFoundError(f"404: {filename} not found", response=Response())

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_index)
    convert_hf("someone/one-file-model", tmp_path / "ckpt2")
    assert asked["someone/one-file-model"][0] == "*.safetensors"


def read_tensors_of_checkpoint(tmp_path):
    export_hf(tmp_path / "ckpt", tmp_path / "exported")
    return read_tensors(tmp_path / "exported")


# ---- bad input: one clear error each, and no partial checkpoint --------------------------------


@pytest.fixture
def hf_dir(tmp_path):
    path = tmp_path / "hf"
    make_hf_model("llama").save_pretrained(path)
    return path


def only_weights_file(directory):
    (name,) = [n for n in os.listdir(directory) if n.endswith(".safetensors")]
    return directory / name


def assert_nothing_written(parent):
    assert not os.path.exists(parent / "ckpt")
    assert not [n for n in os.listdir(parent) if "partial" in n]


def test_directory_without_weights(hf_dir, tmp_path):
    os.remove(only_weights_file(hf_dir))
    with pytest.raises(WeightError, match=rf"{hf_dir}: no \*\.safetensors"):
        convert_hf(str(hf_dir), tmp_path / "ckpt")
    assert_nothing_written(tmp_path)


def test_unsupported_architecture(hf_dir, tmp_path):
    config = json.loads((hf_dir / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config\.json: model_type='gpt_neox' is not supported"):
        convert_hf(str(hf_dir), tmp_path / "ckpt")
    assert_nothing_written(tmp_path)


def test_missing_tensor(hf_dir, tmp_path):
    weights = only_weights_file(hf_dir)
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(WeightError, match=r"tensor 'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
        convert_hf(str(hf_dir), tmp_path / "ckpt")
    assert_nothing_written(tmp_path)


def test_tensor_of_wrong_shape(hf_dir, tmp_path):
    weights = only_weights_file(hf_dir)
    tensors = load_file(weights)
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 64), np.float32)
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(WeightError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' "
                                          r"has shape \(8, 64\), expected \(32, 64\)"):
        convert_hf(str(hf_dir), tmp_path / "ckpt")
    assert_nothing_written(tmp_path)


def test_unexpected_tensor(hf_dir, tmp_path):
    weights = only_weights_file(hf_dir)
    tensors = load_file(weights)
    tensors["model.layers.0.mlp.up_proj.bias"] = np.zeros((96,), np.float32)
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(WeightError, match=r"up_proj\.bias.*no place"):
        convert_hf(str(hf_dir), tmp_path / "ckpt")
    assert_nothing_written(tmp_path)


def test_a_missing_directory_or_model_is_named(tmp_path, monkeypatch):
    """A path that is no directory and no hub id is named as such (not huggingface_hub's
    validation traceback); a hub id the hub does not give names the id and the hub's answer."""
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    for path in (f"{tmp_path}/nowhere", "./my-model", "runs/x/base_model"):
        with pytest.raises(WeightError, match=rf"^{path}: no such directory \(nor a Hugging Face hub id\)$"):
            convert_hf(path, tmp_path / "ckpt")

    class Response:
        headers, request = {}, None

    def not_found(repo_id, filename):
        raise RepositoryNotFoundError(f"404 Client Error. Repository Not Found for url: {repo_id}\nmore", response=Response())

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_found)
    with pytest.raises(WeightError, match=r"^my-model: no such directory, and the Hugging Face hub did not give this "
                                          r"model \(RepositoryNotFoundError: 404 Client Error.*my-model\); gated"):
        convert_hf("my-model", tmp_path / "ckpt")
    assert_nothing_written(tmp_path)


def test_outputs_are_readable_by_others_and_never_overwritten(hf_dir, tmp_path):
    """A checkpoint or export directory gets the permissions os.makedirs gives (the umask's at
    the time, 027 here: 0750), not the temporary directory's private 0700: a server running as
    another user (of the group, here) reads it. An existing output stops the conversion before
    any weight is read (or downloaded)."""
    import stat

    from latro_jax.checkpoint import current_umask

    umask = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        convert_hf(str(hf_dir), tmp_path / "ckpt")
        export_hf(tmp_path / "ckpt", tmp_path / "out")
    finally:
        os.umask(umask)
    assert current_umask() == umask
    for made in ("ckpt", "out"):
        assert stat.S_IMODE(os.stat(tmp_path / made).st_mode) == 0o750
    with pytest.raises(FileExistsError, match="ckpt already exists"):
        convert_hf(str(tmp_path / "not" / "a" / "model"), tmp_path / "ckpt")
    # What a killed conversion left is removed by the next one to that path, and only that.
    for left in (".ckpt2.partial-x1y2", ".ckpt22.partial-z"):
        os.makedirs(tmp_path / left / "params")
    convert_hf(str(hf_dir), tmp_path / "ckpt2")
    assert sorted(n for n in os.listdir(tmp_path) if "partial" in n) == [".ckpt22.partial-z"]


def test_a_damaged_checkpoint_config_names_the_file(hf_dir, tmp_path):
    """A model_config.json cut short, or with a field this version does not know, stops with one
    line naming the file (and the field)."""
    convert_hf(str(hf_dir), tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model_config.json"
    fields = json.loads(path.read_text())
    path.write_text(json.dumps({**fields, "attention_sinks": 4}))
    with pytest.raises(ConfigError, match=rf"^{path}: TypeError: .*'attention_sinks'"):
        load_model(tmp_path / "ckpt")
    path.write_text(json.dumps(fields)[:40])
    with pytest.raises(ConfigError, match=rf"^{path}: JSONDecodeError: "):
        load_model(tmp_path / "ckpt")


def test_cli_reports_error_without_traceback(hf_dir, tmp_path):
    os.remove(only_weights_file(hf_dir))
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "convert_hf.py"), str(hf_dir), str(tmp_path / "ckpt")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "no *.safetensors" in result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_written(tmp_path)
