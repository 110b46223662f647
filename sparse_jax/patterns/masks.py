"""Composable attention predicates: which key position each query position may see.

A pattern is a frozen (hashable) dataclass that maps query and key *positions* to a
boolean: `pattern(q_pos, kv_pos, q_seg, kv_seg)` on broadcastable integer arrays. The
same predicate serves three consumers:

* references build dense masks from it (`dense_mask`),
* `sparse_jax.patterns.metadata` turns it into block-sparse metadata,
* kernels evaluate it on index tiles for partial blocks (only integer ops and
  comparisons are used, so it traces inside Pallas kernels as well as in numpy).

Negative positions mark padding: a padded query sees nothing and a padded key is seen by
nobody, whatever the pattern (applied in `dense_mask` and in every kernel).

Patterns compose with `|` (union), `&` (intersection) and `~` (complement), like FlexAttention's mask_mod
and splash attention's `LogicalOr` / `LogicalAnd`. Papers:

* sliding window: Mistral (arXiv 2310.06825); sinks: StreamingLLM (arXiv 2309.17453);
* strided / fixed: Sparse Transformer (arXiv 1904.10509);
* dilated window + global tokens: Longformer (arXiv 2004.05150);
* window + global + random blocks: BigBird (arXiv 2007.14062).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any  # numpy or jax array of integers / booleans


def _check_positive(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class Pattern:
    """Base class: subclasses implement `_visible(q, k, qs, ks)` on broadcast arrays."""

    #: True when the predicate reads segment ids.
    needs_segments: bool = False
    #: True only for the plain causal predicate `s <= t` (kernels that hard-code
    #: causality, e.g. `pallas_kernels.flash.mosaic_gpu`, read it instead of the class).
    is_causal: bool = False

    @property
    def causal_window_size(self) -> int | None:
        """`w` when this predicate is exactly the causal sliding window `t - w < s <= t`
        (`causal_window(w)`), else None; kernels that hard-code the window read it."""
        return None

    def __call__(self, q_pos: Array, kv_pos: Array, q_seg: Array | None = None,
                 kv_seg: Array | None = None) -> Array:
        """Element predicate on broadcastable position (and segment id) arrays."""
        if self.needs_segments and (q_seg is None or kv_seg is None):
            raise ValueError(f"{self!r} needs q_segment_ids and kv_segment_ids, got None")
        return self._visible(q_pos, kv_pos, q_seg, kv_seg)

    def _visible(self, q, k, qs, ks):  # pragma: no cover - abstract
        raise NotImplementedError

    def __or__(self, other: Pattern) -> Pattern:
        return Union((self, other))

    def __and__(self, other: Pattern) -> Pattern:
        return Intersection((self, other))

    def __invert__(self) -> Pattern:
        return Not(self)


@dataclasses.dataclass(frozen=True)
class _Combination(Pattern):
    """Member patterns folded left to right with `combine` (`|` or `&`)."""

    parts: tuple[Pattern, ...]

    @property
    def needs_segments(self) -> bool:
        return any(p.needs_segments for p in self.parts)

    def _visible(self, q, k, qs, ks):
        out = self.parts[0](q, k, qs, ks)
        for p in self.parts[1:]:
            out = self.combine(out, p(q, k, qs, ks))
        return out


@dataclasses.dataclass(frozen=True)
class Union(_Combination):
    """Visible if any member pattern makes it visible."""

    combine = staticmethod(operator.or_)


@dataclasses.dataclass(frozen=True)
class Intersection(_Combination):
    """Visible only if every member pattern makes it visible."""

    combine = staticmethod(operator.and_)

    @property
    def causal_window_size(self) -> int | None:
        if len(self.parts) == 2:
            a, b = self.parts
            for x, y in ((a, b), (b, a)):
                if x.is_causal and y.causal_window_size is not None:
                    return y.causal_window_size
        return None


@dataclasses.dataclass(frozen=True)
class Not(Pattern):
    """Visible where `part` is not (padding stays invisible: `dense_mask` masks it)."""

    part: Pattern

    @property
    def needs_segments(self) -> bool:
        return self.part.needs_segments

    def _visible(self, q, k, qs, ks):
        return ~self.part(q, k, qs, ks)


@dataclasses.dataclass(frozen=True)
class Full(Pattern):
    """Every key visible (bidirectional dense attention)."""

    def _visible(self, q, k, qs, ks):
        return (q >= k) | (q < k)


@dataclasses.dataclass(frozen=True)
class Causal(Pattern):
    """Key s visible to query t iff s <= t."""

    is_causal = True   # a class attribute, not a dataclass field

    def _visible(self, q, k, qs, ks):
        return k <= q


@dataclasses.dataclass(frozen=True)
class SlidingWindow(Pattern):
    """Window of `left` keys ending at the query (itself included) and `right` after it.

    Visible iff `t - left < s <= t + right`. `SlidingWindow(w)` is Mistral's causal
    window of w tokens when intersected with `Causal()` (or with right=0 on its own).
    """

    left: int
    right: int = 0

    def __post_init__(self):
        _check_positive("window (left)", self.left)
        _check_positive("window right", self.right, minimum=0)

    @property
    def causal_window_size(self) -> int | None:
        return self.left if self.right == 0 else None

    def _visible(self, q, k, qs, ks):
        return (q - k < self.left) & (k - q <= self.right)


@dataclasses.dataclass(frozen=True)
class Sinks(Pattern):
    """The first `num_sinks` positions are visible to every query (StreamingLLM sinks)."""

    num_sinks: int

    def __post_init__(self):
        _check_positive("num_sinks", self.num_sinks, minimum=0)

    def _visible(self, q, k, qs, ks):
        return k < self.num_sinks


@dataclasses.dataclass(frozen=True)
class GlobalTokens(Pattern):
    """The first `num_global` positions see every key and are seen by every query."""

    num_global: int

    def __post_init__(self):
        _check_positive("num_global", self.num_global, minimum=0)

    def _visible(self, q, k, qs, ks):
        return (k < self.num_global) | (q < self.num_global)


@dataclasses.dataclass(frozen=True)
class Chunked(Pattern):
    """Query and key in the same chunk of `chunk` positions (chunked local attention)."""

    chunk: int

    def __post_init__(self):
        _check_positive("chunk", self.chunk)

    def _visible(self, q, k, qs, ks):
        return (q // self.chunk) == (k // self.chunk)


@dataclasses.dataclass(frozen=True)
class DilatedWindow(Pattern):
    """Longformer's dilated window: keys at distances 0, d, 2d, ... within w*d.

    Visible iff `-right*d <= t - s < left*d` and `(t - s) % d == 0`; with dilation 1 this
    is `SlidingWindow(left, right)`.
    """

    left: int
    dilation: int = 1
    right: int = 0

    def __post_init__(self):
        _check_positive("window (left)", self.left)
        _check_positive("dilation", self.dilation)
        _check_positive("window right", self.right, minimum=0)

    def _visible(self, q, k, qs, ks):
        d = q - k
        return (d < self.left * self.dilation) & (-d <= self.right * self.dilation) & (
            d % self.dilation == 0)


@dataclasses.dataclass(frozen=True)
class Strided(Pattern):
    """Sparse Transformer strided pattern: `t - s < stride` or `(t - s) % stride == 0`.

    Intersect with `Causal()` for the autoregressive form (arXiv 1904.10509, Sec. 4.1).
    """

    stride: int

    def __post_init__(self):
        _check_positive("stride", self.stride)

    def _visible(self, q, k, qs, ks):
        d = q - k
        return ((d < self.stride) & (d > -self.stride)) | (d % self.stride == 0)


@dataclasses.dataclass(frozen=True)
class Fixed(Pattern):
    """Sparse Transformer fixed pattern: own block of `block`, plus the last `summary`
    positions of every block (intersect with `Causal()` for the autoregressive form)."""

    block: int
    summary: int = 1

    def __post_init__(self):
        _check_positive("block", self.block)
        _check_positive("summary", self.summary)
        if self.summary > self.block:
            raise ValueError(f"summary must be <= block ({self.block}), got {self.summary}")

    def _visible(self, q, k, qs, ks):
        return ((q // self.block) == (k // self.block)) | (
            k % self.block >= self.block - self.summary)


def _hash_u32(x):
    """A stateless integer hash (lowbias32) that gives identical results in numpy and jnp."""
    if isinstance(x, jax.Array):
        x = x.astype(jnp.uint32)
        c1, c2 = jnp.uint32(0x7FEB352D), jnp.uint32(0x846CA68B)
    else:
        x = np.asarray(x).astype(np.uint32)
        c1, c2 = np.uint32(0x7FEB352D), np.uint32(0x846CA68B)
    with np.errstate(over="ignore"):
        x = x ^ (x >> 16)
        x = x * c1
        x = x ^ (x >> 15)
        x = x * c2
        x = x ^ (x >> 16)
    return x


@dataclasses.dataclass(frozen=True)
class RandomBlocks(Pattern):
    """BigBird's random blocks: each query block sees `num_random` seeded key blocks.

    Stateless: the r-th random key block of query block `qb` is
    `hash(seed, qb, r) % num_choices`, where `num_choices = qb + 1` (causal: only
    blocks at or before the query's) or `num_blocks` (bidirectional, required then).
    """

    block: int
    num_random: int
    seed: int = 0
    causal: bool = True
    num_blocks: int | None = None

    def __post_init__(self):
        _check_positive("block", self.block)
        _check_positive("num_random", self.num_random, minimum=0)
        if not self.causal and (self.num_blocks is None or self.num_blocks < 1):
            raise ValueError(
                f"num_blocks must be an int >= 1 for bidirectional RandomBlocks, got {self.num_blocks!r}")

    def _visible(self, q, k, qs, ks):
        qb, kb = q // self.block, k // self.block
        # abs(qb) + 1 == qb + 1 for real blocks and stays >= 1 on padding (qb < 0).
        choices = abs(qb) + 1 if self.causal else self.num_blocks
        out = k < 0  # all False, right shape after broadcasting below
        for r in range(self.num_random):
            # Python-int constant wrapped into int32 range: int32 (jnp) arrays reject larger
            # Python ints; the low 32 bits, all the hash reads, are unchanged.
            offset = (r * 7919 + self.seed * 104729 + 2**31) % 2**32 - 2**31
            key = qb * 1000003 + offset
            pick = (_hash_u32(key) % _as_u32_like(choices, key)).astype(kb.dtype)
            out = out | (kb == pick)
        return out & (qb >= 0)


def _as_u32_like(value, like):
    if isinstance(like, jax.Array) or isinstance(value, jax.Array):
        return jnp.asarray(value).astype(jnp.uint32)
    return np.asarray(value).astype(np.uint32)


@dataclasses.dataclass(frozen=True)
class SameSegment(Pattern):
    """Query and key share a segment id (packed sequences)."""

    needs_segments = True

    def _visible(self, q, k, qs, ks):
        return qs == ks


# ----------------------------------------------------------------------------- presets


def causal_window(window: int | None = None, num_sinks: int = 0, causal: bool = True) -> Pattern:
    """Causal (or bidirectional) attention, optionally limited to a window plus sinks.

    `window=None` means no window. This is the predicate of `flash` layers: full,
    sliding-window (Mistral, Gemma local) and StreamingLLM (sinks + window).
    """
    base = Causal() if causal else Full()
    if window is None:
        return base
    local = SlidingWindow(window) if causal else SlidingWindow(window, window - 1)
    if num_sinks:
        local = local | Sinks(num_sinks)
    return base & local


def sparse_transformer_strided(stride: int) -> Pattern:
    """Sparse Transformer, strided (autoregressive)."""
    return Causal() & Strided(stride)


def sparse_transformer_fixed(block: int, summary: int = 1) -> Pattern:
    """Sparse Transformer, fixed (autoregressive)."""
    return Causal() & Fixed(block, summary)


def longformer(window: int, num_global: int = 1, dilation: int = 1, causal: bool = True) -> Pattern:
    """Longformer: dilated window (left only when causal) plus global tokens."""
    right = 0 if causal else window - 1
    local = DilatedWindow(window, dilation, right) | GlobalTokens(num_global)
    return Causal() & local if causal else local


def bigbird(block: int = 64, num_window_blocks: int = 3, num_global_blocks: int = 2,
            num_random_blocks: int = 3, seed: int = 0, causal: bool = True,
            num_blocks: int | None = None) -> Pattern:
    """BigBird-ITC at block granularity: window blocks, global blocks, random blocks.

    `num_window_blocks` is odd: the query's block and (n-1)/2 neighbours each side (only
    the earlier ones survive the causal intersection).
    """
    if num_window_blocks < 1 or num_window_blocks % 2 == 0:
        raise ValueError(f"num_window_blocks must be odd and >= 1, got {num_window_blocks}")
    half = num_window_blocks // 2
    window = BlockBand(block, half)
    globals_ = GlobalTokens(num_global_blocks * block)
    random = RandomBlocks(block, num_random_blocks, seed, causal, num_blocks)
    pattern = window | globals_ | random
    return Causal() & pattern if causal else pattern


@dataclasses.dataclass(frozen=True)
class BlockBand(Pattern):
    """Key block within `half` blocks of the query block (BigBird's sliding blocks)."""

    block: int
    half: int

    def __post_init__(self):
        _check_positive("block", self.block)
        _check_positive("half", self.half, minimum=0)

    def _visible(self, q, k, qs, ks):
        d = q // self.block - k // self.block
        return (d <= self.half) & (d >= -self.half)


# ----------------------------------------------------------------------------- dense masks


def dense_mask(pattern: Pattern, q_positions: Array, kv_positions: Array,
               q_segment_ids: Array | None = None, kv_segment_ids: Array | None = None) -> Array:
    """Boolean mask `[..., Tq, Tk]` from positions `[..., Tq]` and `[..., Tk]`.

    Works on numpy arrays (numpy result) and jax arrays (traceable). Negative positions
    are padding and are never visible; when segment ids are given, keys of another
    segment are never visible either (as in the kernels), whatever the pattern.
    """
    q = q_positions[..., :, None]
    k = kv_positions[..., None, :]
    qs = None if q_segment_ids is None else q_segment_ids[..., :, None]
    ks = None if kv_segment_ids is None else kv_segment_ids[..., None, :]
    visible = pattern(q, k, qs, ks) & (q >= 0) & (k >= 0)
    if qs is not None and ks is not None:
        visible = visible & (qs == ks)
    return visible


def mask_array(pattern: Pattern, q_len: int, kv_len: int | None = None) -> np.ndarray:
    """Dense `[q_len, kv_len]` numpy mask for positions `0..q_len-1` and `0..kv_len-1`."""
    kv_len = q_len if kv_len is None else kv_len
    return np.asarray(dense_mask(pattern, np.arange(q_len), np.arange(kv_len)))
