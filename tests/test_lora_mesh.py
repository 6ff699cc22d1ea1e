"""LoRA on a mesh: a LoRA training run (`train.run`, model.lora_rank > 0) on meshes of 8 devices
(fsdp=8, tensor=8) gives the adapters and losses of the same run on one device, with the frozen
base sharded as the mesh shards params and the adapters (and their AdamW moments) replicated on
every device.

The run is the SFT baseline on the synthetic arithmetic task from a small random Llama-family
base (made here, with the demo's word-level tokenizer), two updates, captured at the update:
the adapters and optimizer state it is given and returns, the frozen base it reads, its loss.
The runs are in a subprocess (this file run as a script) with 8 simulated CPU devices: XLA
reads the device count once per process (see tests/test_sharding.py). The one-device run is
the same run on the first of them (`make_mesh` given that device).

The adapters' shapes all split 8 ways (rank 8, widths multiples of 8), so adapters sharded like
the base would run and give the same numbers: the sharding assertions are what catch that.

Tolerances: 1e-5 absolute on the adapters, float32: meshes only reorder sums (measured: under
1e-6). AdamW (lr 1e-3) moves B by ~1e-3 in the first update and A by up to ~5e-4 in the second
(A's first gradient is 0, B being 0), so a wrong gradient shows far above 1e-5. The loss, a sum
of token log-probs per row (~115), within 1e-6 relative (measured: under 1e-7).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from unittest import mock

import jax
import numpy as np

from conftest import run_on_devices
from test_sharding import _spec

MESHES = ((1, 8, 1), (1, 1, 8))
UPDATES = 2
TOLERANCE = 1e-5
LOSS_RTOL = 1e-6
# The frozen base's PartitionSpecs on each mesh (axes of one device left out): fsdp splits embed,
# tensor the heads and the MLP; 4 kv heads do not divide tensor=8 and the vocabulary (97) divides
# nothing (replicated there).
BASE_SPECS = {
    "1,8,1": {"embed": [None, "fsdp"], "q_proj": ["fsdp", None, None], "k_proj": ["fsdp", None, None],
              "down_proj": [None, "fsdp"]},
    "1,1,8": {"embed": [None, None], "q_proj": [None, "tensor", None], "k_proj": [None, None, None],
              "down_proj": ["tensor", None]},
}


def make_base(directory: str, mesh) -> str:
    """A random 2-layer base model (8 heads of 8, 4 kv heads, MLP 64) with the arithmetic task's
    tokenizer, saved as a model checkpoint; initialised on `mesh` (one jitted init)."""
    from latro_jax.checkpoint import save_model
    from latro_jax.config import ModelConfig
    from latro_jax.data.synthetic import build_tokenizer
    from latro_jax.model import init_params

    tokenizer_dir = os.path.join(directory, "tokenizer")
    tokenizer = build_tokenizer(tokenizer_dir)
    config = ModelConfig("llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=8, num_kv_heads=4, head_dim=8, max_position_embeddings=256,
                         eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id)
    checkpoint = os.path.join(directory, "base")
    save_model(checkpoint, config, init_params(config, seed=0, mesh=mesh),
               {name: os.path.join(tokenizer_dir, name) for name in os.listdir(tokenizer_dir)})
    return checkpoint


def experiment(checkpoint: str, output_dir: str, mesh: tuple[int, int, int]):
    from latro_jax.experiment import DataSpec, Experiment, ModelSpec, OptimSpec, TrainSpec, validate
    from latro_jax.sharding import MeshSpec

    return validate(Experiment(
        name="lora_" + "x".join(map(str, mesh)),
        model=ModelSpec(checkpoint=checkpoint, dtype="float32", lora_rank=8, lora_alpha=16.0),
        # 200 problems to draw from (the train split generates 50,000: seconds)
        data=DataSpec(task="arithmetic", train_split="validation", eval_split="test", eval_size=2),
        optim=OptimSpec(learning_rate=1e-3),
        # 8 rows: 4 micro-batches of 2 on one device, one of 8 on fsdp=8 (sharding.micro_batch_rows).
        train=TrainSpec(method="sft", questions_per_update=8, micro_batch=2, updates=UPDATES + 1, eval_every=100,
                        save_every=100, output_dir=output_dir),
        mesh=MeshSpec(*mesh),
    ))


class Captured(Exception):
    """Raised in place of the update after the ones recorded."""


def trained(exp) -> dict:
    """Run `exp` for UPDATES updates, recording at each: the loss, the adapters it returns
    (flattened, as lists), whether every adapter and AdamW leaf it is given and returns is
    replicated and on how many devices, and the frozen base's PartitionSpecs."""
    from latro_jax import train
    from latro_jax.sharding import to_host

    record = {"loss": [], "adapters": [], "replicated": [], "devices": set(), "base_specs": None}
    real_update_jit = train.update_jit

    def replicated(tree) -> bool:
        record["devices"].update(len(x.sharding.device_set) for x in jax.tree.leaves(tree))
        return all(x.sharding.is_fully_replicated for x in jax.tree.leaves(tree))

    def update_jit(params, opt_state):
        real = real_update_jit(params, opt_state)

        def update(*args):
            if len(record["loss"]) == UPDATES:
                raise Captured
            adapters, opt_state, base = args[6], args[7], args[9]
            given = replicated((adapters, opt_state))
            layers = base["layers"]
            record["base_specs"] = {
                "embed": _spec(base["embed"][...]), "q_proj": _spec(layers[0]["attn"]["q_proj"][...]),
                "k_proj": _spec(layers[0]["attn"]["k_proj"][...]),
                "down_proj": _spec(layers[1]["mlp"]["down_proj"][...]),
            }
            new_adapters, new_opt_state, metrics = real(*args)
            record["replicated"].append(given and replicated((new_adapters, new_opt_state)))
            record["loss"].append(float(metrics["loss"]))
            record["adapters"].append({jax.tree_util.keystr(path): np.asarray(x).tolist()
                                       for path, x in jax.tree_util.tree_leaves_with_path(to_host(new_adapters))})
            return new_adapters, new_opt_state, metrics

        return update

    with mock.patch.object(train, "update_jit", update_jit), contextlib.suppress(Captured):
        train.run(exp, progress=False)
    assert len(record["loss"]) == UPDATES, "the run stopped before its updates"
    record["devices"] = sorted(record["devices"])
    return record


