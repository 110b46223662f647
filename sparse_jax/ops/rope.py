"""Rotary position embedding (RoFormer, arXiv 2104.09864), half-split (GPT-NeoX / Llama) form."""

from __future__ import annotations

import jax.numpy as jnp


def apply_rope(x, positions, theta: float = 10000.0):
    """Rotate `x [B, T, H, D]` by `positions [B, T]` (D even). Float32 inside, x's dtype out.

    Padding positions (< 0) are rotated by 0 (their values are masked elsewhere).
    """
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {d}")
    half = d // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.maximum(positions, 0).astype(jnp.float32)[..., None, None] * freqs   # [B,T,1,half]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
