"""HySparse (Xiaomi, 2026) layers: one full layer hands its KV and per-token top-k KV blocks
to the N sparse layers after it.

    y, cache = layer(x, positions, cache=None, shared=None)

The contract for `shared` (pure, no state on the module):

* Every layer has `y, cache, shared = layer.forward(x, positions, cache=None,
  shared=None)` (`sparse_jax.layers.base.AttentionLayer`), the one way to hand something
  to later layers. `HySparseFullAttention.forward` returns its own `shared`; `__call__`
  is `forward` without the third output (so the layer also works as a plain full layer).
  A model (`sparse_jax.models.lm.SparseLM`) calls `forward` on every layer, so each
  layer receives the latest `shared`.
* `shared` is a `sparse_jax.ops.hysparse.HySparseShared`: the full layer's RoPE'd keys,
  values and their positions (position-indexed slots; the whole cache when decoding) and
  `block_indices [B, T, Hkv, k]` for this call's queries.
* `HySparseSparseAttention` requires `shared` (ValueError otherwise); it has no KV for its
  sparse branch. Its cache is a `HySparseSparseCache` holding only the SWA branch's own
  rolling KV (or nothing: with `swa_branch=False` or `swa_shares_kv=True` it is empty,
  0 bytes, and only marks "decoding").

Sparse layer: `o = g1 * o_sparse + g2 * o_swa`, `g = sigmoid(x W_g)` per head, one query
projection for both branches, learned per-head sink logits in each branch (always on, as
in the paper; `AttentionConfig.learned_sinks` applies to the full layer).

Without a cache each row's valid positions must be `0..n-1` (padding -1 anywhere): the
full layer's keys are scattered to position-indexed slots, so KV block j holds positions
`j*bs .. (j+1)*bs-1` in training and decode alike.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_jax.cache.hysparse import HySparseSparseCache
from sparse_jax.cache.kv import FullKVCache, RollingKVCache
from sparse_jax.layers.attention import AttentionBase, AttentionConfig, output_params
from sparse_jax.layers.base import AttentionLayer
from sparse_jax.ops import attention as attn_ops
from sparse_jax.ops import hysparse as ops
from sparse_jax.ops import selection
from sparse_jax.ops.hysparse import HySparseShared
from sparse_jax.ops.masking import guard_kv
from sparse_jax.ops.rope import apply_rope
from sparse_jax.sharding import param

_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


@dataclasses.dataclass(frozen=True)
class HySparseConfig:
    """block_size: KV block of the selection (paper 64). top_k_tokens: tokens selected per
    query (paper 1024 -> 16 blocks; must be a multiple of block_size). window: SWA branch
    window (paper 128). swa_branch=False: sparse branch only (ablation). swa_shares_kv:
    the SWA branch reads the full layer's KV instead of its own (ablation). query_block:
    1 = exact per-token selection (the `token_sparse` op, Triton on GPU); >= 16 for the
    Triton `block_sparse` kernel: each query block of a call then attends to the union of
    its tokens' selections (a superset; a decode step of one token uses its own selection only, so
    decode equals prefill exactly only with query_block=1)."""

    block_size: int = 64
    top_k_tokens: int = 1024
    window: int = 128
    swa_branch: bool = True
    swa_shares_kv: bool = False
    query_block: int = 1

    def __post_init__(self):
        for name in ("block_size", "top_k_tokens", "window", "query_block"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be an int >= 1, got {val!r}")
        if self.top_k_tokens % self.block_size:
            raise ValueError(f"top_k_tokens ({self.top_k_tokens}) must be a multiple of block_size "
                             f"({self.block_size})")
        if self.swa_shares_kv and not self.swa_branch:
            raise ValueError("swa_shares_kv=True needs swa_branch=True")

    @property
    def top_k_blocks(self) -> int:
        return self.top_k_tokens // self.block_size


def _check_inputs(c: AttentionConfig, x, positions):
    if x.ndim != 3 or x.shape[-1] != c.d_model:
        raise ValueError(f"x must be [batch, seq, d_model={c.d_model}], got {x.shape}")
    positions = jnp.asarray(positions)
    if positions.shape != x.shape[:2] or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"positions must be int [B, T] = {list(x.shape[:2])}, got "
                         f"{positions.dtype}{list(positions.shape)}")
    return x.astype(c.dtype), positions.astype(jnp.int32)


class HySparseFullAttention(AttentionBase):
    """Causal full attention that also selects the top-k KV blocks per query token."""

    def __init__(self, config: AttentionConfig, hysparse: HySparseConfig = HySparseConfig(), *,
                 rngs: nnx.Rngs):
        if not isinstance(hysparse, HySparseConfig):
            raise ValueError(f"hysparse must be a HySparseConfig, got {type(hysparse).__name__}")
        super().__init__(config, rngs=rngs)
        self.hysparse = hysparse

    def forward(self, x, positions, cache=None, shared=None):
        """-> `(y [B, T, d_model], new cache, HySparseShared)`: its own `shared` replaces the one given."""
        del shared
        c, hs = self.config, self.hysparse
        x, positions = _check_inputs(c, x, positions)
        if cache is not None and not isinstance(cache, FullKVCache):
            raise ValueError(f"cache must be a FullKVCache from init_cache, got {type(cache).__name__}")
        proj = lambda w: jnp.einsum("btd,dhk->bthk", x, w[...].astype(c.dtype))
        q, k, v = proj(self.wq), proj(self.wk), proj(self.wv)
        if c.rope_theta is not None:
            q, k = apply_rope(q, positions, c.rope_theta), apply_rope(k, positions, c.rope_theta)
        k, v = guard_kv(k, v, positions)
        store = (FullKVCache.init(x.shape[0], x.shape[1], c.num_kv_heads, c.head_dim, dtype=c.dtype)
                 if cache is None else cache)
        keys, values, kv_positions, new_cache = store.update(k, v, positions)
        sinks = None if self.sink_logits is None else self.sink_logits[...]
        o, idx = ops.hysparse_full_attention(q, keys, values, positions, kv_positions,
                                             block_size=hs.block_size, top_k_blocks=hs.top_k_blocks,
                                             sink_logits=sinks, softcap=c.softcap, impl=c.impl)
        if self.wg is not None:
            o = o * jax.nn.sigmoid(proj(self.wg))
        y = jnp.einsum("bthk,hkd->btd", o.astype(c.dtype), self.wo[...].astype(c.dtype))
        shared = HySparseShared(keys, values, kv_positions, idx, hs.block_size)
        return y, (None if cache is None else new_cache), shared

    def __call__(self, x, positions, cache=None, shared=None):
        del shared
        y, cache, _ = self.forward(x, positions, cache)
        return y, cache

    def init_cache(self, batch: int, max_len: int, dtype=None):
        c = self.config
        return FullKVCache.init(batch, max_len, c.num_kv_heads, c.head_dim,
                                dtype=c.dtype if dtype is None else dtype)


class HySparseSparseAttention(AttentionLayer):
    """Block-sparse branch over the shared KV + SWA branch, fused by sigmoid gates.

    Uses `num_heads`, `num_kv_heads` (must match the full layer's), `head_dim`,
    `rope_theta`, `output_gate`, `softcap`, `impl` of `AttentionConfig`.
    """

    def __init__(self, config: AttentionConfig, hysparse: HySparseConfig = HySparseConfig(), *,
                 rngs: nnx.Rngs):
        if not isinstance(hysparse, HySparseConfig):
            raise ValueError(f"hysparse must be a HySparseConfig, got {type(hysparse).__name__}")
        self.config, self.hysparse = config, hysparse
        c, hs = config, hysparse
        h, hkv, hd, d, pd = c.num_heads, c.num_kv_heads, c.head_dim, c.d_model, c.param_dtype
        self.wq = param(rngs, _init, (d, h, hd), ("embed", "heads", "head_dim"), pd)
        own_kv = hs.swa_branch and not hs.swa_shares_kv
        self.wk_swa = param(rngs, _init, (d, hkv, hd), ("embed", "kv_heads", "head_dim"), pd) if own_kv else None
        self.wv_swa = param(rngs, _init, (d, hkv, hd), ("embed", "kv_heads", "head_dim"), pd) if own_kv else None
        n_branches = 2 if hs.swa_branch else 1
        self.w_gate = param(rngs, _init, (d, h, n_branches), ("embed", "heads", None), pd)
        zeros = nnx.initializers.zeros_init()
        self.sink_sparse = param(rngs, zeros, (h,), ("heads",), pd)
        self.sink_swa = param(rngs, zeros, (h,), ("heads",), pd) if hs.swa_branch else None
        self.wo, _, self.wg = output_params(rngs, c)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> HySparseSparseCache:
        c, hs = self.config, self.hysparse
        dtype = c.dtype if dtype is None else dtype
        if self.wk_swa is None:
            return HySparseSparseCache(None)
        if hs.window >= max_len:
            return HySparseSparseCache(FullKVCache.init(batch, max_len, c.num_kv_heads, c.head_dim, dtype=dtype))
        return HySparseSparseCache(RollingKVCache.init(batch, hs.window, c.num_kv_heads, c.head_dim, dtype=dtype))

    def branches(self, x, positions, cache=None, shared=None):
        """-> `(o_sparse, o_swa or None, gates [B, T, H, n], new cache)`."""
        c, hs = self.config, self.hysparse
        x, positions = _check_inputs(c, x, positions)
        if not isinstance(shared, HySparseShared):
            raise ValueError("HySparseSparseAttention needs shared=HySparseShared from a preceding "
                             f"HySparseFullAttention, got {type(shared).__name__}")
        b, t = positions.shape
        if shared.block_indices.shape[:3] != (b, t, c.num_kv_heads) or shared.k.shape[2] != c.num_kv_heads:
            raise ValueError(f"shared block_indices {shared.block_indices.shape} / keys {shared.k.shape} "
                             f"do not fit batch={b}, num_kv_heads={c.num_kv_heads}, T={t}")
        if cache is not None and not isinstance(cache, HySparseSparseCache):
            raise ValueError(f"cache must be a HySparseSparseCache from init_cache, got {type(cache).__name__}")
        proj = lambda w: jnp.einsum("btd,dhk->bthk", x, w[...].astype(c.dtype))
        rope = (lambda a: a) if c.rope_theta is None else (lambda a: apply_rope(a, positions, c.rope_theta))
        q = rope(proj(self.wq))
        o_sparse = selection.selected_block_attention(
            q, shared.k, shared.v, positions, shared.kv_positions, shared.block_indices,
            block_size=shared.block_size, query_block=hs.query_block, sink_logits=self.sink_sparse[...],
            softcap=c.softcap, impl=c.impl)
        o_swa = None
        if hs.swa_branch:
            if self.wk_swa is None:                                   # ablation: the full layer's KV
                keys, values, kv_pos = shared.k, shared.v, shared.kv_positions
            else:
                k, v = guard_kv(rope(proj(self.wk_swa)), proj(self.wv_swa), positions)
                if cache is None:
                    keys, values, kv_pos = k, v, positions
                else:
                    keys, values, kv_pos, swa = cache.swa.update(k, v, positions)
                    cache = HySparseSparseCache(swa)
            o_swa = attn_ops.local_attention(q, keys, values, positions, kv_pos,
                                             window=hs.window, decoding=cache is not None,
                                             sink_logits=self.sink_swa[...], softcap=c.softcap, impl=c.impl)
        gates = jax.nn.sigmoid(jnp.einsum("btd,dhc->bthc", x, self.w_gate[...].astype(c.dtype)))
        return o_sparse, o_swa, gates, cache

    def __call__(self, x, positions, cache=None, shared=None):
        c = self.config
        o_sparse, o_swa, gates, cache = self.branches(x, positions, cache, shared)
        o = gates[..., 0:1] * o_sparse
        if o_swa is not None:
            o = o + gates[..., 1:2] * o_swa
        if self.wg is not None:
            o = o * jax.nn.sigmoid(jnp.einsum("btd,dhk->bthk", x.astype(c.dtype), self.wg[...].astype(c.dtype)))
        y = jnp.einsum("bthk,hkd->btd", o.astype(c.dtype), self.wo[...].astype(c.dtype))
        return y, cache
