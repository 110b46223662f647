"""Caches of the KV policies, all speaking the layer's `update_and_attend` protocol.

`AttentionBase.__call__` hands a cache that defines
`update_and_attend(q, k, v, positions, *, layer, sink_logits, q_raw) -> (out, cache)` the
rotated queries too (every other cache keeps its plain `update`), so a cache can choose
what to keep from the queries and attend in its own layout:

* `PolicyPrefill`: no arrays; on the prompt it attends densely with the layer's own
  `attend` (prefill logits are the dense ones), then compresses by its policy into a
* `PooledKVCache`: the kept slots of all kv heads of one layer pooled together,
  `k [B, N, D]`, `v [B, N, Dv]`, `positions [B, N]` (-1 = empty), `heads [B, N]` (the kv
  head of each slot), so heads may keep different numbers of entries (Ada-KV,
  DuoAttention). Decode appends one slot per kv head per new token into the
  `Hkv * max_new` slots after the `num_kept` ones.
* `DenseOracleCache`: a `FullKVCache` that also records the last query's attention
  probabilities (the dense oracle of attention-mass recall, and DuoAttention's
  calibration).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import masked_attention
from sparse_jax.cache.base import check_new_kv, nbytes_of
from sparse_jax.cache.kv import FullKVCache


def _scale(layer) -> float:
    return 1.0 / float(np.sqrt(layer.config.head_dim))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PooledKVCache:
    """Per-head compressed cache of one layer (see the module docstring).

    `k [B, N, D]`, `v [B, N, Dv]`, `positions [B, N]`, `heads [B, N]` int32 with
    `N = num_kept + num_kv_heads * max_new`; `num_decoded [B]` tokens appended so far.
    Tokens past `max_new` are dropped silently (jit cannot raise on a traced count): size
    `max_new` for the whole generation.
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    heads: jax.Array
    num_decoded: jax.Array
    num_kv_heads: int = dataclasses.field(metadata=dict(static=True))
    num_kept: int = dataclasses.field(metadata=dict(static=True))

    def nbytes(self) -> int:
        return nbytes_of(self.k, self.v, self.positions, self.heads, self.num_decoded)

    def kept_mask(self, length: int):
        """bool `[B, Hkv, length]`: which positions `0..length-1` each kv head holds."""
        b, n = self.positions.shape
        pos = jnp.where((self.positions >= 0) & (self.positions < length), self.positions, length)
        rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, n))
        return jnp.zeros((b, self.num_kv_heads, length + 1), bool).at[rows, self.heads, pos].set(True)[..., :length]

    def update_and_attend(self, q, k, v, positions, *, layer, sink_logits, q_raw=None):
        """Append `k, v [B, T, Hkv, ...]` (one slot per kv head and valid token) and attend
        `q [B, T, H, D]` over the kept and appended slots, causal by position."""
        del q_raw
        b, t, hkv, d = k.shape
        if hkv != self.num_kv_heads or d != self.k.shape[-1] or positions.shape != (b, t):
            raise ValueError(f"PooledKVCache: new keys must be [B={self.k.shape[0]}, T, Hkv={self.num_kv_heads}, "
                             f"D={self.k.shape[-1]}] with positions [B, T], got {k.shape}, {positions.shape}")
        valid = positions >= 0
        rank = jnp.cumsum(valid, axis=1) - 1 + self.num_decoded[:, None]                 # [B, T]
        slot = self.num_kept + rank[:, :, None] * hkv + jnp.arange(hkv)                  # [B, T, Hkv]
        slot = jnp.where(valid[:, :, None], slot, self.k.shape[1])                       # -> dropped
        rows = jnp.broadcast_to(jnp.arange(b)[:, None, None], slot.shape)
        heads = jnp.broadcast_to(jnp.arange(hkv, dtype=jnp.int32), slot.shape)
        new = dataclasses.replace(
            self, k=self.k.at[rows, slot].set(k, mode="drop"), v=self.v.at[rows, slot].set(v, mode="drop"),
            positions=self.positions.at[rows, slot].set(jnp.broadcast_to(positions[:, :, None], slot.shape),
                                                        mode="drop"),
            heads=self.heads.at[rows, slot].set(heads, mode="drop"),
            num_decoded=self.num_decoded + valid.sum(axis=1).astype(jnp.int32))
        return pooled_attention(q, new, positions, scale=_scale(layer), sink_logits=sink_logits,
                                softcap=layer.config.softcap), new


