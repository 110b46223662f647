"""Patterns -> block-sparse metadata (the splash-attention MaskInfo / FlexAttention BlockMask step).

Two entry points, one algorithm:

* `block_metadata(pattern, q_positions, kv_positions, block_q, block_kv, ...)`: jnp, works
  on traced positions and segment ids (decode, packed sequences, ragged batches).
* `static_block_metadata(pattern, q_len, kv_len, block_q, block_kv)`: numpy constants for
  positions `0..T-1` (usable inside jit), cached, computed in query-block chunks so long
  sequences never materialise the full `T x T` mask at once.

For every (query block, kv block) pair the mask is evaluated on the block's elements:
*present* if any element is visible, *full* if every in-range element is visible (padding
positions, < 0, count as not visible, so blocks holding padding are partial).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse.metadata import BlockSparseMetadata
from sparse_jax.patterns.masks import Pattern, dense_mask


def _pad_to(x, length, value, axis=-1):
    pad = length - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _block_flags(pattern, q_pos, kv_pos, q_seg, kv_seg, block_q, block_kv):
    """present, full: [B, nQ, nK] for positions already padded to whole blocks."""
    b, tq = q_pos.shape
    tk = kv_pos.shape[1]
    nq, nk = tq // block_q, tk // block_kv
    mask = dense_mask(pattern, q_pos, kv_pos, q_seg, kv_seg)          # [B, Tq, Tk]
    in_range = (q_pos[:, :, None] != _PAD) & (kv_pos[:, None, :] != _PAD)
    mask = mask.reshape(b, nq, block_q, nk, block_kv)
    in_range = in_range.reshape(b, nq, block_q, nk, block_kv)
    present = mask.any(axis=(2, 4))
    full = (mask | ~in_range).all(axis=(2, 4)) & present
    return present, full


# Out-of-range padding added here (distinct from user padding = any other negative position,
# which makes a block partial): only these elements are ignored by the `full` test.
_PAD = np.iinfo(np.int32).min


def compact_blocks(present, full, max_blocks):
    """Block flags `[..., nK]` -> `(indices, counts, full flags)` with `max_blocks` slots.

    The present blocks in ascending order; slots past `counts` repeat the last present
    block (0 where none), so they stay in range and a kernel that reads them loads nothing
    new; their flags are False. The one compaction of block flags (patterns' metadata and
    `sparse_jax.ops.selection`).
    """
    order = jnp.argsort(~present, axis=-1, stable=True).astype(jnp.int32)
    order = order[..., :max_blocks]
    if order.shape[-1] < max_blocks:   # more slots than KV blocks: padding entries
        order = jnp.pad(order, [(0, 0)] * (order.ndim - 1) + [(0, max_blocks - order.shape[-1])])
    # Clamped: under tracing a too-small max_blocks drops blocks, and counts must still
    # never exceed the slots (kernels read `count` entries).
    counts = jnp.minimum(present.sum(-1), order.shape[-1]).astype(jnp.int32)
    slot = jnp.arange(order.shape[-1])
    last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    indices = jnp.where(slot < counts[..., None], order, last)
    indices = jnp.where(counts[..., None] > 0, indices, 0)
    flags = jnp.take_along_axis(full, indices, axis=-1) & (slot < counts[..., None])
    return indices, counts, flags


def block_metadata(pattern: Pattern, q_positions, kv_positions, block_q: int, block_kv: int, *,
                   q_segment_ids=None, kv_segment_ids=None, num_kv_heads: int = 1,
                   max_blocks: int | None = None) -> BlockSparseMetadata:
    """Block metadata from positions `q_positions [B, Tq]`, `kv_positions [B, Tk]`.

    Args:
      pattern: the element predicate.
      block_q, block_kv: block sizes; lengths need not be multiples (padded inside).
      q_segment_ids, kv_segment_ids: `[B, Tq]`, `[B, Tk]` when the pattern reads segments.
      num_kv_heads: size of the kv-head axis of the result (the pattern is head-independent,
        so it is broadcast).
      max_blocks: slots per query block (default: all KV blocks). When concrete counts
        exceed it a ValueError is raised; under tracing, extra blocks would be dropped, so
        pass a bound you know holds.
    Returns:
      `BlockSparseMetadata` with arrays `[B, num_kv_heads, nQ, max_blocks]`.
    """
    for name, val in (("block_q", block_q), ("block_kv", block_kv)):
        if not isinstance(val, (int, np.integer)) or val < 1:
            raise ValueError(f"{name} must be an int >= 1, got {val!r}")
    q_positions = jnp.asarray(q_positions, jnp.int32)
    kv_positions = jnp.asarray(kv_positions, jnp.int32)
    if q_positions.ndim != 2 or kv_positions.ndim != 2 or q_positions.shape[0] != kv_positions.shape[0]:
        raise ValueError(
            f"q_positions [B, Tq] and kv_positions [B, Tk] must share B; got {q_positions.shape}, "
            f"{kv_positions.shape}")
    tq, tk = q_positions.shape[1], kv_positions.shape[1]
    nq, nk = -(-tq // block_q), -(-tk // block_kv)
    max_blocks = nk if max_blocks is None else int(max_blocks)
    if max_blocks < 1:
        raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
    q_pos = _pad_to(q_positions, nq * block_q, _PAD)
    kv_pos = _pad_to(kv_positions, nk * block_kv, _PAD)
    q_seg = None if q_segment_ids is None else _pad_to(jnp.asarray(q_segment_ids), nq * block_q, -1)
    kv_seg = None if kv_segment_ids is None else _pad_to(jnp.asarray(kv_segment_ids), nk * block_kv, -2)
    present, full = _block_flags(pattern, q_pos, kv_pos, q_seg, kv_seg, block_q, block_kv)
    counts_needed = present.sum(-1)
    if not isinstance(counts_needed, jax.core.Tracer):
        worst = int(counts_needed.max()) if counts_needed.size else 0
        if worst > max_blocks:
            raise ValueError(f"max_blocks={max_blocks} but a query block needs {worst} KV blocks")
    indices, counts, flags = compact_blocks(present, full, max_blocks)
    shape = (indices.shape[0], num_kv_heads) + indices.shape[1:]
    return BlockSparseMetadata(
        kv_block_indices=jnp.broadcast_to(indices[:, None], shape),
        kv_block_counts=jnp.broadcast_to(counts[:, None], shape[:3]),
        kv_block_full=jnp.broadcast_to(flags[:, None], shape),
        block_q=int(block_q), block_kv=int(block_kv))


@functools.lru_cache(maxsize=64)
def _static_metadata(pattern, q_len, kv_len, block_q, block_kv, num_kv_heads, max_blocks):
    nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
    kv = np.full((1, nk * block_kv), _PAD, np.int64)
    kv[0, :kv_len] = np.arange(kv_len)
    chunk = max(1, (1 << 24) // (block_q * nk * block_kv))   # query blocks per chunk
    present, full = [], []
    with jax.ensure_compile_time_eval():
        for start in range(0, nq, chunk):
            stop = min(start + chunk, nq)
            q = np.full((1, (stop - start) * block_q), _PAD, np.int64)
            rows = np.arange(start * block_q, min(stop * block_q, q_len))
            q[0, :rows.size] = rows
            p, f = _block_flags(pattern, q, kv, None, None, block_q, block_kv)
            present.append(np.asarray(p))
            full.append(np.asarray(f))
        present, full = np.concatenate(present, 1), np.concatenate(full, 1)
        needed = int(present.sum(-1).max())
        max_blocks = max(needed, 1) if max_blocks is None else max_blocks
        if needed > max_blocks:
            raise ValueError(f"max_blocks={max_blocks} but a query block needs {needed} KV blocks")
        indices, counts, flags = (np.asarray(a) for a in compact_blocks(present, full, max_blocks))
    shape = (1, num_kv_heads) + indices.shape[1:]
    return BlockSparseMetadata(
        kv_block_indices=np.broadcast_to(indices[:, None], shape),
        kv_block_counts=np.broadcast_to(counts[:, None], shape[:3]),
        kv_block_full=np.broadcast_to(flags[:, None], shape),
        block_q=int(block_q), block_kv=int(block_kv))


def static_block_metadata(pattern: Pattern, q_len: int, kv_len: int, block_q: int, block_kv: int,
                          *, num_kv_heads: int = 1, max_blocks: int | None = None
                          ) -> BlockSparseMetadata:
    """Block metadata for positions `0..q_len-1` x `0..kv_len-1` as numpy constants.

    Safe to call inside `jax.jit`; cached per (pattern, shapes). Batch dim is 1 (kernels
    broadcast it). `max_blocks` defaults to the largest count any query block needs.
    Patterns that read segment ids need `block_metadata` instead.
    """
    if pattern.needs_segments:
        raise ValueError(f"{pattern!r} reads segment ids: use block_metadata with segment ids")
    for name, val in (("block_q", block_q), ("block_kv", block_kv), ("q_len", q_len), ("kv_len", kv_len)):
        if not isinstance(val, (int, np.integer)) or val < 1:
            raise ValueError(f"{name} must be an int >= 1, got {val!r}")
    return _static_metadata(pattern, int(q_len), int(kv_len), int(block_q), int(block_kv),
                            int(num_kv_heads), None if max_blocks is None else int(max_blocks))
