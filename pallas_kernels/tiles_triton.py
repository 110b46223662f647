"""Tile helpers shared by the Pallas Triton kernels of several ops (`*/triton*.py`).

How a head dimension is cut into power-of-two pieces (Triton tiles are powers of two), how
many GQA rows one program holds, the backward's recomputation of the probabilities from
the saved base-2 log-sum-exp (FlashAttention-2, arXiv 2307.08691, Alg. 2) and the block
specs of its dK/dV pass.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

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


def dkv_block_specs(tq_p: int, bk: int, group: int, d_p: int, dv_p: int, segments: bool):
    """BlockSpecs of a dK/dV `pallas_call` on the grid (KV tiles, B, KV heads), after the
    caller's own table operands: `(in_specs, out_specs)` for the operands `q_pos [B, Tq_p]`,
    `kv_pos [B, Tk_p]`, the two segment-id rows (None without `segments`), `q`, `k`, `v`,
    `dO` (q and dO grouped `[B, Tq_p, Hkv, G, D]`), the base-2 lse and delta `[B, Hkv, G,
    Tq_p]`; out dk `[B, Tk_p, Hkv, D_p]` and dv. Every query row is read whole; keys in
    tiles of `bk`."""
    row_q = pl.BlockSpec((None, tq_p), lambda j, b_, h_: (b_, 0))
    row_k = pl.BlockSpec((None, bk), lambda j, b_, h_: (b_, j))
    in_specs = [
        row_q, row_k, row_q if segments else None, row_k if segments else None,
        pl.BlockSpec((None, tq_p, None, group, d_p), lambda j, b_, h_: (b_, 0, h_, 0, 0)),
        pl.BlockSpec((None, bk, None, d_p), lambda j, b_, h_: (b_, j, h_, 0)),
        pl.BlockSpec((None, bk, None, dv_p), lambda j, b_, h_: (b_, j, h_, 0)),
        pl.BlockSpec((None, tq_p, None, group, dv_p), lambda j, b_, h_: (b_, 0, h_, 0, 0)),
        pl.BlockSpec((None, None, group, tq_p), lambda j, b_, h_: (b_, h_, 0, 0)),
        pl.BlockSpec((None, None, group, tq_p), lambda j, b_, h_: (b_, h_, 0, 0)),
    ]
    out_specs = [pl.BlockSpec((None, bk, None, d_p), lambda j, b_, h_: (b_, j, h_, 0)),
                 pl.BlockSpec((None, bk, None, dv_p), lambda j, b_, h_: (b_, j, h_, 0))]
    return in_specs, out_specs
