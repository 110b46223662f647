"""Block bookkeeping shared by the `flash` kernels: padding, the element predicate, and
which KV blocks each query block must visit.

Kernels tile queries in blocks of `block_q` and keys in blocks of `block_k`. For each
(batch, query block, kv block) we decide, from the *positions* (not a static causal
assumption, so decode offsets, packed sequences and padding are handled), whether the
block may hold a visible element ("present") and whether every element in it is visible
("full", no element mask needed). The decision is an interval evaluation of the mask
predicate: the predicate is called on `_Interval` stand-ins for the per-block
`[min, max]` of the positions (and segment ids), and its integer ops and comparisons are
evaluated soundly in interval arithmetic, giving a three-valued answer (may-be-true,
surely-true). Causal, windows, sinks, chunks, segments and their unions/intersections
come out exact or conservative; any predicate the stand-ins cannot evaluate (hashes,
jnp calls) falls back to "present, partial" everywhere, which is always correct.

The kernels consume, per query block, `[lo, flo, fhi, hi]`: visit KV blocks `lo..hi-1`,
of which `flo..fhi-1` (the longest run of full blocks) skip the element mask. Causal
attention therefore visits about half the blocks and masks only the diagonal ones
(FlashAttention-2, arXiv 2307.08691, Sec. 3.1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def pow2_block(requested: int, length: int, minimum: int = 16) -> int:
    """`requested` capped to the next power of two >= `length` (tiny inputs, tiny blocks)."""
    return max(minimum, min(requested, int(pl_next_pow2(length))))


def pl_next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def pad_axis(x, length: int, axis: int, value=0):
    if x is None or x.shape[axis] == length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def visible(mask_fn, q_pos, kv_pos, q_seg, kv_seg):
    """Element predicate inside a kernel: broadcast `q_pos [bq, 1]`, `kv_pos [1, bk]`."""
    vis = (q_pos >= 0) & (kv_pos >= 0)
    if mask_fn is not None:
        vis = vis & mask_fn(q_pos, kv_pos, q_seg, kv_seg)
    if q_seg is not None:
        vis = vis & (q_seg == kv_seg)
    return vis


# ----------------------------------------------------------------------------- intervals


class _Unsupported(Exception):
    pass


class _Tri:
    """Three-valued boolean over blocks: `any` (may be true somewhere), `all` (surely true)."""

    __array_ufunc__ = None
    __hash__ = None

    def __init__(self, any_, all_):
        self.any, self.all = any_, all_

    def __and__(self, o):
        o = _tri(o)
        return _Tri(self.any & o.any, self.all & o.all)

    def __or__(self, o):
        o = _tri(o)
        return _Tri(self.any | o.any, self.all | o.all)

    __rand__, __ror__ = __and__, __or__

    def __invert__(self):
        return _Tri(~self.all, ~self.any)

    def __bool__(self):
        raise _Unsupported("data-dependent Python control flow in a mask predicate")


def _tri(x):
    if isinstance(x, _Tri):
        return x
    if isinstance(x, (bool, np.bool_)):
        return _Tri(jnp.asarray(bool(x)), jnp.asarray(bool(x)))
    raise _Unsupported(f"cannot combine {type(x).__name__} with a block predicate")


class _Interval:
    """Integer interval `[lo, hi]` (arrays) standing in for a block of positions."""

    __array_ufunc__ = None
    __hash__ = None

    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi

    @staticmethod
    def of(x):
        if isinstance(x, _Interval):
            return x
        if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
            return _Interval(int(x), int(x))
        raise _Unsupported(f"cannot use {type(x).__name__} in interval arithmetic")

    def __add__(self, o):
        o = _Interval.of(o)
        return _Interval(self.lo + o.lo, self.hi + o.hi)

    __radd__ = __add__

    def __neg__(self):
        return _Interval(-self.hi, -self.lo)

    def __sub__(self, o):
        return self + (-_Interval.of(o))

    def __rsub__(self, o):
        return _Interval.of(o) + (-self)

    def __mul__(self, o):
        if isinstance(o, (int, np.integer)) and not isinstance(o, bool):
            o = int(o)
            return _Interval(self.lo * o, self.hi * o) if o >= 0 else _Interval(self.hi * o, self.lo * o)
        o = _Interval.of(o)
        c = [self.lo * o.lo, self.lo * o.hi, self.hi * o.lo, self.hi * o.hi]
        return _Interval(jnp.minimum(jnp.minimum(c[0], c[1]), jnp.minimum(c[2], c[3])),
                         jnp.maximum(jnp.maximum(c[0], c[1]), jnp.maximum(c[2], c[3])))

    __rmul__ = __mul__

    def __floordiv__(self, o):
        if isinstance(o, (int, np.integer)) and not isinstance(o, bool) and o > 0:
            return _Interval(self.lo // int(o), self.hi // int(o))
        raise _Unsupported("floor division by a non-positive or non-constant divisor")

    def __mod__(self, o):
        if isinstance(o, (int, np.integer)) and not isinstance(o, bool) and o > 0:
            o = int(o)
            same = (self.lo // o) == (self.hi // o)
            return _Interval(jnp.where(same, self.lo % o, 0), jnp.where(same, self.hi % o, o - 1))
        raise _Unsupported("modulo by a non-positive or non-constant divisor")

    def __abs__(self):
        lo = jnp.where(self.lo >= 0, self.lo, jnp.where(self.hi <= 0, -self.hi, 0))
        hi = jnp.maximum(jnp.abs(self.lo), jnp.abs(self.hi))
        return _Interval(lo, hi)

    def __lt__(self, o):
        o = _Interval.of(o)
        return _Tri(self.lo < o.hi, self.hi < o.lo)

    def __le__(self, o):
        o = _Interval.of(o)
        return _Tri(self.lo <= o.hi, self.hi <= o.lo)

    def __gt__(self, o):
        return _Interval.of(o) < self

    def __ge__(self, o):
        return _Interval.of(o) <= self

    def __eq__(self, o):
        o = _Interval.of(o)
        return _Tri((self.lo <= o.hi) & (o.lo <= self.hi),
                    (self.lo == self.hi) & (o.lo == o.hi) & (self.lo == o.lo))

    def __ne__(self, o):
        return ~(self == o)

    def __bool__(self):
        raise _Unsupported("data-dependent Python control flow in a mask predicate")


def _block_interval(x, valid, block, axis_shape):
    """Per-block [min, max] of `x [B, T]` over valid elements, reshaped for broadcasting."""
    b, t = x.shape
    big = jnp.iinfo(jnp.int32).max
    xb = x.reshape(b, t // block, block)
    vb = valid.reshape(b, t // block, block)
    lo = jnp.where(vb, xb, big).min(-1).reshape(axis_shape(b, t // block))
    hi = jnp.where(vb, xb, -big).max(-1).reshape(axis_shape(b, t // block))
    return _Interval(lo, hi)


def block_tables(mask_fn, q_pos, kv_pos, q_seg, kv_seg, block_q: int, block_k: int):
    """present, full: bool `[B, nQ, nK]` for padded positions `[B, Tq_p]`, `[B, Tk_p]`."""
    b, tq = q_pos.shape
    tk = kv_pos.shape[1]
    nq, nk = tq // block_q, tk // block_k
    q_valid, k_valid = q_pos >= 0, kv_pos >= 0
    as_q = lambda b_, n: (b_, n, 1)  # noqa: E731
    as_k = lambda b_, n: (b_, 1, n)  # noqa: E731
    qi = _block_interval(q_pos, q_valid, block_q, as_q)
    ki = _block_interval(kv_pos, k_valid, block_k, as_k)
    qs = None if q_seg is None else _block_interval(q_seg.astype(jnp.int32), q_valid, block_q, as_q)
    ks = None if kv_seg is None else _block_interval(kv_seg.astype(jnp.int32), k_valid, block_k, as_k)
    shape = (b, nq, nk)
    try:
        tri = _Tri(jnp.asarray(True), jnp.asarray(True))
        if mask_fn is not None:
            tri = tri & _tri(mask_fn(qi, ki, qs, ks))
        if qs is not None:
            tri = tri & _tri(qs == ks)
        may, surely = jnp.broadcast_to(tri.any, shape), jnp.broadcast_to(tri.all, shape)
    except Exception:  # noqa: BLE001 - any predicate we cannot bound: visit every block
        may, surely = jnp.ones(shape, bool), jnp.zeros(shape, bool)
    q_any = q_valid.reshape(b, nq, block_q).any(-1)[:, :, None]
    k_any = k_valid.reshape(b, nk, block_k).any(-1)[:, None, :]
    q_all = q_valid.reshape(b, nq, block_q).all(-1)[:, :, None]
    k_all = k_valid.reshape(b, nk, block_k).all(-1)[:, None, :]
    present = may & q_any & k_any
    full = surely & q_all & k_all & present
    return present, full


def visit_ranges(present, full):
    """`[..., n]` flags -> int32 `[..., 4]`: (lo, flo, fhi, hi) as described above."""
    n = present.shape[-1]
    j = jnp.arange(n, dtype=jnp.int32)
    has = present.any(-1)
    lo = jnp.where(has, jnp.argmax(present, -1), 0).astype(jnp.int32)
    hi = jnp.where(has, n - jnp.argmax(present[..., ::-1], -1), 0).astype(jnp.int32)
    last_partial = jax.lax.cummax(jnp.where(full, -1, j), axis=present.ndim - 1)
    run = jnp.where(full, j - last_partial, 0)
    best = jnp.max(run, -1).astype(jnp.int32)
    fhi = jnp.where(best > 0, jnp.argmax(run, -1) + 1, hi).astype(jnp.int32)
    flo = fhi - best
    return jnp.stack([lo, flo, fhi, hi], -1)


def tables(mask_fn, q_pos, kv_pos, q_seg, kv_seg, block_q: int, block_k: int,
           transpose: bool = False):
    """int32 `[B, nQ, 4]` ranges of KV blocks per query block (or `[B, nK, 4]` of query
    blocks per KV block with `transpose=True`)."""
    present, full = block_tables(mask_fn, q_pos, kv_pos, q_seg, kv_seg, block_q, block_k)
    if transpose:
        present, full = present.swapaxes(1, 2), full.swapaxes(1, 2)
    return visit_ranges(present, full)
