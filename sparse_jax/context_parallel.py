"""Context parallelism: the sequence split over the mesh axis `context`, each attention
variant exchanging only the KV it needs, written with `jax.shard_map` and `jax.lax`
collectives.

Shard i of `context` (n shards) holds positions of chunk i (`T / n` consecutive tokens of
the call's query and key axis). Per variant (training / prefill calls, keys = queries):

* **full causal** (`local_attention`, window None): `all_gather` of K, V and their
  positions over `context`; each shard attends with its own queries (the `flash` op with
  explicit positions). Each shard receives the whole KV (the bytes a ring would move, but
  held at once; a `ppermute` ring with `merge_attention` is not implemented).
* **sliding window** (`local_attention` with `window`): a halo of the `window - 1` tokens
  before the chunk, sent by `ppermute` from the previous shard(s) (several hops when the
  window is longer than a chunk), never the whole KV. Keys are the halo + the own chunk.
* **NSA** (`nsa_branches`): the compressed entries (few: `T / d`; padded with empty
  entries to a multiple of the context size) are split over `context` and `all_gather`ed
  for the cmp branch and the selection; the win branch by halo; the slc branch
  `all_gather`s all raw slc keys and values. Why all of them: which blocks a query
  selects is data-dependent and differs per token and per KV head, and collectives need
  static shapes, so an exchange of "only the selected blocks" would be a dense all-to-all
  sized for the worst case (every block) anyway.
* **HySparse** (`hysparse_full_attention`, `selected_block_attention`): the full layer as
  full causal (`all_gather`; its block scores and top-k per token then match the unsharded
  ones); each sparse layer `all_gather`s the full layer's KV (all of it, same reason as
  NSA's slc branch) and attends with its local block lists; its SWA branch by halo.

Each function has the signature of the op it replaces and calls that op unchanged when
context parallelism is off (`active()` is False: no mesh set with `jax.set_mesh`, its
`context` axis of size 1, or already inside a shard_map over it) or not applicable
(decode calls, T not divisible by the context size, keys of another length than the
queries, sinks, NSA "query_block" selection whose query blocks would straddle shards): then XLA's
SPMD partitioner gathers what it needs by itself, as before. Layers call these functions
(`ops.attention.local_attention` routes here itself); `train.make_sharded_train_step`
traces its step under `jax.set_mesh(mesh)`, which switches them on.

Assumptions: positions of a row are consecutive in array order (left/right padding -1
anywhere else): the halo is "the previous `window - 1` array slots". NSA's slc keys and
HySparse's shared keys are position-indexed (slot s = position s), so the gathered array
is the unsharded one. Batch is split over (`data`, `fsdp`) and heads over `tensor` when
they divide; otherwise those dims are replicated inside the shard_map.

Multi-host: call `jax.distributed.initialize()` (coordinator address, process count and
id from the environment or arguments, auto-detected on TPU pods / SLURM) in every process
before any other jax call; then `jax.devices()` spans all hosts, `sharding.make_mesh(...)`
builds the global mesh from it (put `context` on devices of one host / one NVLink domain
for the ppermute halos), and each process feeds its addressable shards of the batch
(`jax.make_array_from_process_local_data(batch_sharding(mesh), local_batch)`). Nothing here
is host-specific: the same shard_map program runs on every process.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, PartitionSpec as Spec

from sparse_jax import patterns as P
from sparse_jax.ops import attention as attn_ops
from sparse_jax.ops import hysparse as hs_ops
from sparse_jax.ops import nsa as nsa_ops

CONTEXT = "context"


def context_size() -> int:
    """Size of the `context` axis of the mesh set by `jax.set_mesh` (1 without one, or
    inside a shard_map that already made the axis manual)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or CONTEXT not in mesh.axis_names:
        return 1
    if mesh.axis_types[mesh.axis_names.index(CONTEXT)] == AxisType.Manual:
        return 1
    return mesh.shape[CONTEXT]


def active() -> bool:
    """Whether the functions here split attention over `context` (context size > 1)."""
    return context_size() > 1


def _applies(*seq_lens: int) -> bool:
    n = context_size()
    return n > 1 and all(t % n == 0 for t in seq_lens) and len(set(seq_lens)) == 1


def _batch_axes(batch: int):
    mesh = jax.sharding.get_abstract_mesh()
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or batch % math.prod(mesh.shape[a] for a in axes):
        return None
    return axes[0] if len(axes) == 1 else axes


def _head_axis(*head_counts: int):
    mesh = jax.sharding.get_abstract_mesh()
    if "tensor" not in mesh.axis_names or mesh.shape["tensor"] == 1:
        return None
    return "tensor" if all(h % mesh.shape["tensor"] == 0 for h in head_counts) else None


