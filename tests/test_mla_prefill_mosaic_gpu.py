"""`mla_sparse_attention` (sparse MLA prefill / training, DSA's main attention) with
`impl="mosaic_gpu"`: `mla_decode`'s Mosaic GPU kernel over every query token (rows gathered
in the kernel) for the forward, `token_sparse`'s Triton backward for the gradients.

On the CPU: the kernel in GPU interpret mode (`interpret=plgpu.InterpretGPUParams()`; the
backward in Triton's interpreter), bf16 and float32 inputs (float32: the kernel in bf16),
against the float32 reference (`mla_decode_reference`), out, lse and the gradients of q,
c_kv and k_rope with cotangents on both outputs: T=5 and 3 queries (no block's multiple),
a ragged cache (positions -1), a padded query, -1 padded lists of random length, listed
future slots, a query whose listed slots are all in its future, K=80 (two slot tiles, the
last ragged) and 40; the forward lowered for CUDA at DeepSeek's sizes and a
prefill longer than CUDA's 65535-block y grid (T=70000, K=2048: one split, gathered in the
kernel; K=3000: two splits, so that each slot list fits SMEM); the gradient lowered for
CUDA scatters one 576-wide latent row per (query, slot) (dv folded into dk); the DSA attention path routes `impl="mosaic_gpu"` here (and `auto` on Hopper); unsupported calls raise
ValueError. Under `-m gpu` on a Hopper GPU: the compiled kernel and backward at DeepSeek's
sizes against the reference.

`impl="triton"` (and `auto` where token_sparse picks Triton): token_sparse's Triton forward
with the same folded backward, in Triton's interpreter in float32 (16 heads, Dc 128 + Dr 64,
T=13, K=20, ragged cache, padded query, future slots) against the reference and the unfolded
backward (token_sparse_attention's own VJP; `dkdv="inverted"`); which calls fold (traced:
`auto`, `dkdv="atomic"` fold; `inverted`, Dc 64 + Dr 64, XLA do not); its gradient lowered
for an H100 at DeepSeek's sizes scatters one 576-wide row per (query, slot).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mla_decode import mla_sparse_attention
from pallas_kernels.mla_decode.reference import mla_decode_reference
from gpu_testing import hopper_device, lower_for_cuda, needs_gpu_interpret_pool, triton_atomic_shapes
from kernel_testing import max_rel_err
from test_mla_decode_kernels import SCALE, MlaCase, check_zero_rows, make_inputs


def value_and_grads(fn, args, kw, seed=0):
    """`(out, lse)` and the gradients of `sum(out * g_o) + sum(lse * g_l)` (lse's -inf rows
    left out) with respect to q, c_kv, k_rope, all under one jit."""
    kw = {n: kw[n] for n in ("indices", "q_positions", "kv_positions", "scale")}

    def loss(*a):
        out, lse = fn(*a, **kw)[:2]
        g_o = jax.random.normal(jax.random.key(seed), out.shape, jnp.float32)
        g_l = jax.random.normal(jax.random.key(seed + 1), lse.shape, jnp.float32)
        lse_part = jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * g_l)
        return jnp.sum(out.astype(jnp.float32) * g_o) + lse_part, (out, lse)

    (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(*args)
    return out, lse, grads


def reference(*args, **kw):
    return mla_decode_reference(*(a.astype(jnp.float32) for a in args), **kw, return_lse=True, num_splits=None)


def assert_close(got, want, tol):
    out, lse, grads = got
    r_out, r_lse, r_grads = want
    assert max_rel_err(out, r_out) < tol
    fin = np.isfinite(np.asarray(r_lse))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), fin)
    np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(r_lse)[fin], atol=tol)
    for g, r in zip(grads, r_grads):
        assert np.all(np.isfinite(np.asarray(g, np.float32)))
        assert max_rel_err(g, r) < tol


@needs_gpu_interpret_pool
@pytest.mark.parametrize("dtype,case", [
    (jnp.bfloat16, MlaCase("t5_k80", b=1, t=5, h=64, dc=128, dr=64, s=90, k=80, seed=21)),
    (jnp.float32, MlaCase("t3_k40", b=1, t=3, h=64, dc=128, dr=64, s=50, k=40, seed=22)),
], ids=["bf16", "f32"])
def test_mosaic_gpu_prefill_in_gpu_interpret_mode(dtype, case):
    """Forward (out, lse) and gradients in GPU interpret mode against the float32 reference
    (see the module docstring; float32: one slot tile, fewer queries: each row copy is a
    callback in GPU interpret mode)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    args, kw = make_inputs(case, dtype)
    got = value_and_grads(lambda *a, **k: mla_sparse_attention(
        *a, **k, return_lse=True, impl="mosaic_gpu", interpret=plgpu.InterpretGPUParams()), args, kw)
    want = value_and_grads(reference, args, kw)
    assert got[0].dtype == dtype and got[0].shape == want[0].shape
    assert all(g.dtype == dtype for g in got[2])
    assert_close(got, want, 2e-2)
    check_zero_rows(got[0], kw)


