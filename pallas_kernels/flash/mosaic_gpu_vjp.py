"""`flash` backward on Hopper: Pallas with the Mosaic GPU lowering (`wgmma`, TMA, warp
specialisation), in one of two plans (`MosaicGPUBackwardConfig.fused_dq`). Each kernel has
two consumer warpgroups and one producer warpgroup that streams tiles by TMA through a
`stages`-deep SMEM ring (a "loaded" barrier per slot for TMA completion, a "consumed"
barrier per slot that both consumers arrive at).

Two kernels (default), the FlashAttention-2 backward (arXiv 2307.08691, Alg. 2) with no
atomics, 7 matmuls per (query tile, KV tile) pair:

* dQ: one CTA per (head, pair of 64-row query tiles, batch). Each consumer keeps its
  `q, dO [64, D]`, `lse2, delta [64]` in SMEM and `dq [64, D]` in float32 registers and
  loops over the KV tiles its rows see: `S = Q K^T`, `P = exp2(S c - lse2)`,
  `dP = dO V^T`, `dS = P (dP - delta)`, `dQ += dS K`.
* dK/dV: one CTA per (KV head, pair of 64-row KV tiles, batch). Each consumer keeps its
  `k, v [64, D]` in SMEM and `dk, dv [64, D]` in float32 registers; the producer streams
  `q, dO, lse2, delta` of every query head of the GQA group and every query tile that sees
  the KV rows (the group's gradients are summed on chip; KV is never repeated):
  `S^T = K Q^T`, `P^T = exp2(S^T c - lse2)`, `dV += P^T dO`, `dP^T = V dO^T`,
  `dS^T = P^T (dP^T - delta)`, `dK += dS^T Q`.

One kernel (`fused_dq=True`), the FlashAttention-3 backward (arXiv 2407.08608), 5 matmuls
per pair: the dK/dV kernel also writes `dS^T` (bf16) to SMEM and computes the CTA's
float32 `dQ` tile `dS K [64, D]` for each query tile it visits, which the consumers
reduce-add into a zeroed float32 `[B, Tq, H, D]` buffer in global memory by TMA
(`copy_smem_to_gmem(..., reduction_op="add")`); every KV tile's (and, with
`dkv_head_split`, every CTA's) contributions add there, then XLA scales and casts it. At
D = 128 each consumer computes half of dQ's columns from both consumers' dS^T and K (a
consumer barrier between the dS^T writes and the matmul; dS^T double-buffered), so a CTA
reduce-adds one `[64, D]` tile per query tile; at D = 64 each consumer adds its own.
SMEM at D = 128: 193 KiB with 2 stages, 225 KiB with 3 (of 227). Only `block_q_dkv = 64`.

The mask is the forward's static `mosaic_gpu_mask.MaskSpec` (causal, window, keys at
`stride * j + offset`, padded keys): tiles no element of which is visible are never
loaded, and only tiles not wholly visible evaluate the element mask. `lse2` (base-2
log-sum-exp; huge where a row sees nothing, so P = 0 there) and `delta = rowsum(dO * O) -
dlse` come from `autodiff` (the cotangent of the lse output is folded into `delta`).
Scope: the forward's (`mosaic_gpu.check_supported`, lengths padded there to 128 and the
tiles). Sink logits only add to the denominator, so they live in `lse2` and `autodiff`.
Under GPU interpret mode (tests), which in JAX 0.11.2 has no TMA reduction, the fused plan
stores each (KV tile, consumer)'s dQ tiles into its own zeroed copy of the buffer, and XLA
sums the copies (`_dkv_call`); the compiled kernel is unchanged by this.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash.mosaic_gpu_mask import MaskSpec, walk_tiles
from pallas_kernels.tiles_common import LOG2E
from pallas_kernels.tiles_mosaic_gpu import (SMEM_BYTES, accumulate, mma, observe_last_phases,
                                              smem_transforms)

COMPUTE_WGS = 2
TILE = 64          # rows of one wgmma M tile: each consumer owns 64 query (dQ) or KV (dK/dV) rows


@dataclasses.dataclass(frozen=True)
class MosaicGPUBackwardConfig:
    """Tiles of the Mosaic GPU backward: `block_kv_dq` KV columns per dQ step,
    `block_q_dkv` query columns per dK/dV step (multiples of 64), `stages` ring depth.
    `dkv_min_ctas`: when the dK/dV grid (kv heads x KV tiles of 128 x batch) is smaller,
    each GQA group's query heads are split over several CTAs per KV tile (`dkv_head_split`;
    short key axes such as NSA's compressed keys), their partial sums added in float32.
    `fused_dq`: the one-kernel FlashAttention-3 plan (dQ reduce-added from the dK/dV
    kernel; needs `block_q_dkv == 64` for SMEM) instead of the two-kernel one (at D = 128
    the consumers split dQ's columns, FA3's way, a consumer barrier per step; at D = 64 each
    reduce-adds its own keys' `dS K`; H100, 64K, 64 / 4 heads: 0.83x cuDNN forward + backward
    against the two-kernel plan's 0.92x, and 0.66x with D = 128's columns unsplit, a choice
    dropped since). `dkv_two_rounds`: the dK/dV kernel issues
    `dP^T = V dO^T` with `S^T = K Q^T` and `dV += P^T dO` with `dK += dS^T Q` (and dQ's
    part): two wgmma waits per step instead of three, more registers live."""

    block_kv_dq: int = 64
    block_q_dkv: int = 64
    stages: int = 2
    dkv_min_ctas: int = 264          # two waves of an H100 / H200's 132 SMs
    fused_dq: bool = False
    dkv_two_rounds: bool = False

    def __post_init__(self):
        for name in ("block_kv_dq", "block_q_dkv"):
            val = getattr(self, name)
            if val < 64 or val % 64:
                raise ValueError(f"{name} must be a positive multiple of 64, got {val}")
        if self.stages < 2:
            raise ValueError(f"stages must be >= 2, got {self.stages}")
        if self.dkv_min_ctas < 1:
            raise ValueError(f"dkv_min_ctas must be >= 1, got {self.dkv_min_ctas}")
        if self.fused_dq and self.block_q_dkv != TILE:
            raise ValueError(f"fused_dq needs block_q_dkv == {TILE} (SMEM), got {self.block_q_dkv}")


def dkv_head_split(group: int, ctas: int, min_ctas: int) -> int:
    """CTAs per (KV tile, kv head) of the dK/dV kernel: the smallest divisor of the GQA
    group `group` that brings `ctas` (the unsplit grid) to `min_ctas`, else `group`."""
    for split in range(1, group + 1):
        if group % split == 0 and ctas * split >= min_ctas:
            return split
    return group


def _dq_call(q, k, v, do, lse2, delta, *, spec: MaskSpec, scale: float,
             cfg: MosaicGPUBackwardConfig, interpret=None):
    """dq `[B, Tq, H, D]` (q's dtype). `interpret`: None (compiled) or `InterpretGPUParams`."""
    import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415 - GPU-only import

    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    group = h // hkv
    dtype = q.dtype
    bq, bk = TILE, cfg.block_kv_dq
    nk = tk // bk
    stages = min(cfg.stages, nk)
    nq = tq // (COMPUTE_WGS * bq)
    c = float(scale) * LOG2E
    layout_row = plgpu.Layout.WGMMA.reduce(1)

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, scoped):
        (q_smem2, do_smem2, lse_smem2, delta_smem2, k_smem, v_smem), loaded, consumed = scoped
        k_loaded, v_loaded, q_loaded, do_loaded, lse_loaded, delta_loaded = loaded
        k_consumed, v_consumed = consumed
        bi = lax.axis_index("batch")
        hi = lax.axis_index("heads")
        wg = lax.axis_index("wg")
        tile = nq - 1 - lax.axis_index("q_seq")       # heaviest (causal) tiles first
        row_cta = tile * (COMPUTE_WGS * bq)
        # KV tiles any row of this CTA sees (both consumers run them all), mask-free inside
        j_lo, j_full_lo, j_full_hi, n_steps = spec.kv_tiles(row_cta, COMPUTE_WGS * bq, bk)

        @pl.when(wg < COMPUTE_WGS)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
            lse_smem, delta_smem = lse_smem2.at[wg], delta_smem2.at[wg]
            row0 = row_cta + wg * bq
            plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(row0, bq), hi], q_smem, q_loaded.at[wg])
            plgpu.copy_gmem_to_smem(do_ref.at[bi, pl.ds(row0, bq), hi], do_smem, do_loaded.at[wg])
            plgpu.copy_gmem_to_smem(lse_ref.at[bi, hi, pl.ds(row0, bq)], lse_smem,
                                    lse_loaded.at[wg])
            plgpu.copy_gmem_to_smem(delta_ref.at[bi, hi, pl.ds(row0, bq)], delta_smem,
                                    delta_loaded.at[wg])
            for bar in (q_loaded, do_loaded, lse_loaded, delta_loaded):
                plgpu.barrier_wait(bar.at[wg])
            lse = plgpu.load(lse_smem, layout=layout_row)
            dlt = plgpu.load(delta_smem, layout=layout_row)
            dq = plgpu.layout_cast(jnp.full((bq, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)

            def step(j, dq, masked):
                slot = lax.rem(j - j_lo, jnp.int32(stages))
                plgpu.barrier_wait(k_loaded.at[slot])

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
                p = jnp.exp2(s * c - lax.broadcast_in_dim(lse, s.shape, [0]))
                if masked:
                    rows = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0, layout=plgpu.Layout.WGMMA)
                    cols = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=plgpu.Layout.WGMMA)
                    p = jnp.where(spec.visible(rows + row0, cols + j * bk), p, 0.0)
                plgpu.barrier_wait(v_loaded.at[slot])

                def dov(acc_ref):
                    plgpu.wgmma(acc_ref, do_smem, v_smem.at[slot].transpose((1, 0)))
                    return acc_ref[...]

                dp = pl.run_scoped(dov, plgpu.ACC((bq, bk), jnp.float32))
                plgpu.barrier_arrive(v_consumed.at[slot])
                ds = (p * (dp - lax.broadcast_in_dim(dlt, dp.shape, [0]))).astype(dtype)

                def dsk(acc_ref):
                    mma(acc_ref, ds, k_smem.at[slot])

                dq = accumulate(dsk, dq, interpret=interpret)
                plgpu.barrier_arrive(k_consumed.at[slot])
                return dq

            dq = walk_tiles((j_lo, j_full_lo, j_full_hi, n_steps), step, dq)
            q_smem[...] = (dq * scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[bi, pl.ds(row0, bq), hi])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == COMPUTE_WGS)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(hi, jnp.int32(group))

            @pl.loop(j_lo, n_steps)
            def _(j):
                slot = lax.rem(j - j_lo, jnp.int32(stages))
                sl = (bi, pl.ds(j * bk, bk), kv_head)

                @pl.when(j - j_lo >= stages)
                def _():
                    plgpu.barrier_wait(k_consumed.at[slot])

                plgpu.copy_gmem_to_smem(k_ref.at[sl], k_smem.at[slot], k_loaded.at[slot])

                @pl.when(j - j_lo >= stages)
                def _():
                    plgpu.barrier_wait(v_consumed.at[slot])

                plgpu.copy_gmem_to_smem(v_ref.at[sl], v_smem.at[slot], v_loaded.at[slot])

            if interpret:
                observe_last_phases((k_consumed, v_consumed), n_steps - j_lo, stages)

    def entry(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref):
        tr = smem_transforms(plgpu, d, dtype)
        scratch = (
            plgpu.SMEM((COMPUTE_WGS, bq, d), dtype, transforms=tr),
            plgpu.SMEM((COMPUTE_WGS, bq, d), dtype, transforms=tr),
            plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),
            plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32),
            plgpu.SMEM((stages, bk, d), dtype, transforms=tr),
            plgpu.SMEM((stages, bk, d), dtype, transforms=tr),
        )
        pl.run_scoped(
            lambda *a: body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, a),
            scratch,
            (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages))
            + (plgpu.Barrier(num_barriers=COMPUTE_WGS),) * 4,
            (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),) * 2,
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        grid=(h, nq, b),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        kernel_name="flash_bwd_dq_mosaic_gpu",
        interpret=interpret,
    )(q, k, v, do, lse2, delta)


