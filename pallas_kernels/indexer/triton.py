"""Lightning-indexer scores of one query chunk on GPU: Pallas with the Triton lowering.

One program per (batch, query tile, key tile): for each of the `H_I` indexer heads a
`[bq, D_I] x [D_I, bk]` tensor-core dot, ReLU, times the head's weight, summed in
registers, so the per-head products `[C, H_I, S]` never reach HBM; only the `[C, S]` float32
scores of the chunk are written. A tile with no visible key (every key later than every
query of the tile, or padding) writes -inf without computing.

FP8 scores (`k_scale` given; operands from `fp8.quantize_indexer`): the e4m3 q and k tiles
go to the dot as they are (jax 0.11.2's Pallas Triton lowering emits `tt.dot` on two
`f8E4M3FN` operands with a float32 accumulator, the FP8 wgmma on Hopper; e4m3 needs compute
capability >= 8.9), or, with `IndexerTritonConfig(fp8_dot=False)`, widened to bf16 in
registers first (exact) and dotted in bf16: the same scores at bf16 tensor-core speed, for
GPUs without FP8 tensor cores. The key scales multiply the head sum once per score.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash import blocks
from pallas_kernels.indexer.common_tile import tile_scores
from pallas_kernels.tiles_common import BIG


@dataclasses.dataclass(frozen=True)
class IndexerTritonConfig:
    """Tile sizes (powers of two >= 16) and launch parameters of the score kernel."""

    block_q: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 2
    fp8_dot: bool = True        # FP8 scores: e4m3 x e4m3 dot (True) or widened to bf16 (False)

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            val = getattr(self, name)
            if not (isinstance(val, int) and val >= 16 and val & (val - 1) == 0):
                raise ValueError(f"{name} must be a power of two >= 16, got {val!r}")
        if self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"num_warps and num_stages must be >= 1, got {self.num_warps}, {self.num_stages}")


def _kernel(qp_ref, kp_ref, q_ref, w_ref, k_ref, *rest, num_heads, widen):
    ks_ref, o_ref = rest if len(rest) == 2 else (None, rest[0])
    qp, kp = qp_ref[...], kp_ref[...]
    kmin = jnp.min(jnp.where(kp >= 0, kp, BIG))
    any_visible = jnp.max(qp) >= kmin

    @pl.when(any_visible)
    def _():
        cast = (lambda x: x.astype(jnp.bfloat16)) if widen else (lambda x: x)  # noqa: E731
        o_ref[...] = tile_scores(lambda j: cast(q_ref[j]), lambda j: w_ref[j].astype(jnp.float32)[:, None],
                                 cast(k_ref[...]), num_heads, qp[:, None], kp[None, :],
                                 None if ks_ref is None else ks_ref[...][None, :])

    @pl.when(jnp.logical_not(any_visible))
    def _():
        o_ref[...] = jnp.full(o_ref.shape, -jnp.inf, jnp.float32)


def chunk_scores_triton(q_index, weights, k_index, q_positions, kv_positions, *, k_scale=None,
                        interpret=False, config: IndexerTritonConfig | None = None):
    """`chunk_scores_reference`'s contract on the Triton kernel (float32 `[B, C, S]`); with
    `k_scale [B, S]` float32, `fp8.chunk_scores_fp8`'s (q_index, k_index e4m3, weights the
    query-scaled head weights)."""
    cfg = config or IndexerTritonConfig()
    b, c, h, d = q_index.shape
    s = k_index.shape[1]
    fp8 = k_scale is not None
    bq, bk = blocks.pow2_block(cfg.block_q, c), blocks.pow2_block(cfg.block_k, s)
    # e4m3 dots take K a multiple of 32 (m16n8k32 / wgmma k32)
    cp, sp, dp = blocks.round_up(c, bq), blocks.round_up(s, bk), max(32 if fp8 else 16, blocks.pl_next_pow2(d))
    q = jnp.pad(jnp.moveaxis(q_index, 2, 1), [(0, 0), (0, 0), (0, cp - c), (0, dp - d)])   # [B, H, C, D]
    w = jnp.pad(jnp.moveaxis(weights, 2, 1), [(0, 0), (0, 0), (0, cp - c)])                # [B, H, C]
    k = jnp.pad(k_index, [(0, 0), (0, sp - s), (0, dp - d)]).astype(q.dtype)
    qp = jnp.pad(q_positions.astype(jnp.int32), [(0, 0), (0, cp - c)], constant_values=-1)
    kp = jnp.pad(kv_positions.astype(jnp.int32), [(0, 0), (0, sp - s)], constant_values=-1)
    extra, extra_specs = (), []
    if fp8:
        extra = (jnp.pad(k_scale.astype(jnp.float32), [(0, 0), (0, sp - s)]),)
        extra_specs = [pl.BlockSpec((None, bk), lambda b_, i, j: (b_, j))]
    out = pl.pallas_call(
        functools.partial(_kernel, num_heads=h, widen=fp8 and not cfg.fp8_dot),
        grid=(b, cp // bq, sp // bk),
        in_specs=[pl.BlockSpec((None, bq), lambda b_, i, j: (b_, i)),
                  pl.BlockSpec((None, bk), lambda b_, i, j: (b_, j)),
                  pl.BlockSpec((None, h, bq, dp), lambda b_, i, j: (b_, 0, i, 0)),
                  pl.BlockSpec((None, h, bq), lambda b_, i, j: (b_, 0, i)),
                  pl.BlockSpec((None, bk, dp), lambda b_, i, j: (b_, j, 0))] + extra_specs,
        out_specs=pl.BlockSpec((None, bq, bk), lambda b_, i, j: (b_, i, j)),
        out_shape=jax.ShapeDtypeStruct((b, cp, sp), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="indexer_scores_fp8" if fp8 else "indexer_scores",
    )(qp, kp, q, w, k, *extra)
    return out[:, :c, :s]


# Backend declaration for `pallas_kernels.common.resolve`: a GPU (or interpret mode); every call the api
# accepts; tiles `IndexerTritonConfig` (the score kernel).
CONFIG = IndexerTritonConfig
