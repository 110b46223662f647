"""Block-sparse metadata: which KV blocks each (batch, kv-head, query block) visits.

The contract of DESIGN.md, consumed by every block kernel:

* `kv_block_indices [B, Hkv, nQ, max_blocks] int32`: KV block numbers, ascending; entries
  past the count repeat the last valid index (so a kernel's prefetch stays in range).
* `kv_block_counts [B, Hkv, nQ] int32`: how many entries are valid.
* `kv_block_full [B, Hkv, nQ, max_blocks] bool`: True where every in-range element of the
  block is visible (the kernel skips the element predicate); False for partial blocks,
  where the kernel evaluates the predicate.

`block_q` / `block_kv` are static (pytree metadata). Built by `sparse_jax.patterns`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockSparseMetadata:
    kv_block_indices: jax.Array
    kv_block_counts: jax.Array
    kv_block_full: jax.Array
    block_q: int = dataclasses.field(metadata=dict(static=True))
    block_kv: int = dataclasses.field(metadata=dict(static=True))

    @property
    def num_q_blocks(self) -> int:
        return self.kv_block_indices.shape[2]

    @property
    def max_blocks(self) -> int:
        return self.kv_block_indices.shape[3]

    def validate(self, batch: int, num_kv_heads: int, q_len: int, kv_len: int) -> None:
        """Raise ValueError unless this metadata fits the given attention shapes."""
        idx, cnt, full = self.kv_block_indices, self.kv_block_counts, self.kv_block_full
        if idx.ndim != 4 or full.shape != idx.shape or cnt.shape != idx.shape[:3]:
            raise ValueError(
                "metadata must have kv_block_indices/kv_block_full [B, Hkv, nQ, max_blocks] and "
                f"kv_block_counts [B, Hkv, nQ]; got {idx.shape}, {full.shape}, {cnt.shape}")
        for name, val in (("block_q", self.block_q), ("block_kv", self.block_kv)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"metadata.{name} must be an int >= 1, got {val!r}")
        nq = -(-q_len // self.block_q)
        if idx.shape[2] != nq:
            raise ValueError(
                f"metadata has {idx.shape[2]} query blocks of block_q={self.block_q}, but q_len={q_len} "
                f"needs {nq}")
        if idx.shape[0] not in (1, batch) or idx.shape[1] not in (1, num_kv_heads):
            raise ValueError(
                f"metadata batch/kv-head dims {idx.shape[:2]} must be 1 or ({batch}, {num_kv_heads})")
        if not jnp.issubdtype(idx.dtype, jnp.integer) or not jnp.issubdtype(cnt.dtype, jnp.integer):
            raise ValueError(f"kv_block_indices/counts must be integer, got {idx.dtype}, {cnt.dtype}")
        if full.dtype != jnp.bool_:
            raise ValueError(f"kv_block_full must be bool, got {full.dtype}")
        del kv_len  # any number of KV blocks is legal; indices are checked by to_block_mask.

    def to_block_mask(self, num_kv_blocks: int) -> tuple[jax.Array, jax.Array]:
        """Dense `(present, full)` booleans `[B, Hkv, nQ, num_kv_blocks]`."""
        idx, cnt, full = self.kv_block_indices, self.kv_block_counts, self.kv_block_full
        valid = jnp.arange(idx.shape[-1]) < cnt[..., None]
        one_hot = (idx[..., None] == jnp.arange(num_kv_blocks)) & valid[..., None]
        present = one_hot.any(-2)
        is_full = (one_hot & full[..., None]).any(-2)
        return present, is_full
