"""Quest page bounds / scores / selection, top-p, quest_decode and QuestKVCache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.decode.api import decode_attention
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
    assert kmin.shape == (b, 5, hkv, d)
    for r in range(b):
        for p in range(5):
            sl = [i for i in range(p * 8, min(s, p * 8 + 8)) if pn[r, i] >= 0]
            if not sl:
                assert np.all(np.asarray(kmin[r, p]) == np.inf) and np.all(np.asarray(kmax[r, p]) == -np.inf)
                continue
            np.testing.assert_array_equal(kmin[r, p], kn[r, sl].min(0))
            np.testing.assert_array_equal(kmax[r, p], kn[r, sl].max(0))


@settings(max_examples=10)
@given(seed=st.integers(0, 10_000), page=st.sampled_from([3, 8]))
def test_quest_bound_is_at_least_the_true_max_logit_of_every_page(seed, page):
    g, tq = 2, 2                                            # GQA group and Tq > 1: the max reduction
    k, _, pos = _cache(seed=seed, s=13, lengths=(13, 6))
    q = jax.random.normal(jax.random.key(seed + 1), (2, tq, 2 * g, 8))
    scores = Q.quest_page_scores(q, *Q.page_bounds(k, pos, page))            # [B, Hkv, P]
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


def test_quest_decode_finds_the_needle_page():
    b, s, hkv, d, page = 1, 64, 1, 16, 8
    k = 0.1 * jax.random.normal(jax.random.key(0), (b, s, hkv, d))
    v = jax.random.normal(jax.random.key(1), (b, s, hkv, d))
    q = jnp.zeros((b, 1, 2, d)).at[..., 3].set(4.0)
    k = k.at[0, 29, 0, 3].set(10.0)                                          # needle in page 3
    pos = jnp.arange(s, dtype=jnp.int32)[None]
    kmin, kmax = Q.page_bounds(k, pos, page)
    idx, cnt = Q.select_top_pages(Q.quest_page_scores(q, kmin, kmax), 1, Q.valid_pages(pos, page), always=())
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


def test_quest_cache_bounds_after_token_by_token_writes_equal_page_bounds():
    b, s, hkv, d, page = 2, 21, 2, 4, 4
    k, v, _ = _cache(b=b, s=s, hkv=hkv, d=d, lengths=(s, s))
    cache = QuestKVCache.init(b, s, hkv, d, page_size=page)
    assert cache.nbytes() == cache.full.nbytes() + 2 * b * 6 * hkv * d * 4
    lengths = (s, 13)                                                        # row 1 stops early: ragged
    step = jax.jit(lambda c, kk, vv, pp: c.update(kk, vv, pp)[3])
    pos0 = jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (b, 3))
    cache = step(cache, k[:, :3], v[:, :3], pos0)
    for t in range(3, s):
        p = jnp.asarray([[t if t < n else -1] for n in lengths], jnp.int32)
        cache = step(cache, k[:, t:t + 1], v[:, t:t + 1], p)
    want = Q.page_bounds(cache.k, cache.positions, page)
    np.testing.assert_array_equal(cache.kmin, want[0])
    np.testing.assert_array_equal(cache.kmax, want[1])
    assert int((cache.positions[1] >= 0).sum()) == 13
    big = cache.update(k, v, jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)))[3]   # refresh-all path
    want = Q.page_bounds(k, jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)), page)
    np.testing.assert_array_equal(big.kmin, want[0])


def test_jitted_bf16_scores_match_the_numpy_formula():
    """GQA group 4, bf16, under jit (an earlier two-matmul form broke here on XLA:CPU)."""
    k = jax.random.normal(jax.random.key(0), (2, 64, 2, 16), jnp.bfloat16)
    q = jax.random.normal(jax.random.key(1), (2, 1, 8, 16), jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(64, dtype=jnp.int32), (2, 64))
    kmin, kmax = Q.page_bounds(k, pos, 8)
    got = jax.jit(Q.quest_page_scores)(q, kmin, kmax)
    qn = np.asarray(q, np.float32).reshape(2, 2, 4, 16)
    lo, hi = np.asarray(kmin, np.float32), np.asarray(kmax, np.float32)
    want = np.maximum(qn[:, None] * hi[:, :, :, None], qn[:, None] * lo[:, :, :, None]).sum(-1).max(-1) / 4
    np.testing.assert_allclose(got, want.transpose(0, 2, 1), rtol=1e-5, atol=1e-5)
