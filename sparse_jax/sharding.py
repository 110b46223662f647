"""Logical axis names and the one rule table that maps them onto a device mesh.

Every parameter is created through `param(...)` with logical axis names (MaxText style);
`LOGICAL_AXIS_RULES` maps them onto the mesh axes (`data`, `fsdp`, `tensor`, `context`).
Layers never mention mesh axes, so sharding needs no change to them.

Using it (the train step jitted with in/out shardings is `sparse_jax.train.make_sharded_train_step`)::

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    shard_model(model, mesh, optimizer)          # parameters + optimizer state placed
    step = make_sharded_train_step(model, optimizer, mesh)
    loss, acc = step(model, optimizer, tokens, targets, mask)

A rule whose mesh axes do not divide a dimension (e.g. 4 heads over `tensor=8`) leaves that
dimension replicated instead of failing, so one rule table serves every mesh shape.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "context")

# logical axis -> mesh axis, or a tuple of mesh axes (None: replicated); names missing here
# (e.g. NSA's `cmp_block`, `cmp_mlp`) are replicated too
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", "context"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    # MLA / DSA / CSA: low-rank latents replicated (their up-projections shard over heads, so
    # the latent is all each tensor shard needs); lightning-indexer heads over `tensor`
    ("q_lora", None),
    ("kv_lora", None),
    ("index_heads", "tensor"),
    ("index_dim", None),
)


_rules_in_use: list = []        # stack of `use_axis_rules` tables; empty: LOGICAL_AXIS_RULES


def axis_rules():
    """The rule table in use: the innermost `use_axis_rules(...)`, else `LOGICAL_AXIS_RULES`
    (read at call time). Code without a `rules=` argument (context parallelism inside the
    attention ops) takes its mesh axes from here."""
    return _rules_in_use[-1] if _rules_in_use else LOGICAL_AXIS_RULES


@contextlib.contextmanager
def use_axis_rules(rules):
    """Within the block, `axis_rules()` is `rules` (a `LOGICAL_AXIS_RULES`-like table).

    Traces read it when they are made: jax caches a function's trace by its arguments and
    mesh, not by this table, so trace (jit) a function under the table it should use (a
    function already traced under another table keeps that one)."""
    for name, entry in dict(rules).items():
        if not (entry is None or isinstance(entry, str)
                or isinstance(entry, tuple) and all(isinstance(a, str) for a in entry)):
            raise ValueError(f"rule {name!r} -> {entry!r}: expected a mesh axis name, a tuple of them, or None")
    _rules_in_use.append(tuple(rules))
    try:
        yield
    finally:
        _rules_in_use.pop()


def mesh_axes(name: str, mesh, rules=None) -> tuple[str, ...]:
    """Mesh axes that logical axis `name` maps to under `rules` (default `axis_rules()`),
    keeping those `mesh` has with size > 1 (in rule order). `mesh` may be abstract."""
    entry = dict(axis_rules() if rules is None else rules).get(name)
    return tuple(a for a in _axes(entry) if a in mesh.axis_names and mesh.shape[a] > 1)


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], names: Sequence[str | None],
          dtype=jnp.float32) -> nnx.Param:
    """An `nnx.Param` initialised by `init(key, shape, dtype)` carrying logical axis names.

    Eager sharding is off here: the names are metadata until a mesh is applied through
    `LOGICAL_AXIS_RULES`, so layers build the same on one CPU and on a mesh.
    """
    if len(names) != len(shape):
        raise ValueError(f"names {tuple(names)} must have one entry per dim of shape {tuple(shape)}")
    with nnx.use_eager_sharding(False):
        return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(names))


def logical_to_mesh_spec(names: Sequence[str | None], rules=LOGICAL_AXIS_RULES) -> jax.sharding.PartitionSpec:
    """PartitionSpec for logical axis names under `rules`."""
    table = dict(rules)
    return jax.sharding.PartitionSpec(*(table.get(n) if n is not None else None for n in names))


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, context: int = 1, devices=None) -> Mesh:
    """A `Mesh` with axes `MESH_AXES` = (data, fsdp, tensor, context) of the given sizes.

    Uses the first `data * fsdp * tensor * context` of `devices` (default `jax.devices()`,
    which spans every host after `jax.distributed.initialize()`). Axis types are `Auto`:
    the compiler propagates shardings from the jit's in/out shardings.
    """
    sizes = (data, fsdp, tensor, context)
    if any(int(n) < 1 for n in sizes):
        raise ValueError(f"mesh axis sizes must be >= 1, got {dict(zip(MESH_AXES, sizes))}")
    devices = list(jax.devices() if devices is None else devices)
    n = math.prod(sizes)
    if n > len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {n} devices, have {len(devices)}")
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices[:n])


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def spec_for(shape: Sequence[int], names: Sequence[str | None] | None, mesh: Mesh,
             rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dims carry logical `names`.

    A dimension stays replicated when its rule names no mesh axis, when the product of the
    named mesh axes' sizes does not divide it, or when one of those mesh axes already shards
    an earlier dimension. Mesh axes of size 1 are dropped (same placement, simpler spec).
    """
    if names is None:
        return PartitionSpec()
    if len(names) != len(shape):
        raise ValueError(f"names {tuple(names)} must have one entry per dim of shape {tuple(shape)}")
    table, used, out = dict(rules), set(), []
    for dim, name in zip(shape, names):
        axes = tuple(a for a in _axes(table.get(name) if name is not None else None) if mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or dim % size or used & set(axes):
            out.append(None)
        else:
            used |= set(axes)
            out.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def _var_sharding(v, mesh: Mesh, rules):
    if isinstance(v, nnx.Variable):
        value = v.get_value()
        if not hasattr(value, "shape"):
            return v.replace(None)
        names = v.get_metadata().get("out_sharding")
        return v.replace(NamedSharding(mesh, spec_for(value.shape, names, mesh, rules)))
    return NamedSharding(mesh, PartitionSpec()) if hasattr(v, "shape") else None


def param_shardings(model_or_state, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """`NamedSharding` for every array of a module (`nnx.state(model)` is taken) or a state.

    The result has the state's structure (each Variable holding its sharding), so it serves
    directly as `jax.jit` in/out shardings and for `jax.device_put`. Variables with an
    `out_sharding` metadata (parameters from `param(...)`, and the optimizer's moments, which
    copy it) follow `rules` via `spec_for`; others (step counters, RNG state) are replicated.
    """
    state = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state
    return jax.tree.map(lambda v: _var_sharding(v, mesh, rules), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model, mesh: Mesh, optimizer=None, rules=LOGICAL_AXIS_RULES):
    """Places the model's (and the optimizer's) state on `mesh` in place; returns the model."""
    for node in (model,) if optimizer is None else (model, optimizer):
        state = nnx.state(node)
        nnx.update(node, jax.device_put(state, param_shardings(state, mesh, rules)))
    return model


def batch_spec(mesh: Mesh, ndim: int = 2, rules=None) -> PartitionSpec:
    """Batch dim over the `batch` rule's mesh axes (data, fsdp), the sequence dim (if `ndim`
    >= 2) over the `seq` rule's (context), each where > 1 (`rules` default `axis_rules()`);
    other dims replicated. Batch size must divide by data * fsdp."""
    batch = mesh_axes("batch", mesh, rules) or None
    if batch is not None and len(batch) == 1:
        batch = batch[0]
    seq = mesh_axes("seq", mesh, rules) or None
    if seq is not None and len(seq) == 1:
        seq = seq[0]
    return PartitionSpec(*((batch, seq) + (None,) * (ndim - 2))[:ndim])


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=None) -> NamedSharding:
    """`NamedSharding` for `[batch, seq, ...]` inputs (see `batch_spec`)."""
    return NamedSharding(mesh, batch_spec(mesh, ndim, rules))
