"""Training-free sparse prefill: MInference (arXiv 2407.02490) on the `block_sparse` op.

Causal self-attention of a prompt `q [B, T, H, D]`, `k, v [B, T, Hkv, D]` (slot t holds
the token at `positions[:, t]`, -1 = padding, ragged rows allowed) where each query
head attends a *per-input* set of `block_size x block_size` blocks:

* **A-shape** (static): the first `sink_blocks` KV blocks and the `local_blocks` nearest
  ones (the query's own block included).
* **Vertical-slash**: the attention of the last `last_q` queries (those with the largest
  positions) gives a score per key slot (*vertical*: summed over those queries) and per
  diagonal offset `o = q_slot - k_slot` (*slash*); the top `num_vertical` columns and top
  `num_slash` diagonals are kept, then converted to the blocks that contain them: block
  granularity attends a **superset** of the chosen lines (every key of a listed block, a
  diagonal crossing two blocks lists both).
* **Block-sparse**: per query block the top `top_blocks` KV blocks by the mean-pooled
  query of the block times the mean-pooled key of each block.

The pattern type of each query head comes from an offline search on a calibration input
(`search_head_patterns`: the type whose block mask holds the most exact attention mass);
the indices are estimated online per input (`minference_metadata`). Metadata is per
(batch, kv head): with GQA the group's heads (each with its own type) share the *union*
of their blocks. Every query block always lists its diagonal block (each query sees
itself). Blocks are by slot, the causal predicate by position, so the kernel evaluates
`Causal` in partial blocks and the result is exact attention over the listed blocks.

FlexPrefill (arXiv 2502.20766) lives in `sparse_jax.ops.flexprefill` and shares the
helpers here.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse import block_sparse_attention
from pallas_kernels.block_sparse.metadata import BlockSparseMetadata
from sparse_jax import patterns as P
from sparse_jax.ops import selection
from sparse_jax.patterns.metadata import compact_blocks

PATTERNS = ("a_shape", "vertical_slash", "block_sparse")


@dataclasses.dataclass(frozen=True)
class MInferenceBudget:
    """Sizes of the three MInference patterns (blocks of `block_size` tokens).

    a_shape: `sink_blocks` first KV blocks + `local_blocks` nearest (own block included);
    vertical_slash: `num_vertical` key columns + `num_slash` diagonals, estimated from the
      last `last_q` queries; block_sparse: `top_blocks` KV blocks per query block.
    """

    block_size: int = 64
    last_q: int = 64
    sink_blocks: int = 1
    local_blocks: int = 16
    num_vertical: int = 1000
    num_slash: int = 6096
    top_blocks: int = 100

    def __post_init__(self):
        for f in dataclasses.fields(self):
            val = getattr(self, f.name)
            low = 0 if f.name == "sink_blocks" else 1
            if not isinstance(val, int) or val < low:
                raise ValueError(f"MInferenceBudget.{f.name} must be an int >= {low}, got {val!r}")


# ----------------------------------------------------------------------------- shared helpers


def check_prefill_args(q, k, positions):
    """Validate `q [B, T, H, D]`, `k [B, T, Hkv, D]`, `positions [B, T]` (default arange)."""
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q and k must be [B, T, heads, D], got {q.shape}, {k.shape}")
    b, t, h, d = q.shape
    if k.shape[:2] != (b, t) or k.shape[3] != d or h % k.shape[2]:
        raise ValueError(f"k {k.shape} must be [B={b}, T={t}, Hkv, D={d}] with Hkv dividing H={h} "
                         "(self-attention prefill)")
    if positions is None:
        return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if jnp.shape(positions) != (b, t) or not jnp.issubdtype(jnp.asarray(positions).dtype, jnp.integer):
        raise ValueError(f"positions must be int [{b}, {t}], got {jnp.shape(positions)}")
    return jnp.asarray(positions, jnp.int32)


def _check_block_size(block_size):
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")


def blocks_of(x, block_size, fill):
    """`[B, T, ...] -> [B, n, block_size, ...]`, padded with `fill`."""
    t = x.shape[1]
    n = -(-t // block_size)
    widths = [(0, 0), (0, n * block_size - t)] + [(0, 0)] * (x.ndim - 2)
    x = jnp.pad(x, widths, constant_values=fill)
    return x.reshape(x.shape[0], n, block_size, *x.shape[2:])


def block_extents(positions, block_size: int):
    """Per block `[B, n]`: smallest and largest valid position (big / -1 when none) and
    whether the block holds any padding (negative position or past the end)."""
    big = jnp.iinfo(jnp.int32).max
    pos = blocks_of(positions, block_size, -1)
    lo = jnp.where(pos >= 0, pos, big).min(-1)
    hi = pos.max(-1)
    return lo, hi, (pos < 0).any(-1)


def reachable_blocks(positions, block_size: int):
    """bool `[B, nQ, nK]`: KV block j holds a key some query of block i may see (causal)."""
    lo, hi, _ = block_extents(positions, block_size)
    return (lo[:, None, :] <= hi[:, :, None]) & (hi[:, :, None] >= 0)


def group_heads(k, num_heads: int):
    """`k [B, T, Hkv, D] -> [B, T, H, D]`: each query head's kv head."""
    return jnp.repeat(k, num_heads // k.shape[2], axis=2)


def last_queries(q, positions, n: int):
    """The `n` queries with the largest positions: `q_last [B, n, H, D]`, their slots and
    positions `[B, n]` (-1 where a row has fewer than n valid queries)."""
    n = min(n, q.shape[1])
    _, slots = jax.lax.top_k(positions, n)
    pos = jnp.take_along_axis(positions, slots, axis=1)
    return jnp.take_along_axis(q, slots[:, :, None, None], axis=1), slots, pos


def causal_probs(q_sub, q_pos, k, kv_positions, scale):
    """Exact causal softmax of a few queries over all keys, `[B, H, n, T]` float32 (zero
    rows for padding queries). `q_sub [B, n, H, D]`, `k [B, T, Hkv, D]`."""
    s = jnp.einsum("bnhd,bthd->bhnt", q_sub.astype(jnp.float32),
                   group_heads(k, q_sub.shape[2]).astype(jnp.float32)) * scale
    vis = (kv_positions[:, None, :] <= q_pos[:, :, None]) & (kv_positions[:, None, :] >= 0) \
        & (q_pos[:, :, None] >= 0)
    s = jnp.where(vis[:, None], s, -jnp.inf)
    m = s.max(-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    return p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)


def vertical_slash_scores(probs, q_slots):
    """From `probs [B, H, n, T]` of queries at `q_slots [B, n]`: vertical score per key slot
    and slash score per diagonal offset `o = q_slot - k_slot`, both `[B, H, T]`."""
    t = probs.shape[-1]
    vertical = probs.sum(2)
    key = q_slots[:, None, :, None] - jnp.arange(t)[None, None, None, :]         # [B, 1, n, T]
    along = jnp.take_along_axis(probs, jnp.clip(key, 0, t - 1), axis=-1)
    slash = jnp.where(key >= 0, along, 0.0).sum(2)
    return vertical, slash


def lines_to_blocks(columns, diagonals, block_size: int):
    """Chosen key columns and diagonal offsets (bool `[B, H, T]`, by slot) -> block mask
    `[B, H, nQ, nK]` (`nQ = nK`) of every block containing a chosen element (a superset)."""
    b, h, t = columns.shape
    n = -(-t // block_size)
    col = blocks_of(jnp.moveaxis(columns, 2, 1), block_size, False).any(2)       # [B, n, H]
    col = jnp.moveaxis(col, 1, 2)                                                 # [B, H, n]
    # offset o = m * bs + r covers block diagonals m (and m + 1 when r > 0).
    diag = blocks_of(jnp.moveaxis(diagonals, 2, 1), block_size, False)          # [B, n, bs, H]
    on_m = diag.any(2)
    on_next = diag[:, :, 1:].any(2)
    band = on_m | jnp.pad(on_next, ((0, 0), (1, 0), (0, 0)))[:, :n]
    band = jnp.moveaxis(band, 1, 2)                                               # [B, H, n] by i - j
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    slash = jnp.where(i >= j, band[..., np.clip(i - j, 0, n - 1)], False)
    return slash | col[:, :, None, :]


def take_top(scores, count: int):
    """bool mask of the top-`count` entries of `scores [..., N]` (-inf = not a candidate;
    ties to the lower index: `selection.select_top_k` on the rows)."""
    n = scores.shape[-1]
    rows = scores.reshape(1, 1, -1, n)
    idx = selection.select_top_k(rows, rows > -jnp.inf, count)                   # [1, rows, 1, k]
    return selection.selected_mask(idx, n).reshape(scores.shape)


def pooled_block_scores(q, k, positions, block_size: int, scale):
    """Mean-pooled query block times mean-pooled key block, `[B, H, nQ, nK]` float32,
    -inf where the KV block is not reachable from the query block."""
    valid = blocks_of(positions >= 0, block_size, False)[..., None, None]        # [B, n, bs, 1, 1]

    def pool(x):
        xb = blocks_of(x.astype(jnp.float32), block_size, 0.0)
        return (xb * valid).sum(2) / jnp.maximum(valid.sum(2), 1)

    s = jnp.einsum("bihd,bjhd->bhij", pool(q), pool(group_heads(k, q.shape[2]))) * scale
    return jnp.where(reachable_blocks(positions, block_size)[:, None], s, -jnp.inf)


def blocks_to_metadata(head_blocks, positions, block_size: int, num_kv_heads: int,
                       max_blocks: int | None = None) -> BlockSparseMetadata:
    """Per-query-head block masks `[B, H, nQ, nK]` -> causal `BlockSparseMetadata`
    `[B, Hkv, nQ, max_blocks]`: union over each GQA group, plus the diagonal block, minus
    unreachable blocks; a block is flagged full when its keys all precede its queries and
    neither holds padding (the kernel then skips the causal predicate)."""
    b, h, n, _ = head_blocks.shape
    union = head_blocks.reshape(b, num_kv_heads, h // num_kv_heads, n, n).any(2)
    lo, hi, pad = block_extents(positions, block_size)
    reach = reachable_blocks(positions, block_size)[:, None]
    present = (union | jnp.eye(n, dtype=bool)) & reach
    full = (reach & (hi[:, None, :] <= lo[:, :, None])[:, None]
            & ~pad[:, None, :, None] & ~pad[:, None, None, :])
    idx, cnt, flags = compact_blocks(present, full, n if max_blocks is None else int(max_blocks))
    return BlockSparseMetadata(idx, cnt, flags, block_size, block_size)


def logit_scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


# ----------------------------------------------------------------------------- MInference patterns


def a_shape_blocks(q, positions, budget: MInferenceBudget):
    """A-shape block mask `[B, H, nQ, nK]` (sinks + local band, by block index)."""
    b, t, h, _ = q.shape
    n = -(-t // budget.block_size)
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    m = (j < budget.sink_blocks) | ((j <= i) & (j > i - budget.local_blocks))
    return jnp.broadcast_to(jnp.asarray(m), (b, h, n, n))


def vertical_slash_blocks(q, k, positions, budget: MInferenceBudget, scale=None):
    """Vertical-slash block mask `[B, H, nQ, nK]` estimated from the last `last_q` queries."""
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    q_last, slots, pos = last_queries(q, positions, budget.last_q)
    probs = causal_probs(q_last, pos, k, positions, logit_scale(q, scale))
    vertical, slash = vertical_slash_scores(probs, slots)
    return lines_to_blocks(take_top(vertical, budget.num_vertical), take_top(slash, budget.num_slash),
                           budget.block_size)


def block_sparse_blocks(q, k, positions, budget: MInferenceBudget, scale=None):
    """Block-sparse mask `[B, H, nQ, nK]`: top `top_blocks` per query block by pooled scores."""
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    s = pooled_block_scores(q, k, positions, budget.block_size, logit_scale(q, scale))
    return take_top(s, budget.top_blocks)


PATTERN_BLOCKS = {
    "a_shape": lambda q, k, pos, budget, scale: a_shape_blocks(q, pos, budget),
    "vertical_slash": vertical_slash_blocks,
    "block_sparse": block_sparse_blocks,
}


def _check_patterns(head_patterns, num_heads):
    head_patterns = tuple(head_patterns)
    if len(head_patterns) != num_heads or any(p not in PATTERNS for p in head_patterns):
        raise ValueError(f"head_patterns must name one of {PATTERNS} per query head ({num_heads}), "
                         f"got {head_patterns!r}")
    return head_patterns


def minference_blocks(q, k, head_patterns, budget: MInferenceBudget, positions=None, scale=None):
    """Per-query-head block masks `[B, H, nQ, nK]`, each head by its own pattern type
    (each estimator runs on its heads only)."""
    positions = check_prefill_args(q, k, positions)
    head_patterns = _check_patterns(head_patterns, q.shape[2])
    kh = group_heads(k, q.shape[2])
    parts, order = [], []
    for name in PATTERNS:
        heads = [i for i, p in enumerate(head_patterns) if p == name]
        if heads:
            sel = np.asarray(heads)
            parts.append(PATTERN_BLOCKS[name](q[:, :, sel], kh[:, :, sel], positions, budget, scale))
            order += heads
    blocks = jnp.concatenate(parts, axis=1)
    return blocks[:, np.argsort(np.asarray(order))]


def minference_metadata(q, k, head_patterns, budget: MInferenceBudget, positions=None, scale=None,
                        max_blocks: int | None = None) -> BlockSparseMetadata:
    """Online index estimation: `BlockSparseMetadata [B, Hkv, nQ, max_blocks]` (causal)."""
    positions = check_prefill_args(q, k, positions)
    blocks = minference_blocks(q, k, head_patterns, budget, positions, scale)
    return blocks_to_metadata(blocks, positions, budget.block_size, k.shape[2], max_blocks)


def estimate_a_shape(q, k, budget: MInferenceBudget, positions=None, max_blocks=None):
    """Metadata with every head A-shape."""
    return minference_metadata(q, k, ("a_shape",) * q.shape[2], budget, positions, max_blocks=max_blocks)


def estimate_vertical_slash(q, k, budget: MInferenceBudget, positions=None, scale=None, max_blocks=None):
    """Metadata with every head vertical-slash (estimated from the last `last_q` queries)."""
    return minference_metadata(q, k, ("vertical_slash",) * q.shape[2], budget, positions, scale, max_blocks)


def estimate_block_sparse(q, k, budget: MInferenceBudget, positions=None, scale=None, max_blocks=None):
    """Metadata with every head block-sparse (pooled Q/K top blocks)."""
    return minference_metadata(q, k, ("block_sparse",) * q.shape[2], budget, positions, scale, max_blocks)


def block_mask_recall(q, k, head_blocks, block_size: int, positions=None, scale=None):
    """Exact causal attention mass inside `head_blocks [B, H, nQ, nK]` (per query head,
    averaged over batch rows and valid queries), `[H]`. Dense `T x T`: calibration sizes."""
    positions = check_prefill_args(q, k, positions)
    t = q.shape[1]
    probs = causal_probs(q, positions, k, positions, logit_scale(q, scale))          # [B, H, T, T]
    inside = jnp.repeat(jnp.repeat(head_blocks, block_size, 2), block_size, 3)[:, :, :t, :t]
    mass = jnp.where(inside, probs, 0.0).sum(-1)                                 # [B, H, T]
    valid = (positions >= 0)[:, None]
    return (mass * valid).sum((0, 2)) / jnp.maximum(valid.sum((0, 2)), 1)


def search_head_patterns(q, k, budget: MInferenceBudget, positions=None, scale=None):
    """Offline search on a calibration input: per query head, the pattern type whose
    estimated block mask holds the most exact attention mass (recall). Ties go to the
    earlier type in `PATTERNS`. Budgets are compared as given (choose them for similar
    densities). Returns `(head_patterns tuple[str] of length H, recall [len(PATTERNS), H])`."""
    positions = check_prefill_args(q, k, positions)
    recalls = []
    for name in PATTERNS:
        blocks = minference_blocks(q, k, (name,) * q.shape[2], budget, positions, scale)
        recalls.append(block_mask_recall(q, k, blocks, budget.block_size, positions, scale))
    recalls = jnp.stack(recalls)
    best = np.asarray(jnp.argmax(recalls, axis=0))
    return tuple(PATTERNS[i] for i in best), recalls


def minference_prefill(q, k, v, head_patterns, budget: MInferenceBudget = MInferenceBudget(), *,
                       positions=None, scale=None, metadata=None, max_blocks=None, impl: str = "auto",
                       interpret: bool = False):
    """MInference prefill: estimate the metadata (unless given), then causal `block_sparse`.

    Args:
      q: `[B, T, H, D]`; k, v: `[B, T, Hkv, D]`; head_patterns: one of `PATTERNS` per query
        head (`search_head_patterns`); positions: int `[B, T]` (-1 padding).
    Returns:
      `out [B, T, H, Dv]`.
    """
    positions = check_prefill_args(q, k, positions)
    if metadata is None:
        metadata = minference_metadata(q, k, head_patterns, budget, positions, scale, max_blocks)
    return block_sparse_attention(q, k, v, metadata, mask_fn=P.Causal(), q_positions=positions,
                                  kv_positions=positions, scale=scale, impl=impl, interpret=interpret)
