"""Attention math of the static-pattern family, as pure functions over projected q/k/v.

* `local_attention`: full causal, sliding window (Mistral, Gemma local; arXiv 2310.06825)
  and StreamingLLM sinks + window (arXiv 2309.17453) through the `flash` op.
* `streaming_attention_cache_rope`: StreamingLLM with RoPE distances measured inside the
  cache (the paper's choice): sinks are scored as if they sat right before the window.
* `pattern_attention`: any `sparse_jax.patterns` predicate (Longformer, BigBird, Sparse
  Transformer, ...) through the `block_sparse` op.
* `merge_attention`: combine attention over disjoint key sets by their log-sum-exp.

Shapes: `q [B, Tq, H, D]`, `k [B, Tk, Hkv, D]`, `v [B, Tk, Hkv, Dv]`, positions
`[B, Tq]` / `[B, Tk]` (negative = padding). Outputs `[B, Tq, H, Dv]`.

`decoding=True` (a layer called with a cache) sends calls of at most
`DECODE_MAX_QUERIES` queries to the split-K `decode` op instead of `flash`: same math,
forward only, built for one query against a long cache.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.block_sparse import block_sparse_attention
from pallas_kernels.decode import decode_attention
from pallas_kernels.flash import flash_attention
from sparse_jax import context_parallel as cp
from sparse_jax import patterns as P
from sparse_jax.ops.rope import apply_rope


DECODE_MAX_QUERIES = 4


def masked_attention(q, k, v, q_positions, kv_positions, *, mask: P.Pattern, decoding: bool = False,
                     sink_logits=None, softcap=None, return_lse: bool = False, impl: str = "auto"):
    """Causal attention under `mask` through `flash`, or `decode` for a few cached queries."""
    if decoding and q.shape[1] <= DECODE_MAX_QUERIES:
        return decode_attention(q, k, v, kv_positions=kv_positions, q_positions=q_positions,
                                mask_fn=mask, sink_logits=sink_logits, softcap=softcap,
                                return_lse=return_lse, impl=impl)
    return flash_attention(q, k, v, mask_fn=mask, q_positions=q_positions, kv_positions=kv_positions,
                           sink_logits=sink_logits, softcap=softcap, return_lse=return_lse, impl=impl)


def local_attention(q, k, v, q_positions, kv_positions, *, window: int | None = None,
                    num_sinks: int = 0, decoding: bool = False, sink_logits=None, softcap=None,
                    impl: str = "auto"):
    """Causal attention, limited to `window` keys (itself included) plus `num_sinks` sinks.
    Under a mesh with a sequence axis > 1 (`jax.set_mesh`) training / prefill calls run
    split over it (`sparse_jax.context_parallel`: K/V gathered, or a halo of `window - 1`)."""
    if not decoding and not num_sinks and cp.applies(q.shape[1], k.shape[1]):
        kv = dict(gather=window is None, halo=0 if window is None else window - 1)
        return cp.attention(local_attention, cp.TOKENS, q=cp.Split(q), k=cp.Split(k, **kv), v=cp.Split(v, **kv),
                            q_positions=cp.Split(q_positions, cp.POSITIONS),
                            kv_positions=cp.Split(kv_positions, cp.POSITIONS, **kv),
                            sink_logits=cp.Split(sink_logits, cp.HEADS), window=window, softcap=softcap, impl=impl)
    return masked_attention(q, k, v, q_positions, kv_positions, mask=P.causal_window(window, num_sinks),
                            decoding=decoding, sink_logits=sink_logits, softcap=softcap, impl=impl)


def merge_attention(outs, lses):
    """Softmax over the union of disjoint key sets from per-set results.

    outs: list of `[B, T, H, Dv]`; lses: list of `[B, H, T]` (-inf where a set is empty).
    Returns `(out, lse)`; rows empty in every set give zeros and -inf.
    """
    lse = lses[0]
    for other in lses[1:]:
        lse = jnp.logaddexp(lse, other)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    out = 0.0
    for o, part in zip(outs, lses):
        weight = jnp.where(jnp.isfinite(part), jnp.exp(part - safe), 0.0)      # [B, H, T]
        out = out + o.astype(jnp.float32) * jnp.transpose(weight, (0, 2, 1))[..., None]
    return out.astype(outs[0].dtype), lse


def streaming_attention_cache_rope(q_raw, k, v, q_positions, kv_positions, *, window: int,
                                   num_sinks: int, rope_theta: float, decoding: bool = False,
                                   sink_logits=None, softcap=None, impl: str = "auto"):
    """StreamingLLM with positions inside the cache for RoPE.

    In the cache, sinks sit at slots 0..S-1 and the window right after them, so query t is
    at cache position `min(t, S + W - 1)` relative to the sinks, while window keys keep
    their text distance. Keys `k` are RoPE-rotated at text positions (a sink's text and
    cache positions agree); `q_raw` is the un-rotated query. Two `flash` calls (window
    branch with the text-position query, sink branch with the cache-position query) are
    merged by log-sum-exp, which is exact.
    """
    q_text = apply_rope(q_raw, q_positions, rope_theta)
    q_cache_pos = jnp.where(q_positions >= 0, jnp.minimum(q_positions, num_sinks + window - 1), -1)
    q_cache = apply_rope(q_raw, q_cache_pos, rope_theta)
    window_mask = P.Causal() & P.SlidingWindow(window)
    sink_mask = P.Causal() & P.Sinks(num_sinks) & ~P.SlidingWindow(window)
    kw = dict(decoding=decoding, softcap=softcap, return_lse=True, impl=impl)
    win = masked_attention(q_text, k, v, q_positions, kv_positions, mask=window_mask,
                           sink_logits=sink_logits, **kw)
    # The sink branch is evaluated at the text positions (for the mask) with the cache query.
    snk = masked_attention(q_cache, k, v, q_positions, kv_positions, mask=sink_mask, **kw)
    out, _ = merge_attention([win.out, snk.out], [win.lse, snk.lse])
    return out


def pattern_attention(q, k, v, q_positions, kv_positions, *, pattern: P.Pattern, block_size: int = 64,
                      decoding: bool = False, sink_logits=None, softcap=None, impl: str = "auto"):
    """Attention under any pattern: block-sparse metadata built from the positions, or the
    `decode` op (the pattern as its element predicate) for a few cached queries."""
    if decoding and q.shape[1] <= DECODE_MAX_QUERIES:
        return masked_attention(q, k, v, q_positions, kv_positions, mask=pattern, decoding=True,
                                sink_logits=sink_logits, softcap=softcap, impl=impl)
    meta = P.block_metadata(pattern, q_positions, kv_positions, block_size, block_size,
                            num_kv_heads=k.shape[2])
    return block_sparse_attention(q, k, v, meta, mask_fn=pattern, q_positions=q_positions,
                                  kv_positions=kv_positions, sink_logits=sink_logits,
                                  softcap=softcap, impl=impl)
