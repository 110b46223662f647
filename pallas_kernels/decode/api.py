"""`decode`: one or a few new query tokens per sequence against a long KV cache, split-K.

`decode_attention(q, k_cache, v_cache, ...)` computes softmax attention of
`q [B, Tq, H, D]` (Tq small: 1 for plain decode, a few for speculative / chunked steps,
causal among them by position) over one of three cache forms:

(a) contiguous: `k_cache [B, S, Hkv, D]`, `v_cache [B, S, Hkv, Dv]` with either
    `lengths [B]` (slots `0..len-1` hold positions `0..len-1`) or
    `kv_positions [B, S]` (each slot's position, negative = empty; the layout of
    `sparse_jax.cache.FullKVCache` / `RollingKVCache`);
(b) paged (vLLM PagedAttention, arXiv 2309.06180): pool `k_cache [P, page, Hkv, D]`,
    `page_table [B, max_pages]` (logical page j of row b lives in pool page
    `page_table[b, j]`; entries past the row's length are never read) and `lengths [B]`;
(c) selected blocks over a contiguous cache (Quest arXiv 2406.10774, NSA arXiv 2502.11089,
    HySparse): `block_indices [B, Hkv, max_sel]` (block i covers slots
    `[i * block_size, (i + 1) * block_size)`), of which the first `block_counts [B, Hkv]`
    are read; entries must be distinct, padding entries past the count are ignored.

The GPU and TPU kernels process the `G = H / Hkv` query heads of a kv head (times Tq)
together against one load of each KV tile, and split the cache into `num_splits` chunks
(flash-decoding): each writes a partial (out, lse), a small XLA combine merges them.

Forward only: decode needs no gradient. The kernels define no VJP, so differentiating
through `impl="triton" | "mosaic_tpu"` fails inside JAX; use `impl="xla"` if a gradient
is ever wanted.

`impl`: "auto" | "xla" | "triton" | "mosaic_tpu"; `interpret=True` runs a Pallas kernel in
interpret mode on CPU.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.decode import layout, reference, tpu, triton
from pallas_kernels.decode.reference import decode_reference
from pallas_kernels.decode.tpu import DecodeTpuConfig, decode_tpu
from pallas_kernels.decode.triton import DecodeTritonConfig, decode_triton

BACKENDS = {"triton": triton, "mosaic_tpu": tpu, "xla": reference}   # impl="auto" order
IMPLEMENTATIONS = {"xla": decode_reference, "triton": decode_triton, "mosaic_tpu": decode_tpu}


def _check_int(name, x, shape):
    x = jnp.asarray(x)
    if x.shape != tuple(shape) or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be int {list(shape)}, got {x.dtype}{list(x.shape)}")
    return x.astype(jnp.int32)


def _concrete(x):
    return None if isinstance(x, jax.core.Tracer) else jax.device_get(x)


def decode_attention(q, k_cache, v_cache, *, lengths=None, kv_positions=None, q_positions=None,
                     page_table=None, block_indices=None, block_counts=None, block_size=None,
                     sink_logits=None, softcap=None, scale=None, mask_fn=None, return_lse=False,
                     num_splits=None, impl="auto", interpret=False, config=None,
                     explain=False):
    """Attention of a few new tokens over a KV cache (contiguous, paged or selected blocks).

    Args:
      q: `[B, Tq, H, D]`, float, the cache's dtype.
      k_cache, v_cache: `[B, S, Hkv, D]` / `[B, S, Hkv, Dv]`, or with `page_table` the page
        pools `[P, page_size, Hkv, D]` / `[P, page_size, Hkv, Dv]`. `Hkv` divides `H`.
      lengths: int `[B]`, valid cache length per row (slot j holds position j). Required
        with `page_table`; else exactly one of `lengths` / `kv_positions`.
      kv_positions: int `[B, S]`, each slot's position, negative = empty (contiguous and
        selected forms only).
      q_positions: int `[B, Tq]`, negative = padding query (zeros out). Default: the last
        Tq positions, `lengths - Tq + arange(Tq)` (or from `max(kv_positions)`), i.e. the
        new tokens are already written to the cache.
      page_table: int `[B, max_pages]` pool page of each logical page.
      block_indices: int `[B, Hkv, max_sel]` selected blocks per kv head;
      block_counts: int `[B, Hkv]` how many of them are valid; block_size: int, tokens per
        selected block. The three go together.
      sink_logits: optional float `[H]` learned sink logit (denominator only).
      softcap: optional logit soft-cap `c * tanh(s / c)`.
      scale: logit scale, default `1/sqrt(D)`.
      mask_fn: optional extra predicate on `(q_pos, kv_pos, None, None)` (e.g. a sliding
        window from `sparse_jax.patterns`); a key is visible iff both positions are valid,
        `kv_pos <= q_pos`, it is selected (form c) and `mask_fn` holds. It masks, it does
        not skip tiles: the kernels read every valid tile.
      return_lse: also return the log-sum-exp `[B, H, Tq]` (float32, -inf on empty rows).
      num_splits: cache chunks per (batch, kv head) for the kernels (split-K); None picks
        one from the shape. The reference ignores it.
      impl: "auto" | "xla" | "triton" | "mosaic_tpu" (`common.resolve`); interpret: run a
        Pallas kernel in interpret mode (CPU tests).
      config: the chosen kernel's tiles (`DecodeTritonConfig`, `DecodeTpuConfig`, importable from
        here); None: its defaults.
      explain: print which backend runs and why the others were skipped.
    Returns:
      `out [B, Tq, H, Dv]` in q's dtype, or `AttentionOutput(out, lse)` with `return_lse`.
      Rows that see nothing (length 0, padding query) are zeros.
    """
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D, got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"q, k_cache, v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}")
    b, tq, h, d = q.shape
    hkv = k_cache.shape[2]
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} must agree but for head_dim")
    if k_cache.shape[3] != d:
        raise ValueError(f"head_dim mismatch: q has {d}, k_cache has {k_cache.shape[3]}")
    if hkv < 1 or h % hkv:
        raise ValueError(f"num_heads ({h}) must be a multiple of num_kv_heads ({hkv})")
    if page_table is not None and block_indices is not None:
        raise ValueError("page_table and block_indices cannot be combined: select pages by "
                         "building the page table of the selected pages instead")
    if page_table is not None:
        if lengths is None or kv_positions is not None:
            raise ValueError("a paged cache needs lengths (and no kv_positions)")
        page_table = _check_int("page_table", page_table, (b, jnp.shape(page_table)[-1]))
        if jnp.ndim(page_table) != 2 or page_table.shape[1] < 1:
            raise ValueError(f"page_table must be int [{b}, max_pages >= 1], got {page_table.shape}")
    elif k_cache.shape[0] != b:
        raise ValueError(f"batch mismatch: q {q.shape}, k_cache {k_cache.shape}")
    if (lengths is None) == (kv_positions is None):
        raise ValueError("pass exactly one of lengths [B] and kv_positions [B, S]")
    s = k_cache.shape[1]
    if lengths is not None:
        lengths = _check_int("lengths", lengths, (b,))
        top = _concrete(lengths)
        cap = s * page_table.shape[1] if page_table is not None else s
        if top is not None and (top.min(initial=0) < 0 or top.max(initial=0) > cap):
            raise ValueError(f"lengths must lie in [0, {cap}], got {top.tolist()}")
    else:
        kv_positions = _check_int("kv_positions", kv_positions, (b, s))
    if page_table is not None:
        tab = _concrete(page_table)
        ln = _concrete(lengths)
        if tab is not None and ln is not None:
            for row in range(b):
                used = tab[row, :layout.cdiv(int(ln[row]), s)]
                if used.size and (used.min() < 0 or used.max() >= k_cache.shape[0]):
                    raise ValueError(f"page_table row {row} points outside the pool of "
                                     f"{k_cache.shape[0]} pages: {used.tolist()}")
    sel = (block_indices is not None, block_counts is not None, block_size is not None)
    if any(sel) and not all(sel):
        raise ValueError("block_indices, block_counts and block_size go together")
    if block_indices is not None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        if jnp.ndim(block_indices) != 3:
            raise ValueError(f"block_indices must be int [{b}, {hkv}, max_sel], got shape "
                             f"{jnp.shape(block_indices)}")
        max_sel = jnp.shape(block_indices)[2]
        block_indices = _check_int("block_indices", block_indices, (b, hkv, max_sel))
        block_counts = _check_int("block_counts", block_counts, (b, hkv))
        cnt, idx = _concrete(block_counts), _concrete(block_indices)
        if cnt is not None and (cnt.min() < 0 or cnt.max() > max_sel):
            raise ValueError(f"block_counts must lie in [0, {max_sel}], got {cnt.tolist()}")
        nblk = layout.cdiv(s, block_size)
        if cnt is not None and idx is not None:
            valid = jnp.arange(max_sel)[None, None] < cnt[..., None]
            bad = valid & ((idx < 0) | (idx >= nblk))
            if bool(bad.any()):
                raise ValueError(f"block_indices must lie in [0, {nblk}) (S={s}, block_size="
                                 f"{block_size}) where valid")
    if q_positions is None:
        last = lengths if lengths is not None else jnp.max(kv_positions, axis=1) + 1
        q_positions = last[:, None] - tq + jnp.arange(tq, dtype=jnp.int32)[None]
    q_positions = _check_int("q_positions", q_positions, (b, tq))
    sink_logits = common.check_optional("sink_logits", sink_logits, (h,))
    common.check_softcap(softcap)
    common.check_mask_fn(mask_fn)
    if mask_fn is not None and getattr(mask_fn, "needs_segments", False):
        raise ValueError(f"mask_fn {mask_fn!r} reads segment ids, which decode does not take")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be an int >= 1 or None, got {num_splits!r}")
    scale = common.check_scale(scale, d)
    call = dict(q=q, k_cache=k_cache, v_cache=v_cache, page_table=page_table,
                block_indices=block_indices, mask_fn=mask_fn)
    fn = common.resolve("decode", impl, BACKENDS, IMPLEMENTATIONS, call, interpret=interpret,
                        config=config, explain=explain)
    return fn(q, k_cache, v_cache, lengths=lengths, kv_positions=kv_positions,
              q_positions=q_positions, page_table=page_table, block_indices=block_indices,
              block_counts=block_counts, block_size=block_size, sink_logits=sink_logits,
              softcap=softcap, scale=scale, mask_fn=mask_fn, return_lse=return_lse,
              num_splits=num_splits)
