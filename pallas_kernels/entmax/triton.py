"""`entmax` forward on GPU: Pallas with the Triton lowering.

alpha-entmax attention (Peters et al. 2019, arXiv 1905.05702) in three kernels, each one
program per (query tile, batch, head), GQA reading KV head `h // G` in place; lengths padded
to whole tiles (positions -1) and sliced back. Scores are kept in `z = (alpha-1) * scale *
q . k` units, where `p = [z - tau]_+^(1/(alpha-1))`.

1. `stats`: one pass over the visible KV tiles (causal tiles skipped, `flash.blocks`
   tables) for each row's max `m` and visible count `n`, and each tile pair's max score
   `tmax` (one scalar per pair). It is the one pass over every visible tile and does no
   more than `q k^T` and a max, so it runs on its own taller tiles (`stats_block_q x
   stats_block_k`, default 128x64, 8 warps: half the K traffic of 64-row tiles, which at
   64K is ~140 GB from L2) and writes the max of each 64-row half (the tiles of the other
   kernels) from its row maxima. On Hopper (`EntmaxTritonConfig.stats_impl` "auto" or
   "mosaic_gpu") the Mosaic GPU kernel of `mosaic_gpu_stats.py` (wgmma + TMA, warp
   specialised) returns the same `(m, n, tmax, full)` instead.
2. `tau`: the threshold lies in `[m - 1, m - (1/n)^(alpha-1)]`. A tile whose `tmax` is at
   most `min_rows(m) - 1` can hold no support and is skipped from here on (block
   skipping, AdaSplash, arXiv 2502.12082). Each of `num_passes` passes over the live tiles
   evaluates, at the row's lower bound `lo` and at `num_candidates` points spread over
   `(lo, hi)`: `f(t) = sum [z - t]_+^k` (`k = 1/(alpha-1)`), `sum [z - t]_+^(k-1)` (for
   Newton), the support's size and its smallest score. With `a` the highest point where
   `f >= 1` and `b` the lowest where `f < 1`: `lo` rises to Newton's step from `a` (a
   lower bound, `f` being convex and decreasing), `hi` falls to the secant root of
   `(a, b)` (an upper bound). For alpha in {1.5, 2} the root of the polynomial that `f` is
   over the support at `a` (the sort-based formula of Peters et al.; for sparsemax
   Michelot's step) is exact when no score lies between `a` and it: that row is done. A
   query tile whose rows are all done skips the remaining passes; within a pass a tile
   whose `tmax` is at or below the lowest `lo` of the rows still searching is skipped
   (`recheck_tiles`). After `num_passes` such passes, up to `finish_passes` more evaluate
   at `lo` alone (the bracket is narrow by then: the exact root at `lo` nearly always
   holds). The threshold is the final `lo`.
3. `out`: one pass over the tiles live under the final thresholds (`tmax > min_rows tau`),
   `p = [z - tau]_+^k`, `o = sum p v / sum p` (the division removes what inexactness the
   threshold has left; 1 up to rounding when exact). For the backward it also keeps
   `l = sum p` and `vbar = sum g v / sum g` (`g = r^(k-1)`, entmax's Jacobian weights).

Every kernel after `stats` walks a per-(query tile, head) list of live tiles (`compact`):
the tiles whose every element is visible first (no element mask computed), then the
partial ones (the causal diagonal, padding). The backward kernels are in `triton_vjp.py`.

Search effort (emulating the passes on whole N(0, 1) rows, D=128, 4K to 64K, alpha 1.5):
a 64-row tile is exact after 4 passes with 2 candidates as with 3 (rows: 1-2% exact after
pass 1, 20-40% after 2, 84-93% after 3), i.e. 12 point evaluations per score instead of
16; with 1 candidate after 5-6 passes. After 2 such passes, the root at `lo` alone holds
for 60-80% of the rows, and after a third for all: 2 passes of 3 points and 2 (4K, 16K)
or 3 (64K) finishing passes of one make every tile exact. The multi-point passes then
skip the exactness statistics (about 5 operations per score and point instead of 9): 48
(4K, 16K) to 57 (64K) operations per score in all, against 72-81 with the test in every
pass and 108-144 for the previous 4 passes of 4 points. Placing the points near the
secant bound, or more points in the first pass, did not help.

Performance (H100 80GB, B=1, H=16/16, D=128, causal, bf16, alpha=1.5, flash = our softmax
`flash` impl "auto" (Mosaic GPU); `experiments/bench_entmax.py --iters 5`, 2026-12-06
~20:30 UTC, code of cf662ea, i.e. these kernels with 128x128 stats tiles; ms, ratio =
flash / ours):

  inputs    T | live (lower bound) | fwd ours / flash    x | stats  +tau | f+b ours / flash     x
  topics   4K | 0.17 (0.20)        |   0.707 / 0.280  0.40 | 0.300 0.545 |   0.927 / 0.916   0.99
  topics  16K | 0.06 (0.10)        |   3.421 / 1.926  0.56 | 1.530 2.947 |   4.549 / 7.607   1.67
  topics  64K | 0.03 (0.04)        |  27.70 / 28.66   1.03 | 18.57 25.68 |  34.07 / 120.70   3.54
  random   4K | 1.00 (1.00)        |   1.368 / 0.303  0.22 | 0.263 1.120 |   2.162 / 0.891   0.41
  random  16K | 1.00 (1.00)        |  14.14 / 1.851   0.13 | 1.527 11.37 |  21.99 / 7.625    0.35

(the previous kernels, same bench, earlier run: topics 16K fwd 4.57 / f+b 5.54 ms, random
16K 26.0 / 34.4 ms; in this run's 16K sweep, their settings took 4.575 ms on topics against
3.434.) Where the time goes: on topic inputs the stats pass, a `q k^T` over every visible
tile (18.6 of 27.7 ms at 64K, ~470 TFLOP/s); on N(0, 1) inputs the threshold passes (~2 ms
each at 16K, about as much as a whole flash forward: each recomputes `q k^T` on 64x64
tiles) and the output pass (~2.8 ms). A floor on N(0, 1) inputs for any such multi-pass
design: stats, >= 2 threshold passes and the output pass are >= 4 `q k^T` products plus
one `p v` over every tile, against flash's two products, so the forward cannot reach
flash there.
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
from pallas_kernels.tiles_common import NN, NT, causal as causal_predicate

NEG = -1e30        # masked z
STATS_IMPLS = ("auto", "triton", "mosaic_gpu")
BIG = 1e30         # threshold of a row that sees nothing (exp: p = 0 everywhere)


@dataclasses.dataclass(frozen=True)
class EntmaxTritonConfig:
    """Tiles and search effort. One `(block_q, block_k)` tiling serves the threshold,
    output and backward kernels (the live-tile table is shared by the forward and the
    backward); the stats kernel has its own, coarser tiles.

    block_q, block_k: query / KV tile of the threshold, output and backward kernels (powers
      of two >= 16).
    num_warps, num_stages: their Triton launch parameters (forward); `num_warps_bwd`,
      `num_stages_bwd` for the backward kernels.
    num_passes: threshold passes over the live tiles at `lo` and `num_candidates` more
      points (None: 2 for alpha in {1.5, 2}, else 4). For alpha in {1.5, 2} a query tile
      stops as soon as all its rows are exact.
    finish_passes: passes after those at `lo` alone (a third of the arithmetic: one
      point), once the bracket is narrow (None: 3 for alpha in {1.5, 2}, where the
      exact root at `lo` ends the search, else 0). On N(0, 1) rows at 4K-64K 2 + 2-3 make
      every tile exact (8-9 point evaluations per score; 4 passes of 3 points: 12).
    num_candidates: points besides `lo` at which each of the `num_passes` passes evaluates
      `f` (and its Newton / exactness statistics).
    stats_block_q, stats_block_k: tiles of the stats kernel (row max, per-tile max), a
      pass over every visible tile with no more than `q k^T` and a max: 128 query rows
      halve the K traffic of 64. Multiples of `block_q` / `block_k` (powers of two). The
      kernel keeps the max of each `block_q` rows of its tile (a select on the row maxima,
      not per score); a `stats_block_k` above `block_k` gives each fine tile the max of
      the wider tile (an upper bound: fewer tiles skipped; at 16K on topic inputs 128
      made 10% of the tile pairs live at the lower bound instead of 7%).
    stats_num_warps, stats_num_stages: the stats kernel's Triton launch parameters.
    stats_impl: which kernel runs the stats pass: "triton", "mosaic_gpu" (Hopper: wgmma +
      TMA, `mosaic_gpu_stats.py`; in interpret mode GPU interpret mode, the other kernels
      staying in Triton's interpreter; a ValueError where it does not apply) or "auto"
      (Mosaic GPU on a Hopper GPU where `mosaic_gpu_stats.supports` the call, else Triton;
      Triton in interpret mode).
    stats_mosaic_block_k, stats_mosaic_stages: the Mosaic GPU stats kernel's KV tile (64 or
      128) and K ring depth (>= 2). Its query tiles are fixed (64 rows a warpgroup, 128 a
      CTA); its `tmax` is exact per `(block_q, block_k)` tile whatever these.
    recheck_tiles: each threshold pass skips the arithmetic of a listed tile whose max is
      at or below the lowest lower bound of the tile's rows not yet exact (the bounds rise
      pass by pass; the tile list itself is fixed by the first bound `max - 1`). bool.
    """

    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2
    num_passes: int | None = None
    finish_passes: int | None = None
    num_candidates: int = 2
    stats_block_q: int = 128
    stats_block_k: int = 64
    stats_num_warps: int = 8
    stats_num_stages: int = 3
    recheck_tiles: bool = True
    stats_impl: str = "auto"
    stats_mosaic_block_k: int = 128
    stats_mosaic_stages: int = 4

    def __post_init__(self):
        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        for name in ("block_q", "block_k", "stats_block_q", "stats_block_k"):
            x = getattr(self, name)
            if not (is_int(x) and x >= 16 and x & (x - 1) == 0):
                raise ValueError(f"EntmaxTritonConfig.{name} must be a power of two >= 16, got {x!r}")
        for name in ("num_warps", "num_stages", "num_warps_bwd", "num_stages_bwd",
                     "num_candidates", "stats_num_warps", "stats_num_stages"):
            x = getattr(self, name)
            if not (is_int(x) and x >= 1):
                raise ValueError(f"EntmaxTritonConfig.{name} must be an int >= 1, got {x!r}")
        if self.num_passes is not None and not (is_int(self.num_passes) and self.num_passes >= 1):
            raise ValueError(f"EntmaxTritonConfig.num_passes must be None or an int >= 1, "
                             f"got {self.num_passes!r}")
        if self.finish_passes is not None and not (is_int(self.finish_passes) and self.finish_passes >= 0):
            raise ValueError(f"EntmaxTritonConfig.finish_passes must be None or an int >= 0, "
                             f"got {self.finish_passes!r}")
        if self.recheck_tiles not in (True, False):           # 0 / 1 too (command-line ints)
            raise ValueError(f"EntmaxTritonConfig.recheck_tiles must be a bool, got {self.recheck_tiles!r}")
        if self.stats_impl not in STATS_IMPLS:
            raise ValueError(f"EntmaxTritonConfig.stats_impl must be one of {STATS_IMPLS}, "
                             f"got {self.stats_impl!r}")
        if self.stats_mosaic_block_k not in (64, 128):
            raise ValueError(f"EntmaxTritonConfig.stats_mosaic_block_k must be 64 or 128, "
                             f"got {self.stats_mosaic_block_k!r}")
        if not (is_int(self.stats_mosaic_stages) and self.stats_mosaic_stages >= 2):
            raise ValueError(f"EntmaxTritonConfig.stats_mosaic_stages must be an int >= 2, "
                             f"got {self.stats_mosaic_stages!r}")
        if self.stats_block_q < self.block_q or self.stats_block_k < self.block_k:
            raise ValueError(
                f"EntmaxTritonConfig: the stats tiles ({self.stats_block_q}, {self.stats_block_k}) "
                f"must be multiples of (block_q, block_k) = ({self.block_q}, {self.block_k})")

    def passes(self, alpha: float) -> int:
        if self.num_passes is not None:
            return self.num_passes
        return 2 if alpha in (1.5, 2.0) else 4

    def finishing_passes(self, alpha: float) -> int:
        if self.finish_passes is not None:
            return self.finish_passes
        return 3 if alpha in (1.5, 2.0) else 0


# ----------------------------------------------------------------------------- tile math


def pow_p(r, alpha: float):
    """`r^(1/(alpha-1))` for `r >= 0` (the unnormalised probability)."""
    if alpha == 2.0:
        return r
    if alpha == 1.5:
        return r * r
    pos = r > 0
    return jnp.where(pos, jnp.exp2(jnp.log2(jnp.where(pos, r, 1.0)) * (1.0 / (alpha - 1.0))), 0.0)


def pow_g(r, alpha: float):
    """`r^((2-alpha)/(alpha-1))` on the support, else 0: entmax's Jacobian weight
    `p^(2-alpha)` (unnormalised) and, times `1/(alpha-1)`, `-f'` of the threshold
    equation."""
    if alpha == 2.0:
        return jnp.where(r > 0, 1.0, 0.0)
    if alpha == 1.5:
        return r
    pos = r > 0
    e = (2.0 - alpha) / (alpha - 1.0)
    return jnp.where(pos, jnp.exp2(jnp.log2(jnp.where(pos, r, 1.0)) * e), 0.0)


def g_norm(l, alpha: float):
    """`l^-(2-alpha)`: turns `pow_g` of unnormalised `r` into `p_hat^(2-alpha)` with
    `p_hat = r^k / l`."""
    if alpha == 2.0:
        return jnp.ones_like(l)
    safe = jnp.where(l > 0, l, 1.0)
    if alpha == 1.5:
        return lax.rsqrt(safe)
    return jnp.exp2(jnp.log2(safe) * (alpha - 2.0))


def scores(q, k, zscale, vis):
    """`z = zscale * q k^T` (float32), `NEG` where not visible."""
    z = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * zscale
    return z if vis is None else jnp.where(vis, z, NEG)


# ----------------------------------------------------------------------------- kernels


def _stats_kernel(tab_ref, qpos_ref, kpos_ref, q_ref, k_ref, m_ref, n_ref, tmax_ref, *,
                  mask_fn, zscale, block_k, num_q_blocks, num_k_blocks, split_q):
    """`tmax_ref [split_q * num_k_blocks]`: the max of each row part (`split_q` parts of
    the query tile, the other kernels' query tiles) x KV tile."""
    i = num_q_blocks - 1 - pl.program_id(0)
    b = pl.program_id(1)
    base = (b * num_q_blocks + i) * 4
    lo, flo, fhi, hi = (tab_ref[base + c] for c in range(4))
    q = q_ref[...]
    qp = qpos_ref[...][:, None]
    part = lax.broadcasted_iota(jnp.int32, (q.shape[0],), 0) // (q.shape[0] // split_q)

    def step(j, carry, masked):
        m, n = carry
        sl = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        if masked:
            vis = blocks.visible(mask_fn, qp, kpos_ref[sl][None, :], None, None)
            row = scores(q, k_ref[sl, :], zscale, vis).max(axis=-1)
        else:                                   # zscale > 0: scale the row maxima only
            row = lax.dot_general(q, k_ref[sl, :], NT,
                                  preferred_element_type=jnp.float32).max(axis=-1) * zscale
        for r in range(split_q):                # one scalar per (row part, KV tile)
            tmax_ref[r * num_k_blocks + j] = jnp.max(row if split_q == 1 else
                                                     jnp.where(part == r, row, NEG))
        cnt = vis.astype(jnp.float32).sum(axis=-1) if masked else jnp.float32(block_k)
        return jnp.maximum(m, row), n + cnt

    block_q = q.shape[0]
    carry = (jnp.full((block_q,), NEG, jnp.float32), jnp.zeros((block_q,), jnp.float32))
    carry = lax.fori_loop(lo, flo, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(flo, fhi, functools.partial(step, masked=False), carry)
    m, n = lax.fori_loop(fhi, hi, functools.partial(step, masked=True), carry)
    m_ref[...] = m
    n_ref[...] = n


def _tau_kernel(list_ref, cnt_ref, tmax_ref, qpos_ref, kpos_ref, m_ref, n_ref, q_ref, k_ref,
                tau_ref, *, mask_fn, zscale, alpha, block_k, num_q_blocks, num_heads, list_len,
                num_passes, finish_passes, num_candidates, recheck_tiles):
    i = num_q_blocks - 1 - pl.program_id(0)
    b, h = pl.program_id(1), pl.program_id(2)
    row = (b * num_heads + h) * num_q_blocks + i
    num_full, count = cnt_ref[2 * row], cnt_ref[2 * row + 1]
    q = q_ref[...]
    qp = qpos_ref[...][:, None]
    m, n = m_ref[...], n_ref[...]
    empty = n <= 0
    kinv = 1.0 / (alpha - 1.0)
    exact_kind = alpha in (1.5, 2.0)
    n_safe = jnp.maximum(n, 1.0)
    if alpha == 2.0:
        width = 1.0 / n_safe
    elif alpha == 1.5:
        width = lax.rsqrt(n_safe)
    else:
        width = jnp.exp2(jnp.log2(n_safe) * (1.0 - alpha))
    lo0 = jnp.where(empty, BIG, m - 1.0)
    hi0 = jnp.where(empty, BIG, m - width)
    spread = [(c + 1.0) / (num_candidates + 1.0) for c in range(num_candidates)]

    def one_pass(_, state, cands, certify):
        """`certify`: also the support's size and smallest score (the exact root's test)."""
        check = exact_kind and certify
        lo, hi, done = state
        ts = [lo] + [lo + w * (hi - lo) for w in cands]      # t_0 = lo: f(lo) >= 1
        # Rows not yet exact see nothing at or below `floor` (every point is >= their lo).
        floor = jnp.min(jnp.where(done > 0, BIG, lo))

        def step(t, acc, masked):
            j = list_ref[row * list_len + t]
            sl = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
            vis = blocks.visible(mask_fn, qp, kpos_ref[sl][None, :], None, None) if masked else None
            z = scores(q, k_ref[sl, :], zscale, vis)

            def update(acc):
                out = []
                for (f, g, cnt, zmin), t_ in zip(acc, ts):
                    r = jnp.maximum(z - t_[:, None], 0.0)
                    f = f + pow_p(r, alpha).sum(axis=-1)
                    g = g + pow_g(r, alpha).sum(axis=-1)
                    if check and alpha == 1.5:
                        cnt = cnt + jnp.where(r > 0, 1.0, 0.0).sum(axis=-1)
                    if check:
                        zmin = jnp.minimum(zmin, jnp.where(r > 0, z, BIG).min(axis=-1))
                    out.append((f, g, cnt, zmin))
                return tuple(out)

            if not recheck_tiles:
                return update(acc)
            # the tile is dead for this pass: skip the arithmetic (the loads and the dot
            # stay outside the branch, where the pipeliner keeps them)
            return lax.cond(tmax_ref[row * list_len + j] > floor, update, lambda a: a, acc)

        stop = jnp.min(done) > 0                  # every row of the tile is exact
        n_full, n_live = jnp.where(stop, 0, num_full), jnp.where(stop, 0, count)
        zero = jnp.zeros_like(lo)
        acc = tuple((zero, zero, zero, zero + BIG) for _ in ts)
        acc = lax.fori_loop(0, n_full, functools.partial(step, masked=False), acc)
        acc = lax.fori_loop(n_full, n_live, functools.partial(step, masked=True), acc)
        # a: the highest point with f >= 1 (a lower bound); b: the lowest with f < 1.
        ta, (fa, ga, na, za) = ts[0], acc[0]
        for t_, (f, g, cnt, zmin) in zip(ts[1:], acc[1:]):
            up = f >= 1.0
            ta, fa, ga, na, za = (jnp.where(up, x, y) for x, y in
                                  ((t_, ta), (f, fa), (g, ga), (cnt, na), (zmin, za)))
        tb, fb, known = hi, zero, zero > 0
        for t_, (f, *_) in reversed(list(zip(ts[1:], acc[1:]))):
            down = f < 1.0
            tb, fb, known = jnp.where(down, t_, tb), jnp.where(down, f, fb), down | known
        ga_safe = jnp.where(ga > 0, ga, 1.0)
        new_lo = jnp.maximum(ta, ta + (fa - 1.0) / (kinv * ga_safe))     # Newton (convex f)
        chord = ta + (fa - 1.0) * (tb - ta) / jnp.where(fa > fb, fa - fb, 1.0)
        new_hi = jnp.where(known, jnp.minimum(tb, chord), tb)            # secant: above
        exact = zero > 0
        if check:
            if alpha == 2.0:                 # Michelot's step: the Newton step itself
                root, ok = ta + (fa - 1.0) / ga_safe, ga > 0
            else:                            # the quadratic over the support at a
                disc = ga * ga - na * (fa - 1.0)
                ok = (disc >= 0) & (na > 0)
                root = ta + (ga - jnp.sqrt(jnp.maximum(disc, 0.0))) / jnp.where(na > 0, na, 1.0)
                new_hi = jnp.where(ok, jnp.minimum(new_hi, root), new_hi)
            exact = ok & (root <= za)
            new_lo = jnp.where(exact, root, new_lo)
            new_hi = jnp.where(exact, root, new_hi)
        new_lo = jnp.minimum(new_lo, new_hi)
        keep = done > 0
        done = jnp.where(keep | exact, 1.0, 0.0)
        return jnp.where(keep, lo, new_lo), jnp.where(keep, hi, new_hi), done

    done0 = jnp.where(empty, 1.0, 0.0)
    # The multi-point passes narrow the bracket; where finishing passes follow, only
    # those test for the exact root (before they would, on N(0, 1) rows, pin 1-2% of the
    # rows after the first pass and 20-40% after the second, never a whole tile: 4 of
    # 9 operations per point saved).
    state = lax.fori_loop(0, num_passes,
                          functools.partial(one_pass, cands=spread, certify=finish_passes == 0),
                          (lo0, hi0, done0))
    # finishing passes: at lo alone (Newton's step, or the exact root)
    lo, _, _ = lax.fori_loop(0, finish_passes, functools.partial(one_pass, cands=[], certify=True),
                             state)
    tau_ref[...] = lo


def _out_kernel(list_ref, cnt_ref, qpos_ref, kpos_ref, tau_ref, q_ref, k_ref, v_ref, o_ref,
                l_ref=None, vbar_ref=None, *, mask_fn, zscale, alpha, block_k, num_q_blocks,
                num_heads, list_len):
    i = num_q_blocks - 1 - pl.program_id(0)
    b, h = pl.program_id(1), pl.program_id(2)
    row = (b * num_heads + h) * num_q_blocks + i
    num_full, count = cnt_ref[2 * row], cnt_ref[2 * row + 1]
    q = q_ref[...]
    qp = qpos_ref[...][:, None]
    tau = tau_ref[...][:, None]
    residual = l_ref is not None

    def step(t, carry, masked):
        j = list_ref[row * list_len + t]
        sl = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        vis = blocks.visible(mask_fn, qp, kpos_ref[sl][None, :], None, None) if masked else None
        r = jnp.maximum(scores(q, k_ref[sl, :], zscale, vis) - tau, 0.0)
        p = pow_p(r, alpha)
        v = v_ref[sl, :]
        l, acc, *rest = carry
        l = l + p.sum(axis=-1)
        acc = acc + lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=jnp.float32)
        if residual:
            gw = pow_g(r, alpha)
            gs, u = rest
            rest = [gs + gw.sum(axis=-1),
                    u + lax.dot_general(gw.astype(v.dtype), v, NN, preferred_element_type=jnp.float32)]
        return (l, acc, *rest)

    block_q = q.shape[0]
    zero_row = jnp.zeros((block_q,), jnp.float32)
    zero_acc = jnp.zeros((block_q, v_ref.shape[-1]), jnp.float32)
    carry = (zero_row, zero_acc) + ((zero_row, zero_acc) if residual else ())
    carry = lax.fori_loop(0, num_full, functools.partial(step, masked=False), carry)
    l, acc, *rest = lax.fori_loop(num_full, count, functools.partial(step, masked=True), carry)
    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)
    if residual:
        gs, u = rest
        l_ref[...] = l
        vbar_ref[...] = u / jnp.where(gs > 0, gs, 1.0)[:, None]


