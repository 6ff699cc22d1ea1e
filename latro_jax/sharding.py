"""One device mesh for any number of devices, and the shardings of everything placed on it.

The mesh has three axes: `data` (rows of a batch), `fsdp` (rows of a batch, and the params
split along `embed`, gathered layer by layer as XLA needs them) and `tensor` (heads, MLP and
vocabulary split across devices). `MeshSpec()` is pure FSDP over every device; one device is the
mesh (1, 1, 1), so the same code runs on a laptop and on a pod.

Arrays carry logical axis names (the params' `out_sharding` metadata, `model.AXES`; `batch` for
rows of data and activations). `RULES` map them to mesh axes; a dimension whose size is not
divisible by its mesh axes keeps the longest prefix of them that divides it, down to none
(replicated), so odd head counts or small batches run instead of failing.

    mesh = make_mesh(MeshSpec(data=2, tensor=2))
    params = init_params(config, seed, mesh=mesh)               # created in its shards
    rows = jax.device_put(rows, batch_shardings(mesh, rows))
    with jax.set_mesh(mesh):                                     # activations follow RULES too
        logits, _ = forward(config, params, tokens, positions)
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen, nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec

AXIS_NAMES = ("data", "fsdp", "tensor")

# (logical axis, mesh axes), in priority order: flax assigns each mesh axis at most once per array.
RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("head_dim", None),
)

# Logical axes of activations and of the KV cache (model.KVCache).
HIDDEN = ("batch", None, None)  # [batch, seq, hidden]
CACHE_KV = ("batch", "kv_heads", None, "head_dim")  # [batch, kv_heads, slots, head_dim]
CACHE_POSITIONS = ("batch", None)  # [batch, slots]


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Devices along each mesh axis. One field may be -1: the devices the others leave."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def __post_init__(self):
        for name in AXIS_NAMES:
            size = getattr(self, name)
            if size != -1 and size < 1:
                raise ValueError(f"MeshSpec.{name}={size} must be a positive device count or -1 (the rest)")
        rest = [name for name in AXIS_NAMES if getattr(self, name) == -1]
        if len(rest) > 1:
            raise ValueError(f"MeshSpec: only one axis may be -1 (the rest of the devices), got {', '.join(rest)}")

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """(data, fsdp, tensor) sizes for `num_devices` devices, -1 resolved."""
        sizes = {name: getattr(self, name) for name in AXIS_NAMES}
        rest = [name for name, size in sizes.items() if size == -1]
        fixed = math.prod(size for size in sizes.values() if size != -1)
        if rest:
            (name,) = rest
            if num_devices % fixed:
                others = " x ".join(f"{n}={s}" for n, s in sizes.items() if n != name)
                raise ValueError(
                    f"MeshSpec.{name}=-1 takes the devices the other axes leave, but {others} = {fixed} "
                    f"does not divide the {num_devices} devices"
                )
            sizes[name] = num_devices // fixed
        elif fixed != num_devices:
            given = ", ".join(f"{n}={s}" for n, s in sizes.items())
            raise ValueError(
                f"MeshSpec({given}) uses {fixed} devices but there are {num_devices}; "
                "set one field to -1 to take the rest"
            )
        return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(spec: MeshSpec = MeshSpec(), devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default all). Auto axes: XLA propagates
    shardings from the inputs and the constraints placed by `constrain`."""
    devices = list(jax.devices() if devices is None else devices)
    shape = spec.shape(len(devices))
    return jax.make_mesh(shape, AXIS_NAMES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _fit(mesh_axes, size: int, mesh_shape) -> str | tuple[str, ...] | None:
    """The longest prefix of `mesh_axes` (those in the mesh, of more than one device) whose
    device count divides `size`."""
    if mesh_axes is None:
        return None
    # Axes of one device split nothing: leaving them out keeps specs canonical (as XLA reports them).
    names = [a for a in ((mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes) if mesh_shape.get(a, 1) > 1]
    while names and size % math.prod(mesh_shape[a] for a in names):
        names.pop()
    if not names:
        return None
    return names[0] if len(names) == 1 else tuple(names)


def logical_spec(axes: Sequence[str | None], shape: Sequence[int], mesh, rules=RULES) -> PartitionSpec:
    """The mesh PartitionSpec of an array of `shape` whose dimensions have logical `axes`.

    mesh: a `Mesh` or `AbstractMesh`; mesh axes it lacks are ignored.
    """
    mesh_axes = linen.logical_to_mesh_axes(tuple(axes), rules)
    return PartitionSpec(*(_fit(entry, size, mesh.shape) for entry, size in zip(mesh_axes, shape)))


def logical_sharding(
    mesh: jax.sharding.Mesh, axes: Sequence[str | None], shape: Sequence[int], rules=RULES
) -> NamedSharding:
    """`logical_spec` on a concrete mesh, for placing arrays and for jit's in/out shardings."""
    return NamedSharding(mesh, logical_spec(axes, shape, mesh, rules))


def constrain(x: jax.Array, axes: Sequence[str | None], rules=RULES) -> jax.Array:
    """Inside jit, pin `x` to the sharding of its logical `axes` on the mesh set by
    `jax.set_mesh`; without one, `x` unchanged. Keeps activations and caches created inside
    jit (which have no input sharding to inherit) split over the batch."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(axes, x.shape, mesh, rules))


def param_shardings(mesh: jax.sharding.Mesh, params: nnx.State, rules=RULES) -> nnx.State:
    """NamedShardings of params (real or `model.abstract_params(config)`), from each
    parameter's logical axes (`out_sharding` metadata): a tree with the params' structure."""
    specs = nnx.get_partition_spec(params)  # the logical names, as PartitionSpecs
    return jax.tree.map(lambda spec, x: logical_sharding(mesh, tuple(spec), x.shape, rules), specs, params)


def opt_state_shardings(
    mesh: jax.sharding.Mesh, optimizer: optax.GradientTransformation, opt_state, params_shardings: nnx.State
):
    """NamedShardings of an optax state (real or from `jax.eval_shape(optimizer.init, params)`):
    trees that mirror the params (Adam's moments) take the params' shardings, everything else
    (step counts, scalars) is replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        opt_state,
        params_shardings,
        transform_non_params=lambda _: replicated,
    )


def batch_shards(mesh, rules=RULES) -> int:
    """Groups of devices that hold different rows: the product of the mesh axes the logical
    "batch" axis maps to (data x fsdp), for rows that divide it."""
    axes = dict(rules)["batch"]
    return math.prod(mesh.shape.get(a, 1) for a in ((axes,) if isinstance(axes, str) else axes))


def batch_shardings(mesh: jax.sharding.Mesh, batch, rules=RULES):
    """NamedShardings of a tree of [rows, ...] arrays: rows split over data x fsdp."""
    return jax.tree.map(lambda x: logical_sharding(mesh, ("batch",) + (None,) * (x.ndim - 1), x.shape, rules), batch)


def cache_shardings(mesh: jax.sharding.Mesh, cache, rules=RULES):
    """NamedShardings of a `model.KVCache` (real or abstract): k, v [B, KV, S, D] over batch and
    kv_heads, positions [B, S] over batch, index replicated."""

    def kv(arrays):
        return tuple(logical_sharding(mesh, CACHE_KV, a.shape, rules) for a in arrays)

    return cache._replace(
        k=kv(cache.k),
        v=kv(cache.v),
        positions=logical_sharding(mesh, CACHE_POSITIONS, cache.positions.shape, rules),
        index=NamedSharding(mesh, PartitionSpec()),
    )


# ---- many processes: JAX's multi-controller runtime -------------------------------------------


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
    """How the processes of a multi-host run find each other (`jax.distributed.initialize`).

    Empty fields fall back to the usual environment variables (JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID); `auto_detect` lets JAX read the cluster instead (Cloud
    TPU pods, SLURM, Open MPI, GKE). With none of these set, the run is one process.
    """

    coordinator_address: str = ""  # host:port of process 0
    num_processes: int = 0
    process_id: int = -1
    auto_detect: bool = False


def initialize_distributed(spec: DistributedSpec) -> bool:
    """Join the other processes of a multi-host run, before anything touches a device; returns
    whether this is a multi-process run. Call once per process (a second call is a no-op)."""
    address = spec.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    count = spec.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
    index = spec.process_id if spec.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
    if not (address or count or index >= 0 or spec.auto_detect):
        return False
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if not spec.auto_detect:
        missing = [name for name, unset in (("coordinator_address", not address), ("num_processes", count < 1),
                                            ("process_id", index < 0)) if unset]
        if missing:
            raise ValueError(
                f"distributed: {', '.join('distributed.' + m for m in missing)} not set (nor JAX_COORDINATOR_ADDRESS, "
                "JAX_NUM_PROCESSES, JAX_PROCESS_ID); set all three, or distributed.auto_detect=true on a cluster JAX knows"
            )
        if not 0 <= index < count:
            raise ValueError(f"distributed.process_id={index} must be in [0, num_processes={count})")
    jax.distributed.initialize(address or None, count or None, None if index < 0 else index)
    return jax.process_count() > 1


def mesh_of(tree) -> jax.sharding.Mesh | None:
    """The mesh the arrays of `tree` are laid out on (None: one device, or not yet placed)."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def process_rows(mesh: jax.sharding.Mesh, n: int) -> np.ndarray:
    """The rows of an n-row batch (split over the mesh's batch axes) that this process's devices
    hold, so the rows it loads: all of them on one process, or where rows are replicated."""
    rows: set[int] = set()
    for index in logical_sharding(mesh, ("batch",), (n,)).addressable_devices_indices_map((n,)).values():
        rows.update(range(*index[0].indices(n)))
    return np.array(sorted(rows), np.int64)


def rows_from_processes(mesh: jax.sharding.Mesh, n: int, rows: np.ndarray, local):
    """Global [n, ...] arrays with rows split over the mesh's batch axes, from each process's own
    rows: `local` is a tree of arrays whose row i is global row `rows[i]` (`process_rows`). No
    process holds a whole array."""
    where = {int(r): i for i, r in enumerate(rows)}

    def assemble(x, sharding):
        def block(index):
            return x[[where[r] for r in range(*index[0].indices(n))]][(slice(None),) + tuple(index[1:])]

        return jax.make_array_from_callback((n,) + x.shape[1:], sharding, block)

    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct((n,) + x.shape[1:], x.dtype), local)
    return jax.tree.map(assemble, local, batch_shardings(mesh, shapes))


def place_rows(mesh: jax.sharding.Mesh | None, arrays):
    """Host arrays ([rows, ...], the same on every process) placed with rows split over the
    mesh (`batch_shardings`); without a mesh, on the default device."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, arrays)
    return jax.device_put(arrays, batch_shardings(mesh, arrays))


def to_host(tree):
    """Numpy copies of arrays, gathered from every process where they span several (a collective:
    every process must call it)."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x)

    return jax.tree.map(get, tree)


def global_max(values: Sequence[int]) -> list[int]:
    """The element-wise maximum of `values` over all processes (a collective)."""
    local = np.asarray(values, np.int64)
    if jax.process_count() == 1:
        return local.tolist()
    return np.max(multihost_utils.process_allgather(local), axis=0).tolist()


def is_primary() -> bool:
    """Whether this process writes the run's logs and files (process 0)."""
    return jax.process_index() == 0


def micro_batches(rows, micro_batch: int):
    """Rows [N, ...] -> [N // micro_batch, micro_batch, ...], micro-batch j holding rows j, j + M,
    j + 2M, ... (M = N // micro_batch). Strided, not consecutive: with rows split over devices
    (blocks of consecutive rows), every micro-batch takes its share from each device, so each scan
    step keeps all devices busy instead of one."""
    def split(x):
        x = x.reshape(micro_batch, x.shape[0] // micro_batch, *x.shape[1:]).swapaxes(0, 1)
        return constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(split, rows)


def micro_batch_rows(micro_batch: int, rows: int, mesh: jax.sharding.Mesh) -> int:
    """Rows per forward+backward of an update of `rows` rows. `train.micro_batch` is at most that
    many rows on each batch shard (a group of devices holding the same rows: mesh data x fsdp), as
    the paper's "micro-batches of 4" are per GPU, so that every device works on rows of its own:
    the shards times the largest count <= micro_batch that divides each shard's rows. Where the
    rows do not split evenly over the shards (a row is then computed on several devices; plan.py
    says so), the largest divisor of the rows <= micro_batch x shards."""
    shards = batch_shards(mesh)

    def largest_divisor(n: int, at_most: int) -> int:
        return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)

    if rows % shards == 0:
        return shards * largest_divisor(rows // shards, micro_batch)
    return largest_divisor(rows, micro_batch * shards)


def unmicro_batches(values):
    """The inverse of `micro_batches`: [M, micro_batch, ...] -> [N, ...] in the original row order."""
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:]), values)
