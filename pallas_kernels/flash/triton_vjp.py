"""`flash` backward on GPU: Pallas with the Triton lowering (FlashAttention-2, arXiv
2307.08691, Alg. 2), split in two kernels so that nothing needs atomics:

* dK/dV: one program per (KV block, batch, KV head). It keeps `k, v [block_k, D]` and the
  float32 accumulators on chip and loops over the G query heads of its group (GQA: the
  group's gradients are summed here, KV never repeated) and over the query blocks that
  the transposed block table lists, recomputing `P^T = exp2(K Q^T - lse)`.
* dQ: one program per (query block, batch, head), looping over its KV blocks like the
  forward pass.

Full blocks skip the element predicate, absent blocks are never read (`blocks.tables`).
`delta = rowsum(dO * O) - dlse` and base-2 `lse2` come from `autodiff`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash import blocks
from pallas_kernels.flash.triton import TritonConfig, fit_block, pad_all
from pallas_kernels.tiles_common import NN, NT
from pallas_kernels.tiles_triton import dkv_block_specs, recompute_probs


def _dq_kernel(tab_ref, qpos_ref, kpos_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, dq_ref, *, mask_fn, scale, softcap, block_k, num_q_blocks):
    i = num_q_blocks - 1 - pl.program_id(0)
    b = pl.program_id(1)
    base = (b * num_q_blocks + i) * 4
    lo, flo, fhi, hi = (tab_ref[base + c] for c in range(4))
    q, do = q_ref[...], do_ref[...]
    lse2 = lse_ref[...][:, None]
    delta = delta_ref[...][:, None]
    qp = qpos_ref[...][:, None]
    qs = None if qseg_ref is None else qseg_ref[...][:, None]

    def step(j, dq, masked):
        sl = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        k, v = k_ref[sl, :], v_ref[sl, :]
        vis = None
        if masked:
            ks = None if kseg_ref is None else kseg_ref[sl][None, :]
            vis = blocks.visible(mask_fn, qp, kpos_ref[sl][None, :], qs, ks)
        p, t = recompute_probs(q, k, lse2, scale, softcap, vis)
        dp = lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta)
        if t is not None:
            ds = ds * (1.0 - t * t)
        return dq + lax.dot_general(ds.astype(k.dtype), k, NN, preferred_element_type=jnp.float32)

    dq = jnp.zeros(q.shape, jnp.float32)
    dq = lax.fori_loop(lo, flo, functools.partial(step, masked=True), dq)
    dq = lax.fori_loop(flo, fhi, functools.partial(step, masked=False), dq)
    dq = lax.fori_loop(fhi, hi, functools.partial(step, masked=True), dq)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(tab_ref, qpos_ref, kpos_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, *, mask_fn, scale, softcap, block_q,
                num_k_blocks, group):
    j, b = pl.program_id(0), pl.program_id(1)
    base = (b * num_k_blocks + j) * 4
    lo, flo, fhi, hi = (tab_ref[base + c] for c in range(4))
    k, v = k_ref[...], v_ref[...]
    kp = kpos_ref[...][:, None]            # [bk, 1]: the predicate sees a transposed tile
    ks = None if kseg_ref is None else kseg_ref[...][:, None]

    def step(i, carry, g, masked):
        dk, dv = carry
        sl = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
        q, do = q_ref[sl, g, :], do_ref[sl, g, :]
        vis = None
        if masked:
            qs = None if qseg_ref is None else qseg_ref[sl][None, :]
            vis = blocks.visible(mask_fn, qpos_ref[sl][None, :], kp, qs, ks)
        p_t, t = recompute_probs(k, q, lse_ref[g, sl][None, :], scale, softcap, vis)   # [bk, bq]
        dv = dv + lax.dot_general(p_t.astype(do.dtype), do, NN, preferred_element_type=jnp.float32)
        dp_t = lax.dot_general(v, do, NT, preferred_element_type=jnp.float32)
        ds_t = p_t * (dp_t - delta_ref[g, sl][None, :])
        if t is not None:
            ds_t = ds_t * (1.0 - t * t)
        dk = dk + lax.dot_general(ds_t.astype(q.dtype), q, NN, preferred_element_type=jnp.float32)
        return dk, dv

    def head(g, carry):
        carry = lax.fori_loop(lo, flo, functools.partial(step, g=g, masked=True), carry)
        carry = lax.fori_loop(flo, fhi, functools.partial(step, g=g, masked=False), carry)
        return lax.fori_loop(fhi, hi, functools.partial(step, g=g, masked=True), carry)

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = head(0, carry) if group == 1 else lax.fori_loop(0, group, head, carry)
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(st, q, k, v, dout, q_pos, kv_pos, q_seg, kv_seg, lse2, delta):
    cfg: TritonConfig = st.config
    b, tq, h, d = q.shape
    tk, hkv, dv_ = k.shape[1], k.shape[2], v.shape[3]
    group = h // hkv
    # dO is padded like O: zero rows and columns contribute nothing.
    qp, kp, vp, q_pos_p, kv_pos_p, q_seg_p, kv_seg_p = pad_all(
        st, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    tq_p, tk_p, d_p, dv_p = qp.shape[1], kp.shape[1], qp.shape[3], vp.shape[3]
    do = blocks.pad_axis(blocks.pad_axis(dout, tq_p, 1), dv_p, 3)
    lse2 = blocks.pad_axis(lse2, tq_p, 2, 1e30)
    delta = blocks.pad_axis(delta, tq_p, 2, 0.0)
    params = plgpu.CompilerParams(num_warps=cfg.num_warps_bwd, num_stages=cfg.num_stages_bwd)
    common = dict(mask_fn=st.mask_fn, scale=st.scale, softcap=st.softcap)
    segs = q_seg is not None

    # dQ
    bq, bk = fit_block(cfg.block_q_dq, tq), fit_block(cfg.block_k_dq, tk)
    nq = tq_p // bq
    tab = blocks.tables(st.mask_fn, q_pos_p, kv_pos_p, q_seg_p, kv_seg_p, bq, bk).reshape(-1)
    rev = lambda i: nq - 1 - i  # noqa: E731
    row_q = pl.BlockSpec((None, bq), lambda i, b_, h_: (b_, rev(i)))
    row_k = pl.BlockSpec((None, tk_p), lambda i, b_, h_: (b_, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block_k=bk, num_q_blocks=nq, **common),
        grid=(nq, b, h),
        in_specs=[
            pl.BlockSpec(), row_q, row_k, row_q if segs else None, row_k if segs else None,
            pl.BlockSpec((None, bq, None, d_p), lambda i, b_, h_: (b_, rev(i), h_, 0)),
            pl.BlockSpec((None, tk_p, None, d_p), lambda i, b_, h_: (b_, 0, h_ // group, 0)),
            pl.BlockSpec((None, tk_p, None, dv_p), lambda i, b_, h_: (b_, 0, h_ // group, 0)),
            pl.BlockSpec((None, bq, None, dv_p), lambda i, b_, h_: (b_, rev(i), h_, 0)),
            pl.BlockSpec((None, None, bq), lambda i, b_, h_: (b_, h_, rev(i))),
            pl.BlockSpec((None, None, bq), lambda i, b_, h_: (b_, h_, rev(i))),
        ],
        out_specs=pl.BlockSpec((None, bq, None, d_p), lambda i, b_, h_: (b_, rev(i), h_, 0)),
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=params, interpret=st.interpret, name="flash_bwd_dq",
    )(tab, q_pos_p, kv_pos_p, q_seg_p, kv_seg_p, qp, kp, vp, do, lse2, delta)

    # dK, dV
    bq, bk = fit_block(cfg.block_q_dkv, tq), fit_block(cfg.block_k_dkv, tk)
    nk = tk_p // bk
    tab_t = blocks.tables(st.mask_fn, q_pos_p, kv_pos_p, q_seg_p, kv_seg_p, bq, bk,
                          transpose=True).reshape(-1)
    grouped = lambda x: x.reshape(b, tq_p, hkv, group, x.shape[-1])  # noqa: E731
    per_head = lambda x: x.reshape(b, hkv, group, tq_p)  # noqa: E731
    in_specs, out_specs = dkv_block_specs(tq_p, bk, group, d_p, dv_p, segs)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, block_q=bq, num_k_blocks=nk, group=group, **common),
        grid=(nk, b, hkv),
        in_specs=[pl.BlockSpec(), *in_specs],
        out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype), jax.ShapeDtypeStruct(vp.shape, v.dtype)],
        compiler_params=params, interpret=st.interpret, name="flash_bwd_dkv",
    )(tab_t, q_pos_p, kv_pos_p, q_seg_p, kv_seg_p, grouped(qp), kp, vp, grouped(do),
      per_head(lse2), per_head(delta))
    return dq[:, :tq, :, :d], dk[:, :tk, :, :d], dv[:, :tk, :, :dv_]
