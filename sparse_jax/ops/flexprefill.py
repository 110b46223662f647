"""FlexPrefill (Lai et al., arXiv 2502.20766): per-head, per-input sparse prefill patterns.

For each query head and input:

1. *Pattern choice*: take the last `last_q` queries `Q^` (largest positions). Their exact
   attention, summed per KV block and averaged over the queries, is `a_bar [nK]`; the
   estimate from mean-pooled queries and keys, `softmax(pool(Q^) . pool(K)^T * scale)`
   over the KV blocks, is `a_hat`. With `d = sqrt(JSD(a_bar, a_hat))` (natural log):
   `d < tau` -> **query-aware** (the pooled estimate is trusted), else **vertical-slash**.
2. *Query-aware*: per query block, the pooled scores `softmax(pool(Q_i) . pool(K)^T)` over
   the reachable KV blocks; blocks are taken by decreasing estimate until the cumulative
   estimate reaches `gamma`. (The paper sorts the flattened estimate of all query blocks
   of the head together; here each query block reaches `gamma` on its own.)
3. *Vertical-slash*: from `Q^`'s exact attention, vertical (per key) and slash (per
   diagonal) scores, each normalised to 1, columns and diagonals taken by decreasing
   score until each cumulative share reaches `gamma`, then converted to the blocks that
   contain them (a superset, see `sparse_jax.ops.sparse_prefill`).

`gamma >= 1` takes every reachable block (dense causal). Metadata per (batch, kv head):
the GQA group shares the union of its heads' blocks; attention runs through the
`block_sparse` op (causal).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse import block_sparse_attention
from pallas_kernels.block_sparse.metadata import BlockSparseMetadata
from sparse_jax import patterns as P
from sparse_jax.ops.sparse_prefill import (blocks_of, logit_scale, block_extents, blocks_to_metadata,
                                           causal_probs, check_prefill_args, group_heads, last_queries, lines_to_blocks,
                                           pooled_block_scores, vertical_slash_scores)


@dataclasses.dataclass(frozen=True)
class FlexPrefillConfig:
    """block_size: metadata block (query and KV); gamma: cumulative attention to reach;
    tau: JS-distance threshold of the pattern choice; last_q: queries of the estimate
    (default `block_size`)."""

    block_size: int = 128
    gamma: float = 0.9
    tau: float = 0.1
    last_q: int | None = None

    def __post_init__(self):
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {self.block_size!r}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must lie in (0, 1], got {self.gamma!r}")
        if not self.tau >= 0.0:
            raise ValueError(f"tau must be >= 0, got {self.tau!r}")
        if self.last_q is not None and (not isinstance(self.last_q, int) or self.last_q < 1):
            raise ValueError(f"last_q must be an int >= 1 or None, got {self.last_q!r}")

    @property
    def num_last(self) -> int:
        return self.block_size if self.last_q is None else self.last_q


def cumulative_take(weights, gamma: float, eligible):
    """bool mask: entries of `weights [..., N]` (>= 0) taken by decreasing weight until the
    share of the eligible total reaches `gamma` (at least one eligible entry; every eligible
    one when `gamma >= 1`)."""
    w = jnp.where(eligible, weights, 0.0)
    if gamma >= 1.0:
        return eligible
    order = jnp.argsort(-w, axis=-1, stable=True)
    sw = jnp.take_along_axis(w, order, axis=-1)
    share = sw / jnp.maximum(sw.sum(-1, keepdims=True), 1e-30)
    before = jnp.cumsum(share, -1) - share
    n = (before < gamma).sum(-1, keepdims=True)
    rank = jnp.argsort(order, axis=-1)
    return (rank < n) & eligible


def js_distance(p, q):
    """`sqrt(JSD(p, q))` over the last axis (natural log; distributions summing to 1)."""
    m = 0.5 * (p + q)

    def kl(a):
        return jnp.where(a > 0, a * (jnp.log(jnp.maximum(a, 1e-30)) - jnp.log(jnp.maximum(m, 1e-30))), 0.0).sum(-1)

    return jnp.sqrt(jnp.maximum(0.5 * kl(p) + 0.5 * kl(q), 0.0))


def flexprefill_blocks(q, k, positions=None, config: FlexPrefillConfig = FlexPrefillConfig(), scale=None):
    """Per-query-head block masks `[B, H, nQ, nK]` and the choice `query_aware [B, H]`."""
    positions = check_prefill_args(q, k, positions)
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    bs, sc = config.block_size, logit_scale(q, scale)
    q_last, slots, pos = last_queries(q, positions, config.num_last)
    probs = causal_probs(q_last, pos, k, positions, sc)                           # [B, H, n, T]
    nvalid = jnp.maximum((pos >= 0).sum(-1), 1)[:, None, None]
    a_bar = blocks_of(jnp.moveaxis(probs.sum(2), 2, 1), bs, 0.0).sum(2)          # [B, nK, H]
    a_bar = jnp.moveaxis(a_bar, 1, 2) / nvalid                                     # [B, H, nK]
    qmask = (pos >= 0)[:, :, None, None]
    pooled_q = (q_last.astype(jnp.float32) * qmask).sum(1, keepdims=True) / nvalid[..., None]
    lo, _, _ = block_extents(positions, bs)
    seen = (lo <= pos.max(-1, keepdims=True))[:, None]                             # [B, 1, nK]
    est = _pooled_row(pooled_q, k, positions, bs, sc)                               # [B, H, nK]
    a_hat = jax.nn.softmax(jnp.where(seen, est, -jnp.inf), axis=-1)
    query_aware = js_distance(a_bar, a_hat) < config.tau                            # [B, H]

    s = pooled_block_scores(q, k, positions, bs, sc)                               # [B, H, nQ, nK]
    qa = cumulative_take(jax.nn.softmax(s, axis=-1), config.gamma, jnp.isfinite(s))
    vertical, slash = vertical_slash_scores(probs, slots)
    eligible = jnp.ones(vertical.shape, bool)
    vs = lines_to_blocks(cumulative_take(vertical, config.gamma, eligible),
                         cumulative_take(slash, config.gamma, eligible), bs)
    return jnp.where(query_aware[..., None, None], qa, vs), query_aware


def _pooled_row(pooled_q, k, positions, block_size, scale):
    """`pooled_q [B, 1, H, D]` times every mean-pooled key block: `[B, H, nK]`."""
    valid = blocks_of(positions >= 0, block_size, False)[..., None, None]
    kb = blocks_of(group_heads(k, pooled_q.shape[2]).astype(jnp.float32), block_size, 0.0)
    pk = (kb * valid).sum(2) / jnp.maximum(valid.sum(2), 1)                        # [B, nK, H, D]
    return jnp.einsum("bhd,bjhd->bhj", pooled_q[:, 0], pk) * scale


def flexprefill_metadata(q, k, positions=None, config: FlexPrefillConfig = FlexPrefillConfig(), scale=None,
                         max_blocks: int | None = None) -> BlockSparseMetadata:
    """Online estimation: causal `BlockSparseMetadata [B, Hkv, nQ, max_blocks]`."""
    positions = check_prefill_args(q, k, positions)
    blocks, _ = flexprefill_blocks(q, k, positions, config, scale)
    return blocks_to_metadata(blocks, positions, config.block_size, k.shape[2], max_blocks)


def flexprefill_prefill(q, k, v, config: FlexPrefillConfig = FlexPrefillConfig(), *, positions=None,
                        scale=None, max_blocks=None, impl: str = "auto", interpret: bool = False):
    """FlexPrefill: estimate, then causal `block_sparse`. q `[B, T, H, D]`, k/v `[B, T, Hkv, D]`
    -> `out [B, T, H, Dv]`."""
    positions = check_prefill_args(q, k, positions)
    meta = flexprefill_metadata(q, k, positions, config, scale, max_blocks)
    return block_sparse_attention(q, k, v, meta, mask_fn=P.Causal(), q_positions=positions,
                                  kv_positions=positions, scale=scale, impl=impl, interpret=interpret)
