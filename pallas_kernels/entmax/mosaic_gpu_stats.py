"""`entmax` stats pass on Hopper: Pallas with the Mosaic GPU lowering.

The first kernel of the alpha-entmax forward (Peters et al. 2019, arXiv 1905.05702; block
skipping as in AdaSplash, arXiv 2502.12082; see `triton.py`): per query row the max score
`m` (in `z = (alpha-1) * scale * q . k` units, `NEG` where nothing is visible) and the
visible count `n`, and per (row part, KV tile) the tile max `tmax`. It is a `q k^T` over
every visible tile and a max, no `exp`, no `p v`: `run_stats` returns exactly what
`triton.run_stats` does (`(m, n, tmax, full)` on the `triton.tiles(...)` tiles), from
FlashAttention-3's layout (arXiv 2407.08608, as `flash/mosaic_gpu.py`) instead of Triton's.

Layout. One CTA per (head, pair of 64-row query tiles, batch), three warpgroups:

* Warpgroup 2, the producer (`setmaxnreg` 40), TMA-loads the CTA's tile-range row, then
  streams the K tiles `[block_k, D]` of KV head `h // G` (GQA by index) and their key
  positions through a `stages`-deep SMEM ring ("loaded" / "consumed" barriers per slot),
  over the KV tiles `[lo, hi)` that either consumer visits.
* Warpgroups 0 and 1, the consumers (64 query rows each, and their positions, in SMEM),
  walk the ring: `S = Q K^T` by wgmma (fp32 accumulator), then on the tiles of their own
  range the row maxima (per `fine_k`-column part) and counts, the element mask
  (`blocks.visible`'s rule: both positions >= 0 and, causal, `kv_pos <= q_pos`) only off
  their own mask-free run; the tiles outside their range are released unread.

Tile maxima without cross-warp reductions. Each (row part of `fine_q` rows, column part)
max is one scalar of the tmax row. A consumer does not reduce a tile's `[64]` row maxima to
that scalar (a reduction across its four warps, which Mosaic GPU lowers through one SMEM
scratch that every warpgroup shares: compiled, two consumers doing it at once raced, and
taking turns cost two barriers a tile). It stores the row-maxima vector as one row of a
`[64 entries, 64 rows]` SMEM stage instead, and every 64 entries of a row part loads the
stage back in the wgmma layout, entries as rows, and reduces each row part's columns: an
in-warp reduction whose `[64]` result is a whole row of the tmax output, stored by TMA from
a double-buffered SMEM row (`flush`).

Tile ranges come from the positions (`blocks.block_tables` / `visit_ranges`, in XLA, as
the Triton kernel's), per 64-row consumer tile: positions are read (traced or concrete;
padding -1, ragged lengths). `fine_q = min(block_q, 64)`, `fine_k = min(block_k,
stats_mosaic_block_k)` (the later kernels' tiles); XLA takes the max over groups of these
where `block_q` (128) or `block_k` exceed them. Unlike the Triton stats kernel with a
`stats_block_k` above `block_k` (an upper bound), the maxima here are exact per fine tile.

Scope (`supports`): bf16 / f16, padded head dim 64 or 128, `block_q`, `block_k` powers of
two (always) and the SMEM budget. Otherwise `triton.run_stats` runs the Triton kernel.

`interpret=plgpu.InterpretGPUParams()` runs it on the CPU in JAX's GPU interpret mode
(tests), with `tiles_mosaic_gpu.observe_last_phases` for the ring's last phases.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash import blocks
from pallas_kernels.tiles_mosaic_gpu import SMEM_BYTES, observe_last_phases, smem_transforms

NEG = -1e30                # as triton.NEG (masked z; the max of a row that sees nothing)
ROWS = 64                  # a consumer's query tile (the wgmma M tile)
_COMPUTE_WGS = 2
_TAB_W = 16                # int32 per CTA table row (one 64-byte TMA copy)
_BOX = 64                  # tmax entries of one output row (one `flush`)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static sizes of one call (hashable)."""

    block_k: int               # the kernel's KV tile (`stats_mosaic_block_k`)
    stages: int
    fine_q: int                # rows of a tmax part (`min(block_q, 64)`)
    fine_k: int                # columns of a tmax part (`min(block_k, self.block_k)`)
    nk: int                    # KV tiles of `block_k`
    d: int

    @property
    def row_parts(self) -> int:
        return ROWS // self.fine_q

    @property
    def col_parts(self) -> int:
        return self.block_k // self.fine_k

    @property
    def width(self) -> int:
        """tmax entries of one row part, padded to whole `_BOX` rows."""
        return blocks.round_up(self.nk * self.col_parts, _BOX)

    @property
    def tmax_rows(self) -> int:
        return self.row_parts * self.width // _BOX

    @property
    def tmax_slots(self) -> int:
        """SMEM rows a consumer stores its tmax rows from: two flushes' worth."""
        return 2 * self.row_parts


