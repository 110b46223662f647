"""Verified sparse attention (vAttention): the op, its budget formula and bound, the cache
and the `VAttention` policy through a `SparseLM`."""

import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_jax.cache.base import Queries
from sparse_jax.cache.verified import VerifiedKVCache
from sparse_jax.kv_policies import VAttention, policy_caches
from policy_testing import generate, policy_model, ragged_batch
from sparse_jax.ops import verified as V


_STATIC = ("epsilon", "delta", "num_sinks", "window", "top_k", "base_samples", "base_rate", "mode", "estimate")
_attention = jax.jit(V.verified_attention, static_argnames=_STATIC)
_selection = jax.jit(V.verified_selection, static_argnames=_STATIC)
_dense = jax.jit(V.dense_attention)


def _inputs(seed, b=2, s=300, hkv=2, g=2, d=16, tq=1, q_scale=0.5, v_mean=3.0, lengths=None, dtype=jnp.float32):
    """Flat-ish logits (|q| small) and values with a common mean, so the output bound needs
    a sample well below the residual. Row r holds `lengths[r]` keys; queries follow them."""
    r = np.random.default_rng(seed)
    lengths = (s,) * b if lengths is None else lengths
    q = q_scale * r.normal(size=(b, tq, hkv * g, d))
    k = r.normal(size=(b, s, hkv, d))
    v = v_mean + r.normal(size=(b, s, hkv, d))
    slots = np.arange(s)[None]
    kvp = np.where(slots < np.asarray(lengths)[:, None], slots, -1)
    qp = np.asarray(lengths)[:, None] - tq + np.arange(tq)[None]
    cast = lambda x: jnp.asarray(x, dtype)
    return cast(q), cast(k), cast(v), jnp.asarray(kvp, jnp.int32), jnp.asarray(qp, jnp.int32)


@pytest.mark.parametrize("g,tq,dtype", [(1, 1, jnp.float32), (4, 2, jnp.bfloat16), (16, 1, jnp.float32)])
def test_epsilon_zero_or_full_sample_equals_dense_exactly(g, tq, dtype):
    """epsilon = 0 reads every key at log-weight 0: bit-equal to dense attention (ragged rows,
    GQA, a 2-query decode chunk, bf16); so does a residual small enough to be fully sampled."""
    q, k, v, kvp, qp = _inputs(0, s=61, g=g, tq=tq, lengths=(61, 37), dtype=dtype)
    want = _dense(q, k, v, kvp, qp)
    out, sel = _attention(q, k, v, kvp, qp, jax.random.key(0), epsilon=0.0, window=4, top_k=3)
    assert np.all(np.asarray(sel.budget) == np.asarray(sel.n_rest)) and int(sel.n_rest.min()) > 20
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))
    out, sel = _attention(q, k, v, kvp, qp, jax.random.key(1), epsilon=0.3, window=4, top_k=3,
                                    base_samples=64)                                   # base covers it
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))


def test_sample_budget_formula_by_hand():
    z = statistics.NormalDist().inv_cdf(1 - 0.05 / 2)                  # 1.95996
    got = V.sample_budget(jnp.array([1000, 1000, 10, 5, 0, 50]), jnp.array([0.1, 2.0, 1.0, 0.0, 1.0, 1.0]),
                          jnp.array([10.0, 1.0, 100.0, 1.0, 1.0, 0.0]), 0.05)
    assert got.tolist() == [int(np.ceil((z * 1000 * 0.1 / 10) ** 2)), 1000, 1, 1, 0, 50]
    assert got[0] == 385                                                # (19.5996)^2 = 384.1


