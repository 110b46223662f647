"""`AttentionLayer`: the one interface every attention layer of `sparse_jax.layers` has.

    y, cache = layer(x, positions, cache=None, shared=None)
    cache = layer.init_cache(batch, max_len, dtype=None)
    y, cache, shared = layer.forward(x, positions, cache=None, shared=None)

`x [B, T, d_model]`, `positions [B, T]` int (negative = padding), `cache` from `init_cache`
(None in training; the cache contract is `sparse_jax.cache.base.Cache`). `forward` is the
one way a layer hands something to the layers after it: it returns the `shared` that
later layers receive. By default that is the `shared` it was given (the layer shares
nothing of its own); a producer (HySparse's full layer: its KV and selected blocks)
overrides `forward` and returns its own. A model calls `forward` on every layer in order
(`sparse_jax.models.lm.Block`).
"""

from __future__ import annotations

from flax import nnx


class AttentionLayer(nnx.Module):
    """Base of the attention layers: `__call__` and `init_cache` per layer; `forward`
    passes `shared` through unless the layer produces its own (see the module docstring)."""

    def __call__(self, x, positions, cache=None, shared=None):
        """x: `[B, T, d_model]`, positions: int `[B, T]` -> (`[B, T, d_model]`, new cache)."""
        raise NotImplementedError

    def init_cache(self, batch: int, max_len: int, dtype=None):
        raise NotImplementedError

    def forward(self, x, positions, cache=None, shared=None):
        """-> `(y, new cache, shared for the later layers)`: here the `shared` given."""
        y, cache = self(x, positions, cache, shared)
        return y, cache, shared
