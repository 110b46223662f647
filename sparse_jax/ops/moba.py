"""MoBA (Moonshot, Mixture of Block Attention, arXiv 2502.13189) as pure functions over
projected q/k/v.

Gating per query *token* (the paper's formulation): each fully past KV block j is scored
by `q_t . mean(k of block j)`; the top-k of those plus the query's own block (causal
inside) are attended. The scores are summed over the heads of a GQA group so the group
shares one selection (the kernels' block lists are per kv-head; with MHA this is the
paper's per-head gate). The selection is `sparse_jax.ops.selection.select_top_k` with the
own block forced; attention is `selection.selected_block_attention`: `query_block = 1`
(exact per token) on the `token_sparse` op, `query_block > 1` (union over query blocks)
on `block_sparse`. Blocks are by array index of the KV, which the layer keeps in
position-indexed slots.
"""

from __future__ import annotations

import jax.numpy as jnp

from sparse_jax.ops import selection


def moba_scores(q, k, kv_positions, block_size: int):
    """Gate scores `[B, Hkv, Tq, nK]` float32: `q . mean(valid keys of block j)`, summed over
    each GQA group, and the number of valid keys per block `[B, nK]`."""
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    nk = -(-tk // block_size)
    valid = (kv_positions >= 0).astype(jnp.float32)
    kp = jnp.pad(k.astype(jnp.float32) * valid[..., None, None],
                 ((0, 0), (0, nk * block_size - tk), (0, 0), (0, 0)))
    cnt = jnp.pad(valid, ((0, 0), (0, nk * block_size - tk))).reshape(b, nk, block_size).sum(-1)
    kmean = kp.reshape(b, nk, block_size, hkv, d).sum(2) / jnp.maximum(cnt, 1.0)[..., None, None]
    qg = q.astype(jnp.float32).reshape(b, tq, hkv, h // hkv, d)
    return jnp.einsum("btgjd,bngd->bgtn", qg, kmean), cnt


def moba_select(q, k, q_positions, kv_positions, *, block_size: int, top_k: int):
    """MoBA gate: per query token, its own block plus the top-`top_k` fully past non-empty
    blocks by `q . mean(k)` (summed over the GQA group; ties to the lower index).

    q `[B, Tq, H, D]`, k `[B, Tk, Hkv, D]`, positions `[B, Tq]` / `[B, Tk]` ->
    `block_indices [B, Tq, Hkv, min(top_k + 1, nK)]` int32, ascending, -1 last (a padded
    query selects nothing).
    """
    scores, cnt = moba_scores(q, k, kv_positions, block_size)
    nk = scores.shape[-1]
    own = jnp.where(q_positions >= 0, q_positions // block_size, -1)[:, None, :, None]  # [B, 1, Tq, 1]
    j = jnp.arange(nk)
    past = (j < own) & (cnt[:, None, None, :] > 0)
    is_own = j == own
    idx = selection.select_top_k(scores, past | is_own, top_k + 1, forced=is_own)
    return selection.ascending(idx)


def moba_attention(q, k, v, q_positions, kv_positions, *, block_size: int, top_k: int,
                   query_block: int = 1, sink_logits=None, softcap=None, impl: str = "auto",
                   interpret: bool = False):
    """MoBA attention: `moba_select` then `selection.selected_block_attention` (per token
    through `token_sparse`, or the union over query blocks of `query_block` tokens through
    `block_sparse`). q `[B, Tq, H, D]`, k/v `[B, Tk, Hkv, D/Dv]` -> `[B, Tq, H, Dv]`."""
    idx = moba_select(q, k, q_positions, kv_positions, block_size=block_size, top_k=top_k)
    return selection.selected_block_attention(q, k, v, q_positions, kv_positions, idx,
                                              block_size=block_size, query_block=query_block,
                                              sink_logits=sink_logits, softcap=softcap, impl=impl,
                                              interpret=interpret)
