"""`flash` forward on Hopper: Pallas with the Mosaic GPU lowering (`impl="mosaic_gpu"`).

FlashAttention-3 style (arXiv 2407.08608): one CTA per (head, pair of 64-row query tiles,
batch) with three warpgroups. Warpgroups 0 and 1 are consumers: each owns one 64-row
query tile in SMEM, computes `S = Q K^T` and `O += P V` with `wgmma` (fp32 accumulators in
registers) and the online softmax in base 2 between them; a schedule barrier ping-pongs
the two so that one's softmax overlaps the other's matmuls. Warpgroup 2 is the producer:
with a small register budget (`setmaxnreg`) it streams K and V tiles by TMA through a
`max_concurrent_steps`-deep SMEM ring, each slot guarded by a "loaded" barrier (TMA
completion) and a "consumed" barrier (both consumers arrived). GQA reads KV head
`h // G` by index (KV never repeated in memory).

Scope (explicit opt-in; everything else raises ValueError in `flash_mosaic_gpu`):
`mask_fn` None, a plain causal mask (an `is_causal = True` attribute, as
`sparse_jax.patterns.Causal()` has) or a causal sliding window (a `causal_window_size`
attribute, as `causal_window(w)` has); queries at the default positions (`arange`) and keys
at `stride * arange + offset` (the default `arange`, or NSA's compressed keys at their
blocks' last tokens, `d * j + l - 1`), optionally followed by padding (negative); learned
sink logits, no segment ids, no soft-cap, no block scores, bf16/fp16, head_dim == value
head_dim in {64, 128}; any lengths (padded here to the tiles; padded keys are masked).
The mask is static (`mosaic_gpu_mask.MaskSpec`: its element predicate and the tile
ranges it skips to): positions are not read by the kernels, so they must be concrete
(the api's default `arange` is, also under `jit`); traced positions are refused with a
ValueError rather than assumed. Rows that see no key give zeros and lse -inf.

`interpret=jax.experimental.pallas.mosaic_gpu.InterpretGPUParams()` runs the kernels on the
CPU in JAX's GPU interpret mode (tests): the same kernels, except that the wgmma
accumulate steps are float32 values (`tiles_mosaic_gpu.accumulate`) and that ring phases the
compiled kernels leave unobserved are waited for (`observe_last_phases`), as the
interpreter requires. `interpret=True` (the Triton interpreter) is refused.

The backward pass (through `autodiff`, on the same `(out, lse)` residuals) is the Mosaic GPU
backward of `mosaic_gpu_vjp` by default, or the Triton one (`triton_vjp`) when
`config.backward` is a `TritonConfig`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import AttentionOutput, interpret_reason
from pallas_kernels.flash import autodiff, mosaic_gpu_vjp
from pallas_kernels.flash.blocks import pad_axis, round_up
from pallas_kernels.flash.mosaic_gpu_mask import MaskSpec, walk_tiles
from pallas_kernels.flash.mosaic_gpu_vjp import MosaicGPUBackwardConfig
from pallas_kernels.flash.triton import TritonConfig
from pallas_kernels.tiles_common import LOG2E
from pallas_kernels.tiles_mosaic_gpu import (accumulate, mma, observe_last_phases, smem_transforms,
                                              softmax_step)


@dataclasses.dataclass(frozen=True)
class MosaicGPUConfig:
    """Tiles of the Mosaic GPU forward (each consumer warpgroup owns `block_q` rows, so a
    CTA covers `2 * block_q` queries) and the backward's: a `MosaicGPUBackwardConfig`
    (the Mosaic GPU backward, default) or a `TritonConfig` (the Triton backward). At D=128,
    3 stages need 232568 B of SMEM, just over the H200's 232448 B: keep 2."""

    block_q: int = 64
    block_kv: int = 128
    max_concurrent_steps: int = 2
    use_schedule_barrier: bool = True
    backward: MosaicGPUBackwardConfig | TritonConfig = MosaicGPUBackwardConfig()

    def __post_init__(self):
        if self.block_q != 64:
            raise ValueError(f"block_q must be 64 (one wgmma M tile per warpgroup), got {self.block_q}")
        if self.block_kv % 64 or self.block_kv < 64:
            raise ValueError(f"block_kv must be a positive multiple of 64, got {self.block_kv}")
        if self.max_concurrent_steps < 2:
            raise ValueError(f"max_concurrent_steps must be >= 2, got {self.max_concurrent_steps}")


