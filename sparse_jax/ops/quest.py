"""Query-aware page selection for decode over a full KV cache: Quest and top-p.

Quest (Tang et al., arXiv 2406.10774): the cache is cut into pages of `page_size` slots
(slot = position, as in `sparse_jax.cache.kv.FullKVCache`); per page and kv head the
elementwise min and max of its keys, `kmin, kmax [B, Hkv, P, D]` (head-major: each kv
head's bounds are one contiguous `[P, D]` matrix, so the scores' batched dots stream them
in place, with no transposed copy first), bound every logit of the page from above:

    q . k  <=  sum_i max(q_i * kmax_i, q_i * kmin_i).

The top-`budget_pages` pages by that
bound are attended exactly by the `decode` kernel's selected-block path
(`pallas_kernels.decode.api.decode_attention(..., block_indices=..., block_size=page_size)`).

Top-p (Twilight, arXiv 2502.02770; Double-P): the smallest set of pages whose *estimated*
attention mass reaches `p`. The estimate used here is `softmax(bound scores)` over the
valid pages: each page counts as if all its mass sat at its upper bound once (it ignores
how many keys a page holds and overstates pages with spread-out keys), so it is a cheap
ranking-plus-stopping rule, not a guarantee that the true mass reaches `p`.

Empty pages (no slot with position >= 0) have `kmin = +inf`, `kmax = -inf` (the identities
of min / max). The scores never test the bounds for that: `quest_page_scores` takes the
valid pages (`valid_pages`, from the positions: 1/64 of the bounds' bytes) and writes -inf
at the others, whatever their bounds give (NaN from `0 * inf`).

FP8 bounds (`bound_codes`): a cache may keep the bounds as float8 codes with one power-of-two
scale per (page, kv head), `kmin >= lo * scale`, `kmax <= hi * scale` (kmin rounded down, kmax
up in the scaled grid), so the score stays an upper bound of every logit of the page; it
halves the bytes the scoring reads (`D + 2` bytes per bound pair and page / head instead of
`2 D`). Empty pages are `lo = fmax > hi = -fmax`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.decode.api import decode_attention
from pallas_kernels.indexer import top_k_set
from pallas_kernels.indexer.api import TOPK_BACKENDS
from pallas_kernels.indexer.select import TILED_MIN_ROWS, TopkSelectConfig, takes_whole_row
from pallas_kernels.page_scores import page_scores
from sparse_jax.ops import selection
from sparse_jax.ops.dsa import power_of_two_scale

ALWAYS_OPTIONS = ("first", "last")
# The radix select's tiles for page rows (a few thousand pages, B x Hkv rows): 2048-column tiles
# and 8 warps (H100, B16 x Hkv 8 rows of 8192 pages, k 512: 79.3 us vs 138 for the indexer's
# default tiles and 138 for lax.top_k; the same sets), from `TILED_MIN_ROWS` rows where the
# kernel's own whole-row form (`select.takes_whole_row`: up to 255 rows of 16K pages) does not apply.
PAGE_TOPK_CONFIG = TopkSelectConfig(block_s=2048, num_warps=8)
BOUND_CODE_DTYPES = ("float8_e4m3fn", "float8_e5m2")     # sign-magnitude with -0: `_round_up`'s bit step


def _check_page_size(page_size):
    if not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")


def num_pages(seq_len: int, page_size: int) -> int:
    return -(-seq_len // page_size)


def page_bounds(k, kv_positions, page_size: int):
    """Per-page elementwise key bounds.

    Args:
      k: `[B, S, Hkv, D]` keys, slot-indexed; kv_positions: int `[B, S]`, negative = empty
        slot (ignored); page_size: slots per page (S need not be a multiple: the last page is
        partial).
    Returns:
      `(kmin, kmax)`, each `[B, Hkv, P, D]` in k's dtype, `P = ceil(S / page_size)`; empty
      pages hold `+inf` / `-inf`.
    """
    _check_page_size(page_size)
    if k.ndim != 4:
        raise ValueError(f"k must be [B, S, Hkv, D], got shape {k.shape}")
    b, s, hkv, d = k.shape
    if jnp.shape(kv_positions) != (b, s):
        raise ValueError(f"kv_positions must be int [{b}, {s}], got shape {jnp.shape(kv_positions)}")
    p = num_pages(s, page_size)
    pad = p * page_size - s
    valid = jnp.pad(kv_positions >= 0, ((0, 0), (0, pad)))[..., None, None]
    kp = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    kmin = jnp.where(valid, kp, jnp.inf).reshape(b, p, page_size, hkv, d).min(2)
    kmax = jnp.where(valid, kp, -jnp.inf).reshape(b, p, page_size, hkv, d).max(2)
    return tuple(jnp.swapaxes(x, 1, 2).astype(k.dtype) for x in (kmin, kmax))


def check_bounds_dtype(bounds_dtype, cache_dtype):
    """The dtype a cache keeps its page bounds in: `cache_dtype` for None (or `cache_dtype`
    itself), else one of `BOUND_CODE_DTYPES`; anything else: ValueError."""
    if bounds_dtype is None or jnp.dtype(bounds_dtype) == jnp.dtype(cache_dtype):
        return jnp.dtype(cache_dtype)
    if jnp.dtype(bounds_dtype).name not in BOUND_CODE_DTYPES:
        raise ValueError(f"bounds_dtype must be None (the cache dtype, {jnp.dtype(cache_dtype).name}) or one of "
                         f"{BOUND_CODE_DTYPES}, got {bounds_dtype!r}")
    return jnp.dtype(bounds_dtype)


def _round_up(x, dtype):
    """The least value of float8 `dtype` >= `x` (float32, |x| <= the type's max): round to
    nearest, then one step up the (sign-magnitude) bit pattern where that fell below x."""
    c = x.astype(dtype)
    cf = c.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(c, jnp.uint8)
    step = jnp.where(cf > 0, bits + 1, jnp.where(cf < 0, bits - 1, jnp.uint8(1)))   # +-0 -> least subnormal
    return jnp.where(cf < x, jax.lax.bitcast_convert_type(step.astype(jnp.uint8), dtype), c)


def bound_codes(kmin, kmax, dtype):
    """Page bounds `kmin, kmax [..., D]` as a cache keeps them in `dtype`: `(lo, hi, scale)`.

    float8 `dtype` (`BOUND_CODE_DTYPES`): `lo, hi [..., D]` in `dtype` and `scale [..., 1]`
    bfloat16, the least power of two with `max|bounds| / scale <= fmax` (`dsa.
    power_of_two_scale`; exponents of bfloat16's normal range, exact), `lo = kmin / scale`
    rounded down, `hi = kmax / scale` rounded up, so `lo * scale <= kmin`, `hi * scale >= kmax`
    and the Quest bound from `(lo, hi)` is at least the one from `(kmin, kmax)`. Empty
    entries (`kmax < kmin`, i.e. +-inf) become `lo = fmax`, `hi = -fmax`, scale 1.
    `dtype == kmin.dtype`: the bounds themselves and a width-0 scale.
    """
    dtype = check_bounds_dtype(dtype, kmin.dtype)
    if dtype == kmin.dtype:
        return kmin, kmax, jnp.zeros(kmin.shape[:-1] + (0,), dtype)
    fmax = float(jnp.finfo(dtype).max)
    lo, hi = kmin.astype(jnp.float32), kmax.astype(jnp.float32)
    empty = hi[..., :1] < lo[..., :1]
    amax = jnp.where(empty, 1.0, jnp.maximum(jnp.abs(lo), jnp.abs(hi)).max(-1, keepdims=True))
    scale = power_of_two_scale(amax, fmax, -126, 127)
    lo = jnp.where(empty, jnp.asarray(fmax, dtype), -_round_up(-lo / scale, dtype))
    hi = jnp.where(empty, jnp.asarray(-fmax, dtype), _round_up(hi / scale, dtype))
    return lo, hi, scale.astype(jnp.bfloat16)


def valid_pages(kv_positions, page_size: int, q_positions=None):
    """bool `[B, P]`: pages holding at least one key (visible to some query of
    `q_positions [B, Tq]`, i.e. position <= the newest query's, when given)."""
    _check_page_size(page_size)
    b, s = kv_positions.shape
    p = num_pages(s, page_size)
    ok = kv_positions >= 0
    if q_positions is not None:
        ok = ok & (kv_positions <= jnp.max(q_positions, axis=1, keepdims=True))
    return jnp.pad(ok, ((0, 0), (0, p * page_size - s))).reshape(b, p, page_size).any(-1)


def quest_page_scores(q, kmin, kmax, valid_pages, *, scale=None, bound_scale=None, impl: str = "xla",
                      interpret: bool = False):
    """Quest upper bound of the logits of each page, `[B, Hkv, P]` float32.

    Per query head and token: `scale * sum_i max(q_i kmax_i, q_i kmin_i)`. GQA and Tq > 1:
    the *max* over the group's `H / Hkv` heads and the Tq tokens, so the kv head's score is
    still an upper bound of every logit any of its queries can reach in the page (the
    group then shares one selection, as the decode kernel's block lists are per kv head).
    Pages not in `valid_pages` score -inf (their bounds are not read for it).

    Args:
      q: `[B, Tq, H, D]`; kmin, kmax: `[B, Hkv, P, D]` (`page_bounds`, or float8 codes of
        `bound_codes`); valid_pages: bool `[B, P]` (`valid_pages`; a page marked valid must
        hold a key: an empty page's +-inf bounds score NaN); scale: default `1/sqrt(D)` (the
        attention logit scale, so `softmax` of the scores is a mass estimate); bound_scale:
        `[B, Hkv, P, 1]` (`bound_codes`, the bounds are `kmin * bound_scale`, `kmax *
        bound_scale`; needed with float8 codes), None or width 0: none.
      impl: the `pallas_kernels.page_scores` op's backend: "xla" (two batched dots; the
        default: the Triton kernel is correct on an H200 but no faster there), "triton" (one
        pass over the bounds), "auto"; interpret: the kernel in interpret mode.
    """
    if q.ndim != 4 or kmin.ndim != 4 or kmin.shape != kmax.shape:
        raise ValueError(f"q must be [B, Tq, H, D] and kmin/kmax equal [B, Hkv, P, D]; got "
                         f"{q.shape}, {kmin.shape}, {kmax.shape}")
    b, tq, h, d = q.shape
    hkv = kmin.shape[1]
    if kmin.shape[0] != b or kmin.shape[3] != d or h % hkv:
        raise ValueError(f"q {q.shape} does not fit kmin/kmax {kmin.shape} (batch, head_dim, "
                         f"num_heads a multiple of num_kv_heads)")
    if jnp.shape(valid_pages) != (b, kmin.shape[2]) or jnp.result_type(valid_pages) != jnp.bool_:
        raise ValueError(f"valid_pages must be bool [{b}, {kmin.shape[2]}], got "
                         f"{jnp.result_type(valid_pages)}{list(jnp.shape(valid_pages))}")
    coded = jnp.dtype(kmin.dtype).name in BOUND_CODE_DTYPES
    if bound_scale is not None and bound_scale.shape[-1] == 0:
        bound_scale = None
    if coded != (bound_scale is not None) or (coded and bound_scale.shape != kmin.shape[:-1] + (1,)):
        raise ValueError(f"float8 bounds need bound_scale [B, Hkv, P, 1] (bound_codes), other bounds none; got "
                         f"bounds {kmin.dtype}, bound_scale {None if bound_scale is None else bound_scale.shape}")
    return page_scores(q, kmin, kmax, valid_pages, bound_scale, scale=scale, impl=impl, interpret=interpret)


def _check_scores(scores, valid_pages_):
    if scores.ndim != 3:
        raise ValueError(f"scores must be [B, Hkv, P], got shape {scores.shape}")
    b, _, p = scores.shape
    if jnp.shape(valid_pages_) != (b, p):
        raise ValueError(f"valid_pages must be bool [{b}, {p}], got shape {jnp.shape(valid_pages_)}")


def _forced(valid, always):
    """bool `[B, P]`: the pages `always` names (first / last valid page)."""
    for a in always:
        if a not in ALWAYS_OPTIONS:
            raise ValueError(f"always must hold options among {ALWAYS_OPTIONS}, got {always!r}")
    p = valid.shape[1]
    ar = jnp.arange(p)
    out = jnp.zeros(valid.shape, bool)
    if "first" in always:
        first = jnp.argmax(valid, axis=1)
        out = out | (ar[None] == first[:, None])
    if "last" in always:
        last = p - 1 - jnp.argmax(valid[:, ::-1], axis=1)
        out = out | (ar[None] == last[:, None])
    return out & valid


def select_top_pages(scores, budget_pages: int, valid_pages, always=ALWAYS_OPTIONS, *, impl: str = "auto",
                     interpret=False):
    """Top-`budget_pages` valid pages per (batch, kv head), in the decode kernel's format.

    Args:
      scores: `[B, Hkv, P]` (`quest_page_scores`); budget_pages: int >= 1;
      valid_pages: bool `[B, P]`; always: options among ("first", "last"): the first valid
        page (attention sinks) and the last valid page (the newest tokens) are taken
        whatever their score, within the budget.
      impl: the top-k's backend (`pallas_kernels.indexer.top_k_set`: on a GPU the radix
        select kernel, in its whole-row form where `select.takes_whole_row`, else with
        `PAGE_TOPK_CONFIG`'s tiles from `TILED_MIN_ROWS` rows; elsewhere `lax.top_k`; the
        same set either way); interpret: its kernel in interpret mode.
    Returns:
      `block_indices [B, Hkv, k]` int32 (`k = min(budget_pages, P)`; the chosen ones
      ascending, then padding repeating the last), `block_counts [B, Hkv]` = number of
      valid pages chosen (`min(k, valid pages)`). Ties go to the lower page.
    """
    _check_scores(scores, valid_pages)
    if not isinstance(budget_pages, int) or budget_pages < 1:
        raise ValueError(f"budget_pages must be an int >= 1, got {budget_pages!r}")
    b, hkv, p = scores.shape
    forced = _forced(valid_pages, tuple(always))[:, None]
    s = jnp.where(valid_pages[:, None], scores.astype(jnp.float32), -jnp.inf)
    s = jnp.where(forced, jnp.inf, s)
    rows = s.reshape(b * hkv, p)
    n_rows = rows.shape[0]       # the default (whole-row form) where it applies, else these tiles
    tiles = {"triton": PAGE_TOPK_CONFIG} if n_rows >= TILED_MIN_ROWS and not takes_whole_row(n_rows, p) else {}
    config = common.config_for("top_k_set", impl, TOPK_BACKENDS, dict(scores=rows, k=budget_pages), tiles,
                               interpret=interpret)
    _, pages = top_k_set(rows, budget_pages, impl=impl, interpret=interpret, config=config)
    return selection.sorted_block_lists(pages.reshape(b, hkv, -1))           # ascending, -1 padded last


def select_top_p(scores, p: float, valid_pages, max_pages: int | None = None):
    """Smallest set of valid pages whose estimated attention mass reaches `p`.

    The mass estimate is `softmax(scores)` over the valid pages of each (batch, kv head)
    (see the module docstring); pages are taken by decreasing score until the cumulative
    estimate reaches `p` (at least one page when any is valid).

    Args:
      scores: `[B, Hkv, P]`; p: in (0, 1]; valid_pages: bool `[B, P]`; max_pages: width of
        the result and cap on the count (default P).
    Returns:
      `block_indices [B, Hkv, max_pages]`, `block_counts [B, Hkv]` as `select_top_pages`.
    """
    _check_scores(scores, valid_pages)
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p must lie in (0, 1], got {p!r}")
    width = scores.shape[-1] if max_pages is None else int(max_pages)
    if width < 1:
        raise ValueError(f"max_pages must be >= 1, got {max_pages!r}")
    width = min(width, scores.shape[-1])
    s = jnp.where(valid_pages[:, None], scores.astype(jnp.float32), -jnp.inf)
    vals, order = jax.lax.top_k(s, scores.shape[-1])                # descending
    top = jnp.where(jnp.isfinite(vals[..., :1]), vals[..., :1], 0.0)
    w = jnp.where(jnp.isfinite(vals), jnp.exp(vals - top), 0.0)
    mass = w / jnp.maximum(w.sum(-1, keepdims=True), 1e-30)
    before = jnp.cumsum(mass, -1) - mass                            # mass of the better pages
    counts = ((before < p) & (w > 0)).sum(-1)
    slot = jnp.arange(width)
    pages = jnp.where(slot < jnp.minimum(counts, width)[..., None], order[..., :width], -1)
    return selection.block_lists(pages[:, None], scores.shape[-1])


def quest_decode(q, k_cache, v_cache, kv_positions, *, page_size: int, budget_pages: int | None = None,
                 top_p: float | None = None, bounds=None, q_positions=None, always=ALWAYS_OPTIONS,
                 scale=None, num_splits=None, impl: str = "auto", interpret: bool = False):
    """Quest decode: score pages, select (top-k or top-p), attend to the selected pages.

    Args:
      q: `[B, Tq, H, D]` new queries (already written to the cache);
      k_cache, v_cache: `[B, S, Hkv, D]` slot-indexed cache; kv_positions: int `[B, S]`;
      page_size: slots per page (the decode kernel's `block_size`);
      budget_pages / top_p: exactly one; bounds: optional `(kmin, kmax)` or `(kmin, kmax,
        bound_scale)` kept by `QuestKVCache` (else computed here from the whole cache);
      q_positions: int `[B, Tq]` (default: after the newest key); always: see
        `select_top_pages` (top-k only).
    Returns:
      `out [B, Tq, H, Dv]` (decode_attention's output).
    """
    if (budget_pages is None) == (top_p is None):
        raise ValueError("pass exactly one of budget_pages and top_p")
    bounds = page_bounds(k_cache, kv_positions, page_size) if bounds is None else tuple(bounds)
    kmin, kmax, bound_scale = bounds if len(bounds) == 3 else bounds + (None,)
    if q_positions is None:
        q_positions = (jnp.max(kv_positions, axis=1)[:, None] + 1 - q.shape[1]
                       + jnp.arange(q.shape[1], dtype=jnp.int32)[None])
    valid = valid_pages(kv_positions, page_size, q_positions)
    scores = quest_page_scores(q, kmin, kmax, valid, scale=scale, bound_scale=bound_scale)
    if budget_pages is not None:
        topk_impl = impl if impl in ("xla", "triton") else "auto"
        idx, cnt = select_top_pages(scores, budget_pages, valid, always, impl=topk_impl, interpret=interpret)
    else:
        idx, cnt = select_top_p(scores, top_p, valid)
    return decode_attention(q, k_cache, v_cache, kv_positions=kv_positions, q_positions=q_positions,
                            block_indices=idx, block_counts=cnt, block_size=page_size, scale=scale,
                            num_splits=num_splits, impl=impl, interpret=interpret)
