"""Multi-head Latent Attention (DeepSeek-V2, arXiv 2405.04434) as pure functions.

Keys and values come from one low-rank latent per token, `c_kv = RMSNorm(W_dkv h)`
(`d_c = kv_lora_rank`, 512 in the paper), expanded per head: `k_nope = c_kv W_uk`,
`v = c_kv W_uv`. Position enters through a decoupled RoPE key `k_rope = RoPE(W_kr h)`
(`qk_rope_head_dim`, 64) shared by all heads, and a per-head RoPE query part. Scores
`q_h . k_h = q_nope_h . k_nope_h + q_rope_h . k_rope`, scale `1/sqrt(d_nope + d_rope)`.

Two forms with the same outputs (tested equal in float32):

* **expanded** (training): `k = [c_kv W_uk, k_rope]` and `v = c_kv W_uv` per head, then
  ordinary MHA (`[B, S, H, d_nope + d_rope]` keys).
* **absorbed** (decode): `W_uk` is folded into the query,
  `q_abs = [q_nope W_uk^T, q_rope]` (`[B, T, H, d_c + d_rope]`), and attention runs in MQA
  form over the cache itself, keys `[c_kv, k_rope]` (`[B, S, 1, d_c + d_rope]`, 576 values
  per token) and values `c_kv`; `W_uv` is applied to the latent output. The cache holds
  only `c_kv` and `k_rope` per token; decode steps read it as stored through the
  `mla_decode` op (keys and values from the same loaded rows).

Shapes: `q_nope [B, T, H, Dn]`, `q_rope [B, T, H, Dr]` (already rotated), `c_kv [B, S, Dc]`,
`k_rope [B, S, Dr]` (already rotated), `w_uk [Dc, H, Dn]`, `w_uv [Dc, H, Dv]`, positions
`[B, T]` / `[B, S]` int (negative = padding / empty slot).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from pallas_kernels.decode import decode_attention
from pallas_kernels.flash import flash_attention
from pallas_kernels.mla_decode import mla_decode
from sparse_jax import patterns as P
from sparse_jax.ops.attention import DECODE_MAX_QUERIES

ABSORB_MODES = ("auto", "always", "never")


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """MLA sizes (DeepSeek-V2/V3 defaults: d_c=512, q latent 1536, 128 + 64 qk dims, v 128).

    kv_lora_rank (d_c): KV latent width. q_lora_rank: query latent width (None: a direct
    query projection, as in V2-Lite). qk_nope_head_dim / qk_rope_head_dim: per-head
    content / RoPE query-key dims. v_head_dim: per-head value dim. absorb: "auto"
    (expanded form without a cache, absorbed form with one), "always" or "never".
    """

    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    absorb: str = "auto"

    def __post_init__(self):
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be an int >= 1, got {val!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 1):
            raise ValueError(f"q_lora_rank must be an int >= 1 or None, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even for RoPE, got {self.qk_rope_head_dim}")
        if self.absorb not in ABSORB_MODES:
            raise ValueError(f"absorb must be one of {ABSORB_MODES}, got {self.absorb!r}")

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.qk_nope_head_dim + self.qk_rope_head_dim)


def rms_norm(x, scale, eps: float = 1e-6):
    """RMSNorm over the last axis, float32 inside, x's dtype out."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def attend(q, k, v, q_positions, kv_positions, *, scale: float, mask=None, decoding: bool = False,
           return_lse: bool = False, impl: str = "auto"):
    """Causal (by default) attention with an explicit scale through `flash`, or the split-K
    `decode` op for at most `DECODE_MAX_QUERIES` cached queries. Shapes as `flash_attention`."""
    mask = P.Causal() if mask is None else mask
    if decoding and q.shape[1] <= DECODE_MAX_QUERIES:
        return decode_attention(q, k, v, kv_positions=kv_positions, q_positions=q_positions,
                                mask_fn=mask, scale=scale, return_lse=return_lse, impl=impl)
    return flash_attention(q, k, v, mask_fn=mask, q_positions=q_positions, kv_positions=kv_positions,
                           scale=scale, return_lse=return_lse, impl=impl)


def expand_kv(c_kv, k_rope, w_uk, w_uv):
    """Expanded per-head keys `[B, S, H, Dn + Dr]` and values `[B, S, H, Dv]`."""
    dt = c_kv.dtype
    k_nope = jnp.einsum("bsc,chd->bshd", c_kv, w_uk.astype(dt))
    v = jnp.einsum("bsc,chd->bshd", c_kv, w_uv.astype(dt))
    k_r = jnp.broadcast_to(k_rope[:, :, None, :], k_nope.shape[:3] + k_rope.shape[-1:])
    return jnp.concatenate([k_nope, k_r.astype(dt)], axis=-1), v


def absorb_query(q_nope, q_rope, w_uk):
    """`q_abs = [q_nope W_uk^T, q_rope]`: `[B, T, H, Dc + Dr]` (scores against latent keys)."""
    q_lat = jnp.einsum("bthd,chd->bthc", q_nope, w_uk.astype(q_nope.dtype))
    return jnp.concatenate([q_lat, q_rope.astype(q_lat.dtype)], axis=-1)


def latent_kv(c_kv, k_rope):
    """The cache as MQA keys `[B, S, 1, Dc + Dr]` and values `[B, S, 1, Dc]`."""
    k = jnp.concatenate([c_kv, k_rope.astype(c_kv.dtype)], axis=-1)[:, :, None]
    return k, c_kv[:, :, None]


def unabsorb_output(o_lat, w_uv):
    """Latent attention output `[B, T, H, Dc]` -> per-head values `[B, T, H, Dv]`."""
    return jnp.einsum("bthc,chd->bthd", o_lat, w_uv.astype(o_lat.dtype))


def mla_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, q_positions, kv_positions, *,
                  scale: float, absorbed: bool, decoding: bool = False, impl: str = "auto"):
    """Causal MLA, expanded or absorbed (same result). Returns `[B, T, H, Dv]`.

    Absorbed decode (`decoding`, at most `DECODE_MAX_QUERIES` queries) runs the `mla_decode`
    op over the cache as stored (no concatenated copy; 576 values read per token)."""
    if absorbed and decoding and q_nope.shape[1] <= DECODE_MAX_QUERIES:
        o_lat = mla_decode(absorb_query(q_nope, q_rope, w_uk), c_kv, k_rope.astype(c_kv.dtype),
                           q_positions=q_positions, kv_positions=kv_positions, scale=scale, impl=impl)
        return unabsorb_output(o_lat, w_uv)
    if absorbed:
        k, v = latent_kv(c_kv, k_rope)
        o_lat = attend(absorb_query(q_nope, q_rope, w_uk), k, v, q_positions, kv_positions,
                       scale=scale, decoding=decoding, impl=impl)
        return unabsorb_output(o_lat, w_uv)
    k, v = expand_kv(c_kv, k_rope, w_uk, w_uv)
    q = jnp.concatenate([q_nope, q_rope.astype(q_nope.dtype)], axis=-1)
    return attend(q, k, v, q_positions, kv_positions, scale=scale, decoding=decoding, impl=impl)
