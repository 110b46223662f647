"""Lightning-indexer top-k without the float32 score matrix: sampled threshold, fused candidates.

DSA's indexer (arXiv 2512.02556) picks, per query, the k keys of largest score
`I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s])`. The default Triton path (`api.chunk_topk_triton`
with an `IndexerTritonConfig`) writes every float32 score of a query chunk (8.6 GB at T = S = 64K
causal) and runs the exact radix select (`select.topk_select`, 6 passes of 2 bits over each row):
H100, 64K, 4 heads x 64, k = 2048: 41.6 ms, of which the select ~32 ms. This path
(`config=FusedIndexerConfig()`) never writes the score rows:

1. Threshold estimate: the score kernel on every `sample_stride`-th key only (`m`; scores
   `[B, C, S / m]`, 1/m of the bytes) and the radix select of its `r = ceil(oversample * k' / m)`
   largest (`k' = min(k, S)`; the select reads each row up to its last visible sampled tile);
   `th` = the smallest of them (-inf where fewer than r sampled keys are visible). About
   `m * r = oversample * k'` keys of the row score `>= th`; the count's spread is
   ~`sqrt(m * oversample * k')` (169 at m = 8, k' = 2048, oversample 1.75: the margin to k',
   1536, is 9 spreads for rows of exchangeable scores; bench_dsa's random inputs at 64K, 600
   rows in numpy: 3564 +- 233 kept, at most 4261, none failing; capacity 3 leaves room for
   a mass of ties at `th`, e.g. ReLU zeros, kept until the buffer holds k').
2. Candidates (`_kernel`, Pallas Triton, one program per query tile, q and w resident in
   registers, the longest (causal) tiles launched first): the tile's scores are recomputed key
   tile by key tile up to the last tile holding a key visible to the query tile (the score
   kernel's `tile_scores`), and the slots and float32 scores of the keys above `th`, plus the
   keys equal to it (in `lax.top_k`'s total order: `select.float_keys`) while the buffer
   holds fewer than k', are appended in slot order (one in-tile exclusive scan carries both
   running counts, packed in 16-bit halves) to the row's buffer of `cap = capacity * k'`
   columns; the kernel also counts, per row, the candidates (beyond `cap` too), the keys
   `>= th` and the visible keys.
3. Exact set: the radix select on the `[B * C, cap]` buffers, each row read up to its count
   (~`oversample * k'` columns: 1/9 of the old select's work at 64K causal, k' = 2048),
   gives the k' largest as buffer columns, ascending; the slots are gathered from them
   (ascending, since the buffer is in slot order).

Exactness: the buffer holds, in slot order, every key above `th` and the keys equal to it up
to the first that finds k' keys before it in the buffer. If at least k' keys (or every
visible key) are `>= th`, the k'-th largest T is `>= th`: every key above T is in the buffer,
and so are the keys tied at T that `lax.top_k` takes: all of them if T > th; if T = th, the
`need = k' - (keys above th)` lowest-slot ones (a tie is dropped only once k' keys precede it,
at least `k' - (keys above th)` of them ties already kept). So the select
over the buffer returns `lax.top_k`'s set with its lower-slot-first tie rule. The kernel
checks both conditions (>= k' keys `>= th`, buffer within `cap`) for every row; rows that
fail (a skewed sample; ties at the threshold, such as a mass of ReLU zeros, take at most k'
columns) run again with `th = -inf` and a buffer as wide as the chunk's keys: up to
`fallback_rows` (F) of them per batch row gathered into one step (a per-row failure rate of
a few 1e-6 costs a 64K-query chunk one small step now and then), else the whole chunk,
`fallback_chunk` queries at a time (`lax.switch`; about the old path's cost).
Chunks with at most `cap` keys take that path directly (no sampling).

Why not a fused histogram of the keys: a per-row histogram in registers costs one
compare-add per bin and element (the radix select is bound by exactly these at 4 bins), and a
useful first pass needs hundreds of bins (the top 8 key bits hold sign and exponent only);
Pallas Triton offers no shared-memory atomics. The sample replaces the coarse passes by 1/m
of the score work; what stays exact is a select over ~1.75 k' candidates instead of S.

Cost model at 64K causal, one chunk (2.15e9 scores; `bench_dsa.py --fused` times each step):
sample scores ~1/8 of the score kernel (~1.5 ms, its invisible tiles written as -inf), sample
select over ~4K columns per row and final select over ~3.6K (~1-3 ms each: rows of 16 KB,
not the old 256 KB), candidate kernel = the score dots and epilogue once more plus a scan and
two masked scatters per tile, without the 8.6 GB of writes (~3-5 ms): ~7-12 ms against 41.6,
i.e. 15-25% of the bf16 matmul rate, short of issue 15's 40% unless the candidate kernel runs
near the dot rate.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash import blocks
from pallas_kernels.indexer.common_tile import tile_scores
from pallas_kernels.indexer.select import NEG_INF_KEY, TopkSelectConfig, float_keys, topk_select
from pallas_kernels.indexer.triton import IndexerTritonConfig, chunk_scores_triton
from pallas_kernels.tiles_common import BIG


@dataclasses.dataclass(frozen=True)
class FusedIndexerConfig(IndexerTritonConfig):
    """`IndexerTritonConfig`'s tiles (the sample's score kernel and the candidate kernel;
    64 x 64 tiles by default, not 64 x 128) plus:
    sample_stride: m, every m-th key scored for the threshold; oversample: the sample rank
    `r = ceil(oversample * k' / m)` (> 1: most rows get more than k' candidates);
    capacity: candidate columns per row, `cap = capacity * k'` (rounded up to block_k);
    select: the radix select's tiles (sample and candidates); fallback_rows: F, the most
    failing rows per batch row redone alone (buffers `F x S`); fallback_chunk: queries per
    step when more fail (the whole chunk redone; buffers `fallback_chunk x S`)."""

    block_k: int = 64           # H100, 64K, one chunk: 20.65 ms end to end vs 22.96 at 64 x 128 / 8 warps
    num_warps: int = 4
    sample_stride: int = 8
    oversample: float = 1.75
    capacity: float = 3.0
    select: TopkSelectConfig | None = None
    fallback_rows: int = 256
    fallback_chunk: int = 2048

    def __post_init__(self):
        super().__post_init__()
        for name in ("sample_stride", "fallback_rows", "fallback_chunk"):
            val = getattr(self, name)
            if not (isinstance(val, int) and val >= 1):
                raise ValueError(f"{name} must be an int >= 1, got {val!r}")
        if not self.oversample >= 1 or not self.capacity >= self.oversample:
            raise ValueError(f"need 1 <= oversample <= capacity, got oversample={self.oversample!r}, "
                             f"capacity={self.capacity!r}")


def _kernel(nt_ref, qp_ref, th_ref, kp_ref, q_ref, w_ref, k_ref, *rest, num_heads, n_q_tiles, n_k_tiles,
            block_q, block_k, cap, keep_ties, widen):
    ks_ref = rest[0] if len(rest) == 6 else None
    slots_ref, vals_ref, count_ref, reach_ref, nvis_ref = rest[-5:]
    b, i = pl.program_id(0), n_q_tiles - 1 - pl.program_id(1)    # causal: the longest tiles first
    r0 = (b * n_q_tiles + i) * block_q                       # first row of the flattened [B * Cp]
    qp = qp_ref[pl.ds(r0, block_q)][:, None]
    th_key = float_keys(th_ref[pl.ds(r0, block_q)])[:, None]
    cast = (lambda x: x.astype(jnp.bfloat16)) if widen else (lambda x: x)  # noqa: E731
    qs = [cast(q_ref[pl.ds(((b * num_heads + h) * n_q_tiles + i) * block_q, block_q), :])
          for h in range(num_heads)]
    ws = [w_ref[pl.ds(((b * num_heads + h) * n_q_tiles + i) * block_q, block_q)].astype(jnp.float32)[:, None]
          for h in range(num_heads)]
    rows_idx = jnp.broadcast_to((r0 + jnp.arange(block_q, dtype=jnp.int32))[:, None], (block_q, block_k))
    col = jnp.arange(block_k, dtype=jnp.int32)[None, :]

    def tile(j, carry):
        n, reach, nvis = carry
        sl = pl.ds(pl.multiple_of(b * (n_k_tiles * block_k) + j * block_k, block_k), block_k)
        sc = tile_scores(lambda h: qs[h], lambda h: ws[h], cast(k_ref[sl, :]), num_heads, qp,
                         kp_ref[sl][None, :], None if ks_ref is None else ks_ref[sl][None, :])
        key = float_keys(sc)
        vis = key > NEG_INF_KEY
        above = vis & (key > th_key)
        tie = vis & (key == th_key)
        # one scan for both running counts: keys >= th in the low 16 bits, ties in the high
        packed = (above | tie).astype(jnp.int32) + lax.shift_left(tie.astype(jnp.int32), 16)
        before = jnp.cumsum(packed, axis=1) - packed
        ge_before, ties_before = before & 0xFFFF, lax.shift_right_logical(before, 16)
        # a tie is kept while the buffer holds fewer than keep_ties: until then every key >= th
        # was kept, so that count is n + ge_before; the kept ties are a prefix of the tile's
        kept = tie & (n[:, None] + ge_before < keep_ties)
        n_kept = kept.astype(jnp.int32).sum(axis=1)
        pos = n[:, None] + ge_before - ties_before + jnp.minimum(ties_before, n_kept[:, None])
        keep = (above | kept) & (pos < cap)
        plgpu.store(slots_ref.at[rows_idx, pos], j * block_k + col + jnp.zeros_like(pos), mask=keep)
        plgpu.store(vals_ref.at[rows_idx, pos], sc, mask=keep)
        total = packed.sum(axis=1)
        ge, ties = total & 0xFFFF, lax.shift_right_logical(total, 16)
        return n + ge - ties + n_kept, reach + ge, nvis + vis.astype(jnp.int32).sum(axis=1)

    zero = jnp.zeros((block_q,), jnp.int32)
    n, reach, nvis = lax.fori_loop(0, nt_ref[b * n_q_tiles + i], tile, (zero, zero, zero))
    count_ref[pl.ds(r0, block_q)] = n
    reach_ref[pl.ds(r0, block_q)] = reach
    nvis_ref[pl.ds(r0, block_q)] = nvis


SAMPLE_TILE = 128


def _tiles_to_visit(qp, kp, bq, bk):
    """`[B, Cp / bq]` int32: per query tile, 1 + the last key tile holding a key visible to one
    of its queries (0: none), from the padded positions `qp [B, Cp]`, `kp [B, Sp]`; the
    kernel's key loop stops there (causal prefill: the diagonal tile), and the sample select
    reads that prefix of each row (`bq = 1`, tiles of `SAMPLE_TILE`)."""
    b = qp.shape[0]
    kmin = jnp.min(jnp.where(kp >= 0, kp, BIG).reshape(b, -1, bk), -1)             # [B, nK]
    qmax = jnp.max(qp.reshape(b, -1, bq), -1)                                       # [B, nQ]
    tile = jnp.arange(1, kmin.shape[1] + 1, dtype=jnp.int32)
    return jnp.max(jnp.where(kmin[:, None, :] <= qmax[:, :, None], tile, 0), -1).astype(jnp.int32)


def chunk_candidates(q_index, weights, k_index, q_positions, kv_positions, threshold, *, cap: int,
                     keep_ties: int, k_scale=None, interpret=False, config: IndexerTritonConfig | None = None):
    """Every visible key with score above the threshold, and those equal to it while fewer
    than `keep_ties` keys are kept, per query, in slot order (order and ties by the float
    keys, `select.float_keys`).

    Args: `chunk_scores_triton`'s (q_index `[B, C, H_I, D_I]`, weights `[B, C, H_I]`, k_index
      `[B, S, D_I]`, positions `[B, C]` / `[B, S]`, k_scale None or `[B, S]` for FP8 operands),
      threshold `[B, C]` float32 (-inf: every visible key), cap: buffer columns, a multiple of
      the key tile (`pow2_block(config.block_k, S)`); keep_ties: k' (the ties kept then
      include the lowest-slot `k' - (keys above)` ones, all that the select can take).
    Returns: `(slots [B, C, cap] int32, scores [B, C, cap] float32, count [B, C] int32,
      reach [B, C] int32, n_visible [B, C] int32)`: the first `min(count, cap)` columns hold
      the candidates (ascending slots, their scores), the others are not written; `count` =
      candidates in all (may exceed cap), `reach` = visible keys `>=` the threshold (ties
      beyond keep_ties too), `n_visible` = visible keys.
    """
    cfg = config or IndexerTritonConfig()
    b, c, h, d = q_index.shape
    s = k_index.shape[1]
    fp8 = k_scale is not None
    bq, bk = blocks.pow2_block(cfg.block_q, c), blocks.pow2_block(cfg.block_k, s)
    if cap % bk or cap < bk:
        raise ValueError(f"cap must be a positive multiple of the key tile {bk}, got {cap}")
    if bk >= 2**15:
        raise ValueError(f"block_k must be < 2**15 (16-bit counts in the kernel's scan), got {bk}")
    cp, sp, dp = blocks.round_up(c, bq), blocks.round_up(s, bk), max(32 if fp8 else 16, blocks.pl_next_pow2(d))
    q = jnp.pad(jnp.moveaxis(q_index, 2, 1), [(0, 0), (0, 0), (0, cp - c), (0, dp - d)])   # [B, H, Cp, D]
    w = jnp.pad(jnp.moveaxis(weights, 2, 1), [(0, 0), (0, 0), (0, cp - c)])                # [B, H, Cp]
    k = jnp.pad(k_index, [(0, 0), (0, sp - s), (0, dp - d)]).astype(q.dtype)
    qp = jnp.pad(q_positions.astype(jnp.int32), [(0, 0), (0, cp - c)], constant_values=-1)
    kp = jnp.pad(kv_positions.astype(jnp.int32), [(0, 0), (0, sp - s)], constant_values=-1)
    th = jnp.pad(threshold.astype(jnp.float32), [(0, 0), (0, cp - c)])
    args = [_tiles_to_visit(qp, kp, bq, bk).reshape(-1), qp.reshape(-1), th.reshape(-1), kp.reshape(-1),
            q.reshape(-1, dp), w.reshape(-1), k.reshape(-1, dp)]
    if fp8:
        args.append(jnp.pad(k_scale.astype(jnp.float32), [(0, 0), (0, sp - s)]).reshape(-1))
    rows = b * cp
    counts = [jax.ShapeDtypeStruct((rows,), jnp.int32)] * 3
    slots, vals, count, reach, nvis = pl.pallas_call(
        functools.partial(_kernel, num_heads=h, n_q_tiles=cp // bq, n_k_tiles=sp // bk, block_q=bq,
                          block_k=bk, cap=cap, keep_ties=keep_ties, widen=fp8 and not cfg.fp8_dot),
        grid=(b, cp // bq),
        out_shape=(jax.ShapeDtypeStruct((rows, cap), jnp.int32), jax.ShapeDtypeStruct((rows, cap), jnp.float32),
                   *counts),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="indexer_candidates_fp8" if fp8 else "indexer_candidates",
    )(*args)
    unflat = lambda x: x.reshape((b, cp) + x.shape[1:])[:, :c]   # noqa: E731
    return unflat(slots), unflat(vals), unflat(count), unflat(reach), unflat(nvis)


def chunk_topk_fused(q_index, weights, k_index, q_positions, kv_positions, *, k: int, k_scale=None,
                     interpret=False, config: FusedIndexerConfig | None = None):
    """`api.chunk_topk_xla`'s contract (`(values, slots) [B, C, min(k, S)]`, the set of
    `lax.top_k` on the float32 scores, ascending slots, -inf / -1 padded last) by the
    module's three steps; the float32 `[B, C, S]` scores are never written."""
    cfg = config or FusedIndexerConfig()
    b, c = q_index.shape[:2]
    s = k_index.shape[1]
    width = min(k, s)
    bk = blocks.pow2_block(cfg.block_k, s)
    full = blocks.round_up(s, bk)
    cap = min(full, blocks.round_up(math.ceil(cfg.capacity * width), bk))

    def exact(q, w, qp, threshold, cap):
        """`((values, slots) [B, n, k'], bad [B, n])` for queries `q [B, n, H_I, D_I]` from
        their candidates `>= threshold`; `bad`: the rows whose candidates fail the checks."""
        n = q.shape[1]
        slots, vals, count, reach, nvis = chunk_candidates(q, w, k_index, qp, kv_positions, threshold, cap=cap,
                                                           keep_ties=width, k_scale=k_scale, interpret=interpret,
                                                           config=cfg)
        v, col = topk_select(vals.reshape(b * n, cap), width, lengths=jnp.minimum(count, cap).reshape(-1),
                             interpret=interpret, config=cfg.select)
        v, col = v.reshape(b, n, width), col.reshape(b, n, width)
        picked = jnp.where(col >= 0, jnp.take_along_axis(slots, jnp.maximum(col, 0), -1), -1)
        return (v, picked), (reach < jnp.minimum(width, nvis)) | (count > cap)

    rb = min(cfg.fallback_rows, c)
    every_key = lambda q, w, qp: exact(q, w, qp, jnp.full(qp.shape, -jnp.inf, jnp.float32), full)[0]  # noqa: E731

    def all_rows():
        """Every visible key a candidate, `fallback_chunk` queries at a time."""
        n = min(cfg.fallback_chunk, c)
        steps = -(-c // n)

        def split(x, fill):
            x = jnp.pad(x, [(0, 0), (0, steps * n - c)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
            return jnp.moveaxis(x.reshape((b, steps, n) + x.shape[2:]), 1, 0)

        outs = lax.map(lambda a: every_key(*a), (split(q_index, 0), split(weights, 0), split(q_positions, -1)))
        return tuple(jnp.moveaxis(o, 0, 1).reshape(b, steps * n, width)[:, :c] for o in outs)

    if cap == full:                                          # the buffer holds every key
        return all_rows()
    th = sample_threshold(q_index, weights, k_index, q_positions, kv_positions, k=k, k_scale=k_scale,
                          interpret=interpret, config=cfg)
    (vals, slots), bad = exact(q_index, weights, q_positions, th, cap)

    def patch():
        """The (at most rb per batch row) failing rows again, every visible key a candidate."""
        rows = jax.vmap(lambda f: jnp.nonzero(f, size=rb, fill_value=c)[0])(bad)           # [B, rb]; c = none
        at = jnp.minimum(rows, c - 1)
        qp = jnp.where(rows < c, jnp.take_along_axis(q_positions, at, 1), -1)
        v, sl = every_key(jnp.take_along_axis(q_index, at[:, :, None, None], 1),
                          jnp.take_along_axis(weights, at[:, :, None], 1), qp)
        bi = jnp.broadcast_to(jnp.arange(b)[:, None], rows.shape)
        return vals.at[bi, rows].set(v, mode="drop"), slots.at[bi, rows].set(sl, mode="drop")

    n_bad = jnp.max(jnp.sum(bad, -1))
    return lax.switch(jnp.where(n_bad == 0, 0, jnp.where(n_bad <= rb, 1, 2)), [lambda: (vals, slots), patch, all_rows])


def sample_threshold(q_index, weights, k_index, q_positions, kv_positions, *, k: int, k_scale=None,
                     interpret=False, config: FusedIndexerConfig | None = None):
    """Step 1: `th [B, C]` float32, the `r`-th largest score of every `sample_stride`-th key
    (`r = ceil(oversample * min(k, S) / m)`; -inf where fewer are visible). Arguments as
    `chunk_topk_fused`'s."""
    cfg = config or FusedIndexerConfig()
    b, c = q_index.shape[:2]
    m = cfg.sample_stride
    sample = chunk_scores_triton(q_index, weights, k_index[:, ::m], q_positions, kv_positions[:, ::m],
                                 k_scale=None if k_scale is None else k_scale[:, ::m], interpret=interpret,
                                 config=cfg)
    n = sample.shape[-1]
    r = min(math.ceil(cfg.oversample * min(k, k_index.shape[1]) / m), n)
    sp = blocks.round_up(n, SAMPLE_TILE)                     # the select reads each row's visible prefix
    kp = jnp.pad(kv_positions[:, ::m].astype(jnp.int32), [(0, 0), (0, sp - n)], constant_values=-1)
    prefix = _tiles_to_visit(q_positions.astype(jnp.int32), kp, 1, SAMPLE_TILE) * SAMPLE_TILE
    top, _ = topk_select(sample.reshape(b * c, n), r, lengths=prefix.reshape(-1), interpret=interpret,
                         config=cfg.select)
    return top.min(-1).reshape(b, c)