_COMPUTE_WGS = 2


def _forward_kernel_call(q, k, v, *, spec: MaskSpec, scale: float, cfg: MosaicGPUConfig,
                         interpret=None):
    """q `[B, Tq, H, D]`, k/v `[B, Tk, Hkv, D]` -> out `[B, Tq, H, D]`, lse `[B, H, Tq]`.
    `interpret`: None (compiled) or `InterpretGPUParams` (GPU interpret mode, CPU).

    `spec` (`mosaic_gpu_mask.MaskSpec`): the static mask. The producer streams the KV tiles
    any row of the CTA sees; each consumer masks the tiles outside its mask-free run and
    releases the tiles past its own last one (the other consumer's). Rows that see no key
    give out 0 and lse -inf."""
    import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415 - GPU-only import

    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    group = h // hkv
    dtype = q.dtype
    bq, bk = cfg.block_q, cfg.block_kv
    nk = tk // bk
    stages = min(cfg.max_concurrent_steps, nk)
    nq = tq // (_COMPUTE_WGS * bq)
    c = float(scale) * LOG2E          # logits in base-2 units: exp2(s * c - m)

    def body(q_ref, k_ref, v_ref, out_ref, lse_ref, scoped):
        (qo_smem2, k_smem, v_smem, lse_smem2), loaded, consumed, sched = scoped
        k_loaded, v_loaded, q_loaded = loaded
        k_consumed, v_consumed = consumed
        bi = lax.axis_index("batch")
        hi = lax.axis_index("heads")
        wg = lax.axis_index("wg")
        tile = nq - 1 - lax.axis_index("q_seq")       # heaviest (causal) tiles first
        row_cta = tile * (_COMPUTE_WGS * bq)
        j_lo, _, _, n_steps_cta = spec.kv_tiles(row_cta, _COMPUTE_WGS * bq, bk)   # the CTA's

        def sched_sync():
            if cfg.use_schedule_barrier:
                plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(sched)

        @pl.when(wg < _COMPUTE_WGS)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            qo_smem = qo_smem2.at[wg]
            lse_smem = lse_smem2.at[wg]
            row0 = row_cta + wg * bq
            # from the CTA's first tile (the ring's order) to this consumer's last
            _, j_full_lo, j_full_hi, n_steps = spec.kv_tiles(row0, bq, bk)
            plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(row0, bq), hi], qo_smem, q_loaded.at[wg])
            plgpu.barrier_wait(q_loaded.at[wg])

            # a tile may hide every key of a row: m starts finite (exp2(m - m_new) stays 0 / 1)
            m = plgpu.layout_cast(jnp.full((bq,), -1e30, jnp.float32),
                                  plgpu.Layout.WGMMA.reduce(1))
            l = plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32),
                                  plgpu.Layout.WGMMA.reduce(1))
            acc = plgpu.layout_cast(jnp.full((bq, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)

            @pl.when(n_steps > j_lo)
            def _():
                plgpu.barrier_wait(k_loaded.at[0])

            pl.when(wg == 1)(sched_sync)     # offset the two consumers by one phase

            def step(j, carry, masked):
                acc, m, l = carry
                slot = lax.rem(j - j_lo, jnp.int32(stages))

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
                    sched_sync()
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
                plgpu.barrier_arrive(k_consumed.at[slot])
                if masked:
                    rows = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0, layout=plgpu.Layout.WGMMA)
                    cols = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=plgpu.Layout.WGMMA)
                    s = jnp.where(spec.visible(rows + row0, cols + j * bk), s, -jnp.inf)
                acc, l, m_new, p16 = softmax_step(s, m, l, acc, scale2=c, dtype=dtype)
                if cfg.use_schedule_barrier:
                    plgpu.barrier_arrive(sched)          # softmax done
                plgpu.barrier_wait(v_loaded.at[slot])
                if cfg.use_schedule_barrier:
                    plgpu.barrier_wait(sched)            # tensor cores free

                def pv(acc_ref):
                    mma(acc_ref, p16, v_smem.at[slot])
                    nxt = j + 1

                    @pl.when(nxt < n_steps)
                    def _():
                        plgpu.barrier_wait(k_loaded.at[lax.rem(nxt - j_lo, jnp.int32(stages))])

                acc = accumulate(pv, acc, interpret=interpret)
                plgpu.barrier_arrive(v_consumed.at[slot])
                return acc, m_new, l

            acc, m, l = walk_tiles((j_lo, j_full_lo, j_full_hi, n_steps), step, (acc, m, l))

            def drain(j, _):   # release the tiles the other consumer still needs
                slot = lax.rem(j - j_lo, jnp.int32(stages))
                if interpret:      # see `observe_last_phases`: observe their loads too
                    plgpu.barrier_wait(k_loaded.at[slot])
                    plgpu.barrier_wait(v_loaded.at[slot])
                plgpu.barrier_arrive(k_consumed.at[slot])
                plgpu.barrier_arrive(v_consumed.at[slot])
                sched_sync()
                sched_sync()

            lax.fori_loop(n_steps, n_steps_cta, drain, None)
            pl.when(wg == 0)(sched_sync)

            # l >= 1 wherever a key is visible; rows that see none: acc = 0, l = 0
            inv = 1.0 / jnp.maximum(l, 1e-30)
            acc = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
            qo_smem[...] = acc.astype(dtype)
            lse_smem[...] = (m + jnp.log2(l)) * (1.0 / LOG2E)      # -inf where l = 0
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[bi, pl.ds(row0, bq), hi])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, hi, pl.ds(row0, bq)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == _COMPUTE_WGS)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(hi, jnp.int32(group))

            def load(j, slot):
                sl = (bi, pl.ds(j * bk, bk), kv_head)
                plgpu.copy_gmem_to_smem(k_ref.at[sl], k_smem.at[slot], k_loaded.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[sl], v_smem.at[slot], v_loaded.at[slot])

            for s in range(stages):     # the CTA may need fewer than `stages` tiles
                pl.when(j_lo + s < n_steps_cta)(lambda s=s: load(j_lo + s, s))

            n_rest = jnp.maximum(n_steps_cta - j_lo - stages, 0)

            @pl.loop(0, n_rest)
            def _(j):
                slot = lax.rem(j, jnp.int32(stages))
                sl = (bi, pl.ds((j_lo + j + stages) * bk, bk), kv_head)
                plgpu.barrier_wait(k_consumed.at[slot])
                plgpu.copy_gmem_to_smem(k_ref.at[sl], k_smem.at[slot], k_loaded.at[slot])
                plgpu.barrier_wait(v_consumed.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[sl], v_smem.at[slot], v_loaded.at[slot])

            if interpret:
                observe_last_phases((k_consumed, v_consumed), n_steps_cta - j_lo, stages)

    def entry(q_ref, k_ref, v_ref, out_ref, lse_ref):
        tr = smem_transforms(plgpu, d, dtype)
        scratch = (
            plgpu.SMEM((_COMPUTE_WGS, bq, d), dtype, transforms=tr),
            plgpu.SMEM((stages, bk, d), dtype, transforms=tr),
            plgpu.SMEM((stages, bk, d), dtype, transforms=tr),
            plgpu.SMEM((_COMPUTE_WGS, bq), jnp.float32),
        )
        pl.run_scoped(
            lambda *a: body(q_ref, k_ref, v_ref, out_ref, lse_ref, a),
            scratch,
            (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
             plgpu.Barrier(num_barriers=_COMPUTE_WGS)),
            (plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=_COMPUTE_WGS),
            collective_axes="wg",
        )

    out, lse = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct((b, tq, h, d), dtype),
                  jax.ShapeDtypeStruct((b, h, tq), jnp.float32)),
        grid=(h, nq, b),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        kernel_name="flash_fwd_mosaic_gpu",
        interpret=interpret,
    )(q, k, v)
    return out, lse


