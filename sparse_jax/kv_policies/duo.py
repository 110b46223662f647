"""DuoAttention's head split (arXiv 2410.10819) from a calibration run, training-free.

The paper learns a gate per kv head on synthetic passkey data (distillation + L1) and
thresholds it. Here the same split comes from one dense calibration pass (as in
RazorAttention, arXiv 2407.15891): a head's *streaming loss* is the attention mass that its
final query puts outside the streaming set (the first `num_sinks` positions and the
`recent` most recent ones), averaged over the calibration batch and the query heads of
the kv head; the `fraction` of (layer, kv head) pairs with the largest loss become
retrieval heads.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sparse_jax.kv_policies.apply import managed_layers, oracle_caches


def streaming_loss(probs, kv_positions, *, num_kv_heads: int, num_sinks: int, recent: int):
    """`probs [B, H, S]` (attention of the last query over slots with `kv_positions [B, S]`)
    -> `[Hkv]` mean mass outside sinks + the `recent` most recent positions."""
    newest = kv_positions.max(axis=1, keepdims=True)
    streaming = (kv_positions < num_sinks) | (kv_positions > newest - recent)
    outside = jnp.where(streaming[:, None] | (kv_positions[:, None] < 0), 0.0, probs).sum(-1)   # [B, H]
    b, h = outside.shape
    return outside.reshape(b, num_kv_heads, h // num_kv_heads).mean(axis=(0, 2))


def gates_from_losses(losses, fraction: float) -> tuple:
    """`losses [L, Hkv]` -> retrieval flags (tuple per layer of tuples per kv head): the
    `round(fraction * L * Hkv)` largest losses (ties to the earlier head)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    losses = np.asarray(losses, np.float64)
    n = int(round(fraction * losses.size))
    flat = np.zeros(losses.size, bool)
    flat[np.argsort(-losses.ravel(), kind="stable")[:n]] = True
    return tuple(tuple(bool(x) for x in row) for row in flat.reshape(losses.shape))


def calibrate(model, tokens, positions=None, *, fraction: float, num_sinks: int = 4, recent: int = 16):
    """Retrieval flags for `DuoAttention(retrieval=...)` from a dense pass over calibration
    `tokens [B, T]` (e.g. needle-task prompts; the last token's attention is measured)."""
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    _, caches = model(tokens, positions, oracle_caches(model, batch=b, max_len=t))
    losses = []
    for i in managed_layers(model):
        c = model.blocks[i].attn.config
        losses.append(streaming_loss(caches[i].probs, caches[i].full.positions, num_kv_heads=c.num_kv_heads,
                                     num_sinks=num_sinks, recent=recent))
    return gates_from_losses(np.stack([np.asarray(x) for x in losses]), fraction)