def _report(directory: str) -> dict:
    return run_on_devices(__file__, 8, directory)


def test_lora_on_a_mesh_equals_one_device(tmp_path):
    report = _report(str(tmp_path))
    reference, meshes = report["one_device"], report["meshes"]
    assert sorted(meshes) == sorted(BASE_SPECS)
    assert reference["devices"] == [1]
    # The reference trained: B moved from 0 in the first update, A (whose first gradient is 0) in the second.
    first, second = reference["adapters"]
    b_first = max(np.abs(np.asarray(v)).max() for k, v in first.items() if k.endswith("['b']"))
    a_second = max(np.abs(np.asarray(second[k]) - np.asarray(first[k])).max() for k in first if k.endswith("['a']"))
    assert b_first > 1e-4 and a_second > 1e-4, (b_first, a_second)
    for mesh, r in meshes.items():
        assert r["base_specs"] == BASE_SPECS[mesh], mesh
        # Adapters and their AdamW moments, as given to each update and as it returns them: whole on all 8 devices.
        assert r["replicated"] == [True] * UPDATES and r["devices"] == [8], mesh
        np.testing.assert_allclose(r["loss"], reference["loss"], rtol=LOSS_RTOL, err_msg=mesh)
        for step, (got, want) in enumerate(zip(r["adapters"], reference["adapters"])):
            assert sorted(got) == sorted(want)
            for name in want:
                np.testing.assert_allclose(got[name], want[name], rtol=0, atol=TOLERANCE,
                                           err_msg=f"mesh {mesh}, update {step + 1}, {name}")


def _runs(directory: str) -> dict:
    """The one-device run (on the first device), then each mesh's."""
    from latro_jax import startup
    from latro_jax.sharding import MeshSpec, make_mesh

    jax.config.update("jax_default_matmul_precision", "highest")  # as in conftest.py
    # Compiling dominates (3 runs); every run is compiled alike, so XLA's optimisations add
    # nothing to the comparison (as in tests/test_sharding.py).
    jax.config.update("jax_disable_most_optimizations", True)
    assert jax.device_count() == 8, jax.devices()
    one_device = functools.partial(make_mesh, devices=jax.devices()[:1])
    checkpoint = make_base(directory, one_device(MeshSpec()))
    with mock.patch.object(startup, "make_mesh", one_device):  # the run's mesh is made at start-up
        reference = trained(experiment(checkpoint, directory, (1, 1, 1)))
    meshes = {",".join(map(str, mesh)): trained(experiment(checkpoint, directory, mesh)) for mesh in MESHES}
    return {"one_device": reference, "meshes": meshes}


if __name__ == "__main__":
    print(json.dumps(_runs(sys.argv[1])))
