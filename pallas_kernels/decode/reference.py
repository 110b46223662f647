"""XLA reference of `decode`: gather the cache to dense, build the mask, masked softmax.

Plain jnp, written for clarity: the ground truth of the decode kernels' tests.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.common import AttentionOutput, masked_attention
from pallas_kernels.decode import layout


def dense_view(k_cache, v_cache, *, lengths, kv_positions, page_table):
    """Any cache form -> `k [B, T, Hkv, D]`, `v`, `kv_pos [B, T]` (-1 = no key)."""
    if page_table is not None:
        b, max_pages = page_table.shape
        page = k_cache.shape[1]
        tab = jnp.clip(page_table, 0, k_cache.shape[0] - 1)
        k = k_cache[tab].reshape(b, max_pages * page, *k_cache.shape[2:])
        v = v_cache[tab].reshape(b, max_pages * page, *v_cache.shape[2:])
    else:
        k, v = k_cache, v_cache
    if kv_positions is None:
        slots = jnp.arange(k.shape[1], dtype=jnp.int32)[None]
        kv_positions = jnp.where(slots < lengths[:, None], slots, -1)
    return k, v, kv_positions


def selected_slots(block_indices, block_counts, block_size: int, length: int):
    """bool `[B, Hkv, S]`: slots covered by the first `block_counts` selected blocks."""
    nblk = layout.cdiv(length, block_size)
    valid = jnp.arange(block_indices.shape[2])[None, None] < block_counts[..., None]
    target = jnp.where(valid, block_indices, nblk)                      # padding -> dropped
    onehot = (target[..., None] == jnp.arange(nblk)).any(axis=2)        # [B, Hkv, nblk]
    return jnp.repeat(onehot, block_size, axis=-1)[..., :length]


def decode_reference(q, k_cache, v_cache, *, lengths, kv_positions, q_positions, page_table,
                     block_indices, block_counts, block_size, sink_logits, softcap, scale,
                     mask_fn, return_lse, num_splits):
    del num_splits
    k, v, kv_pos = dense_view(k_cache, v_cache, lengths=lengths, kv_positions=kv_positions,
                              page_table=page_table)
    mask = layout.visible(mask_fn, q_positions[:, :, None], kv_pos[:, None, :])   # [B, Tq, T]
    if block_indices is not None:
        sel = selected_slots(block_indices, block_counts, block_size, k.shape[1])
        mask = mask[:, None] & sel[:, :, None, :]                                # [B, Hkv, Tq, T]
    out, _, lse = masked_attention(q, k, v, mask, scale=scale, sink_logits=sink_logits,
                                   softcap=softcap)
    return AttentionOutput(out, lse) if return_lse else out


# Backend declaration for `pallas_kernels.common.resolve`: the XLA reference runs every call
# the api accepts, on any platform, and takes no tile config.
CONFIG = None
