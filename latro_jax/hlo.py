"""Reading a compiled program's text (`jax.jit(f).lower(...).compile().as_text()`): what runs
inside its top-level while loops, such as the sampler's decode loops.

A decode step should read each weight once and do nothing else with it: a cast of a weight to the
compute dtype, or an all-gather of an fsdp-sharded weight, inside the loop repeats once per
generated token what belongs before the loop. XLA hoists loop-invariant work out of loops; these
functions let a test (and the GPU script) check that it did, on the compiler at hand.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp

from latro_jax.sampling import bucket, sample_padded

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\][^ ]* ([\w\-]+)\(")
_CALLED = re.compile(r"(?:calls|body|condition|to_apply|branch_computations|called_computations)=\{?([^}\s]+)")


class Op(NamedTuple):
    computation: str
    name: str
    dtype: str
    elements: int
    opcode: str


def _parse(text: str) -> tuple[str, dict[str, list[str]]]:
    """The entry computation's name, and every computation's instruction lines."""
    computations, entry, current = {}, None, None
    for line in text.splitlines():
        match = _COMPUTATION.match(line)
        if match:
            current = match.group(1)
            computations[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None and line.strip() == "}":
            current = None
        elif current is not None:
            computations[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the program text")
    return entry, computations


def _called(line: str) -> list[str]:
    return [name.lstrip("%") for group in _CALLED.findall(line) for name in group.split(",")]


def _ops(computations: dict[str, list[str]], names) -> list[Op]:
    ops = []
    for name in sorted(names):
        for line in computations[name]:
            match = _INSTRUCTION.match(line)
            if match:
                op, dtype, dims, opcode = match.groups()
                elements = math.prod(int(d) for d in dims.split(",")) if dims else 1
                ops.append(Op(name, op, dtype, elements, opcode))
    return ops


def program_ops(text: str) -> list[Op]:
    """Every array-shaped instruction of the program, in every computation."""
    _, computations = _parse(text)
    return _ops(computations, computations)


def loop_ops(text: str) -> list[Op]:
    """Every array-shaped instruction run inside the entry computation's while loops (their
    bodies and conditions, and whatever those call: fusions, nested loops)."""
    entry, computations = _parse(text)
    pending = [name for line in computations[entry] if " while(" in line for name in _called(line)]
    if not pending:
        raise ValueError("the program has no top-level while loop")
    seen = set()
    while pending:
        name = pending.pop()
        if name in seen or name not in computations:
            continue
        seen.add(name)
        for line in computations[name]:
            pending.extend(_called(line))
    return _ops(computations, seen)


def _weight_work(ops: list[Op], weight_sizes: set[int], compute_dtype: str) -> list[Op]:
    return [op for op in ops if op.elements in weight_sizes and (
        (op.opcode == "convert" and op.dtype == compute_dtype) or op.opcode in ("all-gather", "all-gather-start"))]


def weight_work_in_loops(text: str, weight_sizes: set[int], compute_dtype: str) -> list[Op]:
    """Per-step work on weights inside the top-level while loops: converts to `compute_dtype`
    (HLO's name: bf16, f32, ...) and all-gathers whose result has as many elements as a weight or
    a weight's shard (`weight_sizes`). [] when XLA hoisted the casts and kept the weights sharded.
    Converts to other dtypes are left alone: XLA's CPU backend computes bfloat16 dots in float32
    and converts their operands back every step, which is its own affair, not a weight layout."""
    return _weight_work(loop_ops(text), weight_sizes, compute_dtype)


def weight_work_in_program(text: str, weight_sizes: set[int], compute_dtype: str) -> list[Op]:
    """`weight_work_in_loops` over the whole program: where the casts and gathers are, if not in
    the loops (a check that finds none in the loops must find them here, or it looked at nothing)."""
    return _weight_work(program_ops(text), weight_sizes, compute_dtype)


def weight_sizes(params, shards: int = 1) -> set[int]:
    """Elements of each weight matrix of `params`, whole and split `shards` ways."""
    return {x.size // d for x in jax.tree.leaves(params) if x.ndim >= 2 for d in {1, shards}}


def decode_program(config, sampling, params, prompt_tokens, prompt_mask) -> str:
    """The text of the sampler's program as `sampling.sample_tokens` compiles it for these
    inputs (on their devices, under the current mesh)."""
    steps = bucket(sampling.max_new_tokens, sampling.length_buckets)
    static = dataclasses.replace(sampling, max_new_tokens=steps)
    lowered = sample_padded.lower(config, static, steps, params, prompt_tokens, prompt_mask, jax.random.key(0),
                                  jnp.int32(sampling.max_new_tokens))
    return lowered.compile().as_text()
