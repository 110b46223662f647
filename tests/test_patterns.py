"""sparse_jax.patterns: predicates, presets, block metadata, pictures.

Every expected mask here comes from the test's own code (literal matrices checked by hand,
or explicit Python loops over (query, key) pairs written from the papers' definitions),
never from the library's formulas.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.block_sparse.reference import expand_block_mask
from sparse_jax.patterns import (
    BlockBand, BlockSparseMetadata, Causal, Chunked, DilatedWindow, Fixed, Full, GlobalTokens,
    Intersection, RandomBlocks, SameSegment, Sinks, SlidingWindow, Strided, Union, bigbird,
    block_metadata, causal_window, dense_mask, longformer, mask_array, plot_pattern,
    sparse_transformer_fixed, sparse_transformer_strided, static_block_metadata)

# ----------------------------------------------------------------------------- independent oracle

_M32 = 0xFFFFFFFF


def _lowbias32(x: int) -> int:
    """Chris Wellons' lowbias32 integer hash, on Python ints (the documented RandomBlocks hash)."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    x ^= x >> 16
    return x


def _random_key_blocks(p: RandomBlocks, qb: int) -> set[int]:
    """The key blocks BigBird's random attention gives query block `qb` (RandomBlocks docstring)."""
    choices = qb + 1 if p.causal else p.num_blocks
    out = set()
    for r in range(p.num_random):
        key = (qb * 1000003 + r * 7919 + p.seed * 104729) & _M32
        out.add(_lowbias32(key) % choices)
    return out


