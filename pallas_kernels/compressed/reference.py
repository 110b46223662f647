"""XLA reference of `compressed`: masked softmax over the compressed keys, probabilities
summed over each GQA group. Plain jnp (O(T * N * H) memory): the kernels' ground truth."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import masked_attention


def compressed_mask(q_positions, kv_positions):
    """bool `[B, 1, T, N]`: compressed key n (position = its block's last token) is visible
    to query t iff both are valid and `kv_pos <= q_pos`."""
    qp, kp = q_positions[:, None, :, None], kv_positions[:, None, None, :]
    return (qp >= 0) & (kp >= 0) & (kp <= qp)


def compressed_reference(q, k, v, *, q_positions, kv_positions, scale):
    mask = compressed_mask(q_positions, kv_positions)
    out, probs, _ = masked_attention(q, k, v, mask, scale=scale)        # probs [B, Hkv, G, T, N]
    return out, jax.lax.stop_gradient(probs.sum(axis=2).astype(jnp.float32))


# Backend declaration for `pallas_kernels.common.resolve`: the XLA reference runs every call
# the api accepts, on any platform, and takes no tile config.
CONFIG = None
