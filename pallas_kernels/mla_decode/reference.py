"""XLA reference of `mla_decode`: absorbed MLA attention over the latent cache in plain jnp.

Scores are `q_c . c_kv + q_r . k_rope` (two einsums: the cache is never concatenated) and
the values are `c_kv` itself. Sparse mode gathers the listed rows (`[B, T, K, Dc + Dr]`,
memory O(T * K)); dense mode scores every slot. Float32 inside. Written for clarity: the
ground truth of the kernels' tests, and the path `impl="auto"` takes on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import AttentionOutput


def visible_slots(q_positions, kv_positions):
    """bool `[B, T, S]`: query valid, slot filled, `kv_pos <= q_pos`."""
    qp, kp = q_positions[:, :, None], kv_positions[:, None, :]
    return (qp >= 0) & (kp >= 0) & (kp <= qp)


def softmax_out(s, mask, values, dtype):
    """Masked softmax of float32 logits `s [B, T, H, N]` (mask `[B, T, 1, N]`) against
    `values`, einsum-ready as `[B, T, N, Dc]` or `[B, N, Dc]`: `(out [B, T, H, Dc] in dtype,
    lse [B, H, T])`; rows that see nothing give zeros and lse = -inf."""
    s = jnp.where(mask, s, -jnp.inf)
    m = s.max(-1, keepdims=True)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    denom = p.sum(-1, keepdims=True)
    safe = jnp.where(denom > 0, denom, 1.0)
    spec = "bthn,btnc->bthc" if values.ndim == 4 else "bthn,bnc->bthc"
    out = jnp.einsum(spec, p / safe, values.astype(jnp.float32))
    lse = jnp.where(denom > 0, m + jnp.log(safe), -jnp.inf)[..., 0]
    return out.astype(dtype), lse.transpose(0, 2, 1)


def mla_decode_reference(q_abs, c_kv, k_rope, *, indices, q_positions, kv_positions, scale,
                         return_lse, num_splits):
    """`mla_decode`'s contract in jnp (arguments already checked by the api)."""
    del num_splits
    dc = c_kv.shape[-1]
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    q_c, q_r = f32(q_abs[..., :dc]), f32(q_abs[..., dc:])
    if indices is None:
        s = (jnp.einsum("bthc,bsc->bths", q_c, f32(c_kv))
             + jnp.einsum("bthr,bsr->bths", q_r, f32(k_rope))) * scale
        mask = visible_slots(q_positions, kv_positions)[:, :, None]
        values = c_kv
    else:
        num_slots = c_kv.shape[1]
        listed = (indices >= 0) & (indices < num_slots)
        slots = jnp.where(listed, indices, 0)                                # [B, T, K]
        take = jax.vmap(lambda x, i: x[i])                                    # per batch row
        c_sel, r_sel, kp = take(c_kv, slots), take(k_rope, slots), take(kv_positions, slots)
        s = (jnp.einsum("bthc,btkc->bthk", q_c, f32(c_sel))
             + jnp.einsum("bthr,btkr->bthk", q_r, f32(r_sel))) * scale
        qp = q_positions[:, :, None]
        mask = (listed & (kp >= 0) & (kp <= qp) & (qp >= 0))[:, :, None]
        values = c_sel
    out, lse = softmax_out(s, mask, values, q_abs.dtype)
    return AttentionOutput(out, lse) if return_lse else out


# Backend declaration for `pallas_kernels.common.resolve`: the XLA reference runs every call
# the api accepts, on any platform, and takes no tile config.
CONFIG = None
