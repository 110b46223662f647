"""XLA reference of `nsa_select`, and the one home of NSA's selection math (arXiv 2502.11089;
`sparse_jax.ops.nsa.selection_scores` / `select_blocks` call `overlap_scores` /
`top_blocks` with an `NSAConfig`).

Composite: group probabilities `sum_g exp(q_g k^T * scale - lse_g)` over the visible
compressed keys `[B, Hkv, T, N]` -> selection-block importance (`overlap_scores`) ->
top-n with the forced blocks (`top_blocks`). Plain jnp, O(T * N * H) memory: the kernels'
ground truth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.compressed.reference import compressed_mask


def group_probabilities(q, k, lse, q_positions, kv_positions, *, scale: float):
    """`[B, Hkv, T, N]` float32: `sum_g exp(q_g k^T * scale - lse_g)` where compressed key n
    is visible to query t (`compressed_mask`), else 0.

    q `[B, T, H, D]`, k `[B, N, Hkv, D]`, lse `[B, H, T]` (natural log, -inf on rows that see
    nothing), positions int `[B, T]` / `[B, N]`.
    """
    b, t, h, d = q.shape
    hkv = k.shape[2]
    g = h // hkv
    qg = q.reshape(b, t, hkv, g, d).astype(jnp.float32)
    s = jnp.einsum("bthgd,bnhd->bhgtn", qg, k.astype(jnp.float32)) * scale
    lse = lse.astype(jnp.float32).reshape(b, hkv, g, t)
    lse = jnp.where(lse > -jnp.inf, lse, 0.0)
    mask = compressed_mask(q_positions, kv_positions)[:, :, None]            # [B, 1, 1, T, N]
    return jnp.exp(jnp.where(mask, s - lse[..., None], -jnp.inf)).sum(axis=2)


def overlap_scores(p_cmp, num_sel_blocks: int, *, cmp_block: int, cmp_stride: int, sel_block: int):
    """Selection-block importance from compressed-block probabilities.

    p_cmp: `[..., N]` indexed by compressed block id. Returns `[..., num_sel_blocks]`
    float32: `p_slc[j] = sum_{m < l'/d} sum_{n < l/d} p_cmp[(l'/d) j + m - n]` (m outer,
    n inner, in that order: the kernels add in the same order), out-of-range ignored; i.e.
    `sum_i p_cmp[i] * |tokens(i) & tokens(j)| / d` (`sparse_jax.ops.nsa` docstring).
    """
    r, u = sel_block // cmp_stride, cmp_block // cmp_stride
    p = p_cmp.astype(jnp.float32)
    n_cmp = p.shape[-1]
    length = r * num_sel_blocks + u - 1          # index (u - 1) + r*j + m - n covers every term
    lead = [(0, 0)] * (p.ndim - 1)
    p = jnp.pad(p, lead + [(u - 1, max(0, length - (u - 1) - n_cmp))])[..., :length]
    out = 0.0
    for m in range(r):
        for n in range(u):
            start = u - 1 + m - n
            out = out + p[..., start:start + r * (num_sel_blocks - 1) + 1:r]
    return out


def overlap_weights(*, cmp_block: int, cmp_stride: int, sel_block: int):
    """`overlap_scores` as a pooling: `(r, ((o, w), ...))` with `p_slc[j] = sum w *
    p_cmp[r*j + o]`, `r = l'/d`, `w` the number of `(m, n)` (m < r, n < l/d) with
    `m - n = o` (offsets `-(l/d - 1) .. r - 1`): the form the pooled flash kernel
    (`flash.mosaic_gpu_pooled`) takes."""
    r, u = sel_block // cmp_stride, cmp_block // cmp_stride
    weights = {}
    for m in range(r):
        for n in range(u):
            weights[m - n] = weights.get(m - n, 0) + 1
    return r, tuple(sorted((o, float(w)) for o, w in weights.items()))


def top_blocks(scores, q_positions, *, sel_block: int, num_selected: int, num_initial: int,
               num_local: int):
    """Top-n selection blocks per query with the forced blocks, causal.

    scores: `[B, Hkv, T, Ns]` (one selection per KV head); q_positions `[B, T]`.
    Returns `block_indices [B, T, Hkv, min(n, Ns)] int32`, -1 for unused entries (few
    causal blocks, or a padded query). Candidates: blocks j with `j*l' <= t`; forced:
    `j < num_initial` or `j > t // l' - num_local`. Order: forced blocks first (ascending),
    then by descending score; ties go to the lower block index.
    """
    ns = scores.shape[-1]
    t = q_positions[:, None, :, None]                                        # [B, 1, T, 1]
    j = jnp.arange(ns)
    causal = (t >= 0) & (j * sel_block <= t)
    forced = causal & ((j < num_initial) | (j > t // sel_block - num_local))
    s = jnp.where(forced, jnp.inf, jnp.where(causal, jax.lax.stop_gradient(scores), -jnp.inf))
    vals, idx = jax.lax.top_k(s, min(num_selected, ns))
    idx = jnp.where(vals > -jnp.inf, idx, -1).astype(jnp.int32)
    return jnp.transpose(idx, (0, 2, 1, 3))


def nsa_select_reference(q, k, lse, q_positions, kv_positions, *, num_sel_blocks: int,
                         cmp_block: int, cmp_stride: int, sel_block: int, num_selected: int,
                         num_initial: int, num_local: int, scale: float):
    """`nsa_select`'s contract in plain jnp (group probabilities -> overlap -> top-n)."""
    p = group_probabilities(q, k, lse, q_positions, kv_positions, scale=scale)
    scores = overlap_scores(p, num_sel_blocks, cmp_block=cmp_block, cmp_stride=cmp_stride,
                            sel_block=sel_block)
    return top_blocks(scores, q_positions, sel_block=sel_block, num_selected=num_selected,
                      num_initial=num_initial, num_local=num_local)


# Backend declaration for `pallas_kernels.common.resolve`: the XLA reference runs every call
# the api accepts, on any platform, and takes no tile config.
CONFIG = None
