"""Selection metadata the `token_sparse` kernels build in XLA: the inverted index of the
selection, per KV block the query tokens that list it (the Triton and Mosaic TPU backward
kernels: the dK/dV pass runs over KV blocks and gathers those tokens), and the union of
the blocks a chunk of consecutive query tokens lists (the Mosaic GPU forward: one load of
a block serves every token of the chunk that lists it)."""

from __future__ import annotations

import jax
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


def union_blocks(indices, q_pos, nblk: int, tokens: int):
    """Per chunk of `tokens` consecutive query tokens (and batch, kv head), the union of the
    KV blocks its tokens list, deduplicated and ascending, and which tokens listed each.

    Args: `indices [B, T, Hkv, K]` with `T` a multiple of `tokens` (padded entries negative
    or >= nblk; a block a row lists twice counts once), `q_pos [B, T]` (negative: padding
    query, its entries left out); `tokens <= 32` (one int32 bit per token).
    Returns: `(blocks, bits, count)`: `blocks [B, Hkv, C, U]` int32 (C = T / tokens chunks,
    U = tokens * K slots; the first `count` ascending, the rest 0), `bits [B, Hkv, C, U]`
    int32 (bit i of slot u set iff token i of the chunk lists `blocks[..., u]`), `count
    [B, Hkv, C]` int32. Two row sorts of U entries and a sorted segment sum: O(B T Hkv K).
    """
    b, t, hkv, k = indices.shape
    c, u = t // tokens, tokens * k
    valid = (indices >= 0) & (indices < nblk) & (q_pos >= 0)[:, :, None, None]
    key = jnp.where(valid, indices, nblk).astype(jnp.int32)
    key = key.reshape(b, c, tokens, hkv, k).transpose(0, 3, 1, 2, 4).reshape(b, hkv, c, u)
    tok = jnp.broadcast_to(jnp.repeat(jnp.arange(tokens, dtype=jnp.int32), k), key.shape)
    key, tok = lax.sort((key, tok), dimension=3, num_keys=2)
    prev = jnp.concatenate([jnp.full(key.shape[:3] + (1,), -1, jnp.int32), key[..., :-1]], -1)
    prev_tok = jnp.concatenate([jnp.full(key.shape[:3] + (1,), -1, jnp.int32), tok[..., :-1]], -1)
    real = key < nblk
    new = real & (key != prev)                                   # first entry of a block
    once = real & ((key != prev) | (tok != prev_tok))            # a (block, token) pair once
    slot = jnp.cumsum(new, axis=-1, dtype=jnp.int32) - 1         # its union slot
    count = slot[..., -1] + 1
    seg = (jnp.arange(b * hkv * c, dtype=jnp.int32).reshape(b, hkv, c, 1) * u
           + jnp.maximum(slot, 0))
    bit = jnp.where(once, jnp.left_shift(jnp.int32(1), tok), 0)
    bits = jax.ops.segment_sum(bit.reshape(-1), seg.reshape(-1), num_segments=b * hkv * c * u,
                               indices_are_sorted=True).reshape(b, hkv, c, u)
    blocks = jnp.zeros((b * hkv * c * u,), jnp.int32).at[
        jnp.where(new, seg, b * hkv * c * u).reshape(-1)].set(key.reshape(-1), mode="drop")
    return blocks.reshape(b, hkv, c, u), bits, count.astype(jnp.int32)
