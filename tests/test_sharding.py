"""Sharding: MeshSpec sizes and errors, logical-axis fallback, and the acceptance check that every
jitted function gives the single-device result on meshes of 8 devices.

The mesh checks run in a subprocess (this file run as a script) with 8 simulated CPU devices:
XLA reads the device count once, when jax first initialises its backend, so the pytest process
(and its xdist workers) cannot switch to 8 devices. The subprocess computes the single-device
reference once, then every mesh's results, and prints a JSON report that the test asserts on.

Tolerances: 1e-5 absolute (float32). Only the order of summations differs between meshes (a
tensor-sharded contraction adds partial sums across devices): ~1e-7 on logits and log-probs.
After one AdamW step (lr 1e-3) the params move by about lr * sign(grad), so a real disagreement
in the gradient shows up far above 1e-5.
"""

from __future__ import annotations

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_on_devices
from latro_jax.config import ModelConfig
from latro_jax.sharding import DistributedSpec, MeshSpec, initialize_distributed, logical_spec

MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8))
# 8 heads and mlp/vocab divisible by 8: tensor=8 splits them. 4 kv heads: split on tensor=2,
# replicated on tensor=8 (the fallback).
CONFIG = ModelConfig(
    "llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=8, num_kv_heads=4,
    head_dim=8,
)
# What each mesh's train step recomputes (the reference, on one device, keeps everything): under
# fsdp or tensor the layers run as a scan, otherwise unrolled; every mode meets the scan once.
MESH_REMAT = {(8, 1, 1): "projections", (2, 4, 1): "projections", (2, 2, 2): "full", (1, 1, 8): "none"}
TOLERANCE = 1e-5


# ---- MeshSpec and the logical rules (in process, no devices needed) ---------------------------


@pytest.mark.parametrize(
    "spec, devices, shape",
    [
        (MeshSpec(), 8, (1, 8, 1)),
        (MeshSpec(data=2), 8, (2, 4, 1)),
        (MeshSpec(data=2, tensor=2), 8, (2, 2, 2)),
        (MeshSpec(data=-1, fsdp=1, tensor=8), 8, (1, 1, 8)),
        (MeshSpec(data=-1, fsdp=1), 8, (8, 1, 1)),
        (MeshSpec(data=2, fsdp=2, tensor=2), 8, (2, 2, 2)),
        (MeshSpec(), 1, (1, 1, 1)),
    ],
)
def test_mesh_spec_resolves_the_rest(spec, devices, shape):
    assert spec.shape(devices) == shape


@pytest.mark.parametrize(
    "kwargs, devices, message",
    [
        (dict(tensor=3), 8, r"MeshSpec.fsdp=-1 .* data=1 x tensor=3 = 3 does not divide the 8 devices"),
        (dict(data=2, fsdp=2, tensor=1), 8, r"MeshSpec\(data=2, fsdp=2, tensor=1\) uses 4 devices but there are 8"),
        (dict(data=0), 8, r"MeshSpec.data=0 must be a positive device count or -1"),
        (dict(data=-1, fsdp=-1), 8, r"only one axis may be -1 .* data, fsdp"),
    ],
)
def test_mesh_spec_errors_name_the_field(kwargs, devices, message):
    with pytest.raises(ValueError, match=message):
        MeshSpec(**kwargs).shape(devices)


def test_distributed_settings_name_what_is_missing(monkeypatch):
    """Nothing set: one process (nothing initialised); a partial setting names the missing fields
    (and the environment variables that can give them) before touching jax.distributed."""
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert initialize_distributed(DistributedSpec()) is False
    with pytest.raises(ValueError, match="distributed.coordinator_address, distributed.num_processes not set"):
        initialize_distributed(DistributedSpec(process_id=0))
    with pytest.raises(ValueError, match="distributed.num_processes, distributed.process_id not set.*JAX_NUM_PROCESSES"):
        initialize_distributed(DistributedSpec(coordinator_address="localhost:1234"))
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(ValueError, match=r"distributed.process_id=2 must be in \[0, num_processes=2\)"):
        initialize_distributed(DistributedSpec(coordinator_address="localhost:1234"))
    assert not jax.distributed.is_initialized()


