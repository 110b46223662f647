"""`token_sparse` backward on GPU: Pallas with the Triton lowering, one kernel.

One program per (query token, batch, kv head), the group's query heads as rows, walking the
same listed KV rows as the forward (`triton.tile`). Per iteration it recomputes
`P = exp2(S - lse2)` (FlashAttention-2, arXiv 2307.08691, Alg. 2), adds `dS K` to dq (kept
on chip, written once), and scatters `P^T dO` and `dS^T Q` into float32 dk/dv buffers with
atomic adds (`jax.experimental.pallas.triton.atomic_add`): the KV rows of one query are
another query's too, so no program owns them. The buffers carry one spare row that
unlisted entries point at; on GPU the atomics are also masked, so that row stays idle. In
interpret mode (CPU) the atomics run sequentially through Pallas' discharge rule (no mask
there, hence the spare row; it needs the rows of one tile distinct, which is why the
listed entries must be).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash import blocks
from pallas_kernels.flash.triton import logits2
from pallas_kernels.token_sparse.triton import (NN, TN, geometry, group_view, load_pieces, prepare,
                                                qk, specs, tile, warps)


def _scatter_add(ref, rows, listed, start, width, val, interpret):
    """`ref[rows, start:start + width] += val` (float32 atomics); unlisted rows go to the
    spare last row (and are masked off on GPU)."""
    spare = ref.shape[0] - 1
    r = jnp.broadcast_to(jnp.where(listed, rows, spare)[:, None], val.shape)
    c = jnp.broadcast_to(start + jnp.arange(width, dtype=jnp.int32)[None, :], val.shape)
    mask = None if interpret else jnp.broadcast_to(listed[:, None], val.shape)
    plgpu.atomic_add(ref, (r, c), val, mask=mask)


def _bwd_kernel(cnt_ref, qpos_ref, idx_ref, kpos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, dk_in, dv_in, dq_ref, dk_ref, dv_ref, *, geo, scale, softcap,
                interpret):
    del dk_in, dv_in                      # aliased with dk_ref, dv_ref (zero-initialised)
    t, b, h = pl.program_id(0), pl.program_id(1), lax.div(pl.program_id(2), jnp.int32(geo.split))
    n_iter = cnt_ref[(b * geo.t + t) * geo.hkv + h]
    q_pos = qpos_ref[b * geo.t + t]
    qs = [q_ref[:, pl.ds(start, w)] for start, w in geo.d_pieces]
    dos = [do_ref[:, pl.ds(start, w)] for start, w in geo.dv_pieces]
    lse2 = lse_ref[...][:, None]
    delta = delta_ref[...][:, None]

    def step(j, dq):
        rows, listed, vis = tile(geo, idx_ref, kpos_ref, j, q_pos)
        ks = load_pieces(k_ref, rows, geo.d_pieces)
        vs = load_pieces(v_ref, rows, geo.dv_pieces)
        s2, tanh = logits2(qk(qs, ks), scale, softcap)
        p = jnp.where(vis, jnp.exp2(s2 - lse2), 0.0)                          # [G_p, R]
        ds = p * (qk(dos, vs) - delta)
        if tanh is not None:
            ds = ds * (1.0 - tanh * tanh)
        for (start, w), do in zip(geo.dv_pieces, dos):
            dv_t = lax.dot_general(p.astype(do.dtype), do, TN, preferred_element_type=jnp.float32)
            _scatter_add(dv_ref, rows, listed, start, w, dv_t, interpret)
        for (start, w), q in zip(geo.d_pieces, qs):
            dk_t = lax.dot_general(ds.astype(q.dtype), q, TN, preferred_element_type=jnp.float32)
            _scatter_add(dk_ref, rows, listed, start, w, dk_t * scale, interpret)
        return tuple(a + lax.dot_general(ds.astype(kk.dtype), kk, NN,
                                         preferred_element_type=jnp.float32)
                     for a, kk in zip(dq, ks))

    dq0 = tuple(jnp.zeros((geo.rows_q, w), jnp.float32) for _, w in geo.d_pieces)
    dq = lax.fori_loop(0, n_iter, step, dq0)
    for (start, w), a in zip(geo.d_pieces, dq):
        dq_ref[:, pl.ds(start, w)] = (a * scale).astype(dq_ref.dtype)


def backward(st, q, k, v, dout, q_pos, kv_pos, q_seg, kv_seg, lse2, delta, indices):
    del q_seg, kv_seg
    cfg, geo = st.config
    geo = geometry(q, k, v, indices, geo.block_size, geo.causal, cfg.block_k_bwd, cfg.max_rows)
    b, t, h, d = q.shape
    s, dv = k.shape[1], v.shape[3]
    qg, kp, vp, kv_pos_p, idx, n_iter, q_pos_f = prepare(geo, q, k, v, q_pos, kv_pos, indices)
    sp = specs(geo, b)
    do = group_view(blocks.pad_axis(dout, sp["dv_p"], 3), geo)
    rows_view = lambda x, fill: blocks.pad_axis(  # noqa: E731  [B, H, T] -> [B, T, Hkv, G_p]
        x.transpose(0, 2, 1).reshape(b, t, geo.hkv, geo.group), geo.group_p, 3, fill)
    acc_spec = lambda width: pl.BlockSpec((None, geo.s_p + 1, None, width),  # noqa: E731
                                          lambda t_, b_, hh: (b_, 0, lax.div(hh, jnp.int32(geo.split)), 0))
    dk0 = jnp.zeros((b, geo.s_p + 1, geo.hkv, sp["d_p"]), jnp.float32)
    dv0 = jnp.zeros((b, geo.s_p + 1, geo.hkv, sp["dv_p"]), jnp.float32)
    dq, dk, dv_ = pl.pallas_call(
        functools.partial(_bwd_kernel, geo=geo, scale=st.scale, softcap=st.softcap,
                          interpret=bool(st.interpret)),
        grid=sp["grid"],
        in_specs=[sp["whole"], sp["whole"], sp["idx"], sp["kpos"], sp["q"], sp["k"], sp["v"],
                  sp["o"], sp["row"], sp["row"], acc_spec(sp["d_p"]), acc_spec(sp["dv_p"])],
        out_specs=[sp["q"], acc_spec(sp["d_p"]), acc_spec(sp["dv_p"])],
        out_shape=[jax.ShapeDtypeStruct(qg.shape, q.dtype), jax.ShapeDtypeStruct(dk0.shape, jnp.float32),
                   jax.ShapeDtypeStruct(dv0.shape, jnp.float32)],
        input_output_aliases={10: 1, 11: 2},
        compiler_params=plgpu.CompilerParams(num_warps=warps(cfg.num_warps_bwd, geo),
                                             num_stages=cfg.num_stages_bwd),
        interpret=st.interpret,
        name="token_sparse_bwd",
    )(n_iter, q_pos_f, idx, kv_pos_p, qg, kp, vp, do, rows_view(lse2, 1e30), rows_view(delta, 0.0),
      dk0, dv0)
    dq = dq[:, :, :, :geo.group, :d].reshape(b, t, h, d)
    return dq, dk[:, :s, :, :d].astype(k.dtype), dv_[:, :s, :, :dv].astype(v.dtype)
