"""Caches of DeepSeek-V4's CSA / HCA layers (`sparse_jax.ops.csa`).

* `records` (`FullKVCache`, slot = record id, its `positions` field holds the id):
  `k` = the compressed records `[B, N, 1, head_dim]` (RoPE'd; key = value), `v` = CSA's
  compressed indexer keys `[B, N, 1, index_head_dim]` (width 0 for HCA). N = max_len // m
  + 1 (one spare slot: a call may carry `C // m + 1` candidate records).
* `tail` (`RollingKVCache` of `record_window` slots): the layer inputs of the last tokens,
  the uncompressed tail kept until its record's boundary token arrives (and, with
  overlap, for one more block).
* `swa` (`SWACache`, absent when window = 0): the SWA branch's keys, one of V4's three
  strategies for prefix reuse: "full" (every token's window KV: resume at any prefix),
  "periodic" (rolling window + a snapshot of it every `checkpoint_every` tokens: resume
  at the last snapshot, recompute up to the prefix), "none" (rolling window only:
  recompute the last `window` tokens). `SWACache.rewind(prefix_len)` says what is kept.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sparse_jax.cache.base import Cache, nbytes_of
from sparse_jax.cache.kv import FullKVCache, RollingKVCache
from sparse_jax.ops.csa import SWA_CACHE_STRATEGIES, gather_windows


def _empty_v(k):
    return jnp.zeros(k.shape[:-1] + (0,), k.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SWACache(Cache):
    """SWA keys `[B, S, 1, D]` (`kv`), plus `snapshots [B, n, window, D]` with their
    positions `[B, n, window]` for the "periodic" strategy (snapshot c = the window after
    token `(c + 1) p - 1`)."""

    kv: FullKVCache | RollingKVCache
    snapshots: jax.Array | None
    snapshot_positions: jax.Array | None
    strategy: str = dataclasses.field(metadata=dict(static=True))
    window: int = dataclasses.field(metadata=dict(static=True))
    every: int = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def init(cls, batch: int, max_len: int, window: int, dim: int, *, strategy: str, every: int,
             dtype=jnp.float32) -> "SWACache":
        if strategy not in SWA_CACHE_STRATEGIES:
            raise ValueError(f"strategy must be one of {SWA_CACHE_STRATEGIES}, got {strategy!r}")
        if strategy == "full" or window >= max_len:
            kv = FullKVCache.init(batch, max_len, 1, dim, v_head_dim=0, dtype=dtype)
        else:
            kv = RollingKVCache.init(batch, window, 1, dim, v_head_dim=0, dtype=dtype)
        snaps = snap_pos = None
        if strategy == "periodic":
            n = max(1, max_len // every)
            snaps = jnp.zeros((batch, n, window, dim), dtype)
            snap_pos = jnp.full((batch, n, window), -1, jnp.int32)
        return cls(kv, snaps, snap_pos, strategy, window, every)

    def nbytes(self) -> int:
        extra = () if self.snapshots is None else (self.snapshots, self.snapshot_positions)
        return self.kv.nbytes() + nbytes_of(*extra)

    def update(self, k, positions):
        """Write keys `k [B, T, D]`; return `(keys [B, S', D], positions [B, S'], new cache)`
        to attend over (old cache ++ new tokens for the rolling form)."""
        keys, _, kv_pos, kv = self.kv.update(k[:, :, None], _empty_v(k[:, :, None]), positions)
        snaps, snap_pos = self.snapshots, self.snapshot_positions
        if snaps is not None:
            win, present, ids = gather_windows(keys[:, :, 0], kv_pos, positions, ratio=self.every,
                                               window=self.window)
            n = snaps.shape[1]
            slot = jnp.where((ids >= 0) & (ids < n), ids, n)
            rows = jnp.arange(ids.shape[0])[:, None]
            tok = (ids[:, :, None] + 1) * self.every - self.window + jnp.arange(self.window)
            snaps = snaps.at[rows, slot].set(win, mode="drop")
            snap_pos = snap_pos.at[rows, slot].set(jnp.where(present, tok, -1), mode="drop")
        return keys[:, :, 0], kv_pos, SWACache(kv, snaps, snap_pos, self.strategy, self.window, self.every)

    def rewind(self, prefix_len: int):
        """For a prefix hit of `prefix_len` tokens: `(cache, resume)`, the cache as it was
        after token `resume - 1` (as far as queries from `prefix_len` on can tell) and the
        first token whose SWA key must be fed again (`resume .. prefix_len - 1`).
        "full": resume = prefix_len; "periodic": the last snapshot boundary at or before
        prefix_len if it lies within the window, else as "none"; "none":
        `prefix_len - window` (the window is recomputed)."""
        if isinstance(self.kv, FullKVCache):            # "full", or a window covering max_len
            keep = self.kv.positions < prefix_len
            kv = dataclasses.replace(self.kv, positions=jnp.where(keep, self.kv.positions, -1))
            return dataclasses.replace(self, kv=kv), prefix_len
        empty = dataclasses.replace(self.kv, positions=jnp.full_like(self.kv.positions, -1))
        resume = max(0, prefix_len - self.window)
        c = prefix_len // self.every - 1
        if self.snapshots is None or c < 0 or (c + 1) * self.every < resume:
            return dataclasses.replace(self, kv=empty), resume
        pos = self.snapshot_positions[:, c]
        slot = jnp.where(pos >= 0, pos % self.window, self.window)
        rows = jnp.arange(pos.shape[0])[:, None]
        kv = dataclasses.replace(empty, k=empty.k.at[rows, slot].set(self.snapshots[:, c][:, :, None], mode="drop"),
                                 positions=empty.positions.at[rows, slot].set(pos, mode="drop"))
        return dataclasses.replace(self, kv=kv), (c + 1) * self.every


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CSACache(Cache):
    records: FullKVCache
    tail: RollingKVCache
    swa: SWACache | None

    @classmethod
    def init(cls, batch: int, max_len: int, d_model: int, *, ratio: int, record_window: int, head_dim: int,
             index_head_dim: int, window: int, swa_cache: str, checkpoint_every: int,
             dtype=jnp.float32) -> "CSACache":
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        n = max_len // ratio + 1
        records = FullKVCache.init(batch, n, 1, head_dim, v_head_dim=index_head_dim, dtype=dtype)
        tail = RollingKVCache.init(batch, record_window, 1, d_model, v_head_dim=0, dtype=dtype)
        swa = (SWACache.init(batch, max_len, window, head_dim, strategy=swa_cache, every=checkpoint_every,
                             dtype=dtype) if window else None)
        return cls(records, tail, swa)

    def nbytes(self) -> int:
        return self.records.nbytes() + self.tail.nbytes() + (self.swa.nbytes() if self.swa is not None else 0)
