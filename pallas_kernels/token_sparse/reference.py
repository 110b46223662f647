"""XLA reference of `token_sparse`: the listed blocks as a dense mask, masked softmax.

Plain jnp, written for clarity (O(T * S) memory): the ground truth of the kernels' tests.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.common import AttentionOutput, masked_attention


def token_sparse_mask(indices, *, block_size: int, kv_len: int, q_positions, kv_positions,
                      causal: bool):
    """bool `[B, Hkv, T, S]`: key slot s is visible to query t of kv head h iff block
    `s // block_size` is listed in `indices[b, t, h]` (negative entries ignored), both
    positions are valid (>= 0) and, with `causal`, `kv_pos <= q_pos`."""
    b, t, hkv, _ = indices.shape
    nblk = -(-kv_len // block_size)
    slot = jnp.where((indices >= 0) & (indices < nblk), indices, nblk)     # padding -> spare
    listed = jnp.zeros((b, t, hkv, nblk + 1), bool)
    listed = listed.at[jnp.arange(b)[:, None, None, None], jnp.arange(t)[None, :, None, None],
                       jnp.arange(hkv)[None, None, :, None], slot].set(True)[..., :nblk]
    key_block = jnp.arange(kv_len) // block_size
    mask = listed[..., key_block].transpose(0, 2, 1, 3)                      # [B, Hkv, T, S]
    qp, kp = q_positions[:, None, :, None], kv_positions[:, None, None, :]
    mask = mask & (qp >= 0) & (kp >= 0)
    if causal:
        mask = mask & (kp <= qp)
    return mask


def token_sparse_reference(q, k, v, indices, *, block_size, q_positions, kv_positions, causal,
                           sink_logits, softcap, scale, return_lse):
    mask = token_sparse_mask(indices, block_size=block_size, kv_len=k.shape[1],
                             q_positions=q_positions, kv_positions=kv_positions, causal=causal)
    out, _, lse = masked_attention(q, k, v, mask, scale=scale, sink_logits=sink_logits,
                                   softcap=softcap)
    return AttentionOutput(out, lse) if return_lse else out


# Backend declaration for `pallas_kernels.common.resolve`: the XLA reference runs every call
# the api accepts, on any platform, and takes no tile config.
CONFIG = None
