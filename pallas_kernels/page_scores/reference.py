"""XLA reference of the Quest page scores: two batched dots over the bounds."""

from __future__ import annotations

import jax.numpy as jnp


def page_scores_reference(q, kmin, kmax, bound_scale=None, *, scale: float):
    """`[B, Hkv, P]` float32 (`api.page_scores`' contract). `max(q_i kmax_i, q_i kmin_i) =
    relu(q_i) kmax_i + min(q_i, 0) kmin_i` since kmax >= kmin: two matmuls over the bounds
    (plain bounds of empty pages zeroed first, so no 0 * inf; float8 codes are finite and go
    to the dots as they are), never the `[B, Tq, H, P, D]` products of the elementwise form;
    the max over the group's rows, then the positive per-page `bound_scale`."""
    b, tq, h, d = q.shape
    hkv = kmin.shape[2]
    empty = kmax[..., 0].astype(jnp.float32) < kmin[..., 0].astype(jnp.float32)   # [B, P, Hkv]
    if bound_scale is None:
        lo = jnp.where(empty[..., None], 0, kmin)
        hi = jnp.where(empty[..., None], 0, kmax)
    else:
        lo, hi = kmin, kmax
    qg = q.reshape(b, tq, hkv, h // hkv, d)
    dot = lambda x, bound: jnp.einsum("btkgd,bpkd->btkgp", x, bound.astype(q.dtype),  # noqa: E731
                                      preferred_element_type=jnp.float32)
    s = dot(jnp.maximum(qg, 0), hi) + dot(jnp.minimum(qg, 0), lo)             # [B, Tq, Hkv, G, P]
    s = s.max(axis=(1, 3)) * scale                                               # [B, Hkv, P]
    if bound_scale is not None:
        s = s * jnp.swapaxes(bound_scale[..., 0], 1, 2).astype(jnp.float32)
    return jnp.where(jnp.swapaxes(empty, 1, 2), -jnp.inf, s)


CONFIG = None
