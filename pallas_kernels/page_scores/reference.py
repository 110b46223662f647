"""XLA reference of the Quest page scores: two batched dots over the bounds."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def page_scores_reference(q, kmin, kmax, valid, bound_scale=None, *, scale: float):
    """`[B, Hkv, P]` float32 (`api.page_scores`' contract). `max(q_i kmax_i, q_i kmin_i) =
    relu(q_i) kmax_i + min(q_i, 0) kmin_i` since kmax >= kmin: two matmuls, batched over
    (batch, kv head), the leading axes of the head-major bounds, so each dot streams its
    bounds where they lie (never the `[B, Tq, H, P, D]` products of the elementwise form;
    float8 codes go to the dots widened to q's dtype). Then the max over the group's rows,
    the positive per-page `bound_scale`, and -inf at the invalid pages (whatever their
    bounds gave: `0 * inf` is NaN there)."""
    b, tq, h, d = q.shape
    hkv = kmin.shape[1]
    qg = jnp.swapaxes(q.reshape(b, tq, hkv, h // hkv, d), 1, 2).reshape(b, hkv, tq * (h // hkv), d)
    dot = lambda x, bound: jnp.einsum("bkrd,bkpd->bkpr", x, bound.astype(q.dtype),  # noqa: E731
                                      preferred_element_type=jnp.float32)
    s = dot(jnp.maximum(qg, 0), kmax) + dot(jnp.minimum(qg, 0), kmin)                    # [B, Hkv, P, R]
    # XLA:CPU (jax 0.11.2) fuses the bf16 dots, the add and the max into one YNNPACK call that
    # returns garbage (inf) at B 2 x Hkv 8, P 64, D 64 and beyond; on the CPU only, a barrier
    # keeps the max out of it (elsewhere the add and the max fuse after the dots as before).
    s = jax.lax.platform_dependent(s, cpu=jax.lax.optimization_barrier, default=lambda x: x)
    s = s.max(-1) * scale                                                                  # [B, Hkv, P]
    if bound_scale is not None:
        s = s * bound_scale[..., 0].astype(jnp.float32)
    return jnp.where(valid[:, None], s, -jnp.inf)


CONFIG = None
