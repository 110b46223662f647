"""Context parallelism: the sequence split over the mesh axis of the `seq` logical axis
(`sparse_jax.sharding`'s rule table: `context`), each attention variant exchanging only the
KV it needs, written with `jax.shard_map` and `jax.lax` collectives.

One entry: `attention(op, out_axes, **args)`. The attention ops (`ops.attention.
local_attention`, `ops.nsa.nsa_branches`, `ops.hysparse.hysparse_full_attention` and
`ops.selection.selected_block_attention`) call it themselves when `applies(...)` (a mesh set with
`jax.set_mesh` whose sequence axis is > 1, training / prefill shapes); they pass
themselves as `op`, which inside the shard_map runs its plain path (the axis is manual
there, so `active()` is False). Layers only call ops. This module imports no op (no
import cycle: ops -> context_parallel -> sharding).

Each array argument is a `Split(value, axes, gather=, halo=)`: its logical axis names
(`TOKENS`, `POSITIONS`, `HEADS`, `HEAD_MAJOR`) give its in-shard_map spec through the rule
table (`batch`, `heads`, `seq`), and its exchange what each shard sees of the sequence:

* own chunk (default): shard i of n holds chunk i (`T / n` consecutive tokens);
* `gather=True`: the whole sequence, by `all_gather` (an argument whose length does not
  divide n, e.g. NSA's compressed entries, is padded with empty entries, position -1, and
  cut after the gather);
* `halo=h`: the `h` array slots before the chunk, sent by `ppermute` from the previous
  shard(s) (several hops when `h` is longer than a chunk), never the whole KV; -1
  positions where no shard precedes.

Per variant (training / prefill calls, keys = queries), what the ops ask for:

* **full causal** (`local_attention`, window None): K, V and their positions gathered;
  each shard attends with its own queries. Each shard receives the whole KV (the bytes a
  ring would move, but held at once; a `ppermute` ring with `merge_attention` is not
  implemented).
* **sliding window** (`local_attention` with `window`): a halo of `window - 1`.
* **NSA** (`nsa_branches`): the compressed entries gathered for the cmp branch and the
  selection; the win branch by halo; the slc branch gathers all raw slc keys and values.
  Why all of them: which blocks a query selects is data-dependent and differs per token
  and per KV head, and collectives need static shapes, so an exchange of "only the
  selected blocks" would be a dense all-to-all sized for the worst case anyway.
* **HySparse** (`hysparse_full_attention`, `selected_block_attention`): the full layer as
  full causal (its block scores and top-k per token then match the unsharded ones); each
  sparse layer (and MoBA, which attends through `selected_block_attention`) gathers the
  shared KV (all of it, same reason as NSA's slc branch) and attends with its local block
  lists.

The ops keep their plain path when context parallelism is off (no mesh, a sequence axis
of size 1, or already inside a shard_map over it) or not applicable (decode calls, T not
divisible by the context size, keys of another length than the queries, sinks, NSA
"query_block" selection whose query blocks would straddle shards, `return_lse`): then
XLA's SPMD partitioner gathers what it needs by itself. `train.make_sharded_train_step`
traces its step under `jax.set_mesh(mesh)` and its `rules`, which switches this on.

Assumptions: positions of a row are consecutive in array order (left/right padding -1
anywhere else): the halo is "the previous `window - 1` array slots". NSA's slc keys and
HySparse's shared keys are position-indexed (slot s = position s), so the gathered array
is the unsharded one. Batch dims are split over the `batch` rule's axes and head dims over
the `heads` rule's when they divide (all head dims of a call: queries' and keys'); else
those dims are replicated inside the shard_map.

Multi-host: call `jax.distributed.initialize()` (coordinator address, process count and
id from the environment or arguments, auto-detected on TPU pods / SLURM) in every process
before any other jax call; then `jax.devices()` spans all hosts, `sharding.make_mesh(...)`
builds the global mesh from it (put `context` on devices of one host / one NVLink domain
for the ppermute halos), and each process feeds its addressable shards of the batch
(`jax.make_array_from_process_local_data(batch_sharding(mesh), local_batch)`). Nothing here
is host-specific: the same shard_map program runs on every process.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, PartitionSpec as Spec

from sparse_jax import sharding

# logical axis names of the arrays an attention op takes and returns
TOKENS = ("batch", "seq", "heads", None)          # q / k / v / outputs `[B, T, H, D]`
POSITIONS = ("batch", "seq")                      # `[B, T]`
HEADS = ("heads",)                                # sink logits `[H]`
HEAD_MAJOR = ("batch", "heads", "seq", None)      # head-major per-token arrays (NSA's p_cmp `[B, Hkv, T, N]`)


def seq_axis(mesh=None) -> str | None:
    """The mesh axis of the `seq` rule (`sharding.axis_rules()`) in `mesh` (default: the
    one set by `jax.set_mesh`), None when the rule names none of size > 1 there."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty:
        return None
    axes = sharding.mesh_axes("seq", mesh)
    if len(axes) > 1:
        raise ValueError(f"the seq rule must name one mesh axis for context parallelism, got {axes}")
    return axes[0] if axes else None


def context_size() -> int:
    """Size of the sequence axis of the mesh set by `jax.set_mesh` (1 without one, or
    inside a shard_map that already made the axis manual)."""
    mesh = jax.sharding.get_abstract_mesh()
    axis = seq_axis(mesh)
    if axis is None or mesh.axis_types[mesh.axis_names.index(axis)] == AxisType.Manual:
        return 1
    return mesh.shape[axis]


def active() -> bool:
    """Whether `attention` splits the sequence (context size > 1)."""
    return context_size() > 1


