"""Block selection: the one home of top-k over KV blocks and of what follows from it.

Every method that attends to a data-dependent subset of KV blocks goes through these
functions: NSA's slc branch (arXiv 2502.11089), HySparse's sparse layers, MoBA (arXiv
2502.13189), Quest's pages (arXiv 2406.10774), DSA's token selection (blocks of one token,
arXiv 2512.02556) and the sparse prefill estimators (MInference, arXiv 2407.02490).

One layout (DESIGN's token-sparse metadata): a selection is `block_indices [B, T, Hkv, k]`
int32, per batch row, query token and KV head the indices of its KV blocks (block j covers
KV slots `j*block_size .. (j+1)*block_size - 1`), entries distinct, -1 for padding (always
after the valid entries). Scores come in the kernels' layout `[B, Hkv, T, nK]` (flash's
`block_scores`, the `compressed` op's group probabilities) and leave in this one.

* `select_top_k`: top-k among candidate blocks, forced blocks first. The ties rule is
  `lax.top_k`'s: the lower block index wins. Order: forced blocks (ascending), then by
  descending score; `ascending` gives the canonical set order (ascending, -1 last).
* `selected_mask`: a selection as a bool `[B, T, Hkv, nK]` (dense references, DSA's mask).
* `union_metadata`: the union of the selections of `query_block` consecutive queries as
  `block_sparse` metadata (each query then attends a superset of its own selection; the
  `block_sparse` kernel runs at full tile width), blocks flagged full where no element
  mask is needed.
* `block_lists`: the union over all queries of a call, compacted from -1 padding into the
  `decode` op's form `(indices [B, Hkv, w], counts [B, Hkv])` (ascending, then padding
  repeating the last valid entry, in range and ignored).
* `selected_block_attention`: causal attention of each query over its selection, exact
  through `token_sparse` (`query_block = 1`) or over the union through `block_sparse`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse import block_sparse_attention
from pallas_kernels.block_sparse.metadata import BlockSparseMetadata
from pallas_kernels.token_sparse import token_sparse_attention
from sparse_jax import context_parallel as cp
from sparse_jax import patterns as P
from sparse_jax.patterns.metadata import compact_blocks

_BIG = jnp.iinfo(jnp.int32).max


def _check_selection(block_indices, name="block_indices"):
    if jnp.ndim(block_indices) != 4 or not jnp.issubdtype(jnp.asarray(block_indices).dtype, jnp.integer):
        raise ValueError(f"{name} must be int [B, T, Hkv, k], got {jnp.asarray(block_indices).dtype} "
                         f"shape {jnp.shape(block_indices)}")


def select_top_k(scores, candidates, k: int, forced=None):
    """Top-`k` blocks per (batch, kv head, query) among `candidates`, `forced` ones first.

    Args:
      scores: float `[B, Hkv, T, nK]` (higher = better); not differentiated.
      candidates: bool, broadcastable to `scores`: the blocks that may be selected.
      k: int >= 1, blocks per query (the result has `min(k, nK)` slots).
      forced: optional bool, broadcastable to `scores`: candidates taken whatever their
        score (within `k`, lowest indices first).
    Returns:
      `block_indices [B, T, Hkv, min(k, nK)]` int32 in `lax.top_k`'s order (forced blocks
      ascending, then by descending score, ties to the lower index), -1 after the last
      selected block (fewer candidates than `k`, or none: a padded query).
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if jnp.ndim(scores) != 4:
        raise ValueError(f"scores must be [B, Hkv, T, nK], got shape {jnp.shape(scores)}")
    s = jnp.where(candidates, jax.lax.stop_gradient(scores).astype(jnp.float32), -jnp.inf)
    if forced is not None:
        s = jnp.where(forced & candidates, jnp.inf, s)
    vals, idx = jax.lax.top_k(s, min(k, s.shape[-1]))
    idx = jnp.where(vals > -jnp.inf, idx, -1).astype(jnp.int32)
    return jnp.swapaxes(idx, 1, 2)


def ascending(block_indices):
    """The same selection in ascending block order, -1 padding last (`[..., k]`)."""
    idx = jnp.sort(jnp.where(block_indices >= 0, block_indices, _BIG), axis=-1)
    return jnp.where(idx == _BIG, -1, idx).astype(jnp.int32)