def pooled_attention(q, cache: PooledKVCache, q_positions, *, scale, sink_logits=None, softcap=None):
    """Attention of `q [B, Tq, H, D]` over a `PooledKVCache`: query head h sees the slots
    of kv head `h // G` whose position is valid and `<=` its own. Plain jnp (the slots are
    broadcast to every kv head and masked), written for clarity."""
    hkv = cache.num_kv_heads
    b, n, _ = cache.k.shape
    k = jnp.broadcast_to(cache.k[:, :, None], (b, n, hkv, cache.k.shape[-1]))
    v = jnp.broadcast_to(cache.v[:, :, None], (b, n, hkv, cache.v.shape[-1]))
    own = cache.heads[:, None, :] == jnp.arange(hkv)[None, :, None]                          # [B, Hkv, N]
    causal = ((cache.positions[:, None, :] <= q_positions[:, :, None]) & (cache.positions[:, None, :] >= 0)
              & (q_positions[:, :, None] >= 0))                                                # [B, Tq, N]
    out, _, _ = masked_attention(q, k.astype(q.dtype), v.astype(q.dtype), own[:, :, None] & causal[:, None],
                                 scale=scale, sink_logits=sink_logits, softcap=softcap)
    return out


def compress(policy: KVPolicy, obs: Observation, v, *, layer: int, num_layers: int, max_new: int):
    """Apply `policy` to one layer's prompt keys `obs.k [B, S, Hkv, D]` and values
    `v [B, S, Hkv, Dv]` -> `PooledKVCache` with room for `max_new` decoded tokens."""
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
class PolicyPrefill:
    """The cache a policy-managed layer starts with: the prompt goes through dense, then
    `compress` keeps what `policy` chooses (one prefill call; decode continues on the
    returned `PooledKVCache`). `layer` / `num_layers` index the managed layers."""

    policy: KVPolicy = dataclasses.field(metadata=dict(static=True))
    layer: int = dataclasses.field(metadata=dict(static=True))
    num_layers: int = dataclasses.field(metadata=dict(static=True))
    max_new: int = dataclasses.field(metadata=dict(static=True))

    def nbytes(self) -> int:
        return 0

    def update_and_attend(self, q, k, v, positions, *, layer, sink_logits, q_raw=None):
        out = layer.attend(q, k, v, positions, positions, sink_logits=sink_logits, q_raw=q_raw, decoding=False)
        from sparse_jax.kv_policies.policies import Observation   # here: that package imports the layers

        obs = Observation(q, k, positions, positions, softcap=layer.config.softcap, sink_logits=sink_logits)
        return out, compress(self.policy, obs, v, layer=self.layer, num_layers=self.num_layers,
                             max_new=self.max_new)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseOracleCache:
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

    def update_and_attend(self, q, k, v, positions, *, layer, sink_logits, q_raw=None):
        check_new_kv("DenseOracleCache", self.full.k, k, v, positions)
        keys, values, kv_pos, full = self.full.update(k, v, positions)
        out = layer.attend(q, keys, values, positions, kv_pos, sink_logits=sink_logits, q_raw=q_raw,
                           decoding=True)
        last = q[:, -1:]
        qp = positions[:, -1:]
        visible = (kv_pos[:, None, :] <= qp[:, :, None]) & (kv_pos[:, None, :] >= 0) & (qp[:, :, None] >= 0)
        _, probs, _ = masked_attention(last, keys, keys, visible, scale=_scale(layer),
                                       sink_logits=sink_logits, softcap=layer.config.softcap)
        b, hkv, g = probs.shape[:3]
        return out, DenseOracleCache(full, probs.reshape(b, hkv * g, -1))
