"""`indexer`: DSA lightning-indexer scores fused with top-k token selection, chunked.

`indexer_topk(q_index, weights, k_index, k=...)` returns, per query token, the set of `k` key
slots with the largest `I[t, s] = sum_{j < H_I} w[t, j] * ReLU(q_I[t, j] . k_I[s])` (DeepSeek-V3.2,
arXiv 2512.02556) among the visible keys (key position >= 0, query position >= 0,
`kv_pos <= q_pos`): the set `lax.top_k` picks (lower slot first among equal scores), in
ascending slot order, `-1` padded last when fewer are visible (every impl). Queries are
processed `query_chunk` at a time (`lax.map`): a kernel writes the chunk's float32
`[B, chunk, S]` scores (the `[chunk, H_I, S]` per-head products never reach HBM), then the
selection runs: "triton" the exact radix select kernel (`select.topk_select`), "xla" and
"mosaic_tpu" `lax.top_k` with its slots sorted (`select.sorted_top_k`); only one chunk's
scores exist at once, never the `T x S` matrix. With several chunks a chunk scores only a
prefix of the key slots, one of at most `PREFIX_WIDTH_CLASSES` (16) static widths, past which
no key is visible to it: with default positions (both `arange`) the causal prefix of each
group of chunks (a Python loop over the groups); with explicit ones the smallest width class
holding every key visible to the chunk, picked at run time (`lax.switch` under `lax.map`).
Causal prefill scores about half the keys either way (the score writes and top-k work); keys
visible past a short prefix (a ring cache, unsorted slots) just take the full width.

No gradient: the indices are discrete and the inputs are `stop_gradient`-ed. The indexer's
training loss (KL to the main attention, `sparse_jax.ops.dsa.dsa_indexer_loss`) is computed
on the XLA path (`sparse_jax.ops.dsa.indexer_scores`), not through this op.

`impl`: "auto" | "xla" | "triton" | "mosaic_tpu"; `interpret=True` runs a kernel in
interpret mode on CPU.

`score_dtype`: "bfloat16" (default) scores the inputs as given (bf16 in production, float32
stays float32); "float8_e4m3fn" rotates q and k (Hadamard), rounds them to e4m3 with one
scale per token row, and dots them in e4m3 with a float32 accumulate (`fp8.py`, DeepSeek-V3.2's
FP8 indexer) on "xla" and "triton" ("mosaic_tpu" declines it). The selection then runs on
those scores: the set differs from the float32 one near the k-th score (measured in
`experiments/dsa_warmup.py --fp8_overlap`, docs/BENCHMARKS.md: 96-98% overlap). `fp8_rerank=m`
lets the FP8 scores pick `ceil(m * k)` candidates and the float32 scores of those (recomputed
from the unquantised q and k, gathered, in XLA) pick the k: 99.7-99.9% overlap at m = 1.25.
"""

from __future__ import annotations

import functools
import math
import types

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.flash import blocks
from pallas_kernels.indexer import fp8, reference, tpu, triton
from pallas_kernels.indexer.fp8 import chunk_scores_fp8, quantize_indexer
from pallas_kernels.indexer.fused import FusedIndexerConfig, chunk_topk_fused
from pallas_kernels.indexer.reference import chunk_scores_reference
from pallas_kernels.indexer.select import (TILED_MIN_ROWS, WHOLE_ROW_MAX_COLUMNS, TopkSelectConfig, sorted_top_k,
                                           takes_whole_row, topk_select)
from pallas_kernels.indexer.tpu import chunk_scores_tpu
from pallas_kernels.indexer.triton import IndexerTritonConfig, chunk_scores_triton


