"""Quest page bounds / scores / selection, top-p, quest_decode and QuestKVCache."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.decode.api import decode_attention
from gpu_testing import has_gpu
from sparse_jax.cache.quest import QuestKVCache
from sparse_jax.ops import quest as Q


def _cache(b=2, s=37, hkv=2, d=8, seed=0, lengths=(37, 20)):
    ks = jax.random.split(jax.random.key(seed), 2)
    k = jax.random.normal(ks[0], (b, s, hkv, d))
    v = jax.random.normal(ks[1], (b, s, hkv, d))
    slots = np.arange(s)[None]
    pos = jnp.asarray(np.where(slots < np.asarray(lengths)[:, None], slots, -1), jnp.int32)
    return k, v, pos


def test_page_bounds_match_numpy_loop_ragged_and_partial_last_page():
    k, _, pos = _cache()
    kmin, kmax = Q.page_bounds(k, pos, 8)
    kn, pn = np.asarray(k), np.asarray(pos)
    b, s, hkv, d = kn.shape
    assert kmin.shape == (b, hkv, 5, d)                                       # head-major
    for r in range(b):
        for p in range(5):
            sl = [i for i in range(p * 8, min(s, p * 8 + 8)) if pn[r, i] >= 0]
            if not sl:
                assert np.all(np.asarray(kmin[r, :, p]) == np.inf) and np.all(np.asarray(kmax[r, :, p]) == -np.inf)
                continue
            np.testing.assert_array_equal(kmin[r, :, p], kn[r, sl].min(0))
            np.testing.assert_array_equal(kmax[r, :, p], kn[r, sl].max(0))


@settings(max_examples=10)
@given(seed=st.integers(0, 10_000), page=st.sampled_from([3, 8]))
def test_quest_bound_is_at_least_the_true_max_logit_of_every_page(seed, page):
    g, tq = 2, 2                                            # GQA group and Tq > 1: the max reduction
    k, _, pos = _cache(seed=seed, s=13, lengths=(13, 6))
    q = jax.random.normal(jax.random.key(seed + 1), (2, tq, 2 * g, 8))
    scores = Q.quest_page_scores(q, *Q.page_bounds(k, pos, page), Q.valid_pages(pos, page))   # [B, Hkv, P]
    logits = np.einsum("btngd,bsnd->bnsgt", np.asarray(q).reshape(2, tq, 2, g, 8), np.asarray(k)) / np.sqrt(8)
    pn = np.asarray(pos)
    for r in range(2):
        for p in range(scores.shape[-1]):
            sl = [i for i in range(p * page, min(13, p * page + page)) if pn[r, i] >= 0]
            if not sl:
                assert np.all(np.asarray(scores[r, :, p]) == -np.inf)
                continue
            true = logits[r][:, sl].reshape(2, -1).max(-1)                        # per kv head
            assert np.all(np.asarray(scores[r, :, p]) >= true - 1e-5)


def test_select_top_pages_hand_built():
    scores = jnp.array([[[0.0, 5.0, 1.0, 4.0, 3.0, 9.0]]])
    valid = jnp.array([[True, True, True, True, True, False]])
    idx, cnt = Q.select_top_pages(scores, 3, valid, always=())
    assert idx.tolist() == [[[1, 3, 4]]] and cnt.tolist() == [[3]]
    idx, cnt = Q.select_top_pages(scores, 3, valid)              # first (0) and last valid (4)
    assert idx.tolist() == [[[0, 1, 4]]] and cnt.tolist() == [[3]]
    few = jnp.array([[False, True, False, True, False, False]])
    idx, cnt = Q.select_top_pages(scores, 3, few, always=())
    assert cnt.tolist() == [[2]] and idx[0, 0, :2].tolist() == [1, 3] and idx[0, 0, 2] == 3
    with pytest.raises(ValueError, match="budget_pages"):
        Q.select_top_pages(scores, 0, valid)
    with pytest.raises(ValueError, match="always"):
        Q.select_top_pages(scores, 2, valid, always=("middle",))
    with pytest.raises(ValueError, match="valid_pages"):
        Q.select_top_pages(scores, 2, valid[:, :3])


def test_select_top_pages_lists_equal_the_general_block_lists():
    """The sort-free lists of `top_k_set`'s ascending output equal `selection.block_lists`
    of the same pages: ragged rows, a row with no valid page (counts 0, indices 0)."""
    from pallas_kernels.indexer import top_k_set
    from sparse_jax.ops import selection

    rng = np.random.default_rng(5)
    scores = jnp.asarray(rng.normal(size=(3, 2, 40)), jnp.float32)
    valid = jnp.asarray(np.arange(40)[None] < np.array([[40], [3], [0]]))
    for budget in (1, 6, 50):
        got = Q.select_top_pages(scores, budget, valid, always=())
        s = jnp.where(valid[:, None], scores, -jnp.inf)
        _, pages = top_k_set(s.reshape(6, 40), budget)
        want = selection.block_lists(pages.reshape(3, 1, 2, -1), 40)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        assert got[1][2].tolist() == [0, 0] and got[1][1].tolist() == [min(budget, 3)] * 2


def test_select_top_pages_radix_kernel_equals_lax_top_k():
    """The GPU path (radix select, interpret mode) picks the very pages `lax.top_k` does:
    ragged valid pages, forced first / last pages, tied scores, budget over the valid count."""
    rng = np.random.default_rng(3)
    b, hkv, p = 3, 4, 37
    scores = jnp.asarray(np.round(rng.normal(size=(b, hkv, p)), 1), jnp.float32)   # many ties
    lengths = np.array([37, 11, 2])
    valid = jnp.asarray(np.arange(p)[None] < lengths[:, None])
    for budget in (1, 5, 16):
        want = Q.select_top_pages(scores, budget, valid, impl="xla")
        got = Q.select_top_pages(scores, budget, valid, impl="triton", interpret=True)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
        assert int(want[1][2, 0]) == min(budget, 2)


def test_select_top_p_hand_built():
    lg = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    scores = jnp.asarray(lg[[2, 0, 3, 1]])[None, None]                        # masses .15 .5 .05 .3
    valid = jnp.ones((1, 4), bool)
    for p, want in ((0.5, [1]), (0.6, [1, 3]), (0.79, [1, 3]), (0.81, [0, 1, 3]), (1.0, [0, 1, 2, 3])):
        idx, cnt = Q.select_top_p(scores, p, valid)
        assert idx[0, 0, :int(cnt[0, 0])].tolist() == want, p
    idx, cnt = Q.select_top_p(scores, 0.9, jnp.array([[False, False, True, False]]))
    assert cnt.tolist() == [[1]] and idx[0, 0, 0] == 2
    with pytest.raises(ValueError, match="p must"):
        Q.select_top_p(scores, 0.0, valid)


@pytest.mark.parametrize("impl,interpret", [("xla", False), ("triton", True)])
def test_quest_decode_with_every_page_equals_dense_decode(impl, interpret):
    k, v, pos = _cache(s=37, lengths=(37, 20))
    q = jax.random.normal(jax.random.key(7), (2, 1, 4, 8))
    dense = decode_attention(q, k, v, kv_positions=pos, impl="xla")
    out = Q.quest_decode(q, k, v, pos, page_size=8, budget_pages=5, impl=impl, interpret=interpret)
    np.testing.assert_allclose(out, dense, atol=2e-5, rtol=2e-5)
    out = Q.quest_decode(q, k, v, pos, page_size=8, top_p=1.0, impl=impl, interpret=interpret)
    np.testing.assert_allclose(out, dense, atol=2e-5, rtol=2e-5)


def _numpy_quest(q, k, v, pos, page, budget):
    """Quest decode from its definition, per row and kv head, straight from the keys: page
    bounds over the slots a query sees, scores (max over the group's heads and tokens), the
    first and last valid pages plus the best others up to `budget`, softmax over the keys of
    those pages each query sees. Returns `(pages [B][Hkv] sets, out [B, Tq, H, D])`."""
    q, k, v, pos = (np.asarray(x, np.float64) for x in (q, k, v, pos))
    b, tq, h, d = q.shape
    hkv, g = k.shape[2], h // k.shape[2]
    qpos = pos.max(1)[:, None] + 1 - tq + np.arange(tq)[None]
    out, chosen = np.zeros_like(q), []
    for r in range(b):
        chosen.append([])
        for kh in range(hkv):
            qs = q[r, :, kh * g:(kh + 1) * g].reshape(-1, d)
            scores = {}
            for p in range(-(-k.shape[1] // page)):
                sl = [i for i in range(p * page, min(k.shape[1], p * page + page)) if 0 <= pos[r, i] <= qpos[r].max()]
                if sl:
                    lo, hi = k[r, sl, kh].min(0), k[r, sl, kh].max(0)
                    scores[p] = np.max(np.maximum(qs * lo, qs * hi).sum(-1)) / np.sqrt(d)
            valid = sorted(scores)
            pages = {valid[0], valid[-1]}
            for p in sorted(valid, key=lambda p: -scores[p]):
                if len(pages) >= budget:
                    break
                pages.add(p)
            chosen[r].append(pages)
            for t in range(tq):
                sl = [i for i in range(k.shape[1]) if i // page in pages and 0 <= pos[r, i] <= qpos[r, t]]
                for hh in range(kh * g, (kh + 1) * g):
                    lg = k[r, sl, kh] @ q[r, t, hh] / np.sqrt(d)
                    w = np.exp(lg - lg.max())
                    out[r, t, hh] = w @ v[r, sl, kh] / w.sum()
    return chosen, out


@pytest.mark.parametrize("b,tq", [(1, 1), (2, 1), (2, 2)])
def test_quest_decode_equals_its_numpy_definition(b, tq):
    """Selection and output of `quest_decode` (head-major bounds of the whole cache, and the
    same bounds written token by token by `QuestKVCache`) against `_numpy_quest`: GQA 2,
    ragged rows, partial last page, a budget under the valid pages."""
    s, hkv, d, page, budget = 37, 2, 8, 4, 4
    k, v, pos = _cache(b=b, s=s, hkv=hkv, d=d, seed=11, lengths=(37, 22)[:b])
    q = jax.random.normal(jax.random.key(12), (b, tq, 2 * hkv, d))
    want_pages, want = _numpy_quest(q, k, v, pos, page, budget)
    out = Q.quest_decode(q, k, v, pos, page_size=page, budget_pages=budget, impl="xla")
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
    kmin, kmax = Q.page_bounds(k, pos, page)
    qpos = jnp.max(pos, axis=1)[:, None] + 1 - tq + jnp.arange(tq)[None]
    valid = Q.valid_pages(pos, page, qpos)
    idx, cnt = Q.select_top_pages(Q.quest_page_scores(q, kmin, kmax, valid), budget, valid)
    got = [[set(np.asarray(idx)[r, h, :int(cnt[r, h])].tolist()) for h in range(hkv)] for r in range(b)]
    assert got == want_pages
    cache = QuestKVCache.init(b, s, hkv, d, page_size=page)
    step = jax.jit(lambda c, kk, vv, pp: c.update(kk, vv, pp)[3])
    for t in range(s):                                                   # decode-step writes
        cache = step(cache, k[:, t:t + 1], v[:, t:t + 1], pos[:, t:t + 1])
    out = Q.quest_decode(q, k, v, pos, page_size=page, budget_pages=budget, bounds=cache.bounds, impl="xla")
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)


def test_quest_decode_finds_the_needle_page():
    b, s, hkv, d, page = 1, 64, 1, 16, 8
    k = 0.1 * jax.random.normal(jax.random.key(0), (b, s, hkv, d))
    v = jax.random.normal(jax.random.key(1), (b, s, hkv, d))
    q = jnp.zeros((b, 1, 2, d)).at[..., 3].set(4.0)
    k = k.at[0, 29, 0, 3].set(10.0)                                          # needle in page 3
    pos = jnp.arange(s, dtype=jnp.int32)[None]
    kmin, kmax = Q.page_bounds(k, pos, page)
    valid = Q.valid_pages(pos, page)
    idx, cnt = Q.select_top_pages(Q.quest_page_scores(q, kmin, kmax, valid), 1, valid, always=())
    assert idx.tolist() == [[[3]]] and cnt.tolist() == [[1]]
    out = Q.quest_decode(q, k, v, pos, page_size=page, budget_pages=3, impl="xla")  # pages 0, 3, 7
    sel = jnp.concatenate([jnp.arange(0, 8), jnp.arange(24, 32), jnp.arange(56, 64)])
    ref = decode_attention(q, k[:, sel], v[:, sel], kv_positions=sel[None].astype(jnp.int32), impl="xla")
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert np.abs(np.asarray(out) - np.asarray(v[0, 29, 0])).max() < 0.1       # the needle's value


def test_quest_decode_argument_checks():
    k, v, pos = _cache()
    q = jnp.zeros((2, 1, 4, 8))
    with pytest.raises(ValueError, match="exactly one"):
        Q.quest_decode(q, k, v, pos, page_size=8)
    with pytest.raises(ValueError, match="page_size"):
        Q.quest_decode(q, k, v, pos, page_size=0, budget_pages=2)


@pytest.mark.parametrize("bounds_dtype", [None, "float8_e4m3fn"])
def test_quest_cache_bounds_after_token_by_token_writes_equal_page_bounds(bounds_dtype):
    """Decode-step writes give the bounds (codes and scales for float8) that the bounds of
    the whole cache give."""
    b, s, hkv, d, page = 2, 21, 2, 4, 4
    k, v, _ = _cache(b=b, s=s, hkv=hkv, d=d, lengths=(s, s))
    cache = QuestKVCache.init(b, s, hkv, d, page_size=page, bounds_dtype=bounds_dtype)
    per_bound = 4 if bounds_dtype is None else 1
    assert cache.nbytes() == cache.full.nbytes() + b * 6 * hkv * (2 * d * per_bound + 2 * (bounds_dtype is not None))
    lengths = (s, 13)                                                        # row 1 stops early: ragged
    step = jax.jit(lambda c, kk, vv, pp: c.update(kk, vv, pp)[3])
    pos0 = jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (b, 3))
    cache = step(cache, k[:, :3], v[:, :3], pos0)
    for t in range(3, s):
        p = jnp.asarray([[t if t < n else -1] for n in lengths], jnp.int32)
        cache = step(cache, k[:, t:t + 1], v[:, t:t + 1], p)
    want = Q.bound_codes(*Q.page_bounds(cache.k, cache.positions, page), cache.kmin.dtype)
    for got, w in zip(cache.bounds, want):
        assert got.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(w, np.float32))
    assert int((cache.positions[1] >= 0).sum()) == 13
    big = cache.update(k, v, jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)))[3]   # refresh-all path
    want = Q.bound_codes(*Q.page_bounds(k, jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)), page),
                         cache.kmin.dtype)
    for got, w in zip(big.bounds, want):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(w, np.float32))


def test_jitted_bf16_scores_match_the_numpy_formula():
    """GQA group 4, bf16, under jit, at a size where XLA:CPU's fused dots + max returned
    inf (B 2 x Hkv 8, P 64, D 64) unless the reference keeps the max apart."""
    k = jax.random.normal(jax.random.key(0), (2, 512, 8, 64), jnp.bfloat16)
    q = jax.random.normal(jax.random.key(1), (2, 1, 32, 64), jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(512, dtype=jnp.int32), (2, 512))
    kmin, kmax = Q.page_bounds(k, pos, 8)
    got = jax.jit(Q.quest_page_scores)(q, kmin, kmax, Q.valid_pages(pos, 8))
    qn = np.asarray(q, np.float32).reshape(2, 8, 1, 4, 64)                     # [B, Hkv, 1, G, D]
    lo, hi = np.asarray(kmin, np.float32), np.asarray(kmax, np.float32)       # [B, Hkv, P, D]
    want = np.maximum(qn * hi[:, :, :, None], qn * lo[:, :, :, None]).sum(-1).max(-1) / 8
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _largest_written_buffer(fn, *args):
    """Bytes of the largest array an instruction of the compiled ENTRY computation of
    `jit(fn)(*args)` writes (parameters and bitcasts aside: a bitcast is a view, e.g. XLA:GPU's
    merge of the dots' batch axes; a tuple result, e.g. a cuBLAS call's with its workspace, is
    read through its get-tuple-elements), and the instructions written."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    entry = text.split("\nENTRY ")[-1].split("\n}")[0]
    written = re.findall(r"= (\w+)\[([\d,]*)\]\S* (?!parameter|bitcast)[a-z][\w-]*\(", entry)
    bits = {dt: 8 if dt == "pred" else int(re.search(r"\d+", dt)[0]) for dt, _ in written}
    sizes = [np.prod([int(x) for x in dims.split(",") if x]) * bits[dt] // 8 for dt, dims in written]
    return max(sizes), written


def test_compiled_scores_read_the_bounds_in_place():
    """The compiled CPU score program (bf16 bounds, GQA 4) writes no buffer of the bounds'
    size: no transposed, zeroed or widened copy of them (the page-major layout wrote two)."""
    b, hkv, p, d = 2, 4, 64, 128
    kmin = jnp.zeros((b, hkv, p, d), jnp.bfloat16)
    args = (jnp.zeros((b, 1, 4 * hkv, d), jnp.bfloat16), kmin, kmin, jnp.ones((b, p), bool))
    largest, written = _largest_written_buffer(Q.quest_page_scores, *args)
    assert largest <= kmin.nbytes / 8, written                          # the dots' [B, Hkv, P, 4] float32


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
def test_compiled_on_gpu_scores_read_the_bounds_in_place_and_match():
    """On the GPU at a decode shape (B 2, Hkv 8, 4096 pages, D 128, GQA 4, bf16, ragged): the
    XLA score program writes no bounds-sized buffer, its scores match the float64 formula,
    and the Triton kernel (default and tensor-core form) matches them."""
    from pallas_kernels.page_scores.api import PageScoresConfig, page_scores

    b, hkv, p, d, page = 2, 8, 4096, 128, 16
    k = jax.random.normal(jax.random.key(0), (b, p * page, hkv, d), jnp.bfloat16)
    q = jax.random.normal(jax.random.key(1), (b, 1, 4 * hkv, d), jnp.bfloat16)
    slots = jnp.arange(p * page, dtype=jnp.int32)[None]
    pos = jnp.where(slots < jnp.array([[p * page], [1000 * page + 5]]), slots, -1)
    kmin, kmax = Q.page_bounds(k, pos, page)
    valid = Q.valid_pages(pos, page)
    largest, written = _largest_written_buffer(Q.quest_page_scores, q, kmin, kmax, valid)
    assert largest <= kmin.nbytes / 8, written
    got = np.asarray(jax.jit(Q.quest_page_scores)(q, kmin, kmax, valid))
    qn = np.asarray(q, np.float64).reshape(b, hkv, 1, 4, d)
    lo, hi = (np.asarray(x, np.float64)[:, :, :, None] for x in (kmin, kmax))
    with np.errstate(invalid="ignore"):                                 # 0 * inf at the empty pages
        want = np.maximum(qn * hi, qn * lo).sum(-1).max(-1) / np.sqrt(d)
    want = np.where(np.asarray(valid)[:, None], want, -np.inf)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for cfg in (None, PageScoresConfig(block_pages=64, dot=True)):
        kernel = jax.jit(lambda *a, c=cfg: page_scores(*a, impl="triton", config=c))(q, kmin, kmax, valid)
        np.testing.assert_allclose(kernel, got, rtol=1e-5, atol=1e-5)


# ---- float8 page bounds (bound_codes): outward rounding keeps the scores upper bounds ----


def _grid(dtype):
    """Every finite value of a float8 dtype, ascending, float64."""
    vals = np.asarray(jax.lax.bitcast_convert_type(jnp.arange(256, dtype=jnp.uint8), dtype), np.float64)
    return np.unique(vals[np.isfinite(vals)])


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_bound_codes_round_outwards_to_the_nearest_grid_values_at_any_magnitude(dtype):
    """Keys of magnitudes 1e-36 .. 1e36 (float32), also mixed within a page: `lo * scale <=
    kmin`, `hi * scale >= kmax` for every entry, each code the nearest grid value on its side,
    the scale the least power of two fitting the page's largest bound; empty pages marked."""
    rng = np.random.default_rng(0)
    b, s, hkv, d, page = 2, 40, 3, 16, 4
    mag = 10.0 ** rng.uniform(-24, 24, size=(b, s // page, hkv, 1))                # per page and head
    mag = np.repeat(mag, page, axis=1) * 10.0 ** rng.choice([0, 0, 0, -12, 12], size=(b, s, hkv, d))
    k = jnp.asarray(rng.normal(size=(b, s, hkv, d)) * mag, jnp.float32)
    pos = jnp.asarray(np.where(np.arange(s)[None] < np.array([[s], [s - 9]]), np.arange(s)[None], -1), jnp.int32)
    kmin, kmax = Q.page_bounds(k, pos, page)
    lo, hi, scale = jax.jit(Q.bound_codes, static_argnums=2)(kmin, kmax, dtype)
    assert lo.dtype == hi.dtype == jnp.dtype(dtype) and scale.shape == kmin.shape[:-1] + (1,)
    grid = _grid(jnp.dtype(dtype))
    kmin, kmax = np.asarray(kmin, np.float64), np.asarray(kmax, np.float64)
    lo, hi, sc = (np.asarray(x, np.float64) for x in (lo, hi, scale))
    empty = kmax[..., :1] < kmin[..., :1]
    assert empty.sum() == 2 * hkv                                                  # row 1's last two pages
    assert np.all(lo[np.broadcast_to(empty, lo.shape)] == grid[-1]) and np.all(hi[np.broadcast_to(empty, hi.shape)] == -grid[-1])
    full = ~np.broadcast_to(empty, lo.shape)
    assert np.all(np.log2(sc) == np.round(np.log2(sc)))                            # powers of two
    amax = np.maximum(np.abs(kmin), np.abs(kmax)).max(-1, keepdims=True)
    fits = amax / sc <= grid[-1]
    assert np.all(fits | empty) and np.all((amax / (sc / 2) > grid[-1]) | empty)    # least such power
    x_lo, x_hi = (kmin / sc)[full], (kmax / sc)[full]
    assert np.all(lo[full] <= x_lo) and np.all(hi[full] >= x_hi)                     # outwards...
    np.testing.assert_array_equal(lo[full], grid[np.searchsorted(grid, x_lo, side="right") - 1])   # ...by < 1 step
    np.testing.assert_array_equal(hi[full], grid[np.searchsorted(grid, x_hi, side="left")])


def test_float8_bound_scores_stay_upper_bounds_of_every_logit():
    """Quest scores from float8 bounds are >= the true max logit of each page (and >= the
    scores of the exact bounds), GQA 2 and Tq 2, keys of very different scales per page."""
    rng = np.random.default_rng(1)
    b, s, hkv, g, tq, d, page = 2, 48, 2, 2, 2, 16, 8
    mag = np.repeat(10.0 ** rng.uniform(-6, 6, size=(b, s // page, hkv, 1)), page, axis=1)
    k = jnp.asarray(rng.normal(size=(b, s, hkv, d)) * mag, jnp.float32)
    q = jnp.asarray(rng.normal(size=(b, tq, hkv * g, d)), jnp.float32)
    pos = jnp.asarray(np.where(np.arange(s)[None] < np.array([[s], [s - 13]]), np.arange(s)[None], -1), jnp.int32)
    kmin, kmax = Q.page_bounds(k, pos, page)
    valid = Q.valid_pages(pos, page)
    exact = np.asarray(Q.quest_page_scores(q, kmin, kmax, valid))
    lo, hi, scale = Q.bound_codes(kmin, kmax, jnp.float8_e4m3fn)
    got = np.asarray(jax.jit(Q.quest_page_scores)(q, lo, hi, valid, bound_scale=scale))
    assert np.array_equal(np.isinf(got), np.isinf(exact)) and np.isinf(exact).sum() == hkv   # one empty page
    fin = np.isfinite(exact)
    assert np.all(got[fin] >= exact[fin] * (1 - 1e-6) - 1e-6 * np.abs(exact[fin]))
    logits = np.einsum("btngd,bsnd->bnsgt", np.asarray(q, np.float64).reshape(b, tq, hkv, g, d),
                       np.asarray(k, np.float64)) / np.sqrt(d)
    true = logits.reshape(b, hkv, s // page, page, g * tq).max(axis=(3, 4))
    assert np.all((got >= true - 1e-5 * np.abs(true)) | ~np.asarray(valid)[:, None])


def _structured(seed, b=1, s=4096, hkv=2, d=64, page=16):
    """Keys: a shared channel mean (a few large channels, as in LLM keys) + a per-page
    latent + token noise; queries: half random, half aligned with one page's latent."""
    rng = np.random.default_rng(seed)
    p = s // page
    mu = rng.normal(size=d) * np.where(rng.random(d) < 0.1, 8.0, 1.0)
    lat = rng.normal(size=(b, p, hkv, d))
    k = mu + np.repeat(lat, page, axis=1) + 0.5 * rng.normal(size=(b, s, hkv, d))
    q = rng.normal(size=(b, 1, hkv * 2, d))
    target = rng.integers(0, p, size=hkv)                                         # per kv head
    q[:, 0, ::2] += 2 * lat[:, target, np.arange(hkv)]                           # the group's first head
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    return jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16), pos, target


def test_float8_bounds_select_nearly_the_pages_of_bfloat16_bounds():
    """Structured bfloat16 keys, 256 pages of 16, budget 1/16: the pages chosen from float8
    bounds overlap those of the exact bounds by >= 85% on average, >= 70% each (measured:
    mean 0.92, min 0.75 = 12 of 16), and both keep the page a query was aligned with."""
    page, budget = 16, 16
    overlaps = []
    for seed in range(3):
        q, k, pos, target = _structured(seed)
        kmin, kmax = Q.page_bounds(k, pos, page)
        valid = Q.valid_pages(pos, page)
        want = Q.select_top_pages(Q.quest_page_scores(q, kmin, kmax, valid), budget, valid, always=())[0]
        lo, hi, sc = Q.bound_codes(kmin, kmax, "float8_e4m3fn")
        got = Q.select_top_pages(Q.quest_page_scores(q, lo, hi, valid, bound_scale=sc), budget, valid, always=())[0]
        for h, (w, g_) in enumerate(zip(np.asarray(want)[0], np.asarray(got)[0])):
            overlaps.append(len(set(w.tolist()) & set(g_.tolist())) / budget)
            assert target[h] in w and target[h] in g_
    assert min(overlaps) >= 0.7 and np.mean(overlaps) >= 0.85, overlaps


def test_quest_decode_with_float8_bounds_and_every_page_equals_dense_decode():
    k, v, pos = _cache(s=37, lengths=(37, 20))
    q = jax.random.normal(jax.random.key(7), (2, 1, 4, 8))
    bounds = Q.bound_codes(*Q.page_bounds(k, pos, 8), "float8_e4m3fn")
    out = Q.quest_decode(q, k, v, pos, page_size=8, budget_pages=5, bounds=bounds, impl="xla")
    np.testing.assert_allclose(out, decode_attention(q, k, v, kv_positions=pos, impl="xla"), atol=2e-5, rtol=2e-5)


def test_bounds_dtype_checks():
    for bad in ("int8", "float16", "float8_e4m3fnuz", jnp.bfloat16):
        with pytest.raises(ValueError, match="bounds_dtype"):
            QuestKVCache.init(1, 8, 1, 4, page_size=4, bounds_dtype=bad)          # float32 cache
    assert QuestKVCache.init(1, 8, 2, 4, page_size=4, bounds_dtype="float32").bound_scale.shape == (1, 2, 2, 0)
    kmin, kmax = Q.page_bounds(jnp.ones((1, 8, 1, 4)), jnp.arange(8, dtype=jnp.int32)[None], 4)
    lo, hi, sc = Q.bound_codes(kmin, kmax, "float8_e4m3fn")
    valid = jnp.ones((1, 2), bool)
    with pytest.raises(ValueError, match="bound_scale"):
        Q.quest_page_scores(jnp.ones((1, 1, 2, 4)), lo, hi, valid)
    with pytest.raises(ValueError, match="bound_scale"):
        Q.quest_page_scores(jnp.ones((1, 1, 2, 4)), kmin, kmax, valid, bound_scale=sc)
    for bad in (valid[:, :1], valid.astype(jnp.int32)):
        with pytest.raises(ValueError, match="valid_pages must be bool"):
            Q.quest_page_scores(jnp.ones((1, 1, 2, 4)), kmin, kmax, bad)


@pytest.mark.parametrize("bounds_dtype", [None, "float8_e4m3fn"])
def test_page_scores_kernel_equals_the_xla_scores(bounds_dtype):
    """The Triton page-score kernel (interpret mode) against the XLA scores: GQA 2 x Tq 3
    (6 query rows, padded to 8), ragged rows with empty pages, P = 12 (blocks of 4 pages)."""
    k, _, pos = _cache(b=2, s=45, hkv=2, d=8, seed=3, lengths=(45, 17))
    q = jax.random.normal(jax.random.key(4), (2, 3, 4, 8))
    kmin, kmax = Q.page_bounds(k, pos, 4)                                           # P = 12
    lo, hi, sc = Q.bound_codes(kmin, kmax, kmin.dtype if bounds_dtype is None else bounds_dtype)
    valid = Q.valid_pages(pos, 4)
    want = Q.quest_page_scores(q, lo, hi, valid, bound_scale=sc)
    got = Q.quest_page_scores(q, lo, hi, valid, bound_scale=sc, impl="triton", interpret=True)
    assert np.isinf(np.asarray(want)).sum() == 2 * 7                                # row 1: pages 5..11 empty
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="impl"):
        Q.quest_page_scores(q, lo, hi, valid, bound_scale=sc, impl="cuda")
    with pytest.raises(ValueError, match="not a power of two"):
        Q.quest_page_scores(q[..., :6], lo[..., :6], hi[..., :6], valid, bound_scale=sc, impl="triton",
                            interpret=True)


@pytest.mark.parametrize("bounds_dtype", [None, "float8_e4m3fn"])
def test_page_scores_kernel_tensor_core_form_equals_the_xla_scores(bounds_dtype):
    """`PageScoresConfig(dot=True)` (interpret mode): bf16 q and keys, GQA 4 x Tq 2 (8 rows,
    padded to 16), ragged rows, P = 16 in one block; its limits raise."""
    from pallas_kernels.page_scores.api import PageScoresConfig, page_scores

    k, _, pos = _cache(b=2, s=61, hkv=2, d=16, seed=5, lengths=(61, 23))
    k = k.astype(jnp.bfloat16)
    q = jax.random.normal(jax.random.key(6), (2, 2, 8, 16), jnp.bfloat16)
    kmin, kmax = Q.page_bounds(k, pos, 4)                                           # P = 16
    lo, hi, sc = Q.bound_codes(kmin, kmax, kmin.dtype if bounds_dtype is None else bounds_dtype)
    sc = sc if sc.shape[-1] else None
    valid = Q.valid_pages(pos, 4)
    want = page_scores(q, lo, hi, valid, sc, impl="xla")
    cfg = PageScoresConfig(block_pages=16, dot=True)
    got = page_scores(q, lo, hi, valid, sc, impl="triton", interpret=True, config=cfg)
    assert np.isinf(np.asarray(want)).sum() == 2 * 10                               # row 1: pages 6..15 empty
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="16-bit q"):
        page_scores(q.astype(jnp.float32), lo, hi, valid, sc, impl="triton", interpret=True, config=cfg)
    with pytest.raises(ValueError, match=">= 16 pages per program"):
        page_scores(q, lo, hi, valid, sc, impl="triton", interpret=True,
                    config=PageScoresConfig(block_pages=8, dot=True))
