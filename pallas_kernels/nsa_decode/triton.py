"""`nsa_decode` on GPU: NSA's decode step (arXiv 2502.11089) in Pallas Triton kernels.

A program serves one (batch row, kv head, query); its tile rows are the `G = H / Hkv`
query heads of the group (padded to 16 for the tensor-core dot), so each K/V row is read
once per group. The step:

1. cmp statistics: online max / sum over the visible compressed keys (slot i = block i,
   so the trip count `ceil(num_visible / bc)` comes from the query position) -> lse
   (fused plan; the split plan folds it into step 2, below).
2. cmp output and scores: `p = exp(s - lse)`, `o_cmp += p @ V`, and `p` summed over the
   group heads spread onto the selection blocks with the overlap weights
   `|tokens(i) & tokens(j)| / d` (`selection_scores`). A cmp tile of `bc` blocks is
   aligned to `bs = bc / r` selection blocks (`r = l' / d`, a power of two), so the
   weights are two constant `[bc, bs]` matrices, onto the tile's own selection blocks and
   onto the next tile's (the trailing chunks of its last cmp blocks). The scores live in
   registers as `[R, bs]` (row k = cmp tile k), updated by row selects.
3. selection in registers: causal candidates `j*l' <= t`, forced blocks at +inf, then `n`
   rounds of (max, lowest index at the max, knock-out): `select_blocks`' top-n, ties to
   the lower index.
4. slc: the selected blocks' `l'` K/V rows at `idx * l'`, online softmax (causal on
   positions, -1 empty).
5. win: every slot of the window cache, visible iff `t - w < pos <= t`.

Launch plans (`TritonConfig.cmp_splits` / `tail_splits` / `select_kernel`):

* fused (`cmp_splits=1`): all five steps in one kernel, grid (B, Hkv, T);
* split (`cmp_splits=C > 1`, the default where B * Hkv * T programs are few): 64 programs
  (B=16, Hkv=4, T=1) leave an H200 (132 SMs) half idle, and the cmp keys are most of the
  bytes, so steps 1 and 2 run in one pass on C programs per (b, hkv, t), each over its
  share of the cmp tiles (`nsa_decode_cmp`): an online softmax `(m, l, acc)` per head,
  and per head the tile's selection scores `p @ w` (`p = exp2(s - m)` at the running max
  m, fp32 dots on the overlap weights) written per tile with that m, the spill onto the
  next tile carried (rescaled) and the last one written apart. The lse is not needed
  until `nsa_decode_finish` (grid B, Hkv, T * P): it combines the splits' `(m, l)` into
  the lse and o_cmp, sums the group's heads `exp2(m_tile - lse) * scores`, and each of its
  P = `tail_splits` parts recomputes the selection (registers only) and runs steps 4-5
  on every P-th selected block and window tile; for P > 1 a small XLA merge combines the
  parts by their lse. Two launches (+ the merge).

Three-kernel plan (`select_kernel=True`, any C; on an H200 correct but slower per call than
the split plan: 0.39-0.55 vs 0.19 ms at B=16, 64K). In the
split plan every finish part sits on one serial chain after the cmp pass: combine, the
16-head score sum, n selection rounds (four block-wide reductions each), then its slc
blocks, whose addresses exist only after the selection, and its window tiles; all P
parts repeat the first three. Here:

* `nsa_decode_cmp` (grid B, Hkv, T * C) also runs step 5 on window tiles `c, c + C, ...`
  (the window does not depend on the selection) to a second `(m, l, acc)` per split;
* `nsa_decode_select` (grid B, Hkv, T), once per (b, hkv, t): o_cmp, o_win (both
  combined from the splits' states) and the selection, each round one (value, index)
  argmax reduction over the flattened scores;
* `nsa_decode_slc` (grid B, Hkv, T * P): part p loads its blocks `p, p + P, ...` of the
  indices (one scalar load each) and runs step 4; the XLA merge of the P parts.

At B=16, Hkv=4, T=1, 64K, C=4, P=8 (the default here: two selected blocks a part): 256
cmp programs of 16 cmp tiles + 2 window tiles (576 KB each), 64 select programs (the
combine, 64 KB of per-head scores from L2, 16 rounds), 512 slc programs of 64 KB.

One-launch plan (`one_launch=True`, opt-in until timed; `_one_launch_kernel`): one grid
(B, Hkv, T * (C + P)), the C cmp programs of a (b, hkv, query) first, then its P slc
programs. A cmp program runs the cmp pass on its tiles (as `nsa_decode_cmp`) and arrives on
an atomic counter; the last to arrive combines the states into o_cmp and the selection
(as `nsa_decode_select`) and raises a flag. A slc program runs its window tiles, waits for
the flag (volatile spin), runs its selected blocks, arrives on a second counter; the last
combines the slc and window states. No launch boundary on the chain cmp -> selection ->
slc, no XLA merge; the counters are one `[B, T, Hkv, 4]` int32 zero fill. Deadlock-free
because the slc programs come after every cmp program in the launch order and cmp
programs never wait.

The fused plan reads the cmp keys twice (steps 1 and 2: the group-summed scores need the
exact lse) and the cmp values once; the split plan reads both once and writes
`G * ceil(N / l') * 4` bytes of per-head scores per (b, hkv, t) (64 KB at 64K context),
which the finish parts read back from L2. Then the `n * l'` selected rows and the window:
compressed + n*l' + w tokens, never the raw cache.

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

from pallas_kernels.flash.blocks import pl_next_pow2
from pallas_kernels.tiles_common import BIG, LOG2E, MASK_VALUE, NN, NT


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Tiles of the cmp pass (`block_cmp` compressed keys) and of the window (`block_win`);
    `cmp_splits`: programs per (b, hkv, query) for the cmp pass (1 = one fused kernel;
    None = enough for `target_programs`, a power of two); `tail_splits`: the same for the
    slc and win steps when the cmp pass is split (each recomputes the selection and takes
    every `tail_splits`-th selected block and window tile; an XLA merge of the parts).
    Not swept on a GPU yet: num_stages=3 as the `decode` op's H200 sweep found for its
    similar streaming loop. At B=16, Hkv=4, T=1, 64K context the defaults give C = P = 4
    (256 programs per kernel); offline (Triton 3.9, sm_90) the cmp kernel then takes 255
    registers without spills and 84 KB of shared memory at 4 warps: two programs per SM.

    `select_kernel=True` picks the three-kernel plan (see the module docstring; any
    `cmp_splits`, 1 included): the cmp programs also take the window tiles, the selection
    runs once per (b, hkv, query) in `nsa_decode_select`, and `tail_splits` parts (default:
    two selected blocks each) read its indices in `nsa_decode_slc`. Correct on an H200,
    slower per call there than the split plan.

    `one_launch=True` picks the one-launch plan (module docstring; `tail_splits` parts take
    the selected blocks and the window tiles). Not the default until timed on a GPU."""

    block_cmp: int = 64
    block_win: int = 64
    cmp_splits: int | None = None
    tail_splits: int | None = None
    target_programs: int = 264          # two per H200 SM
    num_warps: int = 4
    num_stages: int = 3
    select_kernel: bool = False
    one_launch: bool = False

    def __post_init__(self):
        for name in ("select_kernel", "one_launch"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.select_kernel and self.one_launch:
            raise ValueError("select_kernel and one_launch are two plans: pick one")
        for name in ("block_cmp", "block_win", "target_programs", "num_warps", "num_stages"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be an int >= 1, got {val!r}")
        for name in ("cmp_splits", "tail_splits"):
            c = getattr(self, name)
            if c is not None and (not isinstance(c, int) or c < 1 or c & (c - 1)):
                raise ValueError(f"{name} must be a power of two >= 1 or None, got {c!r}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static sizes of one call (hashable: the kernels specialise on it)."""

    t: int              # queries per row
    g: int              # query heads per kv head
    rows_p: int         # g padded (>= 16, power of two)
    d: int
    d_p: int
    n_cmp: int          # compressed slots N
    s_slc: int          # slc slots S
    s_win: int          # window slots
    bc: int             # cmp tile (compressed keys)
    bs: int             # selection blocks per cmp tile (bc / r)
    bs_p: int           # bs padded (>= 16) for the split plan's per-head score dots
    r: int              # l' / d
    u: int              # l / d
    splits: int         # C programs per (b, hkv, t) in the cmp pass (1 = fused kernel unless select_kernel)
    tail_splits: int    # programs per (b, hkv, t) for selection + slc + win (1 when fused); slc only
                        # with the three-kernel plan, slc + win with one_launch
    select_kernel: bool  # selection once per (b, hkv, t) (the three-kernel and one-launch plans);
                         # window tiles on the cmp programs (three-kernel) or the slc programs
    one_launch: bool    # the one-launch plan: cmp programs, the last selects, slc programs follow
    per: int            # cmp tiles (= score rows) per split; rows = splits * per when split
    rows: int           # score rows R (power of two)
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


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


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
    ns = _cdiv(s_slc, cfg.sel_block)
    max_tiles = _cdiv(n_cmp, bc)
    n_out = min(cfg.num_selected, ns)
    floor2 = lambda x: pl_next_pow2(x + 1) // 2                  # noqa: E731  largest pow2 <= x
    fill = floor2(_cdiv(config.target_programs, b * hkv * t))
    splits = max(1, min(fill if config.cmp_splits is None else config.cmp_splits, floor2(max_tiles)))
    sel = config.select_kernel or config.one_launch
    if config.tail_splits is not None:
        tail = config.tail_splits
    else:                       # a select_kernel part only streams blocks: two selected blocks each
        tail = max(1, floor2(max(n_out, 1)) // 2) if sel else fill
    tail = 1 if splits == 1 and not sel else max(1, min(tail, floor2(max(n_out, 1))))
    if splits == 1 and not sel:
        per, rows = max_tiles, pl_next_pow2(_cdiv(ns, bs))
    else:
        per = pl_next_pow2(max(_cdiv(max_tiles, splits), _cdiv(_cdiv(ns, bs), splits)))
        rows = splits * per
    return Plan(t=t, g=h // hkv, rows_p=_p2(h // hkv), d=d, d_p=_p2(d), n_cmp=n_cmp, s_slc=s_slc,
                s_win=s_win, bc=bc, bs=bs, bs_p=_p2(bs), r=r, u=u, splits=splits, tail_splits=tail,
                select_kernel=sel, one_launch=config.one_launch, per=per, rows=rows, ns=ns,
                n_out=n_out, n_p=pl_next_pow2(n_out), ls=cfg.sel_block, ls_p=_p2(cfg.sel_block),
                bw=_p2(min(config.block_win, s_win)), l=cfg.cmp_block, stride=cfg.cmp_stride,
                window=cfg.window, num_initial=cfg.num_initial, num_local=cfg.num_local,
                scale2=scale * LOG2E)


# ----------------------------------------------------------------------------- one program


class _Program:
    """What one (batch row, kv head, query) program computes, on refs of its row."""

    def __init__(self, plan: Plan, q, h, t):
        pn = self.plan = plan
        self.q, self.t = q, t                                              # q [rows_p, d_p]
        self.live = t >= 0
        self.tt = jnp.where(self.live, t, 0)
        self.cols = pl.ds(h * pn.d, pn.d_p)
        self.col_ok = None if pn.d == pn.d_p else jnp.arange(pn.d_p, dtype=jnp.int32)[None, :] < pn.d
        visible = jnp.where(self.live & (self.tt >= pn.l - 1), (self.tt - (pn.l - 1)) // pn.stride + 1, 0)
        self.cmp_tiles = (jnp.minimum(visible, pn.n_cmp) + pn.bc - 1) // pn.bc

    def tile(self, k_ref, v_ref, pos_ref, start, size, size_p, axis_len):
        """K, V `[size_p, d_p]` (V None without v_ref), positions `[size_p]` (-1 outside)."""
        r = jnp.arange(size_p, dtype=jnp.int32)
        in_rows = (r < size) & (start + r < axis_len)
        mask = in_rows[:, None] if self.col_ok is None else in_rows[:, None] & self.col_ok
        mask = jnp.broadcast_to(mask, (size_p, self.plan.d_p))
        rows = pl.ds(start, size_p)
        pos = plgpu.load(pos_ref.at[rows], mask=in_rows, other=-1)
        k = plgpu.load(k_ref.at[rows, self.cols], mask=mask, other=0.0)
        v = None if v_ref is None else plgpu.load(v_ref.at[rows, self.cols], mask=mask, other=0.0)
        return k, v, pos

    def logits(self, k, vis):
        s = lax.dot_general(self.q, k, NT, preferred_element_type=jnp.float32) * self.plan.scale2
        return jnp.where(vis[None, :], s, MASK_VALUE)

    def empty(self):
        pn = self.plan
        return (jnp.full((pn.rows_p,), MASK_VALUE, jnp.float32), jnp.zeros((pn.rows_p,), jnp.float32),
                jnp.zeros((pn.rows_p, pn.d_p), jnp.float32))

    @staticmethod
    def online(carry, s, vis, v):
        m, l, acc = carry
        m_new = jnp.maximum(m, s.max(axis=-1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.where(vis[None, :], jnp.exp2(s - m_new[:, None]), 0.0)
        pv = lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=jnp.float32)
        return m_new, l * alpha + p.sum(axis=-1), acc * alpha[:, None] + pv

    @staticmethod
    def normalised(carry):
        _, l, acc = carry
        return acc / jnp.where(l > 0.0, l, 1.0)[:, None]

    def cmp_tile(self, refs, i, with_v=True):
        k_ref, v_ref, pos_ref = refs
        pn = self.plan
        k, v, pos = self.tile(k_ref, v_ref if with_v else None, pos_ref, i * pn.bc, pn.bc, pn.bc, pn.n_cmp)
        vis = self.live & (pos >= 0) & (pos <= self.t)
        return self.logits(k, vis), vis, v

    def overlap_weights(self, width):
        """`[bc, width]` float32 weights of a cmp tile's blocks onto its own selection blocks
        and onto the next tile's (columns >= bs zero): cmp block c covers d-chunks c .. c+u-1,
        selection block j the chunks j*r .. j*r+r-1 (`selection_scores`' overlap counts)."""
        pn = self.plan
        c_id = jnp.arange(pn.bc, dtype=jnp.int32)[:, None]
        j_id = jnp.arange(width, dtype=jnp.int32)[None, :]
        w_own = jnp.zeros((pn.bc, width), jnp.float32)
        w_next = jnp.zeros((pn.bc, width), jnp.float32)
        for n in range(pn.u):
            block = (c_id + n) // pn.r
            w_own += ((block == j_id) & (j_id < pn.bs)).astype(jnp.float32)
            w_next += ((block == j_id + pn.bs) & (j_id < pn.bs)).astype(jnp.float32)
        return w_own, w_next

    def cmp_one_pass(self, refs, lo, hi, base, st_ref, mt_ref):
        """Split plan, cmp tiles [lo, hi) in one pass: online softmax `(m, l, acc)` and per
        head the unnormalised selection scores of each tile's selection blocks, relative to
        the running max then: tile i writes `st_ref[i - base] [rows_p, bs_p]` (its own part
        plus the previous tile's spill, rescaled) and `mt_ref[i - base] = m`. Returns
        `((m, l, acc), spill [rows_p, bs_p])`, the last tile's part on the next tile's
        blocks (relative to the final m)."""
        pn = self.plan
        w_own, w_next = self.overlap_weights(pn.bs_p)
        dot = functools.partial(lax.dot_general, dimension_numbers=NN, precision=lax.Precision.HIGHEST,
                                preferred_element_type=jnp.float32)

        def body(i, carry):
            (m, l, acc), pending = carry
            s, vis, v = self.cmp_tile(refs, i)
            m_new = jnp.maximum(m, s.max(axis=-1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.where(vis[None, :], jnp.exp2(s - m_new[:, None]), 0.0)     # [rows_p, bc]
            pv = lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=jnp.float32)
            st_ref[i - base] = dot(p, w_own) + pending * alpha[:, None]
            mt_ref[i - base] = m_new
            return (m_new, l * alpha + p.sum(axis=-1), acc * alpha[:, None] + pv), dot(p, w_next)

        return lax.fori_loop(lo, hi, body, (self.empty(), jnp.zeros((pn.rows_p, pn.bs_p), jnp.float32)))

    def cmp_stats(self, refs, lo, hi):
        """Step 1 over cmp tiles [lo, hi): running max and sum `[rows_p]` (base 2)."""
        def body(i, ml):
            m, l = ml
            s, vis, _ = self.cmp_tile(refs, i, with_v=False)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.where(vis[None, :], jnp.exp2(s - m_new[:, None]), 0.0)
            return m_new, l * jnp.exp2(m - m_new) + p.sum(axis=-1)
        return lax.fori_loop(lo, hi, body, self.empty()[:2])

    def cmp_scores(self, refs, lse, lo, hi, base, rows):
        """Step 2 over cmp tiles [lo, hi): `(o_cmp part [rows_p, d_p], scores [rows, bs],
        spill [1, bs])`; tile k adds to score rows k - base (own) and k - base + 1 (next,
        the spill when that is row `rows`)."""
        pn = self.plan
        row_ok = (jnp.arange(pn.rows_p, dtype=jnp.int32) < pn.g)[:, None]
        w_own, w_next = self.overlap_weights(pn.bs)
        row_id = jnp.arange(rows, dtype=jnp.int32)[:, None]

        def body(i, carry):
            acc, scores, spill = carry
            s, vis, v = self.cmp_tile(refs, i)
            p = jnp.where(vis[None, :], jnp.exp2(s - lse[:, None]), 0.0)     # [rows_p, bc]
            acc += lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=jnp.float32)
            mass = jnp.where(row_ok, p, 0.0).sum(axis=0)[:, None]             # [bc, 1]
            own = (mass * w_own).sum(axis=0)[None, :]                         # [1, bs]
            nxt = (mass * w_next).sum(axis=0)[None, :]
            k = i - base
            scores = jnp.where(row_id == k, scores + own, scores)
            scores = jnp.where(row_id == k + 1, scores + nxt, scores)
            return acc, scores, spill + jnp.where(k + 1 == rows, nxt, 0.0)

        init = (jnp.zeros((pn.rows_p, pn.d_p), jnp.float32), jnp.zeros((rows, pn.bs), jnp.float32),
                jnp.zeros((1, pn.bs), jnp.float32))
        return lax.fori_loop(lo, hi, body, init)

    def select(self, scores, argmax=False):
        """Step 3 on `scores [rows, width >= bs]` (columns >= bs unused): `[n_p]` int32
        selected blocks in score order, -1 unused. A round takes the max and the lowest
        block at it (two block-wide reductions), or with `argmax` one (value, index)
        reduction over the flattened candidates (lowest flat index at the max = lowest
        block, as `width` rows of the same row order), round k picking iff k < the number
        of causal candidates (they are finite or +inf, the rest -inf)."""
        pn = self.plan
        width = scores.shape[1]
        col = jnp.arange(width, dtype=jnp.int32)[None, :]
        blk = jnp.arange(pn.rows, dtype=jnp.int32)[:, None] * pn.bs + col
        causal = self.live & (col < pn.bs) & (blk < pn.ns) & (blk * pn.ls <= self.tt)
        forced = causal & ((blk < pn.num_initial) | (blk > self.tt // pn.ls - pn.num_local))
        cand = jnp.where(forced, jnp.inf, jnp.where(causal, scores, -jnp.inf))
        slot = jnp.arange(pn.n_p, dtype=jnp.int32)
        if argmax:
            count = causal.astype(jnp.int32).sum()
            flat_id = jnp.arange(pn.rows * width, dtype=jnp.int32)

            def one_reduction(k, carry):
                flat, picked = carry
                f = jnp.argmax(flat).astype(jnp.int32)
                idx = (f // width) * pn.bs + f % width
                picked = jnp.where(slot == k, jnp.where(k < count, idx, -1), picked)
                return jnp.where(flat_id == f, -jnp.inf, flat), picked

            init = (cand.reshape(pn.rows * width), jnp.full((pn.n_p,), -1, jnp.int32))
            return lax.fori_loop(0, pn.n_out, one_reduction, init)[1]

        def body(k, carry):
            cand, picked = carry
            best = cand.max()
            idx = jnp.where(cand == best, blk, BIG).min()
            picked = jnp.where(slot == k, jnp.where(best > -jnp.inf, idx, -1), picked)
            return jnp.where(blk == idx, -jnp.inf, cand), picked

        return lax.fori_loop(0, pn.n_out, body, (cand, jnp.full((pn.n_p,), -1, jnp.int32)))[1]

    def slc(self, refs, picked, part):
        """Step 4: attention over the picked blocks' rows (slot axis, position-masked), the
        blocks `part, part + P, ...` of the `P = tail_splits` parts. `picked`: the `[n_p]`
        selection in registers, or its ref (`nsa_decode_slc`: one scalar load a block, no
        reduction). Unnormalised carry."""
        pn = self.plan
        slot = jnp.arange(pn.n_p, dtype=jnp.int32)

        def body(k2, att):
            k = k2 * pn.tail_splits + part                     # < n_p: P divides n_p
            idx = picked[k] if isinstance(picked, jax.Ref) else jnp.where(slot == k, picked, -1).max()
            kk, v, pos = self.tile(*refs, jnp.maximum(idx, 0) * pn.ls, pn.ls, pn.ls_p, pn.s_slc)
            vis = (idx >= 0) & (pos >= 0) & (pos <= self.t)
            return self.online(att, self.logits(kk, vis), vis, v)

        return lax.fori_loop(0, _cdiv(pn.n_out, pn.tail_splits), body, self.empty())

    def win(self, refs, part, parts):
        """Step 5: the window slots, `t - w < pos <= t`, tiles `part, part + parts, ...`.
        Unnormalised carry."""
        pn = self.plan

        def body(i2, att):
            start = (i2 * parts + part) * pn.bw
            k, v, pos = self.tile(*refs, start, pn.bw, pn.bw, pn.s_win)
            vis = self.live & (pos >= 0) & (pos <= self.t) & (pos > self.t - pn.window)
            return self.online(att, self.logits(k, vis), vis, v)

        tiles = _cdiv(_cdiv(pn.s_win, pn.bw), parts)
        return lax.fori_loop(0, tiles, body, self.empty())

    def finish(self, scores, slc_refs, win_refs, out_refs, lse_refs, idx_ref, part=0):
        """Steps 3-5: the selection to `idx_ref`, the slc and win outputs (of this part,
        with their base-2 lse when the tail is split) to `out_refs` / `lse_refs`."""
        picked = self.select(scores)
        idx_ref[...] = picked
        atts = (self.slc(slc_refs, picked, part), self.win(win_refs, part, self.plan.tail_splits))
        for att, o_ref, lse_ref in zip(atts, out_refs, lse_refs):
            _write(att, o_ref, lse_ref)


def _write(att, o_ref, lse_ref):
    """An online-softmax carry -> its normalised output and, for a part of a split tail,
    its base-2 lse (-inf where it saw no key)."""
    m, l, _ = att
    o_ref[...] = _Program.normalised(att).astype(o_ref.dtype)
    if lse_ref is not None:
        lse_ref[...] = jnp.where(l > 0.0, _lse(m, l), -jnp.inf)


def _lse(m, l):
    return jnp.where(l > 0.0, m + jnp.log2(jnp.where(l > 0.0, l, 1.0)), 0.0)


# ----------------------------------------------------------------------------- kernels


def _fused_kernel(qpos_ref, q_ref, kc_ref, vc_ref, cpos_ref, ks_ref, vs_ref, spos_ref, kw_ref, vw_ref,
                  wpos_ref, oc_ref, os_ref, ow_ref, idx_ref, *, plan: Plan):
    b, h, ti = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    prog = _Program(plan, q_ref[...], h, qpos_ref[b * plan.t + ti])
    cmp = (kc_ref, vc_ref, cpos_ref)
    lse = _lse(*prog.cmp_stats(cmp, 0, prog.cmp_tiles))
    acc, scores, _ = prog.cmp_scores(cmp, lse, 0, prog.cmp_tiles, 0, plan.rows)
    oc_ref[...] = acc.astype(oc_ref.dtype)
    prog.finish(scores, (ks_ref, vs_ref, spos_ref), (kw_ref, vw_ref, wpos_ref), (os_ref, ow_ref),
                (None, None), idx_ref)


def _split_program(plan: Plan, qpos_ref, q_ref):
    b, h, z = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    prog = _Program(plan, q_ref[...], h, qpos_ref[b * plan.t + z // plan.splits])
    lo = jnp.minimum((z % plan.splits) * plan.per, prog.cmp_tiles)
    return prog, lo, jnp.minimum(lo + plan.per, prog.cmp_tiles), (z % plan.splits) * plan.per


def _cmp_kernel(qpos_ref, q_ref, kc_ref, vc_ref, cpos_ref, *refs, plan: Plan):
    """Split plan, steps 1-2 in one pass over this split's cmp tiles (K and V read once).
    refs: `(m, l, acc, st, mt, spill)` outputs; with `plan.select_kernel` the window's K,
    V, positions first and its `(m, l, acc)` last: the split also runs step 5 on window
    tiles `split, split + C, ...` (no dependence on the selection, so off its path)."""
    prog, lo, hi, base = _split_program(plan, qpos_ref, q_ref)
    win_refs, refs = (refs[:3], refs[3:]) if plan.select_kernel else (None, refs)
    m_ref, l_ref, acc_ref, st_ref, mt_ref, spill_ref = refs[:6]
    (m, l, acc), spill = prog.cmp_one_pass((kc_ref, vc_ref, cpos_ref), lo, hi, base, st_ref, mt_ref)
    m_ref[...], l_ref[...], acc_ref[...], spill_ref[...] = m, l, acc, spill
    if plan.select_kernel:
        mw_ref, lw_ref, accw_ref = refs[6:]
        mw_ref[...], lw_ref[...], accw_ref[...] = prog.win(win_refs, pl.program_id(2) % plan.splits,
                                                           plan.splits)


def _combine(plan: Plan, m_ref, l_ref, acc_ref):
    """The splits' (or parts') online-softmax states `m, l [C, rows_p]`, `acc [C, rows_p,
    d_p]` (each relative to its own m) -> `(lse [rows_p] base 2, normalised output [rows_p,
    d_p])`; zeros where no split saw a key."""
    m_s, l_s, c_all = m_ref[...], l_ref[...], m_ref.shape[0]
    m = m_s.max(axis=0)
    lse = _lse(m, (l_s * jnp.exp2(m_s - m[None, :])).sum(axis=0))
    w_s = jnp.exp2(m_s - lse[None, :])                                      # [C, rows_p]
    o = lax.fori_loop(
        0, c_all, lambda c, o: o + jnp.where(jnp.arange(c_all)[:, None] == c, w_s, 0.0).sum(
            axis=0)[:, None] * acc_ref[c], jnp.zeros((plan.rows_p, plan.d_p), jnp.float32))
    return lse, o


def _group_scores(plan: Plan, prog, m_ref, l_ref, acc_ref, st_ref, mt_ref, spill_ref, oc_ref):
    """Split plan: the splits' cmp states -> lse and o_cmp (to `oc_ref`); per-head tile
    scores and spills -> the group's selection scores `[rows, bs_p]`."""
    lse, o = _combine(plan, m_ref, l_ref, acc_ref)
    oc_ref[...] = o.astype(oc_ref.dtype)
    head_id = jnp.arange(plan.rows_p, dtype=jnp.int32)

    def head(g, sc):                 # sum over the group's heads of exp2(s - lse) per block
        lse_g = jnp.where(head_id == g, lse, -jnp.inf).max()
        return sc + jnp.exp2(mt_ref[:, g] - lse_g)[:, None] * st_ref[:, g, :]

    scores = lax.fori_loop(0, plan.g, head, jnp.zeros((plan.rows, plan.bs_p), jnp.float32))
    row_id = jnp.arange(plan.rows, dtype=jnp.int32)[:, None]
    scores = jnp.where(row_id < prog.cmp_tiles, scores, 0.0)               # rows no split wrote
    row_ok = (head_id < plan.g)[:, None]

    def spill(c, sc):                # split c's last tile onto the blocks of tile hi_c
        lo = jnp.minimum(c * plan.per, prog.cmp_tiles)
        hi = jnp.minimum(lo + plan.per, prog.cmp_tiles)
        w = jnp.exp2(m_ref[c] - lse)[:, None]
        add = jnp.where(row_ok, w * spill_ref[c], 0.0).sum(axis=0)[None, :]
        return jnp.where((row_id == hi) & (lo < hi), sc + add, sc)

    return lax.fori_loop(0, plan.splits, spill, scores)


def _finish_kernel(qpos_ref, q_ref, m_ref, l_ref, acc_ref, st_ref, mt_ref, spill_ref, ks_ref, vs_ref, spos_ref,
                   kw_ref, vw_ref, wpos_ref, oc_ref, os_ref, ow_ref, idx_ref, *lse_refs, plan: Plan):
    """Split plan: `_group_scores`, then steps 3-5. Every part of a (b, hkv, query) writes
    the same o_cmp and indices."""
    b, h, z = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    prog = _Program(plan, q_ref[...], h, qpos_ref[b * plan.t + z // plan.tail_splits])
    scores = _group_scores(plan, prog, m_ref, l_ref, acc_ref, st_ref, mt_ref, spill_ref, oc_ref)
    prog.finish(scores, (ks_ref, vs_ref, spos_ref), (kw_ref, vw_ref, wpos_ref), (os_ref, ow_ref),
                lse_refs or (None, None), idx_ref, part=z % plan.tail_splits)


def _select_kernel(qpos_ref, m_ref, l_ref, acc_ref, st_ref, mt_ref, spill_ref, mw_ref, lw_ref, accw_ref,
                   oc_ref, ow_ref, idx_ref, *, plan: Plan):
    """Three-kernel plan, once per (b, hkv, query): o_cmp and the selection
    (`_group_scores`, one-reduction rounds), o_win from the cmp splits' window states."""
    b, h, z = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    prog = _Program(plan, None, h, qpos_ref[b * plan.t + z])                # no q: no logits here
    scores = _group_scores(plan, prog, m_ref, l_ref, acc_ref, st_ref, mt_ref, spill_ref, oc_ref)
    ow_ref[...] = _combine(plan, mw_ref, lw_ref, accw_ref)[1].astype(ow_ref.dtype)
    idx_ref[...] = prog.select(scores, argmax=True)


def _slc_kernel(qpos_ref, q_ref, idx_ref, ks_ref, vs_ref, spos_ref, os_ref, *lse_ref, plan: Plan):
    """Three-kernel plan, step 4 on part `z % P` of the selected blocks (`P = tail_splits`):
    one small load of the indices, then blocks `part, part + P, ...`."""
    b, h, z = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    prog = _Program(plan, q_ref[...], h, qpos_ref[b * plan.t + z // plan.tail_splits])
    att = prog.slc((ks_ref, vs_ref, spos_ref), idx_ref, z % plan.tail_splits)
    _write(att, os_ref, lse_ref[0] if lse_ref else None)


def _arrive(cnt_ref, k, barrier):
    """Counter `k` of this (b, hkv, query) += 1 (acquire-release, GPU scope) after a CTA
    barrier (`barrier`: compiled; interpret mode has none and runs one thread), so every
    thread's stores before it are released with it; returns the old value (`parts - 1`:
    this program arrived last and sees all the others' stores)."""
    if barrier:
        plgpu.debug_barrier()
    return _atomic_add(cnt_ref, k, 1)


def _atomic_add(ref, k, val):
    """`ref[k] += val` atomically (`k` a Python int), the old value."""
    return plgpu.atomic_add(ref, jnp.full((), k, jnp.int32), jnp.full((), val, jnp.int32))


def _one_launch_kernel(qpos_ref, q_ref, kc_ref, vc_ref, cpos_ref, ks_ref, vs_ref, spos_ref, kw_ref,
                       vw_ref, wpos_ref, _, oc_ref, os_ref, ow_ref, idx_ref, m_ref, l_ref, acc_ref,
                       st_ref, mt_ref, spill_ref, mw_ref, lw_ref, accw_ref, ms_ref, ls_ref, accs_ref,
                       cnt_ref, *, plan: Plan, barrier: bool):
    """The one-launch plan, grid (B, Hkv, T * (C + P)); every state ref is this (b, hkv,
    query)'s block, shared by its C + P programs, and `cnt_ref [4]` its counters (zeros in).

    * cmp program `z < T * C` (split `c`): the cmp pass on its tiles (as `_cmp_kernel`) to
      the states' row c; the last of the C to arrive (counter 0) combines them: o_cmp and
      the selection to `idx_ref`, then counter 1 := 1 (the flag).
    * slc program (part `p` of P): step 5 on window tiles `p, p + P, ...` first (it needs
      no selection: work while the cmp pass runs, off the selection's chain), then waits
      for the flag, reads the indices, runs step 4 on blocks `p, p + P, ...`; both states
      to row p; the last of the P (counter 2) combines them to o_slc and o_win.

    Every slc program waits only on cmp programs, all earlier in the launch order (the
    grid's last axis is the slowest CUDA axis and blocks are dispatched in order, the
    assumption CUB's decoupled look-back makes), and cmp programs never wait: no deadlock
    however few programs are resident. Interpret mode runs the grid in order, so the flag
    is set before any slc program looks."""
    b, h, z = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    c_all = plan.t * plan.splits
    is_cmp = z < c_all
    ti = jnp.where(is_cmp, z // plan.splits, (z - c_all) // plan.tail_splits)
    prog = _Program(plan, q_ref[...], h, qpos_ref[b * plan.t + ti])

    @pl.when(is_cmp)
    def _():
        c = z % plan.splits
        lo = jnp.minimum(c * plan.per, prog.cmp_tiles)
        hi = jnp.minimum(lo + plan.per, prog.cmp_tiles)
        (m_ref[c], l_ref[c], acc_ref[c]), spill_ref[c] = prog.cmp_one_pass(
            (kc_ref, vc_ref, cpos_ref), lo, hi, 0, st_ref, mt_ref)

        @pl.when(_arrive(cnt_ref, 0, barrier) == plan.splits - 1)
        def _():
            scores = _group_scores(plan, prog, m_ref, l_ref, acc_ref, st_ref, mt_ref, spill_ref, oc_ref)
            idx_ref[...] = prog.select(scores, argmax=True)
            _arrive(cnt_ref, 1, barrier)

    @pl.when(~is_cmp)
    def _():
        p = (z - c_all) % plan.tail_splits
        mw_ref[p], lw_ref[p], accw_ref[p] = prog.win((kw_ref, vw_ref, wpos_ref), p, plan.tail_splits)
        # Spin on volatile loads (L2, never hoisted; an atomic in the loop has no interpret-mode
        # discharge), then one acquire-release atomic orders the loads after it. The indices
        # depend on the loop's result: JAX drops a while loop whose result is unused.
        poll = lambda *_: plgpu.load(cnt_ref.at[jnp.full((), 1, jnp.int32)], volatile=True)  # noqa: E731
        flag = lax.while_loop(lambda flag: flag == 0, poll, poll())
        _atomic_add(cnt_ref, 1, 0)
        if barrier:                                                   # every thread after the acquire
            plgpu.debug_barrier()
        # Volatile: past L1 (cache_modifier=".cg" is unusable: jax 0.11.2 maps it to no key).
        picked = jnp.where(flag > 0, plgpu.load(idx_ref, volatile=True), -1)
        ms_ref[p], ls_ref[p], accs_ref[p] = prog.slc((ks_ref, vs_ref, spos_ref), picked, p)

        @pl.when(_arrive(cnt_ref, 2, barrier) == plan.tail_splits - 1)
        def _():
            os_ref[...] = _combine(plan, ms_ref, ls_ref, accs_ref)[1].astype(os_ref.dtype)
            ow_ref[...] = _combine(plan, mw_ref, lw_ref, accw_ref)[1].astype(ow_ref.dtype)


def _merge(o, lse):
    """Tail parts `o [..., P, rows, D]` (each normalised), `lse [..., P, rows]` (base 2,
    -inf where empty) -> `[..., rows, D]`."""
    top = lse.max(axis=-2, keepdims=True)
    w = jnp.exp2(lse - jnp.where(jnp.isfinite(top), top, 0.0))              # 0 for empty parts
    tot = w.sum(axis=-2)
    return (w[..., None] * o).sum(axis=-3) / jnp.where(tot > 0.0, tot, 1.0)[..., None]


# ----------------------------------------------------------------------------- wrapper


def nsa_decode_triton(q, q_positions, *, k_cmp, v_cmp, cmp_positions, k_slc, v_slc, slc_positions,
                      k_win, v_win, win_positions, cfg, scale, interpret=False,
                      config: TritonConfig | None = None, stop_after: int | None = None):
    """`nsa_decode_reference`'s contract on the Triton kernels (`interpret=True`: CPU).

    `stop_after=k` (1 or 2, split and three-kernel plans) returns the raw outputs of the
    first k launches instead, for per-kernel timing (`experiments/bench_nsa.py
    --decode_stages`)."""
    config = config or TritonConfig()
    pn = make_plan(q, k_cmp, k_slc, k_win, cfg, config, scale)
    if stop_after not in (None, 1, 2) or (stop_after and pn.splits == 1 and not pn.select_kernel):
        raise ValueError(f"stop_after must be None, or 1 or 2 for a plan of several launches, got {stop_after!r}")
    b, t, h, d = q.shape
    hkv, g, c, p = k_cmp.shape[2], pn.g, pn.splits, pn.tail_splits
    qr = jnp.pad(q.reshape(b, t, hkv, g, d), ((0, 0),) * 3 + ((0, pn.rows_p - g), (0, pn.d_p - d)))
    view = lambda x: x.reshape(*x.shape[:2], hkv * d)                      # noqa: E731  free
    whole = pl.BlockSpec()

    def spec(*block, parts=1, part_axis=False):
        """Block `(b, query[, part]) + block` of an array `[B, T, Hkv, (parts,) ...]`, on a
        grid (B, Hkv, T * parts) whose last axis is `query * parts + part`."""
        lead = (None, None, None) + ((None,) if part_axis else ())
        if part_axis:
            return pl.BlockSpec(lead + block, lambda b_, h_, z: (b_, z // parts, h_, z % parts) + (0,) * len(block))
        return pl.BlockSpec(lead + block, lambda b_, h_, z: (b_, z // parts, h_) + (0,) * len(block))

    kv_spec = lambda x: pl.BlockSpec((None, x.shape[1], hkv * d), lambda b_, h_, z: (b_, 0, 0))  # noqa: E731
    pos_spec = lambda x: pl.BlockSpec((None, x.shape[1]), lambda b_, h_, z: (b_, 0))            # noqa: E731
    call = functools.partial(pl.pallas_call, interpret=interpret, compiler_params=plgpu.CompilerParams(
        num_warps=config.num_warps, num_stages=config.num_stages))
    qpos = q_positions.reshape(-1)
    cmp_in = (view(k_cmp), view(v_cmp), cmp_positions)
    cmp_specs = [kv_spec(k_cmp), kv_spec(v_cmp), pos_spec(cmp_positions)]
    tail_in = (view(k_slc), view(v_slc), slc_positions, view(k_win), view(v_win), win_positions)
    tail_specs = [kv_spec(k_slc), kv_spec(v_slc), pos_spec(slc_positions), kv_spec(k_win),
                  kv_spec(v_win), pos_spec(win_positions)]
    shape = lambda *tail, dtype=jnp.float32: jax.ShapeDtypeStruct((b, t, hkv) + tail, dtype)   # noqa: E731
    rows, rd = pn.rows_p, (pn.rows_p, pn.d_p)
    sel = pn.select_kernel
    if pn.one_launch:
        return _one_launch(pn, call, qr, qpos, cmp_in, cmp_specs, tail_in, tail_specs, b, t, h, hkv, q.dtype,
                           stop_after, interpret)
    if c == 1 and not sel:
        o_cmp, o_slc, o_win, idx = call(
            functools.partial(_fused_kernel, plan=pn), grid=(b, hkv, t), name="nsa_decode",
            in_specs=[whole, spec(*rd), *cmp_specs, *tail_specs],
            out_specs=[spec(*rd)] * 3 + [spec(pn.n_p)],
            out_shape=[shape(*rd, dtype=q.dtype)] * 3 + [shape(pn.n_p, dtype=jnp.int32)],
        )(qpos, qr, *cmp_in, *tail_in)
        return _unpack(pn, o_cmp, o_slc, o_win, idx, b, t, h)
    part = functools.partial(spec, parts=c, part_axis=True)
    state_specs, state_shapes = [part(rows)] * 2 + [part(*rd)], [shape(c, rows)] * 2 + [shape(c, *rd)]
    outs = call(                     # (m, l, acc, st, mt, spill) + the window's (m, l, acc) with sel
        functools.partial(_cmp_kernel, plan=pn), grid=(b, hkv, t * c), name="nsa_decode_cmp",
        in_specs=[whole, spec(*rd, parts=c), *cmp_specs, *(tail_specs[3:] if sel else ())],
        out_specs=state_specs + [part(pn.per, rows, pn.bs_p), part(pn.per, rows), part(rows, pn.bs_p)]
        + (state_specs if sel else []),
        out_shape=state_shapes + [shape(c, pn.per, rows, pn.bs_p), shape(c, pn.per, rows),
                                  shape(c, rows, pn.bs_p)] + (state_shapes if sel else []),
    )(qpos, qr, *cmp_in, *(tail_in[3:] if sel else ()))
    if stop_after == 1:
        return outs
    st = outs[3].reshape(b, t, hkv, pn.rows, rows, pn.bs_p)                # free: splits are row blocks
    mt = outs[4].reshape(b, t, hkv, pn.rows, rows)
    cmp_out = (*outs[:3], st, mt, outs[5])
    tail = functools.partial(spec, parts=p, part_axis=True)
    # A tail of P > 1 parts writes each part's normalised output and lse, merged below.
    part_specs = lambda n: [spec(*rd)] * n if p == 1 else [tail(*rd)] * n + [tail(rows)] * n   # noqa: E731
    part_shapes = lambda n: ([shape(*rd, dtype=q.dtype)] * n if p == 1 else            # noqa: E731
                             [shape(p, *rd)] * n + [shape(p, rows)] * n)
    state_in = lambda parts: [*[spec(c, rows, parts=parts)] * 2, spec(c, *rd, parts=parts)]  # noqa: E731
    score_in = lambda parts: [spec(pn.rows, rows, pn.bs_p, parts=parts), spec(pn.rows, rows, parts=parts),  # noqa: E731
                              spec(c, rows, pn.bs_p, parts=parts)]
    if not sel:
        outs = call(
            functools.partial(_finish_kernel, plan=pn), grid=(b, hkv, t * p), name="nsa_decode_finish",
            in_specs=[whole, spec(*rd, parts=p), *state_in(p), *score_in(p), *tail_specs],
            out_specs=[spec(*rd, parts=p)] + part_specs(2)[:2] + [spec(pn.n_p, parts=p)] + part_specs(2)[2:],
            out_shape=[shape(*rd, dtype=q.dtype)] + part_shapes(2)[:2] + [shape(pn.n_p, dtype=jnp.int32)]
            + part_shapes(2)[2:],
        )(qpos, qr, *cmp_out, *tail_in)
        if stop_after == 2:
            return outs
        o_cmp, o_slc, o_win, idx = outs[:4]
        if p > 1:
            o_slc, o_win = (_merge(o, lse).astype(q.dtype) for o, lse in ((o_slc, outs[4]), (o_win, outs[5])))
        return _unpack(pn, o_cmp, o_slc, o_win, idx, b, t, h)
    o_cmp, o_win, idx = call(
        functools.partial(_select_kernel, plan=pn), grid=(b, hkv, t), name="nsa_decode_select",
        in_specs=[whole, *state_in(1), *score_in(1), *state_in(1)],
        out_specs=[spec(*rd)] * 2 + [spec(pn.n_p)],
        out_shape=[shape(*rd, dtype=q.dtype)] * 2 + [shape(pn.n_p, dtype=jnp.int32)],
    )(qpos, *cmp_out, *outs[6:])
    if stop_after == 2:
        return o_cmp, o_win, idx
    o_slc = call(
        functools.partial(_slc_kernel, plan=pn), grid=(b, hkv, t * p), name="nsa_decode_slc",
        in_specs=[whole, spec(*rd, parts=p), spec(pn.n_p, parts=p), *tail_specs[:3]],
        out_specs=part_specs(1), out_shape=part_shapes(1),
    )(qpos, qr, idx, *tail_in[:3])
    o_slc = o_slc[0] if p == 1 else _merge(*o_slc).astype(q.dtype)
    return _unpack(pn, o_cmp, o_slc, o_win, idx, b, t, h)


def _one_launch(pn: Plan, call, qr, qpos, cmp_in, cmp_specs, tail_in, tail_specs, b, t, h, hkv, dtype,
                stop_after, interpret):
    """`nsa_decode_triton` on the one-launch plan (`_one_launch_kernel`): one pallas_call
    (plus XLA's zero fill of the `[B, T, Hkv, 4]` int32 counters it takes aliased)."""
    if stop_after is not None:
        raise ValueError(f"stop_after needs a plan of several launches, got {stop_after!r} for one_launch")
    c, p, rows, rd = pn.splits, pn.tail_splits, pn.rows_p, (pn.rows_p, pn.d_p)
    zt, zs = t * c, t * p                                      # cmp programs, then slc programs

    def grp(*block):                                           # this (b, query, hkv)'s block
        def index(b_, h_, z):
            ti = jnp.where(z < zt, z // c, (z - zt) // p)
            return (b_, ti, h_) + (0,) * len(block)
        return pl.BlockSpec((None, None, None) + block, index)

    f32 = lambda *tail: jax.ShapeDtypeStruct((b, t, hkv) + tail, jnp.float32)     # noqa: E731
    states = lambda n: ([grp(n, rows)] * 2 + [grp(n, *rd)], [f32(n, rows)] * 2 + [f32(n, *rd)])  # noqa: E731
    outs = [(grp(*rd), jax.ShapeDtypeStruct((b, t, hkv) + rd, dtype))] * 3 + [
        (grp(pn.n_p), jax.ShapeDtypeStruct((b, t, hkv, pn.n_p), jnp.int32))]
    out_specs = [o[0] for o in outs] + states(c)[0] + [grp(pn.rows, rows, pn.bs_p), grp(pn.rows, rows),
                                                        grp(c, rows, pn.bs_p)] + states(p)[0] * 2
    out_shape = [o[1] for o in outs] + states(c)[1] + [f32(pn.rows, rows, pn.bs_p), f32(pn.rows, rows),
                                                       f32(c, rows, pn.bs_p)] + states(p)[1] * 2
    cnt = jnp.zeros((b, t, hkv, 4), jnp.int32)
    res = call(
        functools.partial(_one_launch_kernel, plan=pn, barrier=not interpret), grid=(b, hkv, zt + zs), name="nsa_decode_one_launch",
        in_specs=[pl.BlockSpec(), grp(*rd), *cmp_specs, *tail_specs, grp(4)],
        out_specs=out_specs + [grp(4)], out_shape=out_shape + [jax.ShapeDtypeStruct(cnt.shape, jnp.int32)],
        input_output_aliases={11: len(out_shape)},
    )(qpos, qr, *cmp_in, *tail_in, cnt)
    return _unpack(pn, *res[:4], b, t, h)


def _unpack(pn: Plan, o_cmp, o_slc, o_win, idx, b, t, h):
    """Kernel outputs `[B, T, Hkv, rows_p, d_p]` -> `[B, T, H, D]`; indices `[..., n_out]`."""
    unpack = lambda o: o[..., :pn.g, :pn.d].reshape(b, t, h, pn.d)        # noqa: E731
    return unpack(o_cmp), unpack(o_slc), unpack(o_win), idx[..., :pn.n_out]


# Backend declaration for `pallas_kernels.common.resolve`: a GPU (or interpret mode);
# token-mode selection with `l'/d` a power of two (`supports`); tiles `TritonConfig`.
CONFIG = TritonConfig


def supports(*, cfg, **_) -> str | None:
    """None when the kernel covers `cfg` (NSA's hyperparameters), else why not."""
    if cfg.selection != "token":
        return f"covers selection='token' only, got cfg.selection={cfg.selection!r}"
    r = cfg.sel_block // cfg.cmp_stride
    if r < 1 or r & (r - 1):
        return (f"needs sel_block / cmp_stride (l'/d) a power of two, got {cfg.sel_block} / "
                f"{cfg.cmp_stride} = {r}")
    return None
