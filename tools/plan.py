"""Per-device memory of an experiment's compiled programs on a mesh, without weights or devices.

    python tools/plan.py gsm8k_llama --mesh 1,8,1 --device-memory 80GB
    python tools/plan.py gsm8k_llama model.lora_rank=16 mesh.fsdp=1 --device-memory 80GB
    python tools/plan.py gsm8k_phi --mesh 2,4,1 --device-memory 40GB rollout.max_new_tokens=300
    python tools/plan.py gsm8k_llama --model-config path/to/config.json --json plan.json

Each program of a LaTRO update (the sampler `sampling.sample_padded`, the rollout scoring
`rollout.score_rows`, the train step `update.update`) is lowered with abstract arguments
(`jax.ShapeDtypeStruct`s carrying the shardings of `latro_jax.sharding`), compiled, and its
`memory_analysis()` read: per device, arguments + outputs - donated (aliased) + temporaries is the
program's peak. Arrays that live across the program without being its arguments (AdamW's moments
while sampling, pi_0 during the update) are added to give the device's peak in that phase.

The model's shape comes from `--model-config` (an HF config.json or its directory), else from a
preset for the paper's three models (MODEL_SHAPES below; no hub access is needed). A mesh larger
than the devices present is simulated on the CPU (`--xla_force_host_platform_device_count` is
set before JAX starts); the numbers are then those of XLA's CPU compiler, an estimate of a GPU's
(other fusion decisions, no cuDNN/cuBLAS workspaces): leave a few GB of headroom. For bfloat16
compute the CPU's numbers are pessimistic: it multiplies bfloat16 matrices in float32, holding a
float32 copy of each weight (the LoRA plan of gsm8k_llama reads 121 GB on the CPU, 40 GB with an
H100's compiler). On a GPU machine the programs are compiled for the GPU (still no weights).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re

# Architecture shapes of the paper's models (their HF config.json, trimmed to what memory depends
# on: rope scaling factors change values, not sizes, so they are left out).
MODEL_SHAPES = {
    "meta-llama/Llama-3.1-8B-Instruct": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "mistralai/Mistral-7B-Instruct-v0.3": dict(
        model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5,
        sliding_window=None, tie_word_embeddings=False,
    ),
    "microsoft/Phi-3.5-mini-instruct": dict(
        model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=131072, rms_norm_eps=1e-5,
        sliding_window=262144, tie_word_embeddings=False,
    ),
}
MODEL_SHAPES["meta-llama/Llama-3.1-8B"] = MODEL_SHAPES["meta-llama/Llama-3.1-8B-Instruct"]
MODEL_SHAPES["mistralai/Mistral-7B-v0.3"] = MODEL_SHAPES["mistralai/Mistral-7B-Instruct-v0.3"]

UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(text: str) -> int:
    """'80GB' (10^9) or '80GiB' (2^30) -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    unit = match and (match.group(2).upper() or "B")
    if not match or unit not in UNITS:
        raise ValueError(f"--device-memory {text!r}: expected a size such as 80GB or 80GiB")
    return int(float(match.group(1)) * UNITS[unit])


def parse_mesh(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"--mesh {text!r}: expected data,fsdp,tensor device counts (each >= 1), e.g. 1,8,1")
    return tuple(int(p) for p in parts)


