"""`token_sparse` with `impl="mosaic_gpu"` (the Mosaic GPU forward + the Triton backward).

On the CPU: the chunk unions (`layout.union_blocks`) against a Python loop; the kernel in
Mosaic GPU's interpret mode (`interpret=plgpu.InterpretGPUParams()`; the Triton backward in
Triton's interpreter) on bf16 inputs against the float32 reference, forward, lse and
gradients (GQA 16, 8 and 4, ragged T and S, T and S shorter than a block, batch 2, -1
padded lists, blocks that several tokens of a chunk list, a padded query, an empty list,
queries at shifted positions, learned sinks, non-causal, unions longer than the ring, both
CTA modes); the kernel lowered for CUDA (NSA's 64K shape, no GPU); unsupported calls
refused with a ValueError; `impl="auto"` does not take it on a GPU. Under `-m gpu` on a
Hopper GPU: the compiled kernels against the reference and against Triton."""

from __future__ import annotations

import functools
import itertools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import common
from pallas_kernels.token_sparse import api, token_sparse_attention
from pallas_kernels.token_sparse.layout import union_blocks
from pallas_kernels.token_sparse.mosaic_gpu import MosaicGPUConfig, token_sparse_mosaic_gpu
from gpu_testing import hopper_device, needs_gpu_interpret_pool
from kernel_testing import max_rel_err
from test_token_sparse_kernels import TokenSparseCase, make_inputs, run_vjp


