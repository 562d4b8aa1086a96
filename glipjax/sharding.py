"""Device meshes, logical-axis rules and sharded creation of params and optimizer state.

The mesh has three axes: "data" (pure data parallelism), "fsdp" (data parallelism
whose params and optimizer state are split across the axis) and "tensor" (attention
heads, MLP widths and vocabulary split across the axis). Model code names its axes
logically (see glipjax/models/layers.py); `rules` map each logical name to mesh axes
as ordered (logical, mesh axes) pairs, first usable rule wins, each mesh axis used at
most once per array. Typical use:

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params, opt_state = create_sharded(init_params, mesh, rules, rng, *example, tx=tx)
    with sharding_context(mesh, rules):
        step = jax.jit(train_step, ...)
        out = step(params, opt_state, shard_batch(host_batch, mesh, rules))
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from flax.core import meta
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Params: FSDP over "fsdp" on embed-type axes, tensor parallelism on heads/mlp/vocab.
# A vector that has only a heads/mlp/vocab axis (a bias) is split over tensor and
# fsdp together; a kernel whose other axis already took fsdp falls to tensor alone.
# Activations: "batch" comes first, so it takes data and fsdp, and an activation's
# "embed" finds fsdp taken and stays whole.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("heads", ("tensor", "fsdp")),
    ("heads", "tensor"),
    ("mlp", ("tensor", "fsdp")),
    ("mlp", "tensor"),
    ("vocab", ("tensor", "fsdp")),
    ("vocab", "tensor"),
    ("conv_out", "fsdp"),
    ("norm", "fsdp"),
    ("length", None),
    ("height", None),
    ("width", None),
)

log = logging.getLogger(__name__)


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A mesh with axes ("data", "fsdp", "tensor") sized from `axes` (missing ones are 1;
    one size may be -1 for "all remaining devices"). Axis types are Auto, so XLA
    propagates shardings between the constraints the model places."""
    unknown = sorted(set(axes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"Unknown mesh axes {unknown}; the mesh axes are {MESH_AXES}")
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(axes.get(name, 1)) for name in MESH_AXES]
    bad = [f"{n}={s}" for n, s in zip(MESH_AXES, sizes) if s == 0 or s < -1]
    if bad:
        raise ValueError(f"Mesh axis sizes must be positive or -1, got {', '.join(bad)}")
    if sizes.count(-1) > 1:
        raise ValueError(f"At most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"Mesh {dict(zip(MESH_AXES, sizes))}: {len(devices)} devices are not divisible by "
                f"the fixed axes' product {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"Mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
            f"but {len(devices)} are available; make the product of the axis sizes "
            f"{len(devices)} or use -1 for one axis")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def normalize_rules(rules: Sequence[Sequence[Any]]) -> Rules:
    """Rules as hashable tuples (configs and command lines may give lists); checks the
    mesh axis names."""
    out = []
    for rule in rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"A sharding rule is a (logical name, mesh axes) pair, got {rule!r}")
        name, target = rule
        target = tuple(target) if isinstance(target, (list, tuple)) else target
        for axis in (target if isinstance(target, tuple) else (target,)):
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(f"Sharding rule {rule!r} names mesh axis {axis!r}; the mesh axes are {MESH_AXES}")
        out.append((name, target))
    return tuple(out)


def rules_from_config(config: Any) -> Rules:
    """`config.sharding.rules` when the config sets them (non-empty), else DEFAULT_RULES."""
    sharding = config.get("sharding") if hasattr(config, "get") else None
    rules = sharding.get("rules") if sharding is not None else None
    return normalize_rules(rules if rules else DEFAULT_RULES)