def applies(*seq_lens: int) -> bool:
    """Whether a call whose split (own chunk / halo) arguments have these sequence lengths
    can take `attention`: active, all lengths equal and divisible by the context size."""
    n = context_size()
    return n > 1 and all(t % n == 0 for t in seq_lens) and len(set(seq_lens)) == 1


@dataclasses.dataclass(frozen=True)
class Split:
    """One array argument of `attention`: `value` (None passes through) whose dims carry
    the logical names `axes`; `gather` / `halo` say what each shard sees of its sequence
    dim (module docstring)."""

    value: Any
    axes: tuple = TOKENS
    gather: bool = False
    halo: int = 0

    def __post_init__(self):
        if self.gather and self.halo:
            raise ValueError(f"a Split is gathered or gets a halo, not both (halo={self.halo})")
        if not isinstance(self.halo, int) or self.halo < 0:
            raise ValueError(f"halo must be an int >= 0, got {self.halo!r}")
        if self.value is not None and len(self.axes) != self.value.ndim:
            raise ValueError(f"axes {self.axes} must name each dim of shape {self.value.shape}")


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def _spec(axes, batch, heads, seq):
    table = {"batch": batch, "heads": heads, "seq": seq}
    return Spec(*(table.get(a) for a in axes))


def _mesh_dim(name: str, mesh, sizes, seq):
    """The mesh axes for logical `name` if their product divides every size, else None."""
    axes = tuple(a for a in sharding.mesh_axes(name, mesh) if a != seq)
    if not axes or any(n % math.prod(mesh.shape[a] for a in axes) for n in sizes):
        return None
    return axes[0] if len(axes) == 1 else axes


def _pad_seq(split: Split, n: int):
    """Pads a gathered argument's sequence dim to a multiple of `n` (position -1, zeros)."""
    dim = split.axes.index("seq")
    pad = -split.value.shape[dim] % n
    if not pad:
        return split.value
    widths = [(0, 0)] * split.value.ndim
    widths[dim] = (0, pad)
    return jnp.pad(split.value, widths, constant_values=-1 if split.axes == POSITIONS else 0)


def _halo(x, dim: int, halo: int, is_positions: bool, axis: str):
    """`x` with the `halo` array slots before this shard's chunk (from the previous
    shard(s)) prepended along `dim`; h = min(halo, (n-1)*C) slots, positions -1 where no
    shard precedes. Only `ppermute`s: hop j sends the last min(C, halo - (j-1)*C) slots of
    shard i to shard i + j."""
    n, chunk = jax.sharding.get_abstract_mesh().shape[axis], x.shape[dim]     # manual axis
    hops = min(-(-halo // chunk), n - 1) if halo > 0 else 0
    parts = []
    for hop in range(hops, 0, -1):
        take = min(chunk, halo - (hop - 1) * chunk)
        perm = [(j, j + hop) for j in range(n - hop)]
        tail = lax.slice_in_dim(x, chunk - take, chunk, axis=dim)
        if is_positions:                                   # shards receiving nothing get 0 -> -1
            parts.append(lax.ppermute(tail + 1, axis, perm) - 1)
        else:
            parts.append(lax.ppermute(tail, axis, perm))
    return jnp.concatenate(parts + [x], axis=dim)


def attention(op: Callable, out_axes, **args):
    """The one entry of context parallelism: `op(**args)` with the sequence split over the
    `seq` rule's mesh axis, every `Split` argument exchanged as it says (module docstring),
    other arguments passed unchanged (static: no arrays). `out_axes`: the logical axis
    names of each output array (a tuple like `TOKENS`, or a pytree of them shaped like
    `op`'s result). Callers check `applies(...)` first.
    """
    mesh = jax.sharding.get_abstract_mesh()
    axis, n = seq_axis(mesh), context_size()
    splits = {k: a for k, a in args.items() if isinstance(a, Split) and a.value is not None}
    static = {k: (None if isinstance(a, Split) else a) for k, a in args.items() if k not in splits}
    for k, a in static.items():
        if isinstance(a, jax.Array) and a.ndim:
            raise ValueError(f"argument {k!r} is an array {a.shape}: pass it as a Split")
    if n == 1:
        raise ValueError("context_parallel.attention needs an active sequence axis (check applies())")
    chunked = {k: a.value.shape[a.axes.index("seq")] for k, a in splits.items()
               if not a.gather and "seq" in a.axes}
    if not applies(*chunked.values()):
        raise ValueError(f"sequence lengths {chunked} must be equal and divide by the context size {n}")

    def sizes(name):
        return [a.value.shape[a.axes.index(name)] for a in splits.values() if name in a.axes]

    batch, heads = _mesh_dim("batch", mesh, sizes("batch"), axis), _mesh_dim("heads", mesh, sizes("heads"), axis)
    names = list(splits)
    values = [_pad_seq(splits[k], n) if splits[k].gather else splits[k].value for k in names]

    def body(*xs):
        kwargs = dict(static)
        for k, x in zip(names, xs):
            a = splits[k]
            if a.gather:
                dim = a.axes.index("seq")
                x = lax.slice_in_dim(lax.all_gather(x, axis, axis=dim, tiled=True), 0, a.value.shape[dim], axis=dim)
            elif a.halo:
                x = _halo(x, a.axes.index("seq"), a.halo, a.axes == POSITIONS, axis)
            kwargs[k] = x
        return op(**kwargs)

    in_specs = tuple(_spec(splits[k].axes, batch, heads, axis) for k in names)
    out_specs = jax.tree.map(lambda ax: _spec(ax, batch, heads, axis), out_axes, is_leaf=_is_axes)
    return jax.shard_map(body, in_specs=in_specs, out_specs=out_specs)(*values)
