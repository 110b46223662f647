"""XLA reference of `flash`: dense attention with an element predicate, plain jnp."""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.common import AttentionOutput, masked_attention


def element_mask(mask_fn, q_positions, kv_positions, q_segment_ids, kv_segment_ids):
    """`[B, Tq, Tk]` visibility: the predicate (if any), same segment (when segment ids are
    given, whatever the predicate) and no padding (negative positions)."""
    q = q_positions[:, :, None]
    k = kv_positions[:, None, :]
    visible = (q >= 0) & (k >= 0)
    qs = None if q_segment_ids is None else q_segment_ids[:, :, None]
    ks = None if kv_segment_ids is None else kv_segment_ids[:, None, :]
    if mask_fn is not None:
        visible = visible & mask_fn(q, k, qs, ks)
    if qs is not None:
        visible = visible & (qs == ks)
    return visible


def block_max_scores(probs, block: int, reduce_gqa: bool):
    """HySparse Alg. 1 target: `S[b, h, t, j] = max_{i in block j} p[t, i]`.

    probs `[B, Hkv, G, Tq, Tk]` -> `[B, H, Tq, nK]` (or `[B, Hkv, Tq, nK]` with the max
    over each GQA group).
    """
    b, hkv, g, tq, tk = probs.shape
    nk = -(-tk // block)
    probs = jnp.pad(probs, [(0, 0)] * 4 + [(0, nk * block - tk)])
    scores = probs.reshape(b, hkv, g, tq, nk, block).max(-1)
    if reduce_gqa:
        return scores.max(2)
    return scores.reshape(b, hkv * g, tq, nk)


def flash_reference(q, k, v, *, mask_fn, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                    sink_logits, softcap, scale, return_lse, block_score_size, block_score_reduce_gqa):
    visible = element_mask(mask_fn, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    out, probs, lse = masked_attention(q, k, v, visible, scale=scale, sink_logits=sink_logits,
                                       softcap=softcap)
    if not return_lse and block_score_size is None:
        return out
    scores = None
    if block_score_size is not None:
        scores = block_max_scores(probs, block_score_size, block_score_reduce_gqa)
    return AttentionOutput(out, lse if return_lse else None, scores)


# Backend declaration for `pallas_kernels.common.resolve`: the XLA reference runs every call
# the api accepts, on any platform, and takes no tile config.
CONFIG = None
