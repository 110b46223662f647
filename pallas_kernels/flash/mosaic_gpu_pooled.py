"""`flash` forward on Hopper that also pools each GQA group's attention probabilities into
key blocks: NSA's compressed branch and its selection importance in one kernel
(arXiv 2502.11089 Sec. 3.3.2), Pallas with the Mosaic GPU lowering.

`flash_pooled_mosaic_gpu(q, k, v, ...)` returns the causal attention of `q [B, Tq, H, D]`
over keys at `stride * j + offset` (NSA's compressed keys at their blocks' last tokens),
`out` and `lse` exactly as `flash(impl="mosaic_gpu")` computes them, and

    pooled[b, kvh, t, J] = sum_{(o, w) in pool_offsets} w * P[b, kvh, t, r*J + o],
    P[b, kvh, t, i] = sum_{h in group kvh} exp(q_h[t] . k[i] * scale - lse_h[t])

(`r = pool_keys`; the visible keys only; out-of-range `i` ignored): for NSA `r = l'/d`
and the weights of `nsa_select.reference.overlap_weights`, the selection-block
importance `nsa_select` computes from the lse, never written per compressed key.

Layout: one CTA per (KV head, 128 query rows, batch), three warpgroups as in the flash
forward (`mosaic_gpu.py`, FlashAttention-3): the producer (warpgroup 2) TMA-streams
through three rings of `max_concurrent_steps` slots (q tiles `[2, 64, D]`, one per
consumer; K and V tiles `[128, D]`); consumers 0 and 1 each own 64 query rows.

1. Sweep 1, per head g of the group: q_g arrives in a q slot and stays there for the
   whole sweep over the K / V tiles (wgmma `Q K^T`, the online softmax of
   `tiles_mosaic_gpu.softmax_step`, wgmma `P V`); the normalised output overwrites q_g
   in its slot and goes out by TMA with the lse, which stays in SMEM for sweep 2
   (`[G, 64]` float32 per consumer).
2. Sweep 2, per K tile (K again through the ring, from L2): for each head g, its q tile
   again through the q ring (from L2) and `S = Q K^T` by wgmma, `P += exp2(S * c -
   lse2_g)` in registers (the group's sum, `[64, 128]` float32); then one pooling wgmma
   chain `P @ W` (`W [128, 128 / r]` the 0/w weights of the tile's blocks, in SMEM; P
   split into three bfloat16 pieces that sum to it exactly,
   `tiles_common.split_bf16x3`, so tensor cores lose no bit of P); the offsets below 0
   of a tile's first block come from the previous tile's last keys, carried in registers
   (a `[64]` column: offsets must lie in `[-r, r)`). The `[64, 128 / r]` tile goes out by
   TMA.

Both consumers walk all the CTA's tiles (the lower one's extra tiles are wholly masked:
no change to its softmax state, bit for bit), so every ring phase is consumed by both and
the rings run as one sequence each across heads and sweeps. With
`config.use_schedule_barrier` (default) sweep 1 ping-pongs the consumers as the flash
forward does (one's softmax under the other's wgmmas); sweep 2 runs them free.

`pooled` is not differentiated (its cotangent is dropped: NSA's selection is discrete);
`out` / `lse` take the flash backward on the same residuals (`mosaic_gpu.backward`:
Mosaic GPU, or Triton for a `TritonConfig`).

Scope (ValueError otherwise): what `mosaic_gpu.check_supported` takes, causal without a
window, `block_kv == 128`, `128 / r` a multiple of 8, offsets in `[-r, r)`, and SMEM: at
D = 128, bf16, 2 stages and r = 4, the G lse rows fit up to G = 16 (229888 B of 232448).
`interpret=plgpu.InterpretGPUParams()` runs it in GPU interpret mode (CPU tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import AttentionOutput
from pallas_kernels.flash import autodiff, mosaic_gpu
from pallas_kernels.flash.blocks import pad_axis
from pallas_kernels.flash.mosaic_gpu import MosaicGPUConfig
from pallas_kernels.flash.mosaic_gpu_mask import MaskSpec, walk_tiles
from pallas_kernels.tiles_common import LOG2E, split_bf16x3
from pallas_kernels.tiles_mosaic_gpu import (SMEM_BYTES, accumulate, mma, observe_last_phases,
                                              smem_transforms, softmax_step)

_COMPUTE_WGS = 2
_BQ = 64                      # rows per consumer (one wgmma M tile)
_BK = _COMPUTE_WGS * _BQ      # keys per K tile (the pooled tile's width is _BK / r)
_SMEM_EXTRA = 2304            # barriers and alignment, over the buffers (lowering: 2152 B)


@dataclasses.dataclass(frozen=True)
class Pooling:
    """Static pooling of one call (hashable): `keys` (r) keys per pooled block, the
    `(offset, weight)` pairs (offsets in `[-r, r)`), `blocks` pooled columns written
    (`tiles * _BK / r`)."""

    keys: int
    offsets: tuple[tuple[int, float], ...]
    tiles: int

    @property
    def width(self) -> int:
        """Pooled blocks per K tile."""
        return _BK // self.keys

    def matrix(self) -> np.ndarray:
        """`W [_BK, width]`: key i of a tile feeds its block jl with weight w where
        `i = r * jl + o` (the offsets below 0 of block 0 come from the carry)."""
        w = np.zeros((_BK, self.width), np.float32)
        for jl in range(self.width):
            for o, wt in self.offsets:
                if 0 <= self.keys * jl + o < _BK:
                    w[self.keys * jl + o, jl] += wt
        return w

    def carry(self) -> tuple[tuple[int, float], ...]:
        """`(column, weight)`: a tile's last keys feeding the next tile's block 0."""
        return tuple((_BK + o, wt) for o, wt in self.offsets if o < 0)


def smem_bytes(d: int, group: int, width: int, stages: int, itemsize: int = 2) -> int:
    """SMEM of one CTA: the q, K and V rings, W, the G lse rows and the pooled tile of each
    consumer, and what the lowering adds (barriers, alignment: 2152 B at the paper shape)."""
    return (stages * (_COMPUTE_WGS * _BQ + 2 * _BK) * d * itemsize + _BK * width * 2
            + _COMPUTE_WGS * _BQ * 4 * group + _COMPUTE_WGS * _BQ * width * 4 + _SMEM_EXTRA)


def _kernel_call(q, k, v, *, spec: MaskSpec, pool: Pooling, scale: float, stages: int,
                 schedule_barrier: bool, interpret=None):
    """q `[B, Tq, H, D]` (Tq a multiple of 128), k / v `[B, Tk, Hkv, D]` (Tk a multiple of
    128, >= `pool.tiles * 128`) -> out `[B, Tq, H, D]`, lse `[B, H, Tq]` (natural log),
    pooled `[B, Hkv, Tq, pool.tiles * width]` float32 (the tiles `_sweep2_tiles` gives
    for each CTA's rows written, the rest not)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415 - GPU-only import

    b, tq, h, d = q.shape
    hkv = k.shape[2]
    group = h // hkv
    dtype = q.dtype
    bq, bk, width = _BQ, _BK, pool.width
    nq = tq // bk
    c = float(scale) * LOG2E
    w_matrix = jnp.asarray(pool.matrix(), jnp.bfloat16)
    row_layout = plgpu.Layout.WGMMA.reduce(1)

    def body(q_ref, k_ref, v_ref, w_ref, out_ref, lse_ref, pooled_ref, scoped):
        (q_smem, k_smem, v_smem, w_smem, lse_smem, pooled_smem), loaded, consumed, \
            w_loaded, sched = scoped
        q_loaded, k_loaded, v_loaded = loaded
        q_consumed, k_consumed, v_consumed = consumed
        bi = lax.axis_index("batch")
        kvh = lax.axis_index("heads")
        wg = lax.axis_index("wg")
        row_cta = (nq - 1 - lax.axis_index("q_seq")) * bk         # heaviest (causal) tiles first
        _, _, _, n1 = spec.kv_tiles(row_cta, bk, bk)                # sweep 1: tiles [0, n1)
        n2 = _sweep2_tiles(spec, pool, row_cta + bk - 1)            # sweep 2: tiles [0, n2)

        def ring(bars, cnt):
            return bars.at[lax.rem(cnt, jnp.int32(stages))]

        def sched_sync():
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        @pl.when(wg < _COMPUTE_WGS)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            row0 = row_cta + wg * bq
            _, full_lo, full_hi, _ = spec.kv_tiles(row0, bq, bk)
            rows = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0, layout=plgpu.Layout.WGMMA) + row0
            cols = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=plgpu.Layout.WGMMA)

            def scores(q_tile, k_tile, j, masked, ping_pong=False):
                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_tile, k_tile.transpose((1, 0)))
                    if ping_pong:
                        sched_sync()
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
                return jnp.where(spec.visible(rows, cols + j * bk), s, -jnp.inf) if masked else s

            def head_forward(g, _):           # sweep 1: out and lse of head g
                slot = lax.rem(g, jnp.int32(stages))
                q_tile = q_smem.at[slot, wg]
                plgpu.barrier_wait(q_loaded.at[slot])
                m = plgpu.layout_cast(jnp.full((bq,), -1e30, jnp.float32), row_layout)
                l = plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), row_layout)
                acc = plgpu.layout_cast(jnp.full((bq, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)

                def step(j, carry, masked):
                    acc, m, l = carry
                    cnt = g * n1 + j
                    plgpu.barrier_wait(ring(k_loaded, cnt))
                    s = scores(q_tile, k_smem.at[lax.rem(cnt, jnp.int32(stages))], j, masked,
                               schedule_barrier)
                    plgpu.barrier_arrive(ring(k_consumed, cnt))
                    acc, l, m_new, p16 = softmax_step(s, m, l, acc, scale2=c, dtype=dtype)
                    if schedule_barrier:
                        plgpu.barrier_arrive(sched)          # softmax done
                    plgpu.barrier_wait(ring(v_loaded, cnt))
                    if schedule_barrier:
                        plgpu.barrier_wait(sched)            # tensor cores free
                    v_tile = v_smem.at[lax.rem(cnt, jnp.int32(stages))]
                    acc = accumulate(lambda acc_ref: mma(acc_ref, p16, v_tile), acc,
                                     interpret=interpret)
                    plgpu.barrier_arrive(ring(v_consumed, cnt))
                    return acc, m_new, l

                if schedule_barrier:
                    pl.when(wg == 1)(sched_sync)     # offset the two consumers by one phase
                acc, m, l = walk_tiles((0, full_lo, full_hi, n1), step, (acc, m, l))
                if schedule_barrier:
                    pl.when(wg == 0)(sched_sync)
                # l >= 1 wherever a key is visible; rows that see none: acc = 0, l = 0
                inv = 1.0 / jnp.maximum(l, 1e-30)
                q_tile[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dtype)
                lse_smem.at[wg, g][...] = (m + jnp.log2(l)) * (1.0 / LOG2E)   # -inf where l = 0
                plgpu.commit_smem()
                head = kvh * group + g
                plgpu.copy_smem_to_gmem(q_tile, out_ref.at[bi, pl.ds(row0, bq), head])
                plgpu.copy_smem_to_gmem(lse_smem.at[wg, g], lse_ref.at[bi, head, pl.ds(row0, bq)])
                plgpu.wait_smem_to_gmem(0)
                plgpu.barrier_arrive(q_consumed.at[slot])

            lax.fori_loop(0, group, head_forward, None)
            plgpu.barrier_wait(w_loaded)
            pcols = plgpu.broadcasted_iota(jnp.int32, (bq, width), 1, layout=plgpu.Layout.WGMMA)

            def tile_pooled(j, carry, masked):     # sweep 2: pooled tile j
                cnt_k = group * n1 + j
                plgpu.barrier_wait(ring(k_loaded, cnt_k))
                k_tile = k_smem.at[lax.rem(cnt_k, jnp.int32(stages))]

                def head_probs(g, p):
                    cnt = group + j * group + g
                    plgpu.barrier_wait(ring(q_loaded, cnt))
                    s = scores(q_smem.at[lax.rem(cnt, jnp.int32(stages)), wg], k_tile, j, masked)
                    plgpu.barrier_arrive(ring(q_consumed, cnt))
                    lse = plgpu.load(lse_smem.at[wg, g], layout=row_layout)
                    lse2 = jnp.where(lse > -jnp.inf, lse * LOG2E, 0.0)       # as nsa_select
                    return p + jnp.exp2(s * c - lax.broadcast_in_dim(lse2, s.shape, [0]))

                p = lax.fori_loop(0, group, head_probs, plgpu.layout_cast(
                    jnp.full((bq, bk), 0.0, jnp.float32), plgpu.Layout.WGMMA))
                plgpu.barrier_arrive(ring(k_consumed, cnt_k))
                pieces = split_bf16x3(p)

                def pool_mm(acc_ref):
                    for piece in pieces:
                        mma(acc_ref, piece, w_smem)

                zero = plgpu.layout_cast(jnp.full((bq, width), 0.0, jnp.float32), plgpu.Layout.WGMMA)
                tile = accumulate(pool_mm, zero, interpret=interpret)
                tile = tile + jnp.where(pcols == 0, lax.broadcast_in_dim(carry, tile.shape, [0]), 0.0)
                nxt = carry                          # no offset below 0: the carry stays 0
                for i, (col, wt) in enumerate(pool.carry()):
                    term = wt * jnp.sum(jnp.where(cols == col, p, 0.0), axis=1)
                    nxt = term if i == 0 else nxt + term
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)     # the last tile's read
                pooled_smem.at[wg][...] = tile
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(pooled_smem.at[wg],
                                        pooled_ref.at[bi, kvh, pl.ds(row0, bq), pl.ds(j * width, width)])
                return nxt

            walk_tiles((0, jnp.minimum(full_lo, n2), jnp.minimum(full_hi, n2), n2), tile_pooled,
                       plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), row_layout))
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == _COMPUTE_WGS)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            plgpu.copy_gmem_to_smem(w_ref, w_smem, w_loaded)

            def load(src, smem, loaded_bars, consumed_bars, cnt, halves):
                slot = lax.rem(cnt, jnp.int32(stages))

                @pl.when(cnt >= stages)
                def _():
                    plgpu.barrier_wait(consumed_bars.at[slot])

                if halves:        # q: one copy per consumer's rows
                    for i in range(_COMPUTE_WGS):
                        plgpu.copy_gmem_to_smem(src(i), smem.at[slot, i], loaded_bars.at[slot])
                else:
                    plgpu.copy_gmem_to_smem(src(None), smem.at[slot], loaded_bars.at[slot])

            def load_q(cnt, g):
                load(lambda i: q_ref.at[bi, pl.ds(row_cta + i * bq, bq), kvh * group + g],
                     q_smem, q_loaded, q_consumed, cnt, True)

            def load_kv(ref, smem, loaded_bars, consumed_bars, cnt, j):
                load(lambda _: ref.at[bi, pl.ds(j * bk, bk), kvh], smem, loaded_bars,
                     consumed_bars, cnt, False)

            def head_loads(g, _):
                load_q(g, g)

                def kv(j, _):
                    load_kv(k_ref, k_smem, k_loaded, k_consumed, g * n1 + j, j)
                    load_kv(v_ref, v_smem, v_loaded, v_consumed, g * n1 + j, j)

                lax.fori_loop(0, n1, kv, None)

            lax.fori_loop(0, group, head_loads, None)

            def tile_loads(j, _):
                load_kv(k_ref, k_smem, k_loaded, k_consumed, group * n1 + j, j)
                lax.fori_loop(0, group, lambda g, _: load_q(group + j * group + g, g), None)

            lax.fori_loop(0, n2, tile_loads, None)
            if interpret:
                observe_last_phases((q_consumed,), group + n2 * group, stages)
                observe_last_phases((k_consumed,), group * n1 + n2, stages)
                observe_last_phases((v_consumed,), group * n1, stages)

    def entry(q_ref, k_ref, v_ref, w_ref, out_ref, lse_ref, pooled_ref):
        tr = smem_transforms(plgpu, d, dtype)
        scratch = (
            plgpu.SMEM((stages, _COMPUTE_WGS, bq, d), dtype, transforms=tr),
            plgpu.SMEM((stages, bk, d), dtype, transforms=tr),
            plgpu.SMEM((stages, bk, d), dtype, transforms=tr),
            plgpu.SMEM((bk, width), jnp.bfloat16, transforms=smem_transforms(plgpu, width, jnp.bfloat16)),
            plgpu.SMEM((_COMPUTE_WGS, group, bq), jnp.float32),
            plgpu.SMEM((_COMPUTE_WGS, bq, width), jnp.float32,
                       transforms=smem_transforms(plgpu, width, jnp.float32)),
        )
        pl.run_scoped(
            lambda *a: body(q_ref, k_ref, v_ref, w_ref, out_ref, lse_ref, pooled_ref, a),
            scratch,
            (plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
             plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages)),
            (plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),) * 3,
            plgpu.Barrier(),
            plgpu.Barrier(num_arrivals=_COMPUTE_WGS),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct((b, tq, h, d), dtype),
                  jax.ShapeDtypeStruct((b, h, tq), jnp.float32),
                  jax.ShapeDtypeStruct((b, hkv, tq, pool.tiles * width), jnp.float32)),
        grid=(hkv, nq, b),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        kernel_name="flash_pooled_fwd_mosaic_gpu",
        interpret=interpret,
    )(q, k, v, w_matrix)


