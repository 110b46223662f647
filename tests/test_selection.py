"""`sparse_jax.ops.selection` against numpy brute force: top-k with forced blocks and the
ties rule, the `[B, T, Hkv, k]` layout, the union over query blocks (ragged rows, lengths
not multiples of the blocks) and the compaction to the decode form."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import masked_attention
from pallas_kernels.nsa_select.reference import top_blocks
from sparse_jax.ops import nsa
from sparse_jax.ops import selection as sel


def brute_top_k(scores, candidates, k, forced):
    """Per row of `[..., nK]`: forced candidates (ascending), then the other candidates by
    descending score, ties to the lower index; `min(k, nK)` slots, -1 padded."""
    n = scores.shape[-1]
    width = min(k, n)
    out = np.full(scores.shape[:-1] + (width,), -1, np.int64)
    for row in np.ndindex(scores.shape[:-1]):
        cand = [j for j in range(n) if candidates[row][j]]
        first = [j for j in cand if forced[row][j]]
        rest = sorted((j for j in cand if not forced[row][j]), key=lambda j: (-scores[row][j], j))
        chosen = (first + rest)[:width]
        out[row][:len(chosen)] = chosen
    return out


def random_case(seed, b=2, hkv=3, t=11, nk=7, levels=3):
    """Scores with many ties (`levels` distinct values), random candidates and forced."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, (b, hkv, t, nk)).astype(np.float32)
    candidates = rng.random((b, hkv, t, nk)) < 0.6
    forced = rng.random((b, hkv, t, nk)) < 0.15
    return scores, candidates, forced


@pytest.mark.parametrize("seed,k", [(0, 3), (1, 1), (2, 7), (3, 12)])
def test_select_top_k_equals_brute_force_with_ties_and_forced(seed, k):
    scores, cand, forced = random_case(seed)
    got = np.asarray(sel.select_top_k(jnp.asarray(scores), jnp.asarray(cand), k, forced=jnp.asarray(forced)))
    want = brute_top_k(scores, cand, k, forced & cand)
    assert got.shape == (2, 11, 3, min(k, 7))                               # [B, T, Hkv, k]
    np.testing.assert_array_equal(got, np.swapaxes(want, 1, 2))


def test_select_top_k_ties_go_to_lower_index_and_layout():
    scores = np.zeros((1, 2, 3, 5), np.float32)                              # all tied
    scores[0, 1, 2] = [0, 1, 1, 0, 1]
    got = np.asarray(sel.select_top_k(jnp.asarray(scores), True, 2))
    assert got.shape == (1, 3, 2, 2)
    np.testing.assert_array_equal(got[0, :, 0], [[0, 1]] * 3)
    np.testing.assert_array_equal(got[0, 2, 1], [1, 2])                     # (batch, query 2, kv head 1)
    np.testing.assert_array_equal(np.asarray(sel.ascending(jnp.asarray([[3, -1, 0, 2]]))), [[0, 2, 3, -1]])


def test_select_top_k_bad_arguments_raise():
    s = jnp.zeros((1, 1, 2, 4))
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        sel.select_top_k(s, True, 0)
    with pytest.raises(ValueError, match=r"scores must be \[B, Hkv, T, nK\]"):
        sel.select_top_k(s[0], True, 2)
    with pytest.raises(ValueError, match=r"block_indices must be int \[B, T, Hkv, k\]"):
        sel.selected_mask(jnp.zeros((2, 3, 4), jnp.int32), 4)
    with pytest.raises(ValueError, match="query_block must be an int >= 1"):
        sel.union_metadata(jnp.zeros((1, 2, 1, 1), jnp.int32), jnp.zeros((1, 2), jnp.int32),
                           jnp.zeros((1, 2), jnp.int32), block_size=1, query_block=0)


def random_selection(seed, b, t, hkv, k, nk):
    """Distinct random blocks per (b, t, h), -1 padded at the end of each row."""
    rng = np.random.default_rng(seed)
    idx = np.full((b, t, hkv, k), -1, np.int32)
    for row in np.ndindex(b, t, hkv):
        n = rng.integers(0, min(k, nk) + 1)
        idx[row][:n] = rng.choice(nk, n, replace=False)
    return idx


def ragged_positions(t, lengths, left_pad=0):
    pos = np.full((len(lengths), t), -1, np.int32)
    for i, n in enumerate(lengths):
        pos[i, left_pad:left_pad + n] = np.arange(n)
    return pos


