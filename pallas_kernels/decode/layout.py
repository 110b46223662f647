"""Pieces the `decode` kernels share: which cache form a call uses, GQA query rows, the
split-K partition and the final combine of the per-split partial results
(flash-decoding, Dao et al. 2023; FlashDecoding++, arXiv 2311.01282).

Every kernel computes, per (batch, kv head, split), a partial softmax over its share of
the cache tiles: `o_part [B, Hkv, S, M, Dv]` (normalised over the split) and
`lse_part [B, Hkv, S, M]` (natural log, -inf when the split saw nothing). The `M` rows are
the `G = H / Hkv` query heads of the kv head times the `Tq` query tokens (row
`t * G + g`), padded, so one load of each KV tile serves the whole GQA group.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.flash.blocks import visible as element_visible

CONTIGUOUS, PAGED, SELECTED = "contiguous", "paged", "selected"


@dataclasses.dataclass(frozen=True)
class CacheForm:
    """Static description of the cache a call reads (hashable: kernels specialise on it).

    kind: CONTIGUOUS (`[B, S, Hkv, D]`), PAGED (pool `[P, page, Hkv, D]` + page table) or
      SELECTED (contiguous cache + per-kv-head block lists).
    rows: cache slots per block (the page size for PAGED, the selected block size for
      SELECTED, the kernel's tile for CONTIGUOUS).
    axis_len: length of the slot axis the tile is cut from (S, or the page size).
    max_tiles: tiles per row at most (static loop extent / TPU grid extent).
    by_positions: keys carry explicit positions (`kv_positions`) instead of a valid length.
    blocks_per_tile: selected blocks gathered per kernel tile (SELECTED only; 1 elsewhere):
      tile t holds blocks `[t * blocks_per_tile, (t + 1) * blocks_per_tile)` of the list.
    """

    kind: str
    rows: int
    axis_len: int
    max_tiles: int
    by_positions: bool
    blocks_per_tile: int = 1

    @property
    def tile_rows(self) -> int:
        """Cache slots per kernel tile: `rows * blocks_per_tile`."""
        return self.rows * self.blocks_per_tile


def cdiv(a, b):
    return (a + b - 1) // b


def form_of(k_cache, *, page_table, block_indices, block_size, kv_positions, block_k,
            blocks_per_tile: int = 1) -> CacheForm:
    """The call's `CacheForm`; `blocks_per_tile` (>= 1) applies to selected blocks only."""
    if page_table is not None:
        page = k_cache.shape[1]
        return CacheForm(PAGED, page, page, page_table.shape[1], False)
    s = k_cache.shape[1]
    if block_indices is not None:
        if not isinstance(blocks_per_tile, int) or blocks_per_tile < 1:
            raise ValueError(f"blocks_per_tile must be an int >= 1, got {blocks_per_tile!r}")
        max_sel = block_indices.shape[2]
        return CacheForm(SELECTED, block_size, s, cdiv(max_sel, blocks_per_tile), kv_positions is not None,
                         blocks_per_tile)
    rows = min(block_k, max(16, 1 << max(0, s - 1).bit_length()))
    return CacheForm(CONTIGUOUS, rows, s, cdiv(s, rows), kv_positions is not None)


def num_tiles(form: CacheForm, lengths, counts):
    """Valid tiles of one row (traced scalars in, traced scalar out)."""
    if form.kind == SELECTED:
        return cdiv(counts, form.blocks_per_tile)
    if form.by_positions:
        return jnp.int32(form.max_tiles)
    return jnp.minimum(cdiv(lengths, form.rows), form.max_tiles)


def split_range(n, split, num_splits):
    """Tiles `[lo, hi)` of split `split` when a row's `n` valid tiles are shared evenly."""
    per = cdiv(n, num_splits)
    lo = jnp.minimum(split * per, n)
    return lo, jnp.minimum(lo + per, n)


def default_num_splits(batch: int, num_kv_heads: int, form: CacheForm, *, target: int = 1024,
                       min_tokens: int | None = None) -> int:
    """Enough (batch, kv head, split) programs to fill a GPU (`target`), each with at least
    `min_tokens` cache tokens (default 1024; 128 for selected blocks) so the partial results
    and the combine stay small against the cache read (on an H200, 32 splits of 1K tokens
    beat 128 of 256 at B=1 x 32K by 1.4x). Counted in whole tiles (`form.tile_rows` slots)."""
    if min_tokens is None:
        min_tokens = 128 if form.kind == SELECTED else 1024
    want = cdiv(target, batch * num_kv_heads)
    return int(max(1, min(want, cdiv(form.max_tiles, max(1, cdiv(min_tokens, form.tile_rows))))))


def pack_queries(q, q_positions, num_kv_heads: int, m: int, d_pad: int):
    """`q [B, Tq, H, D]` -> `q_rows [B, Hkv, m, d_pad]`, `qpos_rows [B, m]` (-1 on padding),
    row `t * G + g` (`m >= Tq * G`)."""
    b, tq, h, d = q.shape
    g = h // num_kv_heads
    rows = tq * g
    qr = q.reshape(b, tq, num_kv_heads, g, d).transpose(0, 2, 1, 3, 4).reshape(b, num_kv_heads, rows, d)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, m - rows), (0, d_pad - d)))
    qpos = jnp.pad(jnp.repeat(q_positions, g, axis=1), ((0, 0), (0, m - rows)), constant_values=-1)
    return qr, qpos


def combine(o_part, lse_part, *, sink_logits, tq: int, num_heads: int, dv: int, dtype):
    """Merge the splits: `o [B, Tq, H, Dv]` in `dtype` and `lse [B, H, Tq]` (float32).

    A learned sink logit per head joins the denominator only, so it enters here:
    `lse' = logaddexp(lse, sink)`, `o' = o * exp(lse - lse')`.
    """
    b, hkv = o_part.shape[:2]
    g = num_heads // hkv
    rows = tq * g
    o_part, lse_part = o_part[:, :, :, :rows, :dv], lse_part[:, :, :, :rows]
    m = lse_part.max(axis=2)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse_part - m_safe[:, :, None])                       # 0 for empty splits
    tot = w.sum(axis=2)
    out = jnp.einsum("bhsr,bhsrd->bhrd", w, o_part) / jnp.where(tot > 0, tot, 1.0)[..., None]
    lse = jnp.where(tot > 0, m_safe + jnp.log(jnp.where(tot > 0, tot, 1.0)), -jnp.inf)
    if sink_logits is not None:
        sink = jnp.tile(sink_logits.astype(jnp.float32).reshape(hkv, 1, g), (1, tq, 1)).reshape(hkv, rows)
        new = jnp.logaddexp(lse, sink[None])
        out = out * jnp.exp(lse - new)[..., None]
        lse = new
    out = out.reshape(b, hkv, tq, g, dv).transpose(0, 2, 1, 3, 4).reshape(b, tq, num_heads, dv)
    lse = lse.reshape(b, hkv, tq, g).transpose(0, 1, 3, 2).reshape(b, num_heads, tq)
    return out.astype(dtype), lse


def visible(mask_fn, q_pos, kv_pos):
    """Decode visibility: both positions valid (>= 0), key not after the query, `mask_fn`."""
    return element_visible(mask_fn, q_pos, kv_pos, None, None) & (kv_pos <= q_pos)


def static_max(x) -> int | None:
    """Max of a concrete integer array (None under tracing)."""
    if isinstance(x, jax.core.Tracer):
        return None
    return int(jnp.max(x)) if x.size else None