def geometry(cfg, tk_p: int, d_p: int, bq: int, bk: int) -> Geometry:
    block_k = cfg.stats_mosaic_block_k
    return Geometry(block_k=block_k, stages=cfg.stats_mosaic_stages, fine_q=min(bq, ROWS),
                    fine_k=min(bk, block_k), nk=tk_p // block_k, d=d_p)


def smem_bytes(geo: Geometry, itemsize: int = 2) -> int:
    """Q tiles, the K ring with its key positions, the tmax slots, m / n / query positions,
    the table row, the tile-maxima stages."""
    return (_COMPUTE_WGS * ROWS * geo.d * itemsize
            + geo.stages * geo.block_k * (geo.d * itemsize + 4)
            + _COMPUTE_WGS * geo.tmax_slots * _BOX * 4 + 3 * _COMPUTE_WGS * ROWS * 4 + _TAB_W * 4
            + _COMPUTE_WGS * _BOX * ROWS * 4)


def padding(cfg) -> tuple[int, int]:
    """The multiples the kernel needs of the padded lengths: a CTA's 128 query rows, its KV
    tile."""
    return _COMPUTE_WGS * ROWS, cfg.stats_mosaic_block_k


def supports(cfg, dtype, tq_p: int, tk_p: int, d_p: int, bq: int, bk: int) -> str | None:
    """None when the Mosaic GPU stats kernel covers the padded call, else why not."""
    mq, mk = padding(cfg)
    if tq_p % mq or tk_p % mk or tq_p % bq or tk_p % bk:
        return f"padded lengths {tq_p}, {tk_p} (multiples of {mq}, {mk} and the tiles {bq}, {bk})"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype).name} (bf16 / fp16 only)"
    if d_p not in (64, 128):
        return f"head dim {d_p} (padded; 64 or 128 only)"
    geo = geometry(cfg, tk_p, d_p, bq, bk)
    if smem_bytes(geo) > SMEM_BYTES:
        return f"{smem_bytes(geo)} B of SMEM (> {SMEM_BYTES}): fewer stats_mosaic_stages"
    return None


