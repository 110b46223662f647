"""The KV cache of Quest (arXiv 2406.10774): a full cache plus per-page key bounds.

`QuestKVCache` holds a `sparse_jax.cache.kv.FullKVCache` (slot = position) and, per page of
`page_size` slots and kv head, the elementwise min and max of the keys written so far,
`kmin, kmax [B, Hkv, P, D]` (head-major, as the scores stream them; empty pages: `+inf` /
`-inf`, as `sparse_jax.ops.quest.page_bounds`). `update` recomputes the bounds of the pages
it writes only (a decode step touches one page per row), so a decode step reads
`2 / page_size` of the key bytes for the bounds instead of every key.
`bounds_dtype="float8_e4m3fn"` (or e5m2) keeps them as float8 codes with a power-of-two
`bound_scale [B, Hkv, P, 1]` per page and head, rounded outwards (`sparse_jax.ops.quest.
bound_codes`): the scores stay upper bounds, the bytes they read halve for a bfloat16 cache.

`PageSelectCache` is the cache of the query-aware decode policies (`sparse_jax.kv_policies.
decode`: Quest, top-p): a `QuestKVCache` whose `update` also scores the pages by the
queries' bound and returns the pages each kv head reads (`Selection`), which the layer
attends with `page_attention`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.decode.api import decode_attention
from sparse_jax.cache.base import Cache, Queries, Selection, nbytes_of
from sparse_jax.cache.kv import FullKVCache
from sparse_jax.ops.attention import DECODE_MAX_QUERIES
from sparse_jax.ops.quest import bound_codes, check_bounds_dtype, num_pages, page_bounds, quest_page_scores, valid_pages


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuestKVCache(Cache):
    """`full: FullKVCache`, `kmin, kmax [B, Hkv, P, D]` (cache dtype, or float8 codes),
    `bound_scale [B, Hkv, P, 1]` (float8 codes; else width 0), `page_size` static."""

    full: FullKVCache
    kmin: jax.Array
    kmax: jax.Array
    bound_scale: jax.Array
    page_size: int = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def init(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int, *, page_size: int = 16,
             v_head_dim: int | None = None, dtype=jnp.float32, bounds_dtype=None) -> "QuestKVCache":
        """`bounds_dtype`: None (the cache `dtype`) or one of `sparse_jax.ops.quest.
        BOUND_CODE_DTYPES` (ValueError otherwise)."""
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
        bounds_dtype = check_bounds_dtype(bounds_dtype, dtype)
        full = FullKVCache.init(batch, max_len, num_kv_heads, head_dim, v_head_dim, dtype)
        shape = (batch, num_kv_heads, num_pages(max_len, page_size), head_dim)
        bounds = bound_codes(jnp.full(shape, jnp.inf, dtype), jnp.full(shape, -jnp.inf, dtype), bounds_dtype)
        return cls(full, *bounds, page_size)

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
        """`(kmin, kmax, bound_scale)`, as `quest_decode(bounds=...)` takes them."""
        return self.kmin, self.kmax, self.bound_scale

    def nbytes(self) -> int:
        return self.full.nbytes() + nbytes_of(self.kmin, self.kmax, self.bound_scale)

    def update(self, k, v, positions, *, queries=None):
        """Write `k, v [B, T, ...]` at slots `positions [B, T]` (-1: padding, not written),
        refresh the bounds of the pages written. Returns `(k, v, kv_positions, new_cache)`
        like `FullKVCache.update` (attend over the whole cache); `queries` is not read."""
        del queries
        keys, values, kv_pos, full = self.full.update(k, v, positions)
        b, t = positions.shape
        ps, p = self.page_size, self.kmin.shape[2]
        if t * ps >= full.max_len:                       # cheaper to refresh every page
            bounds = bound_codes(*page_bounds(keys, kv_pos, ps), self.kmin.dtype)
            return keys, values, kv_pos, QuestKVCache(full, *bounds, ps)
        page = jnp.where(positions >= 0, positions // ps, p)                     # [B, T]; p = dropped
        slots = jnp.minimum(page, p - 1)[..., None] * ps + jnp.arange(ps)        # [B, T, ps]
        inside = slots < full.max_len
        slots = jnp.minimum(slots, full.max_len - 1)
        rows = jnp.arange(b)[:, None, None]
        pk = keys[rows, slots]                                                   # [B, T, ps, Hkv, D]
        ok = (inside & (kv_pos[rows, slots] >= 0))[..., None, None]
        new = bound_codes(jnp.where(ok, pk, jnp.inf).min(2), jnp.where(ok, pk, -jnp.inf).max(2),   # [B, T, Hkv, D]
                          self.kmin.dtype)
        rb = jnp.arange(b)[:, None]       # x[rb, :, page]: numpy's advanced-index order, [B, T, Hkv, .] as `new`
        kmin, kmax, bound_scale = (x.at[rb, :, page].set(n, mode="drop")
                                   for x, n in zip((self.kmin, self.kmax, self.bound_scale), new))
        return keys, values, kv_pos, QuestKVCache(full, kmin, kmax, bound_scale, ps)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PageSelectCache(Cache):
    """`quest: QuestKVCache`; `selected [B, Hkv, P]` bool, the pages the last call read;
    `policy` (static) has `page_size` and `select(scores [B, Hkv, P], valid [B, P]) ->
    (block_indices [B, Hkv, k], block_counts [B, Hkv])`; `dense`: read every page."""

    quest: QuestKVCache
    selected: jax.Array
    policy: object = dataclasses.field(metadata=dict(static=True))
    dense: bool = dataclasses.field(metadata=dict(static=True))

    def nbytes(self) -> int:
        return self.quest.nbytes()

    def kept_mask(self, length: int):
        """bool `[B, Hkv, length]`: positions `0..length-1` in the pages the last call read."""
        ps = self.policy.page_size
        return jnp.repeat(self.selected, ps, axis=-1)[..., :length] & (self.quest.positions[:, None, :length] >= 0)

    def update(self, k, v, positions, *, queries=None):
        """Write as `QuestKVCache.update`, then choose the pages: `(keys, values, kv_positions,
        Selection, new cache)`. A decode call (at most `DECODE_MAX_QUERIES` queries, not
        `dense`) reads the pages `policy.select` picks by Quest's bound of the rotated
        `queries.q`; any other call reads every page (the default `Selection`)."""
        keys, values, kv_pos, quest = self.quest.update(k, v, positions)
        valid = valid_pages(kv_pos, self.policy.page_size, positions)             # [B, P]
        if self.dense or k.shape[1] > DECODE_MAX_QUERIES:
            selected = jnp.broadcast_to(valid[:, None], self.selected.shape)
            return keys, values, kv_pos, Selection(), PageSelectCache(quest, selected, self.policy, self.dense)
        if not isinstance(queries, Queries):
            raise ValueError(f"PageSelectCache.update needs queries=Queries(...) to choose pages, "
                             f"got {type(queries).__name__}")
        scores = quest_page_scores(queries.q, quest.kmin, quest.kmax, valid, bound_scale=quest.bound_scale)
        idx, cnt = self.policy.select(scores, valid)
        chosen = jnp.arange(idx.shape[-1]) < cnt[..., None]                          # [B, Hkv, k]
        b, hkv, p = self.selected.shape
        rows, heads = jnp.arange(b)[:, None, None], jnp.arange(hkv)[None, :, None]   # a scatter, not [B, Hkv, k, P]
        selected = jnp.zeros((b, hkv, p + 1), bool).at[rows, heads, jnp.where(chosen, idx, p)].set(True)[..., :p]
        return (keys, values, kv_pos, Selection(block_indices=idx, block_counts=cnt, block_size=self.policy.page_size),
                PageSelectCache(quest, selected, self.policy, self.dense))


def page_attention(q, k, v, kv_positions, q_positions, selection: Selection, *, sink_logits=None, softcap=None,
                   impl: str = "auto"):
    """Attention of `q [B, Tq, H, D]` (Tq <= DECODE_MAX_QUERIES) over the blocks of
    `k, v [B, S, Hkv, ...]` that `selection` names per kv head (the `decode` op's
    selected-block form) -> `[B, Tq, H, Dv]`."""
    return decode_attention(q, k, v, kv_positions=kv_positions, q_positions=q_positions,
                            block_indices=selection.block_indices, block_counts=selection.block_counts,
                            block_size=selection.block_size, sink_logits=sink_logits, softcap=softcap, impl=impl)
