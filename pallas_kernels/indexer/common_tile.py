"""The score tile shared by the Triton and Mosaic TPU kernels."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.tiles_common import NT


def tile_scores(q_head, w_head, k, num_heads: int, qp_col, kp_row, k_scale_row=None):
    """`[bq, bk]` float32 scores of one tile, the head sum kept in registers.

    q_head(j) -> `[bq, D]` queries of head j; w_head(j) -> `[bq, 1]` float32 weights;
    k `[bk, D]`; qp_col `[bq, 1]`, kp_row `[1, bk]` int32 positions; k_scale_row: None, or
    `[1, bk]` float32 key scales multiplied in after the head sum (FP8 scores, `fp8.py`: q and
    k in e4m3, the dot accumulating in float32, the query scales already in the weights).
    """
    acc = jnp.zeros((qp_col.shape[0], k.shape[0]), jnp.float32)
    for j in range(num_heads):                 # static: H_I is small (4..64)
        dots = lax.dot_general(q_head(j), k, NT, preferred_element_type=jnp.float32)
        acc = acc + w_head(j) * jnp.maximum(dots, 0.0)
    if k_scale_row is not None:
        acc = acc * k_scale_row
    vis = (qp_col >= 0) & (kp_row >= 0) & (kp_row <= qp_col)
    return jnp.where(vis, acc, -jnp.inf)