def test_logical_spec_keeps_the_longest_dividing_prefix():
    mesh = jax.sharding.AbstractMesh((2, 4, 2), ("data", "fsdp", "tensor"))
    P = jax.sharding.PartitionSpec
    assert logical_spec(("batch", None), (16, 3), mesh) == P(("data", "fsdp"), None)
    assert logical_spec(("batch", None), (6, 3), mesh) == P("data", None)  # 6 rows: data only
    assert logical_spec(("batch", None), (3, 3), mesh) == P(None, None)
    assert logical_spec(("embed", "heads", "head_dim"), (32, 8, 4), mesh) == P("fsdp", "tensor", None)
    assert logical_spec(("embed", "kv_heads", "head_dim"), (32, 1, 4), mesh) == P("fsdp", None, None)
    # Axes of one device are left out: the spec says what is really split.
    fsdp_only = jax.sharding.AbstractMesh((1, 8, 1), ("data", "fsdp", "tensor"))
    assert logical_spec(("batch", "embed"), (16, 32), fsdp_only) == P("fsdp", None)
    assert logical_spec(("embed", "heads"), (32, 8), fsdp_only) == P("fsdp", None)
    # A mesh without some axes (someone else's mesh) shards over the axes it has.
    data_only = jax.sharding.AbstractMesh((4,), ("data",))
    assert logical_spec(("batch", "vocab"), (8, 128), data_only) == P("data", None)


# ---- the mesh parity check (subprocess) --------------------------------------------------------


def _mesh_report() -> dict:
    return run_on_devices(__file__, 8, timeout=900)


# PartitionSpecs (one entry per dimension; mesh axes of size 1 are left out) that params, batches
# and the sampler's cache must have on each mesh. 4 prompts do not divide data=8 (replicated) but
# divide data=2; 4 kv heads do not divide tensor=8 (replicated).
EXPECTED_SPECS = {
    "8,1,1": {
        "embed": [None, None], "q_proj": [None, None, None], "k_proj": [None, None, None], "down_proj": [None, None],
        "rows": ["data", None], "prompts": [None, None], "cache_k": ["data", None, None, None],
    },
    "2,4,1": {
        "embed": [None, "fsdp"], "q_proj": ["fsdp", None, None], "k_proj": ["fsdp", None, None],
        "down_proj": [None, "fsdp"], "rows": [["data", "fsdp"], None], "prompts": ["data", None],
        "cache_k": [["data", "fsdp"], None, None, None],
    },
    "2,2,2": {
        "embed": ["tensor", "fsdp"], "q_proj": ["fsdp", "tensor", None], "k_proj": ["fsdp", "tensor", None],
        "down_proj": ["tensor", "fsdp"], "rows": [["data", "fsdp"], None], "prompts": [["data", "fsdp"], None],
        "cache_k": [["data", "fsdp"], "tensor", None, None],
    },
    "1,1,8": {
        "embed": ["tensor", None], "q_proj": [None, "tensor", None], "k_proj": [None, None, None],
        "down_proj": ["tensor", None], "rows": [None, None], "prompts": [None, None],
        "cache_k": [None, None, None, None],
    },
}


