"""`block_sparse` on TPU: Pallas Mosaic kernels, forward and backward (FlashAttention-2,
arXiv 2307.08691, over a block list, in the style of splash attention).

The normalised metadata (`plan.kernel_tables`) travels through scalar prefetch
(`pltpu.PrefetchScalarGridSpec`): the last grid axis walks the slots of a metadata row,
the KV (or, for dK/dV, query) index map reads the block number from the table, and slots
past the row's count repeat the last valid block (no new DMA) with the body skipped.
Full blocks (the first run of slots) skip the element predicate; full blocks holding
padding (the second run) mask padding only; partial blocks (the third) apply `mask_fn`.

* forward: grid (B, Hkv, nQ, M); the G query heads of a KV head are stacked as rows
  (`[G, bq, D] -> [G * bq, D]`), so one KV tile serves the whole group.
* dQ: grid (B, Hkv, nQ, M), rows stacked the same way.
* dK/dV: grid (B, Hkv, nK, G, nQ) over the transposed metadata; the G heads and the query
  blocks are both reduction axes, summed in VMEM scratch (KV never repeated).

Kernel tiles equal the metadata blocks (on hardware: block_q a multiple of 8, block_kv of
128). Untested on TPU hardware here (this workplace has no TPU): checked in
`pltpu.InterpretParams()` mode on CPU only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sparse import plan
from pallas_kernels.block_sparse.plan import masked_visible
from pallas_kernels.flash import autodiff, blocks
from pallas_kernels.tiles_common import LOG2E, MASK_VALUE, NN, NT, logits2
from pallas_kernels.tiles_tpu import dot


def _seg(ref):
    return None if ref is None else ref[...]


def _stack(x, g):
    """`[G, bq, ...]` -> `[G * bq, ...]` (rows g * bq + t)."""
    return x.reshape(g * x.shape[1], *x.shape[2:])


def _repeat_rows(x, g):
    """Per-position column `[bq, 1]` -> per-row `[G * bq, 1]`."""
    return x if g == 1 else jnp.concatenate([x] * g, axis=0)


def _row(geo, n_rows, b, hk, i):
    return (b * geo.meta_heads + (hk if geo.meta_heads > 1 else 0)) * n_rows + i


def _slot_block(idx_ref, cnt_ref, row, slot, n_slots):
    """Block number of `slot` in table row `row`, clamped to the last valid slot."""
    n_valid = cnt_ref[row * 3 + 2]
    return idx_ref[row * n_slots + jnp.minimum(slot, jnp.maximum(n_valid - 1, 0))]


def _when_full_or_partial(cnt_ref, row, slot, step):
    """`step(mode)` for the slot's run: None (full), "pad" (full, padding), "mask"."""
    bounds = [0] + [cnt_ref[row * 3 + c] for c in range(3)]
    for mode, lo, hi in zip((None, "pad", "mask"), bounds[:-1], bounds[1:]):
        pl.when((slot >= lo) & (slot < hi))(functools.partial(step, mode))


