"""MInference and FlexPrefill sparse prefill: estimators, search, metadata, attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import masked_attention
from sparse_jax.ops import flexprefill as F
from sparse_jax.ops import sparse_prefill as S

B, T, H, HKV, D, BS = 2, 40, 4, 2, 16, 16          # T not a multiple of the block size
LENGTHS = (40, 29)                                  # ragged: row 1 padded (-1) past 29


def _inputs(seed=0, t=T, h=H, hkv=HKV, d=D, lengths=LENGTHS):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, t, h, d))
    k = jax.random.normal(ks[1], (B, t, hkv, d))
    v = jax.random.normal(ks[2], (B, t, hkv, d))
    w = jax.random.normal(ks[3], (B, t, h, d))
    slots = np.arange(t)[None]
    pos = jnp.asarray(np.where(slots < np.asarray(lengths)[:, None], slots, -1), jnp.int32)
    return q, k, v, w, pos


def _dense_causal(q, k, v, pos):
    mask = (pos[:, None, :] <= pos[:, :, None]) & (pos[:, None, :] >= 0) & (pos[:, :, None] >= 0)
    return masked_attention(q, k, v, mask, scale=q.shape[-1] ** -0.5)[0]


def _check_fwd_and_grads(f, q, k, v, w, pos):
    loss = lambda g: lambda q_, k_, v_: (g(q_, k_, v_) * w).sum()             # noqa: E731
    out, ref = jax.jit(f)(q, k, v), _dense_causal(q, k, v, pos)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    got = jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(lambda a, b, c: _dense_causal(a, b, c, pos)), argnums=(0, 1, 2))(q, k, v)
    for g_, w_ in zip(got, want):
        np.testing.assert_allclose(g_, w_, atol=5e-5, rtol=5e-5)


FULL = S.MInferenceBudget(block_size=BS, last_q=8, sink_blocks=0, local_blocks=3, num_vertical=T,
                          num_slash=T, top_blocks=3)
IMPLS = [("xla", False), ("triton", True)]


@pytest.mark.parametrize("impl,interpret", IMPLS)
def test_minference_mixed_patterns_at_full_budget_equal_dense_causal(impl, interpret):
    """Every pattern type at its full budget (the GQA groups mix types)."""
    q, k, v, w, pos = _inputs(1)
    patterns = ("block_sparse", "a_shape", "vertical_slash", "a_shape")
    f = lambda a, b, c: S.minference_prefill(a, b, c, patterns, FULL, positions=pos, impl=impl,  # noqa: E731
                                             interpret=interpret)
    _check_fwd_and_grads(f, q, k, v, w, pos)


@pytest.mark.parametrize("impl,interpret", IMPLS)
def test_flexprefill_at_gamma_one_equals_dense_causal(impl, interpret):
    q, k, v, w, pos = _inputs(2)
    cfg = F.FlexPrefillConfig(block_size=BS, gamma=1.0)
    f = lambda a, b, c: F.flexprefill_prefill(a, b, c, cfg, positions=pos, impl=impl,  # noqa: E731
                                              interpret=interpret)
    _check_fwd_and_grads(f, q, k, v, w, pos)


def test_sparse_metadata_attends_exactly_its_blocks():
    """Partial budget: the output equals masked attention over (listed blocks & causal)."""
    q, k, v, _, pos = _inputs(3)
    bs, n = 4, 10
    budget = S.MInferenceBudget(block_size=bs, last_q=4, sink_blocks=1, local_blocks=1, num_vertical=2,
                                num_slash=2, top_blocks=1)
    patterns = ("vertical_slash", "block_sparse", "a_shape", "vertical_slash")
    meta = jax.jit(lambda a, b: S.minference_metadata(a, b, patterns, budget, pos))(q, k)
    present, _ = meta.to_block_mask(n)
    heads = jax.jit(lambda a, b: S.minference_blocks(a, b, patterns, budget, pos))(q, k)   # [B, H, n, n]
    reach = S.reachable_blocks(pos, bs)[:, None]
    union = np.asarray((heads & reach).reshape(B, HKV, H // HKV, n, n).any(2))
    assert (np.asarray(present) >= union).all()                              # GQA group: union of heads
    assert (np.asarray(present) <= union | np.eye(n, dtype=bool)).all()      # plus the diagonal only
    counts = np.asarray(meta.kv_block_counts)
    rows = np.asarray(reach).sum(-1)[:, 0]                                  # [B, nQ]
    assert counts.sum() < HKV * rows.sum()                                  # sparse
    assert (counts >= np.minimum(rows, 1)[:, None]).all()                   # never empty where queries are
    listed = jnp.repeat(jnp.repeat(present, bs, 2), bs, 3)[:, :, :T, :T]
    causal = (pos[:, None, :] <= pos[:, :, None]) & (pos[:, None, :] >= 0) & (pos[:, :, None] >= 0)
    ref = masked_attention(q, k, v, listed & causal[:, None], scale=D ** -0.5)[0]
    out = S.minference_prefill(q, k, v, patterns, budget, positions=pos, metadata=meta, impl="xla")
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    lo, hi, pad = (np.asarray(x) for x in S.block_extents(pos, bs))
    idx, cnt, full = (np.asarray(x) for x in (meta.kv_block_indices, meta.kv_block_counts, meta.kv_block_full))
    for b in range(B):
        for i in range(n):
            for s in range(cnt[b, 0, i]):
                j = idx[b, 0, i, s]
                assert full[b, 0, i, s] == (hi[b, j] <= lo[b, i] and not pad[b, i] and not pad[b, j])


def _planted(t=64, d=16, seed=0):
    ks = jax.random.split(jax.random.key(seed), 2)
    return (jax.random.normal(ks[0], (1, t, 1, d)), jax.random.normal(ks[1], (1, t, 1, d)),
            jnp.arange(t, dtype=jnp.int32)[None])


def test_vertical_slash_finds_a_planted_column():
    q, k, pos = _planted()
    u = jnp.zeros(16).at[0].set(1.0)
    q = 0.3 * q + 4.0 * u
    k = k.at[0, 21, 0].set(4.0 * u)                                          # column 21, block 2
    budget = S.MInferenceBudget(block_size=8, last_q=8, num_vertical=1, num_slash=1)
    m = np.asarray(S.vertical_slash_blocks(q, k, pos, budget))[0, 0]          # [8, 8]
    assert m[2:, 2].all()
    m = np.tril(m)
    assert m.sum(-1).max() <= 3 and m.sum() < 0.5 * 36                       # 1 column + 1 diagonal (2 blocks)


def test_vertical_slash_finds_a_planted_diagonal():
    q, k, pos = _planted()
    o = 11
    q = q.at[:, o:].set(2.0 * k[:, :-o])                                     # q_i . k_{i-o} large
    probs = S.causal_probs(q[:, -8:], pos[:, -8:], k, pos, 0.25)
    _, slash = S.vertical_slash_scores(probs, pos[:, -8:])
    assert int(jnp.argmax(slash[0, 0])) == o
    budget = S.MInferenceBudget(block_size=8, last_q=8, num_vertical=1, num_slash=1)
    m = np.asarray(S.vertical_slash_blocks(q, k, pos, budget))[0, 0]
    for i in range(8):
        for j in {i - 1, i - 2}:                                             # o = 1 * 8 + 3: diagonals 1, 2
            if j >= 0:
                assert m[i, j], (i, j)


def test_block_sparse_finds_a_planted_block():
    q, k, pos = _planted()
    u = jnp.zeros(16).at[5].set(1.0)
    q = (0.1 * q).at[:, 40:48].add(3.0 * u)                                  # query block 5
    k = (0.1 * k).at[:, 16:24].add(3.0 * u)                                  # key block 2
    budget = S.MInferenceBudget(block_size=8, top_blocks=1)
    m = np.asarray(S.block_sparse_blocks(q, k, pos, budget))[0, 0]
    assert m[5].tolist() == [j == 2 for j in range(8)]
    assert (m.sum(-1) == 1).all()


def test_a_shape_blocks():
    q = jnp.zeros((1, 40, 1, 4))
    m = np.asarray(S.a_shape_blocks(q, None, S.MInferenceBudget(block_size=8, sink_blocks=1, local_blocks=2)))
    assert m[0, 0, 4].tolist() == [True, False, False, True, True]


def test_search_picks_vertical_slash_for_a_diagonal_head_and_recall_is_one_for_every_block():
    q, k, pos = _planted()
    o = 19
    qd = q.at[:, o:].set(2.0 * k[:, :-o])
    q2 = jnp.concatenate([qd, q], axis=2)                                    # head 0 diagonal, head 1 random
    k2 = jnp.concatenate([k, k], axis=2)
    budget = S.MInferenceBudget(block_size=8, last_q=8, sink_blocks=1, local_blocks=1, num_vertical=1,
                                num_slash=1, top_blocks=1)
    patterns, recall = S.search_head_patterns(q2, k2, budget, pos)
    assert patterns[0] == "vertical_slash" and recall.shape == (3, 2)
    assert float(recall[1, 0]) > max(float(recall[0, 0]), float(recall[2, 0])) + 0.05
    every = jnp.ones((1, 2, 8, 8), bool)
    np.testing.assert_allclose(S.block_mask_recall(q2, k2, every, 8, pos), 1.0, atol=1e-5)


def test_flexprefill_choice_by_divergence():
    t, d = 64, 16
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    u = jnp.zeros(d).at[0].set(1.0)
    k = jnp.zeros((1, t, 1, d))                                              # uniform attention:
    q = jnp.ones((1, t, 1, d))                                               # pooled estimate is exact
    cfg = F.FlexPrefillConfig(block_size=8, gamma=0.9, tau=0.1)
    _, qa = F.flexprefill_blocks(q, k, pos, cfg)
    assert bool(qa[0, 0])
    k = k.at[0, 17, 0].set(40.0 * u).at[0, 18, 0].set(-40.0 * u)               # spike; block 2's mean is 0
    q = jnp.broadcast_to(u, (1, t, 1, d))
    blocks, qa = F.flexprefill_blocks(q, k, pos, cfg)
    assert not bool(qa[0, 0])                                                # vertical-slash
    m = np.asarray(blocks)[0, 0]
    assert m[2:, 2].all() and m.sum() < 0.6 * m.size


def test_cumulative_take_hand_built():
    w = jnp.array([0.1, 0.5, 0.05, 0.35])
    elig = jnp.ones(4, bool)
    assert F.cumulative_take(w, 0.5, elig).tolist() == [False, True, False, False]
    assert F.cumulative_take(w, 0.84, elig).tolist() == [False, True, False, True]
    assert F.cumulative_take(w, 0.86, elig).tolist() == [True, True, False, True]
    assert F.cumulative_take(w, 0.9, elig.at[1].set(False)).tolist() == [True, False, False, True]


def test_argument_checks():
    q, k, v, _, pos = _inputs()
    with pytest.raises(ValueError, match="head_patterns"):
        S.minference_prefill(q, k, v, ("a_shape",) * 3, FULL, positions=pos)
    with pytest.raises(ValueError, match="head_patterns"):
        S.minference_prefill(q, k, v, ("dense",) * H, FULL, positions=pos)
    with pytest.raises(ValueError, match="top_blocks"):
        S.MInferenceBudget(top_blocks=0)
    with pytest.raises(ValueError, match="gamma"):
        F.FlexPrefillConfig(gamma=1.5)
    with pytest.raises(ValueError, match="positions"):
        S.minference_prefill(q, k, v, ("a_shape",) * H, FULL, positions=pos[:, :3])
    with pytest.raises(ValueError, match="self-attention"):
        S.minference_prefill(q, k[:, :5], v[:, :5], ("a_shape",) * H, FULL)
