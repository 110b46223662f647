"""`DSAAttention`: DeepSeek Sparse Attention (DeepSeek-V3.2, arXiv 2512.02556) as an NNX layer.

    y, cache = layer(x, positions, cache=None, shared=None)

MLA (`MLAAttention`, same parameters) whose main attention, in MQA form over the latent
entries, sees only the `top_k` tokens chosen per query by a lightning indexer:
`I[t, s] = sum_j w[t, j] ReLU(q_I[t, j] . k_I[s])`, `q_I = RoPE(x W_qI)`,
`k_I = RoPE(x W_kI)`, `w = x W_w / sqrt(H_I D_I)`. The indexer reads the layer input
detached (`stop_gradient`), so its only gradient is the KL loss (`ops.dsa.dsa_indexer_loss`),
which the layer sows as `nnx.Intermediate` `indexer_loss` in calls without a cache
(run the model under `nnx.capture(fn, nnx.Intermediate)`, sum with `total_indexer_loss`;
`sparse_jax.train.train_step` does; outside a capture the sow is a no-op). Our simplifications, stated: the
indexer query comes from `x` (V3.2 reads the query latent `c_q`), RoPE covers all indexer
dims and no LayerNorm on `k_I`.

Stages (`DSAConfig.stage`): "warmup": dense main attention, KL over all visible keys
(train only the indexer: its parameters' paths contain "index"); "sparse": top-k main
attention, KL over the selected set. The cache (`DSACache`) adds the indexer keys (in
`index_dtype`) to MLA's latent.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_jax.cache.mla import DSACache
from sparse_jax.layers.attention import AttentionConfig, fan_in_init
from sparse_jax.layers.mla import MLAAttention, check_inputs
from sparse_jax.ops import dsa as dops
from sparse_jax.ops import mla as mops
from sparse_jax.ops.dsa import DSAConfig
from sparse_jax.ops.mla import MLAConfig
from sparse_jax.ops.masking import guard_kv
from sparse_jax.ops.rope import apply_rope
from sparse_jax.sharding import param


def indexer_filter():
    """NNX filter of the indexer's parameters (the only ones the warm-up trains)."""
    return nnx.Any(nnx.PathContains("index_wq"), nnx.PathContains("index_wk"), nnx.PathContains("index_ww"))


class DSAAttention(MLAAttention):
    """DSA layer: `DSAAttention(attention_config, mla_config, dsa_config, rngs=...)`."""

    def __init__(self, config: AttentionConfig, mla: MLAConfig = MLAConfig(), dsa: DSAConfig = DSAConfig(),
                 *, rngs: nnx.Rngs):
        super().__init__(config, mla, rngs=rngs)
        if not isinstance(dsa, DSAConfig):
            raise ValueError(f"dsa must be a DSAConfig, got {type(dsa).__name__}")
        self.dsa = dsa
        d, hi, di, pd = config.d_model, dsa.index_heads, dsa.index_head_dim, config.param_dtype
        self.index_wq = param(rngs, fan_in_init, (d, hi, di), ("embed", "index_heads", "index_dim"), pd)
        self.index_wk = param(rngs, fan_in_init, (d, di), ("embed", "index_dim"), pd)
        self.index_ww = param(rngs, fan_in_init, (d, hi), ("embed", "index_heads"), pd)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> DSACache:
        m = self.mla
        return DSACache.init(batch, max_len, m.kv_lora_rank, m.qk_rope_head_dim, self.dsa.index_head_dim,
                             self.config.dtype if dtype is None else dtype, self.dsa.index_dtype)

    def indexer(self, x, positions):
        """Detached input -> `q_I [B,T,H_I,D_I]`, `w [B,T,H_I]`, `k_I [B,T,D_I]` (compute dtype,
        rounded as the cache in `index_dtype` keeps them)."""
        c, s = self.config, self.dsa
        x = jax.lax.stop_gradient(x)
        dt = c.dtype
        q_i = apply_rope(jnp.einsum("btd,dhk->bthk", x, self.index_wq[...].astype(dt)), positions, c.rope_theta)
        k_i = apply_rope((x @ self.index_wk[...].astype(dt))[:, :, None], positions, c.rope_theta)[:, :, 0]
        w = (x @ self.index_ww[...].astype(dt)) / math.sqrt(s.index_heads * s.index_head_dim)
        return q_i, w, dops.round_index_keys(k_i, s.index_dtype or dt)

    def __call__(self, x, positions, cache=None, shared=None):
        """x: `[B, T, d_model]`, positions: int `[B, T]` -> (`[B, T, d_model]`, new cache)."""
        del shared
        c, s = self.config, self.dsa
        positions = check_inputs(c, x, positions)
        if cache is not None and not isinstance(cache, DSACache):
            raise ValueError(f"cache must be a DSACache from init_cache, got {type(cache).__name__}")
        x = x.astype(c.dtype)
        q_nope, q_rope, c_kv, k_rope = self.project(x, positions)
        k_rope, c_kv = guard_kv(k_rope, c_kv, positions)
        q_i, w_i, k_i = self.indexer(x, positions)
        kv_positions = positions
        if cache is not None:
            c_kv, k_rope, k_i, kv_positions, cache = cache.update(c_kv, k_rope, k_i, positions)
        w_uk, w_uv = self.w_uk[...].astype(c.dtype), self.w_uv[...].astype(c.dtype)
        q_abs = mops.absorb_query(q_nope, q_rope, w_uk)
        scale = self.mla.scale
        token_indices = None
        if s.stage == "warmup":
            o = mops.mla_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, positions, kv_positions,
                                   scale=scale, absorbed=self.absorbed(cache), decoding=cache is not None,
                                   impl=c.impl)
        else:
            token_indices = dops.indexer_topk(q_i, w_i, k_i, positions, kv_positions, k=s.top_k,
                                              query_chunk=s.query_chunk, impl=s.impl,
                                              score_dtype=s.score_dtype, fp8_rerank=s.fp8_rerank,
                                              fused_topk=s.fused_topk)
            o_lat = dops.selected_attention(q_abs, c_kv, k_rope, token_indices, positions, kv_positions,
                                            scale=scale, decoding=cache is not None, impl=c.impl)
            o = mops.unabsorb_output(o_lat, w_uv)
        if s.indexer_loss and cache is None:
            scores = dops.indexer_scores(q_i, w_i, k_i, positions, kv_positions)
            k_lat, _ = mops.latent_kv(c_kv, k_rope)
            target = dops.indexer_target(q_abs, k_lat, positions, kv_positions, scale=scale,
                                         token_indices=token_indices)
            self.sow(nnx.Intermediate, "indexer_loss",      # no-op outside nnx.capture
                     dops.dsa_indexer_loss(scores, target, positions, token_indices), capture_noop=True)
        return self.output(o), cache


def total_indexer_loss(intermediates):
    """Sum of the `indexer_loss` values sown in a forward pass, from the State returned by
    `nnx.capture(fn, nnx.Intermediate)` (0.0 when no DSA layer sowed one)."""
    vals = [leaf for path, var in nnx.to_flat_state(intermediates) if path[-1] == "indexer_loss"
            for leaf in jax.tree.leaves(var)]
    return sum(vals, jnp.zeros((), jnp.float32))