def _sweep2_tiles(spec: MaskSpec, pool: Pooling, last_row):
    """K tiles sweep 2 visits for rows up to `last_row`: through the tile of the last block
    a row may select, `J <= t // (r * stride)` (the block's span of positions starts at or
    before t; the keys a row sees all lie in such blocks), capped at `pool.tiles`."""
    block = lax.div(last_row, jnp.int32(pool.keys * spec.stride))
    return jnp.minimum(lax.div(block, jnp.int32(pool.width)) + 1, pool.tiles)


def _run(st, pool, q, k, v):
    return _kernel_call(q, k, v, spec=st.kernel_mask, pool=pool, scale=st.scale,
                        stages=st.config.max_concurrent_steps,
                        schedule_barrier=st.config.use_schedule_barrier, interpret=st.interpret or None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _pooled(st, pool, q, k, v, q_pos, kv_pos):
    del q_pos, kv_pos          # static in st.kernel_mask; residuals of the Triton backward
    return _run(st, pool, q, k, v)


def _pooled_fwd(st, pool, q, k, v, q_pos, kv_pos):
    out, lse, pooled = _run(st, pool, q, k, v)
    return (out, lse, pooled), (q, k, v, q_pos, kv_pos, out, lse)


def _pooled_bwd(st, pool, res, cts):
    del pool
    q, k, v, q_pos, kv_pos, out, lse = res
    dout, dlse, _ = cts           # `pooled` is not differentiated
    dq, dk, dv, _ = autodiff.backward(st, q, k, v, None, q_pos, kv_pos, None, None, (), out, lse,
                                      dout, dlse)
    return dq, dk, dv, None, None


_pooled.defvjp(_pooled_fwd, _pooled_bwd)


def flash_pooled_mosaic_gpu(q, k, v, *, mask_fn, kv_positions, pool_keys: int,
                            pool_offsets: tuple[tuple[int, float], ...], pool_blocks: int,
                            scale=None, interpret=False, config: MosaicGPUConfig | None = None):
    """Causal flash attention plus the group-summed probabilities pooled into key blocks
    (module docstring).

    Args:
      q: `[B, Tq, H, D]` at positions `arange(Tq)`; k, v: `[B, Tk, Hkv, D]` at the concrete
        `kv_positions [B, Tk]` (`stride * arange + offset`, then padding), bf16 / fp16,
        D in {64, 128}.
      mask_fn: a plain causal mask (`is_causal`, as `sparse_jax.patterns.Causal()`).
      pool_keys: r, keys per pooled block; pool_offsets: `(o, w)` pairs, `-r <= o < r`;
        pool_blocks: pooled blocks wanted (columns `>= pool_blocks` may hold partial sums).
      scale: logit scale, default `1/sqrt(D)`; interpret: a `plgpu.InterpretGPUParams`
        (GPU interpret mode) or False; config: `MosaicGPUConfig` (`block_kv` 128; its
        `backward` is the backward's).
    Returns:
      `(AttentionOutput(out [B, Tq, H, D], lse [B, H, Tq], None), pooled [B, Hkv, Tq_p, Np])`:
      `Tq_p` Tq padded to 128 (padded rows undefined), `Np` a power of two >= pool_blocks
      and a multiple of `128 / r`; entry `(t, J)` is defined where `J * r * stride <= t`
      (NSA: the causal candidates `J * l' <= t`), and on the rest of their K tiles;
      undefined past that.
    """
    config = config or MosaicGPUConfig()
    b, tq, h, d = q.shape
    spec, pool = _check(q, k, v, mask_fn=mask_fn, kv_positions=kv_positions, pool_keys=pool_keys,
                        pool_offsets=pool_offsets, pool_blocks=pool_blocks, interpret=interpret,
                        config=config)
    scale = float(d ** -0.5 if scale is None else scale)
    tk = k.shape[1]
    tq_p, tk_p = mosaic_gpu.padded_lengths(tq, max(tk, pool.tiles * _BK), config)
    j = np.arange(tk_p, dtype=np.int32)
    q_pos = np.broadcast_to(np.arange(tq_p, dtype=np.int32), (b, tq_p))
    kv_pos = np.broadcast_to(np.where(j < spec.kv_len, spec.key_position(j), -1).astype(np.int32),
                             (b, tk_p))
    st = autodiff.Static(forward=mosaic_gpu.forward, backward=mosaic_gpu.backward, mask_fn=mask_fn,
                         scale=scale, softcap=None, has_sinks=False, config=config,
                         interpret=interpret or False, kernel_mask=spec)
    out, lse, pooled = _pooled(st, pool, pad_axis(q, tq_p, 1), pad_axis(k, tk_p, 1),
                               pad_axis(v, tk_p, 1), jnp.asarray(q_pos), jnp.asarray(kv_pos))
    return AttentionOutput(out[:, :tq], lse[:, :, :tq], None), pooled


def supports(q, k, v, *, mask_fn, kv_positions, pool_keys: int,
             pool_offsets: tuple[tuple[int, float], ...], pool_blocks: int, interpret=False,
             config: MosaicGPUConfig | None = None) -> str | None:
    """None when `flash_pooled_mosaic_gpu` takes the call (nothing is traced), else why not."""
    try:
        _check(q, k, v, mask_fn=mask_fn, kv_positions=kv_positions, pool_keys=pool_keys,
               pool_offsets=pool_offsets, pool_blocks=pool_blocks, interpret=interpret,
               config=config or MosaicGPUConfig())
    except ValueError as e:
        return str(e)
    return None


def _check(q, k, v, *, mask_fn, kv_positions, pool_keys, pool_offsets, pool_blocks, interpret,
           config: MosaicGPUConfig) -> tuple[MaskSpec, Pooling]:
    """The call's `MaskSpec` and `Pooling`; ValueError for what the kernel does not cover."""
    b, tq, h, d = q.shape
    spec = mosaic_gpu.check_supported(
        q, k, v, mask_fn=mask_fn, q_positions=np.broadcast_to(np.arange(tq, dtype=np.int32), (b, tq)),
        kv_positions=kv_positions, q_segment_ids=None, kv_segment_ids=None, sink_logits=None,
        softcap=None, block_score_size=None, interpret=interpret, config=config)
    pool = _pooling(pool_keys, pool_offsets, pool_blocks)
    reason = _reason(spec, pool, config, d, h // k.shape[2], jnp.dtype(q.dtype).itemsize)
    if reason:
        raise ValueError(f"flash_pooled_mosaic_gpu {reason}")
    return spec, pool


def _pooling(keys, offsets, blocks) -> Pooling:
    if not isinstance(keys, int) or keys < 1 or _BK % keys or (_BK // keys) % 8:
        raise ValueError(f"pool_keys must divide {_BK} into a multiple of 8 blocks, got {keys!r}")
    offsets = tuple((int(o), float(w)) for o, w in offsets)
    if not offsets or any(not -keys <= o < keys for o, _ in offsets):
        raise ValueError(f"pool_offsets must be (offset, weight) pairs with -{keys} <= offset < "
                         f"{keys}, got {offsets!r}")
    if not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"pool_blocks must be an int >= 1, got {blocks!r}")
    width = _BK // keys
    padded = max(width, 1 << (blocks - 1).bit_length())
    return Pooling(keys=keys, offsets=offsets, tiles=padded // width)


def _reason(spec: MaskSpec, pool: Pooling, config: MosaicGPUConfig, d: int, group: int,
            itemsize: int) -> str | None:
    if not spec.causal or spec.window is not None:
        return "needs a plain causal mask (no window)"
    if config.block_kv != _BK:
        return f"needs block_kv == {_BK} (a K tile holds both consumers' q rows), got {config.block_kv}"
    need = smem_bytes(d, group, pool.width, config.max_concurrent_steps, itemsize)
    if need > SMEM_BYTES:
        return (f"needs {need} B of SMEM (D {d}, group {group}, {config.max_concurrent_steps} "
                f"stages), more than Hopper's {SMEM_BYTES}")
    return None