@contextlib.contextmanager
def sharding_context(mesh: jax.sharding.Mesh, rules: Sequence[Sequence[Any]] = DEFAULT_RULES) -> Iterator[None]:
    """Mesh plus logical rules in context, so the models' nn.with_logical_constraint
    takes effect while a function is traced (jit traces on its first call: call it
    inside this context)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(normalize_rules(rules)):
        yield


def _as_tuple(target: MeshAxes) -> tuple[str, ...]:
    if target is None:
        return ()
    return target if isinstance(target, tuple) else (target,)


def logical_to_mesh_spec(
    names: Sequence[str | None], shape: Sequence[int], mesh: jax.sharding.Mesh,
    rules: Sequence[Sequence[Any]], what: str = "array",
) -> PartitionSpec:
    """A PartitionSpec for an array of `shape` whose dims are named `names`: rules in
    order, each mesh axis used once. A dimension not divisible by a rule's mesh size
    skips that rule (logged) and tries the next; with none left it is replicated."""
    if len(names) != len(shape):
        raise ValueError(f"{what}: {len(names)} logical axes {tuple(names)} for shape {tuple(shape)}")
    result: list[MeshAxes] = [None] * len(names)
    assigned = [False] * len(names)
    used: set[str] = set()
    for name, target in normalize_rules(rules):
        if name not in names:
            continue
        pos = names.index(name)
        axes = _as_tuple(target)
        if assigned[pos] or used & set(axes):
            continue
        size = math.prod(mesh.shape[a] for a in axes)
        if shape[pos] % size:
            log.info("%s: dim %d (%s, size %d) not divisible by mesh %s of size %d; not sharded that way",
                     what, pos, name, shape[pos], target, size)
            continue
        assigned[pos] = True
        used |= set(axes)
        result[pos] = target if isinstance(target, tuple) and len(target) > 1 else (axes[0] if axes else None)
    return PartitionSpec(*result)


def _path_str(path: tuple[Any, ...]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def unbox(tree: Any) -> Any:
    """The values of a tree of boxed (logically annotated) variables. Unlike
    flax's meta.unbox it adds no sharding constraints, so it behaves the same inside
    and outside a mesh context."""
    return jax.tree_util.tree_map(lambda x: x.value if isinstance(x, meta.AxisMetadata) else x, tree,
                                  is_leaf=lambda x: isinstance(x, meta.AxisMetadata))


def param_shardings(abstract_boxed_variables: Any, mesh: jax.sharding.Mesh, rules: Sequence[Sequence[Any]]) -> Any:
    """NamedShardings (tree of the unboxed variables) from the logical annotations of
    `abstract_boxed_variables` (jax.eval_shape of a Flax init). Leaves without
    annotations are replicated."""
    logical = nn.get_partition_spec(abstract_boxed_variables)
    shapes = unbox(abstract_boxed_variables)

    def one(path, spec, leaf):
        names = tuple(spec) if spec else (None,) * len(leaf.shape)
        return NamedSharding(mesh, logical_to_mesh_spec(names, leaf.shape, mesh, rules, _path_str(path)))

    return jax.tree_util.tree_map_with_path(one, logical, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def _dict_key_suffix(path: tuple[Any, ...]) -> tuple[Any, ...]:
    """The trailing run of dict keys of a key path (a param's path inside a state)."""
    keys: list[Any] = []
    for entry in reversed(path):
        if not isinstance(entry, jax.tree_util.DictKey):
            break
        keys.append(entry.key)
    return tuple(reversed(keys))


def optimizer_shardings(abstract_opt_state: Any, abstract_params: Any, shardings: Any,
                        mesh: jax.sharding.Mesh) -> Any:
    """Shardings for the optimizer state `abstract_opt_state` (jax.eval_shape of
    tx.init(params)): a leaf whose trailing dict-key path and shape are a param's
    (moments, EMA copies, inside masks or multi_transform) gets that param's sharding;
    everything else (step counts) is replicated."""
    by_path: dict[tuple[Any, ...], tuple[tuple[int, ...], Any]] = {}
    for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                                      jax.tree_util.tree_leaves(shardings)):
        by_path[_dict_key_suffix(path)] = (tuple(leaf.shape), sharding)
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        keys = _dict_key_suffix(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def sharded_shapes(init_fn: Callable[..., Any], mesh: jax.sharding.Mesh, rules: Sequence[Sequence[Any]],
                   *args: Any, tx: optax.GradientTransformation | None = None) -> Any:
    """What create_sharded would return, as jax.ShapeDtypeStructs carrying their
    shardings, without allocating anything."""
    boxed = jax.eval_shape(init_fn, *args)
    params, shardings = unbox(boxed), param_shardings(boxed, mesh, rules)

    def attach(x, s):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    sharded_params = jax.tree_util.tree_map(attach, params, shardings)
    if tx is None:
        return sharded_params
    opt_state = jax.eval_shape(tx.init, params)
    return sharded_params, jax.tree_util.tree_map(
        attach, opt_state, optimizer_shardings(opt_state, params, shardings, mesh))


def create_sharded(init_fn: Callable[..., Any], mesh: jax.sharding.Mesh, rules: Sequence[Sequence[Any]],
                   *args: Any, tx: optax.GradientTransformation | None = None, shapes: Any = None) -> Any:
    """Runs `init_fn(*args)` (returning boxed params, e.g. lambda r, *x: model.init(r, *x)
    ["params"]) compiled with out_shardings from the logical annotations, so each
    device only ever holds its own shards. Returns the unboxed params, or
    (params, tx.init(params)) when `tx` is given, both already sharded. `shapes`:
    sharded_shapes' result for the same arguments when at hand (init_fn is then
    traced once instead of twice)."""
    if shapes is None:
        shapes = sharded_shapes(init_fn, mesh, rules, *args, tx=tx)
    out_shardings = jax.tree_util.tree_map(lambda x: x.sharding, shapes)
    if tx is None:
        return jax.jit(lambda *a: unbox(init_fn(*a)), out_shardings=out_shardings)(*args)

    def init_all(*a):
        params = unbox(init_fn(*a))
        return params, tx.init(params)

    return jax.jit(init_all, out_shardings=out_shardings)(*args)


def batch_sharding(mesh: jax.sharding.Mesh, rules: Sequence[Sequence[Any]] = DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) dimension split over the mesh axes of the "batch" rule."""
    for name, target in normalize_rules(rules):
        if name == "batch":
            return NamedSharding(mesh, PartitionSpec(target))
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(host_batch: Any, mesh: jax.sharding.Mesh, rules: Sequence[Sequence[Any]] = DEFAULT_RULES) -> Any:
    """Global jax.Arrays from this process's part of the batch (a tree of arrays whose
    leading dims are the per-process batch), split on the batch dimension."""
    sharding = batch_sharding(mesh, rules)
    shards = math.prod(mesh.shape[a] for a in _as_tuple(sharding.spec[0])) if sharding.spec else 1

    def one(path, x):
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError(f"Batch leaf {_path_str(path)} is a scalar; every leaf needs a batch dimension")
        global_batch = x.shape[0] * jax.process_count()
        if global_batch % shards:
            raise ValueError(
                f"Batch leaf {_path_str(path)}: global batch {global_batch} ({x.shape[0]} per process) "
                f"is not divisible by the {shards} batch shards of the mesh {dict(mesh.shape)}")
        return jax.make_array_from_process_local_data(sharding, x, (global_batch, *x.shape[1:]))

    return jax.tree_util.tree_map_with_path(one, host_batch)
