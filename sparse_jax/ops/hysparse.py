"""HySparse (Xiaomi, 2026) math as pure functions over projected q/k/v.

It selects, per query *token*, a set of KV blocks; the sparse layers attend to them
through `sparse_jax.ops.selection.selected_block_attention` (exact per token on the
`token_sparse` op, or with `query_block >= 2` the union over each query block on
`block_sparse`, whose Triton kernel needs `query_block >= 16`).

Blocks are by *array index* of the KV: block j is `k[:, j*bs:(j+1)*bs]`. The layers keep
their KV in position-indexed slots (a `FullKVCache`, also in training), so block j always
holds positions `j*bs .. (j+1)*bs - 1` and prefill and decode pick the same blocks.

* HySparse full layer: `hysparse_full_attention` runs causal attention through `flash`
  with the block-max score output (Alg. 1: `S[t, j] = max_{i in block j} p[t, i]`, max over
  each GQA group) and takes the top-k blocks per (batch, query token, kv-head) among those
  the query can see (`selection.select_top_k`: ties to the lower index), ascending.
* HySparse sparse layer: `selection.selected_block_attention` over the shared KV and block
  lists (causal inside the blocks), with the layer's own sink logits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.flash import flash_attention
from sparse_jax import context_parallel as cp
from sparse_jax import patterns as P
from sparse_jax.ops import selection


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HySparseShared:
    """What a HySparse full layer hands to the sparse layers after it.

    k `[B, Tk, Hkv, D]`, v `[B, Tk, Hkv, Dv]` (RoPE'd keys, position-indexed slots),
    kv_positions `[B, Tk]` (-1 empty), block_indices `[B, Tq, Hkv, k]` int32 (ascending,
    -1 = no block; `sparse_jax.ops.selection`'s layout) for the queries of this call,
    block_size static.
    """

    k: jax.Array
    v: jax.Array
    kv_positions: jax.Array
    block_indices: jax.Array
    block_size: int = dataclasses.field(metadata=dict(static=True))


def block_min_positions(kv_positions, block_size: int):
    """Smallest valid position per KV block `[B, nK]` (a huge value for empty blocks)."""
    b, tk = kv_positions.shape
    nk = -(-tk // block_size)
    big = jnp.iinfo(jnp.int32).max
    pos = jnp.where(kv_positions >= 0, kv_positions, big)
    pos = jnp.pad(pos, ((0, 0), (0, nk * block_size - tk)), constant_values=big)
    return pos.reshape(b, nk, block_size).min(-1)


def visible_blocks(q_positions, kv_positions, block_size: int):
    """bool `[B, 1, Tq, nK]`: KV blocks holding a key at or before the (valid) query."""
    bmin = block_min_positions(kv_positions, block_size)                      # [B, nK]
    qp = q_positions[:, :, None]
    return ((bmin[:, None, :] <= qp) & (qp >= 0))[:, None]


def hysparse_full_attention(q, k, v, q_positions, kv_positions, *, block_size: int, top_k_blocks: int,
                            sink_logits=None, softcap=None, impl: str = "auto", interpret: bool = False):
    """Causal attention plus the per-token top-k block selection.

    Returns `(out [B, Tq, H, Dv], block_indices [B, Tq, Hkv, k])` (ascending, -1 last). Under
    a mesh with a sequence axis > 1 it runs split over it, K/V gathered
    (`sparse_jax.context_parallel`).
    """
    if cp.applies(q.shape[1], k.shape[1]):
        kv = dict(gather=True)
        return cp.attention(hysparse_full_attention, (cp.TOKENS, cp.TOKENS), q=cp.Split(q),
                            k=cp.Split(k, **kv), v=cp.Split(v, **kv), q_positions=cp.Split(q_positions, cp.POSITIONS),
                            kv_positions=cp.Split(kv_positions, cp.POSITIONS, **kv),
                            sink_logits=cp.Split(sink_logits, cp.HEADS), block_size=block_size,
                            top_k_blocks=top_k_blocks, softcap=softcap, impl=impl, interpret=interpret)
    res = flash_attention(q, k, v, mask_fn=P.Causal(), q_positions=q_positions,
                          kv_positions=kv_positions, sink_logits=sink_logits, softcap=softcap,
                          block_score_size=block_size, block_score_reduce_gqa=True, impl=impl,
                          interpret=interpret)
    visible = visible_blocks(q_positions, kv_positions, block_size)
    idx = selection.select_top_k(res.block_scores, visible, top_k_blocks)     # [B, Tq, Hkv, k]
    return res.out, selection.ascending(idx)