def chunk_topk_xla(q_index, weights, k_index, q_positions, kv_positions, *, k: int, k_scale=None):
    """One chunk's `(values, slots)` `[B, C, min(k, S)]`: reference scores, `lax.top_k`.
    With `k_scale [B, S]` the operands are `fp8.quantize_indexer`'s (FP8 scores)."""
    if k_scale is not None:
        return sorted_top_k(chunk_scores_fp8(q_index, weights, k_index, k_scale, q_positions, kv_positions), k)
    return sorted_top_k(chunk_scores_reference(q_index, weights, k_index, q_positions, kv_positions), k)


def chunk_topk_triton(q_index, weights, k_index, q_positions, kv_positions, *, k: int, k_scale=None,
                      interpret=False, config=None):
    """`chunk_topk_xla`'s contract: the Triton score kernel (tiles `config`, an
    `IndexerTritonConfig`), then the radix select kernel on the chunk's `[B * C, S]` score rows;
    with a `FusedIndexerConfig`, `fused.chunk_topk_fused` (no score rows written)."""
    if isinstance(config, FusedIndexerConfig):
        return chunk_topk_fused(q_index, weights, k_index, q_positions, kv_positions, k=k, k_scale=k_scale,
                                interpret=interpret, config=config)
    scores = chunk_scores_triton(q_index, weights, k_index, q_positions, kv_positions, k_scale=k_scale,
                                 interpret=interpret, config=config)
    b, c, s = scores.shape
    vals, slots = topk_select(scores.reshape(b * c, s), k, interpret=interpret)
    return vals.reshape(b, c, -1), slots.reshape(b, c, -1)


def chunk_topk_tpu(q_index, weights, k_index, q_positions, kv_positions, *, k: int, k_scale=None,
                   interpret=False):
    """`chunk_topk_xla`'s contract: the Mosaic TPU score kernel, then `lax.top_k` (no FP8
    scores: `tpu.supports` declines them)."""
    assert k_scale is None
    return sorted_top_k(chunk_scores_tpu(q_index, weights, k_index, q_positions, kv_positions,
                                         interpret=interpret), k)


BACKENDS = {"triton": triton, "mosaic_tpu": tpu, "xla": reference}   # impl="auto" order
IMPLEMENTATIONS = {"xla": chunk_topk_xla, "triton": chunk_topk_triton, "mosaic_tpu": chunk_topk_tpu}


def _topk_triton_supports(scores, k, *, interpret=False, config=None):
    """The radix select runs one program per row. With fewer than `TILED_MIN_ROWS` rows only
    its whole-row form runs (the row loaded once, held in registers: `select.default_config`
    picks it where `select.takes_whole_row`, or a config with `block_s >= S`):
    the tiled passes leave the GPU idle (H100, Quest decode at batch 1, 8 rows: 170 us a step
    with them, 110 us with `lax.top_k`), and wider rows would not fit the registers."""
    del k
    rows, size = scores.shape
    if interpret or rows >= TILED_MIN_ROWS:
        return None
    if config is not None:
        return None if config.block_s >= size else (
            f"{rows} rows < {TILED_MIN_ROWS} with block_s {config.block_s} < S {size}: one program per row "
            f"streaming tiles, lax.top_k is faster (block_s >= S holds the row in registers)")
    if not takes_whole_row(rows, size):
        return (f"{rows} rows < {TILED_MIN_ROWS} of S {size} > {WHOLE_ROW_MAX_COLUMNS} columns: too wide for the "
                f"whole-row form's registers, lax.top_k is faster than streaming tiles")
    return None


TOPK_BACKENDS = {"triton": types.SimpleNamespace(CONFIG=TopkSelectConfig, supports=_topk_triton_supports),
                 "xla": types.SimpleNamespace(CONFIG=None)}                 # impl="auto" order
TOPK_IMPLEMENTATIONS = {"xla": sorted_top_k, "triton": topk_select}