# ----------------------------------------------------------------------------- driver


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything static about one call (hashable; a custom_vjp nondiff argument)."""

    alpha: float
    causal: bool
    scale: float
    config: EntmaxTritonConfig
    interpret: bool
    shapes: tuple = ()       # unpadded (q, k, v) shapes, for the backward's slicing

    @property
    def mask_fn(self):
        return causal_predicate if self.causal else None

    @property
    def zscale(self) -> float:
        return (self.alpha - 1.0) * self.scale


def tiles(st: Static, tq: int, tk: int) -> tuple[int, int]:
    """`(block_q, block_k)` of the threshold, output and backward kernels for lengths
    `tq`, `tk` (capped to the next power of two of the length)."""
    return (blocks.pow2_block(st.config.block_q, tq), blocks.pow2_block(st.config.block_k, tk))


def stats_tiles(st: Static, tq: int, tk: int) -> tuple[int, int]:
    """The stats kernel's tiles: multiples of `tiles(...)` (both powers of two, the
    config's stats tiles no smaller than its tiles)."""
    return (blocks.pow2_block(st.config.stats_block_q, tq),
            blocks.pow2_block(st.config.stats_block_k, tk))


def stats_impl(st: Static, dtype, tq_p: int, tk_p: int, d_p: int, bq: int, bk: int) -> str:
    """"triton" or "mosaic_gpu": the kernel of the stats pass on these padded sizes (see
    `EntmaxTritonConfig.stats_impl`); ValueError where "mosaic_gpu" is asked and does not
    apply."""
    from pallas_kernels import common  # noqa: PLC0415
    from pallas_kernels.entmax import mosaic_gpu_stats  # noqa: PLC0415 - fwd file standalone

    choice = st.config.stats_impl
    if choice == "triton" or (choice == "auto" and st.interpret):
        return "triton"
    reason = mosaic_gpu_stats.supports(st.config, dtype, tq_p, tk_p, d_p, bq, bk)
    if choice == "mosaic_gpu":
        if reason:
            raise ValueError(f"EntmaxTritonConfig.stats_impl='mosaic_gpu' does not support {reason}; "
                             "use 'triton' or 'auto'")
        return "mosaic_gpu"
    reason = reason or common.platform_reason("mosaic_gpu", common.current_device(), False)
    return "triton" if reason else "mosaic_gpu"