def _kernel_call(q, k, q_pos, kv_pos, tab, *, geo: Geometry, zscale: float, mask_fn,
                 interpret=None):
    """q `[B, Tq_p, H, D]`, k `[B, Tk_p, Hkv, D]` (Tq_p a multiple of 128, Tk_p of
    `geo.block_k`), q_pos `[B, Tq_p]`, kv_pos `[B, Tk_p]` int32, tab `[B, Tq_p / 128, 16]`
    int32 (`cta_tables`) -> m, n `[B, H, Tq_p]` float32, tmax `[B, H, Tq_p / 64,
    geo.tmax_rows, 64]` float32 (row part r's entry of fine tile `j * col_parts + c` at flat
    `r * geo.width + j * col_parts + c`; entries of tiles a consumer does not visit are
    left unwritten)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415 - GPU-only import

    b, tq, h, d = q.shape
    hkv = k.shape[2]
    group = h // hkv
    dtype = q.dtype
    bk, stages = geo.block_k, geo.stages
    n_cta = tq // (_COMPUTE_WGS * ROWS)
    rparts, cparts, width = geo.row_parts, geo.col_parts, geo.width
    log2_fq, log2_fk = geo.fine_q.bit_length() - 1, geo.fine_k.bit_length() - 1
    tiles_per_group = _BOX // cparts            # KV tiles whose entries fill one tmax row
    row_layout, col_layout = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)

    def body(q_ref, k_ref, qpos_ref, kpos_ref, tab_ref, m_ref, n_ref, tmax_ref, scoped):
        ((q_smem2, k_smem, kpos_smem, qpos_smem2, m_smem2, n_smem2, tmax_smem2, tab_smem,
          stage2), (q_loaded, tab_loaded), k_loaded, k_consumed) = scoped
        bi, hi, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        cta = n_cta - 1 - lax.axis_index("q_seq")       # the longest (causal) ranges first

        @pl.when(wg < _COMPUTE_WGS)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            q_smem, tmax_smem, stage = q_smem2.at[wg], tmax_smem2.at[wg], stage2.at[wg]
            row0 = cta * (_COMPUTE_WGS * ROWS) + wg * ROWS
            plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(row0, ROWS), hi], q_smem, q_loaded.at[wg])
            plgpu.copy_gmem_to_smem(qpos_ref.at[bi, pl.ds(row0, ROWS)], qpos_smem2.at[wg],
                                    q_loaded.at[wg])
            plgpu.barrier_wait(tab_loaded)
            plgpu.barrier_wait(q_loaded.at[wg])
            lo_c, hi_c = tab_smem[0], tab_smem[1]
            own = [tab_smem[4 + 4 * wg + i] for i in range(4)]       # lo <= flo <= fhi <= hi
            qp = plgpu.load(qpos_smem2.at[wg], layout=row_layout)
            qp2 = lax.broadcast_in_dim(qp, (ROWS, bk), [0])
            # only where used: layout inference cannot place an unused iota
            part = cpart = None
            if rparts > 1:                  # the stage's columns are query rows
                part = jnp.right_shift(plgpu.broadcasted_iota(
                    jnp.int32, (_BOX, ROWS), 1, layout=plgpu.Layout.WGMMA), log2_fq)
            if cparts > 1:
                cpart = jnp.right_shift(plgpu.broadcasted_iota(
                    jnp.int32, (ROWS, bk), 1, layout=plgpu.Layout.WGMMA), log2_fk)

            def flush(j):
                """The tmax rows of the group of `_BOX` entries holding tile `j`'s: the
                stage (entries as rows, query rows as columns) loaded in the wgmma layout
                and reduced along its rows, in-warp. Entries of the group this consumer
                did not compute hold stale values: `run_stats` masks them (`visited`)."""
                plgpu.commit_smem()         # the stage rows other warps stored
                group = lax.div(j, jnp.int32(tiles_per_group))
                entries = plgpu.load(stage, layout=plgpu.Layout.WGMMA, optimized=False)
                plgpu.wait_smem_to_gmem(rparts, wait_read_only=True)   # this buffer's last use
                first = lax.rem(group, jnp.int32(2)) * rparts
                for r in range(rparts):
                    part_r = entries if rparts == 1 else jnp.where(part == r, entries, NEG)
                    tmax_smem.at[first + r][...] = part_r.max(axis=1)
                plgpu.commit_smem()
                for r in range(rparts):
                    plgpu.copy_smem_to_gmem(tmax_smem.at[first + r], tmax_ref.at[
                        bi, hi, cta * _COMPUTE_WGS + wg, r * (width // _BOX) + group])

            def step(j, carry, kind):
                m, n = carry
                slot = lax.rem(j - lo_c, jnp.int32(stages))
                plgpu.barrier_wait(k_loaded.at[slot])
                if kind == "skip":
                    plgpu.barrier_arrive(k_consumed.at[slot])
                    return carry

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((ROWS, bk), jnp.float32))
                if kind == "masked":
                    kp = plgpu.load(kpos_smem.at[slot], layout=col_layout)
                    plgpu.barrier_arrive(k_consumed.at[slot])
                    kp2 = lax.broadcast_in_dim(kp, (ROWS, bk), [1])
                    vis = blocks.visible(mask_fn, qp2, kp2, None, None)
                    s = jnp.where(vis, s * zscale, NEG)
                    n = n + jnp.where(vis, 1.0, 0.0).sum(axis=1)
                else:                       # zscale > 0: scale the row maxima only
                    plgpu.barrier_arrive(k_consumed.at[slot])
                    n = n + float(bk)
                for c in range(cparts):     # per column part: the row maxima (in-warp)
                    row = (s if cparts == 1 else jnp.where(cpart == c, s, NEG)).max(axis=1)
                    if kind == "full":
                        row = row * zscale
                    m = jnp.maximum(m, row)
                    stage.at[lax.rem(j * cparts + c, jnp.int32(_BOX))][...] = row
                pl.when(lax.rem(j + 1, jnp.int32(tiles_per_group)) == 0)(lambda: flush(j))
                return m, n

            m = plgpu.layout_cast(jnp.full((ROWS,), NEG, jnp.float32), row_layout)
            n = plgpu.layout_cast(jnp.full((ROWS,), 0.0, jnp.float32), row_layout)
            carry = (m, n)
            bounds = [lo_c, *own, hi_c]
            for a, z, kind in zip(bounds[:-1], bounds[1:], ("skip", "masked", "full", "masked", "skip")):
                carry = lax.fori_loop(a, z, lambda j, cr, kind=kind: step(j, cr, kind), carry)
            m, n = carry
            last = own[3] - 1               # the group of the last computed tile, if open
            pl.when((own[3] > own[0]) & (lax.rem(own[3], jnp.int32(tiles_per_group)) != 0))(
                lambda: flush(last))
            m_smem2.at[wg][...] = m
            n_smem2.at[wg][...] = n
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(m_smem2.at[wg], m_ref.at[bi, hi, pl.ds(row0, ROWS)])
            plgpu.copy_smem_to_gmem(n_smem2.at[wg], n_ref.at[bi, hi, pl.ds(row0, ROWS)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == _COMPUTE_WGS)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            plgpu.copy_gmem_to_smem(tab_ref.at[bi, cta], tab_smem, tab_loaded)
            plgpu.barrier_wait(tab_loaded)
            lo_c, hi_c = tab_smem[0], tab_smem[1]
            kv_head = lax.div(hi, jnp.int32(group))

            def load(j, slot):
                keys = pl.ds(j * bk, bk)
                plgpu.copy_gmem_to_smem(k_ref.at[bi, keys, kv_head], k_smem.at[slot], k_loaded.at[slot])
                plgpu.copy_gmem_to_smem(kpos_ref.at[bi, keys], kpos_smem.at[slot], k_loaded.at[slot])

            for s in range(stages):     # the CTA may visit fewer than `stages` tiles
                pl.when(lo_c + s < hi_c)(lambda s=s: load(lo_c + s, s))

            @pl.loop(0, jnp.maximum(hi_c - lo_c - stages, 0))
            def _(i):
                slot = lax.rem(i, jnp.int32(stages))
                plgpu.barrier_wait(k_consumed.at[slot])
                load(lo_c + i + stages, slot)

            if interpret:
                observe_last_phases((k_consumed,), hi_c - lo_c, stages)

    def entry(*refs):
        tr = smem_transforms(plgpu, d, dtype)
        scratch = (
            plgpu.SMEM((_COMPUTE_WGS, ROWS, d), dtype, transforms=tr),
            plgpu.SMEM((stages, bk, d), dtype, transforms=tr),
            plgpu.SMEM((stages, bk), jnp.int32),
            plgpu.SMEM((_COMPUTE_WGS, ROWS), jnp.int32),
            plgpu.SMEM((_COMPUTE_WGS, ROWS), jnp.float32),
            plgpu.SMEM((_COMPUTE_WGS, ROWS), jnp.float32),
            plgpu.SMEM((_COMPUTE_WGS, geo.tmax_slots, _BOX), jnp.float32),
            plgpu.SMEM((_TAB_W,), jnp.int32),
            plgpu.SMEM((_COMPUTE_WGS, _BOX, ROWS), jnp.float32),     # `flush`'s stages
        )
        pl.run_scoped(
            lambda *a: body(*refs, a),
            scratch,
            (plgpu.Barrier(num_arrivals=2, num_barriers=_COMPUTE_WGS), plgpu.Barrier()),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),               # K + key positions
            plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct((b, h, tq), jnp.float32),
                  jax.ShapeDtypeStruct((b, h, tq), jnp.float32),
                  jax.ShapeDtypeStruct((b, h, tq // ROWS, geo.tmax_rows, _BOX), jnp.float32)),
        grid=(h, n_cta, b),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        kernel_name="entmax_stats_mosaic_gpu",
        interpret=interpret,
    )(q, k, q_pos, kv_pos, tab)


def cta_tables(mask_fn, q_pos, kv_pos, block_k: int):
    """Per CTA `[B, Tq_p / 128, 16]` int32: `(lo, hi)` the KV tiles either consumer visits,
    then each consumer's `(lo, flo, fhi, hi)` (`blocks.visit_ranges` on its 64 rows)
    clipped into `[lo, hi)` (a consumer that sees nothing: all `lo`); and `visited [B,
    Tq_p / 64, nK]` bool, the tiles each consumer computes."""
    present, full = blocks.block_tables(mask_fn, q_pos, kv_pos, None, None, ROWS, block_k)
    rng = blocks.visit_ranges(present, full)                               # [B, nQ64, 4]
    b, nq64, _ = rng.shape
    pairs = rng.reshape(b, nq64 // _COMPUTE_WGS, _COMPUTE_WGS, 4)
    some = pairs[..., 3] > pairs[..., 0]
    big = jnp.iinfo(jnp.int32).max
    lo = jnp.where(some, pairs[..., 0], big).min(-1)
    hi = jnp.where(some, pairs[..., 3], 0).max(-1)
    lo = jnp.where(hi > 0, lo, 0)
    own = jnp.clip(pairs, lo[..., None, None], hi[..., None, None])
    own = jnp.where(some[..., None], own, lo[..., None, None])
    head = jnp.stack([lo, hi, jnp.zeros_like(lo), jnp.zeros_like(lo)], -1)
    tab = jnp.concatenate([head, own.reshape(b, -1, 4 * _COMPUTE_WGS),
                           jnp.zeros((b, nq64 // _COMPUTE_WGS, 4), jnp.int32)], -1)
    j = jnp.arange(present.shape[-1], dtype=jnp.int32)
    own = own.reshape(b, nq64, 4)
    visited = (j >= own[..., 0:1]) & (j < own[..., 3:4])
    return tab.astype(jnp.int32), visited


def run_stats(st, qp, kp, q_pos_p, kv_pos_p, bq, bk, interpret=None):
    """`triton.run_stats`'s `(m, n, tmax, full)` from the Mosaic GPU kernel. The padded
    lengths must be multiples of `padding(st.config)` (`triton.pad_inputs` sees to it);
    `interpret`: None (compiled) or an `InterpretGPUParams`."""
    b, tq_p, h, d_p = qp.shape
    tk_p = kp.shape[1]
    geo = geometry(st.config, tk_p, d_p, bq, bk)
    tab, visited = cta_tables(st.mask_fn, q_pos_p, kv_pos_p, geo.block_k)
    m, n, raw = _kernel_call(qp, kp, q_pos_p, kv_pos_p, tab, geo=geo, zscale=st.zscale,
                             mask_fn=st.mask_fn, interpret=interpret)
    nq64 = tq_p // ROWS
    raw = raw.reshape(b, h, nq64, geo.row_parts, geo.width)[..., :geo.nk * geo.col_parts]
    raw = raw.reshape(b, h, nq64, geo.row_parts, geo.nk, geo.col_parts)
    raw = jnp.where(visited[:, None, :, None, :, None], raw, NEG)
    fine = raw.reshape(b, h, tq_p // geo.fine_q, tk_p // geo.fine_k)
    gq, gk = bq // geo.fine_q, bk // geo.fine_k                # coarser tiles: max of the fine
    tmax = fine.reshape(b, h, tq_p // bq, gq, tk_p // bk, gk).max((3, 5))
    present, full = blocks.block_tables(st.mask_fn, q_pos_p, kv_pos_p, None, None, bq, bk)
    return m, n, jnp.where(present[:, None], tmax, NEG), full