def forward(st, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg):
    """`autodiff` forward on the padded `[B, T, H, D]` arrays: `(out, lse [B, H, Tq])`.

    Learned sinks join only the denominator, so they are folded in after the kernel:
    `lse' = logaddexp(lse, sink)`, `out' = out * exp(lse - lse')` (one elementwise pass);
    the backward then sees the sink through `lse'` (and `autodiff` gives d sink)."""
    del q_pos, kv_pos, q_seg, kv_seg   # static in st.kernel_mask (checked by flash_mosaic_gpu)
    out, lse = _forward_kernel_call(q, k, v, spec=st.kernel_mask, scale=st.scale, cfg=st.config,
                                    interpret=st.interpret or None)
    if sinks is not None:
        lse_all = jnp.logaddexp(lse, sinks.astype(jnp.float32)[None, :, None])
        ratio = jnp.exp(lse - lse_all).transpose(0, 2, 1)[..., None]     # [B, Tq, H, 1]
        out = (out.astype(jnp.float32) * ratio).astype(out.dtype)
        lse = lse_all
    return out, lse


def backward(st, *args):
    """The backward on the same residuals: Mosaic GPU, or Triton for a `TritonConfig` (in
    Triton's interpret mode when the forward runs in GPU interpret mode)."""
    if isinstance(st.config.backward, TritonConfig):
        from pallas_kernels.flash import triton_vjp  # noqa: PLC0415

        return triton_vjp.backward(dataclasses.replace(st, config=st.config.backward,
                                                       interpret=bool(st.interpret)), *args)
    return mosaic_gpu_vjp.backward(st, *args)


