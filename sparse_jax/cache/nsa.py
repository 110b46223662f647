"""The KV cache of Native Sparse Attention (arXiv 2502.11089): one store per branch.

NSA's three branches have their own keys and values, so the cache holds:

* `slc`: raw selection K/V, `FullKVCache` (slot = position; selection blocks are slot
  blocks of `sel_block`);
* `win`: raw window K/V, `RollingKVCache` of `window` slots (`FullKVCache` when the window
  covers `max_len`);
* `tail`: raw cmp-branch K/V of the last `cmp_block` tokens (`RollingKVCache`): the tokens
  of compressed blocks not complete yet. A new compressed entry appears each time d more
  tokens arrive and a whole block of l is present (block i when token `i*d + l - 1`
  arrives), built from this tail and the call's new tokens;
* `cmp`: `CompressedKV`, the compressed keys/values computed so far, slot i = block i.

Per decode step NSA reads the compressed entries, the selected `n * l'` tokens of `slc`
and the `w` tokens of `win` (`sparse_jax.ops.nsa.nsa_decode_branches` on the `decode`
op's selected-block and contiguous forms; the XLA reference builds the dense masks).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sparse_jax.cache.base import Cache, nbytes_of
from sparse_jax.cache.kv import FullKVCache, RollingKVCache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CompressedKV(Cache):
    """`k [B, N, Hkv, D]`, `v [B, N, Hkv, D]`, `positions [B, N]` (block's last token, -1 empty)."""

    k: jax.Array
    v: jax.Array
    positions: jax.Array

    @classmethod
    def init(cls, batch: int, num_blocks: int, num_kv_heads: int, head_dim: int,
             dtype=jnp.float32) -> "CompressedKV":
        n = max(1, num_blocks)     # one empty slot at least: attention over zero keys is no shape
        return cls(jnp.zeros((batch, n, num_kv_heads, head_dim), dtype),
                   jnp.zeros((batch, n, num_kv_heads, head_dim), dtype),
                   jnp.full((batch, n), -1, jnp.int32))

    def nbytes(self) -> int:
        return nbytes_of(self.k, self.v, self.positions)

    def write(self, block_ids, k, v, positions) -> "CompressedKV":
        """Store blocks `block_ids [B, K]` (-1: none) with `k, v [B, K, Hkv, D]` and their
        positions `[B, K]`; ids past the store are dropped."""
        if k.dtype != self.k.dtype:
            raise ValueError(f"CompressedKV.write: keys have dtype {k.dtype}, the cache holds {self.k.dtype}")
        n = self.k.shape[1]
        slot = jnp.where((block_ids >= 0) & (block_ids < n), block_ids, n)
        rows = jnp.arange(block_ids.shape[0])[:, None]
        return CompressedKV(self.k.at[rows, slot].set(k, mode="drop"),
                            self.v.at[rows, slot].set(v, mode="drop"),
                            self.positions.at[rows, slot].set(positions, mode="drop"))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NSACache(Cache):
    slc: FullKVCache
    win: FullKVCache | RollingKVCache
    tail: RollingKVCache
    cmp: CompressedKV

    @classmethod
    def init(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int, *, cmp_block: int,
             cmp_stride: int, window: int, dtype=jnp.float32) -> "NSACache":
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        slc = FullKVCache.init(batch, max_len, num_kv_heads, head_dim, dtype=dtype)
        win = (FullKVCache.init(batch, max_len, num_kv_heads, head_dim, dtype=dtype) if window >= max_len
               else RollingKVCache.init(batch, window, num_kv_heads, head_dim, dtype=dtype))
        tail = RollingKVCache.init(batch, cmp_block, num_kv_heads, head_dim, dtype=dtype)
        num_blocks = max(0, (max_len - cmp_block) // cmp_stride + 1)
        cmp = CompressedKV.init(batch, num_blocks, num_kv_heads, head_dim, dtype=dtype)
        return cls(slc, win, tail, cmp)

    @property
    def max_len(self) -> int:
        return self.slc.max_len

    def nbytes(self) -> int:
        return self.slc.nbytes() + self.win.nbytes() + self.tail.nbytes() + self.cmp.nbytes()
