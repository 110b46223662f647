"""What the `block_sparse` kernels read: the metadata normalised, and its transpose.

`BlockSparseMetadata` (DESIGN.md) lists, per (batch, kv-head, query block), the KV blocks
to visit and flags full ones. Before a kernel runs, `kernel_tables` (jnp, traceable, so
metadata may come from top-k selection inside `jit`) rewrites it into the order the
kernels want:

* per query block, the listed KV blocks in three runs: **full** ones (no mask at all),
  full ones that hold **padding** (negative positions, or the padding added to reach
  whole blocks: only padding is masked, not `mask_fn`), then **partial** ones (the
  element predicate); unused slots repeat the last valid index. Three counts
  `(end_full, end_padded, n_valid)` bound the runs, so a kernel runs three loops with a
  static masking mode each (like `flash`'s diagonal blocks) and no per-block branch.
  The online softmax does not care about the order.
* duplicate or out-of-range indices are dropped (as `block_sparse_reference` does).
* the **transpose** for the dK/dV kernel: per KV block, the query blocks that list it,
  ordered and counted the same way.

Both go through a dense `[B, Hm, nQ, nK]` class array (0 absent, 1 partial, 2 full
with padding, 3 full),
which is small (a few MB at 64K tokens with 128-blocks) next to the attention itself.
Splash attention's `MaskInfo` (jax.experimental.pallas.ops.tpu.splash_attention) and
FlexAttention's `BlockMask` (arXiv 2412.05496) keep the same forward/transposed pair.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.flash import autodiff, blocks


class Tables(NamedTuple):
    """int32 tables, flattened row-major for scalar loads in the kernels.

    kv_idx `[B, Hm, nQ, M]`, kv_cnt `[B, Hm, nQ, 3]` (end_full, end_padded, n_valid);
    q_idx `[B, Hm, nK, nQ]`, q_cnt `[B, Hm, nK, 3]` (None when no backward is needed).
    """

    kv_idx: jax.Array
    kv_cnt: jax.Array
    q_idx: jax.Array | None
    q_cnt: jax.Array | None


def _block_clean(pos, block: int):
    """`pos [B, T_p]` (padded with -1) -> bool `[B, T_p // block]`: no padding in the block."""
    b, t = pos.shape
    return (pos.reshape(b, t // block, block) >= 0).all(-1)


def _compact(cls, slots: int):
    """Class rows `[..., n]` (0 absent, 1 partial, 2 full with padding, 3 full) ->
    (indices `[..., slots]`, counts `[..., 3]`): classes 3, 2, 1 in that order, each
    ascending; unused slots repeat the last valid index (0 on empty rows)."""
    key = jnp.where(cls == 0, 4, 3 - cls).astype(jnp.int32)
    order = jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)[..., :slots]
    n_valid = jnp.minimum((cls > 0).sum(-1), slots).astype(jnp.int32)
    end_full = jnp.minimum((cls == 3).sum(-1), n_valid).astype(jnp.int32)
    end_padded = jnp.minimum((cls >= 2).sum(-1), n_valid).astype(jnp.int32)
    slot = jnp.arange(order.shape[-1], dtype=jnp.int32)
    last = jnp.take_along_axis(order, jnp.maximum(n_valid - 1, 0)[..., None], axis=-1)
    order = jnp.where(slot < n_valid[..., None], order, last)
    order = jnp.where(n_valid[..., None] > 0, order, 0)
    return order, jnp.stack([end_full, end_padded, n_valid], -1)


def kernel_tables(metadata, q_pos_p, kv_pos_p, *, transpose: bool) -> Tables:
    """Normalise `metadata` for kernels over positions padded to whole metadata blocks.

    Args:
      metadata: `BlockSparseMetadata` `[Bm, Hm, nQ, M]` (Bm, Hm may be 1: broadcast).
      q_pos_p, kv_pos_p: int `[B, nQ * block_q]`, `[B, nK * block_kv]`, padding < 0.
      transpose: also build the per-KV-block query-block lists (for dK/dV).
    """
    bq, bkv = metadata.block_q, metadata.block_kv
    b = q_pos_p.shape[0]
    nq, nk = q_pos_p.shape[1] // bq, kv_pos_p.shape[1] // bkv
    idx = jnp.asarray(metadata.kv_block_indices, jnp.int32)
    cnt = jnp.asarray(metadata.kv_block_counts, jnp.int32)
    full = jnp.asarray(metadata.kv_block_full, bool)
    hm, m = idx.shape[1], idx.shape[3]
    shape = (b, hm, nq, m)
    idx, full = jnp.broadcast_to(idx, shape), jnp.broadcast_to(full, shape)
    cnt = jnp.broadcast_to(cnt, shape[:3])
    valid = (jnp.arange(m) < cnt[..., None]) & (idx >= 0) & (idx < nk)
    idx = jnp.clip(idx, 0, nk - 1)
    q_clean = _block_clean(q_pos_p, bq)[:, None, :, None]                      # [B, 1, nQ, 1]
    kv_clean = jnp.take_along_axis(_block_clean(kv_pos_p, bkv)[:, None, None, :],
                                   idx.reshape(b, 1, 1, -1), axis=-1).reshape(shape)
    full_cls = jnp.where(q_clean & kv_clean, 3, 2)
    cls = jnp.where(valid, jnp.where(full, full_cls, 1), 0).astype(jnp.int8)
    bi, hi, qi = jnp.meshgrid(jnp.arange(b), jnp.arange(hm), jnp.arange(nq), indexing="ij")
    dense = jnp.zeros((b, hm, nq, nk), jnp.int8).at[bi[..., None], hi[..., None], qi[..., None],
                                                    idx].max(cls)
    kv_idx, kv_cnt = _compact(dense, m)
    q_idx = q_cnt = None
    if transpose:
        q_idx, q_cnt = _compact(dense.swapaxes(2, 3), nq)
    return Tables(kv_idx, kv_cnt, q_idx, q_cnt)


def pow2_tile(requested: int, block: int, name: str, minimum: int = 1) -> int:
    """Largest power of two <= min(requested, block) dividing `block` (the kernel tile
    inside one metadata block); ValueError when it would be below `minimum`."""
    tile = 1
    while tile * 2 <= min(requested, block) and block % (tile * 2) == 0:
        tile *= 2
    if tile < minimum:
        raise ValueError(
            f"block_sparse: metadata {name}={block} has no power-of-two divisor >= {minimum} "
            f"(<= the kernel tile {requested}); use a metadata block that is a multiple of "
            f"{minimum}")
    return tile


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static shapes of one call (padded lengths, metadata layout)."""

    block_q: int          # metadata blocks
    block_kv: int
    nq: int               # metadata query / KV blocks
    nk: int
    max_blocks: int
    meta_heads: int       # Hm: 1 (shared by every KV head) or Hkv
    group: int            # G = H // Hkv


