"""Tile helpers that every backend's kernels share (Pallas Triton, Mosaic TPU, Mosaic GPU).

Plain jnp on one tile: the `dot_general` dimension numbers of the three matmul forms, the
logits in base-2 units with the optional soft-cap (FlashAttention-2's `exp2` online softmax,
arXiv 2307.08691; Gemma 2's logit soft-cap, arXiv 2408.00118), the causal predicate on
positions, the masked-logit value and `BIG`, a bound above any position. Backend-specific helpers live in
`tiles_triton.py` / `tiles_tpu.py`; this module imports nothing from `pallas_kernels`, so
any kernel file may import it.
"""

from __future__ import annotations

import jax.numpy as jnp

LOG2E = 1.4426950408889634     # log2(e): logits are kept in base 2 (`exp2` is cheaper)
# Finite "minus infinity" for masked logits: exp2(MASK - m) == 0 for any real m and
# MASK - MASK stays finite (no NaN on rows that have seen nothing yet); small enough in
# magnitude to be multiplied by a logit scale without overflowing to -inf.
MASK_VALUE = -1e30
BIG = 2**30                    # above any position: the neutral element of a min over them

NT = (((1,), (1,)), ((), ()))  # dot_general dims of a @ b^T
NN = (((1,), (0,)), ((), ()))  # a @ b
TN = (((0,), (0,)), ((), ()))  # a^T @ b


def logits2(s, scale, softcap):
    """Raw `q . k` (float32) -> logits in base-2 units, and tanh (for the softcap grad)."""
    if softcap is None:
        return s * (scale * LOG2E), None
    t = jnp.tanh(s * (scale / softcap))
    return t * (softcap * LOG2E), t


def causal(q_pos, kv_pos, q_seg, kv_seg):
    """Kernel-level causal predicate `kv_pos <= q_pos` (a plain hashable function, the
    `mask_fn` form the kernels take); e.g. the compressed branch's keys carry the position
    of their block's last token."""
    del q_seg, kv_seg
    return kv_pos <= q_pos


def split_bf16x3(x):
    """float32 `x` -> three bfloat16 pieces `(hi, mid, lo)` whose float32 sum is exactly x
    (8 + 8 + 8 mantissa bits): a float32 operand for bfloat16 tensor-core dots that lose
    no bit (nsa_select's exact 0/1 selector dots, the pooled flash's 0/w pooling dot)."""
    hi = x.astype(jnp.bfloat16)
    rest = x - hi.astype(jnp.float32)
    mid = rest.astype(jnp.bfloat16)
    return hi, mid, (rest - mid.astype(jnp.float32)).astype(jnp.bfloat16)
