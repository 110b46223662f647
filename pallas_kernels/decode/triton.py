"""`decode` on GPU: Pallas with the Triton lowering, split-K flash-decoding
(FlashAttention-2 arXiv 2307.08691 online softmax; flash-decoding's split of the cache).

One program per (batch, kv head, split). It holds the `M = Tq * G` query rows of its kv
head (`layout.pack_queries`, padded to 16 for the tensor-core dot) and streams its share of
the row's valid cache tiles, so each KV tile is read once for the whole GQA group:

* contiguous: tile t = slots `[t * block_k, (t + 1) * block_k)`; with `lengths` only the
  tiles below the row's length are visited (ragged batches split each row evenly);
* paged: tile t = pool page `page_table[b, t]`;
* selected: tile t = cache block `block_indices[b, h, t]`, for `t < block_counts[b, h]`;
  with `blocks_per_tile = P > 1`, tile t = the `P` blocks `t * P ... t * P + P - 1` of the
  list, gathered row by row (row r = slot `block_indices[b, h, t * P + r // block_size] *
  block_size + r % block_size`), so each iteration issues one `P * block_size`-row K load,
  one V load and one larger dot instead of P small ones.

The cache is read in place (viewed `[B, S, Hkv * D]`, a free reshape; never padded or
copied): tiles that run past the slot axis, page sizes / block sizes that are not powers
of two and head dims that are not are covered by masked loads. The element predicate
(`layout.visible`: valid positions, causal among the new tokens, `mask_fn`) is evaluated
on every tile; at decode sizes that costs nothing beside the memory traffic. Each split
writes a float32 partial `(out, lse)`; `layout.combine` merges them (and the sink logit).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import AttentionOutput
from pallas_kernels.decode import layout
from pallas_kernels.flash.blocks import pl_next_pow2
from pallas_kernels.tiles_common import LOG2E, MASK_VALUE, NN, NT, logits2


@dataclasses.dataclass(frozen=True)
class DecodeTritonConfig:
    """Tile of the contiguous form and launch parameters (paged tiles are the page);
    `split_target`: programs the split heuristic aims for (~8 per H100/H200 SM);
    `blocks_per_tile`: selected blocks per tile of the selected form (1: one block per
    iteration; 0, the default: automatic, `block_k // block_size` blocks, at least 1, at most
    the list's length; H100, Quest 128K, 512 pages of 16, 2026-12-08: batch 16 0 / 1 / 2 / 4
    / 8 = 235 / 285 / 261 / 230 / 235 us, batch 1 39.3 / 46.2 / 41.5 / 40.9 / 45.8 us).
    Other defaults from a sweep on an H200 (docs/BENCHMARKS.md, decode)."""

    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    split_target: int = 1024
    blocks_per_tile: int = 0

    def __post_init__(self):
        if not isinstance(self.blocks_per_tile, int) or self.blocks_per_tile < 0:
            raise ValueError(f"blocks_per_tile must be an int >= 0 (0: automatic), got "
                             f"{self.blocks_per_tile!r}")

    def selected_blocks_per_tile(self, block_size: int, max_sel: int) -> int:
        """The selected form's blocks per tile for blocks of `block_size` in lists of `max_sel`."""
        if self.blocks_per_tile:
            return self.blocks_per_tile
        return max(1, min(self.block_k // block_size, max_sel))


def _pow2(x: int) -> int:
    return max(16, pl_next_pow2(x))


def cols(start: int, width: int, width_p: int, gather: bool):
    """Columns `[start, start + width_p)` of a head; for gathered rows with `width_p > width`,
    an index `[1, width_p]` clamped to the head's last column (no masked gather: the padded
    q columns are zeros and the padded output columns are dropped by `layout.combine`)."""
    if not gather or width_p == width:
        return pl.ds(start, width_p)
    return start + jnp.minimum(jnp.arange(width_p, dtype=jnp.int32), width - 1)[None, :]


def _kernel(len_ref, tab_ref, cnt_ref, qpos_ref, kpos_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
            form: layout.CacheForm, mask_fn, scale, softcap, num_splits, num_kv_heads, d, dv,
            table_stride):
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows, rows_p = form.tile_rows, _pow2(form.tile_rows)
    gather = form.blocks_per_tile > 1
    d_p, dv_p = q_ref.shape[-1], o_ref.shape[-1]
    length = None if len_ref is None else len_ref[b]
    count = None if cnt_ref is None else cnt_ref[b * num_kv_heads + h]
    lo, hi = layout.split_range(layout.num_tiles(form, length, count), split, num_splits)
    q = q_ref[...]
    qp = qpos_ref[...][:, None]
    r = jnp.arange(rows_p, dtype=jnp.int32)
    # Static: which loads need a row mask (partial tiles, padded rows); gathered rows are
    # clamped to slot 0 instead and masked in the softmax.
    ragged_rows = not gather and (rows_p != rows or form.kind != layout.PAGED and form.axis_len % rows != 0)
    cols_k = cols(h * d, d, d_p, gather)
    cols_v = cols(h * dv, dv, dv_p, gather)

    def load(ref, sel, width, width_p, in_rows):
        """A `[rows_p, width_p]` tile; masked where it runs past the rows or the head dim."""
        mask = None
        if ragged_rows:
            mask = in_rows[:, None]
        if width_p != width and not gather:
            col_ok = jnp.arange(width_p, dtype=jnp.int32)[None, :] < width
            mask = col_ok if mask is None else mask & col_ok
        if mask is None:
            return ref[sel]
        return plgpu.load(ref.at[sel], mask=jnp.broadcast_to(mask, (rows_p, width_p)), other=0.0)

    def step(t, carry):
        m, l, acc = carry
        if gather:
            # Row r: block `t * P + r // block_size` of the list, slot `r % block_size` in it;
            # rows past the count, the tile or the cache gather slot 0 and are masked.
            j = t * form.blocks_per_tile + r // form.rows
            listed = (r < rows) & (j < count)
            blk = tab_ref[(b * num_kv_heads + h) * table_stride + jnp.where(listed, j, 0)]
            slot = jnp.where(listed, blk, 0) * form.rows + r % form.rows
            in_rows = listed & (slot < form.axis_len)
            slot = jnp.where(in_rows, slot, 0)
            k_sel = lambda c: (slot if isinstance(c, pl.Slice) else slot[:, None], c)  # noqa: E731
            pos = slot
        elif form.kind == layout.PAGED:
            page = tab_ref[b * form.max_tiles + t]
            start, pos = 0, t * rows + r
            k_sel = lambda cols: (page, pl.ds(0, rows_p), cols)  # noqa: E731
        else:
            blk = t if form.kind == layout.CONTIGUOUS else tab_ref[(b * num_kv_heads + h) * table_stride + t]
            start = blk * rows
            pos = start + r
            k_sel = lambda cols: (pl.ds(start, rows_p), cols)  # noqa: E731
        if not gather:
            in_rows = (r < rows) & (start + r < form.axis_len)
        if form.by_positions:
            rows_sel = slot if gather else pl.ds(start, rows_p)
            kp = plgpu.load(kpos_ref.at[rows_sel], mask=in_rows, other=-1) \
                if ragged_rows else kpos_ref[rows_sel]
            valid = in_rows & (kp >= 0)
            pos = kp
        else:
            valid = in_rows & (pos < length)
        k = load(k_ref, k_sel(cols_k), d, d_p, in_rows)
        s = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32)
        s, _ = logits2(s, scale, softcap)
        vis = valid[None, :] & layout.visible(mask_fn, qp, pos[None, :])
        s = jnp.where(vis, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.where(vis, jnp.exp2(s - m_new[:, None]), 0.0)
        l = l * alpha + p.sum(axis=-1)
        v = load(v_ref, k_sel(cols_v), dv, dv_p, in_rows)
        pv = lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=jnp.float32)
        return m_new, l, acc * alpha[:, None] + pv

    mrows = q.shape[0]
    carry = (jnp.full((mrows,), MASK_VALUE, jnp.float32), jnp.zeros((mrows,), jnp.float32),
             jnp.zeros((mrows, dv_p), jnp.float32))
    m, l, acc = lax.fori_loop(lo, hi, step, carry)
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = acc / l_safe[:, None]
    lse_ref[...] = jnp.where(seen, (m + jnp.log2(l_safe)) * (1.0 / LOG2E), -jnp.inf)


def partials(q, k_cache, v_cache, *, form, lengths, kv_positions, q_positions, table, counts,
             scale, softcap, mask_fn, num_splits, config: DecodeTritonConfig, interpret):
    """Per-split `(o_part [B, Hkv, S, M, Dv_p], lse_part [B, Hkv, S, M])`, float32."""
    b, _, h, d = q.shape
    hkv, dv = k_cache.shape[2], v_cache.shape[3]
    d_p, dv_p = _pow2(d), _pow2(dv)
    m = _pow2(q.shape[1] * (h // hkv))
    qr, qpos = layout.pack_queries(q, q_positions, hkv, m, d_p)
    k2 = k_cache.reshape(*k_cache.shape[:2], hkv * d)          # free: heads are contiguous
    v2 = v_cache.reshape(*v_cache.shape[:2], hkv * dv)
    whole = pl.BlockSpec()
    if form.kind == layout.PAGED:
        kv_spec_k, kv_spec_v = whole, whole
    else:
        s = k_cache.shape[1]
        kv_spec_k = pl.BlockSpec((None, s, hkv * d), lambda b_, h_, s_: (b_, 0, 0))
        kv_spec_v = pl.BlockSpec((None, s, hkv * dv), lambda b_, h_, s_: (b_, 0, 0))
    kpos_spec = None
    if kv_positions is not None:
        kpos_spec = pl.BlockSpec((None, kv_positions.shape[1]), lambda b_, h_, s_: (b_, 0))
    in_specs = [
        None if lengths is None else whole,
        None if table is None else whole,
        None if counts is None else whole,
        pl.BlockSpec((None, m), lambda b_, h_, s_: (b_, 0)),
        kpos_spec,
        pl.BlockSpec((None, None, m, d_p), lambda b_, h_, s_: (b_, h_, 0, 0)),
        kv_spec_k, kv_spec_v,
    ]
    out_specs = [
        pl.BlockSpec((None, None, None, m, dv_p), lambda b_, h_, s_: (b_, h_, s_, 0, 0)),
        pl.BlockSpec((None, None, None, m), lambda b_, h_, s_: (b_, h_, s_, 0)),
    ]
    table_stride = table.shape[0] // (b * hkv) if form.kind == layout.SELECTED else 0   # max_sel
    kernel = functools.partial(_kernel, form=form, mask_fn=mask_fn, scale=scale, softcap=softcap,
                               num_splits=num_splits, num_kv_heads=hkv, d=d, dv=dv,
                               table_stride=table_stride)
    return pl.pallas_call(
        kernel,
        grid=(b, hkv, num_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct((b, hkv, num_splits, m, dv_p), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, num_splits, m), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name=f"decode_{form.kind}",
    )(lengths, table, counts, qpos, kv_positions, qr, k2, v2)


def decode_triton(q, k_cache, v_cache, *, lengths, kv_positions, q_positions, page_table,
                  block_indices, block_counts, block_size, sink_logits, softcap, scale, mask_fn,
                  return_lse, num_splits, interpret=False, config: DecodeTritonConfig | None = None):
    """`decode_reference`'s contract on the Triton kernel (`interpret=True`: CPU). Forward only."""
    config = config or DecodeTritonConfig()
    per_tile = 1 if block_indices is None else config.selected_blocks_per_tile(block_size, block_indices.shape[2])
    form = layout.form_of(k_cache, page_table=page_table, block_indices=block_indices,
                          block_size=block_size, kv_positions=kv_positions, block_k=config.block_k,
                          blocks_per_tile=per_tile)
    b, tq, h, _ = q.shape
    hkv = k_cache.shape[2]
    if num_splits is None:
        num_splits = layout.default_num_splits(b, hkv, form, target=config.split_target)
    table = page_table if page_table is not None else block_indices
    o_part, lse_part = partials(
        q, k_cache, v_cache, form=form, lengths=lengths, kv_positions=kv_positions,
        q_positions=q_positions, table=None if table is None else table.reshape(-1),
        counts=None if block_counts is None else block_counts.reshape(-1), scale=float(scale),
        softcap=None if softcap is None else float(softcap), mask_fn=mask_fn,
        num_splits=int(num_splits), config=config, interpret=bool(interpret))
    out, lse = layout.combine(o_part, lse_part, sink_logits=sink_logits, tq=tq, num_heads=h,
                              dv=v_cache.shape[3], dtype=q.dtype)
    return AttentionOutput(out, lse) if return_lse else out


# Backend declaration for `pallas_kernels.common.resolve`: a GPU (or interpret mode); every call the api
# accepts; tiles `DecodeTritonConfig`.
CONFIG = DecodeTritonConfig
