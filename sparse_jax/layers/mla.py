"""`MLAAttention`: Multi-head Latent Attention (DeepSeek-V2, arXiv 2405.04434) as an NNX layer.

    y, cache = layer(x, positions, cache=None, shared=None)

Queries through a low-rank latent (`c_q = RMSNorm(x W_dq)`, `q = c_q W_uq`; or directly
`x W_q` when `q_lora_rank` is None), split into a content part and a RoPE part per head.
Keys and values from one latent per token `c_kv = RMSNorm(x W_dkv)` plus a RoPE key
`k_rope = RoPE(x W_kr)` shared by all heads. The cache (`sparse_jax.cache.mla.MLACache`)
holds `c_kv` and `k_rope` only; the absorbed form attends over it directly (MQA over
576-wide keys at the paper's sizes). Math: `sparse_jax.ops.mla`.

`AttentionConfig` gives d_model, num_heads, rope_theta (required), dtype, impl;
its head_dim / num_kv_heads are not used (MLA's dims live in `MLAConfig`). Learned sinks,
soft-cap and the output gate are not part of MLA and raise ValueError.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from sparse_jax.cache.mla import MLACache
from sparse_jax.layers.attention import AttentionConfig, fan_in_init, output_params
from sparse_jax.layers.base import AttentionLayer
from sparse_jax.ops import mla as ops
from sparse_jax.ops.masking import guard_kv
from sparse_jax.ops.mla import MLAConfig
from sparse_jax.ops.rope import apply_rope
from sparse_jax.sharding import param



def check_inputs(config: AttentionConfig, x, positions):
    """The interface's argument checks; returns int32 positions."""
    if x.ndim != 3 or x.shape[-1] != config.d_model:
        raise ValueError(f"x must be [batch, seq, d_model={config.d_model}], got {x.shape}")
    positions = jnp.asarray(positions)
    if positions.shape != x.shape[:2] or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"positions must be int [B, T] = {list(x.shape[:2])}, got "
                         f"{positions.dtype}{list(positions.shape)}")
    return positions.astype(jnp.int32)


def check_config(config: AttentionConfig, name: str):
    if not isinstance(config, AttentionConfig):
        raise ValueError(f"config must be an AttentionConfig, got {type(config).__name__}")
    if config.rope_theta is None:
        raise ValueError(f"{name} needs RoPE (rope_theta set): its decoupled key is a RoPE key")
    for flag, bad in (("learned_sinks", config.learned_sinks), ("output_gate", config.output_gate),
                      ("softcap", config.softcap is not None),
                      ("qkv_bias", getattr(config, "qkv_bias", False))):
        if bad:
            raise ValueError(f"{flag}={getattr(config, flag)!r} is not supported by {name}")


class MLAAttention(AttentionLayer):
    """MLA layer: `MLAAttention(attention_config, mla_config, rngs=...)`."""

    def __init__(self, config: AttentionConfig, mla: MLAConfig = MLAConfig(), *, rngs: nnx.Rngs):
        check_config(config, type(self).__name__)
        if not isinstance(mla, MLAConfig):
            raise ValueError(f"mla must be an MLAConfig, got {type(mla).__name__}")
        self.config, self.mla = config, mla
        d, h, pd = config.d_model, config.num_heads, config.param_dtype
        dc, dn, dr, dv = mla.kv_lora_rank, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        if mla.q_lora_rank is None:
            self.wq = param(rngs, fan_in_init, (d, h, dn + dr), ("embed", "heads", "head_dim"), pd)
        else:
            rq = mla.q_lora_rank
            self.wq_a = param(rngs, fan_in_init, (d, rq), ("embed", "q_lora"), pd)
            self.q_norm = param(rngs, nnx.initializers.ones_init(), (rq,), ("norm",), pd)
            self.wq = param(rngs, fan_in_init, (rq, h, dn + dr), ("q_lora", "heads", "head_dim"), pd)
        self.wkv_a = param(rngs, fan_in_init, (d, dc + dr), ("embed", "kv_lora"), pd)
        self.kv_norm = param(rngs, nnx.initializers.ones_init(), (dc,), ("norm",), pd)
        self.w_uk = param(rngs, fan_in_init, (dc, h, dn), ("kv_lora", "heads", "head_dim"), pd)
        self.w_uv = param(rngs, fan_in_init, (dc, h, dv), ("kv_lora", "heads", "head_dim"), pd)
        self.wo, _, _ = output_params(rngs, config, value_dim=dv)     # no gate (check_config)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> MLACache:
        return MLACache.init(batch, max_len, self.mla.kv_lora_rank, self.mla.qk_rope_head_dim,
                             self.config.dtype if dtype is None else dtype)

    def project(self, x, positions):
        """`q_nope [B,T,H,Dn]`, rotated `q_rope [B,T,H,Dr]`, `c_kv [B,T,Dc]`, rotated `k_rope [B,T,Dr]`."""
        c, m = self.config, self.mla
        dt = c.dtype
        if m.q_lora_rank is None:
            q = jnp.einsum("btd,dhk->bthk", x, self.wq[...].astype(dt))
        else:
            c_q = ops.rms_norm(x @ self.wq_a[...].astype(dt), self.q_norm[...])
            q = jnp.einsum("btr,rhk->bthk", c_q, self.wq[...].astype(dt))
        q_nope, q_rope = q[..., :m.qk_nope_head_dim], q[..., m.qk_nope_head_dim:]
        kv = x @ self.wkv_a[...].astype(dt)
        c_kv = ops.rms_norm(kv[..., :m.kv_lora_rank], self.kv_norm[...])
        k_rope = apply_rope(kv[:, :, None, m.kv_lora_rank:], positions, c.rope_theta)[:, :, 0]
        return q_nope, apply_rope(q_rope, positions, c.rope_theta), c_kv, k_rope

    def absorbed(self, cache) -> bool:
        return self.mla.absorb == "always" or (self.mla.absorb == "auto" and cache is not None)

    def output(self, o):
        """Per-head values `[B, T, H, Dv]` -> `[B, T, d_model]`."""
        return jnp.einsum("bthk,hkd->btd", o.astype(self.config.dtype), self.wo[...].astype(self.config.dtype))

    def __call__(self, x, positions, cache=None, shared=None):
        """x: `[B, T, d_model]`, positions: int `[B, T]` -> (`[B, T, d_model]`, new cache)."""
        del shared
        c = self.config
        positions = check_inputs(c, x, positions)
        if cache is not None and not isinstance(cache, MLACache):
            raise ValueError(f"cache must be an MLACache from init_cache, got {type(cache).__name__}")
        q_nope, q_rope, c_kv, k_rope = self.project(x.astype(c.dtype), positions)
        k_rope, c_kv = guard_kv(k_rope, c_kv, positions)      # the latent is the value: zeroed, the key NaN
        kv_positions = positions
        if cache is not None:
            c_kv, k_rope, kv_positions, cache = cache.update(c_kv, k_rope, positions)
        o = ops.mla_attention(q_nope, q_rope, c_kv, k_rope, self.w_uk[...].astype(c.dtype),
                              self.w_uv[...].astype(c.dtype), positions, kv_positions,
                              scale=self.mla.scale, absorbed=self.absorbed(cache),
                              decoding=cache is not None, impl=c.impl)
        return self.output(o), cache
