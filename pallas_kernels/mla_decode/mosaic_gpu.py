"""`mla_decode` on Hopper: Pallas with the Mosaic GPU lowering (`impl="mosaic_gpu"`).

FlashMLA's layout (github.com/deepseek-ai/FlashMLA): the 64 absorbed query heads of one
query token are the wgmma M dimension (one latent KV head serves them all, MQA), so the
cache tiles are read once per query token and multiplied on the tensor cores instead of
32-row fp32 dots. One CTA per (batch, split, query token x 64-head group), three
warpgroups (the rows are CUDA's x grid dimension, so a prefill's T tokens fit:
`mla_decode.api.mla_sparse_attention` runs this kernel over every query token):

* warpgroup 2, the producer (small register budget, `setmaxnreg`), loads the CTA's query
  tile `[64, Dc + Dr]` once, then streams its share of the cache by TMA through a
  `max_concurrent_steps`-deep SMEM ring: per tile of `block_k` slots, `c_kv` as two halves
  `[block_k, Dc / 2]`, `k_rope [block_k, Dr]` and (dense) the tile's additive mask
  (float32 0 / -inf, `[block_k]`); each ring slot has a "loaded" barrier (TMA completion,
  four copies) and a "consumed" barrier (both consumers arrived);
* warpgroups 0 and 1, the consumers, each compute the tile's scores `S = q_c c^T + q_r r^T`
  (`[64, block_k]`, three wgmmas; both compute the same S, so no softmax statistics are
  exchanged) and the online softmax in base 2, and accumulate `P c[:, half]` into their own
  half of the output (`[64, Dc / 2]` fp32 in registers): the values are the `c_kv` halves
  already in SMEM, so each token's `Dc + Dr` values are read once.

Split-K (flash-decoding): split `sp` walks tiles `[sp * per, (sp + 1) * per)` of the cache
and writes a partial `(out, lse)`; `mla_decode.layout.merge` combines them
(`decode.layout.combine`), as for the Triton kernel. The cache is read in place: a last
tile that runs past slot S is zero-filled by the TMA (its default out-of-bounds mode) and
masked (Mosaic GPU's TMA must start tiled copies at provable multiples of the tile, so
moving the last tile back to end at S does not lower). Mosaic GPU's TMA also needs the
cache's slot count to be a multiple of 8 (the SMEM tile's rows) or below one tile: other
caches are padded here, a copy of the whole cache (caches are usually allocated at round
sizes, and those are read in place). The mask rows `[B, T, tiles * block_k]` (visibility
from `q_positions` / `kv_positions`, built in XLA: 4 bytes per slot and query token beside
the slot's `2 (Dc + Dr)`) are what the kernel reads of the positions.

Sparse mode (`indices [B, T, K]`): each query token's CTAs walk its listed slots in tiles
of `block_k` and the producer gathers the listed rows straight into the ring, so each
selected row is read once (`gathers_in_kernel`, `selected_slots`): the split's slot list
`[per_split, block_k]` is loaded once into SMEM (visibility built in XLA: -1 where the
listed slot is not visible to the query; the consumers mask from it, so sparse calls have
no mask ring and no mask array), then per row one TMA copy per 64 columns
(`Dc / 64 + Dr / 64` copies of 128 bytes, 9 at DeepSeek's widths), issued by the producer's
four warps (`plgpu.warp_map`, rows `warp + 4 k`), all arriving on the tile's "loaded"
barrier. Hopper's TMA has no row gather (`gather4` is Blackwell's), and Mosaic GPU (JAX
0.11.2) refuses TMA copies of single rows into the tiled ring that wgmma reads ("slice start
and size divisible by the tile size (8)"): the copies go through a second, untiled view of
the same bytes, `[stages, block_k / 8, d / 64, 8, 64]` with the ring's 128-byte swizzle (a
`RefUnion` of the ring and the view, both laid out from offset 0: the view's shape is the
ring's physical tiled one). TMA swizzles by the absolute SMEM address, so a row written
alone lands where a whole-tile copy would put it; the PTX ISA asks for 1024-byte-aligned
destinations under the 128-byte swizzle, which rows 1-7 of an 8-row group are not (they are
128-byte aligned): the compiled GPU tests check the hardware does what this relies on. The GPU interpreter keeps
`RefUnion` members apart and keeps logical arrays, so interpreted the copies write the
tiled ring itself. Unlisted or invisible entries (-1) and the padding past K load slot 0
and are masked; a duplicated entry counts twice (the reference's gather semantics). The
cache is read in place whatever its slot count. Where a split's slot list does not fit
(more than 256 tiles, or SMEM), the split count (unless given) grows until it does; where
it still does not, or with `gather_in_kernel=False` (the default until the compiled
GPU tests have run), the listed rows are gathered by
XLA first (`gather_selected`: `[B * T, K, Dc + Dr]`, -1 padding and unlisted slots at
position -1) and the dense kernel runs over them, one "batch row" per query token, moving
each selected row three times.

Scope (everything else raises ValueError, nothing compiled): bf16 / fp16, H a multiple of
64 (the wgmma M tile), Dc a multiple of 128 up to 512 (two 64-aligned halves; 512 fills a
consumer's registers), Dr a multiple of 64; the SMEM ring must fit 227 KB (DeepSeek's
Dc=512, Dr=64: block_k=64 and 2 stages, 218 KB dense; gathering, a split's slot list of up
to 36 tiles, K <= 2304, fits beside it: `smem_bytes`). Every CTA walks its whole share of the
cache: unlike the Triton kernel it does not stop at a row's last visible slot (a partly
filled cache is read whole, masked).

`impl="auto"` chooses this kernel on Hopper for the calls it covers (Triton elsewhere).
On the CPU it is lowered for CUDA (tests) and run in GPU interpret mode,
`interpret=jax.experimental.pallas.mosaic_gpu.InterpretGPUParams()`, where the `P c` wgmma
(a register left operand) is a float32 dot (`tiles_mosaic_gpu.accumulate` / `mma`) and the
ring phases the compiled kernel leaves unobserved are waited for (`observe_last_phases`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import AttentionOutput, interpret_reason
from pallas_kernels.decode import layout
from pallas_kernels.flash.blocks import pad_axis, round_up
from pallas_kernels.mla_decode.layout import merge
from pallas_kernels.tiles_common import LOG2E
from pallas_kernels.tiles_mosaic_gpu import (SMEM_BYTES, accumulate, mma, observe_last_phases,
                                              smem_transforms)

ROWS = 64                 # query heads per CTA: the wgmma M tile
_COMPUTE_WGS = 2          # consumer warpgroups, each owning half of the Dc output columns
_WARPS = 4                # warps of a warpgroup
_GATHER_COLS = 64         # columns per TMA row copy of the in-kernel gather: one 128-byte swizzle row


@dataclasses.dataclass(frozen=True)
class MlaDecodeMosaicGpuConfig:
    """`block_k`: cache slots per ring stage (a multiple of 64); `max_concurrent_steps`:
    ring stages (>= 2; at Dc=512, Dr=64 a stage is 72 KB beside the 72 KB query tile, so
    block_k=64 allows 2); `split_target`: CTAs the split heuristic aims for (132 SMs on an
    H100); `min_tokens_per_split`: the fewest cache slots a split gets from the heuristic
    (a split's partial, 64 x Dc values per head group, is written and read again). 128 from
    the first GPU sweep (H200, B=16, K=2048 sparse: 85 us at 128, 153 us at 256, 181 us at
    512; dense over 128K: 1350-1384 us at all three). `gather_in_kernel`: True: sparse calls
    read their listed rows in the kernel where a split's slot list fits (`gathers_in_kernel`);
    False (the default until a GPU has compiled and checked it: as of 2026-12-07 it is
    verified in GPU interpret mode and lowered for CUDA only, and its single-row TMA writes
    into the swizzled ring rely on hardware behaviour the interpreter cannot check): always
    through XLA's gather first (`gather_selected`)."""

    block_k: int = 64
    max_concurrent_steps: int = 2
    split_target: int = 132
    min_tokens_per_split: int = 128
    gather_in_kernel: bool = False

    def __post_init__(self):
        if self.block_k < 64 or self.block_k % 64:
            raise ValueError(f"block_k must be a positive multiple of 64, got {self.block_k}")
        if self.max_concurrent_steps < 2:
            raise ValueError(f"max_concurrent_steps must be >= 2, got {self.max_concurrent_steps}")
        if self.split_target < 1 or self.min_tokens_per_split < 1:
            raise ValueError("split_target and min_tokens_per_split must be >= 1")


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static sizes of one call (hashable)."""

    s: int              # cache slots, padded to a multiple of 8 (TMA) and to one tile
    dc: int
    dr: int
    block_k: int
    stages: int
    tiles: int          # cache tiles of block_k
    per_split: int      # tiles per split (the last split may have fewer, never none)
    num_splits: int


def smem_bytes(dc: int, dr: int, block_k: int, stages: int, itemsize: int, slot_tiles: int = 0) -> int:
    """SMEM of one CTA as Pallas Mosaic GPU lays it out (each buffer aligned to 1 KB, 8 bytes a
    barrier; no reduction scratch: the kernel's row reductions stay within a warp, so it asks
    for none): the query tile (`c` halves, `r`), the ring (`c_kv`, `k_rope`; dense: the
    masks), the lse row and, gathering in the kernel (`slot_tiles` > 0), the split's slot
    list (`slot_tiles` tiles of int32, which also carries the visibility)."""
    bufs = (ROWS * dc * itemsize, ROWS * dr * itemsize, stages * block_k * dc * itemsize,
            stages * block_k * dr * itemsize, 0 if slot_tiles else stages * block_k * 4, ROWS * 4,
            slot_tiles * block_k * 4)
    barriers = 2 + 2 * stages + (slot_tiles > 0)
    return sum(round_up(x, 1024) for x in bufs) + 8 * barriers


def geometry(q_abs, c_kv, k_rope, cfg: MlaDecodeMosaicGpuConfig, num_splits,
             slots: int | None = None) -> Geometry:
    """`slots`: the slots each query row walks (sparse, gathered in the kernel: K); default
    the cache's."""
    b, t, h, _ = q_abs.shape
    s = max(round_up(c_kv.shape[1] if slots is None else slots, 8), cfg.block_k)
    tiles = layout.cdiv(s, cfg.block_k)
    if num_splits is None:
        want = layout.cdiv(cfg.split_target, b * t * (h // ROWS))
        num_splits = max(1, min(want, layout.cdiv(tiles, layout.cdiv(cfg.min_tokens_per_split,
                                                                       cfg.block_k))))
    per = layout.cdiv(tiles, min(int(num_splits), tiles))
    return Geometry(s=s, dc=c_kv.shape[2], dr=k_rope.shape[2], block_k=cfg.block_k,
                    stages=min(cfg.max_concurrent_steps, per), tiles=tiles, per_split=per,
                    num_splits=layout.cdiv(tiles, per))


def tile_mask(q_positions, kv_positions, geo: Geometry):
    """The dense kernel's float32 mask `[B, T, tiles * block_k]`: 0 where the slot is
    visible to the query, else -inf (slots past the cache too); `kv_positions [B, S]`."""
    kp = pad_axis(kv_positions[:, None, :], geo.tiles * geo.block_k, 2, -1)
    qp = q_positions[:, :, None]
    return jnp.where((kp >= 0) & (kp <= qp) & (qp >= 0), 0.0, -jnp.inf).astype(jnp.float32)


def _kernel_call(q, c_kv, k_rope, listing, *, sparse: bool, geo: Geometry, scale: float, interpret):
    """q `[B, T, H, Dc + Dr]`, cache `[B, S, Dc]` / `[B, S, Dr]` -> partials `(o [B, splits,
    T, H, Dc]` in q's dtype, `lse [B, splits, T, H]` float32). `listing`: dense, the float32
    mask `[B, T, tiles * bk]` (`tile_mask`; tile j is cache slots `[j * bk, (j + 1) * bk)`);
    `sparse`, the int32 slot lists `[B, T, splits * per_split, bk]` (`selected_slots`: tile j
    of query t is the cache slots `listing[b, t, j]`, copied row by row into the ring; -1:
    not visible, slot 0 copied and masked)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415 - GPU-only import

    b, t, h, _ = q.shape
    dtype = q.dtype
    dc, dr, bk, stages = geo.dc, geo.dr, geo.block_k, geo.stages
    half = dc // _COMPUTE_WGS
    groups = h // ROWS
    c2 = float(scale) * LOG2E          # logits in base-2 units
    # copies (barrier arrivals) per ring tile: the two c halves, k_rope, the mask; sparse:
    # one per row and 64-column chunk (c_kv's Dc / 64 and k_rope's Dr / 64)
    per_tile = bk * (dc + dr) // _GATHER_COLS if sparse else _COMPUTE_WGS + 2

    def body(q_ref, c_ref, r_ref, listing_ref, o_ref, lse_ref, smem, bars, gather):
        """`listing_ref`: the mask (dense) or the slot lists (sparse); `gather`: sparse,
        `(slots_smem, slots_loaded, (c_view, r_view))`, the split's slot lists in SMEM (the
        ring has no mask: `mask_smem` is None)."""
        qc_smem, qr_smem, c_smem, r_smem, mask_smem, lse_smem = smem
        q_loaded, loaded, consumed, done = bars
        sp, row, bi = lax.axis_index("split"), lax.axis_index("row"), lax.axis_index("batch")
        ti, hg = lax.div(row, jnp.int32(groups)), lax.rem(row, jnp.int32(groups))
        heads = pl.ds(hg * ROWS, ROWS)
        lo = sp * geo.per_split
        n = jnp.minimum(lo + geo.per_split, geo.tiles) - lo         # >= 1 (geometry)
        wg = lax.axis_index("wg")

        @pl.when(wg < _COMPUTE_WGS)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            m = plgpu.layout_cast(jnp.full((ROWS,), -1e30, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l = plgpu.layout_cast(jnp.full((ROWS,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc = plgpu.layout_cast(jnp.full((ROWS, half), 0.0, jnp.float32), plgpu.Layout.WGMMA)
            plgpu.barrier_wait(q_loaded)
            if sparse:
                plgpu.barrier_wait(gather[1])

            def step(i, carry):
                acc, m, l = carry
                slot = lax.rem(i, jnp.int32(stages))
                plgpu.barrier_wait(loaded.at[slot])

                def qk(s_ref):
                    for part in range(_COMPUTE_WGS):
                        plgpu.wgmma(s_ref, qc_smem.at[part], c_smem.at[slot, part].transpose((1, 0)))
                    plgpu.wgmma(s_ref, qr_smem, r_smem.at[slot].transpose((1, 0)))
                    return s_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((ROWS, bk), jnp.float32))
                if sparse:      # -1: the listed slot is not visible (or padding)
                    listed = plgpu.load(gather[0].at[i], layout=plgpu.Layout.WGMMA.reduce(0))
                    bias = jnp.where(listed >= 0, 0.0, -jnp.inf)
                else:
                    bias = plgpu.load(mask_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                s = s * c2 + lax.broadcast_in_dim(bias, s.shape, [1])
                m_new = jnp.maximum(m, s.max(axis=1))
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l = l * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)

                def pv(acc_ref):
                    mma(acc_ref, p16, c_smem.at[slot, wg])

                acc = accumulate(pv, acc, interpret=interpret)
                plgpu.barrier_arrive(consumed.at[slot])
                return acc, m_new, l

            acc, m, l = lax.fori_loop(0, n, step, (acc, m, l))
            # both consumers are done reading the query tile: its c halves take the output
            plgpu.barrier_arrive(done)
            plgpu.barrier_wait(done)
            # l >= 1 wherever a slot is visible; rows that see none: acc = 0, l = 0
            inv = 1.0 / jnp.maximum(l, 1e-30)
            qc_smem.at[wg][...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dtype)

            @pl.when(wg == 0)
            def _():
                lse_smem[...] = (m + jnp.log2(l)) * (1.0 / LOG2E)     # -inf where l = 0

            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qc_smem.at[wg], o_ref.at[bi, sp, ti, heads, pl.ds(wg * half, half)])

            @pl.when(wg == 0)
            def _():
                plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, sp, ti, heads])

            plgpu.wait_smem_to_gmem(0)

        def row_dst(ring, view, slot, r, col):
            """Row `r`, columns `[col, col + 64)` of ring tile `slot` (`ring [stages, bk, d]`,
            tiled (8, 64)) as a TMA destination: compiled, the same bytes through `view`
            (`[stages, bk / 8, d / 64, 8, 64]`, swizzled, untiled: Mosaic GPU refuses a
            one-row slice of a tiled ref); interpreted, `ring` itself (the interpreter keeps
            logical arrays and does not alias `RefUnion` members)."""
            if interpret:
                return ring.at[slot, pl.ds(r, 1), pl.ds(col, _GATHER_COLS)]
            return view.at[slot, lax.div(r, 8), col // _GATHER_COLS, pl.ds(lax.rem(r, 8), 1)]

        def gather_tile(i, slot):
            """Ring tile `slot` <- the listed rows of the split's tile `i`, one TMA copy per
            row and 64 columns (Hopper's TMA has no row gather), issued by the producer's
            four warps (rows `warp + 4 k`)."""
            slots_smem, _, (c_view, r_view) = gather

            def row(r, slot_of_r):
                src = pl.ds(slot_of_r, 1)
                for part in range(_COMPUTE_WGS):
                    for col in range(0, half, _GATHER_COLS):
                        view = None if c_view is None else c_view.at[:, part]
                        dst = row_dst(c_smem.at[:, part], view, slot, r, col)
                        plgpu.copy_gmem_to_smem(c_ref.at[bi, src, pl.ds(part * half + col, _GATHER_COLS)],
                                                dst, loaded.at[slot])
                for col in range(0, dr, _GATHER_COLS):
                    plgpu.copy_gmem_to_smem(r_ref.at[bi, src, pl.ds(col, _GATHER_COLS)],
                                            row_dst(r_smem, r_view, slot, r, col), loaded.at[slot])

            @pl.loop(0, bk, step=_WARPS)
            def _(r0):
                # warp-level code loads no SMEM: each warp's slot is picked from four scalars
                listed = [jnp.maximum(slots_smem[i, r0 + w], 0) for w in range(_WARPS)]

                @plgpu.warp_map
                def _(warp):
                    pick = listed[0]
                    for w in range(1, _WARPS):
                        pick = jnp.where(warp == w, listed[w], pick)
                    row(r0 + warp, pick)

        @pl.when(wg == _COMPUTE_WGS)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            for part in range(_COMPUTE_WGS):
                plgpu.copy_gmem_to_smem(q_ref.at[bi, ti, heads, pl.ds(part * half, half)],
                                        qc_smem.at[part], q_loaded)
            plgpu.copy_gmem_to_smem(q_ref.at[bi, ti, heads, pl.ds(dc, dr)], qr_smem, q_loaded)
            if sparse:
                slots_smem, slots_loaded, _ = gather
                plgpu.copy_gmem_to_smem(listing_ref.at[bi, ti, pl.ds(lo, geo.per_split)], slots_smem,
                                        slots_loaded)
                plgpu.barrier_wait(slots_loaded)

            def load(i, slot):
                j = lo + i
                if sparse:
                    gather_tile(i, slot)
                else:
                    rows = pl.ds(j * bk, bk)      # past slot S: zero-filled (TMA), masked
                    for part in range(_COMPUTE_WGS):
                        plgpu.copy_gmem_to_smem(c_ref.at[bi, rows, pl.ds(part * half, half)],
                                                c_smem.at[slot, part], loaded.at[slot])
                    plgpu.copy_gmem_to_smem(r_ref.at[bi, rows], r_smem.at[slot], loaded.at[slot])
                    plgpu.copy_gmem_to_smem(listing_ref.at[bi, ti, pl.ds(j * bk, bk)], mask_smem.at[slot],
                                            loaded.at[slot])

            for slot in range(stages):      # a split may have fewer than `stages` tiles
                pl.when(slot < n)(lambda slot=slot: load(slot, slot))

            @pl.loop(0, jnp.maximum(n - stages, 0))
            def _(i):
                slot = lax.rem(i, jnp.int32(stages))
                plgpu.barrier_wait(consumed.at[slot])
                load(i + stages, slot)

            if interpret:
                observe_last_phases((consumed,), n, stages)

    def entry(*refs):
        q_ref, c_ref, r_ref, listing_ref, o_ref, lse_ref = refs
        tr_c, tr_r = smem_transforms(plgpu, half, dtype), smem_transforms(plgpu, dr, dtype)
        ring = (plgpu.SMEM((stages, _COMPUTE_WGS, bk, half), dtype, transforms=tr_c),
                plgpu.SMEM((stages, bk, dr), dtype, transforms=tr_r))
        if sparse and not interpret:
            # the ring's bytes again, as 64-column row chunks: the gather's TMA destinations
            swz = (plgpu.SwizzleTransform(tr_c[1].swizzle),)
            views = (plgpu.SMEM((stages, _COMPUTE_WGS, bk // 8, half // _GATHER_COLS, 8, _GATHER_COLS),
                                dtype, transforms=swz),
                     plgpu.SMEM((stages, bk // 8, dr // _GATHER_COLS, 8, _GATHER_COLS), dtype,
                                transforms=swz))
            ring = (plgpu.RefUnion(ring, views),)
        scratch = (
            plgpu.SMEM((_COMPUTE_WGS, ROWS, half), dtype, transforms=tr_c),
            plgpu.SMEM((ROWS, dr), dtype, transforms=tr_r),
            *ring,
            *(() if sparse else (plgpu.SMEM((stages, bk), jnp.float32),)),     # the masks
            plgpu.SMEM((ROWS,), jnp.float32),
        )
        gather = (plgpu.SMEM((geo.per_split, bk), jnp.int32),                   # the split's slot list
                  plgpu.Barrier(num_arrivals=1)) if sparse else ()

        def scoped(smem, *bars):
            gather = None
            if sparse:
                *bars, slots_smem, slots_loaded = bars
                views = (None, None)
                qc, qr, *ring, lse = smem
                if not interpret:               # the RefUnion: (c, r) and their row views
                    (ring, views), = ring
                smem = (qc, qr, *ring, None, lse)
                gather = (slots_smem, slots_loaded, views)
            body(q_ref, c_ref, r_ref, listing_ref, o_ref, lse_ref, smem, bars, gather)

        pl.run_scoped(
            scoped,
            scratch,
            plgpu.Barrier(num_arrivals=_COMPUTE_WGS + 1),                       # q: 3 copies
            plgpu.Barrier(num_arrivals=per_tile, num_barriers=stages),          # a tile's copies
            plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
            plgpu.Barrier(num_arrivals=_COMPUTE_WGS),
            *gather,
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct((b, geo.num_splits, t, h, dc), dtype),
                  jax.ShapeDtypeStruct((b, geo.num_splits, t, h), jnp.float32)),
        # rows minor-most: CUDA's x dimension (2^31 - 1 blocks; y and z stop at 65535), so a
        # prefill's T * H / 64 rows fit, and consecutive CTAs take consecutive query tokens
        grid=(b, geo.num_splits, t * groups),
        grid_names=("batch", "split", "row"),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),
        kernel_name="mla_decode_mosaic_gpu_gather" if sparse else "mla_decode_mosaic_gpu",
        interpret=interpret,
    )(q, c_kv, k_rope, listing)


def check_supported(q_abs, c_kv, k_rope, indices, interpret, config: MlaDecodeMosaicGpuConfig):
    """ValueError for anything the kernel does not cover (nothing is compiled)."""
    def no(what):
        raise ValueError(f"mla_decode impl='mosaic_gpu' does not support {what}; use impl='triton'")

    reason = interpret_reason("mosaic_gpu", interpret)
    if reason:
        raise ValueError(f"mla_decode impl='mosaic_gpu': {reason}")
    if jnp.dtype(q_abs.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        no(f"dtype {q_abs.dtype} (bf16 / fp16 only)")
    h, dc, dr = q_abs.shape[2], c_kv.shape[2], k_rope.shape[2]
    if h % ROWS:
        no(f"H={h} heads (a multiple of {ROWS}, the wgmma M tile)")
    if dc % 128 or dc > 512:
        no(f"Dc={dc} (a multiple of 128 up to 512)")
    if dr % 64:
        no(f"Dr={dr} (a multiple of 64)")
    need = smem_bytes(dc, dr, config.block_k, config.max_concurrent_steps, q_abs.dtype.itemsize)
    if need > SMEM_BYTES:
        no(f"block_k={config.block_k} x {config.max_concurrent_steps} stages at Dc={dc}, Dr={dr} "
           f"({need} B of SMEM > {SMEM_BYTES})")


def gather_selected(q_abs, c_kv, k_rope, indices, q_positions, kv_positions, block_k: int):
    """The sparse call as a dense one over per-query caches: `(q [B * T, 1, H, Dc + Dr],
    c [B * T, N, Dc], r [B * T, N, Dr], q_positions [B * T, 1], kv_positions [B * T, N])`
    with the listed rows of `indices [B, T, K]` (N: K rounded up to a multiple of 8 and to
    `block_k`, so the kernel reads them in place); padding entries (-1) get position -1."""
    b, t, k = indices.shape
    n = max(round_up(k, 8), block_k)
    idx = pad_axis(indices, n, 2, -1)
    listed = (idx >= 0) & (idx < c_kv.shape[1])
    slots = jnp.where(listed, idx, 0).reshape(b, t * n)
    take = jax.vmap(lambda x, i: x[i])                                    # per batch row
    rows = lambda x: take(x, slots).reshape(b * t, n, *x.shape[2:])  # noqa: E731
    kp = jnp.where(listed.reshape(b, t * n), take(kv_positions, slots), -1).reshape(b * t, n)
    return (q_abs.reshape(b * t, 1, *q_abs.shape[2:]), rows(c_kv), rows(k_rope),
            q_positions.reshape(b * t, 1), kp)


def selected_slots(indices, q_positions, kv_positions, geo: Geometry):
    """The in-kernel gather's slot lists from `indices [B, T, K]`: int32 `[B, T, splits *
    per_split, block_k]`, the listed cache slot where it is visible to the query (listed,
    position >= 0 and <= the query's, a valid query), else -1 (as the padding past K)."""
    b, t, k = indices.shape
    listed = (indices >= 0) & (indices < kv_positions.shape[1])
    slots = jnp.where(listed, indices, 0).astype(jnp.int32)
    kp = jax.vmap(lambda p, i: p[i])(kv_positions, slots)
    qp = q_positions[:, :, None]
    slots = jnp.where(listed & (kp >= 0) & (kp <= qp) & (qp >= 0), slots, -1)
    tiles = geo.num_splits * geo.per_split
    return pad_axis(slots, tiles * geo.block_k, 2, -1).reshape(b, t, tiles, geo.block_k)


def gathers_in_kernel(geo: Geometry, itemsize: int) -> bool:
    """Whether the kernel can gather a sparse call's rows itself: a split's slot list
    (`[per_split, block_k]` int32, one TMA box of at most 256 rows) fits in SMEM beside the
    ring; else the rows are gathered by XLA first (`gather_selected`)."""
    need = smem_bytes(geo.dc, geo.dr, geo.block_k, geo.stages, itemsize, slot_tiles=geo.per_split)
    return geo.per_split <= 256 and need <= SMEM_BYTES


def mla_decode_mosaic_gpu(q_abs, c_kv, k_rope, *, indices, q_positions, kv_positions, scale,
                          return_lse, num_splits, interpret=False,
                          config: MlaDecodeMosaicGpuConfig | None = None):
    """`mla_decode_reference`'s contract (see the module docstring's scope) on Hopper, or on
    the CPU in GPU interpret mode (`interpret=plgpu.InterpretGPUParams()`). Forward. Sparse
    calls gather their listed rows in the kernel (`gathers_in_kernel`), else run densely
    over rows gathered by XLA (`gather_selected`)."""
    cfg = config or MlaDecodeMosaicGpuConfig()
    check_supported(q_abs, c_kv, k_rope, indices, interpret, cfg)
    b, t, h, _ = q_abs.shape
    sparse = False
    if indices is not None:
        geo = geometry(q_abs, c_kv, k_rope, cfg, num_splits, slots=indices.shape[2])
        if cfg.gather_in_kernel and num_splits is None:     # more splits while a slot list does not fit
            fits = (geometry(q_abs, c_kv, k_rope, cfg, n, slots=indices.shape[2])
                    for n in range(geo.num_splits, geo.tiles + 1))
            geo = next((g for g in fits if gathers_in_kernel(g, q_abs.dtype.itemsize)), geo)
        sparse = cfg.gather_in_kernel and gathers_in_kernel(geo, q_abs.dtype.itemsize)
        if not sparse:
            q_abs, c_kv, k_rope, q_positions, kv_positions = gather_selected(
                q_abs, c_kv, k_rope, indices, q_positions, kv_positions, cfg.block_k)
    if sparse:
        listing = selected_slots(indices, q_positions, kv_positions, geo)
    else:
        geo = geometry(q_abs, c_kv, k_rope, cfg, num_splits)
        c_kv, k_rope = pad_axis(c_kv, geo.s, 1), pad_axis(k_rope, geo.s, 1)   # no-ops unless S % 8 or S < block_k
        listing = tile_mask(q_positions, kv_positions, geo)
    o_part, lse_part = _kernel_call(q_abs, c_kv, k_rope, listing, sparse=sparse, geo=geo, scale=float(scale),
                                    interpret=interpret or None)
    out, lse = merge(o_part, lse_part, t=q_abs.shape[1], h=h, dc=geo.dc, dtype=q_abs.dtype)
    if q_abs.shape[0] != b:             # gathered by XLA: [B * T, 1, ...] -> [B, T, ...]
        out, lse = out.reshape(b, t, h, geo.dc), lse.reshape(b, t, h).transpose(0, 2, 1)
    return AttentionOutput(out, lse) if return_lse else out


# Backend declaration for `pallas_kernels.common.resolve`: Hopper only; the calls
# `check_supported` accepts; tiles `MlaDecodeMosaicGpuConfig`.
CONFIG = MlaDecodeMosaicGpuConfig


def supports(*, q_abs, c_kv, k_rope, indices, interpret, config, **_) -> str | None:
    """None when the kernel covers the call, else `check_supported`'s reason."""
    try:
        check_supported(q_abs, c_kv, k_rope, indices, interpret, config or MlaDecodeMosaicGpuConfig())
    except ValueError as e:
        return str(e)
    return None