def gb(num_bytes: float) -> str:
    """Bytes in GB (10^9), or MB below 0.1 GB so that small plans read too."""
    if num_bytes < 1e8:
        return f"{num_bytes / 1e6:.2f} MB"
    return f"{num_bytes / 1e9:.2f} GB"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="a name in experiments/ (e.g. gsm8k_llama)")
    parser.add_argument("overrides", nargs="*", help="section.field=value, as for make train")
    parser.add_argument("--mesh", help="data,fsdp,tensor device counts: mesh.data=, mesh.fsdp=, mesh.tensor= "
                                       "(default: the experiment's mesh over the devices present)")
    parser.add_argument("--device-memory", default="80GB", help="memory of one device, e.g. 80GB or 80GiB")
    parser.add_argument("--model-config", help="an HF config.json (or its directory) instead of the preset")
    parser.add_argument("--lora", metavar="RANK", help="model.lora_rank=RANK: LoRA adapters on a frozen base")
    parser.add_argument("--prompt-len", type=int, default=256, help="prompt slots (a bucket; default 256)")
    parser.add_argument("--answer-len", type=int, default=16, help="answer slots (a bucket; default 16)")
    parser.add_argument("--json", metavar="PATH", help="also write the plan as JSON")
    args = parser.parse_intermixed_args(argv)
    from latro_jax.checkpoint import check_output  # imports JAX, but starts no backend
    from latro_jax.config import ModelConfig
    from latro_jax.experiment import ExperimentError, load_experiment

    overrides = list(args.overrides)
    try:
        if args.mesh:
            mesh = parse_mesh(args.mesh)
            overrides += [f"mesh.{axis}={size}" for axis, size in zip(("data", "fsdp", "tensor"), mesh)]
        device_memory = parse_bytes(args.device_memory)
    except ValueError as e:
        raise ExperimentError(str(e)) from None
    if args.lora is not None:  # the experiment checks the rank
        overrides.append(f"model.lora_rank={args.lora}")
    for option, value in (("--prompt-len", args.prompt_len), ("--answer-len", args.answer_len)):
        if value < 1:
            raise ExperimentError(f"{option} {value} is invalid; must be >= 1")
    if args.json:
        check_output(args.json, overwrite=True)  # before the compiles, not after

    exp = load_experiment(args.experiment, overrides)
    sizes = (exp.mesh.data, exp.mesh.fsdp, exp.mesh.tensor)
    # Must precede JAX's start: the CPU then offers enough devices to simulate a mesh of fixed size.
    if -1 not in sizes and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={math.prod(sizes)}"
        ).strip()
    if args.model_config:
        config = ModelConfig.from_hf(args.model_config)
    elif exp.model.hf in MODEL_SHAPES:
        config = ModelConfig.from_hf(MODEL_SHAPES[exp.model.hf])
    elif exp.model.hf and os.path.exists(exp.model.hf):
        config = ModelConfig.from_hf(exp.model.hf)
    else:
        raise ExperimentError(f"no model shape for model.hf={exp.model.hf!r} model.checkpoint="
                              f"{exp.model.checkpoint!r}; pass --model-config <config.json> (presets: "
                              f"{', '.join(MODEL_SHAPES)})")
    result = plan(exp, config, device_memory, args.prompt_len, args.answer_len)
    print_plan(result)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return result


