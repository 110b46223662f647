"""KV caches of MLA (arXiv 2405.04434) and DSA (DeepSeek-V3.2, arXiv 2512.02556).

Both reuse `FullKVCache` (slot = position) with one "KV head":

* `MLACache.latent`: `k` = the KV latent `c_kv [B, S, 1, Dc]`, `v` = the RoPE key
  `k_rope [B, S, 1, Dr]`: 576 values per token at the paper's sizes, not per head.
* `DSACache` adds `index_keys`: the lightning indexer's keys `k_I [B, S, 1, D_I]` in their
  own dtype (low precision allowed: bf16, float8); `v` holds float8 keys' per-token scale
  (`[B, S, 1, 1]`, `sparse_jax.ops.dsa.index_key_codes`), else it is of width 0.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sparse_jax.cache.base import Cache
from sparse_jax.cache.kv import FullKVCache
from sparse_jax.ops import dsa as dsa_ops


def latent_cache(batch: int, max_len: int, kv_lora_rank: int, rope_dim: int, dtype) -> FullKVCache:
    return FullKVCache.init(batch, max_len, 1, kv_lora_rank, v_head_dim=rope_dim, dtype=dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MLACache(Cache):
    latent: FullKVCache

    @classmethod
    def init(cls, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int, dtype=jnp.float32):
        return cls(latent_cache(batch, max_len, kv_lora_rank, rope_dim, dtype))

    def nbytes(self) -> int:
        return self.latent.nbytes()

    def update(self, c_kv, k_rope, positions):
        """Write `c_kv [B, T, Dc]`, `k_rope [B, T, Dr]`; return the whole cache's
        `(c_kv [B, S, Dc], k_rope [B, S, Dr], positions [B, S], new cache)`."""
        k, v, pos, latent = self.latent.update(c_kv[:, :, None], k_rope[:, :, None], positions)
        return k[:, :, 0], v[:, :, 0], pos, MLACache(latent)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DSACache(Cache):
    latent: FullKVCache
    index_keys: FullKVCache

    @classmethod
    def init(cls, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int, index_head_dim: int,
             dtype=jnp.float32, index_dtype=None):
        index_dtype = dtype if index_dtype is None else index_dtype
        scale_width = 1 if dsa_ops.is_float8(index_dtype) else 0
        return cls(latent_cache(batch, max_len, kv_lora_rank, rope_dim, dtype),
                   FullKVCache.init(batch, max_len, 1, index_head_dim, v_head_dim=scale_width, dtype=index_dtype))

    def nbytes(self) -> int:
        return self.latent.nbytes() + self.index_keys.nbytes()

    def update(self, c_kv, k_rope, k_index, positions):
        """As `MLACache.update`, plus the indexer keys `k_index [B, T, D_I]`; returns
        `(c_kv, k_rope, k_index [B, S, D_I], positions, new cache)`; the returned indexer keys
        are the stored ones (`dsa_ops.index_keys_from_codes`) in k_index's dtype."""
        k, v, pos, latent = self.latent.update(c_kv[:, :, None], k_rope[:, :, None], positions)
        codes, scale = dsa_ops.index_key_codes(k_index[:, :, None], self.index_keys.k.dtype)
        ki, ks, _, index_keys = self.index_keys.update(codes, scale, positions)
        keys = dsa_ops.index_keys_from_codes(ki[:, :, 0], ks[:, :, 0], k_index.dtype)
        return k[:, :, 0], v[:, :, 0], keys, pos, DSACache(latent, index_keys)
