"""Plain-jnp lightning-indexer scores of one query chunk: the ground truth of the kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chunk_scores_reference(q_index, weights, k_index, q_positions, kv_positions):
    """`I [B, C, S]` float32 = `sum_j w[t, j] * relu(q_I[t, j] . k_I[s])`; -inf where the key
    is not visible (padding query or key, or `kv_pos > q_pos`).

    q_index `[B, C, H_I, D_I]`, weights `[B, C, H_I]`, k_index `[B, S, D_I]`,
    q_positions `[B, C]`, kv_positions `[B, S]` (negative = padding).
    """
    dots = jnp.einsum("btjd,bsd->btjs", q_index.astype(jnp.float32), k_index.astype(jnp.float32))
    scores = jnp.einsum("btj,btjs->bts", weights.astype(jnp.float32), jax.nn.relu(dots))
    qp, kp = q_positions[:, :, None], kv_positions[:, None, :]
    vis = (qp >= 0) & (kp >= 0) & (kp <= qp)
    return jnp.where(vis, scores, -jnp.inf)


# Backend declaration for `pallas_kernels.common.resolve`: the XLA reference runs every call
# the api accepts, on any platform, and takes no tile config.
CONFIG = None