def stats_layout(st: Static, dtype, tq: int, tk: int, d: int) -> tuple[str, int, int, int]:
    """`(impl, tq_p, tk_p, d_p)`: the stats kernel `stats_impl` picks ("triton" |
    "mosaic_gpu", resolved here, once per call) and the padded sizes it runs on: the
    sequence axes to whole stats tiles of that kernel (so whole tiles too), the head dim to
    a power of two (>= 16)."""
    from pallas_kernels.entmax import mosaic_gpu_stats  # noqa: PLC0415

    sbq, sbk = stats_tiles(st, tq, tk)
    d_p = max(16, blocks.pl_next_pow2(d))
    mq, mk = mosaic_gpu_stats.padding(st.config)
    mq, mk = max(sbq, mq), max(sbk, mk)                     # powers of two: their lcm
    tq_m, tk_m = blocks.round_up(tq, mq), blocks.round_up(tk, mk)
    if stats_impl(st, dtype, tq_m, tk_m, d_p, *tiles(st, tq, tk)) == "mosaic_gpu":
        return "mosaic_gpu", tq_m, tk_m, d_p
    return "triton", blocks.round_up(tq, sbq), blocks.round_up(tk, sbk), d_p


def pad_inputs(st: Static, q, k, v, q_pos, kv_pos):
    """`(impl, q, k, v, q_pos, kv_pos)`: `stats_layout`'s stats kernel (for `run_stats`)
    and the inputs padded to its sizes (positions -1; `v`'s head dim to a power of two
    too)."""
    impl, tq_p, tk_p, d_p = stats_layout(st, q.dtype, q.shape[1], k.shape[1], q.shape[3])
    dv_p = max(16, blocks.pl_next_pow2(v.shape[3]))
    q = blocks.pad_axis(blocks.pad_axis(q, tq_p, 1), d_p, 3)
    k = blocks.pad_axis(blocks.pad_axis(k, tk_p, 1), d_p, 3)
    v = blocks.pad_axis(blocks.pad_axis(v, tk_p, 1), dv_p, 3)
    return impl, q, k, v, blocks.pad_axis(q_pos, tq_p, 1, -1), blocks.pad_axis(kv_pos, tk_p, 1, -1)


