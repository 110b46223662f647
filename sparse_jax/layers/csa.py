"""`CompressedAttention`: DeepSeek-V4's CSA and HCA layers (math: `sparse_jax.ops.csa`).

    y, cache = layer(x, positions, cache=None, shared=None)

MQA over compressed records (key = value, `head_dim` wide) plus an SWA branch over the
last `window` tokens, in one softmax. `CSAConfig.top_k` set: CSA, a lightning indexer
over compressed indexer keys picks the records (its input detached; no indexer loss is
computed here, the DSA warm-up recipe of `layers.dsa` would apply); `top_k=None`: HCA,
dense over the records. Queries: `x W_q` with RoPE on the trailing `rope_dim` channels.
The cache is `sparse_jax.cache.csa.CSACache`.

Without a cache, each row's valid positions must be consecutive (padding anywhere, -1).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_jax.cache.csa import CSACache
from sparse_jax.layers.attention import AttentionConfig, fan_in_init, out_proj_init
from sparse_jax.layers.base import AttentionLayer
from sparse_jax.layers.mla import check_config, check_inputs
from sparse_jax.ops import csa as ops
from sparse_jax.ops import dsa as dops
from sparse_jax.ops.csa import CSAConfig
from sparse_jax.ops.mla import rms_norm
from sparse_jax.ops.rope import apply_rope
from sparse_jax.sharding import param

_init_2in_parts = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=1, out_axis=2)


class CompressedAttention(AttentionLayer):
    """CSA / HCA layer: `CompressedAttention(attention_config, csa_config, rngs=...)`."""

    def __init__(self, config: AttentionConfig, csa: CSAConfig = CSAConfig(), *, rngs: nnx.Rngs):
        check_config(config, type(self).__name__)
        if not isinstance(csa, CSAConfig):
            raise ValueError(f"csa must be a CSAConfig, got {type(csa).__name__}")
        self.config, self.csa = config, csa
        d, h, dh, pd = config.d_model, config.num_heads, csa.head_dim, config.param_dtype
        w, parts = csa.record_window, csa.parts
        self.wq = param(rngs, fan_in_init, (d, h, dh), ("embed", "heads", "head_dim"), pd)
        self.cmp_state = param(rngs, _init_2in_parts, (parts, d, dh), (None, "embed", "head_dim"), pd)
        self.cmp_score = param(rngs, _init_2in_parts, (parts, d, dh), (None, "embed", "head_dim"), pd)
        self.cmp_ape = param(rngs, nnx.initializers.zeros_init(), (w, dh), (None, "head_dim"), pd)
        self.cmp_norm = param(rngs, nnx.initializers.ones_init(), (dh,), ("norm",), pd)
        if csa.window:
            self.win_kv = param(rngs, fan_in_init, (d, dh), ("embed", "head_dim"), pd)
            self.win_norm = param(rngs, nnx.initializers.ones_init(), (dh,), ("norm",), pd)
        if csa.top_k is not None:
            hi, di = csa.index_heads, csa.index_head_dim
            self.index_wq = param(rngs, fan_in_init, (d, hi, di), ("embed", "index_heads", "index_dim"), pd)
            self.index_ww = param(rngs, fan_in_init, (d, hi), ("embed", "index_heads"), pd)
            self.index_state = param(rngs, _init_2in_parts, (parts, d, di), (None, "embed", "index_dim"), pd)
            self.index_score = param(rngs, _init_2in_parts, (parts, d, di), (None, "embed", "index_dim"), pd)
            self.index_ape = param(rngs, nnx.initializers.zeros_init(), (w, di), (None, "index_dim"), pd)
        self.wo = param(rngs, out_proj_init, (h, dh, d), ("heads", "head_dim", "embed"), pd)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> CSACache:
        c, s = self.config, self.csa
        return CSACache.init(batch, max_len, c.d_model, ratio=s.ratio, record_window=s.record_window,
                             head_dim=s.head_dim, index_head_dim=s.index_head_dim if s.top_k else 0,
                             window=s.window, swa_cache=s.swa_cache, checkpoint_every=s.checkpoint_every,
                             dtype=c.dtype if dtype is None else dtype)

    def records(self, x_tail, tail_positions, positions):
        """Records completed by this call: `(records [B,K,Dh], index keys [B,K,D_I] | None, ids [B,K])`."""
        c, s = self.config, self.csa
        win, present, ids = ops.gather_windows(x_tail, tail_positions, positions, ratio=s.ratio,
                                               window=s.record_window)
        pooled = ops.compress_windows(win, present, self.cmp_state[...], self.cmp_score[...], self.cmp_ape[...],
                                      ratio=s.ratio)
        rec = ops.finish_records(pooled, ids, self.cmp_norm[...], ratio=s.ratio, rope_dim=s.rope_dim,
                                 theta=c.rope_theta)
        idx_keys = None
        if s.top_k is not None:
            win = jax.lax.stop_gradient(win)
            pooled = ops.compress_windows(win, present, self.index_state[...], self.index_score[...],
                                          self.index_ape[...], ratio=s.ratio)
            idx_keys = ops.finish_records(pooled, ids, None, ratio=s.ratio, rope_dim=s.index_head_dim,
                                          theta=c.rope_theta)
        return rec, idx_keys, ids

    def __call__(self, x, positions, cache=None, shared=None):
        """x: `[B, T, d_model]`, positions: int `[B, T]` -> (`[B, T, d_model]`, new cache)."""
        del shared
        c, s = self.config, self.csa
        positions = check_inputs(c, x, positions)
        if cache is not None and not isinstance(cache, CSACache):
            raise ValueError(f"cache must be a CSACache from init_cache, got {type(cache).__name__}")
        x = x.astype(c.dtype)
        dt = c.dtype
        q = ops.rope_tail(jnp.einsum("btd,dhk->bthk", x, self.wq[...].astype(dt)), positions, s.rope_dim,
                          c.rope_theta)
        if cache is None:
            x_tail, tail_pos = x, positions
        else:
            x_tail, _, tail_pos, new_tail = cache.tail.update(x[:, :, None], x[:, :, None, :0], positions)
            x_tail = x_tail[:, :, 0]
        rec, idx_keys, ids = self.records(x_tail, tail_pos, positions)
        if cache is None:
            records, index_keys, rec_pos = rec, idx_keys, ops.record_positions(ids, s.ratio)
        else:
            ik = idx_keys if idx_keys is not None else rec[..., :0]
            store_k, store_v, store_ids, store = cache.records.update(rec[:, :, None], ik[:, :, None], ids)
            records, index_keys, rec_pos = store_k[:, :, 0], store_v[:, :, 0], ops.record_positions(store_ids, s.ratio)
        win_kv = win_pos = None
        new_swa = None
        if s.window:
            kv = rms_norm(x @ self.win_kv[...].astype(dt), self.win_norm[...])
            kv = ops.rope_tail(kv[:, :, None], positions, s.rope_dim, c.rope_theta)[:, :, 0]
            win_kv, win_pos = kv, positions
            if cache is not None:
                win_kv, win_pos, new_swa = cache.swa.update(kv, positions)
        token_indices = None
        if s.top_k is not None:
            xi = jax.lax.stop_gradient(x)
            q_i = apply_rope(jnp.einsum("btd,dhk->bthk", xi, self.index_wq[...].astype(dt)), positions, c.rope_theta)
            w_i = (xi @ self.index_ww[...].astype(dt)) / math.sqrt(s.index_heads * s.index_head_dim)
            token_indices = dops.indexer_topk(q_i, w_i, index_keys, positions, rec_pos, k=s.top_k,
                                              query_chunk=s.query_chunk)
        o = ops.attention_with_window(q, records, rec_pos, positions, win_kv=win_kv, win_positions=win_pos,
                                      window=s.window, token_indices=token_indices,
                                      scale=ops.default_scale(s), rope_dim=s.rope_dim, theta=c.rope_theta,
                                      impl=c.impl)
        if cache is not None:
            cache = CSACache(store, new_tail, new_swa)
        y = jnp.einsum("bthk,hkd->btd", o.astype(dt), self.wo[...].astype(dt))
        return y, cache