def _params(n_parallel, n_arbitrary):
    return pltpu.CompilerParams(
        dimension_semantics=("parallel",) * n_parallel + ("arbitrary",) * n_arbitrary)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(idx_ref, cnt_ref, sink_ref, qpos_ref, kpos_ref, qseg_ref, kseg_ref, q_ref, k_ref,
                v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, geo, mask_fn, scale, softcap):
    b, hk, i, m = (pl.program_id(a) for a in range(4))
    g, bq = q_ref.shape[0], q_ref.shape[1]
    row = _row(geo, geo.nq, b, hk, i)

    @pl.when(m == 0)
    def _init():
        if sink_ref is not None:
            for gg in range(g):
                m_sc[gg * bq:(gg + 1) * bq] = jnp.full(
                    (bq, 1), sink_ref[hk * g + gg] * LOG2E, jnp.float32)
            l_sc[...] = jnp.ones(l_sc.shape, jnp.float32)
        else:
            m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
            l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def step(mode):
        s, _ = logits2(dot(_stack(q_ref[...], g), k_ref[...], NT), scale, softcap)
        if mode:
            vis = masked_visible(mode, mask_fn, _repeat_rows(qpos_ref[...], g), kpos_ref[...],
                                 None if qseg_ref is None else _repeat_rows(qseg_ref[...], g),
                                 _seg(kseg_ref))
            s = jnp.where(vis, s, MASK_VALUE)
        m_old = m_sc[...]
        m_new = jnp.maximum(m_old, s.max(axis=-1, keepdims=True))
        alpha = jnp.exp2(m_old - m_new)
        p = jnp.exp2(s - m_new)
        if mode:
            p = jnp.where(vis, p, 0.0)
        m_sc[...] = m_new
        l_sc[...] = l_sc[...] * alpha + p.sum(axis=-1, keepdims=True)
        v = v_ref[...]
        acc_sc[...] = acc_sc[...] * alpha + dot(p.astype(v.dtype), v, NN)

    _when_full_or_partial(cnt_ref, row, m, step)

    @pl.when(m == pl.num_programs(3) - 1)
    def _finish():
        l = l_sc[...]
        seen = l > 0.0
        l_safe = jnp.where(seen, l, 1.0)
        o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype).reshape(o_ref.shape)
        lse = jnp.where(seen, (m_sc[...] + jnp.log2(l_safe)) * (1.0 / LOG2E), -jnp.inf)
        lse_ref[...] = lse.reshape(lse_ref.shape)


def _prepare(geo, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    """Pad to whole metadata blocks; q as `[B, Hkv, G, T, D]`, KV as `[B, Hkv, T, D]`;
    positions and segment ids as columns `[B, T, 1]` and rows `[B, 1, T]`."""
    b, tq, h, d = q.shape
    hkv = k.shape[2]
    tq_p, tk_p = geo.nq * geo.block_q, geo.nk * geo.block_kv
    qg = blocks.pad_axis(q, tq_p, 1).reshape(b, tq_p, hkv, geo.group, d).transpose(0, 2, 3, 1, 4)
    kv_first = lambda x: blocks.pad_axis(x, tk_p, 1).transpose(0, 2, 1, 3)  # noqa: E731
    pad = lambda x, t: blocks.pad_axis(x, t, 1, -1)  # noqa: E731
    q_pos, kv_pos, q_seg, kv_seg = pad(q_pos, tq_p), pad(kv_pos, tk_p), pad(q_seg, tq_p), pad(kv_seg, tk_p)
    col = lambda x: None if x is None else x[:, :, None]  # noqa: E731
    row = lambda x: None if x is None else x[:, None, :]  # noqa: E731
    return dict(q=qg, k=kv_first(k), v=kv_first(v), qpos_col=col(q_pos), qpos_row=row(q_pos),
                kpos_col=col(kv_pos), kpos_row=row(kv_pos), qseg_col=col(q_seg),
                qseg_row=row(q_seg), kseg_col=col(kv_seg), kseg_row=row(kv_seg),
                tq_p=tq_p, tk_p=tk_p)


def _heads_last(x, tq):
    """`[B, Hkv, G, Tq_p, D] -> [B, Tq, H, D]`."""
    b, hkv, g, _, d = x.shape
    return x[:, :, :, :tq].transpose(0, 3, 1, 2, 4).reshape(b, tq, hkv * g, d)


def forward(st, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg, kv_idx, kv_cnt, q_idx, q_cnt):
    del q_idx, q_cnt
    geo = st.config
    b, tq, h, d = q.shape
    hkv, dv = k.shape[2], v.shape[3]
    g, bq, bk, m_slots = geo.group, geo.block_q, geo.block_kv, geo.max_blocks
    x = _prepare(geo, q, k, v, q_pos, kv_pos, q_seg, kv_seg)

    def kv_block(b_, hk, i, m, idx_ref, cnt_ref):
        return _slot_block(idx_ref, cnt_ref, _row(geo, geo.nq, b_, hk, i), m, m_slots)

    q_col = lambda b_, hk, i, m, *t: (b_, i, 0)  # noqa: E731
    k_row = lambda b_, hk, i, m, *t: (b_, 0, kv_block(b_, hk, i, m, *t))  # noqa: E731
    q_tile = lambda b_, hk, i, m, *t: (b_, hk, 0, i, 0)  # noqa: E731
    k_tile = lambda b_, hk, i, m, *t: (b_, hk, kv_block(b_, hk, i, m, *t), 0)  # noqa: E731
    segs = q_seg is not None
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(b, hkv, geo.nq, m_slots),
        in_specs=[
            None if sinks is None else pl.BlockSpec(memory_space=pltpu.SMEM),
            pl.BlockSpec((None, bq, 1), q_col), pl.BlockSpec((None, 1, bk), k_row),
            pl.BlockSpec((None, bq, 1), q_col) if segs else None,
            pl.BlockSpec((None, 1, bk), k_row) if segs else None,
            pl.BlockSpec((None, None, g, bq, d), q_tile),
            pl.BlockSpec((None, None, bk, d), k_tile), pl.BlockSpec((None, None, bk, dv), k_tile),
        ],
        out_specs=[pl.BlockSpec((None, None, g, bq, dv), q_tile),
                   pl.BlockSpec((None, None, g, bq, 1), q_tile)],
        scratch_shapes=[pltpu.VMEM((g * bq, 1), jnp.float32), pltpu.VMEM((g * bq, 1), jnp.float32),
                        pltpu.VMEM((g * bq, dv), jnp.float32)])
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, geo=geo, mask_fn=st.mask_fn, scale=st.scale,
                          softcap=st.softcap),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, hkv, g, x["tq_p"], dv), q.dtype),
                   jax.ShapeDtypeStruct((b, hkv, g, x["tq_p"], 1), jnp.float32)],
        compiler_params=_params(3, 1), interpret=st.interpret, name="block_sparse_fwd_tpu",
    )(kv_idx.reshape(-1), kv_cnt.reshape(-1), sinks, x["qpos_col"], x["kpos_row"], x["qseg_col"],
      x["kseg_row"], x["q"], x["k"], x["v"])
    return _heads_last(out, tq), lse[:, :, :, :tq, 0].reshape(b, h, tq)


