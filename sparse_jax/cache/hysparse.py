"""The cache of a HySparse sparse layer (`sparse_jax.layers.hysparse.HySparseSparseAttention`).

Its sparse branch reads the KV of the full layer before it (handed over as `shared`), so
the layer's own cache holds only its SWA branch's keys and values, or nothing.
"""

from __future__ import annotations

import dataclasses

import jax

from sparse_jax.cache.base import Cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HySparseSparseCache(Cache):
    """The sparse layer's cache: its SWA branch's own KV (`RollingKVCache` / `FullKVCache`)
    or None (no own KV)."""

    swa: object = None

    def nbytes(self) -> int:
        return 0 if self.swa is None else self.swa.nbytes()