def test_selected_mask_is_the_one_hot_of_the_selection():
    idx = random_selection(4, 2, 5, 3, 3, 6)
    got = np.asarray(sel.selected_mask(jnp.asarray(idx), 6))
    want = np.zeros((2, 5, 3, 6), bool)
    for row in np.ndindex(2, 5, 3):
        want[row][[j for j in idx[row] if j >= 0]] = True
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("t,tk,bs,qb,k", [(13, 13, 4, 4, 2), (10, 23, 5, 3, 3), (7, 7, 8, 16, 2), (9, 9, 3, 1, 2)])
def test_union_metadata_equals_set_union_over_query_blocks(t, tk, bs, qb, k):
    """Ragged rows, T not a multiple of query_block, Tk not a multiple of block_size."""
    b, hkv = 2, 2
    nk = -(-tk // bs)
    idx = random_selection(t + tk, b, t, hkv, k, nk)
    qpos = ragged_positions(t, (t, t - 3))
    kvpos = ragged_positions(tk, (tk, tk - 4))
    meta = sel.union_metadata(jnp.asarray(idx), jnp.asarray(qpos), jnp.asarray(kvpos), block_size=bs,
                              query_block=qb)
    nq, width = -(-t // qb), min(qb * k, nk)
    assert (meta.block_q, meta.block_kv) == (qb, bs)
    assert meta.kv_block_indices.shape == (b, hkv, nq, width) == meta.kv_block_full.shape
    ind, cnt, full = (np.asarray(a) for a in (meta.kv_block_indices, meta.kv_block_counts, meta.kv_block_full))
    for bi, hi, qi in np.ndindex(b, hkv, nq):
        tokens = range(qi * qb, min((qi + 1) * qb, t))
        union = sorted({int(j) for ti in tokens for j in idx[bi, ti, hi] if j >= 0})
        n = cnt[bi, hi, qi]
        assert ind[bi, hi, qi, :n].tolist() == union
        assert (ind[bi, hi, qi, n:] == (union[-1] if union else 0)).all()   # padding repeats the last
        qp = qpos[bi, qi * qb:(qi + 1) * qb]
        q_ok = len(qp) == qb and (qp >= 0).all()
        for s, j in enumerate(ind[bi, hi, qi]):
            kp = np.concatenate([kvpos[bi, j * bs:(j + 1) * bs], np.full(bs, -1)])[:bs]
            want = s < n and q_ok and (kp >= 0).all() and kp.max() <= qp.min()
            assert full[bi, hi, qi, s] == want, (bi, hi, qi, s)


def test_block_lists_is_the_union_over_the_call_in_decode_form():
    idx = random_selection(9, 3, 4, 2, 3, 8)
    idx[2] = -1                                                              # a row selecting nothing
    got, counts = (np.asarray(a) for a in sel.block_lists(jnp.asarray(idx), 8))
    assert got.shape == (3, 2, 8) and counts.shape == (3, 2)
    for bi, hi in np.ndindex(3, 2):
        union = sorted({int(j) for j in idx[bi, :, hi].ravel() if j >= 0})
        assert counts[bi, hi] == len(union)
        assert got[bi, hi, :len(union)].tolist() == union
        assert (got[bi, hi, len(union):] == (union[-1] if union else 0)).all()


@pytest.mark.parametrize("qb", [1, 4])
def test_selected_block_attention_equals_dense_mask(qb):
    """Exact (query_block=1) and union (query_block=4, T=10 not a multiple) against the dense
    mask of the same (union) selection; ragged rows."""
    b, t, h, hkv, d, bs = 2, 10, 4, 2, 8, 4
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)).astype(np.float32)) for n in (h, hkv, hkv))
    pos = jnp.asarray(ragged_positions(t, (t, 7)))
    idx = random_selection(6, b, t, hkv, 2, -(-t // bs))
    union = np.full((b, t, hkv, qb * 2), -1, np.int32)                        # each token: its block's union
    for bi, ti, hi in np.ndindex(b, t, hkv):
        first = ti - ti % qb
        blocks = sorted({int(j) for j in idx[bi, first:first + qb, hi].ravel() if j >= 0})
        union[bi, ti, hi, :len(blocks)] = blocks
    mask = sel.selected_block_dense_mask(pos, pos, jnp.asarray(union), bs)
    want, _, _ = masked_attention(q, k, v, mask, scale=d ** -0.5)
    got = sel.selected_block_attention(q, k, v, pos, pos, jnp.asarray(idx), block_size=bs, query_block=qb,
                                       impl="xla")
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_nsa_select_blocks_equals_the_kernel_reference():
    """`ops.nsa.select_blocks` (this module's top-k) keeps the `nsa_select` kernels' order."""
    cfg = nsa.NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, num_selected=4, num_initial=1, num_local=2)
    scores, _, _ = random_case(7, b=2, hkv=2, t=40, nk=5, levels=4)
    pos = jnp.asarray(ragged_positions(40, (40, 29), left_pad=0))
    got = nsa.select_blocks(jnp.asarray(scores), pos, cfg)
    want = top_blocks(jnp.asarray(scores), pos, sel_block=8, num_selected=4, num_initial=1, num_local=2)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