# ----------------------------------------------------------------------------- backward


def _dq_kernel(idx_ref, cnt_ref, qpos_ref, kpos_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref,
               do_ref, lse_ref, delta_ref, dq_ref, dq_sc, *, geo, mask_fn, scale, softcap):
    b, hk, i, m = (pl.program_id(a) for a in range(4))
    g = q_ref.shape[0]
    row = _row(geo, geo.nq, b, hk, i)

    @pl.when(m == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def step(mode):
        k = k_ref[...]
        s, t = logits2(dot(_stack(q_ref[...], g), k, NT), scale, softcap)
        p = jnp.exp2(s - _stack(lse_ref[...], g))
        if mode:
            vis = masked_visible(mode, mask_fn, _repeat_rows(qpos_ref[...], g), kpos_ref[...],
                                 None if qseg_ref is None else _repeat_rows(qseg_ref[...], g),
                                 _seg(kseg_ref))
            p = jnp.where(vis, p, 0.0)
        ds = p * (dot(_stack(do_ref[...], g), v_ref[...], NT) - _stack(delta_ref[...], g))
        if t is not None:
            ds = ds * (1.0 - t * t)
        dq_sc[...] += dot(ds.astype(k.dtype), k, NN)

    _when_full_or_partial(cnt_ref, row, m, step)

    @pl.when(m == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype).reshape(dq_ref.shape)


def _dkv_kernel(idx_ref, cnt_ref, qpos_ref, kpos_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref,
                do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, geo, mask_fn, scale,
                softcap):
    b, hk, j, g, i = (pl.program_id(a) for a in range(5))
    row = _row(geo, geo.nk, b, hk, j)

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def step(mode):
        q, do = q_ref[...], do_ref[...]
        s_t, t = logits2(dot(k_ref[...], q, NT), scale, softcap)            # [bk, bq]
        p_t = jnp.exp2(s_t - lse_ref[...])
        if mode:
            vis = masked_visible(mode, mask_fn, qpos_ref[...], kpos_ref[...], _seg(qseg_ref),
                                 _seg(kseg_ref))
            p_t = jnp.where(vis, p_t, 0.0)
        dv_sc[...] += dot(p_t.astype(do.dtype), do, NN)
        ds_t = p_t * (dot(v_ref[...], do, NT) - delta_ref[...])
        if t is not None:
            ds_t = ds_t * (1.0 - t * t)
        dk_sc[...] += dot(ds_t.astype(q.dtype), q, NN)

    _when_full_or_partial(cnt_ref, row, i, step)

    @pl.when((g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward(st, q, k, v, dout, q_pos, kv_pos, q_seg, kv_seg, lse2, delta, kv_idx, kv_cnt, q_idx,
             q_cnt):
    geo = st.config
    b, tq, h, d = q.shape
    tk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    g, bq, bk = geo.group, geo.block_q, geo.block_kv
    x = _prepare(geo, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    tq_p = x["tq_p"]
    do = blocks.pad_axis(dout, tq_p, 1).reshape(b, tq_p, hkv, g, dv).transpose(0, 2, 3, 1, 4)
    lse2 = blocks.pad_axis(lse2, tq_p, 2, 1e30).reshape(b, hkv, g, tq_p)
    delta = blocks.pad_axis(delta, tq_p, 2, 0.0).reshape(b, hkv, g, tq_p)
    common = dict(geo=geo, mask_fn=st.mask_fn, scale=st.scale, softcap=st.softcap)
    segs = q_seg is not None

    # dQ: grid (B, Hkv, nQ, M)
    def kv_block(b_, hk, i, m, idx_ref, cnt_ref):
        return _slot_block(idx_ref, cnt_ref, _row(geo, geo.nq, b_, hk, i), m, geo.max_blocks)

    q_col = lambda b_, hk, i, m, *t: (b_, i, 0)  # noqa: E731
    k_row = lambda b_, hk, i, m, *t: (b_, 0, kv_block(b_, hk, i, m, *t))  # noqa: E731
    q_tile = lambda b_, hk, i, m, *t: (b_, hk, 0, i, 0)  # noqa: E731
    k_tile = lambda b_, hk, i, m, *t: (b_, hk, kv_block(b_, hk, i, m, *t), 0)  # noqa: E731
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(b, hkv, geo.nq, geo.max_blocks),
        in_specs=[
            pl.BlockSpec((None, bq, 1), q_col), pl.BlockSpec((None, 1, bk), k_row),
            pl.BlockSpec((None, bq, 1), q_col) if segs else None,
            pl.BlockSpec((None, 1, bk), k_row) if segs else None,
            pl.BlockSpec((None, None, g, bq, d), q_tile), pl.BlockSpec((None, None, bk, d), k_tile),
            pl.BlockSpec((None, None, bk, dv), k_tile), pl.BlockSpec((None, None, g, bq, dv), q_tile),
            pl.BlockSpec((None, None, g, bq, 1), q_tile), pl.BlockSpec((None, None, g, bq, 1), q_tile),
        ],
        out_specs=pl.BlockSpec((None, None, g, bq, d), q_tile),
        scratch_shapes=[pltpu.VMEM((g * bq, d), jnp.float32)])
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **common), grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, hkv, g, tq_p, d), q.dtype),
        compiler_params=_params(3, 1), interpret=st.interpret, name="block_sparse_bwd_dq_tpu",
    )(kv_idx.reshape(-1), kv_cnt.reshape(-1), x["qpos_col"], x["kpos_row"], x["qseg_col"],
      x["kseg_row"], x["q"], x["k"], x["v"], do, lse2[..., None], delta[..., None])

    # dK, dV: grid (B, Hkv, nK, G, nQ) over the transposed metadata
    def q_block(b_, hk, j, i, idx_ref, cnt_ref):
        return _slot_block(idx_ref, cnt_ref, _row(geo, geo.nk, b_, hk, j), i, geo.nq)

    k_col = lambda b_, hk, j, gg, i, *t: (b_, j, 0)  # noqa: E731
    q_row = lambda b_, hk, j, gg, i, *t: (b_, 0, q_block(b_, hk, j, i, *t))  # noqa: E731
    k_tile = lambda b_, hk, j, gg, i, *t: (b_, hk, j, 0)  # noqa: E731
    q_tile = lambda b_, hk, j, gg, i, *t: (b_, hk, gg, q_block(b_, hk, j, i, *t), 0)  # noqa: E731
    r_tile = lambda b_, hk, j, gg, i, *t: (b_, hk, gg, 0, q_block(b_, hk, j, i, *t))  # noqa: E731
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(b, hkv, geo.nk, g, geo.nq),
        in_specs=[
            pl.BlockSpec((None, 1, bq), q_row), pl.BlockSpec((None, bk, 1), k_col),
            pl.BlockSpec((None, 1, bq), q_row) if segs else None,
            pl.BlockSpec((None, bk, 1), k_col) if segs else None,
            pl.BlockSpec((None, None, None, bq, d), q_tile), pl.BlockSpec((None, None, bk, d), k_tile),
            pl.BlockSpec((None, None, bk, dv), k_tile), pl.BlockSpec((None, None, None, bq, dv), q_tile),
            pl.BlockSpec((None, None, None, 1, bq), r_tile), pl.BlockSpec((None, None, None, 1, bq), r_tile),
        ],
        out_specs=[pl.BlockSpec((None, None, bk, d), k_tile), pl.BlockSpec((None, None, bk, dv), k_tile)],
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, dv), jnp.float32)])
    dk, dv_ = pl.pallas_call(
        functools.partial(_dkv_kernel, **common), grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, hkv, x["tk_p"], d), k.dtype),
                   jax.ShapeDtypeStruct((b, hkv, x["tk_p"], dv), v.dtype)],
        compiler_params=_params(3, 2), interpret=st.interpret, name="block_sparse_bwd_dkv_tpu",
    )(q_idx.reshape(-1), q_cnt.reshape(-1), x["qpos_row"], x["kpos_col"], x["qseg_row"],
      x["kseg_col"], x["q"], x["k"], x["v"], do, lse2[:, :, :, None, :], delta[:, :, :, None, :])
    unpad_kv = lambda a: a[:, :, :tk].transpose(0, 2, 1, 3)  # noqa: E731
    return _heads_last(dq, tq), unpad_kv(dk), unpad_kv(dv_)


def block_sparse_tpu(q, k, v, metadata, *, mask_fn, q_positions, kv_positions, q_segment_ids,
                     kv_segment_ids, sink_logits, softcap, scale, return_lse, interpret=False):
    """`block_sparse_reference`'s contract on Mosaic TPU (`interpret=True` ->
    `pltpu.InterpretParams()`); kernel tiles = the metadata blocks."""
    if interpret is True:
        interpret = pltpu.InterpretParams()

    def make(geo):
        return autodiff.Static(
            forward=forward, backward=backward, mask_fn=mask_fn, scale=float(scale),
            softcap=None if softcap is None else float(softcap), has_sinks=sink_logits is not None,
            config=geo, interpret=interpret or False)

    return plan.run(make, q, k, v, metadata, q_positions=q_positions,
                         kv_positions=kv_positions, q_segment_ids=q_segment_ids,
                         kv_segment_ids=kv_segment_ids, sink_logits=sink_logits,
                         return_lse=return_lse, geo=plan.geometry(metadata, q, k))


# Backend declaration for `pallas_kernels.common.resolve`: a TPU (or interpret mode); every call the api
# accepts; tiles none.
CONFIG = None
