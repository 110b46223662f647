"""`compressed` op: the Triton path (`interpret=True`) and the Mosaic TPU path
(`pltpu.InterpretParams()`) against the plain-jnp reference and against
`sparse_jax.ops.nsa.compressed_attention`: output, gradients of the output, and the
group-summed probabilities, GQA 1/4/16. Compressed keys sit at NSA block ends
(`i*d + l - 1`), some slots empty (-1); query rows ragged (row 1 stops early, padding -1).
The TPU score kernel is also run on several query and key tiles (skipped, full and
partial tiles, N not a multiple of the key tile, rows that see nothing)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import common
from pallas_kernels.compressed import api, compressed_attention
from pallas_kernels.compressed.reference import compressed_reference
from pallas_kernels.compressed.tpu import TpuConfig, compressed_tpu
from pallas_kernels.tiles_common import causal
from pallas_kernels.flash import blocks
from sparse_jax.ops import nsa as ops
from gpu_testing import has_gpu

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


def outputs_and_grads(f, q, k, v, cot):
    """`(out, p_group, (dq, dk, dv))` of `f(q, k, v)` with cotangent `cot` on the output."""
    (out, p), pull = jax.vjp(f, q, k, v)
    return out, p, pull((cot, jnp.zeros_like(p)))


def assert_matches_reference(got, want):
    """Output, group probabilities and gradients of a kernel path against the reference's."""
    (out, p, grads), (ref, p_ref, grads_ref) = got, want
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(p, p_ref, atol=2e-5, rtol=2e-5)
    for g, w in zip(grads, grads_ref):
        np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("impl", ["triton", "mosaic_tpu"])
@pytest.mark.parametrize("t, hkv", [(37, 1), (6, 4), (21, 16)])   # GQA 16, 4 (T < l), 1
def test_compressed_kernel_matches_reference(t, hkv, impl):
    q, k, v, qpos, kpos = inputs(t + hkv, t, hkv)
    cot = jnp.asarray(np.random.default_rng(2).normal(size=q.shape).astype(np.float32))

    @jax.jit
    def run(q, k, v):
        return [outputs_and_grads(lambda q, k, v, i=impl_: compressed_attention(
                    q, k, v, q_positions=qpos, kv_positions=kpos, impl=i, interpret=True), q, k, v, cot)
                for impl_ in (impl, "xla")]

    (out, p, grads), (want, p_ref, grads_ref) = run(q, k, v)
    assert_matches_reference((out, p, grads), (want, p_ref, grads_ref))
    assert (np.asarray(out)[np.asarray(qpos) < 0] == 0).all()
    if t >= L:
        assert np.abs(np.asarray(p_ref)).max() > 0 and np.abs(np.asarray(grads_ref[1])).max() > 0
    # The NSA op's own math (per-head probabilities, summed here).
    o_ops, p_ops = ops.compressed_attention(q, k, v, qpos, kpos)
    np.testing.assert_allclose(out, o_ops, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(p, p_ops.sum(axis=2), atol=2e-5, rtol=2e-5)


def tiled_inputs(seed=7, b=2, t=44, h=4, hkv=2, n=150, d=8):
    """Keys at positions 2..~24 (`n` > one 128-key tile, not a multiple of it): with 8-row
    query tiles some key tiles are wholly in the future, some wholly visible, some partial;
    queries 0 and 1 see nothing; row 1 ragged (padding from 30), one empty key slot."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, h, d)).astype(np.float32))
    k, v = (jnp.asarray(rng.normal(size=(b, n, hkv, d)).astype(np.float32)) for _ in range(2))
    qpos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    qpos[1, 30:] = -1
    kpos = np.tile((2 + np.arange(n) * 45 // (2 * n)).astype(np.int32), (b, 1))
    kpos[1, 60] = -1
    return q, k, v, jnp.asarray(qpos), jnp.asarray(kpos)


def test_compressed_tpu_score_tiles():
    """Several query and key tiles through `compressed_tpu` (block_q=8): out, p_group and
    the output's gradients against the reference; the case covers every tile kind."""
    q, k, v, qpos, kpos = tiled_inputs()
    cfg = TpuConfig(block_q=8, block_k=128)
    tq_p, tk_p = blocks.round_up(q.shape[1], 8), blocks.round_up(k.shape[1], 128)
    tab = np.asarray(blocks.tables(causal, blocks.pad_axis(qpos, tq_p, 1, -1),
                                   blocks.pad_axis(kpos, tk_p, 1, -1), None, None, 8, 128))
    lo, flo, fhi, hi = np.moveaxis(tab, -1, 0)
    assert (hi < tk_p // 128).any() and (fhi > flo).any() and ((hi - lo) > (fhi - flo)).any()
    cot = jnp.asarray(np.random.default_rng(3).normal(size=q.shape).astype(np.float32))
    kw = dict(q_positions=qpos, kv_positions=kpos, scale=0.4)

    @jax.jit
    def run(q, k, v):
        return [outputs_and_grads(lambda q, k, v, f=f: f(q, k, v, **kw), q, k, v, cot)
                for f in (functools.partial(compressed_tpu, interpret=True, config=cfg), compressed_reference)]

    (out, p, grads), (want, p_ref, grads_ref) = run(q, k, v)
    assert_matches_reference((out, p, grads), (want, p_ref, grads_ref))
    empty = np.asarray(p_ref).sum(-1) == 0                                  # [B, Hkv, T]
    assert empty[:, :, :2].all() and not empty[0].all()
    assert (np.asarray(p)[empty] == 0).all() and (np.asarray(out)[:, :2] == 0).all()


def test_compressed_auto_picks_mosaic_on_tpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    fn = common.resolve("compressed", "auto", api.BACKENDS, api.IMPLEMENTATIONS, {}, interpret=False)
    assert fn.func is compressed_tpu


def test_compressed_bad_input_raises():
    q, k, v, qpos, kpos = inputs(0, 20, 4)
    with pytest.raises(ValueError, match="kv_positions"):
        compressed_attention(q, k, v, q_positions=qpos, kv_positions=kpos[:, :-1])
    with pytest.raises(ValueError, match="block_k"):
        TpuConfig(block_k=64)
    with pytest.raises(ValueError, match="block_q"):
        TpuConfig(block_q=12)


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
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 3e-3), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("t, hkv, d", [(300, 4, 128), (200, 1, 64)])
def test_compressed_compiled_on_gpu(dtype, tol, t, hkv, d):
    with jax.default_device(jax.devices("gpu")[0]):
        err_out, err_p = compiled_case(dtype, t, hkv, d)
    assert err_out < tol and err_p < tol, (err_out, err_p)
