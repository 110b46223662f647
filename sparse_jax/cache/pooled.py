"""Caches of the training-free KV policies (`sparse_jax.kv_policies`).

They follow the contract of `sparse_jax.cache.base.Cache`: `update(k, v, positions, *,
queries)` reads the rotated queries as data (`Queries`) where it needs them and returns
what the layer attends over; the layer (`AttentionBase.attend_cached`) attends.

* `PolicyPrefill`: no arrays; the prompt is attended densely (`Selection(prefill=True)`:
  prefill logits are the dense ones), and the new cache is the `PooledKVCache` its policy
  keeps (`compress`).
* `PooledKVCache`: the kept slots of all kv heads of one layer pooled together,
  `k [B, N, D]`, `v [B, N, Dv]`, `positions [B, N]` (-1 = empty), `heads [B, N]` (the kv
  head of each slot), so heads may keep different numbers of entries (Ada-KV,
  DuoAttention). Decode appends one slot per kv head per new token into the
  `Hkv * max_new` slots after the `num_kept` ones; `update` returns the pooled store with
  `Selection(slot_heads=heads)`, attended by `pooled_attention`.
* `DenseOracleCache`: a `FullKVCache` that also records the last query's attention
  probabilities (the dense oracle of attention-mass recall, and DuoAttention's
  calibration).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from pallas_kernels.common import masked_attention
from sparse_jax.cache.base import Cache, Selection, check_new_kv, nbytes_of, need_queries
from sparse_jax.cache.kv import FullKVCache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PooledKVCache(Cache):
    """Per-head compressed cache of one layer (see the module docstring).

    `k [B, N, D]`, `v [B, N, Dv]`, `positions [B, N]`, `heads [B, N]` int32 with
    `N = num_kept + num_kv_heads * max_new`; `num_decoded [B]` tokens appended so far (it
    keeps counting past `max_new`: `overflowed()`; the tokens past it are not stored).
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    heads: jax.Array
    num_decoded: jax.Array
    num_kv_heads: int = dataclasses.field(metadata=dict(static=True))
    num_kept: int = dataclasses.field(metadata=dict(static=True))

    @property
    def max_new(self) -> int:
        return (self.k.shape[1] - self.num_kept) // self.num_kv_heads

    def nbytes(self) -> int:
        return nbytes_of(self.k, self.v, self.positions, self.heads, self.num_decoded)

    def overflowed(self):
        """bool `[B]`: the row was given more than `max_new` tokens (those were not stored)."""
        return self.num_decoded > self.max_new

    def kept_mask(self, length: int):
        """bool `[B, Hkv, length]`: which positions `0..length-1` each kv head holds."""
        b, n = self.positions.shape
        pos = jnp.where((self.positions >= 0) & (self.positions < length), self.positions, length)
        rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, n))
        return jnp.zeros((b, self.num_kv_heads, length + 1), bool).at[rows, self.heads, pos].set(True)[..., :length]

    def update(self, k, v, positions, *, queries=None):
        """Append `k, v [B, T, Hkv, ...]` (one slot per kv head and valid token) ->
        `(k [B, N, D], v [B, N, Dv], positions [B, N], Selection(slot_heads=heads [B, N]),
        new cache)`: query head h attends the slots of kv head `h // G`, causal by position.
        More than `max_new` tokens raise ValueError when concrete, else set `overflowed()`."""
        del queries
        b, t, hkv, d = k.shape
        if hkv != self.num_kv_heads or d != self.k.shape[-1] or positions.shape != (b, t):
            raise ValueError(f"PooledKVCache: new keys must be [B={self.k.shape[0]}, T, Hkv={self.num_kv_heads}, "
                             f"D={self.k.shape[-1]}] with positions [B, T], got {k.shape}, {positions.shape}")
        valid = positions >= 0
        num_decoded = self.num_decoded + valid.sum(axis=1).astype(jnp.int32)
        if not isinstance(num_decoded, jax.core.Tracer) and bool((num_decoded > self.max_new).any()):
            raise ValueError(f"positions: {int(num_decoded.max())} decoded tokens do not fit the "
                             f"{self.max_new} this cache was made for (max_new)")
        checkify.debug_check((num_decoded <= self.max_new).all(),
                             f"positions: more decoded tokens than the cache holds (max_new={self.max_new})")
        rank = jnp.cumsum(valid, axis=1) - 1 + self.num_decoded[:, None]                 # [B, T]
        slot = self.num_kept + rank[:, :, None] * hkv + jnp.arange(hkv)                  # [B, T, Hkv]
        slot = jnp.where(valid[:, :, None], slot, self.k.shape[1])                       # -> dropped
        rows = jnp.broadcast_to(jnp.arange(b)[:, None, None], slot.shape)
        heads = jnp.broadcast_to(jnp.arange(hkv, dtype=jnp.int32), slot.shape)
        new = dataclasses.replace(
            self, k=self.k.at[rows, slot].set(k, mode="drop"), v=self.v.at[rows, slot].set(v, mode="drop"),
            positions=self.positions.at[rows, slot].set(jnp.broadcast_to(positions[:, :, None], slot.shape),
                                                        mode="drop"),
            heads=self.heads.at[rows, slot].set(heads, mode="drop"), num_decoded=num_decoded)
        return new.k, new.v, new.positions, Selection(slot_heads=new.heads), new


