"""Native Sparse Attention (DeepSeek NSA, arXiv 2502.11089) as pure functions.

`o_t = sum_{c in cmp, slc, win} g_t^c Attn(q_t, K^c, V^c)`, `g = sigmoid(MLP(x_t))`, each
branch with its own keys and values (the layer `sparse_jax.layers.nsa` projects them).

* **cmp** (compression): block i covers tokens `i*d .. i*d+l-1` (`l = cmp_block`,
  `d = cmp_stride`) and becomes one key / value through a learnable MLP `phi` with an
  intra-block position encoding (`compress`). Query t sees block i iff the whole block
  is at or before t: `i*d + l - 1 <= t`. A compressed key carries the position of its
  last token (`cmp_block_end`), so that visibility is the causal predicate on positions.
* **slc** (selection): blocks of `l' = sel_block` tokens. Importance of selection block j
  from the cmp branch's probabilities (`selection_scores`):

      p_slc[j] = sum_{m=0}^{l'/d-1} sum_{n=0}^{l/d-1} p_cmp[(l'/d) j + m - n]

  read with `+ m`: the paper prints `(l'/d) j - m - n`, which for j=1 (l=32, d=16, l'=64)
  sums blocks 0..4 (tokens 0..95) and misses blocks 5, 6 (tokens 80..127) that lie inside
  selection block 1, against the paper's own words ("blocks that overlap"). With `+ m` the
  double sum is exact: m indexes the d-token chunk `(l'/d) j + m` of selection block j, n
  the chunk's offset inside compressed block `i = (l'/d) j + m - n`, so block i is counted
  once per d-chunk it shares with block j:

      p_slc[j] = sum_i p_cmp[i] * |tokens(i) & tokens(j)| / d,

  i.e. every token spreads the probability of each compressed block covering it, 1/d per
  token. Out-of-range indices are ignored. When `l = l' = d` it is `p_slc = p_cmp`.
  Scores are summed over the heads of each GQA group (one selection per KV head). On the
  kernel path (`selects_on_kernels`) the `nsa_select` op computes the same selection from
  q, the compressed keys and the cmp branch's log-sum-exp, never writing `p_cmp`.
  `select_blocks` takes the top `num_selected` causal blocks per query, always including
  the first `num_initial` blocks and the `num_local` most recent ones (the query's own
  block and the one before), through `sparse_jax.ops.selection.select_top_k`. Two
  granularities, both `selection.selected_block_attention`:
    - "token" (the paper): each query attends to its own blocks (`token_sparse` op;
      `selected_attention` is its dense-mask reference);
    - "query_block": the union of the top-n of `query_block` consecutive queries (one
      query block of the call) is shared by all of them, so the branch runs on the
      `block_sparse` op at full tile efficiency (`selection.union_metadata`). Query blocks are
      blocks of the call's query axis, so a query's selection depends on the later
      queries of its block (not causal inside a block), and a decode step (one query)
      equals the prefill only when the calls cover whole query blocks (or query_block=1).
* **win**: causal sliding window of `window` tokens through the `flash` op.

Decode (`nsa_decode_branches`, a few queries against the cache): per query the cmp branch
reads the compressed entries (dense: T/d of them), the slc branch only its `n` selected
blocks of `l'` raw tokens (the `decode` op's selected-block form) and the win branch the
`w` tokens of the rolling window: compressed + n*l' + w tokens, never the whole cache.

Compressed blocks of a call (`gather_cmp_blocks`) assume each row's positions in one
call are consecutive (ragged padding anywhere).

Key layout: the cmp and slc keys are *position-indexed* (slot s holds position s or -1,
as `FullKVCache` does), so block j of the slc keys is tokens `j*l' .. (j+1)*l' - 1`.

Shapes: `q [B, T, H, D]`, branch keys `[B, S, Hkv, D]`, positions int `[B, T]` / `[B, S]`
(negative = padding / empty). Rows that see nothing give zeros, never NaN.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.common import masked_attention
from pallas_kernels.compressed import compressed_attention as compressed_op
from pallas_kernels.decode import decode_attention
from pallas_kernels.flash import flash_attention
from pallas_kernels.flash import mosaic_gpu_pooled
from pallas_kernels.flash.mosaic_gpu import affine_positions
from pallas_kernels.nsa_decode import nsa_decode, which_backend as nsa_decode_backend
from pallas_kernels.nsa_select import nsa_select, select_from_importance, which_backend as nsa_select_backend
from pallas_kernels.nsa_select.reference import overlap_scores, overlap_weights
from sparse_jax import context_parallel as cp
from sparse_jax import patterns as P
from sparse_jax.ops import selection
from sparse_jax.ops.attention import DECODE_MAX_QUERIES

SELECTION_MODES = ("token", "query_block")


@dataclasses.dataclass(frozen=True)
class NSAConfig:
    """NSA hyperparameters (paper defaults).

    cmp_block (l) / cmp_stride (d): compression block and stride (l, l' multiples of d).
    sel_block (l'): selection block. num_selected (n): selected blocks per query, forced
    ones included: `num_initial` first blocks and `num_local` most recent blocks.
    window (w): sliding window of the win branch. selection: "token" (exact, per query)
    or "query_block" (union over `query_block` consecutive queries, block-sparse kernel).
    cmp_mlp_dim: hidden width of the compression MLP phi (None: 2 * head_dim).
    fused_cmp_select: a kernel choice, not the math: with impl "auto" run the cmp branch and
    the selection importance as one Mosaic GPU kernel (`compressed_select_fused`) where
    `fused_cmp_select_reason` allows (Hopper, concrete positions), else the two kernels
    (H100, forward: 1.588 vs 1.830 ms at 16K, 16.37 vs 17.40 ms at 64K, same outputs).
    """

    cmp_block: int = 32
    cmp_stride: int = 16
    sel_block: int = 64
    num_selected: int = 16
    num_initial: int = 1
    num_local: int = 2
    window: int = 512
    selection: str = "token"
    query_block: int = 64
    cmp_mlp_dim: int | None = None
    fused_cmp_select: bool = True

    def __post_init__(self):
        for name in ("cmp_block", "cmp_stride", "sel_block", "num_selected", "window", "query_block"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be an int >= 1, got {val!r}")
        for name in ("num_initial", "num_local"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 0:
                raise ValueError(f"{name} must be an int >= 0, got {val!r}")
        if self.cmp_block % self.cmp_stride:
            raise ValueError(f"cmp_block (l={self.cmp_block}) must be a multiple of cmp_stride "
                             f"(d={self.cmp_stride})")
        if self.sel_block % self.cmp_stride:
            raise ValueError(f"sel_block (l'={self.sel_block}) must be a multiple of cmp_stride "
                             f"(d={self.cmp_stride})")
        if self.num_selected < self.num_initial + self.num_local:
            raise ValueError(f"num_selected ({self.num_selected}) must be >= num_initial + num_local "
                             f"({self.num_initial} + {self.num_local}), the forced blocks")
        if self.selection not in SELECTION_MODES:
            raise ValueError(f"selection must be one of {SELECTION_MODES}, got {self.selection!r}")
        if not isinstance(self.fused_cmp_select, bool):
            raise ValueError(f"fused_cmp_select must be a bool, got {self.fused_cmp_select!r}")
        if self.cmp_mlp_dim is not None and (not isinstance(self.cmp_mlp_dim, int) or self.cmp_mlp_dim < 1):
            raise ValueError(f"cmp_mlp_dim must be an int >= 1 or None, got {self.cmp_mlp_dim!r}")


def num_cmp_blocks(length: int, cfg: NSAConfig) -> int:
    """Compressed blocks fully inside `length` tokens: `floor((length - l) / d) + 1` (>= 0)."""
    return max(0, (length - cfg.cmp_block) // cfg.cmp_stride + 1)


def cmp_block_end(block_ids, cfg: NSAConfig):
    """Position of the last token of compressed block i (`i*d + l - 1`); -1 where i < 0."""
    return jnp.where(block_ids >= 0, block_ids * cfg.cmp_stride + cfg.cmp_block - 1, -1)


# ----------------------------------------------------------------------------- compression


def gather_cmp_blocks(k, v, kv_positions, new_positions, cfg: NSAConfig):
    """The compressed blocks completed by this call's tokens, gathered token by token.

    Args:
      k, v: raw cmp-branch keys / values `[B, S, Hkv, D]` holding (at least) the new
        tokens and the `l - 1` tokens before them (the uncompressed tail), any order.
      kv_positions: int `[B, S]` (negative = empty).
      new_positions: int `[B, C]`, this call's positions (consecutive per row, any padding).
    Returns:
      `k_blocks, v_blocks [B, K, l, Hkv, D]` and `block_ids [B, K]` (-1 where no block),
      `K = ceil(C / d)`: the blocks whose last token is a new position and whose l tokens
      are all present. Block i is the one ending at `i*d + l - 1`.
    """
    l, d = cfg.cmp_block, cfg.cmp_stride
    b, c = new_positions.shape
    big = jnp.iinfo(jnp.int32).max
    valid_new = new_positions >= 0
    p_min = jnp.min(jnp.where(valid_new, new_positions, big), axis=1)          # [B]
    p_max = jnp.max(jnp.where(valid_new, new_positions, -1), axis=1)
    any_new = valid_new.any(axis=1)
    p_min = jnp.where(any_new, p_min, 0)
    first = jnp.maximum(0, -((l - 1 - p_min) // d))                            # ceil((p_min-l+1)/d)
    n_cand = max(1, -(-c // d))
    ids = first[:, None] + jnp.arange(n_cand)                                  # [B, K]
    end = ids * d + l - 1
    cand = any_new[:, None] & (end >= p_min[:, None]) & (end <= p_max[:, None])
    # Position-indexed scratch buffer of the tokens p_min - (l-1) .. p_min + C - 1.
    base = p_min - (l - 1)
    size = l - 1 + c
    slot = kv_positions - base[:, None]
    slot = jnp.where((kv_positions >= 0) & (slot >= 0) & (slot < size), slot, size)   # else dropped
    rows = jnp.arange(b)[:, None]
    buf_k = jnp.zeros((b, size) + k.shape[2:], k.dtype).at[rows, slot].set(k, mode="drop")
    buf_v = jnp.zeros((b, size) + v.shape[2:], v.dtype).at[rows, slot].set(v, mode="drop")
    buf_pos = jnp.full((b, size), -1, jnp.int32).at[rows, slot].set(kv_positions, mode="drop")
    tok = ids[:, :, None] * d + jnp.arange(l)                                  # [B, K, l] positions
    tslot = jnp.clip(tok - base[:, None, None], 0, size - 1).reshape(b, -1)
    complete = (jnp.take_along_axis(buf_pos, tslot, axis=1).reshape(tok.shape) == tok).all(-1)
    block_ids = jnp.where(cand & complete, ids, -1).astype(jnp.int32)
    gather = lambda buf: jnp.take_along_axis(buf, tslot[:, :, None, None], axis=1).reshape(
        (b, n_cand, l) + buf.shape[2:])
    return gather(buf_k), gather(buf_v), block_ids


def compress(blocks, pos_emb, w1, b1, w2, b2):
    """The compression MLP phi: one key (or value) per block.

    `phi(x) = mean_r(x_r + e_r) + W2 silu(W1 flatten(x + e) + b1) + b2`, with the learned
    intra-block position encoding `e [l, Hkv, D]` (per KV head) and the MLP weights shared
    by the KV heads. The mean-pooling skip (our choice; the paper only says "a learnable
    MLP with intra-block position encoding") makes phi start near mean pooling.

    blocks: `[B, K, l, Hkv, D]`; w1: `[l, D, M]`; b1: `[M]`; w2: `[M, D]`; b2: `[D]`.
    Returns `[B, K, Hkv, D]` in blocks' dtype.
    """
    dt = blocks.dtype
    x = blocks + pos_emb.astype(dt)
    h = jax.nn.silu(jnp.einsum("bklhd,ldm->bkhm", x, w1.astype(dt)) + b1.astype(dt))
    return (x.mean(axis=2) + jnp.einsum("bkhm,md->bkhd", h, w2.astype(dt)) + b2.astype(dt)).astype(dt)


def compressed_attention(q, k_cmp, v_cmp, q_positions, cmp_positions, *, scale=None):
    """cmp branch: `q [B, T, H, D]` over compressed keys `[B, N, Hkv, D]` whose positions
    `cmp_positions [B, N]` are their blocks' last tokens (-1 empty).

    Returns `(out [B, T, H, D], probs [B, Hkv, G, T, N] float32)`. Plain jnp: the reference
    of the `compressed` op (`compressed_branch`), which returns the group sums only.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qp, cp = q_positions[:, :, None], cmp_positions[:, None, :]
    mask = (qp >= 0) & (cp >= 0) & (cp <= qp)
    out, probs, _ = masked_attention(q, k_cmp, v_cmp, mask, scale=scale)
    return out, probs


def compressed_branch(q, k_cmp, v_cmp, q_positions, cmp_positions, *, impl: str = "auto",
                      interpret=False):
    """cmp branch on the `compressed` op: `(out [B, T, H, D], p_group [B, Hkv, T, N])`,
    the probabilities summed over each GQA group in the kernel (never per head in HBM)."""
    return compressed_op(q, k_cmp, v_cmp, q_positions=q_positions, kv_positions=cmp_positions,
                         impl=impl, interpret=interpret)


# ----------------------------------------------------------------------------- selection


def selection_scores(p_cmp, num_sel_blocks: int, cfg: NSAConfig):
    """Selection-block importance from cmp probabilities (module docstring).

    p_cmp: `[..., N]` indexed by compressed block id (already summed over a GQA group or
    not). Returns `[..., num_sel_blocks]` float32:
    `p_slc[j] = sum_{m < l'/d} sum_{n < l/d} p_cmp[(l'/d) j + m - n]`, out-of-range ignored
    (`pallas_kernels.nsa_select.reference.overlap_scores`, the one copy of the math).
    """
    return overlap_scores(p_cmp, num_sel_blocks, cmp_block=cfg.cmp_block, cmp_stride=cfg.cmp_stride,
                          sel_block=cfg.sel_block)


def select_blocks(scores, q_positions, cfg: NSAConfig):
    """Top-n selection blocks per query with the forced blocks, causal.

    scores: `[B, Hkv, T, Ns]` (one selection per KV head); q_positions `[B, T]`.
    Returns `block_indices [B, T, Hkv, min(n, Ns)] int32`, -1 for unused entries (few
    causal blocks, or a padded query). Candidates: blocks j with `j*l' <= t`; forced:
    `j < num_initial` or `j > t // l' - num_local`. Order and ties: `selection.select_top_k`'s
    (forced first, then by score, ties to the lower block index), the order of the
    `nsa_select` kernels and of their reference `pallas_kernels.nsa_select.reference.top_blocks`.
    """
    t = q_positions[:, None, :, None]                                        # [B, 1, T, 1]
    j = jnp.arange(scores.shape[-1])
    causal = (t >= 0) & (j * cfg.sel_block <= t)
    return selection.select_top_k(scores, causal, cfg.num_selected, forced=forced_blocks(j, t, cfg))


def forced_blocks(j, t, cfg: NSAConfig):
    """Whether selection block `j` is forced for the query at position `t` (broadcast):
    one of the `num_initial` first blocks or of the `num_local` blocks ending at t's own."""
    return (j < cfg.num_initial) | (j > t // cfg.sel_block - cfg.num_local)


def selects_on_kernels(impl: str, interpret, cfg: NSAConfig) -> bool:
    """Whether `nsa_branches` takes the fused selection: the `nsa_select` op resolves `impl`
    to its Triton kernels here (GPU, or CPU with `interpret`; `l'/d` a power of two)."""
    geo = dict(cmp_block=cfg.cmp_block, cmp_stride=cfg.cmp_stride, sel_block=cfg.sel_block)
    return nsa_select_backend(impl, interpret, **geo) == "triton"


def compressed_branch_lse(q, k_cmp, v_cmp, q_positions, cmp_positions, *, impl: str = "auto",
                          interpret=False):
    """cmp branch of the kernel path: flash over the compressed keys (causal on positions:
    key j at its block's last token), `(out [B, T, H, D], lse [B, H, T])`, the `compressed`
    op's output. With `impl="auto"` on Hopper and concrete positions (queries at `arange`,
    keys at `d * arange + l - 1`) the Mosaic GPU kernels run it (`flash.mosaic_gpu`), else
    Triton."""
    res = flash_attention(q, k_cmp, v_cmp, mask_fn=P.Causal(), q_positions=q_positions,
                          kv_positions=cmp_positions, return_lse=True, impl=impl,
                          interpret=interpret)
    return res.out, res.lse


def select_from_lse(q, k_cmp, lse, q_positions, cmp_positions, num_sel_blocks: int, cfg: NSAConfig, *,
                    impl: str = "auto", interpret=False):
    """Selection of the kernel path: `nsa_select` (Triton) from the cmp branch's q, keys and
    lse; the group probabilities never reach HBM. `[B, T, Hkv, min(n, Ns)]`, as sets equal to
    `select_blocks(selection_scores(p_cmp))`."""
    return nsa_select(q, k_cmp, lse, q_positions, cmp_positions, num_sel_blocks=num_sel_blocks,
                      cmp_block=cfg.cmp_block, cmp_stride=cfg.cmp_stride, sel_block=cfg.sel_block,
                      num_selected=cfg.num_selected, num_initial=cfg.num_initial,
                      num_local=cfg.num_local, impl=impl, interpret=interpret)


def fused_cmp_select_reason(q, k_cmp, v_cmp, q_positions, cmp_positions, num_sel_blocks: int,
                           cfg: NSAConfig, *, impl: str = "auto", interpret=False) -> str | None:
    """None when `compressed_select_fused` takes the call: `impl` "auto" on Hopper (or GPU
    interpret mode), queries at a concrete `arange`, compressed keys at their blocks' last
    tokens (`cmp_block_end`) and what `flash.mosaic_gpu_pooled` covers; else why not."""
    if impl != "auto":
        return f"impl={impl!r} (the fused kernel is taken by impl='auto' only)"
    reason = common.platform_reason("mosaic_gpu", common.current_device(), interpret)
    if reason:
        return reason
    if affine_positions(q_positions) != (1, 0, q.shape[1]):
        return "q_positions are not a concrete arange"
    kv = affine_positions(cmp_positions)
    if kv is None or kv[:2] != (cfg.cmp_stride, cfg.cmp_block - 1):
        return "cmp_positions are not concrete blocks' last tokens (d * arange + l - 1, then padding)"
    r, offsets = overlap_weights(cmp_block=cfg.cmp_block, cmp_stride=cfg.cmp_stride,
                                 sel_block=cfg.sel_block)
    return mosaic_gpu_pooled.supports(q, k_cmp, v_cmp, mask_fn=P.Causal(), kv_positions=cmp_positions,
                                      pool_keys=r, pool_offsets=offsets, pool_blocks=num_sel_blocks,
                                      interpret=interpret)


def compressed_select_fused(q, k_cmp, v_cmp, q_positions, cmp_positions, num_sel_blocks: int,
                            cfg: NSAConfig, *, interpret=False):
    """cmp branch and selection from one Mosaic GPU kernel (`flash.mosaic_gpu_pooled`: the
    branch's out and lse, then a second sweep over the same keys pooling the group's
    `exp(s - lse)` into selection-block importance, `overlap_weights`), then `nsa_select`'s
    top-n (`select_from_importance`). `(out [B, T, H, D], block_indices [B, T, Hkv, n])`,
    equal to `compressed_branch_lse` + `select_from_lse` (sets; importance to float
    rounding). Needs `fused_cmp_select_reason(...) is None`. Gradients: out's through the
    flash backward; the selection has none."""
    r, offsets = overlap_weights(cmp_block=cfg.cmp_block, cmp_stride=cfg.cmp_stride,
                                 sel_block=cfg.sel_block)
    res, imp = mosaic_gpu_pooled.flash_pooled_mosaic_gpu(
        q, k_cmp, v_cmp, mask_fn=P.Causal(), kv_positions=cmp_positions, pool_keys=r,
        pool_offsets=offsets, pool_blocks=num_sel_blocks, interpret=interpret)
    block_indices = select_from_importance(
        imp, q_positions, num_sel_blocks=num_sel_blocks, sel_block=cfg.sel_block,
        num_selected=cfg.num_selected, num_initial=cfg.num_initial, num_local=cfg.num_local)
    return res.out, block_indices


def selected_attention(q, k, v, q_positions, kv_positions, block_indices, cfg: NSAConfig, *,
                       scale=None):
    """slc branch, exact per-token selection: query t sees key s iff `s // l'` is one of its
    selected blocks and `s <= t` (keys position-indexed). Dense-mask reference of the
    `token_sparse` path (`selection.selected_block_attention`).

    q `[B, T, H, D]`; k, v `[B, S, Hkv, D]` with `kv_positions [B, S]`; block_indices from
    `select_blocks`. Returns `[B, T, H, D]`.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = selection.selected_block_dense_mask(q_positions, kv_positions, block_indices, cfg.sel_block)
    out, _, _ = masked_attention(q, k, v, mask, scale=scale)
    return out


def selected_attention_sparse(q, k, v, q_positions, kv_positions, block_indices, cfg: NSAConfig, *,
                              impl: str = "auto", interpret=False):
    """slc branch on the kernels: `selection.selected_block_attention` with block l' and the
    configured granularity (exact on `token_sparse` in "token" mode, the union over
    `query_block` queries on `block_sparse` in "query_block" mode). Keys position-indexed."""
    query_block = 1 if cfg.selection == "token" else cfg.query_block
    return selection.selected_block_attention(q, k, v, q_positions, kv_positions, block_indices,
                                              block_size=cfg.sel_block, query_block=query_block,
                                              impl=impl, interpret=interpret)


def window_attention(q, k, v, q_positions, kv_positions, *, window: int, impl: str = "auto",
                     interpret=False):
    """win branch: causal sliding window of `window` keys through the `flash` op."""
    return flash_attention(q, k, v, mask_fn=P.causal_window(window), q_positions=q_positions,
                           kv_positions=kv_positions, impl=impl, interpret=interpret)


# ----------------------------------------------------------------------------- all branches


class NSABranches(NamedTuple):
    """Per-branch outputs `[B, T, H, D]`, the selection `[B, T, Hkv, n]` and the cmp
    probabilities summed over each GQA group, `p_cmp [B, Hkv, T, N]` (None where
    `nsa_branches` selects on the kernels, `selects_on_kernels`: never materialised)."""

    cmp: jax.Array
    slc: jax.Array
    win: jax.Array
    block_indices: jax.Array
    p_cmp: jax.Array


def nsa_branches(q, q_positions, *, k_cmp, v_cmp, cmp_positions, k_slc, v_slc, slc_positions,
                 k_win, v_win, win_positions, cfg: NSAConfig, impl: str = "auto",
                 interpret=False) -> NSABranches:
    """The three branches for queries `q [B, T, H, D]` at `q_positions [B, T]`.

    k_cmp/v_cmp `[B, N, Hkv, D]`: compressed keys, slot i = block i, `cmp_positions` their
    last tokens (-1 empty). k_slc/v_slc `[B, S, Hkv, D]`: position-indexed (slot s holds
    position s or -1). k_win/v_win: any layout with `win_positions`. `impl` / `interpret`
    pick the kernels. With "auto" on GPU (or "triton") the selection runs on the
    `nsa_select` kernels from the cmp branch's lse (`compressed_branch_lse`,
    `select_from_lse`; `p_cmp` None); otherwise (`impl="xla"`, TPU) from the `compressed`
    op's group probabilities through `selection_scores` and `select_blocks`. With
    `cfg.fused_cmp_select` the cmp branch and the selection run as one Mosaic GPU kernel
    where `fused_cmp_select_reason` allows (`compressed_select_fused`).
    Under a mesh with a sequence axis > 1 it runs split over it (`sparse_jax.context_parallel`).
    """
    if cp.applies(q.shape[1], k_slc.shape[1], k_win.shape[1]) and not (
            cfg.selection == "query_block" and (q.shape[1] // cp.context_size()) % cfg.query_block):
        split, tok, pos = cp.Split, cp.TOKENS, cp.POSITIONS
        everything, halo = dict(gather=True), dict(halo=cfg.window - 1)
        return cp.attention(
            nsa_branches, NSABranches(tok, tok, tok, tok, cp.HEAD_MAJOR), q=split(q),
            q_positions=split(q_positions, pos),
            k_cmp=split(k_cmp, **everything), v_cmp=split(v_cmp, **everything),
            cmp_positions=split(cmp_positions, pos, **everything), k_slc=split(k_slc, **everything),
            v_slc=split(v_slc, **everything), slc_positions=split(slc_positions, pos, **everything),
            k_win=split(k_win, **halo), v_win=split(v_win, **halo), win_positions=split(win_positions, pos, **halo),
            cfg=cfg, impl=impl, interpret=interpret)
    ns = -(-k_slc.shape[1] // cfg.sel_block)
    fused = cfg.fused_cmp_select and fused_cmp_select_reason(
        q, k_cmp, v_cmp, q_positions, cmp_positions, ns, cfg, impl=impl, interpret=interpret) is None
    if fused:
        o_cmp, block_indices = compressed_select_fused(q, k_cmp, v_cmp, q_positions, cmp_positions,
                                                       ns, cfg, interpret=interpret)
        p_cmp = None
    elif selects_on_kernels(impl, interpret, cfg):
        o_cmp, lse = compressed_branch_lse(q, k_cmp, v_cmp, q_positions, cmp_positions,
                                           impl=impl, interpret=interpret)
        block_indices = select_from_lse(q, k_cmp, lse, q_positions, cmp_positions, ns, cfg,
                                        impl=impl, interpret=interpret)
        p_cmp = None
    else:
        o_cmp, p_cmp = compressed_branch(q, k_cmp, v_cmp, q_positions, cmp_positions, impl=impl,
                                         interpret=interpret)
        block_indices = select_blocks(selection_scores(p_cmp, ns, cfg), q_positions, cfg)
    o_slc = selected_attention_sparse(q, k_slc, v_slc, q_positions, slc_positions, block_indices, cfg,
                                      impl=impl, interpret=interpret)
    o_win = window_attention(q, k_win, v_win, q_positions, win_positions, window=cfg.window, impl=impl,
                             interpret=interpret)
    return NSABranches(o_cmp, o_slc, o_win, block_indices, p_cmp)


def decodes(num_queries: int, cfg: NSAConfig) -> bool:
    """Whether a cached call of `num_queries` queries takes `nsa_decode_branches`: at most
    `DECODE_MAX_QUERIES`, and in "query_block" mode inside one query block (one shared
    selection)."""
    cap = DECODE_MAX_QUERIES if cfg.selection == "token" else min(DECODE_MAX_QUERIES, cfg.query_block)
    return num_queries <= cap


def nsa_decode_branches(q, q_positions, *, k_cmp, v_cmp, cmp_positions, k_slc, v_slc, slc_positions,
                        k_win, v_win, win_positions, cfg: NSAConfig, impl: str = "auto",
                        interpret=False) -> NSABranches:
    """`nsa_branches` for a few queries (`decodes(T, cfg)`) on the `decode` op: the slc
    branch reads only the selected blocks of the raw keys (one `decode` call per query in
    "token" mode, one for the call's shared selection in "query_block" mode), the win
    branch the rolling window. Same arguments and result as `nsa_branches`; no gradient
    (the `decode` kernels define none). Token mode on a Triton impl (l'/d a power of two)
    runs all three branches and the selection in the fused `pallas_kernels.nsa_decode`
    kernel instead (`p_cmp` is then None)."""
    t = q.shape[1]
    if not decodes(t, cfg):
        raise ValueError(f"nsa_decode_branches takes at most {DECODE_MAX_QUERIES} queries (and in "
                         f"query_block mode at most query_block={cfg.query_block}), got T={t}")
    if cfg.selection == "token" and nsa_decode_backend(impl, interpret, cfg) == "triton":
        o_cmp, o_slc, o_win, block_indices = nsa_decode(         # the fused decode kernel
            q, q_positions, k_cmp=k_cmp, v_cmp=v_cmp, cmp_positions=cmp_positions, k_slc=k_slc,
            v_slc=v_slc, slc_positions=slc_positions, k_win=k_win, v_win=v_win,
            win_positions=win_positions, cfg=cfg, impl=impl, interpret=interpret)
        return NSABranches(o_cmp, o_slc, o_win, block_indices, None)
    o_cmp, p_cmp = compressed_branch(q, k_cmp, v_cmp, q_positions, cmp_positions, impl=impl,
                                     interpret=interpret)
    ns = -(-k_slc.shape[1] // cfg.sel_block)
    scores = selection_scores(p_cmp, ns, cfg)
    block_indices = select_blocks(scores, q_positions, cfg)
    spans = [(i, i + 1) for i in range(t)] if cfg.selection == "token" else [(0, t)]
    o_slc = []
    for lo, hi in spans:
        idx, counts = selection.block_lists(block_indices[:, lo:hi], ns)
        o_slc.append(decode_attention(q[:, lo:hi], k_slc, v_slc, kv_positions=slc_positions,
                                      q_positions=q_positions[:, lo:hi], block_indices=idx,
                                      block_counts=counts, block_size=cfg.sel_block, impl=impl,
                                      interpret=interpret))
    o_win = decode_attention(q, k_win, v_win, kv_positions=win_positions, q_positions=q_positions,
                             mask_fn=P.causal_window(cfg.window), impl=impl, interpret=interpret)
    return NSABranches(o_cmp, jnp.concatenate(o_slc, axis=1), o_win, block_indices, p_cmp)


def gated_sum(branches: NSABranches, gates):
    """`o = sum_c g_c o_c`; gates `[B, T, H, 3]` in the order (cmp, slc, win)."""
    outs = (branches.cmp, branches.slc, branches.win)
    out = sum(gates[..., c, None].astype(jnp.float32) * o.astype(jnp.float32) for c, o in enumerate(outs))
    return out.astype(branches.cmp.dtype)