def test_mosaic_gpu_prefill_lowers_for_cuda_on_the_cpu():
    """DeepSeek's sizes (H=64, Dc=512, Dr=64, K=2048) over T=70000 queries (more rows than
    CUDA's y grid dimension takes): the forward lowers to one Mosaic GPU kernel that gathers
    in the kernel (one split: the slot list fits SMEM), no XLA gather of the selected rows;
    K=3000 takes two splits (the split count grows until a slot list fits)."""
    t = 70000
    q = jax.ShapeDtypeStruct((1, t, 64, 576), jnp.bfloat16)
    c, r = jax.ShapeDtypeStruct((1, t, 512), jnp.bfloat16), jax.ShapeDtypeStruct((1, t, 64), jnp.bfloat16)
    idx = jax.ShapeDtypeStruct((1, t, 2048), jnp.int32)
    f = jax.jit(lambda q, c, r, i: mla_sparse_attention(q, c, r, i, scale=SCALE, impl="mosaic_gpu"))
    text = f.trace(q, c, r, idx).lower(lowering_platforms=("cuda",)).as_text()
    assert "mla_decode_mosaic_gpu_gather" in text
    assert f"tensor<1x1x{t}x64x512xbf16>" in text            # [B, one split, T, H, Dc]: the output
    assert "x2048x576x" not in text and "x2048x512x" not in text   # no XLA-gathered rows
    # K=3000 (47 tiles) does not fit one split's slot list: two splits of 24, still gathered
    t = 1000
    q, c, r = (jax.ShapeDtypeStruct((1, t, *x.shape[2:]), x.dtype) for x in (q, c, r))
    text = f.trace(q, c, r, jax.ShapeDtypeStruct((1, t, 3000), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert "mla_decode_mosaic_gpu_gather" in text and f"tensor<1x2x{t}x64x512xbf16>" in text


@pytest.mark.parametrize("impl", ["mosaic_gpu", "triton"])
def test_prefill_backward_scatters_one_latent_row_per_slot(impl):
    """The gradient of either forward lowered for an H100 at DeepSeek's sizes (H=64 on two
    programs of 32 rows, Dc=512, Dr=64, K=2048): the Triton backward adds dv into the first
    512 columns of dk (`value_is_key_prefix`), so its only float32 atomics are dk's two
    pieces (512 + 64 per listed row; without the fold also a 512-wide dv scatter:
    [(32, 512), (32, 512), (32, 64)], `test_token_sparse_kernels`)."""
    t = 64
    q = jax.ShapeDtypeStruct((1, t, 64, 576), jnp.bfloat16)
    c, r = jax.ShapeDtypeStruct((1, t, 512), jnp.bfloat16), jax.ShapeDtypeStruct((1, t, 64), jnp.bfloat16)
    idx = jax.ShapeDtypeStruct((1, t, 2048), jnp.int32)
    loss = lambda q, c, r, i: mla_sparse_attention(q, c, r, i, scale=SCALE, impl=impl).astype(  # noqa: E731
        jnp.float32).sum()
    lowered = lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, c, r, idx)
    assert triton_atomic_shapes(lowered) == [(32, 512), (32, 64)]


def test_dsa_attention_routes_mosaic_gpu_here_and_bad_calls_raise(monkeypatch):
    """`dsa.selected_attention(impl="mosaic_gpu")` (prefill) runs this op's Mosaic GPU
    forward (here replaced by the reference: no kernel runs on the CPU without interpret
    mode); H not a multiple of 64 and a missing list raise ValueError at trace time."""
    from pallas_kernels.mla_decode import api
    from sparse_jax.ops import dsa

    case = MlaCase("routes", b=1, t=3, h=64, dc=128, dr=64, s=20, k=8, seed=3)
    (q, c, r), kw = make_inputs(case, jnp.bfloat16)
    idx, q_pos, kv_pos = kw["indices"], kw["q_positions"], kw["kv_positions"]
    calls = []

    def forward(*args, interpret, config, **kw):
        calls.append(config.gather_in_kernel)
        return mla_decode_reference(*args, **kw)

    monkeypatch.setattr(api, "mla_decode_mosaic_gpu", forward)
    dsa.selected_attention(q, c, r, idx, q_pos, kv_pos, scale=SCALE)          # auto, on the CPU
    assert calls == []
    out = dsa.selected_attention(q, c, r, idx, q_pos, kv_pos, scale=SCALE, impl="mosaic_gpu")
    assert calls == [True]
    want = reference(q, c, r, indices=idx, q_positions=q_pos, kv_positions=kv_pos, scale=SCALE)
    assert max_rel_err(out, want.out) < 1e-2
    pos = dict(q_positions=q_pos, kv_positions=kv_pos, scale=SCALE, impl="mosaic_gpu")
    with pytest.raises(ValueError, match="H=32"):
        mla_sparse_attention(q[:, :, :32], c, r, idx, **pos)
    with pytest.raises(ValueError, match="indices"):
        mla_sparse_attention(q, c, r, None, **pos)


@pytest.mark.gpu
@pytest.mark.skipif(hopper_device() is None, reason="needs a Hopper (sm_90) GPU")
@pytest.mark.parametrize("dtype,impl", [(jnp.bfloat16, "mosaic_gpu"), (jnp.float32, "mosaic_gpu"),
                                        (jnp.bfloat16, "triton")], ids=["bf16", "f32", "triton-bf16"])
def test_mosaic_gpu_prefill_compiled_on_gpu(dtype, impl):
    """The compiled kernel (rows gathered in the kernel: single-row TMA copies into the
    swizzled ring) and the Triton backward at DeepSeek's sizes (H=64, Dc=512, Dr=64), T=300
    queries over a 4101-slot cache, K=2048 listed (-1 padded, future slots listed), against
    the float32 reference: out, lse, gradients; `impl="triton"`: token_sparse's Triton forward
    with the same folded backward (the path `auto` takes off Hopper). Float32 inputs run in bf16 (the kernel's
    contract), so their reference takes the inputs rounded to bf16: against the unrounded
    ones, the rounding of 576-wide q and keys moves the lse by up to ~0.05 at these sizes
    (seen on the H100, 2026-12-07), which is the inputs' precision, not the kernel's error."""
    case = MlaCase("gpu", b=2, t=300, h=64, dc=512, dr=64, s=4101, k=2048, seed=5)
    with jax.default_device(hopper_device()):
        args, kw = make_inputs(case, dtype)
        got = value_and_grads(lambda *a, **k: mla_sparse_attention(*a, **k, return_lse=True, impl=impl),
                              args, kw)
        ref_args = tuple(a.astype(jnp.bfloat16).astype(dtype) for a in args)
        with jax.default_matmul_precision("highest"):
            want = value_and_grads(reference, ref_args, kw)
        assert_close(got, want, 2e-2)
        check_zero_rows(got[0], kw)
        if impl == "mosaic_gpu" and dtype == jnp.bfloat16:       # `auto` takes the Mosaic GPU kernel on Hopper
            pick = {n: kw[n] for n in ("indices", "q_positions", "kv_positions", "scale")}
            run = lambda impl: jax.jit(lambda *a: mla_sparse_attention(*a, **pick, impl=impl))(*args)  # noqa: E731
            np.testing.assert_array_equal(np.asarray(run("auto"), np.float32), np.asarray(run("mosaic_gpu"), np.float32))


# the Triton path (`impl="triton"`, `auto` off Hopper): token_sparse's forward, the folded
# backward. Float32, 16 heads (one program), Dc 128 + Dr 64 (pieces 128 | 64: foldable), T=13,
# K=20 (two slot tiles of 16, the second ragged), two batch rows (one ragged, a padded query)
TRITON_CASE = MlaCase("triton_fold", b=2, t=13, h=16, dc=128, dr=64, s=45, k=20, seed=31)


def test_triton_prefill_folds_dv_into_dk_and_matches_the_reference():
    """`impl="triton"` in Triton's interpreter: out, lse and the gradients of q, c_kv, k_rope
    equal the float32 reference's, and the unfolded backward's (token_sparse_attention's own
    VJP, dk and dv scattered apart; and `dkdv="inverted"`, routed to that VJP) up to float32
    summation order."""
    from pallas_kernels.token_sparse import token_sparse_attention
    from pallas_kernels.token_sparse.triton import TritonConfig

    args, kw = make_inputs(TRITON_CASE)
    got = value_and_grads(lambda *a, **k: mla_sparse_attention(*a, **k, return_lse=True, impl="triton",
                                                               interpret=True), args, kw)
    assert got[0].dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in got[2])
    assert_close(got, value_and_grads(reference, args, kw), 1e-4)
    check_zero_rows(got[0], kw)

    def unfolded(q, c, r, *, indices, **pos):
        return token_sparse_attention(q, jnp.concatenate([c, r], -1)[:, :, None], c[:, :, None],
                                      indices[:, :, None], **pos, return_lse=True, impl="triton",
                                      interpret=True)

    inverted = lambda *a, **k: mla_sparse_attention(*a, **k, return_lse=True, impl="triton",  # noqa: E731
                                                    interpret=True, config=TritonConfig(dkdv="inverted"))
    for other in (unfolded, inverted):
        assert_close(got, value_and_grads(other, args, kw), 1e-5)