def compact(live, full):
    """The kernels' tile lists. `live [..., n]` bool, `full` (broadcastable to it) bool:
    tiles every element of which is visible (no element mask needed) ->
    (`idx [..., n]` int32: the live full tiles ascending, then the other live tiles
    ascending, then padding; `counts [..., 2]` int32: (live full tiles, live tiles))."""
    n = live.shape[-1]
    full = jnp.broadcast_to(full, live.shape)
    first = (live & full).reshape(-1, n).astype(jnp.int32)
    second = (live & ~full).reshape(-1, n).astype(jnp.int32)
    n_first = first.sum(-1)
    n_live = n_first + second.sum(-1)
    pos = jnp.where(first > 0, jnp.cumsum(first, axis=-1) - 1,
                    jnp.where(second > 0, n_first[:, None] + jnp.cumsum(second, axis=-1) - 1, n))
    rows = jnp.arange(first.shape[0])[:, None]
    idx = jnp.zeros((first.shape[0], n + 1), jnp.int32).at[rows, pos].set(
        jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), first.shape))[:, :n]
    counts = jnp.stack([n_first, n_live], -1).astype(jnp.int32)
    return idx.reshape(live.shape), counts.reshape(live.shape[:-1] + (2,))


def row_min_per_tile(x, valid, bq: int):
    """min over each query tile's valid rows of `x [B, H, Tq_p]` -> `[B, H, nQ, 1]` (BIG
    where no row is valid)."""
    b, h, tq_p = x.shape
    x = jnp.where(valid, x, BIG).reshape(b, h, tq_p // bq, bq)
    return x.min(-1)[..., None]


def tau_tile_list(m, n, tmax, full, bq: int):
    """The threshold kernel's tile lists (`compact`): the tiles whose max exceeds the lowest
    lower bound `m - 1` of their rows' thresholds."""
    return compact(tmax > row_min_per_tile(m - 1.0, n > 0, bq), full[:, None])


def run_stats(st: Static, impl: str, qp, kp, q_pos_p, kv_pos_p, bq, bk):
    """Row max `m`, visible count `n` (`[B, H, Tq_p]`), the per-tile max `tmax [B, H, nQ,
    nK]` on the `(bq, bk)` tiles (exact where `stats_block_k == bk`, else the max over the
    stats tile's `bq` rows: an upper bound; `NEG` where nothing is visible) and
    `full [B, nQ, nK]` bool (every element visible). `impl` (`pad_inputs`'s): the Triton
    kernel below, or the Mosaic GPU one (`mosaic_gpu_stats.run_stats`, exact per tile)."""
    cfg = st.config
    b, tq_p, h, d_p = qp.shape
    tk_p, hkv = kp.shape[1], kp.shape[2]
    if impl == "mosaic_gpu":
        from pallas_kernels.entmax import mosaic_gpu_stats  # noqa: PLC0415
        from jax.experimental.pallas import mosaic_gpu as plmgpu  # noqa: PLC0415

        return mosaic_gpu_stats.run_stats(st, qp, kp, q_pos_p, kv_pos_p, bq, bk,
                                          interpret=plmgpu.InterpretGPUParams() if st.interpret else None)
    group = h // hkv
    sbq, sbk = stats_tiles(st, tq_p, tk_p)
    nq, nk = tq_p // sbq, tk_p // sbk
    split = sbq // bq                           # the tile max of each (bq)-row part
    tab = blocks.tables(st.mask_fn, q_pos_p, kv_pos_p, None, None, sbq, sbk)      # [B, nQ, 4]
    rev = lambda i: nq - 1 - i  # noqa: E731
    m, n, tmax = pl.pallas_call(
        functools.partial(_stats_kernel, mask_fn=st.mask_fn, zscale=st.zscale, block_k=sbk,
                          num_q_blocks=nq, num_k_blocks=nk, split_q=split),
        grid=(nq, b, h),
        in_specs=[
            pl.BlockSpec(),
            pl.BlockSpec((None, sbq), lambda i, b_, h_: (b_, rev(i))),
            pl.BlockSpec((None, tk_p), lambda i, b_, h_: (b_, 0)),
            pl.BlockSpec((None, sbq, None, d_p), lambda i, b_, h_: (b_, rev(i), h_, 0)),
            pl.BlockSpec((None, tk_p, None, d_p), lambda i, b_, h_: (b_, 0, h_ // group, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, sbq), lambda i, b_, h_: (b_, h_, rev(i))),
            pl.BlockSpec((None, None, sbq), lambda i, b_, h_: (b_, h_, rev(i))),
            pl.BlockSpec((None, None, None, split * nk), lambda i, b_, h_: (b_, h_, rev(i), 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, h, tq_p), jnp.float32),
                   jax.ShapeDtypeStruct((b, h, tq_p), jnp.float32),
                   jax.ShapeDtypeStruct((b, h, nq, split * nk), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.stats_num_warps,
                                             num_stages=cfg.stats_num_stages),
        interpret=st.interpret, name="entmax_stats",
    )(tab.reshape(-1), q_pos_p, kv_pos_p, qp, kp)
    j = jnp.arange(nk, dtype=jnp.int32)
    visited = (j >= tab[:, :, 0:1]) & (j < tab[:, :, 3:4])                          # [B, nQ, nK]
    tmax = jnp.where(visited[:, None, :, None], tmax.reshape(b, h, nq, split, nk), NEG)
    tmax = jnp.repeat(tmax.reshape(b, h, nq * split, nk), sbk // bk, axis=3)     # fine tiles
    present, full = blocks.block_tables(st.mask_fn, q_pos_p, kv_pos_p, None, None, bq, bk)
    return m, n, jnp.where(present[:, None], tmax, NEG), full


def row_specs(bq, nq):
    rev = lambda i: nq - 1 - i  # noqa: E731
    return pl.BlockSpec((None, None, bq), lambda i, b_, h_: (b_, h_, rev(i)))


def run_tau(st: Static, qp, kp, q_pos_p, kv_pos_p, m, n, tmax, full, bq, bk):
    cfg = st.config
    b, tq_p, h, d_p = qp.shape
    tk_p, hkv = kp.shape[1], kp.shape[2]
    group = h // hkv
    nq, nk = tq_p // bq, tk_p // bk
    idx, count = tau_tile_list(m, n, tmax, full, bq)
    rev = lambda i: nq - 1 - i  # noqa: E731
    kernel = functools.partial(
        _tau_kernel, mask_fn=st.mask_fn, zscale=st.zscale, alpha=st.alpha, block_k=bk,
        num_q_blocks=nq, num_heads=h, list_len=nk, num_passes=cfg.passes(st.alpha),
        finish_passes=cfg.finishing_passes(st.alpha), num_candidates=cfg.num_candidates,
        recheck_tiles=bool(cfg.recheck_tiles))
    return pl.pallas_call(
        kernel,
        grid=(nq, b, h),
        in_specs=[
            pl.BlockSpec(), pl.BlockSpec(), pl.BlockSpec(),
            pl.BlockSpec((None, bq), lambda i, b_, h_: (b_, rev(i))),
            pl.BlockSpec((None, tk_p), lambda i, b_, h_: (b_, 0)),
            row_specs(bq, nq), row_specs(bq, nq),
            pl.BlockSpec((None, bq, None, d_p), lambda i, b_, h_: (b_, rev(i), h_, 0)),
            pl.BlockSpec((None, tk_p, None, d_p), lambda i, b_, h_: (b_, 0, h_ // group, 0)),
        ],
        out_specs=row_specs(bq, nq),
        out_shape=jax.ShapeDtypeStruct((b, h, tq_p), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=st.interpret, name="entmax_tau",
    )(idx.reshape(-1), count.reshape(-1), tmax.reshape(-1), q_pos_p, kv_pos_p, m, n, qp, kp)


def live_tiles(tmax, tau, bq):
    """`[B, H, nQ, nK]` bool: tiles holding a score above some row's threshold."""
    return tmax > row_min_per_tile(tau, tau < BIG / 2, bq)


def run_out(st: Static, qp, kp, vp, q_pos_p, kv_pos_p, tau, tile_list, bq, bk, residual: bool):
    """The output pass over `tile_list = compact(live, full)`'s tiles (the backward's dq
    kernel reuses the list)."""
    cfg = st.config
    b, tq_p, h, d_p = qp.shape
    tk_p, hkv, dv_p = kp.shape[1], kp.shape[2], vp.shape[3]
    group = h // hkv
    nq, nk = tq_p // bq, tk_p // bk
    idx, count = tile_list
    rev = lambda i: nq - 1 - i  # noqa: E731
    o_spec = pl.BlockSpec((None, bq, None, dv_p), lambda i, b_, h_: (b_, rev(i), h_, 0))
    out_specs = [o_spec]
    out_shape = [jax.ShapeDtypeStruct((b, tq_p, h, dv_p), qp.dtype)]
    if residual:
        out_specs += [row_specs(bq, nq), o_spec]
        out_shape += [jax.ShapeDtypeStruct((b, h, tq_p), jnp.float32),
                      jax.ShapeDtypeStruct((b, tq_p, h, dv_p), jnp.float32)]
    kernel = functools.partial(_out_kernel, mask_fn=st.mask_fn, zscale=st.zscale, alpha=st.alpha,
                               block_k=bk, num_q_blocks=nq, num_heads=h, list_len=nk)
    res = pl.pallas_call(
        kernel,
        grid=(nq, b, h),
        in_specs=[
            pl.BlockSpec(), pl.BlockSpec(),
            pl.BlockSpec((None, bq), lambda i, b_, h_: (b_, rev(i))),
            pl.BlockSpec((None, tk_p), lambda i, b_, h_: (b_, 0)),
            row_specs(bq, nq),
            pl.BlockSpec((None, bq, None, d_p), lambda i, b_, h_: (b_, rev(i), h_, 0)),
            pl.BlockSpec((None, tk_p, None, d_p), lambda i, b_, h_: (b_, 0, h_ // group, 0)),
            pl.BlockSpec((None, tk_p, None, dv_p), lambda i, b_, h_: (b_, 0, h_ // group, 0)),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=st.interpret, name="entmax_out_res" if residual else "entmax_out",
    )(idx.reshape(-1), count.reshape(-1), q_pos_p, kv_pos_p, tau, qp, kp, vp)
    return res if residual else (res[0],)


def forward_padded(st: Static, q, k, v, q_pos, kv_pos, residual: bool):
    """Returns `(out [B, Tq, H, Dv], tau [B, H, Tq], extras)`; `extras` (with `residual`)
    holds what `triton_vjp.backward` needs."""
    b, tq, h, _ = q.shape
    dv = v.shape[3]
    bq, bk = tiles(st, tq, k.shape[1])
    impl, qp, kp, vp, q_pos_p, kv_pos_p = pad_inputs(st, q, k, v, q_pos, kv_pos)
    m, n, tmax, full = run_stats(st, impl, qp, kp, q_pos_p, kv_pos_p, bq, bk)
    tau = run_tau(st, qp, kp, q_pos_p, kv_pos_p, m, n, tmax, full, bq, bk)
    live = live_tiles(tmax, tau, bq)
    tile_list = compact(live, full[:, None])
    res = run_out(st, qp, kp, vp, q_pos_p, kv_pos_p, tau, tile_list, bq, bk, residual)
    out = res[0][:, :tq, :, :dv]
    tau_out = jnp.where(tau < BIG / 2, tau, jnp.inf)[:, :, :tq]
    extras = None
    if residual:
        extras = dict(qp=qp, kp=kp, vp=vp, q_pos_p=q_pos_p, kv_pos_p=kv_pos_p, tau=tau,
                      live=live, full=full, tile_list=tile_list, l=res[1], vbar=res[2])
    return out, tau_out, extras


def tile_statistics(st: Static, q, k, q_pos, kv_pos):
    """For benchmarks: `(live fraction of the visited tile pairs after the threshold,
    visited tile pairs)` as floats (jnp scalars)."""
    bq, bk = tiles(st, q.shape[1], k.shape[1])
    v = k[..., :1]
    impl, qp, kp, _, q_pos_p, kv_pos_p = pad_inputs(st, q, k, v, q_pos, kv_pos)
    m, n, tmax, full = run_stats(st, impl, qp, kp, q_pos_p, kv_pos_p, bq, bk)
    tau = run_tau(st, qp, kp, q_pos_p, kv_pos_p, m, n, tmax, full, bq, bk)
    visited = tmax > NEG / 2
    live = live_tiles(tmax, tau, bq) & visited
    lower_live = (tmax > row_min_per_tile(m - 1.0, n > 0, bq)) & visited
    return live.sum() / visited.sum(), lower_live.sum() / visited.sum()


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _entmax(st: Static, q, k, v, q_pos, kv_pos):
    out, tau, _ = forward_padded(st, q, k, v, q_pos, kv_pos, residual=False)
    return out, tau


def _entmax_fwd(st, q, k, v, q_pos, kv_pos):
    out, tau, extras = forward_padded(st, q, k, v, q_pos, kv_pos, residual=True)
    return (out, tau), extras


def _entmax_bwd(st, extras, cts):
    from pallas_kernels.entmax import triton_vjp  # noqa: PLC0415 - keeps the fwd file standalone

    dout, _ = cts                                  # tau is not differentiated
    dq, dk, dv = triton_vjp.backward(st, extras, dout)
    return dq, dk, dv, None, None


_entmax.defvjp(_entmax_fwd, _entmax_bwd)


def entmax_triton(q, k, v, *, alpha, q_positions, kv_positions, causal, scale, return_tau,
                  interpret=False, config: EntmaxTritonConfig | None = None):
    """`entmax_reference`'s contract on the Triton kernels (`interpret=True`: CPU)."""
    st = Static(alpha=float(alpha), causal=bool(causal), scale=float(scale),
                config=config or EntmaxTritonConfig(), interpret=bool(interpret),
                shapes=(tuple(q.shape), tuple(k.shape), tuple(v.shape)))
    out, tau = _entmax(st, q, k, v, jnp.asarray(q_positions, jnp.int32),
                       jnp.asarray(kv_positions, jnp.int32))
    return (out, tau) if return_tau else out


# Backend declaration for `pallas_kernels.common.resolve`: a GPU (or interpret mode); every
# call the api accepts; tiles `EntmaxTritonConfig`.
CONFIG = EntmaxTritonConfig
