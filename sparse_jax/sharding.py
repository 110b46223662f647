"""Logical axis names and the one rule table that maps them onto a device mesh.

Every parameter is created through `param(...)` with logical axis names (MaxText style);
`LOGICAL_AXIS_RULES` maps them onto the mesh axes (`data`, `fsdp`, `tensor`, `context`).
Layers never mention mesh axes, so sharding needs no change to them.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

MESH_AXES = ("data", "fsdp", "tensor", "context")

# logical axis -> mesh axis (None: replicated)
LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("seq", "context"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
)


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