def pooled_attention(q, k, v, kv_positions, slot_heads, q_positions, *, num_kv_heads: int, scale,
                     sink_logits=None, softcap=None):
    """Attention of `q [B, Tq, H, D]` over a pooled store `k [B, N, D]`, `v [B, N, Dv]`,
    `kv_positions [B, N]`, `slot_heads [B, N]` (the layout of `PooledKVCache`): query head
    h sees the slots of kv head `h // G` whose position is valid and `<=` its own. Plain
    jnp (the slots are broadcast to every kv head and masked), written for clarity."""
    b, n, _ = k.shape
    hkv = num_kv_heads
    kb = jnp.broadcast_to(k[:, :, None], (b, n, hkv, k.shape[-1]))
    vb = jnp.broadcast_to(v[:, :, None], (b, n, hkv, v.shape[-1]))
    own = slot_heads[:, None, :] == jnp.arange(hkv)[None, :, None]                          # [B, Hkv, N]
    causal = ((kv_positions[:, None, :] <= q_positions[:, :, None]) & (kv_positions[:, None, :] >= 0)
              & (q_positions[:, :, None] >= 0))                                              # [B, Tq, N]
    out, _, _ = masked_attention(q, kb.astype(q.dtype), vb.astype(q.dtype), own[:, :, None] & causal[:, None],
                                 scale=scale, sink_logits=sink_logits, softcap=softcap)
    return out


def compress(policy, obs, v, *, layer: int, num_layers: int, max_new: int):
    """Apply `policy` (a `KVPolicy`) to one layer's prompt keys `obs.k [B, S, Hkv, D]`
    (an `Observation`) and values `v [B, S, Hkv, Dv]` -> `PooledKVCache` with room for
    `max_new` decoded tokens."""
    from sparse_jax.kv_policies.policies import select   # here: that package imports the layers

    b, _, hkv, _ = obs.k.shape
    slot, head = select(policy, obs, layer, num_layers)                                     # [B, N]
    rows = jnp.arange(b)[:, None]
    room = hkv * max_new
    pad = lambda x, fill: jnp.concatenate([x, jnp.full((b, room) + x.shape[2:], fill, x.dtype)], axis=1)
    return PooledKVCache(k=pad(obs.k[rows, slot, head], 0), v=pad(v[rows, slot, head], 0),
                         positions=pad(obs.kv_positions[rows, slot], -1), heads=pad(head, 0),
                         num_decoded=jnp.zeros((b,), jnp.int32), num_kv_heads=hkv, num_kept=slot.shape[1])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PolicyPrefill(Cache):
    """The cache a policy-managed layer starts with: the prompt goes through dense, then
    `compress` keeps what `policy` chooses (one prefill call; decode continues on the
    returned `PooledKVCache`). `layer` / `num_layers` index the managed layers."""

    policy: object = dataclasses.field(metadata=dict(static=True))
    layer: int = dataclasses.field(metadata=dict(static=True))
    num_layers: int = dataclasses.field(metadata=dict(static=True))
    max_new: int = dataclasses.field(metadata=dict(static=True))

    def nbytes(self) -> int:
        return 0

    def update(self, k, v, positions, *, queries=None):
        """The prompt `k, v [B, T, Hkv, ...]` with the rotated `queries` ->
        `(k, v, positions, Selection(prefill=True), PooledKVCache)`."""
        from sparse_jax.kv_policies.policies import Observation   # here: that package imports the layers

        need_queries("PolicyPrefill.update", queries)
        obs = Observation(queries.q, k, positions, positions, softcap=queries.softcap,
                          sink_logits=queries.sink_logits)
        new = compress(self.policy, obs, v, layer=self.layer, num_layers=self.num_layers, max_new=self.max_new)
        return k, v, positions, Selection(prefill=True), new


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseOracleCache(Cache):
    """`FullKVCache` + `probs [B, H, max_len]`: the last query's attention over the slots
    (slot = position) in the latest call, softmax over everything it sees."""

    full: FullKVCache
    probs: jax.Array

    @classmethod
    def init(cls, batch, max_len, num_kv_heads, num_heads, head_dim, dtype=jnp.float32):
        return cls(FullKVCache.init(batch, max_len, num_kv_heads, head_dim, dtype=dtype),
                   jnp.zeros((batch, num_heads, max_len), jnp.float32))

    def nbytes(self) -> int:
        return self.full.nbytes()

    def update(self, k, v, positions, *, queries=None):
        """As `FullKVCache.update`; records the attention probabilities of the last of the
        rotated `queries` (needed) over the whole cache."""
        need_queries("DenseOracleCache.update", queries)
        check_new_kv("DenseOracleCache", self.full.k, k, v, positions)
        keys, values, kv_pos, full = self.full.update(k, v, positions)
        last = queries.q[:, -1:]
        qp = positions[:, -1:]
        visible = (kv_pos[:, None, :] <= qp[:, :, None]) & (kv_pos[:, None, :] >= 0) & (qp[:, :, None] >= 0)
        _, probs, _ = masked_attention(last, keys, keys, visible, scale=queries.scale,
                                       sink_logits=queries.sink_logits, softcap=queries.softcap)
        b, hkv, g = probs.shape[:3]
        return keys, values, kv_pos, DenseOracleCache(full, probs.reshape(b, hkv * g, -1))
