"""XLA reference of `block_sparse`: attention restricted to the listed KV blocks.

Implements the metadata's semantics exactly: a key is visible iff its block is listed for
the query's block and either the block is flagged full or the element predicate holds;
padding (negative positions) is never visible.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.common import AttentionOutput, masked_attention
from pallas_kernels.flash.reference import element_mask


def expand_block_mask(metadata, q_len: int, kv_len: int, elem):
    """`[B, Hkv', Tq, Tk]` mask from metadata and the element mask `elem [B, Tq, Tk]`.

    Full blocks skip `elem` (as a kernel does); partial blocks apply it.
    """
    nk = -(-kv_len // metadata.block_kv)
    present, full = metadata.to_block_mask(nk)                       # [B', Hkv', nQ, nK]

    def to_elements(x):
        x = jnp.repeat(jnp.repeat(x, metadata.block_q, axis=2), metadata.block_kv, axis=3)
        return x[:, :, :q_len, :kv_len]

    return to_elements(present) & (to_elements(full) | elem[:, None])


def block_sparse_reference(q, k, v, metadata, *, mask_fn, q_positions, kv_positions,
                           q_segment_ids, kv_segment_ids, sink_logits, softcap, scale, return_lse):
    b, tq, hkv, tk = q.shape[0], q.shape[1], k.shape[2], k.shape[1]
    elem = element_mask(mask_fn, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    not_padding = (q_positions[:, None, :, None] >= 0) & (kv_positions[:, None, None, :] >= 0)
    mask = expand_block_mask(metadata, tq, tk, elem) & not_padding
    mask = jnp.broadcast_to(mask, (b, hkv, tq, tk))
    out, _, lse = masked_attention(q, k, v, mask, scale=scale, sink_logits=sink_logits,
                                   softcap=softcap)
    return AttentionOutput(out, lse) if return_lse else out


# Backend declaration for `pallas_kernels.common.resolve`: the XLA reference runs every call
# the api accepts, on any platform, and takes no tile config.
CONFIG = None
