"""`block_sparse` backward on GPU: Pallas with the Triton lowering (FlashAttention-2, arXiv
2307.08691, Alg. 2), two kernels and no atomics, as `flash.triton_vjp`:

* dQ: one program per (query tile, batch, GQA head group), the group's heads stacked as
  rows like the forward, visiting the KV blocks of its metadata row (full ones unmasked
  first, then the partial ones with the element predicate).
* dK/dV: one program per (KV tile, batch, KV head), looping over the G query heads of its
  group (GQA gradients summed on chip) and over the query blocks that list this KV block:
  the *transposed* metadata, built from the forward metadata in `plan.kernel_tables`.

`delta = rowsum(dO * O) - dlse` and the base-2 `lse2` come from `flash.autodiff`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.block_sparse import plan
from pallas_kernels.block_sparse.triton import (head_dim, head_view, kv_slice, masked_visible,
                                                meta_row, pad_inputs, q_tiles, row_column, runs,
                                                stack_rows, three_loops)
from pallas_kernels.flash import blocks
from pallas_kernels.tiles_common import NN, NT
from pallas_kernels.tiles_triton import dkv_block_specs, recompute_probs


def _dq_kernel(idx_ref, cnt_ref, qpos_ref, kpos_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref,
               do_ref, lse_ref, delta_ref, dq_ref, *, geo, mask_fn, scale, softcap, hp, block_k,
               q_per_meta):
    i, b, hh = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row = meta_row(geo, b, lax.div(hh, jnp.int32(geo.group // hp)), lax.div(i, jnp.int32(q_per_meta)))
    bounds = runs(cnt_ref, row)
    base = row * geo.max_blocks
    sub = geo.block_kv // block_k
    q, do = stack_rows(q_ref[...], hp), stack_rows(do_ref[...], hp)
    lse2 = stack_rows(lse_ref[...], hp)[:, None]
    delta = stack_rows(delta_ref[...], hp)[:, None]
    qp = row_column(qpos_ref[...], hp)
    qs = None if qseg_ref is None else row_column(qseg_ref[...], hp)

    def step(t, dq, mode):
        sl = kv_slice(idx_ref, base, t, sub, geo.block_kv, block_k)
        k, v = k_ref[sl, :], v_ref[sl, :]
        vis = None
        if mode:
            ks = None if kseg_ref is None else kseg_ref[sl][None, :]
            vis = masked_visible(mode, mask_fn, qp, kpos_ref[sl][None, :], qs, ks)
        p, t_ = recompute_probs(q, k, lse2, scale, softcap, vis)
        dp = lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta)
        if t_ is not None:
            ds = ds * (1.0 - t_ * t_)
        return dq + lax.dot_general(ds.astype(k.dtype), k, NN, preferred_element_type=jnp.float32)

    dq = three_loops(step, bounds, sub, jnp.zeros(q.shape, jnp.float32))
    dq = (dq * scale).astype(dq_ref.dtype)
    dq_ref[...] = dq if hp == 1 else dq.reshape(dq_ref.shape)


def _dkv_kernel(idx_ref, cnt_ref, qpos_ref, kpos_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref,
                do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, geo, mask_fn, scale, softcap,
                block_q, k_per_meta):
    j, b, hk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    m_head = hk if geo.meta_heads > 1 else 0
    row = (b * geo.meta_heads + m_head) * geo.nk + lax.div(j, jnp.int32(k_per_meta))
    bounds = runs(cnt_ref, row)
    base = row * geo.nq
    sub = geo.block_q // block_q
    k, v = k_ref[...], v_ref[...]
    kp = kpos_ref[...][:, None]            # [bk, 1]: the predicate sees a transposed tile
    ks = None if kseg_ref is None else kseg_ref[...][:, None]

    def step(t, carry, g, mode):
        dk, dv = carry
        sl = kv_slice(idx_ref, base, t, sub, geo.block_q, block_q)
        q, do = q_ref[sl, g, :], do_ref[sl, g, :]
        vis = None
        if mode:
            qs = None if qseg_ref is None else qseg_ref[sl][None, :]
            vis = masked_visible(mode, mask_fn, qpos_ref[sl][None, :], kp, qs, ks)
        p_t, t_ = recompute_probs(k, q, lse_ref[g, sl][None, :], scale, softcap, vis)     # [bk, bq]
        dv = dv + lax.dot_general(p_t.astype(do.dtype), do, NN, preferred_element_type=jnp.float32)
        dp_t = lax.dot_general(v, do, NT, preferred_element_type=jnp.float32)
        ds_t = p_t * (dp_t - delta_ref[g, sl][None, :])
        if t_ is not None:
            ds_t = ds_t * (1.0 - t_ * t_)
        dk = dk + lax.dot_general(ds_t.astype(q.dtype), q, NN, preferred_element_type=jnp.float32)
        return dk, dv

    def head(g, carry):
        return three_loops(functools.partial(step, g=g), bounds, sub, carry)

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = head(0, carry) if geo.group == 1 else lax.fori_loop(0, geo.group, head, carry)
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(st, q, k, v, dout, q_pos, kv_pos, q_seg, kv_seg, lse2, delta, kv_idx, kv_cnt, q_idx,
             q_cnt):
    cfg, geo = st.config
    b, tq, h, d = q.shape
    tk, hkv, dv_ = k.shape[1], k.shape[2], v.shape[3]
    g = geo.group
    qp, kp, vp, q_pos_p, kv_pos_p, q_seg_p, kv_seg_p = pad_inputs(
        geo, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    tq_p, tk_p, d_p, dv_p = qp.shape[1], kp.shape[1], qp.shape[3], vp.shape[3]
    do = blocks.pad_axis(blocks.pad_axis(dout, tq_p, 1), dv_p, 3)     # zero rows: no gradient
    lse2 = blocks.pad_axis(lse2, tq_p, 2, 1e30)
    delta = blocks.pad_axis(delta, tq_p, 2, 0.0)
    params = plgpu.CompilerParams(num_warps=cfg.num_warps_bwd, num_stages=cfg.num_stages_bwd)
    common = dict(geo=geo, mask_fn=st.mask_fn, scale=st.scale, softcap=st.softcap)
    segs = q_seg is not None

    # dQ: grid (query tiles, B, head groups)
    hp, bq = q_tiles(geo, cfg.block_rows_dq, cfg.max_heads_per_program)
    bk = plan.pow2_tile(cfg.block_k_dq, geo.block_kv, "block_kv", 16)
    hd, per_kv = head_dim(hp), g // hp
    row_q = pl.BlockSpec((None, bq), lambda i, b_, hh: (b_, i))
    row_k = pl.BlockSpec((None, tk_p), lambda i, b_, hh: (b_, 0))
    q_spec = lambda dd: pl.BlockSpec((None, bq, None, hd, dd), lambda i, b_, hh: (b_, i, hh, 0, 0))  # noqa: E731
    k_spec = lambda dd: pl.BlockSpec((None, tk_p, None, dd),  # noqa: E731
                                     lambda i, b_, hh: (b_, 0, hh // per_kv, 0))
    r_spec = pl.BlockSpec((None, bq, None, hd), lambda i, b_, hh: (b_, i, hh, 0))
    rows_view = lambda x: x.transpose(0, 2, 1).reshape(b, tq_p, h // hp, hp)  # noqa: E731
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, hp=hp, block_k=bk, q_per_meta=geo.block_q // bq, **common),
        grid=(tq_p // bq, b, h // hp),
        in_specs=[pl.BlockSpec(), pl.BlockSpec(), row_q, row_k, row_q if segs else None,
                  row_k if segs else None, q_spec(d_p), k_spec(d_p), k_spec(dv_p), q_spec(dv_p),
                  r_spec, r_spec],
        out_specs=q_spec(d_p),
        out_shape=jax.ShapeDtypeStruct((b, tq_p, h // hp, hp, d_p), q.dtype),
        compiler_params=params, interpret=st.interpret, name="block_sparse_bwd_dq",
    )(kv_idx.reshape(-1), kv_cnt.reshape(-1), q_pos_p, kv_pos_p, q_seg_p, kv_seg_p,
      head_view(qp, hp), kp, vp, head_view(do, hp), rows_view(lse2), rows_view(delta))
    dq = dq.reshape(b, tq_p, h, d_p)

    # dK, dV: grid (KV tiles, B, KV heads), transposed metadata
    bq = plan.pow2_tile(cfg.block_q_dkv, geo.block_q, "block_q", 16)
    bk = plan.pow2_tile(cfg.block_k_dkv, geo.block_kv, "block_kv", 16)
    grouped = lambda x: x.reshape(b, tq_p, hkv, g, x.shape[-1])  # noqa: E731
    per_head = lambda x: x.reshape(b, hkv, g, tq_p)  # noqa: E731
    in_specs, out_specs = dkv_block_specs(tq_p, bk, g, d_p, dv_p, segs)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, block_q=bq, k_per_meta=geo.block_kv // bk, **common),
        grid=(tk_p // bk, b, hkv),
        in_specs=[pl.BlockSpec(), pl.BlockSpec(), *in_specs],
        out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype), jax.ShapeDtypeStruct(vp.shape, v.dtype)],
        compiler_params=params, interpret=st.interpret, name="block_sparse_bwd_dkv",
    )(q_idx.reshape(-1), q_cnt.reshape(-1), q_pos_p, kv_pos_p, q_seg_p, kv_seg_p, grouped(qp), kp,
      vp, grouped(do), per_head(lse2), per_head(delta))
    return dq[:, :tq, :, :d], dk[:, :tk, :, :d], dv[:, :tk, :, :dv_]
