"""`token_sparse` forward on Hopper: Pallas with the Mosaic GPU lowering (`impl="mosaic_gpu"`).

NSA's selected branch (arXiv 2502.11089 Sec. 3.4: each query token of a GQA group of `G`
heads attends its own `n` KV blocks of `l'` keys) on 64-row wgmma tiles. The Triton kernel
(`triton.py`) holds one token's G heads per program (16 rows, one block per iteration);
here a warpgroup holds `R = 64 / G` consecutive tokens of one kv head, all G heads of each:
tile row `r` is token `t0 + r // G`, head `r % G` (G = 16: 4 tokens; G = 4: 16 tokens).

Layout. One CTA per (chunk of `CT = 2R` tokens (R with `split_kv`), kv head, batch), three
warpgroups as in the flash forward (`flash/mosaic_gpu.py`, FlashAttention-3, arXiv 2407.08608):

* XLA first builds, per chunk, the union of the blocks its tokens list (`layout.union_blocks`:
  deduplicated, ascending; a block several tokens list is loaded once) and, per union slot,
  a bit mask of the tokens that listed it; with the count this is the chunk's metadata row
  `meta [B, Hkv, C, 1 + 2U/64, 64]` int32 (row 0: count; then the blocks; then the bits).
  In XLA rather than in the kernel: two sorts of `CT * K` entries per chunk (4M int32 at
  64K tokens, G=16, K=16: far below the kernel's K/V traffic), where an in-kernel merge
  would run on one thread of the producer ahead of its first TMA.
* Warpgroup 2, the producer (`setmaxnreg` 40), TMA-loads the metadata row, then streams the
  union's K and V blocks `[l', D]` (rows `j * l'`: block-aligned, TMA-legal) and their key
  positions `[l']` through a `max_concurrent_steps`-deep SMEM ring ("loaded" / "consumed"
  barriers per slot).
* Warpgroups 0 and 1, the consumers, each own R tokens (64 rows): `S = Q K^T` by wgmma,
  the mask, the online softmax in base 2, `O += P V` by wgmma, ping-ponged by a schedule
  barrier. Both walk the whole union. Row r sees key c of union block u iff its token
  listed u (bit `wg * R + r // G` of the slot's mask), its position is >= 0, the key's
  position is >= 0 and, with `causal`, `kv_pos <= q_pos`: the row's position, or -1 where
  the token did not list the block, is compared with the key positions (one int row
  vector per block; positions are read, so they may be traced).

The price of the 64-row tile: every row walks the whole union, so a token costs `U / n`
times its own blocks' FLOPs (U: the union of its chunk). With NSA's selection on random
inputs (T=4096, 16 blocks a token) the chunks of 8 tokens list 30 blocks on average (49 in
the last quarter of the sequence; 26 / 38 for chunks of 4); selections of a trained model,
where neighbouring tokens agree more, would give less. `MosaicGPUConfig(split_kv=True)`
halves the chunk: both consumers hold the same R tokens (one query tile) and take
alternate union blocks (slot `u % stages`, stages even, serves consumer `u % 2` alone);
consumer 1 hands its float32 accumulator, max and sum to consumer 0 through SMEM, which
merges them and writes the tile (the second consumer runs one step fewer for an odd union:
two extra schedule-barrier rounds keep the ping-pong's phases matched).

The query tile: when 8 divides G, R TMA copies of `[G, D]` straight from `q [B, T, H, D]`
(a token's G heads are contiguous); else (G = 4) XLA first regroups q into 64-row tiles
(`[B, T / R, Hkv, 64, D]`, one copy; an extra pass over q and out). The kernel writes `out`
the same way and `lse [B, Hkv, T * G]` (natural log, -inf for rows that see nothing),
reshaped here to the `[B, H, T]` that `flash.autodiff` hands the Triton backward
(`triton_vjp`, unchanged: the custom VJP runs it on this forward's residuals). Learned sinks
are folded in after the kernel (`lse' = logaddexp(lse, sink)`), as the flash forward does.

Scope (`check_supported`, ValueError otherwise): bf16 / fp16, D == Dv in {64, 128}, G a
power of two in [4, 64], block_size in {64, 128}, no soft-cap; any T (padded to CT), any S
(keys padded to whole blocks at position -1), traced or concrete positions and indices.

`impl="auto"` does not take this kernel yet (Triton stays first): it has been lowered for
CUDA and run in GPU interpret mode, not timed on a GPU.

`interpret=jax.experimental.pallas.mosaic_gpu.InterpretGPUParams()` runs the kernel on the
CPU in JAX's GPU interpret mode (tests), with `tiles_mosaic_gpu`'s accommodations
(`accumulate`, `observe_last_phases`); the backward then runs in Triton's interpreter.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import interpret_reason
from pallas_kernels.flash import autodiff, blocks
from pallas_kernels.tiles_common import LOG2E
from pallas_kernels.tiles_mosaic_gpu import (SMEM_BYTES, accumulate, mma, observe_last_phases,
                                              smem_transforms, softmax_step)
from pallas_kernels.token_sparse import triton as triton_fwd
from pallas_kernels.token_sparse.layout import union_blocks
from pallas_kernels.token_sparse.triton import TritonConfig

ROWS = 64                  # rows of a consumer's tile (the wgmma M tile)
_COMPUTE_WGS = 2
_META_W = 64               # int32 per metadata row


@dataclasses.dataclass(frozen=True)
class MosaicGPUConfig:
    """`max_concurrent_steps`: depth of the K/V ring (0: the most, up to 4, that fit in
    SMEM: 4 at l' = 64, 2 at l' = 128 for D = 128; even with `split_kv`);
    `use_schedule_barrier`: ping-pong the two consumers; `split_kv`: both consumers hold
    the same 64 rows (a CTA = R tokens, so unions of R tokens, not 2R) and take alternate
    union blocks, their softmax states merged through SMEM at the end (fewer blocks per
    token where the tokens of a chunk share few); `backward`: the Triton backward's tiles
    (`TritonConfig`)."""

    max_concurrent_steps: int = 0
    use_schedule_barrier: bool = True
    split_kv: bool = False
    backward: TritonConfig = TritonConfig()

    def __post_init__(self):
        if not (isinstance(self.max_concurrent_steps, int) and self.max_concurrent_steps in (0, 2, 3, 4)):
            raise ValueError("max_concurrent_steps must be 0 (auto), 2, 3 or 4, got "
                             f"{self.max_concurrent_steps!r}")
        if self.split_kv and self.max_concurrent_steps == 3:
            raise ValueError("split_kv needs an even max_concurrent_steps (each ring slot serves one "
                             "consumer), got 3")
        if not isinstance(self.backward, TritonConfig):
            raise ValueError(f"backward must be a TritonConfig, got {type(self.backward).__name__}")


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static sizes of one call (hashable)."""

    t_p: int                  # query tokens padded to a multiple of `chunk`
    hkv: int
    group: int                # G
    tokens: int               # R = 64 / G tokens per consumer
    chunk: int                # CT tokens per CTA: 2R, or R with `split_kv`
    split: bool               # `MosaicGPUConfig.split_kv`
    per_copy: int             # tokens per query TMA copy (1, or R: regrouped in XLA)
    d: int
    block_size: int
    nblk: int
    s_p: int                  # keys padded to whole blocks
    union: int                # U: union slots per chunk (CT * K, rounded up to 64)
    stages: int
    causal: bool

    @property
    def meta_rows(self) -> int:
        return 1 + 2 * self.union // _META_W


