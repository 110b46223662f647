"""Tile helpers shared by the Mosaic TPU kernels (`*/tpu.py`, `*/tpu_vjp.py`).

`dot` (float32 accumulation) and the two halves of the FlashAttention-2 online softmax in
base 2 (arXiv 2307.08691): `fold_tile` folds one tile of logits into the running max, sum
and accumulator held in VMEM scratch, `write_normalized` writes `acc / l` and the lse.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.tiles_common import LOG2E, NN


def dot(a, b, dims):
    """`jax.lax.dot_general(a, b, dims)` accumulated in float32."""
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def fold_tile(m_sc, l_sc, acc_sc, s, vis, v):
    """One FlashAttention-2 online-softmax step in base 2: fold the logits `s [M, N]`
    (`log2 e`-scaled, hidden entries `MASK_VALUE`, `vis` bool) and values `v [N, Dv]` into the
    running max `m_sc [M, 1]`, sum `l_sc [M, 1]` and accumulator `acc_sc [M, Dv]` (float32)."""
    m_old = m_sc[...]
    m_new = jnp.maximum(m_old, s.max(axis=-1, keepdims=True))
    alpha = jnp.exp2(m_old - m_new)
    p = jnp.where(vis, jnp.exp2(s - m_new), 0.0)
    m_sc[...] = m_new
    l_sc[...] = l_sc[...] * alpha + p.sum(axis=-1, keepdims=True)
    acc_sc[...] = acc_sc[...] * alpha + dot(p.astype(v.dtype), v, NN)


def write_normalized(m_sc, l_sc, acc_sc, o_ref, lse_ref):
    """`o_ref = acc / l` (in o_ref's dtype; zeros where a row saw nothing) and `lse_ref` the
    natural log-sum-exp (-inf on empty rows), from `fold_tile`'s scratch."""
    l = l_sc[...]
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, (m_sc[...] + jnp.log2(l_safe)) * (1.0 / LOG2E), -jnp.inf)
