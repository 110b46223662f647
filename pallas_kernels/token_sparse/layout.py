"""What the `token_sparse` backward kernels (Triton and Mosaic TPU) share: the inverted
index of the selection, per KV block the query tokens that list it (the dK/dV pass runs
over KV blocks and gathers those tokens)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def inverted_index(indices, q_pos, nblk: int):
    """For each (batch, kv head, KV block) the query tokens that list it.

    Args: `indices [B, T, Hkv, K]` (padded entries negative or >= nblk), `q_pos [B, T]`
    (negative: padding query, left out).
    Returns: `(tokens [B * T * Hkv * K] int32, start [B * Hkv * nblk], count [B * Hkv * nblk])`:
    the tokens of block `(b * Hkv + h) * nblk + j` are `tokens[start : start + count]`,
    ascending (the stable sort keeps token order); the tail of `tokens` is padding.
    """
    b, t, hkv, n = indices.shape
    nseg = b * hkv * nblk
    valid = (indices >= 0) & (indices < nblk) & (q_pos >= 0)[:, :, None, None]
    seg = ((jnp.arange(b)[:, None, None, None] * hkv + jnp.arange(hkv)[None, None, :, None])
           * nblk + indices)
    seg = jnp.where(valid, seg, nseg).astype(jnp.int32).reshape(-1)
    tok = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :, None, None], indices.shape)
    _, tokens = lax.sort((seg, tok.reshape(-1)), num_keys=1, is_stable=True)
    count = jnp.bincount(seg, length=nseg + 1)[:nseg].astype(jnp.int32)
    start = (jnp.cumsum(count) - count).astype(jnp.int32)
    return tokens, start, count
