"""`nsa_decode` on GPU: NSA's whole decode step (arXiv 2502.11089) in one Pallas Triton kernel.

One program per (batch, kv head, query). Its tile rows are the `G = H / Hkv` query heads of
the group (padded to 16 for the tensor-core dot), so every K/V row is read once per group:

1. cmp, pass 1: online max / sum over the visible compressed keys (slot i = block i, so
   the trip count `ceil(num_visible / bc)` comes from the query position) -> per-head lse.
2. cmp, pass 2: `p = exp(s - lse)`; `o_cmp += p @ V`; the selection importance: `p` summed
   over the group heads, then spread onto the selection blocks with the overlap weights
   `|tokens(i) & tokens(j)| / d` (`selection_scores`). A cmp tile of `bc` blocks is
   aligned to `bs = bc / r` selection blocks (`r = l' / d`, a power of two), so the
   weights are two constant `[bc, bs]` matrices: onto the tile's own selection blocks and
   onto the next tile's (the `l/d - 1` trailing chunks of the last cmp blocks). Scores live
   in registers as `[R, bs]` (row k = cmp tile k), updated by a row select.
3. selection in registers: causal candidates `j*l' <= t`, forced blocks at +inf, then
   `n` rounds of (max, lowest index at the max, knock-out): `select_blocks`' top-n with
   ties to the lower index.
4. slc: each round loads its block's `l'` K/V rows at `idx * l'` right away (online
   softmax, causal on positions, -1 empty).
5. win: every slot of the window cache, visible iff `t - w < pos <= t`.

Per step a program reads the compressed keys twice (pass 1 and 2) and their values once,
the `n * l'` selected rows and the window: compressed + n*l' + w tokens, never the cache.

Grid: B * Hkv * T programs (64 at B=16, Hkv=4, T=1: half of an H200's 132 SMs). The cure,
not built here: split pass 1/2 over `c` programs per (b, hkv, t), each writing its
partial (m, l) and then its partial score rows and o_cmp, with a tiny second kernel for
the selection, slc and win (or a split-K combine as in `decode`).

Head dims that are not powers of two and lengths that are not tile multiples are covered
by masked loads; the caches are read in place (`[B, S, Hkv * D]` views).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash.blocks import LOG2E, MASK_VALUE, pl_next_pow2

NT = (((1,), (1,)), ((), ()))     # a @ b^T
NN = (((1,), (0,)), ((), ()))     # a @ b
BIG = 2**30


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Tiles of the cmp pass (`block_cmp` compressed keys) and of the window (`block_win`)."""

    block_cmp: int = 64
    block_win: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_cmp", "block_win", "num_warps", "num_stages"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be an int >= 1, got {val!r}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static sizes of one call (hashable: the kernel specialises on it)."""

    t: int              # queries per row
    hkv: int
    g: int              # heads per kv head
    rows_p: int         # g padded (>= 16, power of two)
    d: int
    d_p: int
    n_cmp: int          # compressed slots N
    s_slc: int          # slc slots S
    s_win: int          # window slots
    bc: int             # cmp tile (compressed keys)
    bs: int             # selection blocks per cmp tile (bc / r)
    r: int              # l' / d
    u: int              # l / d
    rows_sc: int        # score rows R (power of two)
    ns: int             # selection blocks of the slc cache
    n_out: int          # min(num_selected, ns)
    n_p: int
    ls: int             # l'
    ls_p: int
    bw: int             # window tile
    l: int
    stride: int         # d
    window: int
    num_initial: int
    num_local: int
    scale2: float       # logit scale in base-2 units


def _p2(x: int, minimum: int = 16) -> int:
    return max(minimum, pl_next_pow2(x))


