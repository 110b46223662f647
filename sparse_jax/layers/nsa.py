"""`NSAAttention`: Native Sparse Attention (DeepSeek NSA, arXiv 2502.11089) as a Flax NNX layer.

    y, cache = layer(x, positions, cache=None, shared=None)

One shared query projection, separate K/V projections per branch (cmp, slc, win), the
compression MLPs phi (keys and values), a sigmoid gate per branch and head
(`g = sigmoid(x W_g + b_g)`, one linear layer as the MLP), the output projection. The math
lives in `sparse_jax.ops.nsa`; the cache is `sparse_jax.cache.nsa.NSACache`.

RoPE (when `rope_theta` is set): the query and the slc / win keys are rotated at their
text positions. The cmp keys are compressed from *unrotated* keys (phi sees content plus
its learned intra-block position encoding; an MLP of rotated keys would have to undo a
rotation that depends on the absolute position), and the compressed key is then rotated
at its block's last-token position `i*d + l - 1`, the position at which it becomes
visible. So one rotated query serves all three branches, and the cmp branch sees the
same relative distances (>= 0) as the token branches: recency reaches the selection
scores. Compressed values are not rotated.

Without a cache, each row's valid positions must be `0..n-1` (padding anywhere, -1): the
keys are scattered to position-indexed slots, as in the cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_jax.cache.kv import FullKVCache
from sparse_jax.cache.nsa import CompressedKV, NSACache
from sparse_jax.layers.attention import AttentionConfig, fan_in_init, output_params
from sparse_jax.layers.base import AttentionLayer
from sparse_jax.ops import nsa as ops
from sparse_jax.ops.masking import guard_kv
from sparse_jax.ops.nsa import NSAConfig
from sparse_jax.ops.rope import apply_rope
from sparse_jax.sharding import param

BRANCHES = ("cmp", "slc", "win")


class Compressor(nnx.Module):
    """phi: `[B, K, l, Hkv, D]` blocks -> `[B, K, Hkv, D]` (see `ops.nsa.compress`)."""

    def __init__(self, cmp_block: int, num_kv_heads: int, head_dim: int, hidden: int, *,
                 param_dtype, rngs: nnx.Rngs):
        l, hkv, hd = cmp_block, num_kv_heads, head_dim
        w1_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2)
        self.pos_emb = param(rngs, nnx.initializers.normal(0.02), (l, hkv, hd),
                             ("cmp_block", "kv_heads", "head_dim"), param_dtype)
        self.w1 = param(rngs, w1_init, (l, hd, hidden), ("cmp_block", "head_dim", "cmp_mlp"), param_dtype)
        self.b1 = param(rngs, nnx.initializers.zeros_init(), (hidden,), ("cmp_mlp",), param_dtype)
        self.w2 = param(rngs, fan_in_init, (hidden, hd), ("cmp_mlp", "head_dim"), param_dtype)
        self.b2 = param(rngs, nnx.initializers.zeros_init(), (hd,), ("head_dim",), param_dtype)

    def __call__(self, blocks):
        return ops.compress(blocks, self.pos_emb[...], self.w1[...], self.b1[...], self.w2[...],
                            self.b2[...])


class NSAAttention(AttentionLayer):
    """NSA layer: `NSAAttention(attention_config, nsa_config, rngs=...)`.

    Supports GQA/MQA, RoPE and the output gate of `AttentionConfig`; learned sinks and
    logit soft-cap are not part of NSA and raise ValueError. The kernels are picked by
    `config.impl`; `interpret=True` runs them in Pallas interpret mode (CPU tests).
    """

    def __init__(self, config: AttentionConfig, nsa: NSAConfig = NSAConfig(), *, interpret: bool = False,
                 rngs: nnx.Rngs):
        if not isinstance(nsa, NSAConfig):
            raise ValueError(f"nsa must be an NSAConfig, got {type(nsa).__name__}")
        if config.learned_sinks:
            raise ValueError("learned_sinks=True is not supported by NSAAttention")
        if config.softcap is not None:
            raise ValueError(f"softcap={config.softcap} is not supported by NSAAttention")
        if not isinstance(interpret, bool):
            raise ValueError(f"interpret must be a bool, got {interpret!r}")
        self.config, self.nsa, self.interpret = config, nsa, interpret
        c = config
        h, hkv, hd, d, pd = c.num_heads, c.num_kv_heads, c.head_dim, c.d_model, c.param_dtype
        self.wq = param(rngs, fan_in_init, (d, h, hd), ("embed", "heads", "head_dim"), pd)
        for name in BRANCHES:
            setattr(self, f"wk_{name}", param(rngs, fan_in_init, (d, hkv, hd), ("embed", "kv_heads", "head_dim"), pd))
            setattr(self, f"wv_{name}", param(rngs, fan_in_init, (d, hkv, hd), ("embed", "kv_heads", "head_dim"), pd))
        hidden = nsa.cmp_mlp_dim or 2 * hd
        self.phi_k = Compressor(nsa.cmp_block, hkv, hd, hidden, param_dtype=pd, rngs=rngs)
        self.phi_v = Compressor(nsa.cmp_block, hkv, hd, hidden, param_dtype=pd, rngs=rngs)
        self.w_gate = param(rngs, fan_in_init, (d, h, 3), ("embed", "heads", None), pd)
        self.b_gate = param(rngs, nnx.initializers.zeros_init(), (h, 3), ("heads", None), pd)
        self.wo, _, self.wg = output_params(rngs, c)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> NSACache:
        c, n = self.config, self.nsa
        return NSACache.init(batch, max_len, c.num_kv_heads, c.head_dim, cmp_block=n.cmp_block,
                             cmp_stride=n.cmp_stride, window=n.window,
                             dtype=c.dtype if dtype is None else dtype)

    def _proj(self, x, w):
        return jnp.einsum("btd,dhk->bthk", x, w[...].astype(x.dtype))

    def _rope(self, x, positions):
        theta = self.config.rope_theta
        return x if theta is None else apply_rope(x, positions, theta)

    def branches(self, x, positions, cache=None):
        """Projections, caches and the three branches: `(ops.NSABranches, gates, new cache)`."""
        c, n = self.config, self.nsa
        if x.ndim != 3 or x.shape[-1] != c.d_model:
            raise ValueError(f"x must be [batch, seq, d_model={c.d_model}], got {x.shape}")
        positions = jnp.asarray(positions)
        if positions.shape != x.shape[:2] or not jnp.issubdtype(positions.dtype, jnp.integer):
            raise ValueError(f"positions must be int [B, T] = {list(x.shape[:2])}, got "
                             f"{positions.dtype}{list(positions.shape)}")
        if cache is not None and not isinstance(cache, NSACache):
            raise ValueError(f"cache must be an NSACache from init_cache, got {type(cache).__name__}")
        positions = positions.astype(jnp.int32)
        x = x.astype(c.dtype)
        b, t = positions.shape
        q = self._rope(self._proj(x, self.wq), positions)
        k_cmp, v_cmp = self._proj(x, self.wk_cmp), self._proj(x, self.wv_cmp)
        k_slc, v_slc = self._rope(self._proj(x, self.wk_slc), positions), self._proj(x, self.wv_slc)
        k_win, v_win = self._rope(self._proj(x, self.wk_win), positions), self._proj(x, self.wv_win)
        (k_cmp, v_cmp), (k_slc, v_slc), (k_win, v_win) = (      # padding / non-finite tokens: ops.masking
            guard_kv(k, v, positions) for k, v in ((k_cmp, v_cmp), (k_slc, v_slc), (k_win, v_win)))
        if cache is None:
            slc = FullKVCache.init(b, t, c.num_kv_heads, c.head_dim, dtype=c.dtype)
            slc_k, slc_v, slc_pos, _ = slc.update(k_slc, v_slc, positions)
            win_k, win_v, win_pos = k_win, v_win, positions
            tail_k, tail_v, tail_pos = k_cmp, v_cmp, positions
            store = CompressedKV.init(b, ops.num_cmp_blocks(t, n), c.num_kv_heads, c.head_dim, dtype=c.dtype)
        else:
            slc_k, slc_v, slc_pos, new_slc = cache.slc.update(k_slc, v_slc, positions)
            win_k, win_v, win_pos, new_win = cache.win.update(k_win, v_win, positions)
            tail_k, tail_v, tail_pos, new_tail = cache.tail.update(k_cmp, v_cmp, positions)
            store = cache.cmp
        blocks_k, blocks_v, block_ids = ops.gather_cmp_blocks(tail_k, tail_v, tail_pos, positions, n)
        block_pos = ops.cmp_block_end(block_ids, n)
        ck = self._rope(self.phi_k(blocks_k), block_pos)
        cv = self.phi_v(blocks_v)
        store = store.write(block_ids, ck, cv, block_pos)
        if cache is not None:
            cache = NSACache(new_slc, new_win, new_tail, store)
        # A few queries with a cache: the decode kernels read compressed + n*l' + w tokens.
        attend = ops.nsa_decode_branches if cache is not None and ops.decodes(t, n) else ops.nsa_branches
        out = attend(q, positions, k_cmp=store.k, v_cmp=store.v, cmp_positions=store.positions,
                     k_slc=slc_k, v_slc=slc_v, slc_positions=slc_pos, k_win=win_k, v_win=win_v,
                     win_positions=win_pos, cfg=n, impl=c.impl, interpret=self.interpret)
        gates = jax.nn.sigmoid(jnp.einsum("btd,dhc->bthc", x, self.w_gate[...].astype(c.dtype))
                               + self.b_gate[...].astype(c.dtype))
        return out, gates, cache

    def __call__(self, x, positions, cache=None, shared=None):
        """x: `[B, T, d_model]`, positions: int `[B, T]` -> (`[B, T, d_model]`, new cache)."""
        del shared
        c = self.config
        out, gates, cache = self.branches(x, positions, cache)
        o = ops.gated_sum(out, gates)
        if self.wg is not None:
            o = o * jax.nn.sigmoid(self._proj(x.astype(c.dtype), self.wg))
        y = jnp.einsum("bthk,hkd->btd", o.astype(c.dtype), self.wo[...].astype(c.dtype))
        return y, cache