def test_triton_prefill_routes_the_fold_by_token_sparse_backend(monkeypatch):
    """Traced only: `auto` with `interpret=True` (token_sparse's choice: Triton) and
    `dkdv="atomic"` take the folded backward with the given config; `dkdv="inverted"`, Dc 64
    + Dr 64 (value pieces 64 not the keys' first 128) and `impl="xla"` keep token_sparse's own."""
    from pallas_kernels.mla_decode import api
    from pallas_kernels.token_sparse.triton import TritonConfig

    calls, backward = [], api.token_sparse_backward

    def spy(*a, **k):
        calls.append((k["value_is_key_prefix"], k["config"]))
        return backward(*a, **k)

    monkeypatch.setattr(api, "token_sparse_backward", spy)

    def backward_calls(case, **extra):
        calls.clear()
        args, kw = make_inputs(case)
        pick = {n: kw[n] for n in ("indices", "q_positions", "kv_positions", "scale")}
        loss = lambda *a: mla_sparse_attention(*a, **pick, **extra).sum()  # noqa: E731
        jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(*args)
        return list(calls)

    small = MlaCase("routes", b=1, t=3, h=16, dc=128, dr=64, s=20, k=8, seed=4)
    atomic = TritonConfig(dkdv="atomic")
    assert backward_calls(small, impl="auto", interpret=True) == [(True, None)]
    assert backward_calls(small, impl="triton", interpret=True, config=atomic) == [(True, atomic)]
    assert backward_calls(small, impl="triton", interpret=True, config=TritonConfig(dkdv="inverted")) == []
    assert backward_calls(MlaCase("dc64", b=1, t=3, h=16, dc=64, dr=64, s=20, k=8), impl="triton",
                          interpret=True) == []
    assert backward_calls(small, impl="xla") == []
