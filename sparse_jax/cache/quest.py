"""The KV cache of Quest (arXiv 2406.10774): a full cache plus per-page key bounds.

`QuestKVCache` holds a `sparse_jax.cache.kv.FullKVCache` (slot = position) and, per page of
`page_size` slots and kv head, the elementwise min and max of the keys written so far,
`kmin, kmax [B, P, Hkv, D]` (empty pages: `+inf` / `-inf`, as `sparse_jax.ops.quest.
page_bounds`). `update` recomputes the bounds of the pages it writes only (a decode step
touches one page per row), so a decode step reads `2 / page_size` of the key bytes for the
bounds instead of every key.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sparse_jax.cache.base import nbytes_of
from sparse_jax.cache.kv import FullKVCache
from sparse_jax.ops.quest import num_pages, page_bounds


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuestKVCache:
    """`full: FullKVCache`, `kmin, kmax [B, P, Hkv, D]` (cache dtype), `page_size` static."""

    full: FullKVCache
    kmin: jax.Array
    kmax: jax.Array
    page_size: int = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def init(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int, *, page_size: int = 16,
             v_head_dim: int | None = None, dtype=jnp.float32) -> "QuestKVCache":
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
        full = FullKVCache.init(batch, max_len, num_kv_heads, head_dim, v_head_dim, dtype)
        shape = (batch, num_pages(max_len, page_size), num_kv_heads, head_dim)
        return cls(full, jnp.full(shape, jnp.inf, dtype), jnp.full(shape, -jnp.inf, dtype), page_size)

    @property
    def k(self):
        return self.full.k

    @property
    def v(self):
        return self.full.v

    @property
    def positions(self):
        return self.full.positions

    @property
    def bounds(self):
        return self.kmin, self.kmax

    def nbytes(self) -> int:
        return self.full.nbytes() + nbytes_of(self.kmin, self.kmax)

    def update(self, k, v, positions):
        """Write `k, v [B, T, ...]` at slots `positions [B, T]` (-1: padding, not written),
        refresh the bounds of the pages written. Returns `(k, v, kv_positions, new_cache)`
        like `FullKVCache.update` (attend over the whole cache)."""
        keys, values, kv_pos, full = self.full.update(k, v, positions)
        b, t = positions.shape
        ps, p = self.page_size, self.kmin.shape[1]
        if t * ps >= full.max_len:                       # cheaper to refresh every page
            kmin, kmax = page_bounds(keys, kv_pos, ps)
            return keys, values, kv_pos, QuestKVCache(full, kmin, kmax, ps)
        page = jnp.where(positions >= 0, positions // ps, p)                     # [B, T]; p = dropped
        slots = jnp.minimum(page, p - 1)[..., None] * ps + jnp.arange(ps)        # [B, T, ps]
        inside = slots < full.max_len
        slots = jnp.minimum(slots, full.max_len - 1)
        rows = jnp.arange(b)[:, None, None]
        pk = keys[rows, slots]                                                   # [B, T, ps, Hkv, D]
        ok = (inside & (kv_pos[rows, slots] >= 0))[..., None, None]
        new_min = jnp.where(ok, pk, jnp.inf).min(2).astype(self.kmin.dtype)      # [B, T, Hkv, D]
        new_max = jnp.where(ok, pk, -jnp.inf).max(2).astype(self.kmax.dtype)
        rb = jnp.arange(b)[:, None]
        kmin = self.kmin.at[rb, page].set(new_min, mode="drop")
        kmax = self.kmax.at[rb, page].set(new_max, mode="drop")
        return keys, values, kv_pos, QuestKVCache(full, kmin, kmax, ps)
