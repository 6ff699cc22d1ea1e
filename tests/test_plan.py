"""tools/plan.py: the compiled programs' per-device bytes against hand counts of what they must
hold, less per device on a larger mesh, LoRA below full fine-tuning, and the paper models' presets
against their published parameter counts.

The plans run in a subprocess (this file run as a script) with 4 simulated CPU devices: a
process's device count is fixed when JAX starts.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_on_devices

TINY = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
# 4 questions x 2 samples = 8 rows of 16 prompt + 16 generated + 16 answer slots.
OVERRIDES = ["rollout.num_samples=2", "train.questions_per_update=4", "rollout.max_new_tokens=16",
             "train.micro_batch=4"]
ROWS, LENGTH, RANK = 8, 48, 4


def load_plan_module():
    spec = importlib.util.spec_from_file_location("plan_tool", os.path.join(ROOT, "tools", "plan.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hand_param_count(c: dict) -> int:
    d, v, i, layers = c["hidden_size"], c["vocab_size"], c["intermediate_size"], c["num_hidden_layers"]
    head_dim = d // c["num_attention_heads"]
    q = o = d * c["num_attention_heads"] * head_dim
    kv = 2 * d * c["num_key_value_heads"] * head_dim
    layer = q + kv + o + 3 * d * i + 2 * d  # attention, gate/up/down, two norms
    return 2 * v * d + layers * layer + d  # embedding, LM head, final norm


def hand_adapter_count(c: dict, rank: int) -> int:
    """A: [in..., rank] and B: [rank, out...] for q, k, v, o, gate, up, down in every layer."""
    d, i = c["hidden_size"], c["intermediate_size"]
    head_dim = d // c["num_attention_heads"]
    q = o = c["num_attention_heads"] * head_dim
    kv = c["num_key_value_heads"] * head_dim
    per_layer = rank * ((d + q) + 2 * (d + kv) + (o + d) + 2 * (d + i) + (i + d))
    return c["num_hidden_layers"] * per_layer


ROW_BYTES = ROWS * LENGTH * (4 + 1 + 1 + 1) + ROWS * 4  # tokens int32, three bool masks, advantages f32


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    return run_on_devices(__file__, 4, str(tmp_path_factory.mktemp("plan") / "config.json"), timeout=900)


def test_update_arguments_hold_params_optimizer_state_and_rows(plans):
    params = 4 * hand_param_count(TINY)  # float32 master params
    one = plans["full 1,1,1"]
    assert one["state_bytes_per_device"]["policy params"] == params
    expected = params + 2 * params + ROW_BYTES  # + AdamW's two moments
    arguments = one["phases"]["update"]["arguments"]
    assert expected <= arguments <= expected + 64  # + AdamW's step count
    # params and moments are donated: the new ones reuse their buffers
    assert one["phases"]["update"]["aliased"] >= 3 * params


def test_more_devices_hold_fewer_bytes_each(plans):
    one, four = plans["full 1,1,1"], plans["full 1,4,1"]
    # every weight has an `embed` axis, split over fsdp=4
    assert four["state_bytes_per_device"]["policy params"] * 4 == one["state_bytes_per_device"]["policy params"]
    for phase in ("sample", "score", "update"):
        assert four["phases"][phase]["arguments"] < one["phases"][phase]["arguments"]
        assert four["phases"][phase]["total"] < one["phases"][phase]["total"]
    assert four["peak"] < one["peak"]


def test_lora_trains_the_adapters_against_a_bf16_base(plans):
    lora = plans["lora 1,1,1"]
    adapters = 4 * hand_adapter_count(TINY, RANK)
    base = 2 * hand_param_count(TINY)  # bfloat16
    assert lora["state_bytes_per_device"]["policy params"] == adapters
    expected = 3 * adapters + base + ROW_BYTES  # adapters, their moments, the frozen base, the rows
    assert expected <= lora["phases"]["update"]["arguments"] <= expected + 64
    full = plans["full 1,1,1"]
    assert lora["phases"]["update"]["total"] < full["phases"]["update"]["total"]


def test_a_lora_override_plans_the_lora_update(plans):
    """model.lora_rank on the command line (not only --lora) plans LoRA: the trained params are the
    rank-16 adapters, replicated on the experiment's mesh (fsdp over the 4 devices), and the
    frozen base is sharded over them."""
    planned = plans["make plan lora"]
    assert planned["lora_rank"] == 16
    assert (planned["mesh"]["data"], planned["mesh"]["fsdp"], planned["mesh"]["tensor"]) == (1, 4, 1)
    assert planned["state_bytes_per_device"]["policy params"] == 4 * hand_adapter_count(TINY, 16)
    base = planned["state_bytes_per_device"]["frozen base (also pi_0)"]
    assert base < plans["lora 1,1,1"]["state_bytes_per_device"]["frozen base (also pi_0)"] / 2  # 1/4 but for norms


def test_rollouts_in_chunks_of_questions_hold_one_chunk_of_kv_cache(plans):
    """train.rollout_batch=2 of 4 questions: the sampler's KV cache (its output) and the scoring's
    arguments hold 2 x K rows instead of 4 x K; the update (all rows) is unchanged."""
    whole, chunked = plans["full 1,1,1"], plans["chunked 1,1,1"]
    # keys, values and slot positions scale with the rows; the cache's write index (int32) does not
    assert 2 * chunked["kv_cache_bytes_per_device"] - whole["kv_cache_bytes_per_device"] == 4
    assert chunked["phases"]["sample"]["outputs"] < whole["phases"]["sample"]["outputs"]
    assert chunked["phases"]["score"]["arguments"] < whole["phases"]["score"]["arguments"]
    assert chunked["phases"]["update"]["arguments"] == whole["phases"]["update"]["arguments"]


def test_fits_compares_the_peak_with_the_device_memory(plans):
    for plan in plans.values():
        assert plan["peak"] == max(p["total"] for p in plan["phases"].values())
        assert plan["fits"] == (plan["peak"] <= plan["device_memory"])
    assert not plans["full 1,1,1"]["fits"]  # the device memory is set below its peak
    assert plans["full 1,4,1"]["fits"]


@pytest.mark.parametrize("name, published", [
    ("meta-llama/Llama-3.1-8B-Instruct", 8_030_261_248),
    ("mistralai/Mistral-7B-Instruct-v0.3", 7_248_023_552),
    ("microsoft/Phi-3.5-mini-instruct", 3_821_079_552),
])
def test_presets_have_the_published_parameter_counts(name, published):
    from latro_jax.config import ModelConfig
    from latro_jax.model import abstract_params

    plan = load_plan_module()
    config = ModelConfig.from_hf(plan.MODEL_SHAPES[name])
    assert plan.count(abstract_params(config)) == published


def test_sizes_and_meshes_parse():
    plan = load_plan_module()
    assert plan.parse_bytes("80GB") == 80 * 10**9
    assert plan.parse_bytes("80GiB") == 80 * 2**30
    assert plan.parse_mesh("1,8,1") == (1, 8, 1)
    for bad in ("80 parsecs", "GB"):
        with pytest.raises(ValueError, match="expected a size"):
            plan.parse_bytes(bad)
    with pytest.raises(ValueError, match="data,fsdp,tensor"):
        plan.parse_mesh("8")


if __name__ == "__main__":
    from latro_jax.config import ModelConfig
    from latro_jax.experiment import load_experiment

    tool = load_plan_module()
    config = ModelConfig.from_hf(TINY)

    def experiment(*overrides, mesh=(1, 1, 1)):
        sizes = [f"mesh.{axis}={size}" for axis, size in zip(("data", "fsdp", "tensor"), mesh)]
        return load_experiment("gsm8k_llama", OVERRIDES + sizes + list(overrides))

    one = tool.plan(experiment(), config, 1_000_000, 16, 16)
    results = {
        "full 1,1,1": one,
        "full 1,4,1": tool.plan(experiment(mesh=(1, 4, 1)), config, one["peak"] - 1, 16, 16),
        "lora 1,1,1": tool.plan(experiment(f"model.lora_rank={RANK}"), config, 1_000_000, 16, 16),
        "chunked 1,1,1": tool.plan(experiment("train.rollout_batch=2"), config, 1_000_000, 16, 16),
    }
    # `make plan EXP=gsm8k_llama model.lora_rank=16`: the override, on the experiment's own mesh
    # (fsdp over the 4 devices), plans the LoRA update
    with open(sys.argv[1], "w") as f:
        json.dump(TINY, f)
    with contextlib.redirect_stdout(sys.stderr):
        results["make plan lora"] = tool.main(["gsm8k_llama", *OVERRIDES, "model.lora_rank=16", "--model-config",
                                               sys.argv[1]])
    print(json.dumps(results))


def test_a_bad_override_is_one_line_naming_the_field():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plan.py"), "gsm8k_llama", "train.micro_batch=0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "error: train.micro_batch=0 is invalid; must be >= 1 (at most this many rows per batch shard in each forward+backward)"
    ]
