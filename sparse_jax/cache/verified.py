"""The KV cache of verified sparse attention (vAttention, arXiv 2510.05688).

`VerifiedKVCache` holds a `sparse_jax.cache.kv.FullKVCache` (slot = position; nothing is
evicted, every decoded token is appended exactly) and a PRNG key. A decode call (at most
`DECODE_MAX_QUERIES` queries, not `dense`) chooses, per kv head, the deterministic set
(sinks, window, top-k) and the weighted uniform sample of the rest whose size meets the
policy's `(epsilon, delta)` bound (`sparse_jax.ops.verified.verified_selection`), and
returns it as `Selection(log_weights=...)`, which the layer attends with
`weighted_attention`. Any other call (the prompt) reads every slot (the default
`Selection`). The sample of a call is drawn from `fold_in(key, newest position)`, so a
replayed step draws the same keys and two steps draw independent ones; each managed layer
gets its own key (`sparse_jax.kv_policies.verified.VAttention.make_cache`).

`read [B, Hkv, S]` (bool, the slots the last call read), `budget [B, Hkv]` (its sample
sizes) and `n_rest [B, Hkv]` (its residual counts) are what the last call chose, kept for
reports (`kept_mask`), not for attention.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sparse_jax.cache.base import Cache, Queries, Selection, nbytes_of
from sparse_jax.cache.kv import FullKVCache
from sparse_jax.ops.attention import DECODE_MAX_QUERIES
from sparse_jax.ops.verified import verified_selection


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VerifiedKVCache(Cache):
    """`full: FullKVCache`; `key [2]` uint32 (raw PRNG key data); `read [B, Hkv, S]` bool,
    `budget`, `n_rest [B, Hkv]` int32 (the last call's choice); `policy` (static: a
    `VAttention`, whose `selection_kwargs()` are `verified_selection`'s); `dense` (static):
    read every slot."""

    full: FullKVCache
    key: jax.Array
    read: jax.Array
    budget: jax.Array
    n_rest: jax.Array
    policy: object = dataclasses.field(metadata=dict(static=True))
    dense: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @classmethod
    def init(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int, policy, *, seed: int = 0,
             layer: int = 0, v_head_dim: int | None = None, dtype=jnp.float32,
             dense: bool = False) -> "VerifiedKVCache":
        """Empty cache; its key is `fold_in(key(seed), layer)`."""
        if not isinstance(seed, int) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"seed must be an int and layer an int >= 0, got {seed!r}, {layer!r}")
        full = FullKVCache.init(batch, max_len, num_kv_heads, head_dim, v_head_dim, dtype)
        key = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), layer))
        counts = jnp.zeros((batch, num_kv_heads), jnp.int32)
        return cls(full, key, jnp.zeros((batch, num_kv_heads, max_len), bool), counts, counts, policy, dense)

    @property
    def positions(self):
        return self.full.positions

    def nbytes(self) -> int:
        """The full cache's slots plus the PRNG key (the last call's choice is a report)."""
        return self.full.nbytes() + nbytes_of(self.key)

    def kept_mask(self, length: int):
        """bool `[B, Hkv, length]`: positions `0..length-1` the last call read."""
        return self.read[..., :length] & (self.full.positions[:, None, :length] >= 0)

    def update(self, k, v, positions, *, queries=None):
        """Write `k, v [B, T, Hkv, ...]` at slots `positions [B, T]` (`FullKVCache.update`:
        its capacity errors), then choose what each kv head reads: `(keys, values,
        kv_positions, Selection, new cache)`. A decode call needs `queries=Queries(...)`."""
        keys, values, kv_pos, full = self.full.update(k, v, positions)
        if self.dense or k.shape[1] > DECODE_MAX_QUERIES:
            read = jnp.broadcast_to((kv_pos >= 0)[:, None], self.read.shape)
            zero = jnp.zeros_like(self.budget)
            return keys, values, kv_pos, Selection(), dataclasses.replace(self, full=full, read=read, budget=zero,
                                                                          n_rest=zero)
        if not isinstance(queries, Queries):
            raise ValueError(f"VerifiedKVCache.update needs queries=Queries(...) to choose keys, "
                             f"got {type(queries).__name__}")
        step_key = jax.random.fold_in(jax.random.wrap_key_data(self.key), jnp.max(positions))
        sel = verified_selection(queries.q, keys, values, kv_pos, positions, step_key, scale=queries.scale,
                                 sink_logits=queries.sink_logits, softcap=queries.softcap,
                                 **self.policy.selection_kwargs())
        return (keys, values, kv_pos, Selection(log_weights=sel.log_weights),
                dataclasses.replace(self, full=full, read=sel.deterministic | sel.sampled, budget=sel.budget,
                                    n_rest=sel.n_rest))