def affine_positions(pos) -> tuple[int, int, int] | None:
    """`(stride, offset, n)` when `pos [B, T]` is concrete and, in every row, its first `n
    >= 1` entries are `stride * arange(n) + offset` (stride >= 1, offset >= 0) and the rest
    negative (padding), else None. The api's default is a numpy constant, concrete under
    `jit` too; traced positions are refused (None), since the kernels never read them."""
    if isinstance(pos, jax.core.Tracer):
        return None
    pos = np.asarray(pos).astype(np.int64)
    n = int((pos[0] >= 0).sum())
    if n < 1:
        return None
    offset = int(pos[0, 0])
    stride = int(pos[0, 1] - pos[0, 0]) if n > 1 else 1
    if stride < 1 or offset < 0:
        return None
    want = np.where(np.arange(pos.shape[1]) < n, stride * np.arange(pos.shape[1]) + offset, -1)
    if not (np.where(pos >= 0, pos, -1) == want[None, :]).all():
        return None
    return stride, offset, n


def padded_lengths(tq: int, tk: int, config: MosaicGPUConfig) -> tuple[int, int]:
    """Lengths the kernels' tiles divide: Tq to `2 * block_q` (and the Mosaic backward's
    `block_q_dkv`), Tk to `block_kv` (and the Mosaic backward's `128`, `block_kv_dq`)."""
    q_mult, k_mult = _COMPUTE_WGS * config.block_q, config.block_kv
    if isinstance(config.backward, MosaicGPUBackwardConfig):
        q_mult = math.lcm(q_mult, config.backward.block_q_dkv)
        k_mult = math.lcm(k_mult, mosaic_gpu_vjp.COMPUTE_WGS * mosaic_gpu_vjp.TILE,
                          config.backward.block_kv_dq)
    return round_up(tq, q_mult), round_up(tk, k_mult)


def check_supported(q, k, v, *, mask_fn, q_positions, kv_positions, q_segment_ids,
                    kv_segment_ids, sink_logits, softcap, block_score_size, interpret,
                    config: MosaicGPUConfig) -> MaskSpec:
    """The call's static `MaskSpec`; ValueError for anything the Mosaic GPU kernels do not
    cover (nothing is compiled)."""
    def no(what):
        raise ValueError(f"flash impl='mosaic_gpu' does not support {what}; use impl='triton'")

    reason = interpret_reason("mosaic_gpu", interpret)
    if reason:
        raise ValueError(f"flash impl='mosaic_gpu': {reason}")
    kind = mosaic_gpu_vjp.mask_kind(mask_fn)
    if kind is None:
        no(f"mask_fn={mask_fn!r} (only None, a plain causal mask (`is_causal` True: Causal()) "
           "or a causal sliding window (`causal_window_size` set: causal_window(w)))")
    if q_segment_ids is not None or kv_segment_ids is not None:
        no("segment ids")
    if softcap is not None:
        no("softcap")
    if block_score_size is not None:
        no("block_score_size")
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        no(f"dtype {q.dtype} (bf16 / fp16 only)")
    d, dv = q.shape[3], v.shape[3]
    if d not in (64, 128) or dv != d:
        no(f"head_dim {d} / value head_dim {dv} (64 or 128, equal)")
    if affine_positions(q_positions) != (1, 0, q.shape[1]):
        no("these q_positions (concrete arange only)")
    kv_map = affine_positions(kv_positions)
    if kv_map is None:
        no("these kv_positions (concrete `stride * arange + offset` (stride >= 1, offset >= 0), "
           "then padding (negative) only)")
    causal, window = kind
    stride, offset, kv_len = kv_map
    return MaskSpec(kv_len=kv_len, causal=causal, window=window, stride=stride, offset=offset)