def selected_mask(block_indices, num_blocks: int):
    """`block_indices [B, T, Hkv, k]` (-1 padding) -> bool `[B, T, Hkv, num_blocks]`, True
    where a block is selected (with block size 1: DSA's token mask)."""
    _check_selection(block_indices)
    b, t, hkv, _ = block_indices.shape
    slot = jnp.where(block_indices >= 0, block_indices, num_blocks)
    rows = jnp.arange(b)[:, None, None, None]
    toks = jnp.arange(t)[None, :, None, None]
    heads = jnp.arange(hkv)[None, None, :, None]
    return jnp.zeros((b, t, hkv, num_blocks + 1), bool).at[rows, toks, heads, slot].set(True)[..., :num_blocks]


def _query_block_union(block_indices, query_block: int, num_blocks: int):
    """bool `[B, Hkv, nQ, num_blocks]`: blocks selected by any query of each query block
    (scattered straight into the query-block grid: never a `[B, T, Hkv, nK]` mask)."""
    b, t, hkv, _ = block_indices.shape
    nq = -(-t // query_block)
    rows = jnp.arange(b)[:, None, None, None]
    heads = jnp.arange(hkv)[None, None, :, None]
    qblock = (jnp.arange(t) // query_block)[None, :, None, None]
    slot = jnp.where(block_indices >= 0, block_indices, num_blocks)
    grid = jnp.zeros((b, hkv, nq, num_blocks + 1), bool)
    return grid.at[rows, heads, qblock, slot].set(True)[..., :num_blocks]


def _block_extent(positions, block_size: int):
    """Per block of `positions [B, T]`: (all slots valid `[B, n]`, min, max position)."""
    b, t = positions.shape
    n = -(-t // block_size)
    pos = jnp.pad(positions, ((0, 0), (0, n * block_size - t)), constant_values=-1).reshape(b, n, block_size)
    return (pos >= 0).all(-1), pos.min(-1), pos.max(-1)


def union_metadata(block_indices, q_positions, kv_positions, *, block_size: int,
                   query_block: int) -> BlockSparseMetadata:
    """Per-token selection -> causal `block_sparse` metadata of `block_q = query_block`.

    The list of each query block is the union of its queries' selections (each query then
    sees a superset of its own, still causal; `query_block = 1` is the exact selection as
    metadata). A block is flagged full (the kernel skips the causal predicate) when every
    query of the query block and every key of the KV block is valid and the block's last
    key is at or before the query block's first query.

    Args:
      block_indices: `[B, T, Hkv, k]` (-1 padding); q_positions `[B, T]`,
        kv_positions `[B, Tk]` (-1 = padding / empty slot); block_size: KV block size.
    Returns:
      `BlockSparseMetadata` `[B, Hkv, ceil(T / query_block), min(query_block * k, nK)]`.
    """
    _check_selection(block_indices)
    if not isinstance(query_block, int) or query_block < 1:
        raise ValueError(f"query_block must be an int >= 1, got {query_block!r}")
    _, t, _, k = block_indices.shape
    nk = -(-kv_positions.shape[1] // block_size)
    present = _query_block_union(block_indices, query_block, nk)
    q_ok, q_first, _ = _block_extent(q_positions, query_block)                     # [B, nQ]
    kv_ok, _, kv_last = _block_extent(kv_positions, block_size)                     # [B, nK]
    full = q_ok[:, :, None] & kv_ok[:, None, :] & (kv_last[:, None, :] <= q_first[:, :, None])
    indices, counts, flags = compact_blocks(present, present & full[:, None], min(query_block * k, nk))
    return BlockSparseMetadata(indices, counts, flags, block_q=query_block, block_kv=block_size)


def block_lists(block_indices, num_blocks: int):
    """Union over all queries of a call, in the `decode` op's selected-block form.

    `block_indices [B, T, Hkv, k]` (-1 padding) -> `(indices [B, Hkv, min(T*k, num_blocks)],
    counts [B, Hkv])` int32: the first `counts` entries are the distinct selected blocks,
    ascending; the rest repeat the last of them (0 where none): in range, ignored.
    """
    _check_selection(block_indices)
    t, k = block_indices.shape[1], block_indices.shape[3]
    present = _query_block_union(block_indices, t, num_blocks)[:, :, 0]            # [B, Hkv, nK]
    indices, counts, _ = compact_blocks(present, present, min(t * k, num_blocks))
    return indices, counts


def sorted_block_lists(indices):
    """`block_lists` of one query's lists that are already distinct and ascending, -1
    padded last (`top_k_set`'s output): `indices [B, Hkv, k]` -> the same `(indices, counts)`
    without the union grid and its sort over every block (at Quest's 8192 pages a sort
    of each row's 8192 flags for 512 entries)."""
    counts = (indices >= 0).sum(-1).astype(jnp.int32)
    last = jnp.take_along_axis(indices, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    pad = jnp.where(counts[..., None] > 0, last, 0)
    return jnp.where(indices >= 0, indices, pad).astype(jnp.int32), counts


def selected_block_attention(q, k, v, q_positions, kv_positions, block_indices, *, block_size: int,
                             query_block: int = 1, sink_logits=None, softcap=None, scale=None,
                             return_lse: bool = False, impl: str = "auto", interpret=False):
    """Causal attention of each query token over its selected KV blocks.

    q `[B, Tq, H, D]`, k/v `[B, Tk, Hkv, D/Dv]` (block j = slots `j*block_size ..`),
    positions `[B, Tq]` / `[B, Tk]`, block_indices `[B, Tq, Hkv, n]` (distinct per row, -1
    padding). The one rule: `query_block = 1` (default): the exact per-token selection
    through `token_sparse`; `query_block > 1`: the union over each query block
    (`union_metadata`) through `block_sparse` (its Triton kernel needs `query_block >= 16`).
    Returns `[B, Tq, H, Dv]`, or `AttentionOutput(out, lse [B, H, Tq])` with `return_lse`.
    Under a mesh with a sequence axis > 1 (no `return_lse`, whole query blocks per shard)
    it runs split over it, K/V gathered (`sparse_jax.context_parallel`).
    """
    if (not return_lse and cp.applies(q.shape[1], k.shape[1])
            and not (q.shape[1] // cp.context_size()) % query_block):
        kv = dict(gather=True)
        return cp.attention(selected_block_attention, cp.TOKENS, q=cp.Split(q), k=cp.Split(k, **kv),
                            v=cp.Split(v, **kv), q_positions=cp.Split(q_positions, cp.POSITIONS),
                            kv_positions=cp.Split(kv_positions, cp.POSITIONS, **kv),
                            block_indices=cp.Split(block_indices, cp.TOKENS),
                            sink_logits=cp.Split(sink_logits, cp.HEADS), block_size=block_size,
                            query_block=query_block, softcap=softcap, scale=scale, impl=impl,
                            interpret=interpret)
    if query_block == 1:
        return token_sparse_attention(q, k, v, block_indices, block_size=block_size,
                                      q_positions=q_positions, kv_positions=kv_positions, causal=True,
                                      sink_logits=sink_logits, softcap=softcap, scale=scale,
                                      return_lse=return_lse, impl=impl, interpret=interpret)
    meta = union_metadata(block_indices, q_positions, kv_positions, block_size=block_size,
                          query_block=query_block)
    return block_sparse_attention(q, k, v, meta, mask_fn=P.Causal(), q_positions=q_positions,
                                  kv_positions=kv_positions, sink_logits=sink_logits, softcap=softcap,
                                  scale=scale, return_lse=return_lse, impl=impl, interpret=interpret)


def selected_block_dense_mask(q_positions, kv_positions, block_indices, block_size: int):
    """Dense reference mask `[B, Hkv, Tq, Tk]`: the key's block is selected and the key is
    causally visible (valid query, valid key at or before it)."""
    tk = kv_positions.shape[1]
    nk = -(-tk // block_size)
    sel = jnp.moveaxis(selected_mask(block_indices, nk), 2, 1)                    # [B, Hkv, Tq, nK]
    listed = jnp.repeat(sel, block_size, axis=-1)[..., :tk]
    qp, kp = q_positions[:, None, :, None], kv_positions[:, None, None, :]
    return listed & (qp >= 0) & (kp >= 0) & (kp <= qp)