def smem_bytes(d: int, block_size: int, union: int, stages: int, split: bool, itemsize: int = 2) -> int:
    """SMEM of one CTA: the query / output tiles (one with `split`, plus the float32
    accumulator, max and sum the second consumer hands over), the ring (K, V, key
    positions), the metadata row, the lse and query-position rows."""
    meta = (1 + 2 * union // _META_W) * _META_W * 4
    tiles = ROWS * d * itemsize + (ROWS * d + 2 * ROWS) * 4 if split else _COMPUTE_WGS * ROWS * d * itemsize
    return (tiles + stages * (2 * block_size * d * itemsize + block_size * 4) + meta
            + 2 * _COMPUTE_WGS * ROWS * 4)


def union_slots(group: int, entries: int, split: bool) -> int:
    """U: a chunk's union slots, its tokens' entries rounded up to a metadata row."""
    return blocks.round_up((1 if split else 2) * (ROWS // group) * entries, _META_W)


def geometry(q, k, indices, block_size: int, causal: bool, cfg: MosaicGPUConfig) -> Geometry:
    t, h, d = q.shape[1], q.shape[2], q.shape[3]
    s, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    r = ROWS // g
    nblk = -(-s // block_size)
    union = union_slots(g, indices.shape[3], cfg.split_kv)
    stages = cfg.max_concurrent_steps
    if not stages:
        stages = max([n for n in ((2, 4) if cfg.split_kv else (2, 3, 4))
                      if smem_bytes(d, block_size, union, n, cfg.split_kv) <= SMEM_BYTES], default=2)
    chunk = r if cfg.split_kv else 2 * r
    return Geometry(t_p=blocks.round_up(t, chunk), hkv=hkv, group=g, tokens=r, chunk=chunk,
                    split=cfg.split_kv, per_copy=1 if g % 8 == 0 else r, d=d, block_size=block_size,
                    nblk=nblk, s_p=nblk * block_size, union=union, stages=stages, causal=causal)


def metadata(geo: Geometry, indices, q_pos):
    """`meta [B, Hkv, C, 1 + 2U/64, 64]` int32 of the padded call (see the module docstring)."""
    b = indices.shape[0]
    blk, bits, count = union_blocks(indices, q_pos, geo.nblk, geo.chunk)
    c = geo.t_p // geo.chunk
    pad = lambda x: blocks.pad_axis(x, geo.union, 3)  # noqa: E731
    head = blocks.pad_axis(count[..., None], _META_W, 3)
    meta = jnp.concatenate([head, pad(blk), pad(bits)], axis=3)
    return meta.reshape(b, geo.hkv, c, geo.meta_rows, _META_W)


def _kernel_call(q, k, v, kv_pos, q_rows, meta, *, geo: Geometry, scale: float,
                 cfg: MosaicGPUConfig, interpret=None):
    """q `[B, T_p / c, Hkv, c * G, D]` (c = `geo.per_copy`), k / v `[B, S_p, Hkv, D]`,
    kv_pos `[B, S_p]`, q_rows `[B, T_p * G]` (each row's query position), meta (`metadata`)
    -> out like q, lse `[B, Hkv, T_p * G]` float32 (natural log).

    Union block u sits in ring slot `u % stages`; it is consumed by both consumers, or with
    `geo.split` by consumer `u % 2` alone (stages even: a slot always serves the same one)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415 - GPU-only import

    b, d, dtype = q.shape[0], geo.d, q.dtype
    bs, stages, g, r, split = geo.block_size, geo.stages, geo.group, geo.tokens, geo.split
    rows_copy = geo.per_copy * g
    n_copies = r // geo.per_copy
    n_chunks = geo.t_p // geo.chunk
    n_tiles = 1 if split else _COMPUTE_WGS           # distinct 64-row tiles of a CTA
    stride = _COMPUTE_WGS if split else 1            # a consumer's step between union blocks
    log2_g = g.bit_length() - 1
    ub = 1 + geo.union // _META_W          # first metadata row of the bits
    c2 = float(scale) * LOG2E

    def body(q_ref, k_ref, v_ref, kpos_ref, qrow_ref, meta_ref, out_ref, lse_ref, scoped):
        ((qo_smem, k_smem, v_smem, kpos_smem, meta_smem, qpos_smem, lse_smem, *handover),
         meta_loaded, q_loaded, loaded, consumed, sched, *merge) = scoped
        k_loaded, v_loaded = loaded
        k_consumed, v_consumed = consumed
        ci, hk, bi = lax.axis_index("chunk"), lax.axis_index("heads"), lax.axis_index("batch")
        wg = lax.axis_index("wg")
        tile_i = 0 if split else wg                  # this consumer's 64-row tile

        def sched_sync():
            if cfg.use_schedule_barrier:
                plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(sched)

        def entry_at(row0, u):
            return meta_smem[row0 + lax.div(u, jnp.int32(_META_W)), lax.rem(u, jnp.int32(_META_W))]

        @pl.when(wg < _COMPUTE_WGS)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            tile = qo_smem.at[tile_i]
            first = ci * (geo.chunk // geo.per_copy) + tile_i * n_copies
            row0 = (ci * geo.chunk + tile_i * r) * g

            def load_tile():
                for i in range(n_copies):
                    plgpu.copy_gmem_to_smem(q_ref.at[bi, first + i, hk],
                                            tile.at[pl.ds(i * rows_copy, rows_copy)], q_loaded.at[tile_i])
                plgpu.copy_gmem_to_smem(qrow_ref.at[bi, pl.ds(row0, ROWS)], qpos_smem.at[tile_i],
                                        q_loaded.at[tile_i])

            if split:
                pl.when(wg == 0)(load_tile)          # one tile, read by both
            else:
                load_tile()
            plgpu.barrier_wait(q_loaded.at[tile_i])
            plgpu.barrier_wait(meta_loaded)
            n = meta_smem[0, 0]
            u0 = wg if split else 0                  # this consumer's first union block
            n_mine = lax.div(jnp.maximum(n - u0 + (stride - 1), 0), jnp.int32(stride))

            q_pos = plgpu.load(qpos_smem.at[tile_i], layout=plgpu.Layout.WGMMA.reduce(1))
            if not geo.causal:      # every valid key: a row position above every key's
                q_pos = jnp.where(q_pos >= 0, jnp.int32(2 ** 30), -1)
            row_iota = plgpu.broadcasted_iota(jnp.int32, (ROWS,), 0,
                                              layout=plgpu.Layout.WGMMA.reduce(1))
            shift = jnp.right_shift(row_iota, log2_g) + tile_i * r   # the row's token in the chunk

            m = plgpu.layout_cast(jnp.full((ROWS,), -1e30, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l = plgpu.layout_cast(jnp.full((ROWS,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc = plgpu.layout_cast(jnp.full((ROWS, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)

            @pl.when(n > u0)
            def _():
                plgpu.barrier_wait(k_loaded.at[u0])

            pl.when(wg == 1)(sched_sync)     # offset the two consumers by one phase

            def step(i, carry):
                acc, m, l = carry
                u = u0 + i * stride
                slot = lax.rem(u, jnp.int32(stages))

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, tile, k_smem.at[slot].transpose((1, 0)))
                    sched_sync()
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((ROWS, bs), jnp.float32))
                kp = plgpu.load(kpos_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                plgpu.barrier_arrive(k_consumed.at[slot])
                listed = jnp.right_shift(entry_at(ub, u), shift) & 1   # (arithmetic: bit 31 too)
                qp = jnp.where(listed == 1, q_pos, -1)          # -1: sees no key of the block
                kp2 = lax.broadcast_in_dim(kp, s.shape, [1])
                vis = (kp2 >= 0) & (kp2 <= lax.broadcast_in_dim(qp, s.shape, [0]))
                s = jnp.where(vis, s, -jnp.inf)
                acc, l, m_new, p16 = softmax_step(s, m, l, acc, scale2=c2, dtype=dtype)
                if cfg.use_schedule_barrier:
                    plgpu.barrier_arrive(sched)          # softmax done
                plgpu.barrier_wait(v_loaded.at[slot])
                if cfg.use_schedule_barrier:
                    plgpu.barrier_wait(sched)            # tensor cores free

                def pv(acc_ref):
                    mma(acc_ref, p16, v_smem.at[slot])

                    @pl.when(u + stride < n)
                    def _():
                        plgpu.barrier_wait(k_loaded.at[lax.rem(u + stride, jnp.int32(stages))])

                acc = accumulate(pv, acc, interpret=interpret)
                plgpu.barrier_arrive(v_consumed.at[slot])
                return acc, m_new, l

            acc, m, l = lax.fori_loop(0, n_mine, step, (acc, m, l))
            if split:       # consumer 1 ran one step fewer for an odd n: match the phases
                @pl.when((wg == 1) & (lax.rem(n, jnp.int32(2)) == 1))
                def _():
                    sched_sync()
                    sched_sync()
            pl.when(wg == 0)(sched_sync)

            def finish(acc, m, l):
                # l >= 1 wherever a key is visible; rows that see none: acc = 0, l = 0
                inv = 1.0 / jnp.maximum(l, 1e-30)
                tile[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dtype)
                lse_smem.at[tile_i][...] = (m + jnp.log2(l)) * (1.0 / LOG2E)      # -inf where l = 0
                plgpu.commit_smem()
                for i in range(n_copies):
                    plgpu.copy_smem_to_gmem(tile.at[pl.ds(i * rows_copy, rows_copy)],
                                            out_ref.at[bi, first + i, hk])
                plgpu.copy_smem_to_gmem(lse_smem.at[tile_i], lse_ref.at[bi, hk, pl.ds(row0, ROWS)])
                plgpu.wait_smem_to_gmem(0)

            if not split:
                finish(acc, m, l)
                return
            acc_smem, ml_smem = handover
            (handed,) = merge

            @pl.when(wg == 1)
            def _():
                acc_smem[...] = acc
                ml_smem.at[0][...] = m
                ml_smem.at[1][...] = l
                plgpu.commit_smem()
                plgpu.barrier_arrive(handed)

            @pl.when(wg == 0)
            def _():
                plgpu.barrier_wait(handed)
                m1 = plgpu.load(ml_smem.at[0], layout=plgpu.Layout.WGMMA.reduce(1))
                l1 = plgpu.load(ml_smem.at[1], layout=plgpu.Layout.WGMMA.reduce(1))
                acc1 = plgpu.load(acc_smem, layout=plgpu.Layout.WGMMA)
                m_all = jnp.maximum(m, m1)
                a0, a1 = jnp.exp2(m - m_all), jnp.exp2(m1 - m_all)
                acc_all = (acc * lax.broadcast_in_dim(a0, acc.shape, [0])
                           + acc1 * lax.broadcast_in_dim(a1, acc.shape, [0]))
                finish(acc_all, m_all, l * a0 + l1 * a1)

        @pl.when(wg == _COMPUTE_WGS)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            plgpu.copy_gmem_to_smem(meta_ref.at[bi, hk, ci], meta_smem, meta_loaded)
            plgpu.barrier_wait(meta_loaded)
            n = meta_smem[0, 0]

            def load_k(keys, slot):
                plgpu.copy_gmem_to_smem(k_ref.at[bi, keys, hk], k_smem.at[slot], k_loaded.at[slot])
                plgpu.copy_gmem_to_smem(kpos_ref.at[bi, keys], kpos_smem.at[slot], k_loaded.at[slot])

            def load_v(keys, slot):
                plgpu.copy_gmem_to_smem(v_ref.at[bi, keys, hk], v_smem.at[slot], v_loaded.at[slot])

            def keys_of(u):      # union block u: rows `j * l'` (block-aligned, TMA-legal)
                return pl.ds(entry_at(1, u) * bs, bs)

            for s in range(stages):     # the union may hold fewer than `stages` blocks
                @pl.when(s < n)
                def _(s=s):
                    load_k(keys_of(s), s)
                    load_v(keys_of(s), s)

            @pl.loop(stages, jnp.maximum(n, stages))
            def _(u):
                slot = lax.rem(u, jnp.int32(stages))
                keys = keys_of(u)
                plgpu.barrier_wait(k_consumed.at[slot])
                load_k(keys, slot)
                plgpu.barrier_wait(v_consumed.at[slot])
                load_v(keys, slot)

            if interpret:
                observe_last_phases((k_consumed, v_consumed), n, stages)

    def entry(q_ref, k_ref, v_ref, kpos_ref, qrow_ref, meta_ref, out_ref, lse_ref):
        tr = smem_transforms(plgpu, d, dtype)
        scratch = [
            plgpu.SMEM((n_tiles, ROWS, d), dtype, transforms=tr),
            plgpu.SMEM((stages, bs, d), dtype, transforms=tr),
            plgpu.SMEM((stages, bs, d), dtype, transforms=tr),
            plgpu.SMEM((stages, bs), jnp.int32),
            plgpu.SMEM((geo.meta_rows, _META_W), jnp.int32),
            plgpu.SMEM((n_tiles, ROWS), jnp.int32),
            plgpu.SMEM((n_tiles, ROWS), jnp.float32),
        ]
        barriers = [
            plgpu.Barrier(),                                                  # metadata
            plgpu.Barrier(num_arrivals=n_copies + 1, num_barriers=n_tiles),   # q + positions
            (plgpu.Barrier(num_arrivals=2, num_barriers=stages),              # K + key positions
             plgpu.Barrier(num_barriers=stages)),                             # V
            (plgpu.Barrier(num_arrivals=1 if split else _COMPUTE_WGS, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=_COMPUTE_WGS),
        ]
        if split:           # consumer 1's accumulator, max and sum for consumer 0
            scratch += [plgpu.SMEM((ROWS, d), jnp.float32, transforms=smem_transforms(plgpu, d, jnp.float32)),
                        plgpu.SMEM((2, ROWS), jnp.float32)]
            barriers.append(plgpu.Barrier())
        pl.run_scoped(
            lambda *a: body(q_ref, k_ref, v_ref, kpos_ref, qrow_ref, meta_ref, out_ref, lse_ref, a),
            tuple(scratch), *barriers, collective_axes="wg")

    out, lse = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct(q.shape, dtype),
                  jax.ShapeDtypeStruct((b, geo.hkv, geo.t_p * g), jnp.float32)),
        grid=(n_chunks, geo.hkv, b),
        grid_names=("chunk", "heads", "batch"),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        kernel_name="token_sparse_fwd_mosaic_gpu",
        interpret=interpret,
    )(q, k, v, kv_pos, q_rows, meta)
    return out, lse


def forward(st, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg, indices):
    """`autodiff` forward on unpadded arrays: q `[B, T, H, D]`, k / v `[B, S, Hkv, D]`,
    indices `[B, T, Hkv, K]` -> `(out [B, T, H, D], lse [B, H, T])`."""
    del q_seg, kv_seg
    cfg, geo_bwd = st.config
    geo = geometry(q, k, indices, geo_bwd.block_size, geo_bwd.causal, cfg)
    b, t, h, d = q.shape
    g, c = geo.group, geo.per_copy
    q_pos = blocks.pad_axis(q_pos, geo.t_p, 1, -1)
    idx = blocks.pad_axis(indices, geo.t_p, 1, -1)
    qp = blocks.pad_axis(q, geo.t_p, 1).reshape(b, geo.t_p // c, c, geo.hkv, g, d)
    qp = qp.transpose(0, 1, 3, 2, 4, 5).reshape(b, geo.t_p // c, geo.hkv, c * g, d)
    out, lse = _kernel_call(
        qp, blocks.pad_axis(k, geo.s_p, 1), blocks.pad_axis(v, geo.s_p, 1),
        blocks.pad_axis(kv_pos, geo.s_p, 1, -1), jnp.repeat(q_pos, g, axis=1),
        metadata(geo, idx, q_pos), geo=geo, scale=st.scale, cfg=cfg,
        interpret=st.interpret or None)
    out = out.reshape(b, geo.t_p // c, geo.hkv, c, g, d).transpose(0, 1, 3, 2, 4, 5)
    out = out.reshape(b, geo.t_p, h, d)[:, :t]
    lse = lse.reshape(b, geo.hkv, geo.t_p, g)[:, :, :t].transpose(0, 1, 3, 2).reshape(b, h, t)
    if sinks is not None:
        lse_all = jnp.logaddexp(lse, sinks.astype(jnp.float32)[None, :, None])
        ratio = jnp.exp(lse - lse_all).transpose(0, 2, 1)[..., None]     # [B, T, H, 1]
        out = (out.astype(jnp.float32) * ratio).astype(out.dtype)
        lse = lse_all
    return out, lse


def backward(st, *args):
    """The Triton backward (`triton_vjp`) on this forward's residuals (in Triton's
    interpreter when the forward runs in GPU interpret mode)."""
    from pallas_kernels.token_sparse import triton_vjp  # noqa: PLC0415 - fwd file standalone

    cfg, geo_bwd = st.config
    return triton_vjp.backward(dataclasses.replace(st, config=(cfg.backward, geo_bwd),
                                                   interpret=bool(st.interpret)), *args)


def check_supported(q, k, v, indices, *, block_size, softcap, interpret, config: MosaicGPUConfig):
    """ValueError for anything the kernel does not cover (nothing is compiled)."""
    def no(what):
        raise ValueError(f"token_sparse impl='mosaic_gpu' does not support {what}; use impl='triton'")

    reason = interpret_reason("mosaic_gpu", interpret)
    if reason:
        raise ValueError(f"token_sparse impl='mosaic_gpu': {reason}")
    if softcap is not None:
        no("softcap")
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        no(f"dtype {q.dtype} (bf16 / fp16 only)")
    d, dv = q.shape[3], v.shape[3]
    if d not in (64, 128) or dv != d:
        no(f"head_dim {d} / value head_dim {dv} (64 or 128, equal)")
    g = q.shape[2] // k.shape[2]
    if g not in (4, 8, 16, 32, 64):
        no(f"GQA group {g} (a power of two from 4 to 64: 64 / G tokens per 64-row tile, "
           "2 * 64 / G <= 32 tokens per CTA)")
    if block_size not in (64, 128):
        no(f"block_size {block_size} (64 or 128)")
    union = union_slots(g, indices.shape[3], config.split_kv)
    if 1 + 2 * union // _META_W > 256:
        no(f"{indices.shape[3]} entries per row with G={g} (the chunk's metadata row, one TMA "
           "copy, must stay within 256 rows of 64)")
    stages = config.max_concurrent_steps or 2
    need = smem_bytes(d, block_size, union, stages, config.split_kv)
    if need > SMEM_BYTES:
        no(f"max_concurrent_steps={stages} with block_size {block_size}, head_dim {d} and "
           f"{indices.shape[3]} entries per row ({need} B of SMEM > {SMEM_BYTES})")


def token_sparse_mosaic_gpu(q, k, v, indices, *, block_size, q_positions, kv_positions, causal,
                            sink_logits, softcap, scale, return_lse, interpret=False,
                            config: MosaicGPUConfig | None = None):
    """`token_sparse_reference`'s contract, restricted (see the module docstring), on
    Hopper, or on the CPU in GPU interpret mode (`interpret=plgpu.InterpretGPUParams()`)."""
    cfg = config or MosaicGPUConfig()
    check_supported(q, k, v, indices, block_size=block_size, softcap=softcap,
                    interpret=interpret, config=cfg)
    geo_bwd = triton_fwd.geometry(q, k, v, indices, block_size, causal, cfg.backward.block_k,
                                  cfg.backward.max_rows)
    st = autodiff.Static(
        forward=forward, backward=backward, mask_fn=None, scale=float(scale), softcap=None,
        has_sinks=sink_logits is not None, config=(cfg, geo_bwd), interpret=interpret or False)
    return autodiff.attention(st, q, k, v, sink_logits=sink_logits, q_positions=q_positions,
                              kv_positions=kv_positions, q_segment_ids=None, kv_segment_ids=None,
                              return_lse=return_lse, aux=(indices,))


# Backend declaration for `pallas_kernels.common.resolve`: Hopper only; the calls
# `check_supported` accepts; tiles `MosaicGPUConfig`.
CONFIG = MosaicGPUConfig


def supports(*, q, k, v, indices, block_size, softcap, interpret, config, **_) -> str | None:
    """None when the kernel covers the call, else `check_supported`'s reason."""
    try:
        check_supported(q, k, v, indices, block_size=block_size, softcap=softcap,
                        interpret=interpret, config=config or MosaicGPUConfig())
    except ValueError as e:
        return str(e)
    return None