def make_plan(q, k_cmp, k_slc, k_win, cfg, config: TritonConfig, scale: float) -> Plan:
    b, t, h, d = q.shape
    hkv = k_cmp.shape[2]
    r, u = cfg.sel_block // cfg.cmp_stride, cfg.cmp_block // cfg.cmp_stride
    if r & (r - 1):
        raise ValueError(f"the Triton nsa_decode needs sel_block / cmp_stride a power of two, got "
                         f"{cfg.sel_block} / {cfg.cmp_stride} = {r}; use impl='xla'")
    n_cmp, s_slc, s_win = k_cmp.shape[1], k_slc.shape[1], k_win.shape[1]
    # A tile of bc cmp blocks spills onto the next tile's selection blocks only: bc > u - 2.
    bc = max(_p2(min(config.block_cmp, n_cmp)), r, pl_next_pow2(u))
    bs = bc // r
    ns = -(-s_slc // cfg.sel_block)
    n_out = min(cfg.num_selected, ns)
    return Plan(t=t, hkv=hkv, g=h // hkv, rows_p=_p2(h // hkv), d=d, d_p=_p2(d), n_cmp=n_cmp,
                s_slc=s_slc, s_win=s_win, bc=bc, bs=bs, r=r, u=u,
                rows_sc=pl_next_pow2(-(-ns // bs)), ns=ns, n_out=n_out, n_p=pl_next_pow2(n_out),
                ls=cfg.sel_block, ls_p=_p2(cfg.sel_block), bw=_p2(min(config.block_win, s_win)),
                l=cfg.cmp_block, stride=cfg.cmp_stride, window=cfg.window,
                num_initial=cfg.num_initial, num_local=cfg.num_local, scale2=scale * LOG2E)


def _kernel(qpos_ref, q_ref, kc_ref, vc_ref, cpos_ref, ks_ref, vs_ref, spos_ref, kw_ref, vw_ref,
            wpos_ref, oc_ref, os_ref, ow_ref, idx_ref, *, plan: Plan):
    pn = plan
    b, h, ti = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    t = qpos_ref[b * pn.t + ti]
    live = t >= 0
    q = q_ref[...]                                                         # [rows_p, d_p]
    row_ok = jnp.arange(pn.rows_p, dtype=jnp.int32) < pn.g
    cols = pl.ds(h * pn.d, pn.d_p)
    col_ok = jnp.arange(pn.d_p, dtype=jnp.int32)[None, :] < pn.d

    def tile(k_ref, v_ref, pos_ref, start, size, size_p, axis_len):
        """K, V `[size_p, d_p]` and positions `[size_p]` (-1 outside) of slots start.."""
        r = jnp.arange(size_p, dtype=jnp.int32)
        in_rows = (r < size) & (start + r < axis_len)
        mask = jnp.broadcast_to(in_rows[:, None] & col_ok, (size_p, pn.d_p))
        rows = pl.ds(start, size_p)
        pos = plgpu.load(pos_ref.at[rows], mask=in_rows, other=-1)
        k = plgpu.load(k_ref.at[rows, cols], mask=mask, other=0.0)
        v = plgpu.load(v_ref.at[rows, cols], mask=mask, other=0.0)
        return k, v, pos

    def logits(k, vis):
        s = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * pn.scale2
        return jnp.where(vis[None, :], s, MASK_VALUE)

    def online(carry, s, vis, v):
        m, l, acc = carry
        m_new = jnp.maximum(m, s.max(axis=-1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.where(vis[None, :], jnp.exp2(s - m_new[:, None]), 0.0)
        pv = lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=jnp.float32)
        return m_new, l * alpha + p.sum(axis=-1), acc * alpha[:, None] + pv

    def init():
        return (jnp.full((pn.rows_p,), MASK_VALUE, jnp.float32), jnp.zeros((pn.rows_p,), jnp.float32),
                jnp.zeros((pn.rows_p, pn.d_p), jnp.float32))

    def normalised(carry):
        _, l, acc = carry
        return acc / jnp.where(l > 0.0, l, 1.0)[:, None]

    # ---- cmp: visible slots are 0 .. num_visible - 1 (slot i ends at i*d + l - 1).
    tt = jnp.where(live, t, 0)
    num_visible = jnp.where(live & (tt >= pn.l - 1), (tt - (pn.l - 1)) // pn.stride + 1, 0)
    num_visible = jnp.minimum(num_visible, pn.n_cmp)
    cmp_tiles = (num_visible + pn.bc - 1) // pn.bc

    def cmp_tile(i):
        k, v, pos = tile(kc_ref, vc_ref, cpos_ref, i * pn.bc, pn.bc, pn.bc, pn.n_cmp)
        vis = live & (pos >= 0) & (pos <= t)
        return logits(k, vis), vis, v

    def pass1(i, ml):
        m, l = ml
        s, vis, _ = cmp_tile(i)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.where(vis[None, :], jnp.exp2(s - m_new[:, None]), 0.0)
        return m_new, l * jnp.exp2(m - m_new) + p.sum(axis=-1)

    m, l = lax.fori_loop(0, cmp_tiles, pass1, init()[:2])
    lse = jnp.where(l > 0.0, m + jnp.log2(jnp.where(l > 0.0, l, 1.0)), 0.0)

    # Overlap weights of cmp block c of a tile onto the tile's selection block j (w_in) and
    # the next tile's (w_out): how many of the block's d-chunks c .. c+u-1 lie in it.
    c_id = jnp.arange(pn.bc, dtype=jnp.int32)[:, None]
    j_id = jnp.arange(pn.bs, dtype=jnp.int32)[None, :]
    w_in = jnp.zeros((pn.bc, pn.bs), jnp.float32)
    w_out = jnp.zeros((pn.bc, pn.bs), jnp.float32)
    for n in range(pn.u):
        chunk_block = (c_id + n) // pn.r
        w_in += (chunk_block == j_id).astype(jnp.float32)
        w_out += (chunk_block == j_id + pn.bs).astype(jnp.float32)
    score_row = jnp.arange(pn.rows_sc, dtype=jnp.int32)[:, None]

    def pass2(i, carry):
        acc, scores = carry
        s, vis, v = cmp_tile(i)
        p = jnp.where(vis[None, :], jnp.exp2(s - lse[:, None]), 0.0)     # [rows_p, bc]
        acc += lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=jnp.float32)
        mass = jnp.where(row_ok[:, None], p, 0.0).sum(axis=0)[:, None]    # [bc, 1]
        own = (mass * w_in).sum(axis=0)[None, :]                          # [1, bs]
        nxt = (mass * w_out).sum(axis=0)[None, :]
        scores = jnp.where(score_row == i, scores + own, scores)
        scores = jnp.where(score_row == i + 1, scores + nxt, scores)
        return acc, scores

    acc_cmp, scores = lax.fori_loop(
        0, cmp_tiles, pass2,
        (jnp.zeros((pn.rows_p, pn.d_p), jnp.float32), jnp.zeros((pn.rows_sc, pn.bs), jnp.float32)))
    oc_ref[...] = acc_cmp.astype(oc_ref.dtype)

    # ---- selection + slc: n rounds of (argmax with ties to the lower index, knock-out, attend).
    blk = score_row * pn.bs + jnp.arange(pn.bs, dtype=jnp.int32)[None, :]   # [R, bs] block ids
    causal = live & (blk < pn.ns) & (blk * pn.ls <= tt)
    forced = causal & ((blk < pn.num_initial) | (blk > tt // pn.ls - pn.num_local))
    cand = jnp.where(forced, jnp.inf, jnp.where(causal, scores, -jnp.inf))
    slot = jnp.arange(pn.n_p, dtype=jnp.int32)

    def select_and_attend(k_round, carry):
        cand, picked, att = carry
        best = cand.max()
        idx = jnp.where(cand == best, blk, BIG).min()
        ok = best > -jnp.inf
        picked = jnp.where(slot == k_round, jnp.where(ok, idx, -1), picked)
        cand = jnp.where(blk == idx, -jnp.inf, cand)
        k, v, pos = tile(ks_ref, vs_ref, spos_ref, jnp.where(ok, idx, 0) * pn.ls, pn.ls, pn.ls_p,
                         pn.s_slc)
        vis = ok & (pos >= 0) & (pos <= t)
        return cand, picked, online(att, logits(k, vis), vis, v)

    _, picked, att_slc = lax.fori_loop(
        0, pn.n_out, select_and_attend, (cand, jnp.full((pn.n_p,), -1, jnp.int32), init()))
    idx_ref[...] = picked
    os_ref[...] = normalised(att_slc).astype(os_ref.dtype)

    # ---- win: every slot of the window cache, t - w < pos <= t.
    def win_tile(i, att):
        k, v, pos = tile(kw_ref, vw_ref, wpos_ref, i * pn.bw, pn.bw, pn.bw, pn.s_win)
        vis = live & (pos >= 0) & (pos <= t) & (pos > t - pn.window)
        return online(att, logits(k, vis), vis, v)

    att_win = lax.fori_loop(0, -(-pn.s_win // pn.bw), win_tile, init())
    ow_ref[...] = normalised(att_win).astype(ow_ref.dtype)


def nsa_decode_triton(q, q_positions, *, k_cmp, v_cmp, cmp_positions, k_slc, v_slc, slc_positions,
                      k_win, v_win, win_positions, cfg, scale, interpret=False,
                      config: TritonConfig | None = None):
    """`nsa_decode_reference`'s contract on one Triton kernel (`interpret=True`: CPU)."""
    config = config or TritonConfig()
    plan = make_plan(q, k_cmp, k_slc, k_win, cfg, config, scale)
    b, t, h, d = q.shape
    hkv, g = plan.hkv, plan.g
    qr = q.reshape(b, t, hkv, g, d)
    qr = jnp.pad(qr, ((0, 0),) * 3 + ((0, plan.rows_p - g), (0, plan.d_p - d)))
    view = lambda x: x.reshape(*x.shape[:2], hkv * d)                      # noqa: E731  free
    whole = pl.BlockSpec()
    row = lambda x: pl.BlockSpec((None, x.shape[1], hkv * d), lambda b_, h_, t_: (b_, 0, 0))  # noqa: E731
    pos = lambda x: pl.BlockSpec((None, x.shape[1]), lambda b_, h_, t_: (b_, 0))              # noqa: E731
    out_spec = pl.BlockSpec((None, None, None, plan.rows_p, plan.d_p), lambda b_, h_, t_: (b_, t_, h_, 0, 0))
    out_shape = jax.ShapeDtypeStruct((b, t, hkv, plan.rows_p, plan.d_p), q.dtype)
    o_cmp, o_slc, o_win, idx = pl.pallas_call(
        functools.partial(_kernel, plan=plan),
        grid=(b, hkv, t),
        in_specs=[whole, pl.BlockSpec((None, None, None, plan.rows_p, plan.d_p),
                                      lambda b_, h_, t_: (b_, t_, h_, 0, 0)),
                  row(k_cmp), row(v_cmp), pos(cmp_positions), row(k_slc), row(v_slc),
                  pos(slc_positions), row(k_win), row(v_win), pos(win_positions)],
        out_specs=[out_spec, out_spec, out_spec,
                   pl.BlockSpec((None, None, None, plan.n_p), lambda b_, h_, t_: (b_, t_, h_, 0))],
        out_shape=[out_shape, out_shape, out_shape,
                   jax.ShapeDtypeStruct((b, t, hkv, plan.n_p), jnp.int32)],
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="nsa_decode",
    )(q_positions.reshape(-1), qr, view(k_cmp), view(v_cmp), cmp_positions, view(k_slc),
      view(v_slc), slc_positions, view(k_win), view(v_win), win_positions)
    unpack = lambda o: o[..., :g, :d].reshape(b, t, h, d)                  # noqa: E731
    return unpack(o_cmp), unpack(o_slc), unpack(o_win), idx[..., :plan.n_out]
