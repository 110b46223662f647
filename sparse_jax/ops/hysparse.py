"""HySparse (Xiaomi, 2026) math as pure functions over projected q/k/v.

It selects, per query *token*, a set of KV blocks and attends to them through the
`token_sparse` op (per-query block lists, Triton on GPU): the per-token selection is
exact, no union over a query block. With `query_block >= 2` the union over each query block
goes through `block_sparse` instead (the Triton kernel needs `query_block >= 16`).

Blocks are by *array index* of the KV: block j is `k[:, j*bs:(j+1)*bs]`. The layers keep
their KV in position-indexed slots (a `FullKVCache`, also in training), so block j always
holds positions `j*bs .. (j+1)*bs - 1` and prefill and decode pick the same blocks.

* HySparse full layer: `hysparse_full_attention` runs causal attention through `flash`
  with the block-max score output (Alg. 1: `S[t, j] = max_{i in block j} p[t, i]`, max over
  each GQA group) and `select_top_blocks` takes the top-k blocks per (batch, kv-head,
  query token) among those the query can see (ties to the lower index).
* HySparse sparse layer: `selected_block_attention` attends to the shared KV over the
  shared block lists (causal inside the blocks), with the layer's own sink logits.
* MoBA (`sparse_jax.ops.moba`) reuses `select_top_blocks` and `selected_block_attention`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse import block_sparse_attention
from pallas_kernels.block_sparse.metadata import BlockSparseMetadata
from pallas_kernels.flash import flash_attention
from pallas_kernels.token_sparse import token_sparse_attention
from sparse_jax import context_parallel as cp
from sparse_jax import patterns as P


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HySparseShared:
    """What a HySparse full layer hands to the sparse layers after it.

    k `[B, Tk, Hkv, D]`, v `[B, Tk, Hkv, Dv]` (RoPE'd keys, position-indexed slots),
    kv_positions `[B, Tk]` (-1 empty), block_indices `[B, Hkv, Tq, k]` int32 (ascending,
    -1 = no block) for the queries of this call, block_size static.
    """

    k: jax.Array
    v: jax.Array
    kv_positions: jax.Array
    block_indices: jax.Array
    block_size: int = dataclasses.field(metadata=dict(static=True))


def block_min_positions(kv_positions, block_size: int):
    """Smallest valid position per KV block `[B, nK]` (a huge value for empty blocks)."""
    b, tk = kv_positions.shape
    nk = -(-tk // block_size)
    big = jnp.iinfo(jnp.int32).max
    pos = jnp.where(kv_positions >= 0, kv_positions, big)
    pos = jnp.pad(pos, ((0, 0), (0, nk * block_size - tk)), constant_values=big)
    return pos.reshape(b, nk, block_size).min(-1)


def select_top_blocks(scores, visible, top_k: int):
    """Top-`top_k` blocks per row among `visible`, ties to the lower index.

    scores `[..., nK]` float, visible `[..., nK]` bool -> indices `[..., min(top_k, nK)]`
    int32, ascending, -1 where fewer blocks are visible.
    """
    k = min(top_k, scores.shape[-1])
    s = jnp.where(visible, scores.astype(jnp.float32), -jnp.inf)
    vals, idx = jax.lax.top_k(s, k)                       # stable: lower index first on ties
    idx = jnp.where(jnp.isfinite(vals), idx, -1).astype(jnp.int32)
    big = jnp.iinfo(jnp.int32).max
    idx = jnp.sort(jnp.where(idx >= 0, idx, big), axis=-1)
    return jnp.where(idx == big, -1, idx)


def token_block_metadata(block_indices, block_size: int) -> BlockSparseMetadata:
    """Per-token block lists `[B, Hkv, Tq, k]` (ascending, -1 padding) -> `block_q=1`
    metadata; every block is partial (the causal predicate is evaluated). The same
    selection as `selected_block_attention(query_block=1)` in `block_sparse` form (XLA
    only: the Triton kernel needs >= 16 query rows); kept as a second reference in tests."""
    valid = block_indices >= 0
    counts = valid.sum(-1).astype(jnp.int32)
    last = jnp.take_along_axis(block_indices, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    idx = jnp.where(valid, block_indices, jnp.maximum(last, 0)).astype(jnp.int32)
    return BlockSparseMetadata(idx, counts, jnp.zeros(idx.shape, jnp.bool_), 1, block_size)


def hysparse_full_attention(q, k, v, q_positions, kv_positions, *, block_size: int, top_k_blocks: int,
                            sink_logits=None, softcap=None, impl: str = "auto", interpret: bool = False):
    """Causal attention plus the per-token top-k block selection.

    Returns `(out [B, Tq, H, Dv], block_indices [B, Hkv, Tq, k])`. Under a mesh with a
    sequence axis > 1 it runs split over it, K/V gathered (`sparse_jax.context_parallel`).
    """
    if cp.applies(q.shape[1], k.shape[1]):
        kv = dict(gather=True)
        return cp.attention(hysparse_full_attention, (cp.TOKENS, cp.HEAD_MAJOR), q=cp.Split(q),
                            k=cp.Split(k, **kv), v=cp.Split(v, **kv), q_positions=cp.Split(q_positions, cp.POSITIONS),
                            kv_positions=cp.Split(kv_positions, cp.POSITIONS, **kv),
                            sink_logits=cp.Split(sink_logits, cp.HEADS), block_size=block_size,
                            top_k_blocks=top_k_blocks, softcap=softcap, impl=impl, interpret=interpret)
    res = flash_attention(q, k, v, mask_fn=P.Causal(), q_positions=q_positions,
                          kv_positions=kv_positions, sink_logits=sink_logits, softcap=softcap,
                          block_score_size=block_size, block_score_reduce_gqa=True, impl=impl,
                          interpret=interpret)
    bmin = block_min_positions(kv_positions, block_size)                      # [B, nK]
    visible = (bmin[:, None, :] <= q_positions[:, :, None]) & (q_positions[:, :, None] >= 0)
    idx = select_top_blocks(res.block_scores, visible[:, None], top_k_blocks)  # [B, Hkv, Tq, k]
    return res.out, idx


def union_block_metadata(block_indices, block_size: int, query_block: int,
                         num_kv_blocks: int) -> BlockSparseMetadata:
    """Per-token block lists `[B, Hkv, Tq, k]` -> metadata of `block_q = query_block` whose
    list per query block is the union of its tokens' lists (kernel-friendly: each token
    then sees a superset of its own selection, still causal). Every block is partial."""
    b, hkv, tq, k = block_indices.shape
    nq = -(-tq // query_block)
    idx = jnp.pad(block_indices, ((0, 0), (0, 0), (0, nq * query_block - tq), (0, 0)), constant_values=-1)
    idx = idx.reshape(b, hkv, nq, query_block * k)
    present = (idx[..., None] == jnp.arange(num_kv_blocks)).any(-2)               # [B, Hkv, nQ, nK]
    max_blocks = min(num_kv_blocks, query_block * k)
    order = jnp.argsort(~present, axis=-1, stable=True)[..., :max_blocks].astype(jnp.int32)
    counts = present.sum(-1).astype(jnp.int32)
    last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    slot = jnp.arange(max_blocks)
    indices = jnp.where(slot < counts[..., None], order, last)
    indices = jnp.where(counts[..., None] > 0, indices, 0)
    return BlockSparseMetadata(indices, counts, jnp.zeros(indices.shape, jnp.bool_), query_block, block_size)


def selected_block_attention(q, k, v, q_positions, kv_positions, block_indices, *, block_size: int,
                             query_block: int = 1, sink_logits=None, softcap=None,
                             return_lse: bool = False, impl: str = "auto", interpret: bool = False):
    """Causal attention of each query token over its listed KV blocks.

    q `[B, Tq, H, D]`, k/v `[B, Tk, Hkv, D/Dv]` (position-indexed slots), block_indices
    `[B, Hkv, Tq, k]` (distinct per row, -1 padding). The one rule:
    `query_block = 1` (default): exact per-token selection through `token_sparse`
    (block_size = the selection block; the Triton kernel on GPU); `query_block > 1`: the
    union over each query block through `block_sparse` (its Triton kernel needs
    `query_block >= 16`). Returns `[B, Tq, H, Dv]`, or `AttentionOutput(out, lse [B, H, Tq])`
    with `return_lse`. Under a mesh with a sequence axis > 1 (no `return_lse`) it runs
    split over it, K/V gathered (`sparse_jax.context_parallel`).
    """
    if (not return_lse and cp.applies(q.shape[1], k.shape[1])
            and not (q.shape[1] // cp.context_size()) % query_block):
        kv = dict(gather=True)
        return cp.attention(selected_block_attention, cp.TOKENS, q=cp.Split(q), k=cp.Split(k, **kv),
                            v=cp.Split(v, **kv), q_positions=cp.Split(q_positions, cp.POSITIONS),
                            kv_positions=cp.Split(kv_positions, cp.POSITIONS, **kv),
                            block_indices=cp.Split(block_indices, cp.HEAD_MAJOR),
                            sink_logits=cp.Split(sink_logits, cp.HEADS), block_size=block_size,
                            query_block=query_block, softcap=softcap, impl=impl, interpret=interpret)
    if query_block == 1:
        return token_sparse_attention(q, k, v, jnp.swapaxes(block_indices, 1, 2), block_size=block_size,
                                      q_positions=q_positions, kv_positions=kv_positions, causal=True,
                                      sink_logits=sink_logits, softcap=softcap, return_lse=return_lse,
                                      impl=impl, interpret=interpret)
    meta = union_block_metadata(block_indices, block_size, query_block, -(-k.shape[1] // block_size))
    return block_sparse_attention(q, k, v, meta, mask_fn=P.Causal(), q_positions=q_positions,
                                  kv_positions=kv_positions, sink_logits=sink_logits,
                                  softcap=softcap, return_lse=return_lse, impl=impl,
                                  interpret=interpret)


def selected_block_mask(q_positions, kv_positions, block_indices, block_size: int):
    """Dense reference mask `[B, Hkv, Tq, Tk]`: key in a listed block and causal."""
    tk = kv_positions.shape[1]
    kv_block = jnp.arange(tk) // block_size
    listed = (block_indices[..., None] == kv_block).any(-2)                   # [B, Hkv, Tq, Tk]
    causal = ((kv_positions[:, None, :] <= q_positions[:, :, None]) & (kv_positions[:, None, :] >= 0)
              & (q_positions[:, :, None] >= 0))
    return listed & causal[:, None]
