"""`nsa_select` on GPU: two Pallas (Triton lowering) kernels (NSA, arXiv 2502.11089).

Kernel 1 (`importance`): one program per output tile `[bq, bs]` (selection tile `jt`,
query tile, batch * kv head; the selection-tile axis fastest, so the programs running
together share their query tiles in L2). It takes the `bk = r * bs` compressed keys
(`r = l'/d`) that feed exactly the selection blocks `jt*bs .. jt*bs + bs - 1`, and the
`hb` (16) keys before them, the halo. In one pipelined loop over the G heads of the GQA
group, each head loading its own query tile (none is live across the loop, so Triton
keeps no G query tiles in shared memory), it sums `exp(q_g k^T * scale - lse_g)` (as
`exp2`: one FMA + `ex2` per entry) in registers (`P [bq, bk]`, `P_halo [bq, hb]`, as
the `compressed` op's score kernel does), then forms the selection importance

    imp[:, j] = sum_{m < r} sum_{n < u} P[:, r*j + m - n]        (u = l/d)

adding in the reference's order (`overlap_scores`). The terms of offset `o = m - n >= 0`
are `P.reshape(bq, bs, r)[:, :, o]`, taken by a masked sum over the last axis (exact: one
nonzero); the `u - 1` offsets below 0 are those columns `s = ceil(-o / r)` blocks back:
shifted by an exact 0/1 selector dot (float32 split into three bfloat16 pieces, so tensor
cores lose no bit), the first `s` blocks' from the halo the same way. A tile with no
candidate block (`jt*bs*l' >` its last query) is skipped: no dot, nothing written (the
top-n kernel masks non-candidates). Written: `[B, Hkv, T_p, Ns_p]` float32, `r`x fewer
bytes than the per-compressed-block `p_group`.

Same additions in the same order whatever the tiling, on the same `P`; but a tile's
first `s` blocks take their `o < 0` terms from the halo dot (N = hb) instead of the
previous tile's main dot (N = bk), which may round a key's `P` differently (XLA CPU's dots
do for some N; on tensor cores the per-element K order is the instruction's, normally
the same). So exact ties (constant keys) stay ties; across tilings the importance of a
tile's first block can move by an ulp.

Extra work over the `compressed` op's score kernel: the halo dot (`hb / bk` of the dots,
12.5% at bk = 128; its exps only for the `u - 1` needed columns, taken out of the logits
first), `r + u - 1` masked reductions of `[bq, bk]` and three `[bq, bs] x [bs, bs]` (+
`[bq, hb] x [hb, bs]`) selector dots per negative offset, once per program.
Shared memory and registers at the paper shape (G = 16, D = 128, bf16, 64K; the Triton IR
this lowering emits, compiled by Triton 3.5 for sm_90 with its ptxas; not XLA's own
Triton, so a guide), bq:bk:warps -> shared memory, registers, none spilled: 64:128:8
69 KB, 126; 64:128:4 (default) 68 KB, 246; 64:64:4 52 KB, 128; 128:64:8 84 KB, 128;
128:128:8 100 KB, 242; 64:256:8 101 KB, 254 (KB = 1024 B, of 227 KB; the old kernel, all
G query tiles loop invariant, asked 557312 B at 64:64:4; XLA reported 573 KB).
Independent of G.

Suggested tile sweep (block_q:block_k:num_warps:topn_elements, `bench_nsa.py
--select_configs`): 64:128:4:4096 (default), 64:128:8:4096, 64:64:4:4096, 128:64:8:4096,
64:128:8:8192.
H200, one run (selection = importance + top-n, ms at 16K / 64K): 64:128:4:4096 1.12 /
10.39; 64:128:8:4096 1.39 / 12.76; 64:64:4:4096 1.21 / 11.73; 128:64:8:4096 1.33 / 12.72
(the XLA selection it replaces, on the `compressed` op's p_group: 0.81 / 27.5 plus the
score kernel).

Kernel 2 (`top_n`): one program per (query rows, batch * kv head). It loads the rows
`[rows, Ns_p]` (`Ns_p` the next power of two of `Ns`: 1024 at 64K tokens), sets
non-candidates to -inf and forced blocks to +inf, and runs `n` rounds of row argmax
(lower index on ties) + knock-out: `lax.top_k`'s order, -1 where the value is -inf.
Above `TritonConfig.max_sel_blocks` columns the rows no longer fit in registers and
`top_blocks` (XLA `top_k`) ranks the kernel's importance instead. Registers at 64K
(`Ns_p` = 1024, 4 warps; Triton 3.5, sm_90): topn_elements 4096 (default) 96, no spill;
8192 254; 16384 255 and 444 B spilled (the row and its column iota, 2 x 128 per thread).

Not fused into one kernel: top-n needs a query's whole importance row, and Triton has no
dynamically indexed register storage, so a fused kernel would keep `[bq, Ns_p]` live
through the key loop and rebuild it at every tile (`O(Ns_p^2 / bs)` per program) or
round-trip through HBM anyway; the row write is already `r`x smaller than `p_group`.

Supported: `l'/d` a power of two (the key tile is `r * bs`); `check_supported`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash import blocks
from pallas_kernels.nsa_select.reference import top_blocks
from pallas_kernels.tiles_common import LOG2E, NN, NT, split_bf16x3


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """block_q: queries per importance program (the M of its dots); block_k: compressed keys
    per program (raised to `16 * l'/d` so it spans >= 16 selection blocks, the smallest
    dot); num_warps / num_stages: the importance kernel's (its G-head loop is pipelined).
    topn_elements: importance entries per top-n program (rows = this / Ns_p).
    max_sel_blocks: largest `Ns_p` ranked by the top-n kernel (else XLA top_k)."""

    block_q: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 2
    topn_elements: int = 4096
    topn_num_warps: int = 4
    max_sel_blocks: int = 2048

    def __post_init__(self):
        for name in ("block_q", "block_k", "topn_elements"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 16 or val & (val - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {val!r}")
        for name in ("num_warps", "num_stages", "topn_num_warps", "max_sel_blocks"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be an int >= 1, got {val!r}")


def check_supported(*, cmp_block: int, cmp_stride: int, sel_block: int):
    reason = supports(cmp_block=cmp_block, cmp_stride=cmp_stride, sel_block=sel_block)
    if reason is not None:
        raise ValueError(f"nsa_select impl='triton' {reason}; use impl='xla' (or 'auto')")


@dataclasses.dataclass(frozen=True)
class _Tiles:
    bq: int      # queries per importance program
    bk: int      # compressed keys per program
    bs: int      # selection blocks per program (bk = r * bs)
    hb: int      # halo keys: the hb keys before the tile (its last u - 1 feed the tile's blocks)
    r: int       # l' / d
    u: int       # l / d
    ns_p: int    # padded selection blocks (power of two, multiple of bs)


def _tiles(cfg: TritonConfig, t: int, ns: int, *, cmp_block, cmp_stride, sel_block) -> _Tiles:
    r, u = sel_block // cmp_stride, cmp_block // cmp_stride
    hb = max(16, blocks.pl_next_pow2(u - 1))
    bk = max(cfg.block_k, 16 * r, hb)
    bs = bk // r
    return _Tiles(bq=blocks.pow2_block(cfg.block_q, t), bk=bk, bs=bs, hb=hb, r=r, u=u,
                  ns_p=max(bs, blocks.pl_next_pow2(ns)))


def _select_columns(x, cols: int, row_of_col):
    """`x[:, row_of_col(j)]` for each column j < cols (0 where that row is outside x's
    columns), exactly: a dot of each bfloat16 piece of the float32 x with a 0/1 selector."""
    rows = x.shape[1]
    i = lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
    j = lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
    sel = jnp.where(i == row_of_col(j), 1.0, 0.0).astype(jnp.bfloat16)
    hi, mid, lo = (lax.dot_general(p, sel, NN, preferred_element_type=jnp.float32) for p in split_bf16x3(x))
    return (hi + mid) + lo


def _group_probabilities(q_ref, lse_ref, k, kh, *, halo: int, group: int, scale: float):
    """`P [bq, bk]`: `sum_g exp(q_g k^T * scale - lse_g)` over the key tile k `[bk, D]`, and
    `P_halo [bq, hb]` the same over the halo keys kh `[hb, D]`, only its last `halo` columns
    (the rest 0; None if `halo` is 0). Unmasked: the caller masks once after the loop, so
    no mask is live in it (hidden entries may sum to inf, never NaN: non-negative terms).

    One pipelined loop over the G heads, each loading its own query tile once (no query
    tile is live across iterations). In base 2 (`exp(x) = 2^(x log2 e)`): one FMA and one
    `ex2` per entry instead of libdevice's `expf` (about 8 float ops). The halo's columns
    are taken out of its logits (exact masked sums) before the `ex2`: `halo` of them per
    row, not `hb`."""
    bq, hb = q_ref.shape[1], kh.shape[0]
    col = lax.broadcasted_iota(jnp.int32, (bq, hb), 1)

    def head(g, carry):
        acc, hacc = carry
        lse = lse_ref[g, :]
        lse2 = (jnp.where(lse > -jnp.inf, lse, 0.0) * LOG2E)[:, None]
        q = q_ref[g]
        logits2 = lambda keys: (lax.dot_general(q, keys, NT, preferred_element_type=jnp.float32)  # noqa: E731
                                * (scale * LOG2E) - lse2)
        acc = acc + jnp.exp2(logits2(k))
        if halo:
            sh = logits2(kh)
            hacc = tuple(a + jnp.exp2(jnp.sum(jnp.where(col == hb - halo + i, sh, 0.0), axis=1))
                         for i, a in enumerate(hacc))
        return acc, hacc

    init = (jnp.zeros((bq, k.shape[0]), jnp.float32), (jnp.zeros((bq,), jnp.float32),) * halo)
    acc, hacc = lax.fori_loop(0, group, head, init)
    if not halo:
        return acc, None
    ph = 0.0
    for i, a in enumerate(hacc):
        ph = ph + jnp.where(col == hb - halo + i, a[:, None], 0.0)
    return acc, ph


def _importance_kernel(qpos_ref, kpos_ref, hpos_ref, lse_ref, q_ref, k_ref, kh_ref, out_ref, *,
                       tiles: _Tiles, group: int, scale: float, sel_block: int):
    bq, bs, hb, r, u = tiles.bq, tiles.bs, tiles.hb, tiles.r, tiles.u
    jt = pl.program_id(0)                                                   # selection tile
    qp = qpos_ref[...]                                                      # [bq]

    def visible(kp):
        return (qp[:, None] >= 0) & (kp[None, :] >= 0) & (kp[None, :] <= qp[:, None])

    @pl.when(jnp.max(qp) >= jt * (bs * sel_block))          # else: no candidate block here
    def _():
        p, ph = _group_probabilities(q_ref, lse_ref, k_ref[...], kh_ref[...], halo=u - 1,
                                     group=group, scale=scale)             # the tile, the halo
        p = jnp.where(visible(kpos_ref[...]), p, 0.0)                       # [bq, bk]
        if r > 1:
            p3 = p.reshape(bq, bs, r)                        # [:, j, c] = P[:, r*j + c]
            c = lax.broadcasted_iota(jnp.int32, p3.shape, 2)
            column = lambda c0: jnp.sum(jnp.where(c == c0, p3, 0.0), axis=2)  # noqa: E731 - exact
        else:
            column = lambda c0: p                                            # noqa: E731
        terms = {o: column(o) for o in range(r)}             # P[:, r*j + o], 0 <= o < r
        if u > 1:
            ph = jnp.where(visible(hpos_ref[...]) & (jt > 0), ph, 0.0)     # [bq, hb]
        for o in range(-(u - 1), 0):                         # o < 0: s blocks back, the first s
            s = -(o // r)                                    # from the halo
            terms[o] = (_select_columns(column(o % r), bs, lambda j, s=s: j - s)
                        + _select_columns(ph, bs, lambda j, o=o: hb + r * j + o))
        imp = 0.0
        for m in range(r):                                   # `overlap_scores`' order
            for n in range(u):
                imp = imp + terms[m - n]
        out_ref[...] = imp


def importance(q, k, lse, q_positions, kv_positions, *, num_sel_blocks: int, cmp_block: int,
               cmp_stride: int, sel_block: int, scale: float, interpret=False,
               config: TritonConfig | None = None):
    """Selection-block importance `[B, Hkv, T_p, Ns_p]` float32 (padded; entry (t, j) is
    defined where some query of t's tile may select j's tile, else unwritten).

    q `[B, T, H, D]`, k `[B, N, Hkv, D]` (slot i = compressed block i), lse `[B, H, T]`,
    positions int `[B, T]` / `[B, N]` (-1 = padding / empty).
    """
    cfg = config or TritonConfig()
    b, t, h, d = q.shape
    hkv = k.shape[2]
    g = h // hkv
    d_p = max(16, blocks.pl_next_pow2(d))
    tl = _tiles(cfg, t, num_sel_blocks, cmp_block=cmp_block, cmp_stride=cmp_stride,
                sel_block=sel_block)
    t_p, n_p = blocks.round_up(t, tl.bq), tl.r * tl.ns_p
    k, kv_positions = k[:, :n_p], kv_positions[:, :n_p]       # later blocks only feed j >= Ns_p
    qx = blocks.pad_axis(blocks.pad_axis(q, t_p, 1), d_p, 3).transpose(0, 2, 1, 3)   # [B, H, T, D]
    kx = blocks.pad_axis(blocks.pad_axis(k, n_p, 1), d_p, 3)
    lse = blocks.pad_axis(lse.astype(jnp.float32), t_p, 2)
    qpos = blocks.pad_axis(q_positions, t_p, 1, -1)
    kpos = blocks.pad_axis(kv_positions, n_p, 1, -1)
    per = tl.bk // tl.hb
    halo = lambda j: jnp.maximum(j * per - 1, 0)  # noqa: E731 - the hb keys before tile j (masked at j = 0)
    return pl.pallas_call(
        functools.partial(_importance_kernel, tiles=tl, group=g, scale=float(scale),
                          sel_block=sel_block),
        grid=(tl.ns_p // tl.bs, t_p // tl.bq, b * hkv),     # selection tiles fastest: q stays in L2
        in_specs=[pl.BlockSpec((None, tl.bq), lambda j, i, bh: (bh // hkv, i)),
                  pl.BlockSpec((None, tl.bk), lambda j, i, bh: (bh // hkv, j)),
                  pl.BlockSpec((None, tl.hb), lambda j, i, bh: (bh // hkv, halo(j))),
                  pl.BlockSpec((None, g, tl.bq), lambda j, i, bh: (bh // hkv, bh % hkv, i)),
                  pl.BlockSpec((None, g, tl.bq, d_p), lambda j, i, bh: (bh // hkv, bh % hkv, i, 0)),
                  pl.BlockSpec((None, tl.bk, None, d_p), lambda j, i, bh: (bh // hkv, j, bh % hkv, 0)),
                  pl.BlockSpec((None, tl.hb, None, d_p), lambda j, i, bh: (bh // hkv, halo(j), bh % hkv, 0))],
        out_specs=pl.BlockSpec((None, None, tl.bq, tl.bs), lambda j, i, bh: (bh // hkv, bh % hkv, i, j)),
        out_shape=jax.ShapeDtypeStruct((b, hkv, t_p, tl.ns_p), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="nsa_select_importance",
    )(qpos, kpos, kpos, lse, qx, kx, kx)


def _top_n_kernel(qpos_ref, imp_ref, out_ref, *, sel_block: int, num_sel_blocks: int,
                  num_selected: int, num_initial: int, num_local: int):
    t = qpos_ref[...][:, None]                                              # [rows, 1]
    s = imp_ref[...]                                                        # [rows, Ns_p]
    j = lax.broadcasted_iota(jnp.int32, s.shape, 1)
    cur = lax.div(jnp.maximum(t, 0), jnp.int32(sel_block))                 # the query's block
    causal = (t >= 0) & (j * sel_block <= t) & (j < num_sel_blocks)
    forced = causal & ((j < num_initial) | (j > cur - num_local))
    s = jnp.where(forced, jnp.inf, jnp.where(causal, s, -jnp.inf))
    n_cand = jnp.sum(causal.astype(jnp.int32), axis=1)[:, None]            # rounds that find one
    col = lax.broadcasted_iota(jnp.int32, out_ref.shape, 1)
    res = jnp.full(out_ref.shape, -1, jnp.int32)
    for rnd in range(num_selected):
        best = lax.argmax(s, 1, jnp.int32)                                  # lower index on ties
        res = jnp.where((col == rnd) & (rnd < n_cand), best[:, None], res)
        s = jnp.where(j == best[:, None], -jnp.inf, s)
    out_ref[...] = res


def top_n(imp, q_positions, *, num_sel_blocks: int, sel_block: int, num_selected: int,
          num_initial: int, num_local: int, interpret=False, config: TritonConfig | None = None):
    """`top_blocks` on the importance `[B, Hkv, T_p, Ns_p]` (q_positions `[B, T_p]`, -1
    padded): `[B, T_p, Hkv, n_p]` int32 (`n_p` the next power of two of
    `min(n, Ns)`; entries past it are -1)."""
    cfg = config or TritonConfig()
    b, hkv, t_p, ns_p = imp.shape
    n_out = min(num_selected, num_sel_blocks)
    n_p = blocks.pl_next_pow2(n_out)
    budget = max(1, cfg.topn_elements // ns_p)
    rows = min(t_p & -t_p, 1 << (budget.bit_length() - 1))        # powers of two dividing T_p
    return pl.pallas_call(
        functools.partial(_top_n_kernel, sel_block=sel_block, num_sel_blocks=num_sel_blocks,
                          num_selected=n_out, num_initial=num_initial, num_local=num_local),
        grid=(t_p // rows, b * hkv),
        in_specs=[pl.BlockSpec((None, rows), lambda i, bh: (bh // hkv, i)),
                  pl.BlockSpec((None, None, rows, ns_p), lambda i, bh: (bh // hkv, bh % hkv, i, 0))],
        out_specs=pl.BlockSpec((None, rows, None, n_p), lambda i, bh: (bh // hkv, i, bh % hkv, 0)),
        out_shape=jax.ShapeDtypeStruct((b, t_p, hkv, n_p), jnp.int32),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.topn_num_warps, num_stages=1),
        interpret=interpret,
        name="nsa_select_top_n",
    )(q_positions, imp)


def nsa_select_triton(q, k, lse, q_positions, kv_positions, *, num_sel_blocks: int, cmp_block: int,
                      cmp_stride: int, sel_block: int, num_selected: int, num_initial: int,
                      num_local: int, scale: float, interpret=False,
                      config: TritonConfig | None = None):
    """`nsa_select_reference`'s contract on the two kernels (`interpret=True`: CPU)."""
    check_supported(cmp_block=cmp_block, cmp_stride=cmp_stride, sel_block=sel_block)
    cfg = config or TritonConfig()
    geo = dict(cmp_block=cmp_block, cmp_stride=cmp_stride, sel_block=sel_block)
    imp = importance(q, k, lse, q_positions, kv_positions, num_sel_blocks=num_sel_blocks, scale=scale,
                     interpret=interpret, config=cfg, **geo)
    return select_top_n(imp, q_positions, num_sel_blocks=num_sel_blocks, sel_block=sel_block,
                        num_selected=num_selected, num_initial=num_initial, num_local=num_local,
                        interpret=interpret, config=cfg)


