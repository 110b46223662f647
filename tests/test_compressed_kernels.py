"""`compressed` op: the Triton path (interpret mode) against the plain-jnp reference and
against `sparse_jax.ops.nsa.compressed_attention`: output, gradients of the output, and
the group-summed probabilities. Compressed keys sit at NSA block ends (`i*d + l - 1`),
some slots empty (-1); query rows ragged (row 1 stops early, padding -1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.compressed import compressed_attention
from sparse_jax.ops import nsa as ops

L, D_STRIDE, HEADS, HEAD_DIM = 8, 4, 16, 8


def inputs(seed, t, hkv, b=2):
    rng = np.random.default_rng(seed)
    n = max(1, (t - L) // D_STRIDE + 1)
    q = jnp.asarray(rng.normal(size=(b, t, HEADS, HEAD_DIM)).astype(np.float32))
    k, v = (jnp.asarray(rng.normal(size=(b, n, hkv, HEAD_DIM)).astype(np.float32)) for _ in range(2))
    qpos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    qpos[1, max(1, t - 6):] = -1
    ends = np.arange(n) * D_STRIDE + L - 1
    kpos = np.tile(np.where(ends < t, ends, -1).astype(np.int32), (b, 1))
    kpos[1, -1] = -1                                                       # an empty slot
    return q, k, v, jnp.asarray(qpos), jnp.asarray(kpos)


@pytest.mark.parametrize("t, hkv", [(37, 1), (6, 4)])   # GQA 16 and 4; T < l
def test_compressed_kernel_matches_reference(t, hkv):
    q, k, v, qpos, kpos = inputs(t + hkv, t, hkv)
    cot = jnp.asarray(np.random.default_rng(2).normal(size=q.shape).astype(np.float32))

    @jax.jit
    def run(q, k, v):
        res = []
        for impl in ("triton", "xla"):
            f = lambda q, k, v: compressed_attention(q, k, v, q_positions=qpos, kv_positions=kpos,
                                                     impl=impl, interpret=True)
            (out, p), pull = jax.vjp(f, q, k, v)
            res.append((out, p, pull((cot, jnp.zeros_like(p)))))
        return res

    (out, p, grads), (want, p_ref, grads_ref) = run(q, k, v)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(p, p_ref, atol=2e-5, rtol=2e-5)
    for g, w in zip(grads, grads_ref):
        np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5)
    assert (np.asarray(out)[np.asarray(qpos) < 0] == 0).all()
    if t >= L:
        assert np.abs(np.asarray(p_ref)).max() > 0 and np.abs(np.asarray(grads_ref[1])).max() > 0
    # The NSA op's own math (per-head probabilities, summed here).
    o_ops, p_ops = ops.compressed_attention(q, k, v, qpos, kpos)
    np.testing.assert_allclose(out, o_ops, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(p, p_ops.sum(axis=2), atol=2e-5, rtol=2e-5)


def test_compressed_bad_input_raises():
    q, k, v, qpos, kpos = inputs(0, 20, 4)
    with pytest.raises(ValueError, match="kv_positions"):
        compressed_attention(q, k, v, q_positions=qpos, kv_positions=kpos[:, :-1])


def _has_gpu():
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def compiled_case(dtype, t, hkv, d, interpret=False):
    """Kernel vs reference at a real head dim; returns (max rel error of out, of p_group)."""
    rng = np.random.default_rng(t + hkv + d)
    h = 4 * hkv if hkv > 1 else 16
    n = (t - 32) // 16 + 1
    q = jnp.asarray(rng.normal(size=(2, t, h, d)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(2, n, hkv, d)), dtype) for _ in range(2))
    qpos = np.tile(np.arange(t, dtype=np.int32), (2, 1))
    qpos[1, t // 2:] = -1
    kpos = jnp.asarray(np.tile(np.arange(n, dtype=np.int32) * 16 + 31, (2, 1)))
    kw = dict(q_positions=jnp.asarray(qpos), kv_positions=kpos)
    out, p = jax.jit(lambda q, k, v: compressed_attention(q, k, v, impl="triton", interpret=interpret,
                                                          **kw))(q, k, v)
    with jax.default_matmul_precision("highest"):
        want, p_ref = compressed_attention(q, k, v, impl="xla", **kw)
    err = lambda a, b: float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max()  # noqa: E731
                             / max(np.abs(np.asarray(b, np.float32)).max(), 1e-30))
    return err(out, want), err(p, p_ref)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 3e-3), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("t, hkv, d", [(300, 4, 128), (200, 1, 64)])
def test_compressed_compiled_on_gpu(dtype, tol, t, hkv, d):
    with jax.default_device(jax.devices("gpu")[0]):
        err_out, err_p = compiled_case(dtype, t, hkv, d)
    assert err_out < tol and err_p < tol, (err_out, err_p)