def test_meshes_give_the_single_device_results():
    """One test (one subprocess, whatever xdist does): results, shardings, sharded init and restore."""
    report = _mesh_report()
    assert sorted(report["meshes"]) == sorted(EXPECTED_SPECS)
    for mesh, r in report["meshes"].items():
        assert r["logits"] < TOLERANCE, (mesh, r)
        assert r["greedy_tokens_equal"], (mesh, r)
        assert r["greedy_logprobs"] < TOLERANCE, (mesh, r)
        assert r["token_logprobs"] < TOLERANCE, (mesh, r)
        assert r["params_after_update"] < TOLERANCE, (mesh, r)
        assert r["opt_state_after_update"] < TOLERANCE, (mesh, r)
        assert r["update_metrics"] < TOLERANCE, (mesh, r)
        # Specs of arrays as the jitted functions return them, not only as placed: the parity
        # above cannot pass by replicating everything.
        assert r["specs"] == EXPECTED_SPECS[mesh], mesh
        # Outputs keep their input shardings: the next step needs no resharding or recompile.
        assert r["update_keeps_shardings"], mesh
        assert r["update_returns_its_input_shardings"], mesh
        assert r["cache_matches_cache_shardings"], mesh
    # The reference did something: greedy rows are not constant and the step moved the params.
    assert report["reference"]["distinct_greedy_tokens"] > 4
    assert report["reference"]["param_change"] > 1e-4
    # The pieces each device holds: tensor=8 splits the heads 8 ways, fsdp=4 the embed dim.
    assert report["meshes"]["1,1,8"]["q_proj_shard_shape"] == [CONFIG.hidden_size, 1, CONFIG.head_dim]
    assert report["meshes"]["2,4,1"]["down_proj_shard_shape"] == [CONFIG.intermediate_size, CONFIG.hidden_size // 4]
    # Params created in their shards and restored from a checkpoint into them: the same values.
    for key in ("init_in_shards", "restore_in_shards"):
        assert report[key] == {"max_diff": 0.0, "shardings_match": True}, key
    assert report["restore_onto_device"] == {"max_diff": 0.0, "devices": [5]}


# ---- the subprocess --------------------------------------------------------------------------


def _spec(array) -> list:
    """The array's PartitionSpec as JSON, one entry per dimension."""
    spec = list(array.sharding.spec) + [None] * (array.ndim - len(array.sharding.spec))
    return [list(a) if isinstance(a, tuple) else a for a in spec]


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _same_shardings(arrays, shardings, exact: bool = False) -> bool:
    """Each array's sharding equivalent to its entry of `shardings` (exact: equal, spelled alike)."""
    def same(a, s):
        return a.sharding == s if exact else a.sharding.is_equivalent_to(s, a.ndim)

    return all(jax.tree.leaves(jax.tree.map(same, arrays, shardings)))


def _mesh_checks() -> dict:
    """Every jitted function on one device, then on each mesh; see the module docstring."""
    from latro_jax import sharding
    from latro_jax.checkpoint import restore_params, save_params
    from latro_jax.experiment import OptimSpec
    from latro_jax.model import abstract_params, forward, init_params, positions_from_mask
    from latro_jax.objective import ObjectiveConfig
    from latro_jax.sampling import SamplingConfig, sample_padded
    from latro_jax.scoring import token_logprobs
    from latro_jax.update import latro_rows_loss, make_optimizer, update

    jax.config.update("jax_default_matmul_precision", "highest")  # as in conftest.py
    # Compiling dominates this check (5 configurations x 4 programs). Every configuration is
    # compiled alike, so XLA's optimisations add nothing to the comparison but double its time.
    jax.config.update("jax_disable_most_optimizations", True)
    assert jax.device_count() == 8, jax.devices()
    forward_jit = jax.jit(forward, static_argnums=0)
    logprobs_jit = jax.jit(token_logprobs, static_argnums=0, static_argnames=("chunk_size", "score_from"))
    rng = np.random.default_rng(0)

    # A batch of 8 rows (12 real tokens, left padding of 0..3) and 4 prompts x 2 greedy samples.
    mask = np.arange(16)[None] >= np.arange(8)[:, None] % 4
    tokens = np.where(mask, rng.integers(1, CONFIG.vocab_size, (8, 16)), 0).astype(np.int32)
    batch = {"tokens": tokens, "attention_mask": mask, "positions": np.asarray(positions_from_mask(mask))}
    prompt_mask = mask[:4]
    prompts = {"prompt_tokens": tokens[:4], "prompt_mask": prompt_mask}
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0, num_samples=2)
    rows = dict(
        tokens=tokens, attention_mask=mask, rationale_mask=mask & (np.arange(16) >= 6),
        answer_mask=mask & (np.arange(16) >= 12), advantages=rng.normal(size=8).astype(np.float32),
    )
    objective = ObjectiveConfig(beta=0.05, sft_coef=1.0)
    # Adam's first step is lr * g / (|g| + eps): at the default eps (1e-8) a gradient entry near
    # 1e-8 turns its float32 rounding (which differs between meshes) into a 1e-5 change of the
    # param. eps 1e-4 keeps the step well-conditioned; params still move by ~lr.
    optimizer = make_optimizer(
        OptimSpec(learning_rate=1e-3, eps=1e-4, weight_decay=0.01, clip_norm=1.0), updates=10
    )

    def run(params, opt_state, batch, prompts, rows, remat="none"):
        logits, _ = forward_jit(CONFIG, params, batch["tokens"], batch["positions"], batch["attention_mask"])
        sampled = sample_padded(CONFIG, greedy, 8, params, prompts["prompt_tokens"], prompts["prompt_mask"],
                                jax.random.key(0), jnp.int32(8))
        scores = logprobs_jit(CONFIG, params, batch["tokens"], batch["attention_mask"], chunk_size=4, score_from=6)
        copy = jax.tree.map(jnp.copy, (params, opt_state))  # update donates them
        new_params, new_opt_state, metrics = update(CONFIG.replace(remat=remat), objective, optimizer, 4,
                                                    latro_rows_loss, 6, *copy, rows)
        return logits, sampled, scores, new_params, new_opt_state, metrics

    # The reference params come from the same jitted init as the sharded ones, on a 1-device mesh.
    params = init_params(CONFIG, seed=0, mesh=sharding.make_mesh(MeshSpec(), devices=jax.devices()[:1]))
    ref = run(params, optimizer.init(params), batch, prompts, rows)
    ref_logits, ref_sampled, ref_scores, ref_params, ref_opt_state, ref_metrics = ref
    out = {
        "reference": {
            "distinct_greedy_tokens": len(np.unique(np.asarray(ref_sampled.tokens))),
            "param_change": _max_diff(ref_params, params),
        },
        "meshes": {},
    }
    abstract = abstract_params(CONFIG)
    for shape in MESHES:
        mesh = sharding.make_mesh(MeshSpec(*shape))
        param_shardings = sharding.param_shardings(mesh, abstract)
        opt_shardings = sharding.opt_state_shardings(
            mesh, optimizer, jax.eval_shape(optimizer.init, abstract), param_shardings
        )
        sharded_params = jax.device_put(params, param_shardings)
        opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(sharded_params)
        placed = [jax.device_put(x, sharding.batch_shardings(mesh, x)) for x in (batch, prompts, rows)]
        with jax.set_mesh(mesh):
            logits, sampled, scores, new_params, new_opt_state, metrics = run(sharded_params, opt_state, *placed,
                                                                              remat=MESH_REMAT[shape])
        cache_shardings = sharding.cache_shardings(mesh, sampled.cache)
        q_proj = new_params["layers"][0]["attn"]["q_proj"][...]
        down_proj = new_params["layers"][CONFIG.num_layers - 1]["mlp"]["down_proj"][...]
        out["meshes"][",".join(map(str, shape))] = {
            "logits": _max_diff(logits, ref_logits),
            "greedy_tokens_equal": bool(np.array_equal(sampled.tokens, ref_sampled.tokens))
            and bool(np.array_equal(sampled.lengths, ref_sampled.lengths)),
            "greedy_logprobs": _max_diff(sampled.logprobs, ref_sampled.logprobs),
            "token_logprobs": _max_diff(scores, ref_scores),
            "params_after_update": _max_diff(new_params, ref_params),
            "opt_state_after_update": _max_diff(new_opt_state, ref_opt_state),
            "update_metrics": _max_diff(metrics, ref_metrics),
            "update_keeps_shardings": _same_shardings(new_params, param_shardings)
            and _same_shardings(new_opt_state, opt_shardings),
            # Not only equivalent: the very shardings placed (update's explicit out_shardings).
            "update_returns_its_input_shardings": _same_shardings(
                (new_params, new_opt_state), jax.tree.map(lambda x: x.sharding, (sharded_params, opt_state)), exact=True
            ),
            "cache_matches_cache_shardings": _same_shardings(sampled.cache, cache_shardings),
            "specs": {
                "embed": _spec(new_params["embed"][...]),
                "q_proj": _spec(q_proj),
                "k_proj": _spec(new_params["layers"][0]["attn"]["k_proj"][...]),
                "down_proj": _spec(down_proj),
                "rows": _spec(placed[0]["tokens"]),
                "prompts": _spec(placed[1]["prompt_tokens"]),
                "cache_k": _spec(sampled.cache.k[0]),
            },
            "q_proj_shard_shape": list(q_proj.addressable_shards[0].data.shape),
            "down_proj_shard_shape": list(down_proj.addressable_shards[0].data.shape),
        }

    mesh = sharding.make_mesh(MeshSpec(data=2, tensor=2))
    param_shardings = sharding.param_shardings(mesh, abstract)
    created = init_params(CONFIG, seed=0, mesh=mesh)
    out["init_in_shards"] = {
        "max_diff": _max_diff(created, params), "shardings_match": _same_shardings(created, param_shardings),
    }
    with tempfile.TemporaryDirectory() as tmp:
        save_params(os.path.join(tmp, "params"), params)
        restored = restore_params(os.path.join(tmp, "params"), CONFIG, param_shardings)
        # Onto one chosen device (make export reads a run's step onto the CPU, whatever the default).
        on_device = restore_params(os.path.join(tmp, "params"), CONFIG, device=jax.devices()[5])
    out["restore_in_shards"] = {
        "max_diff": _max_diff(restored, params), "shardings_match": _same_shardings(restored, param_shardings),
    }
    out["restore_onto_device"] = {
        "max_diff": _max_diff(on_device, params),
        "devices": sorted({d.id for x in jax.tree.leaves(on_device) for d in x.devices()}),
    }
    return out


if __name__ == "__main__":
    print(json.dumps(_mesh_checks()))