def select_top_n(imp, q_positions, *, num_sel_blocks: int, sel_block: int, num_selected: int,
                 num_initial: int, num_local: int, interpret=False, config: TritonConfig | None = None):
    """`top_blocks` of a padded importance `imp [B, Hkv, T_p, Ns_p]` (`T_p >= T`, `Ns_p` a
    power of two `>= Ns`; entries of non-candidate blocks may be anything) for
    `q_positions [B, T]`: the `top_n` kernel, or XLA `top_k` past `max_sel_blocks`.
    Returns `[B, T, Hkv, min(n, Ns)]` int32."""
    cfg = config or TritonConfig()
    t = q_positions.shape[1]
    pick = dict(sel_block=sel_block, num_selected=num_selected, num_initial=num_initial,
                num_local=num_local)
    if imp.shape[-1] > cfg.max_sel_blocks:
        return top_blocks(imp[:, :, :t, :num_sel_blocks], q_positions, **pick)
    qpos = blocks.pad_axis(q_positions, imp.shape[2], 1, -1)
    idx = top_n(imp, qpos, num_sel_blocks=num_sel_blocks, interpret=interpret, config=cfg, **pick)
    return idx[:, :t, :, :min(num_selected, num_sel_blocks)]


# Backend declaration for `pallas_kernels.common.resolve`: a GPU (or interpret mode); `l'/d`
# a power of two (`supports`); tiles `TritonConfig`.
CONFIG = TritonConfig


def supports(*, cmp_stride: int, sel_block: int, **_) -> str | None:
    """None when the kernels take this geometry (`l'/d` a power of two), else why not."""
    r = sel_block // cmp_stride
    if r >= 1 and r & (r - 1) == 0:
        return None
    return f"needs sel_block / cmp_stride (l'/d) a power of two, got {sel_block} / {cmp_stride}"
