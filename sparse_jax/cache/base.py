"""What every KV cache shares: the contract (`Cache`) and the helpers of its updates.

The contract is written in `Cache`'s docstring; every cache of `sparse_jax.cache` follows it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


class Cache:
    """Base of every KV-cache pytree (frozen dataclasses registered with
    `jax.tree_util.register_dataclass`).

    Contract (one for every layer and cache; see DESIGN.md "One attention interface"):

    * `update(...)` writes this call's entries and returns what the layer attends over,
      the new cache last: `(keys, values, positions, new_cache)` for the plain KV caches,
      the family's arrays for the others (MLA: latent and RoPE key; CSA: records). A
      cache never calls back into a layer: what it needs from the queries comes in as
      data (`queries=`, a `Queries`), and where it also chooses what each kv head reads,
      a `Selection` comes before the new cache.
    * `nbytes()`: bytes held (every array, from its shape and dtype).
    * `overflowed()`: bool `[B]`, True for a row that was asked to write past the
      cache's capacity (`max_len` of a full cache, `max_new` of a pooled one). Eagerly,
      `update` raises ValueError instead; under `jit` the entry is dropped (never
      written), `update` adds a `jax.experimental.checkify.debug_check` (a no-op unless
      the caller wraps the function with `checkify.checkify`), and the flag stays set in
      the returned cache, so a caller checks it after a step at no per-step cost
      (`sparse_jax.models.lm.SparseLM.check_caches`). Rolling caches are bounded by
      design and never overflow.

    A layer returns `(y, cache)`; what it hands to later layers goes through
    `share()` of the layer (`sparse_jax.layers.attention.Shares`), never through the cache.
    """

    def nbytes(self) -> int:
        raise NotImplementedError

    def overflowed(self):
        """bool `[B]`: rows asked to write past capacity (False: bounded by design)."""
        raise NotImplementedError


def check_new_kv(name, cache_k, k, v, positions):
    """ValueError unless `k [B, T, Hkv, D]`, `v [B, T, Hkv, Dv]`, `positions [B, T]` fit
    a cache holding `cache_k [B, S, Hkv, D]`."""
    if k.ndim != 4 or k.shape[0] != cache_k.shape[0] or k.shape[2:] != cache_k.shape[2:]:
        raise ValueError(f"{name}: new keys must be [B={cache_k.shape[0]}, T, {cache_k.shape[2]}, "
                         f"{cache_k.shape[3]}], got {k.shape}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{name}: new values {v.shape} do not match keys {k.shape}")
    if k.dtype != cache_k.dtype:
        raise ValueError(f"{name}: new keys have dtype {k.dtype}, the cache holds {cache_k.dtype}")
    if positions.shape != k.shape[:2]:
        raise ValueError(f"{name}: positions must be [B, T] = {k.shape[:2]}, got {positions.shape}")


def batch_index(positions):
    """`[B, T]` row index of each entry of `positions [B, T]` (for scatters)."""
    return jnp.broadcast_to(jnp.arange(positions.shape[0])[:, None], positions.shape)


def nbytes_of(*arrays) -> int:
    """Total bytes of `arrays` (from shape and dtype; abstract arrays too)."""
    return int(sum(np.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays))