def top_k_set(scores, k: int, *, impl: str = "auto", interpret=False, config=None, explain=False):
    """The set of the `min(k, S)` largest scores of each row, as the indexer selects.

    Args:
      scores: `[R, S]` float32; -inf = not a candidate, +inf = taken first; no NaN.
      k: int >= 1.
      impl: "auto" | "xla" (`lax.top_k`, slots sorted) | "triton" (the radix select
        kernel, `select.topk_select`: with few rows its whole-row form, one launch, each
        row read once; "auto" declines it for few rows wider than `WHOLE_ROW_MAX_COLUMNS`);
        interpret: the kernel in interpret mode (CPU tests); config: the kernel's
        `TopkSelectConfig` (None: `select.default_config`).
    Returns:
      `(values [R, k'], slots [R, k'])` (`k' = min(k, S)`): the slots `lax.top_k` picks
      (lower slot first among equal scores) in ascending slot order, -inf / -1 padded last
      where a row has fewer than k' candidates. Every impl returns the same arrays.
    """
    if getattr(scores, "ndim", None) != 2 or scores.dtype != jnp.float32:
        raise ValueError(f"scores must be float32 [R, S], got {getattr(scores, 'dtype', type(scores))}"
                         f"{list(getattr(scores, 'shape', ()))}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    fn = common.resolve("top_k_set", impl, TOPK_BACKENDS, TOPK_IMPLEMENTATIONS, dict(scores=scores, k=k),
                        interpret=interpret, config=config, explain=explain)
    return fn(jax.lax.stop_gradient(scores), k)


