"""`decode` on TPU: Pallas Mosaic, split-K flash-decoding with the block lists in scalar
prefetch (the shape of JAX's TPU paged-attention kernel, with GQA rows and split-K).

Grid `(B, Hkv, num_splits, tiles_per_split)`, the last axis the reduction ("arbitrary").
The scalar-prefetched `lengths`, page table or block lists drive the KV index maps: step
`i` of split `s` reads the row's tile `lo + i` (`layout.split_range`); steps past the
split's last valid tile repeat the previous block index (no DMA) and skip the body. The
cache is read in place, viewed `[B, S, Hkv * D]` (paged: `[P, page, Hkv * D]`), one
`[tile, D]` block of one kv head per step, so the `M = Tq * G` query rows of the kv head
share each load; online softmax in VMEM scratch, a float32 partial `(out, lse)` per split,
merged by `layout.combine`.

Checked in `pltpu.InterpretParams()` mode on CPU only (this workplace has no TPU). On
hardware, blocks need `D % 128 == 0` and tiles (`block_k`, page or block size) that are
multiples of 8 (of 128 with `kv_positions`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import AttentionOutput
from pallas_kernels.decode import layout
from pallas_kernels.tiles_common import MASK_VALUE, NT, logits2
from pallas_kernels.tiles_tpu import dot, fold_tile, write_normalized


@dataclasses.dataclass(frozen=True)
class DecodeTpuConfig:
    block_k: int = 512
    split_target: int = 64


def _tile(form: layout.CacheForm, st, b, h, s, i, len_ref, tab_ref, cnt_ref):
    """(tile index t, whether step i runs, cache block index) of grid step (b, h, s, i)."""
    length = len_ref[b] if st["has_len"] else None
    count = cnt_ref[b * st["hkv"] + h] if form.kind == layout.SELECTED else None
    lo, hi = layout.split_range(layout.num_tiles(form, length, count), s, st["num_splits"])
    t = jnp.minimum(lo + i, jnp.maximum(hi - 1, lo))
    if form.kind == layout.CONTIGUOUS:
        blk = jnp.minimum(t, form.max_tiles - 1)
    elif form.kind == layout.SELECTED:
        blk = jnp.clip(tab_ref[(b * st["hkv"] + h) * form.max_tiles + t], 0, st["nblk"] - 1)
    else:
        blk = jnp.clip(tab_ref[b * form.max_tiles + t], 0, st["pool"] - 1)
    return t, lo + i < hi, blk


def _kernel(len_ref, tab_ref, cnt_ref, qpos_ref, kpos_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
            m_sc, l_sc, acc_sc, *, form, st, mask_fn, scale, softcap):
    b, h, s, i = (pl.program_id(a) for a in range(4))
    t, run, blk = _tile(form, st, b, h, s, i, len_ref, tab_ref, cnt_ref)

    @pl.when(i == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(run)
    def _step():
        rows = form.rows
        start = t * rows if form.kind == layout.PAGED else blk * rows
        r = lax.broadcasted_iota(jnp.int32, (1, rows), 1)
        in_axis = (r < rows) if form.kind == layout.PAGED else (start + r < form.axis_len)
        if form.by_positions:
            pos = kpos_ref[...]
            valid = in_axis & (pos >= 0)
        else:
            pos = start + r
            valid = in_axis & (pos < len_ref[b])
        s_, _ = logits2(dot(q_ref[...], k_ref[...], NT), scale, softcap)
        vis = valid & layout.visible(mask_fn, qpos_ref[...], pos)
        s_ = jnp.where(vis, s_, MASK_VALUE)
        v = v_ref[...]
        if form.kind != layout.PAGED and form.axis_len % rows:      # edge block: unspecified rows
            rc = lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
            v = jnp.where(start + rc < form.axis_len, v, jnp.zeros_like(v))
        fold_tile(m_sc, l_sc, acc_sc, s_, vis, v)

    @pl.when(i == pl.num_programs(3) - 1)
    def _finish():
        write_normalized(m_sc, l_sc, acc_sc, o_ref, lse_ref)


def partials(q, k_cache, v_cache, *, form, lengths, kv_positions, q_positions, table, counts,
             scale, softcap, mask_fn, num_splits, interpret):
    """Per-split `(o_part [B, Hkv, S, M, Dv], lse_part [B, Hkv, S, M])`, float32."""
    b, tq, h, d = q.shape
    hkv, dv = k_cache.shape[2], v_cache.shape[3]
    m = layout.cdiv(tq * (h // hkv), 8) * 8
    qr, qpos = layout.pack_queries(q, q_positions, hkv, m, d)
    k2 = k_cache.reshape(*k_cache.shape[:2], hkv * d)
    v2 = v_cache.reshape(*v_cache.shape[:2], hkv * dv)
    steps = layout.cdiv(form.max_tiles, num_splits)
    st = dict(has_len=lengths is not None, hkv=hkv, num_splits=num_splits,
              nblk=layout.cdiv(form.axis_len, form.rows), pool=k_cache.shape[0])
    tile = functools.partial(_tile, form, st)

    def kv_map(b_, h_, s_, i, *refs):
        _, _, blk = tile(b_, h_, s_, i, *refs)
        return (blk, 0, h_) if form.kind == layout.PAGED else (b_, blk, h_)

    def kpos_map(b_, h_, s_, i, *refs):
        return (b_, 0, tile(b_, h_, s_, i, *refs)[2])

    scalars = [jnp.zeros((1,), jnp.int32) if x is None else x for x in (lengths, table, counts)]
    in_specs = [
        pl.BlockSpec((None, m, 1), lambda b_, h_, s_, i, *_: (b_, 0, 0)),
        None if kv_positions is None else pl.BlockSpec((None, 1, form.rows), kpos_map),
        pl.BlockSpec((None, None, m, d), lambda b_, h_, s_, i, *_: (b_, h_, 0, 0)),
        pl.BlockSpec((None, form.rows, d), kv_map),
        pl.BlockSpec((None, form.rows, dv), kv_map),
    ]
    out_specs = [
        pl.BlockSpec((None, None, None, m, dv), lambda b_, h_, s_, i, *_: (b_, h_, s_, 0, 0)),
        pl.BlockSpec((None, None, None, m, 1), lambda b_, h_, s_, i, *_: (b_, h_, s_, 0, 0)),
    ]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3, grid=(b, hkv, num_splits, steps), in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((m, 1), jnp.float32), pltpu.VMEM((m, 1), jnp.float32),
                        pltpu.VMEM((m, dv), jnp.float32)])
    kernel = functools.partial(_kernel, form=form, st=st, mask_fn=mask_fn, scale=scale,
                               softcap=softcap)
    kpos = None if kv_positions is None else kv_positions[:, None, :]
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, hkv, num_splits, m, dv), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, num_splits, m, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name=f"decode_{form.kind}_tpu",
    )(*scalars, qpos[:, :, None], kpos, qr, k2, v2)
    return o, lse[..., 0]


def decode_tpu(q, k_cache, v_cache, *, lengths, kv_positions, q_positions, page_table,
               block_indices, block_counts, block_size, sink_logits, softcap, scale, mask_fn,
               return_lse, num_splits, interpret=False, config: DecodeTpuConfig | None = None):
    """`decode_reference`'s contract on Mosaic TPU (`interpret=True` ->
    `pltpu.InterpretParams()`). Forward only."""
    config = config or DecodeTpuConfig()
    if interpret is True:
        interpret = pltpu.InterpretParams()
    form = layout.form_of(k_cache, page_table=page_table, block_indices=block_indices,
                          block_size=block_size, kv_positions=kv_positions, block_k=config.block_k)
    b, tq, h, _ = q.shape
    if num_splits is None:
        num_splits = layout.default_num_splits(b, k_cache.shape[2], form, target=config.split_target)
    table = page_table if page_table is not None else block_indices
    o_part, lse_part = partials(
        q, k_cache, v_cache, form=form, lengths=lengths, kv_positions=kv_positions,
        q_positions=q_positions, table=None if table is None else table.reshape(-1),
        counts=None if block_counts is None else block_counts.reshape(-1), scale=float(scale),
        softcap=None if softcap is None else float(softcap), mask_fn=mask_fn,
        num_splits=int(num_splits), interpret=interpret or False)
    out, lse = layout.combine(o_part, lse_part, sink_logits=sink_logits, tq=tq, num_heads=h,
                              dv=v_cache.shape[3], dtype=q.dtype)
    return AttentionOutput(out, lse) if return_lse else out


# Backend declaration for `pallas_kernels.common.resolve`: a TPU (or interpret mode); every call the api
# accepts; tiles `DecodeTpuConfig`.
CONFIG = DecodeTpuConfig