def plan(exp, config, device_memory: int, prompt_len: int, answer_len: int) -> dict:
    """The per-device memory of each phase of an update of `exp` with model `config` on the
    experiment's mesh (`exp.mesh`: an axis of -1 takes the devices present), full fine-tuning or
    LoRA as `exp.model` says. Compiles abstractly; allocates no weights."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from latro_jax.experiment import ExperimentError
    from latro_jax.lora import LoraRowsLoss, abstract_adapters, lora_config
    from latro_jax.model import abstract_params, graphdef
    from latro_jax.rollout import ANSWER_BUCKETS, Questions, score_rows
    from latro_jax.sampling import SamplingConfig, bucket, sample_padded
    from latro_jax.sharding import (
        batch_shardings, batch_shards, cache_shardings, make_mesh, micro_batch_rows, opt_state_shardings,
        param_shardings,
    )
    from latro_jax.update import latro_rows_loss, make_optimizer, policy_param_dtype, reference_dtype, update_jit

    devices = jax.devices()
    sizes = (exp.mesh.data, exp.mesh.fsdp, exp.mesh.tensor)
    if -1 not in sizes:  # a mesh larger than the accelerators present: simulated on the CPU's devices
        num_devices = math.prod(sizes)
        if len(devices) < num_devices:
            devices = jax.devices("cpu")
        if len(devices) < num_devices:
            raise ExperimentError(f"the mesh needs {num_devices} devices but {len(devices)} exist: start with "
                                  f"XLA_FLAGS=--xla_force_host_platform_device_count={num_devices}")
        devices = devices[:num_devices]
    try:
        mesh = make_mesh(exp.mesh, devices=devices)
    except ValueError as e:
        raise ExperimentError(f"mesh: {e} (mesh.data, mesh.fsdp, mesh.tensor)") from None
    mesh_shape = tuple(mesh.shape[axis] for axis in ("data", "fsdp", "tensor"))
    replicated = NamedSharding(mesh, PartitionSpec())

    def placed(tree, shardings):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)

    def replicate(tree):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), tree)

    k, questions = exp.rollout.num_samples, exp.train.questions_per_update
    n = questions * k
    micro_rows = micro_batch_rows(exp.train.micro_batch, n, mesh)  # as train.run: train.micro_batch per batch shard
    chunk = min(exp.train.rollout_batch or questions, questions)  # questions sampled and scored at a time, as rollout.rollout
    chunk_rows = chunk * k
    steps = bucket(exp.rollout.max_new_tokens, SamplingConfig().length_buckets)
    answer_len = bucket(answer_len, ANSWER_BUCKETS)
    length = prompt_len + exp.rollout.max_new_tokens + answer_len
    optimizer = make_optimizer(exp.optim, exp.train.updates)
    # as train.load_policy: full fine-tuning's float32 params, or a LoRA run's frozen base
    train_config = config.replace(dtype=exp.model.dtype, param_dtype=policy_param_dtype(exp.model),
                                  remat=exp.model.remat)
    lora = lora_config(exp.model)
    if lora is None:
        policy = abstract_params(train_config)
        policy = placed(policy, param_shardings(mesh, policy))
        trained = policy
        reference = jax.tree.map(  # update.reference_params: pi_0 is a copy in the compute dtype
            lambda a: jax.ShapeDtypeStruct(a.shape, reference_dtype(train_config, a.dtype), sharding=a.sharding), policy)
        sampled = policy
    else:
        base = abstract_params(train_config)
        base = placed(base, param_shardings(mesh, base))
        # Adapters are ~0.5% of the params: replicated, so each device's update is local.
        trained = replicate(abstract_adapters(config, lora))
        reference = base  # the frozen base is pi_0
        sampled = base  # the sampler runs on merge(base, adapters): the base's shapes and dtype
    opt_abstract = jax.eval_shape(optimizer.init, trained)
    if lora is None:
        shardings = opt_state_shardings(mesh, optimizer, opt_abstract, param_shardings(mesh, policy))
        opt_state = placed(opt_abstract, shardings)
    else:
        opt_state = replicate(opt_abstract)

    def rows_of(shapes: dict) -> dict:
        arrays = {name: jax.ShapeDtypeStruct(shape, dtype) for name, (shape, dtype) in shapes.items()}
        return placed(arrays, batch_shardings(mesh, arrays))

    sampling = SamplingConfig(max_new_tokens=steps, num_samples=k, temperature=exp.rollout.temperature,
                              cache_room=answer_len + 2, length_buckets=(steps,))
    prompts = rows_of({"tokens": ((chunk, prompt_len), jnp.int32), "mask": ((chunk, prompt_len), jnp.bool_)})
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
    limit = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    rows = rows_of({
        "tokens": ((n, length), jnp.int32), "attention_mask": ((n, length), jnp.bool_),
        "rationale_mask": ((n, length), jnp.bool_), "answer_mask": ((n, length), jnp.bool_),
        "advantages": ((n,), jnp.float32),
    })
    # model.graphdef builds the module abstractly, which fails under a mesh lacking the logical
    # axis names; built once here (it is cached), the programs below reuse it.
    graphdef(train_config)

    with jax.set_mesh(mesh):
        sampler_args = (train_config, sampling, steps, sampled, prompts["tokens"], prompts["mask"], rng, limit)
        out = jax.eval_shape(sample_padded, *sampler_args)
        # sample() trims the generation bucket to max_new_tokens; the cache keeps its slots.
        trimmed = (chunk_rows, exp.rollout.max_new_tokens)
        out = out._replace(
            tokens=jax.ShapeDtypeStruct(trimmed, out.tokens.dtype), logprobs=jax.ShapeDtypeStruct(trimmed, jnp.float32),
        )
        out = placed(out, out._replace(
            tokens=batch_shardings(mesh, out.tokens), lengths=batch_shardings(mesh, out.lengths),
            finished=batch_shardings(mesh, out.finished), logprobs=batch_shardings(mesh, out.logprobs),
            prompt_lengths=batch_shardings(mesh, out.prompt_lengths), prompt_slots=replicated, steps=replicated,
            cache=cache_shardings(mesh, out.cache),
        ))
        chunk_questions = Questions(**rows_of({"prompt_tokens": ((chunk, prompt_len), jnp.int32),
                                               "prompt_mask": ((chunk, prompt_len), jnp.bool_),
                                               "answers": ((chunk, answer_len), jnp.int32),
                                               "answer_lengths": ((chunk,), jnp.int32)}))
        score_args = (train_config, sampled, reference, out, chunk_questions)
        if lora is None:
            update_args = (train_config, exp.objective, optimizer, micro_rows, latro_rows_loss, prompt_len,
                           trained, opt_state, rows)
            update_kwargs = {}
        else:
            update_args = (train_config, exp.objective, optimizer, micro_rows,
                           LoraRowsLoss(latro_rows_loss, lora), prompt_len, trained, opt_state, rows)
            update_kwargs = {"frozen": base}
        programs = {
            "sample": sample_padded.lower(*sampler_args),
            "score": score_rows.lower(*score_args, score_batch=exp.train.score_batch,
                                      no_rationale=exp.objective.reward_baseline == "no_rationale"),
            "update": update_jit(trained, opt_state).lower(*update_args, **update_kwargs),
        }
        analyses = {name: lowered.compile().memory_analysis() for name, lowered in programs.items()}

    state = {"policy params": trained, "optimizer state": opt_state}
    if lora is None:
        state["pi_0 (reference params)"] = reference
    else:
        state["frozen base (also pi_0)"] = base
    state_bytes = {name: device_bytes(tree) for name, tree in state.items()}
    cache_bytes = device_bytes(out.cache)
    # What lives on a device during each program without being one of its arguments.
    live = {
        "sample": [name for name in state if name not in ("policy params",)] if lora is None else list(state),
        "score": ["optimizer state"] if lora is None else ["policy params", "optimizer state"],
        "update": ["pi_0 (reference params)"] if lora is None else [],
    }
    phases = {}
    for name, analysis in analyses.items():
        program = {
            "arguments": analysis.argument_size_in_bytes,
            "outputs": analysis.output_size_in_bytes,
            "aliased": analysis.alias_size_in_bytes,
            "temporaries": analysis.temp_size_in_bytes,
            "code": analysis.generated_code_size_in_bytes,
        }
        program["peak"] = program["arguments"] + program["outputs"] - program["aliased"] + program["temporaries"]
        others = sum(state_bytes[s] for s in live[name])
        also_live = {s: state_bytes[s] for s in live[name]}
        phases[name] = {**program, "also_live": also_live, "total": program["peak"] + others}
    peak = max(p["total"] for p in phases.values())
    return {
        "experiment": exp.name,
        "model": {"model_type": config.model_type, "params": count(abstract_params(config)),
                  "layers": config.num_layers,
                  "hidden": config.hidden_size, "vocab": config.vocab_size, "compute_dtype": exp.model.dtype},
        "mesh": {"data": mesh_shape[0], "fsdp": mesh_shape[1], "tensor": mesh_shape[2],
                 "platform": devices[0].platform},
        "lora_rank": exp.model.lora_rank,
        "shapes": {"questions": questions, "samples": k, "rows": n, "prompt_slots": prompt_len,
                   "generation_slots": steps, "answer_slots": answer_len, "row_length": length,
                   "micro_batch": micro_rows, "micro_batch_per_shard": exp.train.micro_batch,
                   "batch_shards": batch_shards(mesh), "rollout_questions": chunk,
                   "score_batch": min(exp.train.score_batch or chunk_rows, chunk_rows)},
        "state_bytes_per_device": state_bytes,
        "kv_cache_bytes_per_device": cache_bytes,
        "phases": phases,
        "device_memory": device_memory,
        "peak": peak,
        "fits": peak <= device_memory,
    }


def count(tree) -> int:
    import jax

    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def device_bytes(tree) -> int:
    """Bytes of the largest shard of each array of `tree` (ShapeDtypeStructs with shardings), summed."""
    import jax
    import numpy as np

    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
    )


def print_plan(result: dict) -> None:
    mesh, shapes, model = result["mesh"], result["shapes"], result["model"]
    method = f"LoRA rank {result['lora_rank']}" if result["lora_rank"] else "full fine-tuning"
    print(f"{result['experiment']}: {model['model_type']} {model['params'] / 1e6:,.1f}M params, {method}, mesh "
          f"data={mesh['data']} fsdp={mesh['fsdp']} tensor={mesh['tensor']} ({mesh['platform']} compiler)")
    print(f"rollout: {shapes['questions']} questions x {shapes['samples']} samples = {shapes['rows']} rows of "
          f"{shapes['prompt_slots']} prompt + {shapes['generation_slots']} generated + {shapes['answer_slots']} "
          f"answer slots; update in micro-batches of {shapes['micro_batch']} rows "
          f"(train.micro_batch={shapes['micro_batch_per_shard']} per batch shard)")
    print(f"sampled and scored {shapes['rollout_questions']} questions at a time, the reference forward over "
          f"{shapes['score_batch']} rows at a time")
    shards = shapes["batch_shards"]
    if shapes["micro_batch"] % shards:
        print(f"note: the update's {shapes['micro_batch']} rows cannot be split over the {shards} batch shards "
              "(data x fsdp): each row is computed whole on several devices")
    print("\nper device:")
    for name, size in result["state_bytes_per_device"].items():
        print(f"  {name:<26} {gb(size):>10}")
    print(f"  {'KV cache of a rollout chunk':<26} {gb(result['kv_cache_bytes_per_device']):>10}")
    header = (f"\n{'program':<8} | {'arguments':>10} | {'outputs':>10} | {'donated':>10} | {'temporaries':>11} | "
              f"{'peak':>10} | {'+ also live':>11} | {'total':>10}")
    print(header)
    print("-" * (len(header) - 1))
    for name, p in result["phases"].items():
        also = sum(p["also_live"].values())
        print(f"{name:<8} | {gb(p['arguments']):>10} | {gb(p['outputs']):>10} | {gb(p['aliased']):>10} | "
              f"{gb(p['temporaries']):>11} | {gb(p['peak']):>10} | {gb(also):>11} | {gb(p['total']):>10}")
    for name, p in result["phases"].items():
        if p["also_live"]:
            print(f"  also live during {name}: {', '.join(p['also_live'])}")
    verdict = "fits" if result["fits"] else "does NOT fit"
    print(f"\nper-device peak {gb(result['peak'])} of {gb(result['device_memory'])}: {verdict}")


if __name__ == "__main__":
    import _cli  # imports jax, but starts no backend: main() still sets XLA_FLAGS first

    _cli.run(main)
