"""`MoBAAttention`: Mixture of Block Attention (Moonshot) as a Flax NNX layer.

    y, cache = layer(x, positions, cache=None, shared=None)

Per query token: the fully past KV blocks are scored by `q_t . mean(k of block)` (RoPE'd
query and keys, summed over the heads of a GQA group so the group shares one selection),
the top-k are attended together with the query's own block (causal inside). The one rule
for the kernel: `query_block = 1` (exact, the default) runs on the `token_sparse` op
(per-query block lists; Triton on GPU), `query_block > 1` on `block_sparse` with each query
block attending the union of its tokens' blocks (Triton needs `query_block >= 16`); see
`sparse_jax.ops.moba`. Decode keeps a full cache (slot = position).

Without a cache each row's valid positions must be `0..n-1` (padding -1 anywhere): keys
are scattered to position-indexed slots so block j holds positions `j*bs .. (j+1)*bs-1`.
"""

from __future__ import annotations

from flax import nnx

from sparse_jax.cache.kv import FullKVCache
from sparse_jax.layers.attention import AttentionBase, AttentionConfig
from sparse_jax.ops import moba as ops


class MoBAAttention(AttentionBase):
    """block_size: KV block of the gate (paper e.g. 512). top_k: past blocks per query
    (the own block comes on top). query_block: 1 = exact per-token gating (`token_sparse`,
    any impl); >= 16 for the Triton `block_sparse` kernel: each query block attends to the
    union of its tokens' blocks (decode equals prefill exactly only with query_block=1)."""

    def __init__(self, config: AttentionConfig, *, block_size: int = 64, top_k: int = 3,
                 query_block: int = 1, rngs: nnx.Rngs):
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        if not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
        if not isinstance(query_block, int) or query_block < 1:
            raise ValueError(f"query_block must be an int >= 1, got {query_block!r}")
        super().__init__(config, rngs=rngs)
        self.block_size, self.top_k, self.query_block = block_size, top_k, query_block

    def attend(self, q, k, v, q_positions, kv_positions, *, sink_logits, q_raw, decoding):
        c = self.config
        if not decoding:                   # position-indexed slots, as in the cache
            store = FullKVCache.init(k.shape[0], k.shape[1], k.shape[2], k.shape[3], v.shape[3], dtype=k.dtype)
            k, v, kv_positions, _ = store.update(k, v, kv_positions)
        return ops.moba_attention(q, k, v, q_positions, kv_positions, block_size=self.block_size,
                                  top_k=self.top_k, query_block=self.query_block,
                                  sink_logits=sink_logits, softcap=c.softcap, impl=c.impl)

    def init_cache(self, batch: int, max_len: int, dtype=None):
        c = self.config
        return FullKVCache.init(batch, max_len, c.num_kv_heads, c.head_dim,
                                dtype=c.dtype if dtype is None else dtype)