def flash_mosaic_gpu(q, k, v, *, mask_fn, q_positions, kv_positions, q_segment_ids,
                     kv_segment_ids, sink_logits, softcap, scale, return_lse, block_score_size,
                     block_score_reduce_gqa, interpret=False,
                     config: MosaicGPUConfig | None = None):
    """`flash_reference`'s contract, restricted (see the module docstring), on Hopper, or on
    the CPU in GPU interpret mode (`interpret=plgpu.InterpretGPUParams()`; tests).

    Positions must be concrete (the default `arange`, or arrays known at trace time):
    queries at `arange(Tq)`, keys at `stride * arange(Tk) + offset`; traced positions
    raise ValueError, since the kernels never read them. Lengths the tiles do not divide
    are padded here (padded keys are masked, padded queries sliced away).
    """
    del block_score_reduce_gqa
    config = config or MosaicGPUConfig()
    spec = check_supported(q, k, v, mask_fn=mask_fn, q_positions=q_positions,
                           kv_positions=kv_positions, q_segment_ids=q_segment_ids,
                           kv_segment_ids=kv_segment_ids, sink_logits=sink_logits,
                           softcap=softcap, block_score_size=block_score_size,
                           interpret=interpret, config=config)
    b, tq, tk = q.shape[0], q.shape[1], k.shape[1]
    tq_p, tk_p = padded_lengths(tq, tk, config)
    j = np.arange(tk_p, dtype=np.int32)      # positions of the padded call (Triton backward)
    q_pos = np.broadcast_to(np.arange(tq_p, dtype=np.int32), (b, tq_p))
    kv_pos = np.broadcast_to(np.where(j < spec.kv_len, spec.key_position(j), -1).astype(np.int32),
                             (b, tk_p))
    st = autodiff.Static(forward=forward, backward=backward, mask_fn=mask_fn,
                         scale=float(scale), softcap=None, has_sinks=sink_logits is not None,
                         config=config, interpret=interpret or False, kernel_mask=spec)
    out, lse = autodiff.attention(
        st, pad_axis(q, tq_p, 1), pad_axis(k, tk_p, 1), pad_axis(v, tk_p, 1),
        sink_logits=sink_logits, q_positions=q_pos, kv_positions=kv_pos, q_segment_ids=None,
        kv_segment_ids=None, return_lse=True)[:2]
    out, lse = out[:, :tq], lse[:, :, :tq]
    return AttentionOutput(out, lse, None) if return_lse else out


# Backend declaration for `pallas_kernels.common.resolve`: Hopper only; the calls
# `check_supported` accepts; tiles `MosaicGPUConfig`.
CONFIG = MosaicGPUConfig


def supports(*, q, k, v, mask_fn, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
             sink_logits, softcap, block_score_size, interpret, config, **_) -> str | None:
    """None when the kernel covers the call, else `check_supported`'s reason."""
    try:
        check_supported(q, k, v, mask_fn=mask_fn, q_positions=q_positions,
                        kv_positions=kv_positions, q_segment_ids=q_segment_ids,
                        kv_segment_ids=kv_segment_ids, sink_logits=sink_logits, softcap=softcap,
                        block_score_size=block_score_size, interpret=interpret,
                        config=config or MosaicGPUConfig())
    except ValueError as e:
        return str(e)
    return None