def ref_visible(p, q: int, k: int, qs=None, ks=None) -> bool:
    """Scalar oracle for one (query position, key position) pair, both >= 0."""
    if isinstance(p, Union):
        return any(ref_visible(c, q, k, qs, ks) for c in p.parts)
    if isinstance(p, Intersection):
        return all(ref_visible(c, q, k, qs, ks) for c in p.parts)
    if isinstance(p, Full):
        return True
    if isinstance(p, Causal):
        return k <= q
    if isinstance(p, SlidingWindow):
        return q - p.left < k <= q + p.right
    if isinstance(p, Sinks):
        return k < p.num_sinks
    if isinstance(p, GlobalTokens):
        return k < p.num_global or q < p.num_global
    if isinstance(p, Chunked):
        return q // p.chunk == k // p.chunk
    if isinstance(p, DilatedWindow):
        dist = q - k
        return -p.right * p.dilation <= dist < p.left * p.dilation and dist % p.dilation == 0
    if isinstance(p, Strided):
        dist = q - k
        return abs(dist) < p.stride or dist % p.stride == 0
    if isinstance(p, Fixed):
        return q // p.block == k // p.block or k % p.block >= p.block - p.summary
    if isinstance(p, BlockBand):
        return abs(q // p.block - k // p.block) <= p.half
    if isinstance(p, RandomBlocks):
        return k // p.block in _random_key_blocks(p, q // p.block)
    if isinstance(p, SameSegment):
        return qs == ks
    raise TypeError(f"no oracle for {p!r}")


def ref_mask(p, q_pos, kv_pos, q_seg=None, kv_seg=None) -> np.ndarray:
    """Dense `[Tq, Tk]` (or `[B, Tq, Tk]`) mask by explicit loops; negative = padding;
    other segments invisible when segment ids are given."""
    q_pos, kv_pos = np.asarray(q_pos), np.asarray(kv_pos)
    if q_pos.ndim == 2:
        return np.stack([ref_mask(p, q_pos[b], kv_pos[b],
                                  None if q_seg is None else q_seg[b],
                                  None if kv_seg is None else kv_seg[b])
                         for b in range(q_pos.shape[0])])
    out = np.zeros((q_pos.size, kv_pos.size), bool)
    for i, q in enumerate(q_pos.tolist()):
        if q < 0:
            continue
        for j, k in enumerate(kv_pos.tolist()):
            if k < 0:
                continue
            qs = None if q_seg is None else int(q_seg[i])
            ks = None if kv_seg is None else int(kv_seg[j])
            # Segment ids, when given, always cut at segment boundaries (whatever the pattern).
            out[i, j] = ref_visible(p, q, k, qs, ks) and (qs is None or qs == ks)
    return out


def ref_mask_len(p, tq, tk=None):
    return ref_mask(p, np.arange(tq), np.arange(tq if tk is None else tk))


def _rows(*rows: str) -> np.ndarray:
    return np.array([[c == "1" for c in r] for r in rows])


# ----------------------------------------------------------------------------- hand-checked masks

HAND_CHECKED = [
    ("causal", Causal(), 4, 4, ("1000", "1100", "1110", "1111")),
    ("full", Full(), 2, 3, ("111", "111")),
    ("window_left2_right1", SlidingWindow(2, 1), 5, 5,
     ("11000", "11100", "01110", "00111", "00011")),
    ("causal_window_2_sink1", causal_window(2, num_sinks=1), 5, 5,
     ("10000", "11000", "11100", "10110", "10011")),
    ("bidirectional_window_2", causal_window(2, causal=False), 4, 4,
     ("1100", "1110", "0111", "0011")),
    ("sinks2", Sinks(2), 2, 4, ("1100", "1100")),
    ("global1", GlobalTokens(1), 4, 4, ("1111", "1000", "1000", "1000")),
    ("global1_causal", GlobalTokens(1) & Causal(), 3, 3, ("100", "100", "100")),
    ("global1_or_diag_causal", (GlobalTokens(1) | SlidingWindow(1)) & Causal(), 3, 3,
     ("100", "110", "101")),
    ("chunked2_tq3_tk5", Chunked(2), 3, 5, ("11000", "11000", "00110")),
    ("dilated_l2_d2_r1", DilatedWindow(2, dilation=2, right=1), 6, 6,
     ("101000", "010100", "101010", "010101", "001010", "000101")),
    ("st_strided3", sparse_transformer_strided(3), 7, 7,
     ("1000000", "1100000", "1110000", "1111000", "0111100", "0011110", "1001111")),
    ("st_fixed3_1", sparse_transformer_fixed(3, 1), 6, 6,
     ("100000", "110000", "111000", "001100", "001110", "001111")),
    ("fixed4_2_bidirectional", Fixed(4, 2), 5, 8,
     ("11110011", "11110011", "11110011", "11110011", "00111111")),
    ("blockband2_half0", BlockBand(2, 0), 4, 4, ("1100", "1100", "0011", "0011")),
    ("union_ops", Sinks(1) | Chunked(3), 4, 4, ("1110", "1110", "1110", "1001")),
    ("intersection_ops", Causal() & Chunked(2) & SlidingWindow(1, 0) | Sinks(1), 3, 3,
     ("100", "110", "101")),
]


@pytest.mark.parametrize("name,pattern,tq,tk,rows", HAND_CHECKED, ids=[h[0] for h in HAND_CHECKED])
def test_hand_checked_masks(name, pattern, tq, tk, rows):
    expected = _rows(*rows)
    np.testing.assert_array_equal(mask_array(pattern, tq, tk), expected)
    # The oracle of the property tests agrees with the hand-made matrices too.
    np.testing.assert_array_equal(ref_mask_len(pattern, tq, tk), expected)


def test_same_segment_hand_checked():
    q_seg, kv_seg = np.array([0, 0, 1]), np.array([0, 1, 1, 2])
    got = dense_mask(SameSegment(), np.arange(3), np.arange(4), q_seg, kv_seg)
    np.testing.assert_array_equal(got, _rows("1000", "1000", "0110"))
    got = dense_mask(Causal() & SameSegment(), np.array([0, 1, -1]), np.arange(4), q_seg, kv_seg)
    np.testing.assert_array_equal(got, _rows("1000", "1000", "0000"))


def test_operators_build_union_and_intersection():
    a, b, c = Causal(), Sinks(2), Chunked(3)
    assert isinstance(a | b, Union) and (a | b).parts == (a, b)
    assert isinstance(a & b, Intersection) and (a & b).parts == (a, b)
    ma, mb, mc = (ref_mask_len(p, 9, 11) for p in (a, b, c))
    np.testing.assert_array_equal(mask_array(a | b | c, 9, 11), ma | mb | mc)
    np.testing.assert_array_equal(mask_array(a & (b | c), 9, 11), ma & (mb | mc))
    np.testing.assert_array_equal(mask_array(Intersection((a, b, c)), 9, 11), ma & mb & mc)


# Loop-based checks over a range of parameters, Tq != Tk included. Each expected mask is
# an explicit double loop with the paper's definition written inline.

def _loop(tq, tk, fn):
    return np.array([[bool(fn(t, s)) for s in range(tk)] for t in range(tq)], bool).reshape(tq, tk)


LOOP_CASES = []
for _w in (1, 2, 5):
    for _r in (0, 1, 3):
        LOOP_CASES.append((f"window_{_w}_{_r}", SlidingWindow(_w, _r),
                           lambda t, s, w=_w, r=_r: t - w < s <= t + r))
for _n in (0, 1, 3):
    LOOP_CASES.append((f"sinks_{_n}", Sinks(_n), lambda t, s, n=_n: s < n))
    LOOP_CASES.append((f"global_{_n}", GlobalTokens(_n), lambda t, s, n=_n: s < n or t < n))
for _c in (1, 3, 4):
    LOOP_CASES.append((f"chunked_{_c}", Chunked(_c), lambda t, s, c=_c: t // c == s // c))
for _w, _d, _r in ((1, 1, 0), (3, 2, 0), (2, 3, 2), (3, 1, 1)):
    LOOP_CASES.append((f"dilated_{_w}_{_d}_{_r}", DilatedWindow(_w, _d, _r),
                       lambda t, s, w=_w, d=_d, r=_r: any(t - s == m * d for m in range(-r, w))))
for _s in (1, 2, 3, 5):
    LOOP_CASES.append((f"strided_{_s}", Strided(_s),
                       lambda t, s, st_=_s: -st_ < t - s < st_ or (t - s) % st_ == 0))
for _b, _c in ((1, 1), (3, 1), (4, 2), (5, 5)):
    LOOP_CASES.append((f"fixed_{_b}_{_c}", Fixed(_b, _c),
                       lambda t, s, b=_b, c=_c: t // b == s // b or s % b in range(b - c, b)))
for _b, _h in ((1, 0), (3, 1), (4, 2)):
    LOOP_CASES.append((f"blockband_{_b}_{_h}", BlockBand(_b, _h),
                       lambda t, s, b=_b, h=_h: abs(t // b - s // b) <= h))
for _w, _n in ((1, 0), (3, 0), (3, 2), (6, 1)):
    LOOP_CASES.append((f"causal_window_{_w}_{_n}", causal_window(_w, _n),
                       lambda t, s, w=_w, n=_n: s <= t and (t - s < w or s < n)))
    LOOP_CASES.append((f"bidir_window_{_w}_{_n}", causal_window(_w, _n, causal=False),
                       lambda t, s, w=_w, n=_n: abs(t - s) < w or s < n))
LOOP_CASES.append(("causal_window_none", causal_window(None), lambda t, s: s <= t))
LOOP_CASES.append(("bidir_window_none", causal_window(None, causal=False), lambda t, s: True))
for _w, _g, _d in ((2, 1, 1), (3, 2, 2), (1, 0, 3)):
    LOOP_CASES.append((f"longformer_{_w}_{_g}_{_d}", longformer(_w, _g, _d),
                       lambda t, s, w=_w, g=_g, d=_d: s <= t and (
                           ((t - s) % d == 0 and t - s < w * d) or s < g or t < g)))
    LOOP_CASES.append((f"longformer_bidir_{_w}_{_g}_{_d}", longformer(_w, _g, _d, causal=False),
                       lambda t, s, w=_w, g=_g, d=_d: (
                           (t - s) % d == 0 and abs(t - s) < w * d) or s < g or t < g))
for _s in (2, 4):
    LOOP_CASES.append((f"st_strided_{_s}", sparse_transformer_strided(_s),
                       lambda t, s, k=_s: s <= t and (t - s < k or (t - s) % k == 0)))
for _b, _c in ((2, 1), (4, 3)):
    LOOP_CASES.append((f"st_fixed_{_b}_{_c}", sparse_transformer_fixed(_b, _c),
                       lambda t, s, b=_b, c=_c: s <= t and (t // b == s // b or s % b >= b - c)))


@pytest.mark.parametrize("tq,tk", [(13, 13), (7, 16), (16, 5)])
@pytest.mark.parametrize("name,pattern,fn", LOOP_CASES, ids=[c[0] for c in LOOP_CASES])
def test_predicate_against_loop(name, pattern, fn, tq, tk):
    expected = _loop(tq, tk, fn)
    np.testing.assert_array_equal(mask_array(pattern, tq, tk), expected)
    # The jnp path (what kernels trace) agrees with the numpy path.
    got = dense_mask(pattern, jnp.arange(tq, dtype=jnp.int32), jnp.arange(tk, dtype=jnp.int32))
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_padding_positions_are_never_visible():
    q, k = np.array([0, -1, 2, 3]), np.array([-1, 0, 1, 2, -5])
    got = dense_mask(Full(), q, k)
    expected = np.outer(q >= 0, k >= 0)
    np.testing.assert_array_equal(got, expected)
    got = dense_mask(GlobalTokens(10) | Sinks(10), q, k)
    np.testing.assert_array_equal(got, expected)


# ----------------------------------------------------------------------------- random blocks / BigBird


def _random_blocks_loop(p: RandomBlocks, t):
    return _loop(t, t, lambda q, k: k // p.block in _random_key_blocks(p, q // p.block))


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 1])
@pytest.mark.parametrize("causal", [True, False])
def test_random_blocks_hash_and_structure(seed, causal):
    block, t = 4, 37
    nb = -(-t // block)
    p = RandomBlocks(block, 2, seed=seed, causal=causal, num_blocks=None if causal else nb)
    m = mask_array(p, t)
    np.testing.assert_array_equal(m, _random_blocks_loop(p, t))
    jm = dense_mask(p, jnp.arange(t, dtype=jnp.int32), jnp.arange(t, dtype=jnp.int32))
    np.testing.assert_array_equal(np.asarray(jm), m)
    # Block structure: constant on (query block, key block) tiles; 1..num_random key blocks
    # per query block; causal picks never lie after the query's block.
    for qb in range(nb):
        rows = m[qb * block:(qb + 1) * block]
        assert (rows == rows[0]).all()
        kbs = {s // block for s in np.flatnonzero(rows[0])}
        assert 1 <= len(kbs) <= 2
        for kb in kbs:
            cols = rows[0, kb * block:(kb + 1) * block]
            assert cols.all()
            if causal:
                assert kb <= qb


def test_random_blocks_seed_determinism():
    a = mask_array(RandomBlocks(4, 2, seed=7), 64)
    b = mask_array(RandomBlocks(4, 2, seed=7), 64)
    np.testing.assert_array_equal(a, b)
    masks = [mask_array(RandomBlocks(4, 2, seed=s), 64) for s in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not np.array_equal(masks[i], masks[j]), (i, j)
    bi = [mask_array(RandomBlocks(4, 1, seed=s, causal=False, num_blocks=16), 64) for s in (0, 1)]
    assert not np.array_equal(*bi)


def test_random_blocks_num_random_zero_is_empty():
    assert not mask_array(RandomBlocks(4, 0), 16).any()


@pytest.mark.parametrize("causal", [True, False])
def test_bigbird_preset(causal):
    block, t = 4, 40
    nb = t // block
    pat = bigbird(block=block, num_window_blocks=3, num_global_blocks=1, num_random_blocks=2,
                  seed=3, causal=causal, num_blocks=None if causal else nb)
    rnd = RandomBlocks(block, 2, 3, causal, None if causal else nb)

    def fn(q, k):
        qb, kb = q // block, k // block
        vis = abs(qb - kb) <= 1 or k < block or q < block or kb in _random_key_blocks(rnd, qb)
        return vis and (k <= q or not causal)

    np.testing.assert_array_equal(mask_array(pat, t), _loop(t, t, fn))


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("make,name", [
    (lambda: SlidingWindow(0), "window"),
    (lambda: SlidingWindow(-3), "window"),
    (lambda: SlidingWindow(2.5), "window"),
    (lambda: SlidingWindow(2, -1), "right"),
    (lambda: DilatedWindow(0), "window"),
    (lambda: DilatedWindow(2, 0), "dilation"),
    (lambda: DilatedWindow(2, 1, -1), "right"),
    (lambda: Strided(0), "stride"),
    (lambda: Chunked(0), "chunk"),
    (lambda: Fixed(0), "block"),
    (lambda: Fixed(4, 0), "summary"),
    (lambda: Fixed(4, 5), "summary"),
    (lambda: Sinks(-1), "num_sinks"),
    (lambda: GlobalTokens(-1), "num_global"),
    (lambda: RandomBlocks(0, 1), "block"),
    (lambda: RandomBlocks(4, -1), "num_random"),
    (lambda: RandomBlocks(4, 1, causal=False), "num_blocks"),
    (lambda: BlockBand(4, -1), "half"),
    (lambda: bigbird(num_window_blocks=2), "num_window_blocks"),
    (lambda: causal_window(0), "window"),
])
def test_bad_pattern_arguments_raise(make, name):
    with pytest.raises(ValueError, match=re.escape(name)):
        make()


def test_segment_pattern_without_segments_raises():
    with pytest.raises(ValueError, match="segment"):
        dense_mask(Causal() & SameSegment(), np.arange(3), np.arange(3))
    with pytest.raises(ValueError, match="segment"):
        static_block_metadata(SameSegment() | Causal(), 8, 8, 4, 4)


@pytest.mark.parametrize("kwargs,name", [
    (dict(block_q=0), "block_q"),
    (dict(block_kv=-2), "block_kv"),
    (dict(block_q=2.0), "block_q"),
    (dict(max_blocks=0), "max_blocks"),
])
def test_block_metadata_bad_arguments_raise(kwargs, name):
    args = dict(block_q=4, block_kv=4) | kwargs
    pos = np.arange(8)[None]
    with pytest.raises(ValueError, match=name):
        block_metadata(Causal(), pos, pos, args.pop("block_q"), args.pop("block_kv"), **args)


def test_block_metadata_bad_positions_raise():
    with pytest.raises(ValueError, match="positions"):
        block_metadata(Causal(), np.arange(8), np.arange(8), 4, 4)
    with pytest.raises(ValueError, match="positions"):
        block_metadata(Causal(), np.zeros((2, 8), int), np.zeros((3, 8), int), 4, 4)


@pytest.mark.parametrize("kwargs,name", [
    (dict(q_len=0), "q_len"), (dict(kv_len=0), "kv_len"), (dict(block_q=0), "block_q"),
    (dict(block_kv=0), "block_kv"), (dict(block_kv=1.5), "block_kv"),
])
def test_static_block_metadata_bad_arguments_raise(kwargs, name):
    args = dict(q_len=8, kv_len=8, block_q=4, block_kv=4) | kwargs
    with pytest.raises(ValueError, match=name):
        static_block_metadata(Causal(), **args)


def test_max_blocks_too_small_raises():
    pos = np.arange(16)[None]
    # Causal, 4x4 blocks: the last query block needs 4 KV blocks.
    with pytest.raises(ValueError, match="max_blocks"):
        block_metadata(Causal(), pos, pos, 4, 4, max_blocks=3)
    with pytest.raises(ValueError, match="max_blocks"):
        static_block_metadata(Causal(), 16, 16, 4, 4, max_blocks=3)
    meta = block_metadata(Causal(), pos, pos, 4, 4, max_blocks=4)
    assert meta.kv_block_indices.shape == (1, 1, 4, 4)
    assert static_block_metadata(Causal(), 16, 16, 4, 4).max_blocks == 4


# ----------------------------------------------------------------------------- metadata properties


# One compilation per shape instead of one per eager op (keeps the property tests fast).
_expand_jit = jax.jit(expand_block_mask, static_argnums=(1, 2))


def check_metadata(meta: BlockSparseMetadata, dense: np.ndarray, num_kv_heads: int):
    """Check `meta` against the dense mask `dense [B, Tq, Tk]` (the oracle's), element by element."""
    b, tq, tk = dense.shape
    bq, bkv = meta.block_q, meta.block_kv
    nq, nk = -(-tq // bq), -(-tk // bkv)
    idx = np.asarray(meta.kv_block_indices)
    cnt = np.asarray(meta.kv_block_counts)
    full = np.asarray(meta.kv_block_full)
    assert idx.dtype == np.int32 and cnt.dtype == np.int32 and full.dtype == np.bool_
    assert idx.shape[:3] == (b, num_kv_heads, nq), idx.shape
    assert full.shape == idx.shape and cnt.shape == idx.shape[:3]
    mb = idx.shape[3]
    assert mb >= 1
    expanded = np.zeros_like(dense)
    full_tiles = np.zeros_like(dense)
    for bi in range(b):
        for h in range(num_kv_heads):
            for qb in range(nq):
                c = int(cnt[bi, h, qb])
                ids, fl = idx[bi, h, qb], full[bi, h, qb]
                assert 0 <= c <= mb
                assert ((ids >= 0) & (ids < nk)).all(), ids
                assert (np.diff(ids[:c]) > 0).all(), f"not ascending: {ids[:c]}"
                if c:
                    assert (ids[c:] == ids[c - 1]).all(), f"padding must repeat the last index: {ids}"
                assert not fl[c:].any(), "padding entries flagged full"
                rows = slice(qb * bq, min((qb + 1) * bq, tq))
                present = set()
                for kb in range(nk):
                    tile = dense[bi, rows, kb * bkv:min((kb + 1) * bkv, tk)]
                    if tile.any():
                        present.add(kb)
                assert set(ids[:c].tolist()) == present, (bi, qb, ids[:c], present)
                for slot in range(c):
                    kb = int(ids[slot])
                    cols = slice(kb * bkv, min((kb + 1) * bkv, tk))
                    tile = dense[bi, rows, cols]
                    assert tile.any(), "listed block is empty"
                    assert bool(fl[slot]) == bool(tile.all()), (bi, qb, kb, fl[slot], tile)
                    if h == 0:
                        expanded[bi, rows, cols] |= tile | bool(fl[slot])
                        full_tiles[bi, rows, cols] |= bool(fl[slot])
    np.testing.assert_array_equal(expanded, dense)
    # The kernels' reference expansion gives the same elements (listed & (full | element)).
    got = np.asarray(_expand_jit(meta, tq, tk, jnp.asarray(dense)))
    np.testing.assert_array_equal(got, np.broadcast_to(dense[:, None], got.shape))
    # With an all-False element mask only the full blocks remain.
    got = np.asarray(_expand_jit(meta, tq, tk, jnp.zeros(dense.shape, bool)))
    np.testing.assert_array_equal(got, np.broadcast_to(full_tiles[:, None], got.shape))


def _leaf(segments: bool, max_block: int = 8):
    fixed = st.integers(1, 8).flatmap(lambda b: st.builds(Fixed, st.just(b), st.integers(1, b)))
    bidir_random = st.builds(
        lambda b, n, s, nb: RandomBlocks(b, n, s, causal=False, num_blocks=nb),
        st.integers(1, max_block), st.integers(0, 3), st.integers(0, 2**31 - 1), st.integers(1, 8))
    options = [
        st.just(Causal()), st.just(Full()),
        st.builds(SlidingWindow, st.integers(1, 12), st.integers(0, 6)),
        st.builds(Sinks, st.integers(0, 6)),
        st.builds(GlobalTokens, st.integers(0, 5)),
        st.builds(Chunked, st.integers(1, 12)),
        st.builds(DilatedWindow, st.integers(1, 5), st.integers(1, 4), st.integers(0, 3)),
        st.builds(Strided, st.integers(1, 8)),
        fixed,
        st.builds(BlockBand, st.integers(1, max_block), st.integers(0, 2)),
        st.builds(RandomBlocks, st.integers(1, max_block), st.integers(0, 3),
                  st.integers(0, 2**31 - 1)),
        bidir_random,
    ]
    if segments:
        options += [st.just(SameSegment())] * 3
    return st.one_of(options)


def patterns(segments: bool = False, max_leaves: int = 5):
    """Random trees of unions and intersections over random predicates."""
    return st.recursive(
        _leaf(segments),
        lambda kids: st.one_of(
            st.lists(kids, min_size=1, max_size=3).map(lambda ps: Union(tuple(ps))),
            st.lists(kids, min_size=1, max_size=3).map(lambda ps: Intersection(tuple(ps)))),
        max_leaves=max_leaves)


@st.composite
def ragged_inputs(draw, max_len=40, segments=True, lengths=None, blocks=None):
    """Positions (with -1 padding), segment ids, lengths and block sizes for a batch.

    `lengths` / `blocks`: optional menus to draw sizes from (eager tests use a few fixed
    shapes so that jax compiles each eager op once, not once per example).
    """
    b = draw(st.integers(1, 2)) if lengths is None else 2
    sizes = st.integers(1, max_len) if lengths is None else st.sampled_from(lengths)
    block_sizes = st.integers(1, 16) if blocks is None else st.sampled_from(blocks)
    tq, tk = draw(sizes), draw(sizes)
    block_q, block_kv = draw(block_sizes), draw(block_sizes)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mode = draw(st.sampled_from(["prefix", "offset", "scattered"]))
    q_pos = np.zeros((b, tq), np.int32)
    kv_pos = np.zeros((b, tk), np.int32)
    for i in range(b):
        if mode == "scattered":   # arbitrary positions, padding anywhere
            q_pos[i] = rng.integers(-1, max_len + 8, tq)
            kv_pos[i] = rng.integers(-1, max_len + 8, tk)
            continue
        lq, lk = rng.integers(0, tq + 1), rng.integers(0, tk + 1)
        start = 0 if mode == "prefix" else int(rng.integers(0, 12))   # chunked prefill / decode
        q_pos[i] = start + np.arange(tq)
        kv_pos[i] = np.arange(tk)
        q_pos[i, lq:] = -1
        kv_pos[i, lk:] = -1
    q_seg = kv_seg = None
    if segments:
        q_seg = np.sort(rng.integers(0, 3, (b, tq)), axis=-1).astype(np.int32)
        kv_seg = np.sort(rng.integers(0, 3, (b, tk)), axis=-1).astype(np.int32)
    return dict(q_pos=q_pos, kv_pos=kv_pos, q_seg=q_seg, kv_seg=kv_seg,
                block_q=block_q, block_kv=block_kv, tq=tq, tk=tk)


@given(pattern=patterns(segments=True), inp=ragged_inputs(), num_kv_heads=st.integers(1, 2),
       data=st.data())
def test_block_metadata_expands_to_dense_mask(pattern, inp, num_kv_heads, data):
    segs = pattern.needs_segments
    q_seg = inp["q_seg"] if segs else None
    kv_seg = inp["kv_seg"] if segs else None
    dense = ref_mask(pattern, inp["q_pos"], inp["kv_pos"], q_seg, kv_seg)
    lib_dense = np.asarray(dense_mask(pattern, inp["q_pos"], inp["kv_pos"], q_seg, kv_seg))
    np.testing.assert_array_equal(lib_dense, dense)
    bq, bkv = inp["block_q"], inp["block_kv"]
    nq, nk = -(-inp["tq"] // bq), -(-inp["tk"] // bkv)
    needed = max(len({s // bkv for s in np.flatnonzero(dense[b, qb * bq:(qb + 1) * bq].any(0))})
                 for b in range(dense.shape[0]) for qb in range(nq))
    max_blocks = data.draw(st.one_of(st.none(), st.integers(max(needed, 1), nk + 3)),
                           label="max_blocks")

    # Under jit: one compilation per example instead of one per eager op (eager == jit is
    # its own test below).
    @jax.jit
    def build(qp, kp, qs, ks):
        return block_metadata(pattern, qp, kp, bq, bkv, q_segment_ids=qs, kv_segment_ids=ks,
                              num_kv_heads=num_kv_heads, max_blocks=max_blocks)

    meta = build(inp["q_pos"], inp["kv_pos"], q_seg, kv_seg)
    assert meta.max_blocks == (nk if max_blocks is None else max_blocks)
    check_metadata(meta, dense, num_kv_heads)


@given(pattern=patterns(segments=False), tq=st.integers(1, 48), tk=st.integers(1, 48),
       block_q=st.integers(1, 16), block_kv=st.integers(1, 16), num_kv_heads=st.integers(1, 3),
       extra_slots=st.one_of(st.none(), st.integers(0, 3)))
def test_static_block_metadata_expands_to_dense_mask(pattern, tq, tk, block_q, block_kv,
                                                     num_kv_heads, extra_slots):
    dense = ref_mask_len(pattern, tq, tk)[None]
    nq = -(-tq // block_q)
    needed = max(len({s // block_kv for s in np.flatnonzero(dense[0, qb * block_q:(qb + 1) * block_q]
                                                             .any(0))}) for qb in range(nq))
    max_blocks = None if extra_slots is None else max(needed, 1) + extra_slots
    meta = static_block_metadata(pattern, tq, tk, block_q, block_kv, num_kv_heads=num_kv_heads,
                                 max_blocks=max_blocks)
    assert isinstance(meta.kv_block_indices, np.ndarray)
    check_metadata(meta, dense, num_kv_heads)
    assert meta.max_blocks == (max(needed, 1) if max_blocks is None else max_blocks)


@settings(max_examples=8)
@given(pattern=patterns(segments=True, max_leaves=3),
       inp=ragged_inputs(lengths=(11, 16), blocks=(3, 8)))
def test_block_metadata_under_jit_matches_eager(pattern, inp):
    segs = pattern.needs_segments
    q_seg = inp["q_seg"] if segs else None
    kv_seg = inp["kv_seg"] if segs else None
    bq, bkv = inp["block_q"], inp["block_kv"]

    def build(qp, kp, qs, ks):
        return block_metadata(pattern, qp, kp, bq, bkv, q_segment_ids=qs, kv_segment_ids=ks,
                              num_kv_heads=2)

    eager = build(inp["q_pos"], inp["kv_pos"], q_seg, kv_seg)
    jitted = jax.jit(build)(inp["q_pos"], inp["kv_pos"], q_seg, kv_seg)
    assert jitted.block_q == bq and jitted.block_kv == bkv
    for name in ("kv_block_indices", "kv_block_counts", "kv_block_full"):
        np.testing.assert_array_equal(np.asarray(getattr(jitted, name)),
                                      np.asarray(getattr(eager, name)), err_msg=name)
    dense = ref_mask(pattern, inp["q_pos"], inp["kv_pos"], q_seg, kv_seg)
    check_metadata(eager, dense, 2)
    # Eagerly, counts are concrete: a max_blocks below what a query block needs raises.
    needed = int(np.asarray(eager.kv_block_counts).max())
    if needed > 1:
        with pytest.raises(ValueError, match="max_blocks"):
            block_metadata(pattern, inp["q_pos"], inp["kv_pos"], bq, bkv, q_segment_ids=q_seg,
                           kv_segment_ids=kv_seg, max_blocks=needed - 1)


def test_max_blocks_too_small_under_jit_drops_blocks_but_keeps_the_contract():
    # Under tracing counts are not concrete, so no ValueError: blocks past max_blocks are
    # dropped, and counts never exceed the slots (a kernel reads `count` entries).
    pos = np.arange(16)[None]
    meta = jax.jit(lambda p: block_metadata(Causal(), p, p, 4, 4, max_blocks=2))(pos)
    np.testing.assert_array_equal(np.asarray(meta.kv_block_counts)[0, 0], [1, 2, 2, 2])
    np.testing.assert_array_equal(np.asarray(meta.kv_block_indices)[0, 0],
                                  [[0, 0], [0, 1], [0, 1], [0, 1]])
    np.testing.assert_array_equal(np.asarray(meta.kv_block_full)[0, 0],
                                  [[False, False], [True, False], [True, True], [True, True]])


def test_max_blocks_above_num_kv_blocks_gives_that_many_slots():
    pos = np.arange(8)[None]
    for meta in (block_metadata(Causal(), pos, pos, 4, 4, max_blocks=5),
                 static_block_metadata(Causal(), 8, 8, 4, 4, max_blocks=5)):
        assert meta.kv_block_indices.shape == (1, 1, 2, 5) == meta.kv_block_full.shape
        np.testing.assert_array_equal(np.asarray(meta.kv_block_indices)[0, 0],
                                      [[0, 0, 0, 0, 0], [0, 1, 1, 1, 1]])
        np.testing.assert_array_equal(np.asarray(meta.kv_block_counts)[0, 0], [1, 2])
        assert np.asarray(meta.kv_block_full)[0, 0].sum() == 1


def test_static_block_metadata_inside_jit():
    pattern = longformer(3, 1, 2)

    @jax.jit
    def f(x):
        meta = static_block_metadata(pattern, 20, 20, 4, 8)
        return x + meta.kv_block_counts.sum()

    meta = static_block_metadata(pattern, 20, 20, 4, 8)
    assert int(f(jnp.int32(0))) == int(np.asarray(meta.kv_block_counts).sum()) > 0
    check_metadata(meta, ref_mask_len(pattern, 20, 20)[None], 1)


def test_metadata_hand_checked_causal():
    # Tq=5, Tk=7, block_q=2, block_kv=3; causal. Query block 0 (q 0,1): kv block 0 partial.
    # Query block 1 (q 2,3): kv block 0 full (k 0..2 <= 2), kv block 1 partial (k 3 for q3).
    # Query block 2 (q 4, tail): kv block 0 full, kv block 1 (k 3..5): k5 > 4 -> partial.
    for meta in (static_block_metadata(Causal(), 5, 7, 2, 3),
                 block_metadata(Causal(), np.arange(5)[None], np.arange(7)[None], 2, 3)):
        idx, cnt, full = (np.asarray(a)[0, 0] for a in
                          (meta.kv_block_indices, meta.kv_block_counts, meta.kv_block_full))
        np.testing.assert_array_equal(cnt, [1, 2, 2])
        np.testing.assert_array_equal(idx[:, :2], [[0, 0], [0, 1], [0, 1]])
        np.testing.assert_array_equal(full[:, :2], [[False, False], [True, False], [True, False]])
    # A tail block that is fully visible within range is full: Tq=3, Tk=3, blocks of 2, Full().
    meta = static_block_metadata(Full(), 3, 3, 2, 2)
    assert np.asarray(meta.kv_block_full).all()
    # A block holding user padding (-1) is partial even if every real element is visible.
    meta = block_metadata(Full(), np.array([[0, 1, 2, -1]]), np.arange(4)[None], 2, 2)
    np.testing.assert_array_equal(np.asarray(meta.kv_block_full)[0, 0],
                                  [[True, True], [False, False]])
    # A fully padded query block lists nothing.
    meta = block_metadata(Causal(), np.array([[0, 1, -1, -1]]), np.arange(4)[None], 2, 2)
    np.testing.assert_array_equal(np.asarray(meta.kv_block_counts)[0, 0], [1, 0])


# ----------------------------------------------------------------------------- pictures


@pytest.mark.parametrize("block_size", [None, 4])
def test_plot_pattern_writes_png(tmp_path, block_size):
    import matplotlib.pyplot as plt

    path = tmp_path / "pattern.png"
    fig = plot_pattern(bigbird(block=4, num_global_blocks=1, num_random_blocks=1), 24,
                       block_size=block_size, path=str(path), title="bigbird")
    try:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) > 1000
        assert fig.axes[0].get_title() == "bigbird"
    finally:
        plt.close(fig)


def test_plot_pattern_on_given_axes():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2)
    try:
        out = plot_pattern(Causal(), 8, ax=axes[1])
        assert out is fig
        image = axes[1].get_images()[0].get_array()
        assert image.shape[:2] == (8, 8)
        # Visible cells are drawn dark, hidden ones white: the lower triangle is dark.
        dark = np.asarray(image)[..., 0] < 0.5
        np.testing.assert_array_equal(dark, np.tril(np.ones((8, 8), bool)))
    finally:
        plt.close(fig)


def test_segment_ids_cut_even_through_a_union():
    """Hypothesis' shrunk case: `Causal() | SameSegment()` must not see another segment."""
    one = np.zeros((1, 1), np.int32)
    visible = dense_mask(Causal() | SameSegment(), one, one, one + 1, one)
    assert not np.asarray(visible).any()