def test_union_blocks_match_a_python_loop():
    """Deduplicated ascending unions and token bits per chunk; a row listing a block twice,
    padding (negative, >= nblk) and a padded query's entries left out."""
    rng = np.random.default_rng(0)
    b, t, hkv, k, nblk, tokens = 2, 12, 3, 5, 9, 4
    idx = rng.integers(-2, nblk + 1, (b, t, hkv, k)).astype(np.int32)
    idx[0, 0, 0, :] = 3
    q_pos = np.broadcast_to(np.arange(t), (b, t)).copy()
    q_pos[1, 5] = -1
    blk, bits, count = map(np.asarray, union_blocks(jnp.asarray(idx), jnp.asarray(q_pos), nblk, tokens))
    for bi, h, c in np.ndindex(b, hkv, t // tokens):
        want = {}
        for i in range(tokens):
            if q_pos[bi, c * tokens + i] >= 0:
                for e in idx[bi, c * tokens + i, h]:
                    if 0 <= e < nblk:
                        want[int(e)] = want.get(int(e), 0) | (1 << i)
        keys = sorted(want)
        assert count[bi, h, c] == len(keys)
        assert list(blk[bi, h, c, :len(keys)]) == keys
        assert list(bits[bi, h, c, :len(keys)]) == [want[x] for x in keys]


INTERPRET_CASES = [
    # G=16 (4 tokens a warpgroup, 8 a CTA), T=13 ragged, 3 blocks of 64 (S=150 ragged, 5
    # padded keys), 3 entries a row: most blocks listed by several tokens of a chunk; sinks
    TokenSparseCase("g16_ragged_sinks", t=13, s=150, h=16, hkv=1, d=64, dv=64, k=3, block_size=64,
                    sinks=True, pad_k=5, pad_q=True, seed=1),
    # G=4 (16 tokens a warpgroup: q regrouped in XLA), two kv heads, T=37, S=200
    TokenSparseCase("g4_ragged", t=37, s=200, h=8, hkv=2, d=64, dv=64, k=2, block_size=64,
                    pad_k=7, pad_q=True, seed=2),
    # G=8 (8-row copies), two batch rows, T=9 and S=40 shorter than one block of 128, non-causal
    TokenSparseCase("g8_b2_short_noncausal", b=2, t=9, s=40, h=16, hkv=2, d=64, dv=64, k=2,
                    block_size=128, causal=False, seed=3),
]
# unions of 9 and 10 blocks through a 3-slot ring (the producer waits for freed slots)
RING_WRAP = TokenSparseCase("g16_ring_wrap", t=16, s=600, h=16, hkv=1, d=64, dv=64, k=6, block_size=64,
                            pad_q=True, seed=5)


def _f32(args):
    return tuple(None if a is None else a.astype(jnp.float32) for a in args)


def _mosaic(config):
    """`impl="mosaic_gpu"` with `config` (patched into the api's table)."""
    return mock.patch.dict(api.IMPLEMENTATIONS, {"mosaic_gpu": functools.partial(
        token_sparse_mosaic_gpu, config=config)})


@needs_gpu_interpret_pool
@pytest.mark.parametrize("case,config", [(c, MosaicGPUConfig()) for c in INTERPRET_CASES] + [
    (INTERPRET_CASES[0], MosaicGPUConfig(split_kv=True, max_concurrent_steps=2)),
    (INTERPRET_CASES[1], MosaicGPUConfig(split_kv=True)),
    (RING_WRAP, MosaicGPUConfig(max_concurrent_steps=3))],
    ids=[c.name for c in INTERPRET_CASES] + ["g16_ragged_sinks_split", "g4_ragged_split", "g16_ring_wrap"])
def test_mosaic_gpu_in_gpu_interpret_mode(case, config):
    """Out, lse and dq, dk, dv (d sinks) through the custom VJP (Mosaic GPU forward in GPU
    interpret mode, Triton backward in Triton's interpreter) against float32 references on
    bf16 inputs; the empty list gives zeros. `split_kv`: unions of odd and even sizes (the
    second consumer one step short, or not), 2 and 4 ring slots (3 blocks through 2: the
    ring wraps); unions longer than the ring without it too."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    args, idx, kw, cot = make_inputs(case, jnp.bfloat16)
    with _mosaic(config):
        out, lse, grads = run_vjp("mosaic_gpu", args, idx, kw, cot, interpret=plgpu.InterpretGPUParams())
    r_out, r_lse, r_grads = run_vjp("xla", _f32(args), idx, kw, (cot[0].astype(jnp.float32), cot[1]))
    assert out.dtype == jnp.bfloat16 and out.shape == r_out.shape
    assert max_rel_err(out, r_out) < 1e-2                      # bf16 P and output
    fin = np.isfinite(r_lse)
    np.testing.assert_array_equal(np.isfinite(lse), fin)
    np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(r_lse)[fin], atol=1e-4)
    assert np.all(np.asarray(out, np.float32)[0, case.t // 2] == 0.0)
    for g, r in zip(grads, r_grads):
        assert (g is None) == (r is None)
        if r is not None:
            assert np.all(np.isfinite(np.asarray(g, np.float32)))
            assert max_rel_err(g, r) < 1e-2


def _lowers_for_cuda(t, h, hkv, d, k, block_size, config=None):
    """fwd + bwd of `token_sparse_mosaic_gpu` traced and lowered for CUDA on an abstract
    H100 (Pallas to Mosaic GPU and Triton; nothing compiled): the custom call targets."""
    import re

    mesh_lib = pytest.importorskip("jax._src.mesh")
    spec = jax.ShapeDtypeStruct
    args = (spec((1, t, h, d), jnp.bfloat16), spec((1, t, hkv, d), jnp.bfloat16),
            spec((1, t, hkv, d), jnp.bfloat16), spec((1, t, hkv, k), jnp.int32), spec((1, t), jnp.int32))

    def loss(q, kk, v, idx, pos):
        r = token_sparse_mosaic_gpu(q, kk, v, idx, block_size=block_size, q_positions=pos,
                                    kv_positions=pos, causal=True, sink_logits=None, softcap=None,
                                    scale=d ** -0.5, return_lse=True, config=config)
        return r.out.astype(jnp.float32).sum() + jnp.where(jnp.isfinite(r.lse), r.lse, 0.0).sum()

    dev = mesh_lib.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
    with jax.sharding.use_abstract_mesh(mesh_lib.AbstractMesh((1,), ("x",), abstract_device=dev)):
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(
            lowering_platforms=("cuda",)).as_text()
    return text, re.findall(r"custom_call @([\w$.]+)", text)


def test_mosaic_gpu_kernel_lowers_for_cuda_on_the_cpu():
    """NSA's 64K shape (HQ 64, HKV 4, D 128, 16 blocks of 64: G=16), and G=4 with blocks of
    128 (2 ring stages), ragged T, and `split_kv` at both: one Mosaic GPU forward, the three
    Triton backward kernels."""
    for shape, split in itertools.product(((65536, 64, 4, 128, 16, 64), (1000, 16, 4, 128, 16, 128)),
                                          (False, True)):
        text, calls = _lowers_for_cuda(*shape, config=MosaicGPUConfig(split_kv=split))
        assert "token_sparse_fwd_mosaic_gpu" in text
        assert calls.count("mosaic_gpu_v2") == 1 and calls.count("__gpu$xla.gpu.triton") == 3


def test_mosaic_gpu_refuses_unsupported_without_compiling():
    c = TokenSparseCase("bad", t=8, s=128, h=16, hkv=1, d=64, dv=64, k=2, block_size=64)
    (q, k, v, _), idx, kw, _ = make_inputs(c, jnp.bfloat16)
    call = lambda q, k, v, **over: token_sparse_attention(  # noqa: E731
        q, k, v, idx, **{**kw, "impl": "mosaic_gpu", **over})
    for over, match in ((dict(softcap=5.0), "softcap"), (dict(block_size=32), "block_size 32"),
                        (dict(interpret=True), "Triton interpreter")):
        with pytest.raises(ValueError, match=match):
            call(q, k, v, **over)
    wide = TokenSparseCase("smem", t=8, s=256, h=16, hkv=1, d=128, dv=128, k=2, block_size=128)
    (qw, kw_, vw, _), idx_w, kw_w, _ = make_inputs(wide, jnp.bfloat16)
    with pytest.raises(ValueError, match="SMEM"):         # 4 stages of 2 x [128, 128] bf16
        token_sparse_attention(qw, kw_, vw, idx_w, impl="mosaic_gpu", **kw_w,
                               config=MosaicGPUConfig(max_concurrent_steps=4))
    with pytest.raises(ValueError, match="dtype"):
        call(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    with pytest.raises(ValueError, match="head_dim 32"):
        call(q[..., :32], k[..., :32], v[..., :32])
    with pytest.raises(ValueError, match="GQA group 2"):
        call(q[:, :, :2], k, v)
    with pytest.raises(ValueError, match="max_concurrent_steps"):
        MosaicGPUConfig(max_concurrent_steps=1)
    with pytest.raises(ValueError, match="split_kv needs an even"):
        MosaicGPUConfig(split_kv=True, max_concurrent_steps=3)


def test_auto_does_not_take_mosaic_gpu_on_hopper_yet(monkeypatch):
    """Not timed on a GPU yet: `impl="auto"` on Hopper keeps Triton for a call the Mosaic
    GPU kernel covers; GPU interpret mode (no other kernel takes it) does pick it."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    c = TokenSparseCase("auto", t=8, s=128, h=16, hkv=1, d=64, dv=64, k=2, block_size=64)
    (q, k, v, _), idx, kw, _ = make_inputs(c, jnp.bfloat16)
    call = dict(q=q, k=k, v=v, indices=idx, causal=True, softcap=None, **{
        n: kw[n] for n in ("block_size", "q_positions", "kv_positions")})
    monkeypatch.setattr(common, "current_device", lambda: common.Device("gpu", "9.0"))
    assert common.choose("token_sparse", "auto", api.BACKENDS, call)[0] == "triton"
    assert api.mosaic_gpu.supports(**call, interpret=False, config=None) is None
    got = common.choose("token_sparse", "auto", api.BACKENDS, call, interpret=plgpu.InterpretGPUParams())
    assert got[0] == "mosaic_gpu"


GPU_CASES = [
    # NSA heads per group (G=16), 2 kv heads, blocks of 64, ragged T and S, sinks
    TokenSparseCase("nsa_g16", b=2, t=200, s=1000, h=32, hkv=2, d=128, dv=128, k=8, block_size=64,
                    pad_k=37, pad_q=True, sinks=True, seed=7),
    # G=4 (q regrouped), 16 blocks a row of 64 (long unions: up to 512 slots)
    TokenSparseCase("g4_k16", t=300, s=2048, h=16, hkv=4, d=128, dv=128, k=16, block_size=64, seed=8),
    # blocks of 128, D=64, non-causal
    TokenSparseCase("g8_b128_d64", t=130, s=700, h=16, hkv=2, d=64, dv=64, k=4, block_size=128,
                    causal=False, seed=9),
]


@pytest.mark.gpu
@pytest.mark.skipif(hopper_device() is None, reason="needs a Hopper (sm_90) GPU")
@pytest.mark.parametrize("case,split", [(c, False) for c in GPU_CASES] + [(GPU_CASES[0], True)],
                         ids=[c.name for c in GPU_CASES] + ["nsa_g16_split_kv"])
def test_mosaic_gpu_compiled_matches_reference(case, split):
    """The compiled forward (and the Triton backward behind it) on bf16 inputs against the
    float32 reference: out, lse, gradients."""
    with jax.default_device(hopper_device()), _mosaic(MosaicGPUConfig(split_kv=split)):
        args, idx, kw, cot = make_inputs(case, jnp.bfloat16)
        out, lse, grads = run_vjp("mosaic_gpu", args, idx, kw, cot, interpret=False)
        with jax.default_matmul_precision("highest"):
            r_out, r_lse, r_grads = run_vjp("xla", _f32(args), idx, kw,
                                            (cot[0].astype(jnp.float32), cot[1]))
        assert max_rel_err(out, r_out) < 2e-2
        fin = np.isfinite(r_lse)
        np.testing.assert_array_equal(np.isfinite(lse), fin)
        np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(r_lse)[fin], atol=2e-2, rtol=1e-3)
        assert np.all(np.asarray(out, np.float32)[0, case.t // 2] == 0.0)
        for g, r in zip(grads, r_grads):
            if r is not None:
                assert np.all(np.isfinite(np.asarray(g, np.float32)))
                assert max_rel_err(g, r) < 3e-2


@pytest.mark.gpu
@pytest.mark.skipif(hopper_device() is None, reason="needs a Hopper (sm_90) GPU")
@pytest.mark.parametrize("split", [False, True], ids=["pair", "split_kv"])
def test_mosaic_gpu_matches_triton_at_nsa_shape(split):
    """T=4096, HQ=64 / HKV=4, 16 blocks of 64 per token: block 0 and 15 blocks back from the
    token's own at a stride of 1-3 varying by token (neighbouring tokens share some blocks,
    as NSA's selections do; -1 past block 0): the Mosaic GPU forward against Triton's."""
    t, h, hkv, d, n = 4096, 64, 4, 128, 16
    tok, head, j = np.meshgrid(np.arange(t), np.arange(hkv), np.arange(n - 1), indexing="ij")
    blk = tok // 64 - j * (1 + (tok + head) % 3)
    idx = np.concatenate([np.zeros((t, hkv, 1), np.int32),
                          np.where(blk > 0, blk, -1).astype(np.int32)], -1)[None]
    with jax.default_device(hopper_device()):
        ks = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(ks[0], (1, t, h, d), jnp.bfloat16)
        k, v = (jax.random.normal(kk, (1, t, hkv, d), jnp.bfloat16) for kk in ks[1:])
        run = lambda impl, **kw: jax.jit(lambda q, k, v: token_sparse_attention(  # noqa: E731
            q, k, v, jnp.asarray(idx), block_size=64, return_lse=True, impl=impl, **kw))(q, k, v)
        got = run("mosaic_gpu", config=MosaicGPUConfig(split_kv=split))
        want = run("triton")
        assert max_rel_err(got.out, want.out) < 2e-2
        np.testing.assert_allclose(np.asarray(got.lse), np.asarray(want.lse), atol=2e-2, rtol=1e-3)
