"""`flash` on TPU: Pallas Mosaic kernels, forward and backward (FlashAttention-2, arXiv
2307.08691), in the style of splash attention: the grid walks every (query block, KV
block) pair, the block table (`blocks.tables`, through scalar prefetch) says which pairs
to compute; for the others the KV index map repeats the previous block (no DMA) and the
body is skipped. Full blocks skip the element predicate. Accumulators live in VMEM scratch
across the reduction axis (the last grid axis, "arbitrary").

* forward: grid (B, H, nQ, nK); online softmax in base 2, sink logit as the initial
  running max with denominator 1. With `block_score_size`, a separate specialisation
  also keeps the HySparse block-max scores of the query block in VMEM (`scores.py`).
* dQ: grid (B, H, nQ, nK).
* dK/dV: grid (B, Hkv, nK, G, nQ): the G query heads of a KV head and the query blocks
  are both reduction axes, so GQA gradients are summed in VMEM (KV never repeated).

Arrays are laid out `[B, H, T, D]` inside (one transpose each way); positions and segment
ids travel both as columns `[B, T, 1]` and rows `[B, 1, T]` so the predicate sees
`[bq, 1] x [1, bk]` tiles (or the transposed tile in dK/dV). Untested on TPU hardware here
(this workplace has no TPU): checked in `pltpu.InterpretParams()` mode on CPU only.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash import autodiff, blocks, scores
from pallas_kernels.tiles_common import LOG2E, MASK_VALUE, NN, NT, logits2
from pallas_kernels.tiles_tpu import dot


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    block_q: int = 128
    block_k: int = 128
    block_q_dq: int = 128
    block_k_dq: int = 128
    block_q_dkv: int = 128
    block_k_dkv: int = 128


def _seg(ref):
    return None if ref is None else ref[...]


def _ranges(tab_ref, outer, inner, n_inner):
    base = (outer * n_inner + inner) * 4
    return tuple(tab_ref[base + c] for c in range(4))


def _clamp(j, lo, hi):
    return jnp.minimum(jnp.maximum(j, lo), jnp.maximum(hi - 1, lo))


def _run_and_full(j, lo, flo, fhi, hi):
    run = (j >= lo) & (j < hi)
    full = (j >= flo) & (j < fhi)
    return run & full, run & jnp.logical_not(full)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(tab_ref, sink_ref, qpos_ref, kpos_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref,
                o_ref, lse_ref, *rest, mask_fn, scale, softcap, nq, score=None):
    """`score=(size, r, sub)` (score specialisation only): `rest` starts with `sc_ref`, the
    `[bq, nS_pad]` output block of block-max logits (base 2), resident in VMEM across the
    KV axis and rescaled in place at the last step (HySparse Alg. 1). KV tile `j` updates
    score column `j // r` (a score block spans `r` tiles) or, with `sub > 1` (a tile spans
    `sub` score blocks), columns `j * sub + u` from static lane slices."""
    sc_ref, (m_sc, l_sc, acc_sc) = (rest[0], rest[1:]) if score else (None, rest)
    b, h, i, j = (pl.program_id(a) for a in range(4))
    lo, flo, fhi, hi = _ranges(tab_ref, b, i, nq)

    @pl.when(j == 0)
    def _init():
        if sink_ref is not None:
            m_sc[...] = jnp.full(m_sc.shape, sink_ref[h] * LOG2E, jnp.float32)
            l_sc[...] = jnp.ones(l_sc.shape, jnp.float32)
        else:
            m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
            l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)
        if sc_ref is not None:
            sc_ref[...] = jnp.full(sc_ref.shape, MASK_VALUE, jnp.float32)

    def update_score(col, val):
        """Column `col` of sc_ref <- max(itself, val [bq, 1]), on its aligned 128-lane window."""
        w = pl.multiple_of((col // 128) * 128, 128)
        win = sc_ref[:, pl.ds(w, 128)]
        lane = jax.lax.broadcasted_iota(jnp.int32, win.shape, 1)
        sc_ref[:, pl.ds(w, 128)] = jnp.where(lane == col - w, jnp.maximum(win, val), win)

    def step(masked):
        s, _ = logits2(dot(q_ref[...], k_ref[...], NT), scale, softcap)
        if masked:
            vis = blocks.visible(mask_fn, qpos_ref[...], kpos_ref[...], _seg(qseg_ref), _seg(kseg_ref))
            s = jnp.where(vis, s, MASK_VALUE)
        m = m_sc[...]
        s_max = s.max(axis=-1, keepdims=True)
        m_new = jnp.maximum(m, s_max)
        if sc_ref is not None:
            size, r, sub = score
            if sub == 1:
                update_score(j // r, s_max)
            else:
                for u in range(sub):
                    update_score(j * sub + u, s[:, u * size:(u + 1) * size].max(axis=-1, keepdims=True))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new)
        if masked:
            p = jnp.where(vis, p, 0.0)
        m_sc[...] = m_new
        l_sc[...] = l_sc[...] * alpha + p.sum(axis=-1, keepdims=True)
        v = v_ref[...]
        acc_sc[...] = acc_sc[...] * alpha + dot(p.astype(v.dtype), v, NN)

    unmasked, masked = _run_and_full(j, lo, flo, fhi, hi)
    pl.when(unmasked)(lambda: step(False))
    pl.when(masked)(lambda: step(True))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l = l_sc[...]
        seen = l > 0.0
        l_safe = jnp.where(seen, l, 1.0)
        o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, (m_sc[...] + jnp.log2(l_safe)) * (1.0 / LOG2E), -jnp.inf)
        if sc_ref is not None:   # exp(block max - m) / l == exp2(raw - lse2); empty rows 0
            lse2 = m_sc[...] + jnp.log2(l_safe)
            sc_ref[...] = jnp.where(seen, jnp.exp2(sc_ref[...] - lse2), 0.0)


def _prepare(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    """Pad to whole blocks, move heads before the sequence, positions as columns/rows."""
    cfg: TpuConfig = st.config
    tq, tk = q.shape[1], k.shape[1]
    mq = max(cfg.block_q, cfg.block_q_dq, cfg.block_q_dkv)
    mk = max(cfg.block_k, cfg.block_k_dq, cfg.block_k_dkv)
    tq_p, tk_p = blocks.round_up(tq, mq), blocks.round_up(tk, mk)
    heads_first = lambda x, t: blocks.pad_axis(x, t, 1).transpose(0, 2, 1, 3)  # noqa: E731
    pad = lambda x, t: blocks.pad_axis(x, t, 1, -1)  # noqa: E731
    q_pos, kv_pos, q_seg, kv_seg = pad(q_pos, tq_p), pad(kv_pos, tk_p), pad(q_seg, tq_p), pad(kv_seg, tk_p)
    col = lambda x: None if x is None else x[:, :, None]  # noqa: E731
    row = lambda x: None if x is None else x[:, None, :]  # noqa: E731
    return dict(q=heads_first(q, tq_p), k=heads_first(k, tk_p), v=heads_first(v, tk_p),
                q_pos=q_pos, kv_pos=kv_pos, q_seg=q_seg, kv_seg=kv_seg,
                qpos_col=col(q_pos), qpos_row=row(q_pos), kpos_col=col(kv_pos), kpos_row=row(kv_pos),
                qseg_col=col(q_seg), qseg_row=row(q_seg), kseg_col=col(kv_seg), kseg_row=row(kv_seg),
                tq_p=tq_p, tk_p=tk_p)


def _block(block, length_p):
    return min(block, length_p)


def _params(st, n_parallel, n_arbitrary):
    return pltpu.CompilerParams(
        dimension_semantics=("parallel",) * n_parallel + ("arbitrary",) * n_arbitrary)


def forward(st, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg):
    return _forward(st, None, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg)


def score_layout(block_k: int, size: int):
    """(KV tile, r, sub) of the score specialisation: a score block is `r` tiles, or a tile
    is `sub` score blocks; otherwise the tile shrinks to gcd(tile, size)."""
    if size % block_k == 0:
        return block_k, size // block_k, 1
    if block_k % size == 0:
        return block_k, 1, block_k // size
    tile = math.gcd(block_k, size)
    if tile < 8:
        raise ValueError(
            f"block_score_size={size} with impl='mosaic_tpu': must divide or be a multiple of "
            f"the KV tile ({block_k}), or share a factor >= 8 with it")
    return tile, size // tile, 1


def forward_scores(st, spec, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg):
    """`forward` plus the HySparse block-max scores `[B, H, Tq, ceil(Tk/size)]` float32,
    computed and rescaled inside the kernel (the score row block stays in VMEM)."""
    return _forward(st, spec, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg)


def _forward(st, spec, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg):
    cfg: TpuConfig = st.config
    b, tq, h, d = q.shape
    hkv, dv = k.shape[2], v.shape[3]
    group = h // hkv
    x = _prepare(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    bq, bk = _block(cfg.block_q, x["tq_p"]), _block(cfg.block_k, x["tk_p"])
    score = None
    if spec is not None:
        bk, r, sub = score_layout(bk, spec.size)
        score = (spec.size, r, sub)
        n_score = scores.num_blocks(spec.size, k.shape[1])
        n_score_p = blocks.round_up(scores.num_blocks(spec.size, x["tk_p"]), 128)
    nq, nk = x["tq_p"] // bq, x["tk_p"] // bk
    tab = blocks.tables(st.mask_fn, x["q_pos"], x["kv_pos"], x["q_seg"], x["kv_seg"], bq, bk).reshape(-1)

    def kv_block(b_, h_, i, j, tab_ref):
        lo, _, _, hi = _ranges(tab_ref, b_, i, nq)
        return _clamp(j, lo, hi)

    q_col = lambda b_, h_, i, j, t: (b_, i, 0)  # noqa: E731
    k_row = lambda b_, h_, i, j, t: (b_, 0, kv_block(b_, h_, i, j, t))  # noqa: E731
    segs = q_seg is not None
    in_specs = [
        None if sinks is None else pl.BlockSpec(memory_space=pltpu.SMEM),
        pl.BlockSpec((None, bq, 1), q_col),
        pl.BlockSpec((None, 1, bk), k_row),
        pl.BlockSpec((None, bq, 1), q_col) if segs else None,
        pl.BlockSpec((None, 1, bk), k_row) if segs else None,
        pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j, t: (b_, h_, i, 0)),
        pl.BlockSpec((None, None, bk, d),
                     lambda b_, h_, i, j, t: (b_, h_ // group, kv_block(b_, h_, i, j, t), 0)),
        pl.BlockSpec((None, None, bk, dv),
                     lambda b_, h_, i, j, t: (b_, h_ // group, kv_block(b_, h_, i, j, t), 0)),
    ]
    out_specs = [pl.BlockSpec((None, None, bq, dv), lambda b_, h_, i, j, t: (b_, h_, i, 0)),
                 pl.BlockSpec((None, None, bq, 1), lambda b_, h_, i, j, t: (b_, h_, i, 0))]
    out_shape = [jax.ShapeDtypeStruct((b, h, x["tq_p"], dv), q.dtype),
                 jax.ShapeDtypeStruct((b, h, x["tq_p"], 1), jnp.float32)]
    if spec is not None:
        out_specs.append(pl.BlockSpec((None, None, bq, n_score_p), lambda b_, h_, i, j, t: (b_, h_, i, 0)))
        out_shape.append(jax.ShapeDtypeStruct((b, h, x["tq_p"], n_score_p), jnp.float32))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(b, h, nq, nk), in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, dv), jnp.float32)])
    kernel = functools.partial(_fwd_kernel, mask_fn=st.mask_fn, scale=st.scale, softcap=st.softcap,
                               nq=nq)
    if spec is not None:
        kernel = functools.partial(kernel, score=score)
    res = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=_params(st, 3, 1), interpret=st.interpret,
        name="flash_fwd_tpu" if spec is None else "flash_fwd_block_scores_tpu",
    )(tab, sinks, x["qpos_col"], x["kpos_row"], x["qseg_col"], x["kseg_row"], x["q"], x["k"], x["v"])
    out, lse = res[0][:, :, :tq].transpose(0, 2, 1, 3), res[1][:, :, :tq, 0]
    if spec is None:
        return out, lse
    return out, lse, res[2][:, :, :tq, :n_score]


# ----------------------------------------------------------------------------- backward


def _dq_kernel(tab_ref, qpos_ref, kpos_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, dq_ref, dq_sc, *, mask_fn, scale, softcap, nq):
    b, _, i, j = (pl.program_id(a) for a in range(4))
    lo, flo, fhi, hi = _ranges(tab_ref, b, i, nq)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def step(masked):
        k = k_ref[...]
        s, t = logits2(dot(q_ref[...], k, NT), scale, softcap)
        p = jnp.exp2(s - lse_ref[...])
        if masked:
            vis = blocks.visible(mask_fn, qpos_ref[...], kpos_ref[...], _seg(qseg_ref), _seg(kseg_ref))
            p = jnp.where(vis, p, 0.0)
        ds = p * (dot(do_ref[...], v_ref[...], NT) - delta_ref[...])
        if t is not None:
            ds = ds * (1.0 - t * t)
        dq_sc[...] += dot(ds.astype(k.dtype), k, NN)

    unmasked, masked = _run_and_full(j, lo, flo, fhi, hi)
    pl.when(unmasked)(lambda: step(False))
    pl.when(masked)(lambda: step(True))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(tab_ref, qpos_ref, kpos_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, mask_fn, scale, softcap, nk):
    b, _, j, g, i = (pl.program_id(a) for a in range(5))
    lo, flo, fhi, hi = _ranges(tab_ref, b, j, nk)

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def step(masked):
        q, do = q_ref[...], do_ref[...]
        s_t, t = logits2(dot(k_ref[...], q, NT), scale, softcap)            # [bk, bq]
        p_t = jnp.exp2(s_t - lse_ref[...])
        if masked:
            vis = blocks.visible(mask_fn, qpos_ref[...], kpos_ref[...], _seg(qseg_ref), _seg(kseg_ref))
            p_t = jnp.where(vis, p_t, 0.0)
        dv_sc[...] += dot(p_t.astype(do.dtype), do, NN)
        ds_t = p_t * (dot(v_ref[...], do, NT) - delta_ref[...])
        if t is not None:
            ds_t = ds_t * (1.0 - t * t)
        dk_sc[...] += dot(ds_t.astype(q.dtype), q, NN)

    unmasked, masked = _run_and_full(i, lo, flo, fhi, hi)
    pl.when(unmasked)(lambda: step(False))
    pl.when(masked)(lambda: step(True))

    @pl.when((g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward(st, q, k, v, dout, q_pos, kv_pos, q_seg, kv_seg, lse2, delta):
    cfg: TpuConfig = st.config
    b, tq, h, d = q.shape
    tk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    group = h // hkv
    x = _prepare(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    tq_p, tk_p = x["tq_p"], x["tk_p"]
    do = blocks.pad_axis(dout, tq_p, 1).transpose(0, 2, 1, 3)
    lse2 = blocks.pad_axis(lse2, tq_p, 2, 1e30)
    delta = blocks.pad_axis(delta, tq_p, 2, 0.0)
    common = dict(mask_fn=st.mask_fn, scale=st.scale, softcap=st.softcap)
    segs = q_seg is not None

    # dQ: grid (B, H, nQ, nK)
    bq, bk = _block(cfg.block_q_dq, tq_p), _block(cfg.block_k_dq, tk_p)
    nq, nk = tq_p // bq, tk_p // bk
    tab = blocks.tables(st.mask_fn, x["q_pos"], x["kv_pos"], x["q_seg"], x["kv_seg"], bq, bk).reshape(-1)

    def kv_block(b_, i, j, tab_ref):
        lo, _, _, hi = _ranges(tab_ref, b_, i, nq)
        return _clamp(j, lo, hi)

    q_col = lambda b_, h_, i, j, t: (b_, i, 0)  # noqa: E731
    k_row = lambda b_, h_, i, j, t: (b_, 0, kv_block(b_, i, j, t))  # noqa: E731
    q_tile = lambda b_, h_, i, j, t: (b_, h_, i, 0)  # noqa: E731
    k_tile = lambda b_, h_, i, j, t: (b_, h_ // group, kv_block(b_, i, j, t), 0)  # noqa: E731
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(b, h, nq, nk),
        in_specs=[
            pl.BlockSpec((None, bq, 1), q_col), pl.BlockSpec((None, 1, bk), k_row),
            pl.BlockSpec((None, bq, 1), q_col) if segs else None,
            pl.BlockSpec((None, 1, bk), k_row) if segs else None,
            pl.BlockSpec((None, None, bq, d), q_tile), pl.BlockSpec((None, None, bk, d), k_tile),
            pl.BlockSpec((None, None, bk, dv), k_tile), pl.BlockSpec((None, None, bq, dv), q_tile),
            pl.BlockSpec((None, None, bq, 1), q_tile), pl.BlockSpec((None, None, bq, 1), q_tile),
        ],
        out_specs=pl.BlockSpec((None, None, bq, d), q_tile),
        scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)])
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, nq=nq, **common), grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, h, tq_p, d), q.dtype),
        compiler_params=_params(st, 3, 1), interpret=st.interpret, name="flash_bwd_dq_tpu",
    )(tab, x["qpos_col"], x["kpos_row"], x["qseg_col"], x["kseg_row"], x["q"], x["k"], x["v"], do,
      lse2[..., None], delta[..., None])

    # dK, dV: grid (B, Hkv, nK, G, nQ)
    bq, bk = _block(cfg.block_q_dkv, tq_p), _block(cfg.block_k_dkv, tk_p)
    nq, nk = tq_p // bq, tk_p // bk
    tab_t = blocks.tables(st.mask_fn, x["q_pos"], x["kv_pos"], x["q_seg"], x["kv_seg"], bq, bk,
                          transpose=True).reshape(-1)

    def q_block(b_, j, i, tab_ref):
        lo, _, _, hi = _ranges(tab_ref, b_, j, nk)
        return _clamp(i, lo, hi)

    k_col = lambda b_, hk, j, g, i, t: (b_, j, 0)  # noqa: E731
    q_row = lambda b_, hk, j, g, i, t: (b_, 0, q_block(b_, j, i, t))  # noqa: E731
    k_tile = lambda b_, hk, j, g, i, t: (b_, hk, j, 0)  # noqa: E731
    q_tile = lambda b_, hk, j, g, i, t: (b_, hk * group + g, q_block(b_, j, i, t), 0)  # noqa: E731
    r_tile = lambda b_, hk, j, g, i, t: (b_, hk * group + g, 0, q_block(b_, j, i, t))  # noqa: E731
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(b, hkv, nk, group, nq),
        in_specs=[
            pl.BlockSpec((None, 1, bq), q_row), pl.BlockSpec((None, bk, 1), k_col),
            pl.BlockSpec((None, 1, bq), q_row) if segs else None,
            pl.BlockSpec((None, bk, 1), k_col) if segs else None,
            pl.BlockSpec((None, None, bq, d), q_tile), pl.BlockSpec((None, None, bk, d), k_tile),
            pl.BlockSpec((None, None, bk, dv), k_tile), pl.BlockSpec((None, None, bq, dv), q_tile),
            pl.BlockSpec((None, None, 1, bq), r_tile), pl.BlockSpec((None, None, 1, bq), r_tile),
        ],
        out_specs=[pl.BlockSpec((None, None, bk, d), k_tile), pl.BlockSpec((None, None, bk, dv), k_tile)],
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, dv), jnp.float32)])
    dk, dv_ = pl.pallas_call(
        functools.partial(_dkv_kernel, nk=nk, **common), grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, hkv, tk_p, d), k.dtype),
                   jax.ShapeDtypeStruct((b, hkv, tk_p, dv), v.dtype)],
        compiler_params=_params(st, 3, 2), interpret=st.interpret, name="flash_bwd_dkv_tpu",
    )(tab_t, x["qpos_row"], x["kpos_col"], x["qseg_row"], x["kseg_col"], x["q"], x["k"], x["v"], do,
      lse2[:, :, None, :], delta[:, :, None, :])
    unpad = lambda a, t: a[:, :, :t].transpose(0, 2, 1, 3)  # noqa: E731
    return unpad(dq, tq), unpad(dk, tk), unpad(dv_, tk)


def flash_tpu(q, k, v, *, mask_fn, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
              sink_logits, softcap, scale, return_lse, block_score_size, block_score_reduce_gqa,
              interpret=False, config: TpuConfig | None = None):
    """`flash_reference`'s contract on Mosaic TPU (`interpret=True` -> `pltpu.InterpretParams()`)."""
    if interpret is True:
        interpret = pltpu.InterpretParams()
    st = autodiff.Static(forward=forward, backward=backward, mask_fn=mask_fn, scale=float(scale),
                         softcap=None if softcap is None else float(softcap),
                         has_sinks=sink_logits is not None, config=config or TpuConfig(),
                         interpret=interpret or False)
    if block_score_size is not None:
        cfg = st.config
        tk_p = blocks.round_up(k.shape[1], max(cfg.block_k, cfg.block_k_dq, cfg.block_k_dkv))
        score_layout(_block(cfg.block_k, tk_p), int(block_score_size))   # eager check
        spec = scores.ScoreSpec(int(block_score_size), bool(block_score_reduce_gqa), forward_scores)
        return scores.attention_with_scores(
            st, spec, q, k, v, sink_logits=sink_logits, q_positions=q_positions,
            kv_positions=kv_positions, q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids, return_lse=return_lse)
    return autodiff.attention(st, q, k, v, sink_logits=sink_logits, q_positions=q_positions,
                              kv_positions=kv_positions, q_segment_ids=q_segment_ids,
                              kv_segment_ids=kv_segment_ids, return_lse=return_lse)


# Backend declaration for `pallas_kernels.common.resolve`: a TPU (or interpret mode); every
# call the api accepts; tiles `TpuConfig`.
CONFIG = TpuConfig
