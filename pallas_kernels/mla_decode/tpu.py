"""`mla_decode` on TPU: Pallas Mosaic, split-K flash-decoding over the latent cache with
manual DMA gathers (the pattern of `token_sparse/tpu.py`, the grid of `decode/tpu.py`).

Grid `(B, T, num_splits, steps)`, the last axis the reduction ("arbitrary"). Step i of split
s handles the row's tile `lo + i` of `block_k` tokens (`decode.layout.split_range` over the
row's valid tiles, scalar-prefetched; steps past the split's end are skipped):

* sparse: one async copy per listed slot gathers its `c_kv` row (Dc), `k_rope` row (Dr)
  and position into VMEM; unlisted entries copy slot 0 and get position -1 (invisible);
* dense: one contiguous copy of `block_k` slots (the last tile is shifted back to end at
  S, its slots already seen are masked).

All `H` query heads of the token are the rows of the tile (MQA over the one latent head);
scores `q_c c^T + q_r r^T`, values the same `c_kv` rows: `Dc + Dr` values read per token.
The cache stays in HBM (`pl.ANY`), never copied. A float32 partial `(out, lse)` per split,
merged as on GPU (`triton.merge`).

Checked in `pltpu.InterpretParams()` mode on CPU only (no TPU here). On hardware expect
to need H a multiple of 8, Dc and Dr lane-aligned (512, 64: Dr pads to 128 lanes in VMEM)
and double-buffered gathers for speed; none of that is verified.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import AttentionOutput
from pallas_kernels.decode import layout
from pallas_kernels.flash import blocks
from pallas_kernels.mla_decode.layout import merge, row_tiles
from pallas_kernels.tiles_common import LOG2E, MASK_VALUE, NT
from pallas_kernels.tiles_tpu import dot, fold_tile, write_normalized


@dataclasses.dataclass(frozen=True)
class MlaDecodeTpuConfig:
    """`block_k`: tokens per grid step; `num_splits`: default split count (a TensorCore runs
    its grid in sequence, so splitting only helps megacore / tiny batches)."""

    block_k: int = 128
    num_splits: int = 1

    def __post_init__(self):
        if self.block_k < 1 or self.num_splits < 1:
            raise ValueError(f"block_k and num_splits must be >= 1, got {self.block_k}, {self.num_splits}")


@dataclasses.dataclass(frozen=True)
class Geometry:
    s: int
    dc: int
    block_k: int
    sparse: bool
    k_p: int
    num_splits: int


def _kernel(nt_ref, qpos_ref, idx_ref, q_ref, c_hbm, r_hbm, kpos_hbm, o_ref, lse_ref,
            cbuf, rbuf, pbuf, sem, m_sc, l_sc, acc_sc, *, geo: Geometry, scale):
    b, t, sp, i = (pl.program_id(a) for a in range(4))
    row = b * pl.num_programs(1) + t
    lo, hi = layout.split_range(nt_ref[row], sp, geo.num_splits)
    tile = lo + i
    bk = geo.block_k

    @pl.when(i == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def copies(src, dst, n):
        return (pltpu.make_async_copy(c_hbm.at[b, pl.ds(src, n)], cbuf.at[pl.ds(dst, n)], sem.at[0]),
                pltpu.make_async_copy(r_hbm.at[b, pl.ds(src, n)], rbuf.at[pl.ds(dst, n)], sem.at[1]),
                pltpu.make_async_copy(kpos_hbm.at[b, :, pl.ds(src, n)], pbuf.at[:, pl.ds(dst, n)], sem.at[2]))

    def entry(e):
        """(listed?, slot) of entry e of the tile; unlisted entries read slot 0."""
        slot = idx_ref[tile * bk + e]
        ok = (slot >= 0) & (slot < geo.s)
        return ok, jnp.where(ok, slot, 0)

    @pl.when(tile < hi)
    def _step():
        if geo.sparse:
            def start(e, _):
                for cp in copies(entry(e)[1], e, 1):
                    cp.start()

            def wait(e, _):
                for cp in copies(entry(e)[1], e, 1):
                    cp.wait()

            def hide(e, _):                # after all waits: the copies share semaphores
                @pl.when(jnp.logical_not(entry(e)[0]))
                def _():
                    pbuf[:, pl.ds(e, 1)] = jnp.full((1, 1), -1, jnp.int32)

            lax.fori_loop(0, bk, start, None)
            lax.fori_loop(0, bk, wait, None)
            lax.fori_loop(0, bk, hide, None)
            fresh = True
        else:
            first = jnp.minimum(tile * bk, geo.s - bk)         # last tile shifted back to end at S
            cps = copies(first, 0, bk)
            for cp in cps:
                cp.start()
            for cp in cps:
                cp.wait()
            fresh = first + lax.broadcasted_iota(jnp.int32, (1, bk), 1) >= tile * bk
        q_pos = qpos_ref[row]
        kp = pbuf[...]                                                    # [1, bk]
        vis = fresh & (kp >= 0) & (kp <= q_pos) & (q_pos >= 0)
        q = q_ref[...]
        c = cbuf[...]
        s = dot(q[:, :geo.dc], c, NT) + dot(q[:, geo.dc:], rbuf[...], NT)
        s = jnp.where(vis, s * (scale * LOG2E), MASK_VALUE)
        fold_tile(m_sc, l_sc, acc_sc, s, vis, c)

    @pl.when(i == pl.num_programs(3) - 1)
    def _finish():
        write_normalized(m_sc, l_sc, acc_sc, o_ref, lse_ref)


def mla_decode_tpu(q_abs, c_kv, k_rope, *, indices, q_positions, kv_positions, scale, return_lse,
                   num_splits, interpret=False, config: MlaDecodeTpuConfig | None = None):
    """`mla_decode_reference`'s contract on Mosaic TPU (`interpret=True` ->
    `pltpu.InterpretParams()`). Forward only."""
    cfg = config or MlaDecodeTpuConfig()
    if interpret is True:
        interpret = pltpu.InterpretParams()
    b, t, h, _ = q_abs.shape
    s, dc = c_kv.shape[1:]
    dr = k_rope.shape[2]
    n = s if indices is None else indices.shape[2]
    bk = min(cfg.block_k, n)
    k_p = blocks.round_up(n, bk)
    splits = min(num_splits or cfg.num_splits, k_p // bk)
    geo = Geometry(s=s, dc=dc, block_k=bk, sparse=indices is not None, k_p=k_p, num_splits=splits)
    n_tiles = row_tiles(indices, q_positions, kv_positions, bk)
    smem = functools.partial(pl.BlockSpec, memory_space=pltpu.SMEM)
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    idx = None
    if indices is not None:
        idx = blocks.pad_axis(indices, k_p, 2, -1)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(b, t, splits, layout.cdiv(k_p // bk, splits)),
        in_specs=[
            None if idx is None else smem((None, None, k_p), lambda b_, t_, s_, i, *_: (b_, t_, 0)),
            pl.BlockSpec((None, None, h, dc + dr), lambda b_, t_, s_, i, *_: (b_, t_, 0, 0)),
            hbm, hbm, hbm,
        ],
        out_specs=[pl.BlockSpec((None, None, None, h, dc), lambda b_, t_, s_, i, *_: (b_, s_, t_, 0, 0)),
                   pl.BlockSpec((None, None, None, h, 1), lambda b_, t_, s_, i, *_: (b_, s_, t_, 0, 0))],
        scratch_shapes=[pltpu.VMEM((bk, dc), c_kv.dtype), pltpu.VMEM((bk, dr), k_rope.dtype),
                        pltpu.VMEM((1, bk), jnp.int32), pltpu.SemaphoreType.DMA((3,)),
                        pltpu.VMEM((h, 1), jnp.float32), pltpu.VMEM((h, 1), jnp.float32),
                        pltpu.VMEM((h, dc), jnp.float32)])
    o_part, lse_part = pl.pallas_call(
        functools.partial(_kernel, geo=geo, scale=float(scale)),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, splits, t, h, dc), jnp.float32),
                   jax.ShapeDtypeStruct((b, splits, t, h, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret or False,
        name="mla_decode_sparse_tpu" if geo.sparse else "mla_decode_dense_tpu",
    )(n_tiles, q_positions.reshape(-1), idx, q_abs, c_kv, k_rope, kv_positions[:, None, :])
    out, lse = merge(o_part, lse_part[..., 0], t=t, h=h, dc=dc, dtype=q_abs.dtype)
    return AttentionOutput(out, lse) if return_lse else out


# Backend declaration for `pallas_kernels.common.resolve`: a TPU (or interpret mode); every call the api
# accepts; tiles `MlaDecodeTpuConfig`.
CONFIG = MlaDecodeTpuConfig
