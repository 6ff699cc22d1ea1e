"""What the CPU tests pin, checked on the accelerator's compiler (tools/gpu_bench.sh runs this):

1. the sampler's decode loops cast no weight to the compute dtype and gather none
   (`latro_jax.hlo`, as tests/test_decode.py on the CPU), bf16 compute over float32 params;
2. attention="cudnn" (jax.nn.dot_product_attention's cuDNN kernel) against "xla": logits of a
   bf16 forward with left padding, grouped heads and a sliding window, and their gradients.

Prints one JSON line; exits 1 if a check fails.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp

from latro_jax import hlo
from latro_jax.config import ModelConfig
from latro_jax.model import forward, init_params, positions_from_mask
from latro_jax.sampling import SamplingConfig

CONFIG = ModelConfig("mistral", vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8,
                     num_kv_heads=2, head_dim=32, dtype="bfloat16", sliding_windows=(16, None))


def decode_loop_report() -> dict:
    params = init_params(CONFIG)
    prompts = jnp.ones((4, 16), jnp.int32)
    sampling = SamplingConfig(max_new_tokens=64, num_samples=2, length_buckets=(64,), cache_room=8)
    text = hlo.decode_program(CONFIG, sampling, params, prompts, prompts > 0)
    sizes = hlo.weight_sizes(params)
    return {"weight_work_in_loops": [op._asdict() for op in hlo.weight_work_in_loops(text, sizes, "bf16")],
            "weight_work_in_program": len(hlo.weight_work_in_program(text, sizes, "bf16"))}


def cudnn_report() -> dict:
    params = init_params(CONFIG.replace(param_dtype="bfloat16"), seed=1)
    mask = jnp.arange(128)[None] >= jnp.array([0, 5, 17, 40])[:, None]
    tokens = jnp.where(mask, jax.random.randint(jax.random.key(2), (4, 128), 1, 1024), 0)
    positions = positions_from_mask(mask)

    def loss(params, config):
        logits, _ = forward(config, params, tokens, positions, mask)
        return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(logits), 0.0)), logits

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, xla), xla_grads = grad(params, CONFIG)
    (_, cudnn), cudnn_grads = grad(params, CONFIG.replace(attention="cudnn"))
    grad_diff = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                    for a, b in zip(jax.tree.leaves(xla_grads), jax.tree.leaves(cudnn_grads)))
    return {"logits_max_abs_diff": float(jnp.max(jnp.abs(jnp.where(mask[..., None], xla - cudnn, 0.0)))),
            "grads_max_abs_diff": grad_diff}


def main() -> None:
    report = {"devices": str(jax.devices()), "decode_loop": decode_loop_report()}
    ok = report["decode_loop"]["weight_work_in_loops"] == []
    if jax.default_backend() == "gpu":
        try:
            report["cudnn"] = cudnn_report()
            # bf16 logits of a 2-layer model: the kernels round differently; a layout or mask bug is O(1).
            ok &= report["cudnn"]["logits_max_abs_diff"] < 0.1
        except Exception as e:  # noqa: BLE001 - the report names what cuDNN refused
            report["cudnn"] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            ok = False
    print(json.dumps(report))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