def _stats(q, k, v, kvp, qp, sel, epsilon, delta, mode):
    """numpy: each query head's formula budget from the exact residual statistics."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, tq, h, d = q.shape
    hkv = k.shape[2]
    kvp_, qp_ = np.asarray(kvp), np.asarray(qp)
    det = np.asarray(sel.deterministic)
    res = ~det & (kvp_[:, None] >= 0) & (kvp_[:, None] <= qp_.min(1)[:, None, None])     # [B, Hkv, S]
    eps_n, eps_d, de = V.split_tolerance(epsilon, delta, mode)
    z = statistics.NormalDist().inv_cdf(1 - de / 2)
    want = np.zeros((b, tq, h), int)
    for r in range(b):
        for t in range(tq):
            for hh in range(h):
                kv = hh // (h // hkv)
                vis = (kvp_[r] >= 0) & (kvp_[r] <= qp_[r, t])
                s = k[r, :, kv] @ q[r, t, hh] / np.sqrt(d)
                e = np.exp(s - s[vis].max())
                R = res[r, kv]
                n = R.sum()
                fixed = det[r, kv] & vis
                dd = e[fixed].sum() + n * e[R].mean()
                nn = np.linalg.norm(e[fixed] @ v[r, fixed, kv] + n * (e[R, None] * v[r, R, kv]).mean(0))
                bd = (z * n * e[R].std() / (eps_d * dd)) ** 2
                bn = (z * n * np.sqrt((e[R, None] * v[r, R, kv]).var(0).sum()) / (eps_n * nn)) ** 2 if eps_n else 0
                want[r, t, hh] = min(n, max(np.ceil(bd - 1e-4), np.ceil(bn - 1e-4), 1))
    return want


@pytest.mark.parametrize("mode", ["output", "denominator"])
def test_chosen_sample_size_follows_the_stated_formula(mode):
    """estimate="exact": each query head's budget is the CLT formula on the exact residual
    statistics (numpy, float64), and the kv head samples the max over its group."""
    eps, delta = (0.3, 0.1) if mode == "output" else (0.05, 0.1)
    q, k, v, kvp, qp = _inputs(1, s=300, g=2, tq=2, lengths=(300, 211), q_scale=0.3)
    sel = _selection(q, k, v, kvp, qp, jax.random.key(0), epsilon=eps, delta=delta, estimate="exact",
                               mode=mode, window=8, top_k=8, num_sinks=2)
    want = _stats(q, k, v, kvp, qp, sel, eps, delta, mode)
    got = np.asarray(sel.head_budget)
    assert np.abs(got - want).max() <= 1 and (want < 0.8 * np.asarray(sel.n_rest).min()).all()
    group = got.reshape(2, 2, 2, 2).max(axis=(1, 3))                                   # [B, Hkv]
    np.testing.assert_array_equal(np.asarray(sel.budget), group)
    np.testing.assert_array_equal(np.asarray(sel.sampled.sum(-1)), group)             # sampled exactly b keys
    lw, sampled = np.asarray(sel.log_weights), np.asarray(sel.sampled)
    weight = np.broadcast_to(np.log(np.asarray(sel.n_rest) / group)[..., None], lw.shape)
    np.testing.assert_allclose(lw[sampled], weight[sampled], rtol=1e-6)
    assert np.all(lw[np.asarray(sel.deterministic)] == 0)


def _estimates(q, k, v, kvp, qp, log_weights):
    """numpy `(N_hat, D_hat)` of head 0, query 0 of row 0 under `log_weights`, and the exact ones."""
    s = np.asarray(k[0, :, 0] @ q[0, 0, 0], np.float64) / np.sqrt(q.shape[-1])
    e = np.exp(s - s.max()) * (np.asarray(kvp[0]) >= 0)
    w = np.exp(np.asarray(log_weights, np.float64)[..., 0, :])                        # [..., S]
    vv = np.asarray(v[0, :, 0], np.float64)
    return (w * e) @ vv, (w * e).sum(-1), e @ vv, e.sum()


def test_numerator_estimator_is_unbiased_and_unweighted_is_not():
    """Average of N_hat over 400 PRNG keys is N within 4 standard errors (and the same sample
    without the n_rest / b weights is far off)."""
    q, k, v, kvp, qp = _inputs(2, b=1, s=400, g=1, v_mean=1.0)
    sel_fn = jax.jit(jax.vmap(lambda key: V.verified_selection(q, k, v, kvp, qp, key, epsilon=0.5, delta=0.3,
                                                               estimate="exact", window=4, top_k=4).log_weights))
    lw = np.asarray(sel_fn(jax.random.split(jax.random.key(3), 400)))[:, 0]           # [K, Hkv, S]
    n_hat, d_hat, n_true, d_true = _estimates(q, k, v, kvp, qp, lw)
    assert np.isfinite(lw).sum(-1)[:, 0].mean() < 0.5 * 400                           # a real sample
    se = n_hat.std(0) / np.sqrt(len(n_hat))
    assert np.all(np.abs(n_hat.mean(0) - n_true) <= 4 * se + 1e-6)
    assert abs(d_hat.mean() - d_true) <= 4 * d_hat.std() / np.sqrt(len(d_hat))
    unweighted = np.where(np.isfinite(lw), 0.0, -np.inf)
    n_bad, *_ = _estimates(q, k, v, kvp, qp, unweighted)
    assert np.linalg.norm(n_bad.mean(0) - n_true) > 10 * np.linalg.norm(se)


@pytest.mark.parametrize("estimate", ["exact", "sample"])
def test_observed_error_within_epsilon_with_frequency_at_least_one_minus_delta(estimate):
    """Fixed seed, 16 rows x 4 heads x 24 PRNG keys = 1536 (row, head, step) outputs: the
    relative L2 error exceeds epsilon at most delta (+0.03 margin) of the time, while the
    sample is well below the residual (the bound is what keeps the error down)."""
    eps, delta = 0.25, 0.1
    q, k, v, kvp, qp = _inputs(4, b=16, s=400, g=2)
    want = np.asarray(_dense(q, k, v, kvp, qp), np.float64)

    @jax.jit
    @jax.vmap
    def run(key):
        out, sel = V.verified_attention(q, k, v, kvp, qp, key, epsilon=eps, delta=delta, estimate=estimate,
                                        window=8, top_k=8, base_rate=0.1)
        return out, sel.budget, sel.n_rest

    out, budget, n_rest = run(jax.random.split(jax.random.key(5), 24))
    err = np.linalg.norm(np.asarray(out, np.float64) - want, axis=-1) / np.linalg.norm(want, axis=-1)
    assert np.mean(np.asarray(budget) / np.asarray(n_rest)) < 0.5
    assert np.mean(err <= eps) >= 1 - delta - 0.03
    assert np.mean(err) > 1e-3                                    # a real approximation, not dense


@pytest.fixture(scope="module")
def model():
    return policy_model()


@nnx.jit
def _forward(model, tokens, positions, caches):
    return model(tokens, positions, caches)


def test_decode_through_sparselm_jitted(model):
    """Prefill + 3 jitted decode steps on a ragged batch: epsilon = 0 equals the dense model;
    epsilon > 0 reads less (kept_mask), stays finite and near the dense logits, and is
    reproducible for a seed."""
    t, new = 40, 3
    tokens, positions = ragged_batch(t, new, (t, t - 9))

    def generate_decode(policy):
        caches = policy_caches(model, policy, batch=2, prompt_len=t, max_new=new)
        logits, caches = generate(_forward, model, caches, tokens, positions, t)
        return logits[:, t:], caches

    dense, _ = _forward(model, tokens, positions, None)
    exact, _ = generate_decode(VAttention(epsilon=0.0, num_sinks=1, window=2, top_k=2))
    np.testing.assert_allclose(exact, dense[:, t:], atol=2e-5, rtol=2e-5)
    policy = VAttention(epsilon=0.2, delta=0.2, num_sinks=1, window=2, top_k=2, seed=3, mode="denominator")
    approx, caches = generate_decode(policy)
    again, _ = generate_decode(policy)
    np.testing.assert_array_equal(approx, again)
    assert np.all(np.isfinite(approx)) and np.abs(np.asarray(approx - dense[:, t:])).max() < 1.0
    cache = caches[0]
    assert isinstance(cache, VerifiedKVCache) and caches[1].__class__.__name__ != "VerifiedKVCache"
    kept = np.asarray(cache.kept_mask(t + new))
    assert kept.shape == (2, 2, t + new) and kept[1, :, t - 9 + new:].sum() == 0
    assert kept.sum(-1).max() < (t + new) and np.all(np.asarray(cache.budget) >= 1)
    assert cache.nbytes() == cache.full.nbytes() + 8


def test_bad_arguments_raise():
    q, k, v, kvp, qp = _inputs(0, b=1, s=8)
    key = jax.random.key(0)
    for kwargs, match in ((dict(epsilon=1.0), "epsilon"), (dict(epsilon=-0.1), "epsilon"), (dict(delta=0.0), "delta"),
                          (dict(mode="numerator"), "mode"), (dict(estimate="oracle"), "estimate"),
                          (dict(window=0), "window"), (dict(top_k=-1), "top_k"), (dict(base_samples=1), "base_samples"),
                          (dict(base_rate=1.5), "base_rate"), (dict(num_sinks=1.5), "num_sinks")):
        with pytest.raises(ValueError, match=match):
            V.verified_selection(q, k, v, kvp, qp, key, **kwargs)
        with pytest.raises(ValueError, match=match):
            VAttention(**kwargs)
    with pytest.raises(ValueError, match="kv_positions"):
        V.verified_selection(q, k, v, kvp[:, :5], qp, key)
    with pytest.raises(ValueError, match="q_positions"):
        V.verified_selection(q, k, v, kvp, qp[:, :0], key)
    with pytest.raises(ValueError, match="num_kv_heads"):
        V.verified_selection(q[:, :, :3], k, v, kvp, qp, key)
    cache = VerifiedKVCache.init(1, 8, 2, 16, VAttention())
    with pytest.raises(ValueError, match="queries"):
        cache.update(k[:, :1], v[:, :1], qp)
    with pytest.raises(ValueError, match="beyond the cache"):
        cache.update(k[:, :1], v[:, :1], jnp.array([[8]], jnp.int32), queries=Queries(q))
    with pytest.raises(ValueError, match="seed"):
        VAttention(seed=0.5)