def _dkv_call(q, k, v, do, lse2, delta, *, spec: MaskSpec, scale: float,
              cfg: MosaicGPUBackwardConfig, interpret=None):
    """dk, dv `[B, Tk, Hkv, D]` (k's dtype): the GQA group's query heads summed on chip, or,
    split over `dkv_head_split` CTAs, each part's sum in k's dtype, added in float32 here.
    With `cfg.fused_dq`, also dq `[B, Tq, H, D]` (q's dtype): each consumer reduce-adds its
    float32 `dS K` tiles into a zeroed `[B, Tq, H, D]` buffer (TMA `reduction_op="add"`),
    scaled and cast here. `interpret`: None (compiled) or `InterpretGPUParams`; JAX 0.11.2's
    interpreter has no TMA reduction, so there each (KV tile, consumer) stores its tiles
    into its own copy of the buffer (`[2 * nkt * B, Tq, H, D]`, zeroed), summed here."""
    import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415 - GPU-only import

    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    group = h // hkv
    dtype = q.dtype
    bk, bq = TILE, cfg.block_q_dkv
    nq = tq // bq
    nkt = tk // (COMPUTE_WGS * bk)
    stages = cfg.stages
    split = dkv_head_split(group, hkv * nkt * b, cfg.dkv_min_ctas)
    heads = group // split                 # query heads per CTA
    c = float(scale) * LOG2E
    layout_col = plgpu.Layout.WGMMA.reduce(0)
    fused = cfg.fused_dq
    dq_copies = COMPUTE_WGS * nkt if interpret else 1      # of the dq buffer (see above)
    # fused dQ: consumer w computes dq columns [w * dq_cols, (w + 1) * dq_cols) from both
    # consumers' dS and K when they split into whole swizzle tiles (64 columns), else its own
    # full rows
    col_split = d % (COMPUTE_WGS * 64) == 0
    two_rounds = cfg.dkv_two_rounds
    dq_cols = d // COMPUTE_WGS if col_split else d

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_acc, dk_ref, dv_ref, scoped):
        (k_smem2, v_smem2, q_smem, do_smem, lse_smem, delta_smem, *fused_smem), loaded, consumed, \
            *sync = scoped
        k_loaded, v_loaded, q_loaded, do_loaded, lse_loaded, delta_loaded = loaded
        bi = lax.axis_index("batch")
        hk = lax.div(lax.axis_index("heads"), jnp.int32(split))
        part = lax.rem(lax.axis_index("heads"), jnp.int32(split))     # of the GQA group
        out_row = part * b + bi                                      # of dk / dv [split*B, ...]
        wg = lax.axis_index("wg")
        tile = lax.axis_index("kv_seq")
        kv_cta = tile * (COMPUTE_WGS * bk)
        # query tiles [i_lo, i_hi) see the CTA's keys, [i_full_lo, i_full_hi) mask-free
        i_lo, i_full_lo, i_full_hi, i_hi = spec.q_tiles(kv_cta, COMPUTE_WGS * bk, bq, nq)
        n_vis = i_hi - i_lo                                # query tiles per head

        @pl.when(wg < COMPUTE_WGS)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
            kv0 = kv_cta + wg * bk
            plgpu.copy_gmem_to_smem(k_ref.at[bi, pl.ds(kv0, bk), hk], k_smem, k_loaded.at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[bi, pl.ds(kv0, bk), hk], v_smem, v_loaded.at[wg])
            plgpu.barrier_wait(k_loaded.at[wg])
            plgpu.barrier_wait(v_loaded.at[wg])
            zeros = plgpu.layout_cast(jnp.full((bk, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)

            def sync_consumers():
                plgpu.barrier_arrive(sync[0])
                plgpu.barrier_wait(sync[0])

            def stage_ds(s, dst):
                """Writes this consumer's dS^T (step s) to SMEM, returns its buffer pair."""
                ds_smem2 = fused_smem[0].at[lax.rem(s, 2)]
                ds_smem2.at[wg][...] = dst          # two buffers: the other consumer may
                plgpu.commit_smem()                 # still read the last step's
                if col_split:
                    sync_consumers()                # both dS^T written
                return ds_smem2

            def dq_mma(dq_ref, ds_smem2):
                """dq_ref += this consumer's part of `dS K`: its columns of both consumers'
                (col_split), else its own rows'."""
                srcs = range(COMPUTE_WGS) if col_split else [wg]
                for j in srcs:
                    k_part = k_smem2.at[j, :, pl.ds(wg * dq_cols, dq_cols)] if col_split else k_smem
                    mma(dq_ref, ds_smem2.at[j].transpose((1, 0)), k_part)

            def reduce_dq(dq, i, qh):
                """Reduce-adds this consumer's dQ part (query tile i of head qh) into dq_acc."""
                dq_tile = fused_smem[1].at[wg]
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)     # the last tile's read
                dq_tile[...] = dq
                plgpu.commit_smem()
                copy = (tile * COMPUTE_WGS + wg) * b if interpret else 0
                dst_cols = pl.ds(wg * dq_cols if col_split else 0, dq_cols)
                plgpu.copy_smem_to_gmem(
                    dq_tile, dq_acc.at[copy + bi, pl.ds(i * bq, bq), qh, dst_cols],
                    reduction_op=None if interpret else "add")

            def step(s, i, qh, carry, masked):
                dk, dv = carry
                slot = lax.rem(s, jnp.int32(stages))
                plgpu.barrier_wait(q_loaded.at[slot])

                def zeros_t():
                    return plgpu.layout_cast(jnp.full((bk, bq), 0.0, jnp.float32),
                                             plgpu.Layout.WGMMA)

                if two_rounds:      # S^T and dP^T together
                    plgpu.barrier_wait(do_loaded.at[slot])

                    def kq_and_dpt(refs):
                        st_ref, dpt_ref = refs
                        mma(st_ref, k_smem, q_smem.at[slot].transpose((1, 0)))
                        mma(dpt_ref, v_smem, do_smem.at[slot].transpose((1, 0)))

                    st, dpt = accumulate(kq_and_dpt, (zeros_t(), zeros_t()), interpret=interpret)
                else:
                    def kq(acc_ref):
                        plgpu.wgmma(acc_ref, k_smem, q_smem.at[slot].transpose((1, 0)))
                        return acc_ref[...]

                    st = pl.run_scoped(kq, plgpu.ACC((bk, bq), jnp.float32))
                plgpu.barrier_wait(lse_loaded.at[slot])
                lse = plgpu.load(lse_smem.at[slot], layout=layout_col)
                pt = jnp.exp2(st * c - lax.broadcast_in_dim(lse, st.shape, [1]))
                if masked:
                    rows = plgpu.broadcasted_iota(jnp.int32, (bk, bq), 0, layout=plgpu.Layout.WGMMA)
                    cols = plgpu.broadcasted_iota(jnp.int32, (bk, bq), 1, layout=plgpu.Layout.WGMMA)
                    pt = jnp.where(spec.visible(cols + i * bq, rows + kv0), pt, 0.0)
                if not two_rounds:
                    plgpu.barrier_wait(do_loaded.at[slot])

                    def dv_and_dpt(refs):
                        dv_ref, dpt_ref = refs
                        mma(dv_ref, pt.astype(dtype), do_smem.at[slot])
                        mma(dpt_ref, v_smem, do_smem.at[slot].transpose((1, 0)))

                    dv, dpt = accumulate(dv_and_dpt, (dv, zeros_t()), interpret=interpret)
                plgpu.barrier_wait(delta_loaded.at[slot])
                dlt = plgpu.load(delta_smem.at[slot], layout=layout_col)
                dst = (pt * (dpt - lax.broadcast_in_dim(dlt, dpt.shape, [1]))).astype(dtype)

                ds_smem2 = stage_ds(s, dst) if fused else None

                def dsq(refs):      # and, fused, dQ's part (two rounds: dV): issued together
                    dk_ref, dq_ref, dv_ref = refs if fused or two_rounds else (refs, None, None)
                    mma(dk_ref, dst, q_smem.at[slot])
                    if fused:
                        dq_mma(dq_ref, ds_smem2)
                    if two_rounds:
                        mma(dv_ref, pt.astype(dtype), do_smem.at[slot])

                accs = [dk]
                if fused or two_rounds:
                    accs += [plgpu.layout_cast(jnp.full((bq, dq_cols), 0.0, jnp.float32),
                                               plgpu.Layout.WGMMA) if fused else None,
                             dv if two_rounds else None]
                    dk, dq, dv2 = accumulate(dsq, accs, interpret=interpret)
                    dv = dv2 if two_rounds else dv
                else:
                    dk = accumulate(dsq, dk, interpret=interpret)
                plgpu.barrier_arrive(consumed.at[slot])
                if fused:
                    reduce_dq(dq, i, qh)
                return dk, dv

            def head(g, carry):
                s0 = g * n_vis - i_lo          # step counter = s0 + i
                qh = hk * group + part * heads + g if fused else None     # for reduce_dq
                return walk_tiles((i_lo, i_full_lo, i_full_hi, i_hi),
                                  lambda i, cr, masked: step(s0 + i, i, qh, cr, masked), carry)

            dk, dv = lax.fori_loop(0, heads, head, (zeros, zeros))
            if fused and col_split:
                sync_consumers()                    # the other consumer's last read of k_smem
            k_smem[...] = (dk * scale).astype(dtype)
            v_smem[...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[out_row, pl.ds(kv0, bk), hk],
                                    commit_group=False)
            plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[out_row, pl.ds(kv0, bk), hk],
                                    commit_group=False)
            plgpu.commit_smem_to_gmem_group()
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == COMPUTE_WGS)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")

            @pl.loop(0, heads * n_vis)
            def _(s):
                slot = lax.rem(s, jnp.int32(stages))
                qh = hk * group + part * heads + lax.div(s, n_vis)
                i = i_lo + lax.rem(s, n_vis)
                rows = pl.ds(i * bq, bq)

                @pl.when(s >= stages)
                def _():
                    plgpu.barrier_wait(consumed.at[slot])

                plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, qh], q_smem.at[slot], q_loaded.at[slot])
                plgpu.copy_gmem_to_smem(lse_ref.at[bi, qh, rows], lse_smem.at[slot],
                                        lse_loaded.at[slot])
                plgpu.copy_gmem_to_smem(do_ref.at[bi, rows, qh], do_smem.at[slot],
                                        do_loaded.at[slot])
                plgpu.copy_gmem_to_smem(delta_ref.at[bi, qh, rows], delta_smem.at[slot],
                                        delta_loaded.at[slot])

            if interpret:
                observe_last_phases((consumed,), heads * n_vis, stages)

    def entry(*refs):
        tr = smem_transforms(plgpu, d, dtype)
        scratch = (
            plgpu.SMEM((COMPUTE_WGS, bk, d), dtype, transforms=tr),
            plgpu.SMEM((COMPUTE_WGS, bk, d), dtype, transforms=tr),
            plgpu.SMEM((stages, bq, d), dtype, transforms=tr),
            plgpu.SMEM((stages, bq, d), dtype, transforms=tr),
            plgpu.SMEM((stages, bq), jnp.float32),
            plgpu.SMEM((stages, bq), jnp.float32),
        )
        if fused:      # dS^T (wgmma operand, two buffers), each consumer's float32 dQ tile
            scratch += (
                plgpu.SMEM((2, COMPUTE_WGS, bk, bq), dtype,
                           transforms=smem_transforms(plgpu, bq, dtype)),
                plgpu.SMEM((COMPUTE_WGS, bq, dq_cols), jnp.float32,
                           transforms=smem_transforms(plgpu, dq_cols, jnp.float32)),
            )
        else:
            refs = refs[:6] + (None,) + refs[6:]        # no dq_acc
        smem = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in scratch)  # data
        if smem > SMEM_BYTES:
            raise ValueError(f"the Mosaic GPU dK/dV kernel needs {smem} B of SMEM at D={d} "
                             f"(> {SMEM_BYTES}): fewer stages or block_q_dkv ({cfg})")
        pl.run_scoped(
            lambda *a: body(*refs, a),
            scratch,
            (plgpu.Barrier(num_barriers=COMPUTE_WGS),) * 2
            + (plgpu.Barrier(num_barriers=stages),) * 4,
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
            *([plgpu.Barrier(num_arrivals=COMPUTE_WGS)] if fused and col_split else []),
            collective_axes="wg",
        )

    kv_shape = jax.ShapeDtypeStruct((split * b,) + k.shape[1:], k.dtype)
    dq_buf = (jax.new_ref(jnp.zeros((dq_copies * b, tq, h, d), jnp.float32)),) if fused else ()
    dk, dv = plgpu.kernel(
        entry,
        out_type=(kv_shape, kv_shape),
        grid=(hkv * split, nkt, b),
        grid_names=("heads", "kv_seq", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        kernel_name="flash_bwd_dkvq_mosaic_gpu" if fused else "flash_bwd_dkv_mosaic_gpu",
        interpret=interpret,
    )(q, k, v, do, lse2, delta, *dq_buf)
    if split > 1:
        def parts(x):
            return x.reshape((split,) + k.shape).astype(jnp.float32).sum(0).astype(k.dtype)

        dk, dv = parts(dk), parts(dv)
    if not fused:
        return dk, dv
    dq = dq_buf[0][...].reshape((dq_copies,) + q.shape).sum(0)
    return dk, dv, (dq * scale).astype(dtype)


def mask_kind(mask_fn) -> tuple[bool, int | None] | None:
    """`(causal, window)` of the masks the Mosaic GPU kernels hard-code, read by attribute
    (pallas_kernels imports no mask class): None -> full; `is_causal` -> causal;
    `causal_window_size = w` -> the causal window `t - w < s <= t`; anything else -> None."""
    if mask_fn is None:
        return False, None
    if getattr(mask_fn, "is_causal", False):
        return True, None
    window = getattr(mask_fn, "causal_window_size", None)
    if isinstance(window, int) and window >= 1:
        return True, window
    return None


def backward(st, q, k, v, dout, q_pos, kv_pos, q_seg, kv_seg, lse2, delta):
    """`autodiff` backward: `(dq, dk, dv)` from the residuals (`st.config.backward` tiles)."""
    del q_pos, kv_pos, q_seg, kv_seg      # static in st.kernel_mask, no segments
    cfg = st.config.backward
    dout = dout.astype(q.dtype)
    kw = dict(spec=st.kernel_mask, scale=st.scale, cfg=cfg, interpret=st.interpret or None)
    if cfg.fused_dq:
        dk, dv, dq = _dkv_call(q, k, v, dout, lse2, delta, **kw)
        return dq, dk, dv
    dq = _dq_call(q, k, v, dout, lse2, delta, **kw)
    dk, dv = _dkv_call(q, k, v, dout, lse2, delta, **kw)
    return dq, dk, dv
