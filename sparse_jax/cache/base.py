"""What every KV cache shares: the contract (`Cache`), what a cache may read of the
queries (`Queries`) and restrict the attention to (`Selection`), and the helpers of its
updates. The contract is written in `Cache`'s docstring; every cache of
`sparse_jax.cache` follows it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import masked_attention


class Cache:
    """Base of every KV-cache pytree (frozen dataclasses registered with
    `jax.tree_util.register_dataclass`). The contract between layers and caches:

    * A layer is called `y, cache = layer(x, positions, cache=None, shared=None)` and gets
      its empty cache from `layer.init_cache(batch, max_len, dtype)`
      (`sparse_jax.layers.base.AttentionLayer`).
    * `update(...)` writes this call's entries and returns what the layer attends over,
      the new cache last. The KV caches of the standard layers
      (`sparse_jax.layers.attention.AttentionBase`: full, window, sinks, pattern, MoBA)
      take `update(k, v, positions, *, queries=None)` and return
      `(keys, values, kv_positions, new_cache)`, or
      `(keys, values, kv_positions, selection, new_cache)` where the cache also chooses
      what each kv head reads (`Selection`: Quest / top-p pages, the pooled layout of
      the eviction policies, a prompt attended as without a cache). Other families
      return their own arrays in the same order (MLA: latent, RoPE key, positions;
      DSA: plus indexer keys; CSA's SWA store: keys, positions). A compound cache
      (NSA's, CSA's, a HySparse sparse layer's) is a record of such stores, each updated
      by its layer.
    * A cache never calls back into a layer: what it needs of the queries comes in as
      data (`queries`, a `Queries`: rotated queries, sink logits, soft-cap), and the
      layer does the attention. Caches that do not read queries ignore them.
    * `nbytes()`: bytes held by the slots (keys, values, positions, summaries and the
      counters that place entries), from shapes and dtypes.
    * Capacity: a write past it (a position >= `max_len` of a full cache, more than
      `max_new` decoded tokens in a pooled one) raises ValueError when the positions
      are concrete. Under `jit` the entry is dropped (never written) and `update` runs a
      `jax.experimental.checkify.debug_check`: a no-op unless the caller wraps the
      function with `checkify.checkify`, which then returns the error (`err.throw()`
      raises it). The full cache's state cannot show it afterwards (its slots are the
      positions; a dropped write leaves no trace), a pooled cache's can
      (`PooledKVCache.overflowed()`: its counter keeps counting). Rolling caches are
      bounded by design and never overflow.
    * What a layer hands to later layers (HySparse's full layer: its KV and selected
      blocks) never goes through a cache: `layer.forward(...)` returns it
      (`sparse_jax.layers.base.AttentionLayer.forward`).
    """

    def nbytes(self) -> int:
        raise NotImplementedError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Queries:
    """What a cache may read of a call's queries: rotated `q [B, T, H, D]`, the layer's
    `sink_logits [H]` (or None) and logit `softcap` (or None)."""

    q: jax.Array
    sink_logits: jax.Array | None = None
    softcap: float | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def scale(self) -> float:
        """The softmax scale `1 / sqrt(D)`."""
        return 1.0 / float(np.sqrt(self.q.shape[-1]))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Selection:
    """What each kv head reads of the keys an `update` returned (the default: all of them,
    as the cache's contents).

    * `block_indices [B, Hkv, n]` int32 with `block_counts [B, Hkv]`: blocks of
      `block_size` slots (the `decode` op's selected-block form; a decode call of at
      most `sparse_jax.ops.attention.DECODE_MAX_QUERIES` queries).
    * `slot_heads [B, S]` int32: the pooled layout, keys `[B, S, D]` and values
      `[B, S, Dv]` of all kv heads in one store, slot s read by kv head
      `slot_heads[b, s]` only.
    * `log_weights [B, Hkv, S]` float32: additive logit of each slot for each kv head
      (a slot of log-weight w counts as e^w keys: Double-P's cluster centroids, the
      inverse sampling probability of verified attention); -inf hides a slot from that
      head. Attended by `weighted_attention` (plain jnp).
    * `prefill=True`: the keys are this call's own tokens; attend as without a cache.
    """

    block_indices: jax.Array | None = None
    block_counts: jax.Array | None = None
    block_size: int = dataclasses.field(default=1, metadata=dict(static=True))
    slot_heads: jax.Array | None = None
    log_weights: jax.Array | None = None
    prefill: bool = dataclasses.field(default=False, metadata=dict(static=True))


def need_queries(name, queries):
    """ValueError unless `queries` is a `Queries` (for the caches that read the queries;
    `name`: the method, e.g. "DoublePCache.update")."""
    if not isinstance(queries, Queries):
        raise ValueError(f"{name} needs queries=Queries(...) (the call's rotated queries), "
                         f"got {type(queries).__name__}")


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


def weighted_attention(q, k, v, kv_positions, q_positions, log_weights, *, scale, sink_logits=None,
                       softcap=None):
    """Causal attention of `q [B, Tq, H, D]` over `k [B, S, Hkv, D]`, `v [B, S, Hkv, Dv]`
    with each slot's logit raised by `log_weights [B, Hkv, S]` (`Selection.log_weights`):
    query head h sees the slots of kv head `h // G` whose position is valid and `<=` its
    own. Plain jnp -> `[B, Tq, H, Dv]`."""
    b, s = k.shape[:2]
    if log_weights.shape != (b, k.shape[2], s):
        raise ValueError(f"log_weights must be [B, Hkv, S] = {[b, k.shape[2], s]}, got {list(log_weights.shape)}")
    visible = ((kv_positions[:, None, :] <= q_positions[:, :, None]) & (kv_positions[:, None, :] >= 0)
               & (q_positions[:, :, None] >= 0))                                             # [B, Tq, S]
    visible = visible[:, None] & jnp.isfinite(log_weights)[:, :, None, :]                    # [B, Hkv, Tq, S]
    out, _, _ = masked_attention(q, k, v, visible, scale=scale, sink_logits=sink_logits, softcap=softcap,
                                 bias=jnp.where(jnp.isfinite(log_weights), log_weights, 0.0))
    return out