def geometry(metadata, q, k) -> Geometry:
    idx = metadata.kv_block_indices
    return Geometry(block_q=metadata.block_q, block_kv=metadata.block_kv,
                    nq=-(-q.shape[1] // metadata.block_q), nk=-(-k.shape[1] // metadata.block_kv),
                    max_blocks=idx.shape[3], meta_heads=idx.shape[1],
                    group=q.shape[2] // k.shape[2])


def run(st_factory, q, k, v, metadata, *, q_positions, kv_positions, q_segment_ids,
        kv_segment_ids, sink_logits, return_lse, geo):
    """Shared by both backends: padded positions -> kernel tables -> custom_vjp call."""
    tq_p, tk_p = geo.nq * geo.block_q, geo.nk * geo.block_kv
    q_pos_p = blocks.pad_axis(q_positions, tq_p, 1, -1)
    kv_pos_p = blocks.pad_axis(kv_positions, tk_p, 1, -1)
    tabs = kernel_tables(metadata, q_pos_p, kv_pos_p, transpose=True)
    return autodiff.attention(st_factory(geo), q, k, v, sink_logits=sink_logits,
                              q_positions=q_positions, kv_positions=kv_positions,
                              q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                              return_lse=return_lse, aux=tuple(tabs))


def masked_visible(mode, mask_fn, qp, kp, qs, ks):
    """Visibility of a tile by loop mode: None (full block), "pad" (full, with padding),
    "mask" (partial: the element predicate)."""
    if mode == "pad":
        return blocks.visible(None, qp, kp, None, None)
    return blocks.visible(mask_fn, qp, kp, qs, ks)
