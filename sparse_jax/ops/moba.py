"""MoBA (Moonshot, Mixture of Block Attention) as pure functions over projected q/k/v.

Gating per query *token* (the paper's formulation): each fully past KV block j is scored
by `q_t . mean(k of block j)`; the top-k of those plus the query's own block (causal
inside) are attended. The scores are summed over the heads of a GQA group so the group
shares one selection (the `block_sparse` metadata is per kv-head; with MHA this is the
paper's per-head gate). Attention runs through `selected_block_attention` (see
`sparse_jax.ops.hysparse`): `query_block = 1` (exact per token) on the `token_sparse` op,
`query_block > 1` (union over query blocks) on `block_sparse`. Blocks are by array index of
the KV, which the layer keeps in position-indexed slots.
"""

from __future__ import annotations

import jax.numpy as jnp

from sparse_jax.ops.hysparse import select_top_blocks, selected_block_attention


def moba_select(q, k, q_positions, kv_positions, *, block_size: int, top_k: int):
    """MoBA gate: per query token, top-`top_k` fully past blocks by `q . mean(k)` (summed
    over the GQA group) plus the query's own block. -> `[B, Hkv, Tq, top_k + 1]`."""
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    nk = -(-tk // block_size)
    valid = (kv_positions >= 0).astype(jnp.float32)
    kp = jnp.pad(k.astype(jnp.float32) * valid[..., None, None],
                 ((0, 0), (0, nk * block_size - tk), (0, 0), (0, 0)))
    cnt = jnp.pad(valid, ((0, 0), (0, nk * block_size - tk))).reshape(b, nk, block_size).sum(-1)
    kmean = kp.reshape(b, nk, block_size, hkv, d).sum(2) / jnp.maximum(cnt, 1.0)[..., None, None]
    qg = q.astype(jnp.float32).reshape(b, tq, hkv, h // hkv, d)
    scores = jnp.einsum("btgjd,bngd->bgtn", qg, kmean)                        # [B, Hkv, Tq, nK]
    own = jnp.where(q_positions >= 0, q_positions // block_size, -1)           # [B, Tq]
    past = (jnp.arange(nk)[None, None, :] < own[:, :, None]) & (cnt[:, None, :] > 0)
    picked = select_top_blocks(scores, past[:, None], top_k) if top_k > 0 else None
    own_b = jnp.broadcast_to(own[:, None, :, None], (b, hkv, tq, 1)).astype(jnp.int32)
    if picked is None:
        return own_b
    big = jnp.iinfo(jnp.int32).max
    allidx = jnp.sort(jnp.where(jnp.concatenate([picked, own_b], -1) >= 0,
                                jnp.concatenate([picked, own_b], -1), big), axis=-1)
    return jnp.where(allidx == big, -1, allidx)


def moba_attention(q, k, v, q_positions, kv_positions, *, block_size: int, top_k: int,
                   query_block: int = 1, sink_logits=None, softcap=None, impl: str = "auto",
                   interpret: bool = False):
    """MoBA attention: `moba_select` then `selected_block_attention` (per token through
    `token_sparse`, or the union over query blocks of `query_block` tokens through
    `block_sparse`). q `[B, Tq, H, D]`, k/v `[B, Tk, Hkv, D/Dv]` -> `[B, Tq, H, Dv]`."""
    idx = moba_select(q, k, q_positions, kv_positions, block_size=block_size, top_k=top_k)
    return selected_block_attention(q, k, v, q_positions, kv_positions, idx, block_size=block_size,
                                    query_block=query_block, sink_logits=sink_logits, softcap=softcap, impl=impl,
                                    interpret=interpret)
