"""`compressed` on TPU: the output from the `flash` Mosaic TPU kernel, the group-summed
probabilities from a Pallas Mosaic score kernel (NSA's compressed branch, arXiv 2502.11089).

Output, lse and the output's gradient: `flash_attention(..., mask_fn=causal,
return_lse=True, impl="mosaic_tpu")` with the compressed-branch predicate
(`kv_pos <= q_pos`, `tiles_common.causal`).

Score kernel: grid `(B * Hkv, nQ, nK)`, every axis "parallel" (each output tile is written
once). A step loads the key tile `[bk, D]` once and loops over the G query heads of the
group (`lax.fori_loop`), adding `exp2(q k^T * scale * log2(e) - lse2)` (masked) into a
`[bq, bk]` float32 VMEM scratch, then writes it once: the per-head `[B, H, T, N]`
probabilities never reach HBM. Which key tiles a query tile can see comes from the
`flash` block tables (`blocks.tables`, scalar-prefetched): tiles wholly in the causal
future (or wholly padding) write zeros without a dot, and their key index map repeats a
visited tile (no DMA); tiles where every element is visible skip the element mask.

Layout inside: `q [B, Hkv, G, T, D]`, `k [B, Hkv, N, D]`, lse `[B, Hkv, G, T, 1]` (base 2,
1e30 on rows that see nothing, as in `flash.autodiff`), positions as a column `[B, T, 1]`
and a row `[B, 1, N]`. The query tile is `bq = min(block_q, round_up(T, 8))` (T padded to
a multiple of it), N is padded to a multiple of `block_k`.

Checked in `pltpu.InterpretParams()` mode on CPU only (this workplace has no TPU). Not
verified on hardware: the Mosaic tiling rules (`block_q` a multiple of 8, `block_k` a
multiple of 128, enforced by `TpuConfig`; bf16 inputs may want `block_q` a multiple of 16
(packed sublanes); D taken whole, expected to want a multiple of 128 for speed), the
dynamic index `q_ref[g]` over the group axis, VMEM fit at large G
(the `[G, bq, D]` query block is double-buffered: G=16, bq=128, D=128 bf16 is 1 MiB), and
speed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash import blocks, flash_attention
from pallas_kernels.tiles_common import LOG2E, NT, causal
from pallas_kernels.tiles_tpu import dot


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """Score-kernel tiles: `block_q` query rows (sublanes, multiple of 8), `block_k`
    compressed keys (lanes, multiple of 128). The flash kernel uses its own defaults."""

    block_q: int = 128
    block_k: int = 128

    def __post_init__(self):
        if self.block_q < 8 or self.block_q % 8:
            raise ValueError(f"block_q must be a positive multiple of 8, got {self.block_q}")
        if self.block_k < 128 or self.block_k % 128:
            raise ValueError(f"block_k must be a positive multiple of 128, got {self.block_k}")


def _score_kernel(tab_ref, qpos_ref, kpos_ref, lse_ref, q_ref, k_ref, p_ref, acc_sc, *,
                  group: int, scale2: float, hkv: int, nq: int):
    bh, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    base = ((bh // hkv) * nq + i) * 4
    lo, flo, fhi, hi = (tab_ref[base + c] for c in range(4))
    run = (j >= lo) & (j < hi)
    full = run & (j >= flo) & (j < fhi)

    @pl.when(jnp.logical_not(run))
    def _skip():
        p_ref[...] = jnp.zeros(p_ref.shape, p_ref.dtype)

    def step(masked):
        k = k_ref[...]
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

        def head(g, carry):
            s = dot(q_ref[g], k, NT) * scale2                           # [bq, bk]
            acc_sc[...] += jnp.exp2(s - lse_ref[g])                       # lse2 [bq, 1]
            return carry

        lax.fori_loop(0, group, head, 0)
        acc = acc_sc[...]
        if masked:
            qp, kp = qpos_ref[...], kpos_ref[...]                          # [bq, 1], [1, bk]
            acc = jnp.where(blocks.visible(causal, qp, kp, None, None), acc, 0.0)
        p_ref[...] = acc

    pl.when(full)(lambda: step(False))
    pl.when(run & jnp.logical_not(full))(lambda: step(True))


def group_probabilities(q, k, lse, q_positions, kv_positions, *, scale: float, interpret=False,
                        config: TpuConfig | None = None):
    """`sum_g exp(q_g k^T * scale - lse_g)` under the causal mask: `[B, Hkv, T, N]` float32.

    q `[B, T, H, D]`, k `[B, N, Hkv, D]`, lse `[B, H, T]` (natural log, -inf on rows that
    see nothing), positions int `[B, T]`, `[B, N]` (negative = padding).
    """
    cfg = config or TpuConfig()
    b, t, h, d = q.shape
    n, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    bq, bk = min(cfg.block_q, blocks.round_up(t, 8)), cfg.block_k
    t_p, n_p = blocks.round_up(t, bq), blocks.round_up(n, bk)
    nq, nk = t_p // bq, n_p // bk
    qx = blocks.pad_axis(q, t_p, 1).transpose(0, 2, 1, 3).reshape(b, hkv, g, t_p, d)
    kx = blocks.pad_axis(k, n_p, 1).transpose(0, 2, 1, 3)                  # [B, Hkv, N_p, D]
    lse2 = jnp.where(jnp.isfinite(lse), lse.astype(jnp.float32) * LOG2E, 1e30)
    lse2 = blocks.pad_axis(lse2, t_p, 2, 1e30).reshape(b, hkv, g, t_p, 1)
    qpos = blocks.pad_axis(jnp.asarray(q_positions, jnp.int32), t_p, 1, -1)
    kpos = blocks.pad_axis(jnp.asarray(kv_positions, jnp.int32), n_p, 1, -1)
    tab = blocks.tables(causal, qpos, kpos, None, None, bq, bk).reshape(-1)  # [B * nQ * 4]

    def key_tile(bh, i, j, tab_ref):
        """j clamped to the query tile's visited range: skipped tiles repeat a block (no DMA)."""
        base = ((bh // hkv) * nq + i) * 4
        lo, hi = tab_ref[base], tab_ref[base + 3]
        return jnp.minimum(jnp.maximum(j, lo), jnp.maximum(hi - 1, lo))

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(b * hkv, nq, nk),
        in_specs=[
            pl.BlockSpec((None, bq, 1), lambda bh, i, j, tb: (bh // hkv, i, 0)),
            pl.BlockSpec((None, 1, bk), lambda bh, i, j, tb: (bh // hkv, 0, key_tile(bh, i, j, tb))),
            pl.BlockSpec((None, None, g, bq, 1), lambda bh, i, j, tb: (bh // hkv, bh % hkv, 0, i, 0)),
            pl.BlockSpec((None, None, g, bq, d), lambda bh, i, j, tb: (bh // hkv, bh % hkv, 0, i, 0)),
            pl.BlockSpec((None, None, bk, d),
                         lambda bh, i, j, tb: (bh // hkv, bh % hkv, key_tile(bh, i, j, tb), 0)),
        ],
        out_specs=pl.BlockSpec((None, None, bq, bk), lambda bh, i, j, tb: (bh // hkv, bh % hkv, i, j)),
        scratch_shapes=[pltpu.VMEM((bq, bk), jnp.float32)])
    p = pl.pallas_call(
        functools.partial(_score_kernel, group=g, scale2=float(scale) * LOG2E, hkv=hkv, nq=nq),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, hkv, t_p, n_p), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 3),
        interpret=interpret,
        name="compressed_scores_tpu",
    )(tab, qpos[:, :, None], kpos[:, None, :], lse2, qx, kx)
    return p[:, :, :t, :n]


def compressed_tpu(q, k, v, *, q_positions, kv_positions, scale, interpret=False,
                   config: TpuConfig | None = None):
    """`compressed_reference`'s contract on Mosaic TPU: flash (Mosaic TPU) output + lse,
    then the scores (`interpret=True` -> `pltpu.InterpretParams()`)."""
    if interpret is True:
        interpret = pltpu.InterpretParams()
    res = flash_attention(q, k, v, mask_fn=causal, q_positions=q_positions, kv_positions=kv_positions,
                          scale=scale, return_lse=True, impl="mosaic_tpu", interpret=interpret)
    sg = jax.lax.stop_gradient
    p = group_probabilities(sg(q), sg(k), sg(res.lse), q_positions, kv_positions, scale=scale,
                            interpret=interpret or False, config=config)
    return res.out, p


# Backend declaration for `pallas_kernels.common.resolve`: a TPU (or interpret mode); every call the api
# accepts; tiles `TpuConfig`.
CONFIG = TpuConfig