def _gather(*xs):
    """All-gather `[B, C, ...]` chunks over `context` into `[B, n*C, ...]` (chunk order)."""
    return [lax.all_gather(x, CONTEXT, axis=1, tiled=True) for x in xs]


def _halo(xs, positions, halo: int):
    """The `halo` array slots before this shard's chunk, from the previous shard(s).

    xs: arrays `[B, C, ...]`, positions `[B, C]` of this shard. Returns the arrays with
    the halo prepended (`[B, h + C, ...]`, h = min(halo, (n-1)*C)) and their positions,
    -1 where no shard precedes (shard 0, or before it). Only `ppermute`s: hop j sends the
    last min(C, halo - (j-1)*C) slots of shard i to shard i + j.
    """
    n, chunk = jax.sharding.get_abstract_mesh().shape[CONTEXT], positions.shape[1]   # manual axis
    hops = min(-(-halo // chunk), n - 1) if halo > 0 else 0
    pre_x, pre_p = [[] for _ in xs], []
    for hop in range(hops, 0, -1):
        take = min(chunk, halo - (hop - 1) * chunk)
        perm = [(j, j + hop) for j in range(n - hop)]
        send = lambda a: lax.ppermute(a[:, chunk - take:], CONTEXT, perm)
        for acc, x in zip(pre_x, xs):
            acc.append(send(x))
        pre_p.append(send(positions + 1) - 1)           # shards receiving nothing get 0 -> -1
    cat = lambda parts, x: jnp.concatenate(parts + [x], axis=1)
    return [cat(acc, x) for acc, x in zip(pre_x, xs)], cat(pre_p, positions)


def _shard_map(body, args, specs, out_specs):
    """shard_map of `body(*args)` over the active mesh; `None` args are passed through as
    None (no spec needed)."""
    present = [i for i, a in enumerate(args) if a is not None]

    def inner(*xs):
        full = [None] * len(args)
        for i, x in zip(present, xs):
            full[i] = x
        return body(*full)

    return jax.shard_map(inner, in_specs=tuple(specs[i] for i in present),
                         out_specs=out_specs)(*(args[i] for i in present))


# ----------------------------------------------------------------------------- full / SWA


def local_attention(q, k, v, q_positions, kv_positions, *, window: int | None = None,
                    num_sinks: int = 0, decoding: bool = False, sink_logits=None, softcap=None,
                    impl: str = "auto"):
    """`ops.attention.local_attention` with the sequence over `context`: full causal by
    `all_gather` of K/V, a window by a `ppermute` halo of `window - 1` slots.

    q `[B, T, H, D]`, k/v `[B, T, Hkv, D]`, positions `[B, T]`; returns `[B, T, H, Dv]`.
    """
    mask = P.causal_window(window, num_sinks)
    if decoding or num_sinks or not _applies(q.shape[1], k.shape[1]):
        return attn_ops.masked_attention(q, k, v, q_positions, kv_positions, mask=mask, decoding=decoding,
                                         sink_logits=sink_logits, softcap=softcap, impl=impl)
    b, h = _batch_axes(q.shape[0]), _head_axis(q.shape[2], k.shape[2])

    def body(q, k, v, qp, kp, sinks):
        if window is None:
            k, v, kp = _gather(k, v, kp)
        else:
            (k, v), kp = _halo([k, v], kp, window - 1)
        return attn_ops.masked_attention(q, k, v, qp, kp, mask=mask, sink_logits=sinks,
                                         softcap=softcap, impl=impl)

    tok, pos = Spec(b, CONTEXT, h, None), Spec(b, CONTEXT)
    return _shard_map(body, (q, k, v, q_positions, kv_positions, sink_logits),
                      (tok, tok, tok, pos, pos, Spec(h)), tok)


# ----------------------------------------------------------------------------- NSA


def nsa_branches(q, q_positions, *, k_cmp, v_cmp, cmp_positions, k_slc, v_slc, slc_positions,
                 k_win, v_win, win_positions, cfg: nsa_ops.NSAConfig, impl: str = "auto",
                 interpret=False) -> nsa_ops.NSABranches:
    """`ops.nsa.nsa_branches` with the sequence over `context` (module docstring): the
    compressed entries and the slc keys all-gathered, the win keys by halo."""
    kw = dict(k_cmp=k_cmp, v_cmp=v_cmp, cmp_positions=cmp_positions, k_slc=k_slc, v_slc=v_slc,
              slc_positions=slc_positions, k_win=k_win, v_win=v_win, win_positions=win_positions,
              cfg=cfg, impl=impl, interpret=interpret)
    n = context_size()
    if (not _applies(q.shape[1], k_slc.shape[1], k_win.shape[1])
            or (cfg.selection == "query_block" and (q.shape[1] // n) % cfg.query_block)):
        return nsa_ops.nsa_branches(q, q_positions, **kw)
    b, h = _batch_axes(q.shape[0]), _head_axis(q.shape[2], k_slc.shape[2])
    n_cmp = k_cmp.shape[1]
    pad = -n_cmp % n                              # empty entries (position -1), cut after the gather
    k_cmp, v_cmp = (jnp.pad(a, [(0, 0), (0, pad), (0, 0), (0, 0)]) for a in (k_cmp, v_cmp))
    cmp_positions = jnp.pad(cmp_positions, [(0, 0), (0, pad)], constant_values=-1)

    def body(q, qp, kc, vc, cp, ks, vs, sp, kw_, vw, wp):
        kc, vc, cp = (a[:, :n_cmp] for a in _gather(kc, vc, cp))
        ks, vs, sp = _gather(ks, vs, sp)
        (kw_, vw), wp = _halo([kw_, vw], wp, cfg.window - 1)
        return nsa_ops.nsa_branches(q, qp, k_cmp=kc, v_cmp=vc, cmp_positions=cp, k_slc=ks, v_slc=vs,
                                    slc_positions=sp, k_win=kw_, v_win=vw, win_positions=wp, cfg=cfg,
                                    impl=impl, interpret=interpret)

    tok, pos = Spec(b, CONTEXT, h, None), Spec(b, CONTEXT)
    out = nsa_ops.NSABranches(tok, tok, tok, tok, Spec(b, h, CONTEXT, None))
    return _shard_map(body, (q, q_positions, k_cmp, v_cmp, cmp_positions, k_slc, v_slc, slc_positions,
                             k_win, v_win, win_positions), (tok, pos) + (tok, tok, pos) * 3, out)


# ----------------------------------------------------------------------------- HySparse


def hysparse_full_attention(q, k, v, q_positions, kv_positions, *, block_size: int, top_k_blocks: int,
                            sink_logits=None, softcap=None, impl: str = "auto", interpret: bool = False):
    """`ops.hysparse.hysparse_full_attention` with the sequence over `context`: K/V
    all-gathered, so block scores and the per-token top-k equal the unsharded ones.
    Returns `(out [B, T, H, Dv], block_indices [B, Hkv, T, k])`."""
    kw = dict(block_size=block_size, top_k_blocks=top_k_blocks, softcap=softcap, impl=impl,
              interpret=interpret)
    if not _applies(q.shape[1], k.shape[1]):
        return hs_ops.hysparse_full_attention(q, k, v, q_positions, kv_positions,
                                              sink_logits=sink_logits, **kw)
    b, h = _batch_axes(q.shape[0]), _head_axis(q.shape[2], k.shape[2])

    def body(q, k, v, qp, kp, sinks):
        k, v, kp = _gather(k, v, kp)
        return hs_ops.hysparse_full_attention(q, k, v, qp, kp, sink_logits=sinks, **kw)

    tok, pos = Spec(b, CONTEXT, h, None), Spec(b, CONTEXT)
    return _shard_map(body, (q, k, v, q_positions, kv_positions, sink_logits),
                      (tok, tok, tok, pos, pos, Spec(h)), (tok, Spec(b, h, CONTEXT, None)))


def selected_block_attention(q, k, v, q_positions, kv_positions, block_indices, *, block_size: int,
                             query_block: int = 1, sink_logits=None, softcap=None,
                             return_lse: bool = False, impl: str = "auto", interpret: bool = False):
    """`ops.hysparse.selected_block_attention` with the sequence over `context`: the
    shared K/V all-gathered, each shard's queries over their own block lists
    `[B, Hkv, T, k]`. Returns `[B, T, H, Dv]`."""
    kw = dict(block_size=block_size, query_block=query_block, softcap=softcap, impl=impl,
              interpret=interpret)
    n = context_size()
    if return_lse or not _applies(q.shape[1], k.shape[1]) or (q.shape[1] // n) % query_block:
        return hs_ops.selected_block_attention(q, k, v, q_positions, kv_positions, block_indices,
                                               sink_logits=sink_logits, return_lse=return_lse, **kw)
    b, h = _batch_axes(q.shape[0]), _head_axis(q.shape[2], k.shape[2])

    def body(q, k, v, qp, kp, idx, sinks):
        k, v, kp = _gather(k, v, kp)
        return hs_ops.selected_block_attention(q, k, v, qp, kp, idx, sink_logits=sinks, **kw)

    tok, pos = Spec(b, CONTEXT, h, None), Spec(b, CONTEXT)
    return _shard_map(body, (q, k, v, q_positions, kv_positions, block_indices, sink_logits),
                      (tok, tok, tok, pos, pos, Spec(b, h, CONTEXT, None), Spec(h)), tok)
