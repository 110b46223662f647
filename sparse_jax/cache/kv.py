"""KV-cache pytrees, one per memory policy, each with `update` and `nbytes`.

Every cache stores keys, values and the *text position* of each slot (-1 = empty), so the
attention mask is always a predicate on positions and prefill, chunked prefill and decode
share one code path.

* `FullKVCache`: slot = position, `max_len` slots.
* `RollingKVCache`: `num_sinks + window` slots (Mistral's rolling buffer, arXiv 2310.06825,
  with StreamingLLM's sinks, arXiv 2309.17453): position p < num_sinks lives in slot p,
  later positions in slot `num_sinks + (p - num_sinks) % window`. Memory never grows past
  window + sinks.

`update(k, v, positions)` returns the keys/values/positions the new queries attend to and
the new cache (the contract of `sparse_jax.cache.base.Cache`). Positions of one call must
be distinct per row and continue the sequence (each row may be ragged: -1 marks padding,
which is neither written nor attended).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from sparse_jax.cache.base import Cache, batch_index, check_new_kv, nbytes_of


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FullKVCache(Cache):
    """`k [B, max_len, Hkv, D]`, `v [B, max_len, Hkv, Dv]`, `positions [B, max_len]`."""

    k: jax.Array
    v: jax.Array
    positions: jax.Array

    @classmethod
    def init(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int, v_head_dim: int | None = None,
             dtype=jnp.float32) -> "FullKVCache":
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        return cls(jnp.zeros((batch, max_len, num_kv_heads, head_dim), dtype),
                   jnp.zeros((batch, max_len, num_kv_heads, v_head_dim), dtype),
                   jnp.full((batch, max_len), -1, jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    def nbytes(self) -> int:
        return nbytes_of(self.k, self.v, self.positions)

    def update(self, k, v, positions, *, queries=None):
        """Write `k, v [B, T, ...]` at slots `positions [B, T]`; attend over the whole cache.

        A position >= max_len raises ValueError when `positions` is concrete; under `jit`
        its entry is dropped and a `checkify.debug_check` fails (reported to callers that
        wrap the function with `checkify.checkify`). `queries` is not read.
        """
        del queries
        check_new_kv("FullKVCache.update", self.k, k, v, positions)
        if k.shape[1] > self.max_len:
            raise ValueError(f"positions: {k.shape[1]} new tokens do not fit a cache of max_len={self.max_len}")
        if not isinstance(positions, jax.core.Tracer):
            top = int(np.max(positions)) if positions.size else -1
            if top >= self.max_len:
                raise ValueError(f"positions: position {top} is beyond the cache (max_len={self.max_len})")
        checkify.debug_check((positions < self.max_len).all(),
                             f"positions: a position is beyond the cache (max_len={self.max_len})")
        slot = jnp.where(positions >= 0, positions, self.max_len)     # out of range -> dropped
        b = batch_index(positions)
        new = FullKVCache(self.k.at[b, slot].set(k, mode="drop"),
                          self.v.at[b, slot].set(v, mode="drop"),
                          self.positions.at[b, slot].set(positions, mode="drop"))
        return new.k, new.v, new.positions, new


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RollingKVCache(Cache):
    """Sinks + rolling window: `k [B, num_sinks + window, Hkv, D]`, ..., `positions [B, S+W]`."""

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    window: int = dataclasses.field(metadata=dict(static=True))
    num_sinks: int = dataclasses.field(default=0, metadata=dict(static=True))

    @classmethod
    def init(cls, batch: int, window: int, num_kv_heads: int, head_dim: int, num_sinks: int = 0,
             v_head_dim: int | None = None, dtype=jnp.float32) -> "RollingKVCache":
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if num_sinks < 0:
            raise ValueError(f"num_sinks must be >= 0, got {num_sinks}")
        size = window + num_sinks
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        return cls(jnp.zeros((batch, size, num_kv_heads, head_dim), dtype),
                   jnp.zeros((batch, size, num_kv_heads, v_head_dim), dtype),
                   jnp.full((batch, size), -1, jnp.int32), window, num_sinks)

    def nbytes(self) -> int:
        return nbytes_of(self.k, self.v, self.positions)

    def update(self, k, v, positions, *, queries=None):
        """Attend over (old cache ++ new tokens); keep sinks and the last `window` tokens.

        The queries of this call see the old cache and all new tokens (the mask, a
        predicate on positions, keeps only what the window allows), so a chunk longer than
        the window is exact too.
        """
        del queries
        check_new_kv("RollingKVCache.update", self.k, k, v, positions)
        s, w = self.num_sinks, self.window
        keys = jnp.concatenate([self.k, k], axis=1)
        values = jnp.concatenate([self.v, v], axis=1)
        kv_positions = jnp.concatenate([self.positions, positions], axis=1)
        newest = positions.max(axis=1, keepdims=True)
        keep = (positions >= 0) & ((positions < s) | (positions > newest - w))
        slot = jnp.where(positions < s, positions, s + (positions - s) % w)
        slot = jnp.where(keep, slot, s + w)                                # dropped
        b = batch_index(positions)
        new = RollingKVCache(self.k.at[b, slot].set(k, mode="drop"),
                             self.v.at[b, slot].set(v, mode="drop"),
                             self.positions.at[b, slot].set(positions, mode="drop"), w, s)
        return keys, values, kv_positions, new
