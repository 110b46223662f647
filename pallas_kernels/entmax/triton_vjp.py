"""`entmax` backward on GPU: Pallas with the Triton lowering.

entmax's Jacobian is sparse (Peters et al. 2019, arXiv 1905.05702, Prop. 2): with
`g = p^(2-alpha)` on the support, the score cotangent is `ds = g * (dp - c)`,
`dp = dO . v`, `c = sum g dp / sum g = dO . vbar` where `vbar = sum g v / sum g` is kept by
the forward (so `c` is one XLA dot, like FlashAttention-2's `delta`). Probabilities and
weights are recomputed from the saved threshold `tau` and `l = sum p` (the forward's
renormaliser): `p = r^k / l`, `g = r^(k-1) / l^(2-alpha)`, `r = [z - tau]_+`.

Two kernels, no atomics, both visiting only the tiles live under the final thresholds
(the forward's live table; dead tiles have `p = g = 0` and contribute nothing):

* dQ: one program per (query tile, batch, head) over its live KV tiles;
* dK/dV: one program per (KV tile, batch, KV head) over the G heads of its group (GQA summed
  on chip) and, per head, the query tiles for which this KV tile is live.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.entmax.triton import Static, compact, g_norm, pow_g, pow_p, row_specs, scores
from pallas_kernels.flash import blocks
from pallas_kernels.tiles_common import NN, NT


def _dq_kernel(list_ref, cnt_ref, qpos_ref, kpos_ref, tau_ref, l_ref, c_ref, q_ref, k_ref, v_ref,
               do_ref, dq_ref, *, mask_fn, zscale, scale, alpha, block_k, num_q_blocks, num_heads,
               list_len):
    i = num_q_blocks - 1 - pl.program_id(0)
    b, h = pl.program_id(1), pl.program_id(2)
    row = (b * num_heads + h) * num_q_blocks + i
    num_full, count = cnt_ref[2 * row], cnt_ref[2 * row + 1]
    q, do = q_ref[...], do_ref[...]
    qp = qpos_ref[...][:, None]
    tau = tau_ref[...][:, None]
    gscale = g_norm(l_ref[...], alpha)[:, None]
    c = c_ref[...][:, None]

    def step(t, dq, masked):
        j = list_ref[row * list_len + t]
        sl = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        k, v = k_ref[sl, :], v_ref[sl, :]
        vis = blocks.visible(mask_fn, qp, kpos_ref[sl][None, :], None, None) if masked else None
        r = jnp.maximum(scores(q, k, zscale, vis) - tau, 0.0)
        dp = lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
        ds = pow_g(r, alpha) * gscale * (dp - c)
        return dq + lax.dot_general(ds.astype(k.dtype), k, NN, preferred_element_type=jnp.float32)

    dq = lax.fori_loop(0, num_full, functools.partial(step, masked=False),
                       jnp.zeros(q.shape, jnp.float32))
    dq = lax.fori_loop(num_full, count, functools.partial(step, masked=True), dq)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(list_ref, cnt_ref, qpos_ref, kpos_ref, tau_ref, l_ref, c_ref, q_ref, k_ref, v_ref,
                do_ref, dk_ref, dv_ref, *, mask_fn, zscale, scale, alpha, block_q, num_k_blocks,
                num_heads, group, list_len):
    j, b, hk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    kp = kpos_ref[...][:, None]                      # [bk, 1]: tiles are transposed here

    def head(g, carry):
        row = (b * num_heads + hk * group + g) * num_k_blocks + j
        num_full, count = cnt_ref[2 * row], cnt_ref[2 * row + 1]

        def step(t, carry, masked):
            dk, dv = carry
            i = list_ref[row * list_len + t]
            sl = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
            q, do = q_ref[sl, g, :], do_ref[sl, g, :]
            vis = blocks.visible(mask_fn, qpos_ref[sl][None, :], kp, None, None) if masked else None
            r_t = jnp.maximum(scores(k, q, zscale, vis) - tau_ref[g, sl][None, :], 0.0)  # [bk, bq]
            l = l_ref[g, sl]
            p_t = pow_p(r_t, alpha) * (1.0 / jnp.where(l > 0, l, 1.0))[None, :]
            dv = dv + lax.dot_general(p_t.astype(do.dtype), do, NN, preferred_element_type=jnp.float32)
            dp_t = lax.dot_general(v, do, NT, preferred_element_type=jnp.float32)
            ds_t = pow_g(r_t, alpha) * g_norm(l, alpha)[None, :] * (dp_t - c_ref[g, sl][None, :])
            dk = dk + lax.dot_general(ds_t.astype(q.dtype), q, NN, preferred_element_type=jnp.float32)
            return dk, dv

        carry = lax.fori_loop(0, num_full, functools.partial(step, masked=False), carry)
        return lax.fori_loop(num_full, count, functools.partial(step, masked=True), carry)

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = head(0, carry) if group == 1 else lax.fori_loop(0, group, head, carry)
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(st: Static, extras: dict, dout):
    """dq, dk, dv (unpadded) from the forward's padded residuals and `dO [B, Tq, H, Dv]`."""
    cfg = st.config
    (_, tq, _, d), (_, tk, _, _), (_, _, _, dv_) = st.shapes
    qp, kp, vp = extras["qp"], extras["kp"], extras["vp"]
    q_pos_p, kv_pos_p = extras["q_pos_p"], extras["kv_pos_p"]
    tau, l, vbar, live = extras["tau"], extras["l"], extras["vbar"], extras["live"]
    full = extras["full"]                                                      # [B, nQ, nK]
    b, tq_p, h, d_p = qp.shape
    tk_p, hkv, dv_p = kp.shape[1], kp.shape[2], vp.shape[3]
    group = h // hkv
    nq, nk = live.shape[2], live.shape[3]
    bq, bk = tq_p // nq, tk_p // nk
    do = blocks.pad_axis(blocks.pad_axis(dout, tq_p, 1), dv_p, 3)
    c = jnp.einsum("bthd,bthd->bht", do.astype(jnp.float32), vbar)           # [B, H, Tq_p]
    params = plgpu.CompilerParams(num_warps=cfg.num_warps_bwd, num_stages=cfg.num_stages_bwd)
    kw = dict(mask_fn=st.mask_fn, zscale=st.zscale, scale=st.scale, alpha=st.alpha)

    # dQ
    idx, count = extras["tile_list"]                     # the output pass's list: same tiles
    rev = lambda i: nq - 1 - i  # noqa: E731
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block_k=bk, num_q_blocks=nq, num_heads=h, list_len=nk, **kw),
        grid=(nq, b, h),
        in_specs=[
            pl.BlockSpec(), pl.BlockSpec(),
            pl.BlockSpec((None, bq), lambda i, b_, h_: (b_, rev(i))),
            pl.BlockSpec((None, tk_p), lambda i, b_, h_: (b_, 0)),
            row_specs(bq, nq), row_specs(bq, nq), row_specs(bq, nq),
            pl.BlockSpec((None, bq, None, d_p), lambda i, b_, h_: (b_, rev(i), h_, 0)),
            pl.BlockSpec((None, tk_p, None, d_p), lambda i, b_, h_: (b_, 0, h_ // group, 0)),
            pl.BlockSpec((None, tk_p, None, dv_p), lambda i, b_, h_: (b_, 0, h_ // group, 0)),
            pl.BlockSpec((None, bq, None, dv_p), lambda i, b_, h_: (b_, rev(i), h_, 0)),
        ],
        out_specs=pl.BlockSpec((None, bq, None, d_p), lambda i, b_, h_: (b_, rev(i), h_, 0)),
        out_shape=jax.ShapeDtypeStruct(qp.shape, qp.dtype),
        compiler_params=params, interpret=st.interpret, name="entmax_bwd_dq",
    )(idx.reshape(-1), count.reshape(-1), q_pos_p, kv_pos_p, tau, l, c, qp, kp, vp, do)

    # dK, dV
    idx_t, count_t = compact(live.swapaxes(2, 3), full.swapaxes(1, 2)[:, None])  # [B, H, nK, nQ]
    grouped = lambda x: x.reshape(b, tq_p, hkv, group, x.shape[-1])  # noqa: E731
    per_head = lambda x: x.reshape(b, hkv, group, tq_p)  # noqa: E731
    stat = pl.BlockSpec((None, None, group, tq_p), lambda j, b_, h_: (b_, h_, 0, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, block_q=bq, num_k_blocks=nk, num_heads=h, group=group,
                          list_len=nq, **kw),
        grid=(nk, b, hkv),
        in_specs=[
            pl.BlockSpec(), pl.BlockSpec(),
            pl.BlockSpec((None, tq_p), lambda j, b_, h_: (b_, 0)),
            pl.BlockSpec((None, bk), lambda j, b_, h_: (b_, j)),
            stat, stat, stat,
            pl.BlockSpec((None, tq_p, None, group, d_p), lambda j, b_, h_: (b_, 0, h_, 0, 0)),
            pl.BlockSpec((None, bk, None, d_p), lambda j, b_, h_: (b_, j, h_, 0)),
            pl.BlockSpec((None, bk, None, dv_p), lambda j, b_, h_: (b_, j, h_, 0)),
            pl.BlockSpec((None, tq_p, None, group, dv_p), lambda j, b_, h_: (b_, 0, h_, 0, 0)),
        ],
        out_specs=[pl.BlockSpec((None, bk, None, d_p), lambda j, b_, h_: (b_, j, h_, 0)),
                   pl.BlockSpec((None, bk, None, dv_p), lambda j, b_, h_: (b_, j, h_, 0))],
        out_shape=[jax.ShapeDtypeStruct(kp.shape, kp.dtype), jax.ShapeDtypeStruct(vp.shape, vp.dtype)],
        compiler_params=params, interpret=st.interpret, name="entmax_bwd_dkv",
    )(idx_t.reshape(-1), count_t.reshape(-1), q_pos_p, kv_pos_p, per_head(tau), per_head(l),
      per_head(c), grouped(qp), kp, vp, grouped(do))
    return dq[:, :tq, :, :d], dk[:, :tk, :, :d], dv[:, :tk, :, :dv_]
