"""Lightning-indexer scores of one query chunk on TPU (Pallas Mosaic TPU).

Grid (batch, query tile, key tile), all parallel; per tile the `H_I` MXU dots `[bq, D_I] x
[D_I, bk]`, ReLU and weighted head sum stay in VMEM/vregs (`common_tile.tile_scores`); only
the float32 `[C, S]` chunk scores are written. Tiles are multiples of 128 (lane width);
inputs are padded to them (padding positions -1 = invisible).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash import blocks
from pallas_kernels.indexer.common_tile import tile_scores


def _kernel(qp_ref, kp_ref, q_ref, w_ref, k_ref, o_ref, *, num_heads):
    w = w_ref[...].astype(jnp.float32)                        # [bq, H]
    o_ref[...] = tile_scores(lambda j: q_ref[j], lambda j: w[:, j:j + 1], k_ref[...], num_heads,
                             qp_ref[...], kp_ref[...])


def chunk_scores_tpu(q_index, weights, k_index, q_positions, kv_positions, *, interpret=False,
                     block_q: int = 128, block_k: int = 128):
    """`chunk_scores_reference`'s contract on Mosaic TPU (`interpret=True` ->
    `pltpu.InterpretParams()`)."""
    if interpret is True:
        interpret = pltpu.InterpretParams()
    b, c, h, d = q_index.shape
    s = k_index.shape[1]
    cp, sp = blocks.round_up(c, block_q), blocks.round_up(s, block_k)
    q = jnp.pad(jnp.moveaxis(q_index, 2, 1), [(0, 0), (0, 0), (0, cp - c), (0, 0)])        # [B, H, C, D]
    w = jnp.pad(weights, [(0, 0), (0, cp - c), (0, 0)])                                    # [B, C, H]
    k = jnp.pad(k_index, [(0, 0), (0, sp - s), (0, 0)]).astype(q.dtype)
    qp = jnp.pad(q_positions.astype(jnp.int32), [(0, 0), (0, cp - c)], constant_values=-1)[:, :, None]
    kp = jnp.pad(kv_positions.astype(jnp.int32), [(0, 0), (0, sp - s)], constant_values=-1)[:, None, :]
    out = pl.pallas_call(
        functools.partial(_kernel, num_heads=h),
        grid=(b, cp // block_q, sp // block_k),
        in_specs=[pl.BlockSpec((None, block_q, 1), lambda b_, i, j: (b_, i, 0)),
                  pl.BlockSpec((None, 1, block_k), lambda b_, i, j: (b_, 0, j)),
                  pl.BlockSpec((None, h, block_q, d), lambda b_, i, j: (b_, 0, i, 0)),
                  pl.BlockSpec((None, block_q, h), lambda b_, i, j: (b_, i, 0)),
                  pl.BlockSpec((None, block_k, d), lambda b_, i, j: (b_, j, 0))],
        out_specs=pl.BlockSpec((None, block_q, block_k), lambda b_, i, j: (b_, i, j)),
        out_shape=jax.ShapeDtypeStruct((b, cp, sp), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=interpret or False,
        name="indexer_scores_tpu",
    )(qp, kp, q, w, k)
    return out[:, :c, :s]


# Backend declaration for `pallas_kernels.common.resolve`: a TPU (or interpret mode); every call the api
# accepts but FP8 scores; tiles none.
CONFIG = None


def supports(*, score_dtype="bfloat16", **_):
    """None, or why this backend cannot run the call (FP8 scores are not implemented here)."""
    if score_dtype != "bfloat16":
        return f"score_dtype={score_dtype!r} is not implemented on Mosaic TPU"
    return None