def _check(q_index, weights, k_index, k, query_chunk):
    if q_index.ndim != 4:
        raise ValueError(f"q_index must be [B, T, H_I, D_I], got shape {q_index.shape}")
    b, t, h, d = q_index.shape
    if weights.shape != (b, t, h):
        raise ValueError(f"weights must be [{b}, {t}, {h}], got shape {weights.shape}")
    if k_index.ndim != 3 or k_index.shape[0] != b or k_index.shape[2] != d:
        raise ValueError(f"k_index must be [{b}, S, {d}], got shape {k_index.shape}")
    for name, x in (("q_index", q_index), ("weights", weights), ("k_index", k_index)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if q_index.dtype != k_index.dtype:
        raise ValueError(f"q_index and k_index must share a dtype (cast the keys explicitly), got "
                         f"q_index {q_index.dtype}, k_index {k_index.dtype}")
    for name, val in (("k", k), ("query_chunk", query_chunk)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{name} must be an int >= 1, got {val!r}")


def indexer_topk(q_index, weights, k_index, *, k: int, q_positions=None, kv_positions=None,
                 query_chunk: int = 512, return_scores: bool = False, impl: str = "auto",
                 score_dtype: str = "bfloat16", fp8_rerank: float | None = None, interpret=False,
                 config=None, explain=False):
    """Top-k key slots per query from the lightning indexer.

    Args:
      q_index: `[B, T, H_I, D_I]` indexer queries; weights: `[B, T, H_I]` per-head weights;
      k_index: `[B, S, D_I]` indexer keys (one head, shared).
      k: slots per query (2048 in V3.2); the output has `min(k, S)` columns.
      q_positions: int `[B, T]`, default `arange(T)`; negative = padding query (all -1).
      kv_positions: int `[B, S]`, default `arange(S)`; negative = empty slot / padding.
      query_chunk: queries per chunk (the working set is `B x query_chunk x S` float32). With
        more than one chunk, each scores only a key prefix holding every key visible to it, one
        of at most `PREFIX_WIDTH_CLASSES` widths (multiples of 128 and of the kernel's key
        tile, up to S): causal prefixes with default positions, with explicit ones the smallest
        class past the chunk's last visible slot, chosen at run time (so keys in ascending
        slot order, as a prefill or an append-only cache holds them, save about half the work
        of causal prefill; any other order is exact at full width). One chunk (decode) scores
        all S.
      return_scores: also return the selected scores.
      impl: "auto" | "xla" | "triton" | "mosaic_tpu" (`common.resolve`); interpret: run the
        kernels in interpret mode (CPU tests).
      config: the Triton score kernel's tiles (`IndexerTritonConfig`, importable from here); a
        `FusedIndexerConfig` (its subclass) selects without writing the float32 score rows
        (`fused.py`: sampled threshold, candidates kept by a recomputing kernel, select over
        them; it keeps `query_chunk x (S / sample_stride + 3 cap)` float32 / int32 per chunk, so
        a large query_chunk, even T, fills the GPU best); the other backends take none.
      score_dtype: "bfloat16" (the scores of the inputs as given) or "float8_e4m3fn"
        (Hadamard-rotated e4m3 q and k, per-row scales, float32 accumulate: `fp8.py`).
      fp8_rerank: None, or m >= 1 (FP8 scores only): the FP8 scores select `ceil(m * k)`
        candidates, whose float32 scores from the unquantised operands then pick the `k`
        (a gather of `ceil(m * k)` keys per query, in XLA; the returned scores are those).
      explain: print which backend runs and why the others were skipped.
    Returns:
      `token_indices [B, T, min(k, S)]` int32: the selected slots in ascending order, -1
      padded last; with `return_scores` also their `scores [B, T, min(k, S)]` float32
      (column for column; -inf where padded; the FP8 scores with `score_dtype` FP8).
    """
    _check(q_index, weights, k_index, k, query_chunk)
    fp8.check_score_dtype(score_dtype)
    if fp8_rerank is not None:
        if score_dtype != "float8_e4m3fn":
            raise ValueError(f"fp8_rerank needs score_dtype='float8_e4m3fn', got score_dtype={score_dtype!r}")
        if isinstance(fp8_rerank, bool) or not isinstance(fp8_rerank, (int, float)) or not fp8_rerank >= 1:
            raise ValueError(f"fp8_rerank must be None or a number >= 1, got {fp8_rerank!r}")
    b, t = q_index.shape[:2]
    s = k_index.shape[1]
    prefix = q_positions is None and kv_positions is None
    q_positions = common.check_positions("q_positions", q_positions, b, t)
    kv_positions = common.check_positions("kv_positions", kv_positions, b, s)
    call = dict(q_index=q_index, weights=weights, k_index=k_index, k=k, score_dtype=score_dtype)
    fn = common.resolve("indexer", impl, BACKENDS, IMPLEMENTATIONS, call, interpret=interpret,
                        config=config, explain=explain)
    q_index, weights, k_index = (jax.lax.stop_gradient(a) for a in (q_index, weights, k_index))
    q_positions, kv_positions = jnp.asarray(q_positions), jnp.asarray(kv_positions)
    ops, k_scale = (q_index, weights, k_index), None
    if score_dtype == "float8_e4m3fn":      # quantised once; the chunks see e4m3 q and k
        *ops, k_scale = quantize_indexer(q_index, weights, k_index)
    width = k if fp8_rerank is None else max(k, math.ceil(fp8_rerank * k))
    align = max(KEY_WIDTH_ALIGN, getattr(config, "block_k", 0))     # whole key tiles of the kernel
    vals, idx = _select(fn, *ops, k_scale, q_positions, kv_positions, width, query_chunk, prefix, align)
    if fp8_rerank is not None:
        vals, idx = _rerank(q_index, weights, k_index, idx, min(k, s), query_chunk)
    return (idx, vals) if return_scores else idx


def _select(fn, q_index, weights, k_index, k_scale, q_positions, kv_positions, k, query_chunk, prefix,
            align):
    """`(values, slots) [B, T, min(k, S)]` of backend `fn`, query chunk by query chunk.

    One chunk (T <= query_chunk) scores every key slot. Several: each chunk scores only a
    prefix of the slots holding every key visible to it (`_key_prefix`), at most
    `PREFIX_WIDTH_CLASSES` static widths in all: default positions (`prefix`) take the
    causal prefixes (`_causal_prefix_chunks`); explicit positions take, per chunk at run time,
    the smallest of `_width_classes(S, .., align)` >= `_needed_keys` (`lax.switch` under
    `lax.map`; one kernel set compiled per width). The result equals the full-width one:
    invisible keys are never selected, the slots of the prefix are the full row's, and the
    Pallas kernels compute each visible score by the same tile program at any width
    (`align` >= their key tile). XLA's dots are not width-invariant: its scores (so near-tie
    picks) may differ in the last bits from the full-width path's, as between the
    default-positions path and the explicit one.
    """
    t, s = q_index.shape[1], k_index.shape[1]
    on_keys = functools.partial(_key_prefix, fn, k_index, kv_positions, k_scale, k, min(k, s))
    if t <= query_chunk:
        return fn(q_index, weights, k_index, q_positions, kv_positions, k=k, k_scale=k_scale)
    if prefix:
        return _causal_prefix_chunks(on_keys, s, q_index, weights, q_positions, query_chunk)
    widths = _width_classes(s, min(PREFIX_WIDTH_CLASSES, -(-t // query_chunk)), align)
    branches = [functools.partial(on_keys, keys) for keys in widths]

    def chunk(qi, wi, qp):
        if len(branches) == 1:                                          # S itself
            return branches[0](qi, wi, qp)
        smallest = jnp.sum(_needed_keys(qp, kv_positions) > jnp.asarray(widths[:-1]))
        return jax.lax.switch(smallest, branches, qi, wi, qp)

    return _map_query_chunks(chunk, (q_index, 0), (weights, 0), (q_positions, -1), query_chunk=query_chunk)


def _map_query_chunks(f, *arrays_and_fills, query_chunk):
    """`f` over `query_chunk`-query chunks (`lax.map`) of `[B, T, ...]` arrays (each padded
    along T with its fill), its `[B, chunk, n]` outputs joined back to `[B, T, n]`."""
    b, t = arrays_and_fills[0][0].shape[:2]
    n = -(-t // query_chunk)
    pad = n * query_chunk - t

    def split(a, fill):
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)
        return jnp.moveaxis(a.reshape((b, n, query_chunk) + a.shape[2:]), 1, 0)

    outs = jax.lax.map(lambda c: f(*c), tuple(split(a, fill) for a, fill in arrays_and_fills))
    return tuple(jnp.moveaxis(o, 0, 1).reshape(b, n * query_chunk, -1)[:, :t] for o in outs)


def _rerank(q_index, weights, k_index, candidates, k, query_chunk):
    """The `k` of the `candidates [B, T, M]` (ascending slots, -1 padded last; M >= k) with the
    largest scores recomputed from the unquantised operands (`chunk_scores_reference`'s
    arithmetic: float32, `lax.top_k`'s lower-slot-first tie rule), as `(values, slots)`
    `[B, T, k]` in ascending slot order, -1 / -inf padded last."""
    def chunk(qi, w, cand):
        keys = jax.vmap(lambda kb, cb: kb[jnp.maximum(cb, 0)])(k_index, cand)            # [B, C, M, D]
        dots = jnp.einsum("bcjd,bcmd->bcjm", qi, keys, precision="highest",   # exact products (bf16 / f32)
                          preferred_element_type=jnp.float32)
        sc = jnp.einsum("bcj,bcjm->bcm", w.astype(jnp.float32), jax.nn.relu(dots), precision="highest")
        vals, pos = sorted_top_k(jnp.where(cand >= 0, sc, -jnp.inf), k)       # ascending positions
        return vals, jnp.where(pos >= 0, jnp.take_along_axis(cand, jnp.maximum(pos, 0), -1), -1)

    if q_index.shape[1] <= query_chunk:
        return chunk(q_index, weights, candidates)
    return _map_query_chunks(chunk, (q_index, 0), (weights, 0), (candidates, -1), query_chunk=query_chunk)


PREFIX_WIDTH_CLASSES = 16
KEY_WIDTH_ALIGN = 128        # key width classes are multiples of this (and of the kernel's key tile)


def _key_prefix(fn, k_index, kv_positions, k_scale, k, width, keys, q_index, weights, q_positions):
    """Backend `fn` on the first `keys` key slots (static) only, its `(values, slots)`
    `[B, C, min(k, keys)]` padded with -inf / -1 to `width` columns: the full-width result
    when no key past `keys` is visible to these queries (the same candidates, the same
    slots; fewer than `min(k, keys)` of them leave the same -inf / -1 padding)."""
    if keys == 0:
        b, c = q_index.shape[:2]
        v, i = jnp.zeros((b, c, 0), jnp.float32), jnp.zeros((b, c, 0), jnp.int32)
    else:
        v, i = fn(q_index, weights, k_index[:, :keys], q_positions, kv_positions[:, :keys], k=k,
                  k_scale=None if k_scale is None else k_scale[:, :keys])
    pad = [(0, 0), (0, 0), (0, width - v.shape[-1])]
    return jnp.pad(v, pad, constant_values=-jnp.inf), jnp.pad(i, pad, constant_values=-1)


def _width_classes(s: int, n: int, align: int) -> list[int]:
    """At most `n` static key widths, increasing to `s`: `ceil(i * s / n)` for i = 1..n,
    rounded up to a multiple of `align` (kernel tiles stay whole), clipped to `s`; equal ones
    merged. 64K keys, 16 classes: 4096, 8192, ..., 65536."""
    return sorted({min(s, blocks.round_up(-(-i * s // n), align)) for i in range(1, n + 1)})


def _needed_keys(q_positions, kv_positions):
    """int32 scalar: 1 + the last key slot visible to some query of `q_positions [B, C]` in
    some batch row of `kv_positions [B, S]` (0: none). Slot j of row b is visible to query i
    iff `q_pos[b, i] >= 0`, `kv_pos[b, j] >= 0` and `kv_pos[b, j] <= q_pos[b, i]`
    (`chunk_scores_reference`), so to some query of the chunk iff `0 <= kv_pos[b, j] <=
    max_i q_pos[b, i]` (the maximum is then >= 0, a real query)."""
    q_max = jnp.max(q_positions, axis=1, keepdims=True)
    visible = (kv_positions >= 0) & (kv_positions <= q_max)
    return jnp.max(jnp.where(visible, jnp.arange(1, kv_positions.shape[1] + 1, dtype=jnp.int32), 0))


def _causal_prefix_chunks(on_keys, s, q_index, weights, q_positions, query_chunk):
    """Default positions: the queries `[lo, hi)` of a group score only the keys
    `[0, min(S, hi))` (`on_keys(keys, ...)`, a `_key_prefix`), the rest being invisible to all
    of them. A group is one query chunk while there are at most `PREFIX_WIDTH_CLASSES` chunks
    (each its exact causal prefix), else that many chunks' worth of consecutive chunks (under
    `lax.map`), so that at most `PREFIX_WIDTH_CLASSES` key widths are compiled: one kernel set
    per width, 128 at 64K / chunk 512 before (the fused top-k's compile ran past 200 s on an
    H100), at the price of ~6% more scores there (each chunk scores up to its group's last
    key)."""
    t = q_index.shape[1]
    n = -(-t // query_chunk)
    group = query_chunk * -(-n // PREFIX_WIDTH_CLASSES)
    vals, idx = [], []
    for lo in range(0, t, group):
        hi = min(t, lo + group)
        chunk = functools.partial(on_keys, min(s, hi))
        args = (q_index[:, lo:hi], weights[:, lo:hi], q_positions[:, lo:hi])
        v, i = chunk(*args) if hi - lo <= query_chunk else _map_query_chunks(
            chunk, *zip(args, (0, 0, -1)), query_chunk=query_chunk)
        vals.append(v)
        idx.append(i)
    return jnp.concatenate(vals, 1), jnp.concatenate(idx, 1)
