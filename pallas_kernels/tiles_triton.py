"""Tile helpers shared by the Pallas Triton kernels of several ops (`*/triton*.py`).

How a head dimension is cut into power-of-two pieces (Triton tiles are powers of two), how
many GQA rows one program holds, and the backward's recomputation of the probabilities
from the saved base-2 log-sum-exp (FlashAttention-2, arXiv 2307.08691, Alg. 2).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.tiles_common import NT, logits2


def pieces(width: int) -> tuple:
    """Power-of-two `(start, width)` pieces of `width` (a multiple of 16), largest first."""
    out, start = [], 0
    while start < width:
        w = 1 << ((width - start).bit_length() - 1)
        out.append((start, w))
        start += w
    return tuple(out)


def row_split(group_p: int, width: int, max_rows: int) -> int:
    """Rows per program: `max_rows` if set, else the most (>= 16) whose q tile and
    accumulator, `rows * (D_p + Dv_p)` elements, stay under 40K (DSA's 64 heads x
    (576 + 512) -> 32 rows, two programs per token; NSA's 16 x 256 -> one)."""
    rows = group_p
    while rows > 16 and (rows > max_rows if max_rows else rows * width > 40960):
        rows //= 2
    return rows


def recompute_probs(q_or_k, k_or_q, lse2_row_or_col, scale, softcap, vis):
    """P (or P^T) recomputed from the logits and the base-2 lse; tanh for the softcap."""
    s, t = logits2(lax.dot_general(q_or_k, k_or_q, NT, preferred_element_type=jnp.float32),
                   scale, softcap)
    p = jnp.exp2(s - lse2_row_or_col)
    if vis is not None:
        p = jnp.where(vis, p, 0.0)
    return p, t
