"""The caches of Double-P (arXiv 2602.05191; the math: `sparse_jax.ops.doublep`).

* `DoublePPrefill`: no arrays. The prompt goes through dense (`Selection(prefill=True)`),
  its keys are clustered per (row, kv head) and the new cache is the `DoublePCache`.
* `DoublePCache`: the full KV (`FullKVCache`, slot = position; decoded tokens are appended
  exactly and belong to no cluster) plus, per (row, kv head), the prompt's clusters:
  `assign [B, max_len, Hkv]` (cluster of each slot, -1: none), centroids
  `[B, C, Hkv, D]`, mean values `[B, C, Hkv, Dv]`, `log_sizes [B, Hkv, C]` and
  `centroid_positions [B, C]`. Each `update` estimates the clusters' mass from the
  call's queries, keeps the top-p clusters exact and returns the tokens and the
  centroids side by side with `Selection(log_weights=...)` (exact tokens 0, approximated
  centroids `log size`, the rest -inf; with `keep_p < 1` the clusters past the top `keep_p`
  are dropped), which `AttentionBase.attend_cached` attends with
  `weighted_attention`.

Nothing is evicted: `nbytes()` is the full cache plus the clusters; what shrinks is what a
step reads (`kept_mask`: the exact tokens; `num_centroids`: the cluster slots). The
attention here is the plain-jnp reference over all slots (no kernel yet).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sparse_jax.cache.base import Cache, Selection, batch_index, check_new_kv, nbytes_of, need_queries
from sparse_jax.cache.kv import FullKVCache
from sparse_jax.ops import doublep as ops


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DoublePCache(Cache):
    """Full KV + the prompt's k-means clusters (see the module docstring). `selected
    [B, Hkv, C]` bool: the clusters the last call read exactly; `kept [B, Hkv, C]`:
    those it attended at all (exactly or through the centroid). `policy` (static) has
    `top_p` and `keep_p`."""

    full: FullKVCache
    assign: jax.Array
    centroids: jax.Array
    mean_values: jax.Array
    log_sizes: jax.Array
    centroid_positions: jax.Array
    selected: jax.Array
    kept: jax.Array
    policy: object = dataclasses.field(metadata=dict(static=True))

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[1]

    def nbytes(self) -> int:
        return self.full.nbytes() + nbytes_of(self.assign, self.centroids, self.mean_values, self.log_sizes,
                                              self.centroid_positions)

    def kept_mask(self, length: int):
        """bool `[B, Hkv, length]`: positions `0..length-1` the last call read exactly."""
        exact = ops.exact_tokens(self.assign, self.selected) & (self.full.positions >= 0)[:, None]
        return exact[..., :length]

    def num_centroids(self):
        """int32 `[B, Hkv]`: cluster slots the last call read (non-empty, kept, approximated)."""
        return (jnp.isfinite(self.log_sizes) & self.kept & ~self.selected).sum(-1).astype(jnp.int32)

    def update(self, k, v, positions, *, queries=None):
        """Write `k, v [B, T, Hkv, ...]` at slots `positions [B, T]` (in no cluster), select
        clusters by the rotated `queries.q` (needed) -> `(keys [B, max_len + C, Hkv, D],
        values, positions [B, max_len + C], Selection(log_weights [B, Hkv, max_len + C]),
        new cache)`. Positions past `max_len` raise as `FullKVCache.update`."""
        need_queries("DoublePCache.update", queries)
        check_new_kv("DoublePCache", self.full.k, k, v, positions)
        keys, values, kv_pos, full = self.full.update(k, v, positions)
        slot = jnp.where(positions >= 0, positions, full.max_len)
        assign = self.assign.at[batch_index(positions), slot].set(-1, mode="drop")
        mass = ops.cluster_mass(queries.q, self.centroids, self.log_sizes, q_valid=positions >= 0,
                                scale=queries.scale, softcap=queries.softcap)
        selected, kept = ops.choose_clusters(mass, self.policy.top_p, self.policy.keep_p)
        keys, values, kv_pos, lw = ops.doublep_slots(keys, values, kv_pos, assign, self.centroids, self.log_sizes,
                                                     self.mean_values, selected, self.centroid_positions, kept)
        kept = jnp.ones_like(selected) if kept is None else kept
        new = dataclasses.replace(self, full=full, assign=assign, selected=selected, kept=kept)
        return keys, values, kv_pos, Selection(log_weights=lw), new


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DoublePPrefill(Cache):
    """The cache a Double-P layer starts with: the prompt is attended densely, then
    clustered into `ceil(T / policy.cluster_size)` clusters per (row, kv head) (T: the
    prompt call's length) with `policy.iters` Lloyd iterations. `max_len`: prompt + decoded
    tokens; `dtype`: of the stored KV (None: the keys')."""

    policy: object = dataclasses.field(metadata=dict(static=True))
    max_len: int = dataclasses.field(metadata=dict(static=True))
    dtype: object = dataclasses.field(default=None, metadata=dict(static=True))

    def nbytes(self) -> int:
        return 0

    def update(self, k, v, positions, *, queries=None):
        """The prompt `k, v [B, T, Hkv, ...]`, `positions [B, T]` (-1: padding) ->
        `(k, v, positions, Selection(prefill=True), DoublePCache)`."""
        del queries
        b, t, hkv, d = k.shape
        dtype = k.dtype if self.dtype is None else self.dtype
        full = FullKVCache.init(b, self.max_len, hkv, d, v.shape[-1], dtype)
        check_new_kv("DoublePPrefill", full.k, k.astype(dtype), v.astype(dtype), positions)
        _, _, _, full = full.update(k.astype(dtype), v.astype(dtype), positions)
        c = -(-t // self.policy.cluster_size)
        assign_t, centroids, log_sizes, mean_values = ops.cluster_prompt(k, v, positions, num_clusters=c,
                                                                         iters=self.policy.iters)
        slot = jnp.where(positions >= 0, positions, self.max_len)
        assign = jnp.full((b, self.max_len, hkv), -1, jnp.int32).at[batch_index(positions), slot].set(
            assign_t, mode="drop")
        last = jnp.maximum(positions.max(axis=1), 0)                                 # newest prompt position
        new = DoublePCache(full, assign, centroids.astype(dtype), mean_values.astype(dtype), log_sizes,
                           jnp.broadcast_to(last[:, None], (b, c)).astype(jnp.int32),
                           jnp.zeros((b, hkv, c), bool), jnp.ones((b, hkv, c), bool), self.policy)
        return k, v, positions, Selection(prefill=True), new
