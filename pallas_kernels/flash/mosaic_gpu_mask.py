"""Mask arithmetic of the Mosaic GPU `flash` kernels, as pure functions (CPU-testable).

The kernels never read positions: the mask is static. Query row `r` sits at position `r`
(`arange`, padded rows continue it); key `j` sits at position `stride * j + offset` (the
default `arange` is stride 1, offset 0; NSA's compressed keys carry their block's last
token, `d * j + l - 1`), and keys `j >= kv_len` are padding, never visible. With
`causal`, row r sees key j iff `pos(j) <= r` (and `r - pos(j) < window` for a causal
window); without, it sees every valid key. Key positions increase with j, so row r sees
the run of keys `[first(r), seen(r))`, and a block of rows or keys sees a run of tiles:
`kv_tiles` / `q_tiles` give, per block, the tiles to visit `[lo, hi)` and the mask-free
run `[full_lo, full_hi)` inside them (every element visible: no element mask).

Every function takes int32 scalars or arrays (traced inside a kernel, concrete in tests)
and uses only `min`, `max`, `lax.div` on non-negative numerators, `+`, `*` and compares,
which the Mosaic GPU lowering covers.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax


def _i32(x):
    return jnp.asarray(x, jnp.int32)


def _div(x, m: int):
    """floor(x / m) for x >= 0."""
    return lax.div(_i32(x), jnp.int32(m))


def _cdiv(x, m: int):
    """ceil(x / m) for x >= 0."""
    return lax.div(_i32(x) + (m - 1), jnp.int32(m))


def _at_least(x, y):
    """int 1 where x >= y, else 0."""
    return jnp.minimum(jnp.maximum(_i32(x) - y + 1, 0), 1)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static mask of one call (hashable).

    kv_len: valid keys (keys `>= kv_len` are padding). causal / window: as above (window
    implies causal). stride >= 1, offset >= 0: key j at position `stride * j + offset`.
    """

    kv_len: int
    causal: bool = False
    window: int | None = None
    stride: int = 1
    offset: int = 0

    def __post_init__(self):
        if self.kv_len < 1 or self.stride < 1 or self.offset < 0:
            raise ValueError(f"MaskSpec needs kv_len >= 1, stride >= 1, offset >= 0: {self}")
        if self.window is not None and (self.window < 1 or not self.causal):
            raise ValueError(f"MaskSpec: a window must be >= 1 and causal: {self}")

    def key_position(self, j):
        """Position of key j (`stride * j + offset`)."""
        pos = j if self.stride == 1 else j * self.stride
        return pos + self.offset if self.offset else pos

    def visible(self, q_pos, kv_idx):
        """bool, broadcast: query at position `q_pos` sees key index `kv_idx`."""
        vis = kv_idx < self.kv_len
        if self.causal:
            kv_pos = self.key_position(kv_idx)
            vis = vis & (kv_pos <= q_pos)
            if self.window is not None:
                vis = vis & (q_pos - kv_pos < self.window)
        return vis

    def _seen_causal(self, r):
        """Keys at or before position r (clipped to the valid keys)."""
        return jnp.minimum(_div(jnp.maximum(_i32(r) - self.offset + self.stride, 0), self.stride),
                           self.kv_len)

    def seen(self, r):
        """End of the run of keys row r sees (exclusive)."""
        return self._seen_causal(r) if self.causal else _i32(self.kv_len) + 0 * _i32(r)

    def first(self, r):
        """Start of the run of keys row r sees (when it sees any)."""
        if self.window is not None:
            return self._seen_causal(_i32(r) - self.window)
        return 0 * _i32(r)

    def kv_tiles(self, r0, rows: int, block: int):
        """KV tiles of `block` keys for query rows `r0 .. r0 + rows - 1`: int32
        `(lo, full_lo, full_hi, hi)`, visit `[lo, hi)`, mask-free `[full_lo, full_hi)`.
        `[lo, hi)` holds every tile with a visible element (and one wholly invisible tile
        at most, only when no row sees any key)."""
        r1 = _i32(r0) + (rows - 1)
        lo = _div(self.first(r0), block)
        hi = jnp.maximum(_cdiv(self.seen(r1), block), lo)
        full_lo = jnp.minimum(jnp.maximum(_cdiv(self.first(r1), block), lo), hi)
        full_hi = jnp.minimum(jnp.maximum(_div(self.seen(r0), block), full_lo), hi)
        return lo, full_lo, full_hi, hi

    def q_tiles(self, k0, keys: int, block: int, n_tiles: int):
        """Query tiles of `block` rows (of `n_tiles`) for keys `k0 .. k0 + keys - 1`: int32
        `(lo, full_lo, full_hi, hi)` as in `kv_tiles`. A causal block whose keys are all
        padding visits nothing; without a window, the tiles from the first visible row on
        are visited (a block of padded keys only when `keys` spans a whole padding)."""
        k0 = _i32(k0)
        k_end = k0 + (keys - 1)
        empty = _at_least(k0, self.kv_len)                 # every key of the block is padding
        padded = _at_least(k_end, self.kv_len)             # some key is padding: none full
        if not self.causal:
            lo = jnp.minimum(n_tiles * empty, n_tiles)
            return lo, jnp.minimum(lo + n_tiles * padded, n_tiles), _i32(n_tiles), _i32(n_tiles)
        pos0 = self.key_position(k0)
        lo = jnp.minimum(_div(pos0, block) + n_tiles * empty, n_tiles)
        hi = _i32(n_tiles)
        if self.window is not None:
            pos_last = self.key_position(jnp.minimum(k_end, self.kv_len - 1))
            hi = jnp.minimum(_cdiv(pos_last + self.window, block), n_tiles)
        hi = jnp.maximum(hi, lo)
        full_lo = jnp.minimum(jnp.maximum(
            _cdiv(self.key_position(k_end), block) + n_tiles * padded, lo), hi)
        full_hi = hi
        if self.window is not None:
            full_hi = jnp.minimum(_div(pos0 + self.window, block), hi)
        full_hi = jnp.maximum(full_hi, full_lo)
        return lo, full_lo, full_hi, hi


def walk_tiles(tiles, step, carry):
    """`carry = step(j, carry, masked)` for the tiles `j` in `[lo, hi)` of `tiles = (lo,
    full_lo, full_hi, hi)` (`MaskSpec.kv_tiles` / `q_tiles`), in order, with `masked` (a
    Python bool: the element mask is traced only where needed) False on `[full_lo,
    full_hi)`; returns the last carry."""
    lo, full_lo, full_hi, hi = tiles
    carry = lax.fori_loop(lo, full_lo, lambda j, cr: step(j, cr, True), carry)
    carry = lax.fori_loop(full_lo, full_hi, lambda j, cr: step(j, cr, False), carry)
    return lax.fori_loop(full_hi, hi, lambda j, cr: step(j, cr, True), carry)
