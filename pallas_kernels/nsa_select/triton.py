"""`nsa_select` on GPU: two Pallas (Triton lowering) kernels (NSA, arXiv 2502.11089).

Kernel 1 (`importance`): one program per (query tile, batch * kv head), heaviest (last)
query tiles first. It walks the compressed keys in tiles of `bk = r * bs` (`r = l'/d`), so
key tile `jt` feeds exactly the selection blocks `jt*bs .. jt*bs + bs - 1`, up to the tile
of the last block a query of the tile may select (`j*l' <= t`). Per tile it sums
`exp(q_g k^T * scale - lse_g)` over the G heads of the GQA group in registers (`P [bq, bk]`,
as the `compressed` op's score kernel does), then forms the selection importance

    imp[:, j] = sum_{m < r} sum_{n < u} P[:, r*j + m - n]        (u = l/d)

adding in the reference's order (`overlap_scores`): the term of offset `o = m - n` is
pulled out of `P` by a 0/1 selector dot, exact (one nonzero per column; the float32 `P`
is split into three bfloat16 pieces, so tensor cores lose no bit), and the `u - 1`
offsets below 0 reach into the previous key tile, whose share (`[bq, bs]` per such
offset, extracted the same way) the loop carries. The additions are
the reference's on the same `P`, so exact ties (constant keys: lower block first) stay
ties whatever the tiling. Written: `[B, Hkv, T_p, Ns_p]` float32, `r`x fewer bytes than
the per-compressed-block `p_group`; columns past a tile's last candidate block are left
unwritten (never read).

Kernel 2 (`top_n`): one program per (query rows, batch * kv head). It loads the rows
`[rows, Ns_p]` (`Ns_p` the next power of two of `Ns`: 1024 at 64K tokens), sets
non-candidates to -inf and forced blocks to +inf, and runs `n` rounds of row argmax
(lower index on ties) + knock-out: `lax.top_k`'s order, -1 where the value is -inf.
Above `TritonConfig.max_sel_blocks` columns the rows no longer fit in registers and
`top_blocks` (XLA `top_k`) ranks the kernel's importance instead.

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

from pallas_kernels.compressed.triton import NT
from pallas_kernels.flash import blocks
from pallas_kernels.nsa_select.reference import top_blocks

NN = (((1,), (0,)), ((), ()))     # a @ b


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """block_q: queries per importance program; block_k: compressed keys per loop step
    (raised to `16 * l'/d` so a tile spans >= 16 selection blocks, the smallest dot).
    topn_elements: importance entries per top-n program (rows = this / Ns_p).
    max_sel_blocks: largest `Ns_p` ranked by the top-n kernel (else XLA top_k).
    q_bytes: cap on the group's query tiles, `G * block_q * D_p * 2` bytes: they are loop
    invariant, so Triton keeps all G of them in shared memory for the whole key loop (at
    G = 16, D = 128 a 64-query tile asks for 573 KB of the H200's 227 KB; block_q shrinks
    down to 16 to fit)."""

    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2
    topn_elements: int = 16384
    topn_num_warps: int = 4
    max_sel_blocks: int = 2048
    q_bytes: int = 65536

    def __post_init__(self):
        for name in ("block_q", "block_k", "topn_elements"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 16 or val & (val - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {val!r}")
        for name in ("num_warps", "num_stages", "topn_num_warps", "max_sel_blocks", "q_bytes"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be an int >= 1, got {val!r}")


def supports(*, cmp_block: int, cmp_stride: int, sel_block: int) -> bool:
    """Whether the kernels take this configuration: `l'/d` a power of two."""
    del cmp_block
    r = sel_block // cmp_stride
    return r >= 1 and r & (r - 1) == 0


def check_supported(*, cmp_block: int, cmp_stride: int, sel_block: int):
    if not supports(cmp_block=cmp_block, cmp_stride=cmp_stride, sel_block=sel_block):
        raise ValueError(f"nsa_select impl='triton' needs sel_block / cmp_stride (l'/d) a power of "
                         f"two, got {sel_block} / {cmp_stride}; use impl='xla' (or 'auto')")


@dataclasses.dataclass(frozen=True)
class _Tiles:
    bq: int      # queries per importance program
    bk: int      # compressed keys per step
    bs: int      # selection blocks per step (bk = r * bs)
    r: int       # l' / d
    u: int       # l / d
    ns_p: int    # padded selection blocks (power of two, multiple of bs)


def _tiles(cfg: TritonConfig, t: int, ns: int, *, cmp_block, cmp_stride, sel_block, group: int,
           d_p: int) -> _Tiles:
    r, u = sel_block // cmp_stride, cmp_block // cmp_stride
    bk = max(cfg.block_k, 16 * r, blocks.pl_next_pow2(u - 1))   # halo of u - 1 keys fits one tile
    bs = bk // r
    bq = cfg.block_q
    while bq > 16 and group * bq * d_p * 2 > cfg.q_bytes:
        bq //= 2
    return _Tiles(bq=blocks.pow2_block(bq, t), bk=bk, bs=bs, r=r, u=u,
                  ns_p=max(bs, blocks.pl_next_pow2(ns)))


def _split3(x):
    """float32 -> three bfloat16 pieces whose sum is exactly x."""
    hi = x.astype(jnp.bfloat16)
    rest = x - hi.astype(jnp.float32)
    mid = rest.astype(jnp.bfloat16)
    return hi, mid, (rest - mid.astype(jnp.float32)).astype(jnp.bfloat16)


def _select_columns(pieces, rows: int, cols: int, row_of_col):
    """`x[:, row_of_col(j)]` for each column j (0 where that row is outside `[0, rows)`),
    exactly: a dot of each bfloat16 piece of x with a 0/1 selector."""
    i = lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
    j = lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
    sel = jnp.where(i == row_of_col(j), 1.0, 0.0).astype(jnp.bfloat16)
    hi, mid, lo = (lax.dot_general(p, sel, NN, preferred_element_type=jnp.float32) for p in pieces)
    return (hi + mid) + lo


def _importance_kernel(qpos_ref, kpos_ref, lse_ref, q_ref, k_ref, out_ref, *, tiles: _Tiles,
                       group: int, scale: float, sel_block: int):
    bk, bs, r, u = tiles.bk, tiles.bs, tiles.r, tiles.u
    qp = qpos_ref[...]                                                      # [bq]
    q_last = jnp.max(qp)
    num_tiles = tiles.ns_p // bs
    n_tiles = jnp.where(q_last >= 0,
                        jnp.minimum(lax.div(jnp.maximum(q_last, 0), jnp.int32(sel_block * bs)) + 1,
                                    num_tiles), 0)
    lses = []
    for g in range(group):
        lse = lse_ref[g, :]
        lses.append(jnp.where(lse > -jnp.inf, lse, 0.0))

    def step(jt, carried):
        sl = pl.ds(pl.multiple_of(jt * bk, bk), bk)
        kp = kpos_ref[sl]
        vis = (qp[:, None] >= 0) & (kp[None, :] >= 0) & (kp[None, :] <= qp[:, None])
        k = k_ref[sl, :]
        p = jnp.zeros((qp.shape[0], bk), jnp.float32)
        for g in range(group):
            s = lax.dot_general(q_ref[g], k, NT, preferred_element_type=jnp.float32) * scale
            p += jnp.where(vis, jnp.exp(s - lses[g][:, None]), 0.0)
        pieces = _split3(p)
        terms, ahead = {}, []
        for o in range(-(u - 1), r):            # P[:, r*j + o]; o < 0 reaches the previous tile,
            terms[o] = _select_columns(pieces, bk, bs, lambda j, o=o: r * j + o)
            if o < 0:                           # whose part came in `carried` (one side is 0)
                terms[o] = terms[o] + carried[o + u - 1]
                ahead.append(_select_columns(pieces, bk, bs, lambda j, o=o: bk + r * j + o))
        imp = 0.0
        for m in range(r):                      # `overlap_scores`' order
            for n in range(u):
                imp = imp + terms[m - n]
        out_ref[:, pl.ds(pl.multiple_of(jt * bs, bs), bs)] = imp
        return tuple(ahead)

    zeros = jnp.zeros((qp.shape[0], bs), jnp.float32)
    lax.fori_loop(0, n_tiles, step, (zeros,) * (u - 1))


def importance(q, k, lse, q_positions, kv_positions, *, num_sel_blocks: int, cmp_block: int,
               cmp_stride: int, sel_block: int, scale: float, interpret=False,
               config: TritonConfig | None = None):
    """Selection-block importance `[B, Hkv, T_p, Ns_p]` float32 (padded; entry (t, j) is
    defined for `j*l' <= ` the largest position of t's query tile, else unwritten).

    q `[B, T, H, D]`, k `[B, N, Hkv, D]` (slot i = compressed block i), lse `[B, H, T]`,
    positions int `[B, T]` / `[B, N]` (-1 = padding / empty).
    """
    cfg = config or TritonConfig()
    b, t, h, d = q.shape
    hkv = k.shape[2]
    g = h // hkv
    d_p = max(16, blocks.pl_next_pow2(d))
    tl = _tiles(cfg, t, num_sel_blocks, cmp_block=cmp_block, cmp_stride=cmp_stride,
                sel_block=sel_block, group=g, d_p=d_p)
    t_p, n_p = blocks.round_up(t, tl.bq), tl.r * tl.ns_p
    k, kv_positions = k[:, :n_p], kv_positions[:, :n_p]       # later blocks only feed j >= Ns_p
    qx = blocks.pad_axis(blocks.pad_axis(q, t_p, 1), d_p, 3).transpose(0, 2, 1, 3)   # [B, H, T, D]
    kx = blocks.pad_axis(blocks.pad_axis(k, n_p, 1), d_p, 3)
    lse = blocks.pad_axis(lse.astype(jnp.float32), t_p, 2)
    qpos = blocks.pad_axis(q_positions, t_p, 1, -1)
    kpos = blocks.pad_axis(kv_positions, n_p, 1, -1)
    nq = t_p // tl.bq
    rev = lambda i: nq - 1 - i  # noqa: E731 - heaviest (causal) query tiles first
    return pl.pallas_call(
        functools.partial(_importance_kernel, tiles=tl, group=g, scale=float(scale),
                          sel_block=sel_block),
        grid=(nq, b * hkv),
        in_specs=[pl.BlockSpec((None, tl.bq), lambda i, bh: (bh // hkv, rev(i))),
                  pl.BlockSpec((None, n_p), lambda i, bh: (bh // hkv, 0)),
                  pl.BlockSpec((None, g, tl.bq), lambda i, bh: (bh // hkv, bh % hkv, rev(i))),
                  pl.BlockSpec((None, g, tl.bq, d_p), lambda i, bh: (bh // hkv, bh % hkv, rev(i), 0)),
                  pl.BlockSpec((None, n_p, None, d_p), lambda i, bh: (bh // hkv, 0, bh % hkv, 0))],
        out_specs=pl.BlockSpec((None, None, tl.bq, tl.ns_p), lambda i, bh: (bh // hkv, bh % hkv, rev(i), 0)),
        out_shape=jax.ShapeDtypeStruct((b, hkv, t_p, tl.ns_p), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="nsa_select_importance",
    )(qpos, kpos, lse, qx, kx)


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
    t = q.shape[1]
    geo = dict(cmp_block=cmp_block, cmp_stride=cmp_stride, sel_block=sel_block)
    imp = importance(q, k, lse, q_positions, kv_positions, num_sel_blocks=num_sel_blocks, scale=scale,
                     interpret=interpret, config=cfg, **geo)
    pick = dict(sel_block=sel_block, num_selected=num_selected, num_initial=num_initial,
                num_local=num_local)
    if imp.shape[-1] > cfg.max_sel_blocks:
        return top_blocks(imp[:, :, :t, :num_sel_blocks], q_positions, **pick)
    qpos = blocks.pad_axis(q_positions, imp.shape[2], 1, -1)
    idx = top_n(imp, qpos, num_sel_blocks=num_sel_blocks, interpret=interpret, config=cfg, **pick)
    return idx[:, :t, :, :min(num_selected, num_sel_blocks)]
