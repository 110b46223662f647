"""`flash` with `impl="mosaic_gpu"` (Pallas Mosaic GPU, Hopper only).

Forward and backward (`mosaic_gpu_vjp`): full, causal, causal sliding window, learned
sinks, keys at `stride * j + offset` (NSA's compressed keys), ragged lengths (padded in the
api). Under `-m gpu` on a Hopper GPU, the compiled kernels against `flash_reference`. On
the CPU: the kernels in Mosaic GPU's interpret mode (`interpret=plgpu.InterpretGPUParams()`,
small shapes, forward and gradients against the float32 reference; the wgmma accumulate
steps there are float32 `jnp.dot`s, see `tiles_mosaic_gpu.accumulate`), the mask arithmetic
(`mosaic_gpu_mask`) against the reference mask, the kernels lowered for CUDA (Pallas to
Mosaic GPU, no compile), and that everything the kernel does not cover is refused with a
ValueError before anything is compiled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash.api import flash_attention
from pallas_kernels.flash.mosaic_gpu_mask import MaskSpec
from pallas_kernels.flash.reference import element_mask, flash_reference
from sparse_jax import patterns as P
from gpu_testing import hopper_device, needs_gpu_interpret_pool
from kernel_testing import rel_err


def _inputs(b, t, h, hkv, d, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, h, d), dtype)
    k = jax.random.normal(ks[1], (b, t, hkv, d), dtype)
    v = jax.random.normal(ks[2], (b, t, hkv, d), dtype)
    do = jax.random.normal(ks[3], (b, t, h, d), dtype)
    return q, k, v, do


def _ref(q, k, v, mask_fn):
    t = q.shape[1]
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), q.shape[:2])
    return flash_reference(q, k, v, mask_fn=mask_fn, q_positions=pos, kv_positions=pos,
                           q_segment_ids=None, kv_segment_ids=None, sink_logits=None,
                           softcap=None, scale=q.shape[-1] ** -0.5, return_lse=True,
                           block_score_size=None, block_score_reduce_gqa=False)


@pytest.mark.gpu
@pytest.mark.skipif(hopper_device() is None, reason="needs a Hopper (sm_90) GPU")
@pytest.mark.parametrize("causal", [True, False, 300], ids=["causal", "full", "window300"])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("t", [256, 1024])
@pytest.mark.parametrize("d,dtype", [(128, jnp.bfloat16), (64, jnp.float16)])
def test_mosaic_gpu_forward_compiled(causal, group, t, d, dtype):
    h = 8
    mask_fn = P.causal_window(causal) if causal not in (True, False) else (P.Causal() if causal else None)
    with jax.default_device(hopper_device()):
        q, k, v, _ = _inputs(2, t, h, h // group, d, dtype)
        f = jax.jit(lambda q, k, v: flash_attention(q, k, v, mask_fn=mask_fn, return_lse=True,
                                                    impl="mosaic_gpu"))
        res = f(q, k, v)
        ref = _ref(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask_fn)
        assert res.out.dtype == dtype and res.out.shape == q.shape
        assert np.all(np.isfinite(np.asarray(res.out, np.float32)))
        assert rel_err(res.out, ref.out) < 1e-2            # bf16 P and output, fp32 accumulation
        np.testing.assert_allclose(np.asarray(res.lse), np.asarray(ref.lse), atol=2e-2, rtol=1e-3)


def _ref_grads(q, k, v, do, mask_fn, sinks, lse_weight):
    """Gradients of <out, do> + lse_weight * sum(lse) in float32 through `flash_reference`
    (and d sinks when given)."""
    t, tk = q.shape[1], k.shape[1]
    qpos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), q.shape[:2])
    kpos = jnp.broadcast_to(jnp.arange(tk, dtype=jnp.int32), k.shape[:2])

    def loss(q, k, v, s):
        r = flash_reference(q, k, v, mask_fn=mask_fn, q_positions=qpos, kv_positions=kpos,
                            q_segment_ids=None, kv_segment_ids=None, sink_logits=s,
                            softcap=None, scale=q.shape[-1] ** -0.5, return_lse=True,
                            block_score_size=None, block_score_reduce_gqa=False)
        return (r.out * do).sum() + lse_weight * r.lse.sum()
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    q, k, v, do = f32
    return jax.grad(loss, argnums=(0, 1, 2, 3) if sinks is not None else (0, 1, 2))(q, k, v, sinks)


@pytest.mark.gpu
@pytest.mark.skipif(hopper_device() is None, reason="needs a Hopper (sm_90) GPU")
@pytest.mark.parametrize("mask", ["causal", "full", "window200", "window128"])
@pytest.mark.parametrize("b,t,h,hkv,d", [(1, 256, 4, 4, 128), (2, 768, 8, 2, 64),
                                          (1, 1024, 16, 1, 128)])
@pytest.mark.parametrize("backward", ["mosaic64", "mosaic128", "fused", "fused2r", "triton"])
def test_mosaic_gpu_gradients_match_the_reference(mask, b, t, h, hkv, d, backward):
    """dq, dk, dv of the Mosaic GPU backward (both tile shapes, the one-kernel `fused_dq`
    plan, also with `dkv_two_rounds`; and the Triton backward behind the Mosaic forward)
    against float32 reference gradients, GQA 1/4/16, with a cotangent on the lse output too
    (it enters through `delta`)."""
    from pallas_kernels.flash.api import MosaicGPUBackwardConfig, MosaicGPUConfig, TritonConfig

    mask_fn = {"causal": P.Causal(), "full": None, "window200": P.causal_window(200),
               "window128": P.causal_window(128)}[mask]
    bwd = {"mosaic64": MosaicGPUBackwardConfig(),
           "mosaic128": MosaicGPUBackwardConfig(block_kv_dq=128, block_q_dkv=128),
           "fused": MosaicGPUBackwardConfig(fused_dq=True),
           "fused2r": MosaicGPUBackwardConfig(fused_dq=True, dkv_two_rounds=True),
           "triton": TritonConfig()}[backward]
    with jax.default_device(hopper_device()):
        q, k, v, do = _inputs(b, t, h, hkv, d, jnp.bfloat16, seed=t + h)

        def loss(q, k, v):
            r = flash_attention(q, k, v, mask_fn=mask_fn, return_lse=True, impl="mosaic_gpu",
                                config=MosaicGPUConfig(backward=bwd))
            return (r.out.astype(jnp.float32) * do.astype(jnp.float32)).sum() + 0.37 * r.lse.sum()

        got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
        want = _ref_grads(q, k, v, do, mask_fn, None, 0.37)
        for g, r, name in zip(got, want, "qkv"):
            assert g.dtype == jnp.bfloat16
            assert rel_err(g, r) < 2e-2, (name, rel_err(g, r))


@pytest.mark.gpu
@pytest.mark.skipif(hopper_device() is None, reason="needs a Hopper (sm_90) GPU")
@pytest.mark.parametrize("fused", [False, True], ids=["split", "fused"])
@pytest.mark.parametrize("mask", ["causal", "window96", "full"])
def test_mosaic_gpu_learned_sinks_forward_and_gradients(mask, fused):
    """gpt-oss sinks on the Mosaic GPU path: output, lse and every gradient (d sinks too),
    with either backward plan."""
    from pallas_kernels.flash.api import MosaicGPUBackwardConfig, MosaicGPUConfig

    mask_fn = {"causal": P.Causal(), "window96": P.causal_window(96), "full": None}[mask]
    config = MosaicGPUConfig(backward=MosaicGPUBackwardConfig(fused_dq=fused))
    with jax.default_device(hopper_device()):
        q, k, v, do = _inputs(1, 512, 4, 2, 128, jnp.bfloat16, seed=3)
        sinks = jnp.array([0.5, -1.0, 2.0, 0.0], jnp.float32)

        def loss(q, k, v, s):
            r = flash_attention(q, k, v, mask_fn=mask_fn, sink_logits=s, return_lse=True,
                                impl="mosaic_gpu", config=config)
            return (r.out.astype(jnp.float32) * do.astype(jnp.float32)).sum()

        got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, sinks)
        want = _ref_grads(q, k, v, do, mask_fn, sinks, 0.0)
        for g, r in zip(got, want):
            assert rel_err(g, r) < 2e-2
        res = flash_attention(q, k, v, mask_fn=mask_fn, sink_logits=sinks, return_lse=True,
                              impl="mosaic_gpu")
        pos = jnp.broadcast_to(jnp.arange(512, dtype=jnp.int32), (1, 512))
        ref = flash_reference(*(x.astype(jnp.float32) for x in (q, k, v)), mask_fn=mask_fn,
                              q_positions=pos, kv_positions=pos, q_segment_ids=None,
                              kv_segment_ids=None, sink_logits=sinks, softcap=None,
                              scale=128 ** -0.5, return_lse=True, block_score_size=None,
                              block_score_reduce_gqa=False)
        assert rel_err(res.out, ref.out) < 1e-2
        np.testing.assert_allclose(np.asarray(res.lse), np.asarray(ref.lse), atol=2e-2, rtol=1e-3)


def test_mosaic_gpu_refuses_unsupported_without_compiling():
    """Every unsupported option raises ValueError in the wrapper (CPU, nothing compiled)."""
    q, k, v, _ = _inputs(1, 256, 4, 2, 128, jnp.bfloat16)
    call = lambda *a, **kw: flash_attention(*a, **{"impl": "mosaic_gpu", **kw})  # noqa: E731
    seg = jnp.zeros((1, 256), jnp.int32)
    bad = [
        dict(mask_fn=P.causal_window(64, num_sinks=4)),       # window | sink tokens
        dict(mask_fn=P.causal_window(64, causal=False)),      # two-sided window
        dict(mask_fn=P.Causal(), q_segment_ids=seg, kv_segment_ids=seg),
        dict(softcap=30.0),
        dict(block_score_size=64),
        dict(q_positions=jnp.arange(256)[None] + 5),
        dict(interpret=True),
    ]
    for kw in bad:
        with pytest.raises(ValueError, match="mosaic_gpu"):
            call(q, k, v, **kw)
    from pallas_kernels.flash.api import MosaicGPUBackwardConfig

    with pytest.raises(ValueError, match="fused_dq"):
        MosaicGPUBackwardConfig(fused_dq=True, block_q_dkv=128)
    from pallas_kernels.flash.api import MosaicGPUConfig

    deep = MosaicGPUConfig(backward=MosaicGPUBackwardConfig(fused_dq=True, stages=4))
    def loss(q, k, v):
        return call(q, k, v, mask_fn=P.Causal(), config=deep).astype(jnp.float32).sum()

    with pytest.raises(ValueError, match="SMEM"):        # at trace time, nothing lowered
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v)
    with pytest.raises(ValueError, match="head_dim"):
        call(q[..., :96], k[..., :96], v[..., :96])
    with pytest.raises(ValueError, match="dtype"):
        call(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    kv = jnp.broadcast_to(jnp.arange(256, dtype=jnp.int32), (1, 256))
    for pos in (kv.at[:, 7].set(3),                        # not affine
                kv.at[:, :5].set(-1),                      # leading padding
                jnp.broadcast_to(256 - kv, (1, 256)),      # decreasing
                kv.at[:, 200].set(-1)):                    # padding inside
        with pytest.raises(ValueError, match="kv_positions"):
            call(q, k, v, mask_fn=P.Causal(), kv_positions=pos)


def test_mosaic_gpu_refuses_traced_positions_but_not_the_default_under_jit():
    """The kernel never reads positions: under jit, default positions stay concrete (numpy
    arange from the api) and pass the check; traced user positions raise, never assumed."""
    from pallas_kernels.flash.mosaic_gpu import MosaicGPUConfig, check_supported

    q, k, v, _ = _inputs(1, 256, 4, 2, 128, jnp.bfloat16)
    kw = dict(mask_fn=P.Causal(), q_segment_ids=None, kv_segment_ids=None, sink_logits=None,
              softcap=None, block_score_size=None, interpret=False, config=MosaicGPUConfig())
    default = np.broadcast_to(np.arange(256, dtype=np.int32), (1, 256))

    def traced(pos):
        check_supported(q, k, v, q_positions=pos, kv_positions=pos, **kw)
        return pos

    jax.jit(lambda: traced(default))()                      # concrete default: accepted
    concrete = jnp.asarray(default)
    jax.jit(lambda: traced(concrete))()                     # concrete array (closed over)
    with pytest.raises(ValueError, match="positions"):
        jax.jit(traced)(jnp.asarray(default))                # traced, even if equal: refused


def test_mosaic_gpu_takes_causal_masks_by_their_is_causal_attribute():
    """The kernel-level check reads `mask_fn.is_causal` (pallas_kernels imports no mask class
    from sparse_jax): `Causal()` and any predicate declaring it pass; a window, a union
    holding `Causal()`, or a plain function do not."""
    from pallas_kernels.flash.mosaic_gpu import MosaicGPUConfig, check_supported

    class KernelCausal:
        is_causal = True

        def __call__(self, q_pos, kv_pos, q_seg=None, kv_seg=None):
            return kv_pos <= q_pos

    q, k, v, _ = _inputs(1, 256, 4, 2, 128, jnp.bfloat16)
    pos = np.broadcast_to(np.arange(256, dtype=np.int32), (1, 256))
    kw = dict(q_positions=pos, kv_positions=pos, q_segment_ids=None, kv_segment_ids=None,
              sink_logits=None, softcap=None, block_score_size=None, interpret=False,
              config=MosaicGPUConfig())
    for mask_fn in (None, P.Causal(), KernelCausal(), P.causal_window(64), P.SlidingWindow(8)):
        check_supported(q, k, v, mask_fn=mask_fn, **kw)
    for mask_fn in (P.causal_window(64, num_sinks=2), P.Causal() | P.Sinks(4),
                    P.SlidingWindow(8, 1), lambda qp, kp, qs, ks: kp <= qp):
        with pytest.raises(ValueError, match="mask_fn"):
            check_supported(q, k, v, mask_fn=mask_fn, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(hopper_device() is None, reason="needs a Hopper (sm_90) GPU")
def test_auto_prefers_mosaic_gpu_where_it_applies(monkeypatch):
    """impl='auto' on Hopper: Mosaic GPU for a supported call (also under jit with default
    positions), Triton for anything it does not cover (here a soft-cap)."""
    from pallas_kernels.flash import api

    calls = []
    for name in ("mosaic_gpu", "triton"):
        fn = api.IMPLEMENTATIONS[name]
        monkeypatch.setitem(api.IMPLEMENTATIONS, name,
                            lambda *a, _fn=fn, _name=name, **kw: (calls.append(_name), _fn(*a, **kw))[1])
    q, k, v, _ = _inputs(1, 256, 4, 2, 128, jnp.bfloat16)
    out = jax.jit(lambda q, k, v: flash_attention(q, k, v, mask_fn=P.Causal()))(q, k, v)
    assert calls == ["mosaic_gpu"]
    assert rel_err(out, _ref(q, k, v, P.Causal()).out) < 2e-2
    flash_attention(q, k, v, mask_fn=P.Causal(), softcap=30.0)
    assert calls == ["mosaic_gpu", "triton"]


def _mask_specs():
    """(spec, Tq, Tk padded): default causal / full / windows, padded keys, NSA's
    compressed keys (d=16, l=32; rows t < 31 see nothing), other strides and offsets."""
    return [(MaskSpec(512, True), 512, 512), (MaskSpec(500, True), 512, 512),
            (MaskSpec(512), 512, 512), (MaskSpec(450), 512, 512),
            (MaskSpec(512, True, 100), 512, 512), (MaskSpec(384, True, 64), 384, 512),
            (MaskSpec(30, True, None, 16, 31), 512, 128), (MaskSpec(64, True, None, 16, 31), 1152, 128),
            (MaskSpec(60, True, 40, 16, 31), 1024, 128), (MaskSpec(40, True, None, 3, 700), 512, 128),
            (MaskSpec(100, True, 7, 5, 2), 512, 128)]


def _spec_mask(spec, tq, tk):
    """The reference mask (`element_mask`) of `spec`: queries at arange, keys at their
    positions, padded keys at -1."""
    j = np.arange(tk)
    kv_pos = np.where(j < spec.kv_len, spec.stride * j + spec.offset, -1)[None]
    mask_fn = (None if not spec.causal else
               P.Causal() if spec.window is None else P.causal_window(spec.window))
    return np.asarray(element_mask(mask_fn, jnp.arange(tq)[None], jnp.asarray(kv_pos), None, None))[0]


@pytest.mark.parametrize("rows,bk", [(128, 64), (64, 128)])
def test_mosaic_gpu_mask_matches_the_reference_mask(rows, bk):
    """`MaskSpec.visible` equals the reference mask; `kv_tiles` (query blocks -> KV tiles)
    and `q_tiles` (KV blocks -> query tiles) visit every tile holding a visible element,
    the KV range exactly, and their mask-free runs hold only visible elements."""
    for spec, tq, tk in _mask_specs():
        m = _spec_mask(spec, tq, tk)
        got = np.broadcast_to(spec.visible(jnp.arange(tq)[:, None], jnp.arange(tk)[None]), m.shape)
        np.testing.assert_array_equal(got, m, err_msg=str(spec))
        starts = jnp.arange(0, tq, rows)
        los, flos, fhis, his = (np.broadcast_to(x, starts.shape) for x in spec.kv_tiles(starts, rows, bk))
        for n, r0 in enumerate(range(0, tq, rows)):
            blk = m[r0:r0 + rows].reshape(rows, tk // bk, bk)
            live = np.flatnonzero(blk.any((0, 2)))
            lo, flo, fhi, hi = los[n], flos[n], fhis[n], his[n]
            assert lo <= flo <= fhi <= hi <= tk // bk, (spec, r0)
            if live.size:
                assert (lo, hi) == (live[0], live[-1] + 1), (spec, r0, lo, hi, live)
            else:
                assert hi - lo <= 1, (spec, r0)
            assert blk[:, flo:fhi].all(), (spec, r0)
        nq = tq // bk                      # query tiles of bk rows for KV blocks of `rows` keys
        starts = jnp.arange(0, tk, rows)
        los, flos, fhis, his = (np.broadcast_to(x, starts.shape)
                                for x in spec.q_tiles(starts, rows, bk, nq))
        for n, k0 in enumerate(range(0, tk, rows)):
            blk = m.T[k0:k0 + rows].reshape(rows, nq, bk)
            live = np.flatnonzero(blk.any((0, 2)))
            lo, flo, fhi, hi = los[n], flos[n], fhis[n], his[n]
            assert 0 <= lo <= flo <= fhi <= hi <= nq, (spec, k0)
            assert np.all((live >= lo) & (live < hi)), (spec, k0, lo, hi, live)
            if spec.window is not None and live.size:
                assert (lo, hi) == (live[0], live[-1] + 1), (spec, k0)
            if k0 >= spec.kv_len:
                assert lo == hi, (spec, k0)
            assert blk[:, flo:fhi].all(), (spec, k0)


def test_mosaic_gpu_dkv_head_split():
    """The dK/dV grid is split over the GQA group only when it is short of CTAs."""
    from pallas_kernels.flash.mosaic_gpu_vjp import dkv_head_split

    assert dkv_head_split(16, 512, 264) == 1          # 64 heads / 4 kv heads at 16K
    assert dkv_head_split(16, 128, 264) == 4          # NSA compressed keys at 64K
    assert dkv_head_split(16, 32, 264) == 16          # ... at 16K: the whole group
    assert dkv_head_split(6, 100, 264) == 3
    assert dkv_head_split(1, 8, 264) == 1


def _compressed_positions(b, n, stride, offset, n_pad=0):
    """Concrete `[b, n + n_pad]` key positions `stride * j + offset`, then -1 padding."""
    j = np.arange(n + n_pad)
    pos = np.where(j < n, stride * j + offset, -1).astype(np.int32)
    return jnp.asarray(np.broadcast_to(pos, (b, n + n_pad)))


def test_mosaic_gpu_takes_affine_key_positions_and_pads_lengths():
    """Keys at `stride * arange + offset` then padding, any lengths: accepted, with the
    spec the kernels hard-code; lengths padded to the tiles of the forward and backward."""
    from pallas_kernels.flash.mosaic_gpu import (MosaicGPUBackwardConfig, MosaicGPUConfig,
                                                 TritonConfig, check_supported, padded_lengths)

    q, k, v, _ = _inputs(1, 1000, 16, 1, 128, jnp.bfloat16)
    kw = dict(q_segment_ids=None, kv_segment_ids=None, sink_logits=None, softcap=None,
              block_score_size=None, interpret=False, config=MosaicGPUConfig())
    qpos = np.broadcast_to(np.arange(1000, dtype=np.int32), (1, 1000))
    spec = check_supported(q, k[:, :61], v[:, :61], mask_fn=P.Causal(), q_positions=qpos,
                           kv_positions=_compressed_positions(1, 61, 16, 31), **kw)
    assert spec == MaskSpec(kv_len=61, causal=True, stride=16, offset=31)
    spec = check_supported(q, k[:, :70], v[:, :70], mask_fn=P.causal_window(64), q_positions=qpos,
                           kv_positions=_compressed_positions(1, 61, 16, 31, n_pad=9), **kw)
    assert spec == MaskSpec(kv_len=61, causal=True, window=64, stride=16, offset=31)
    assert padded_lengths(1000, 61, MosaicGPUConfig()) == (1024, 128)
    wide = MosaicGPUConfig(block_kv=192, backward=MosaicGPUBackwardConfig(block_q_dkv=192))
    assert padded_lengths(1000, 61, wide) == (1152, 384)
    assert padded_lengths(1000, 61, MosaicGPUConfig(block_kv=192, backward=TritonConfig())) == (1024, 192)


def _lowers_for_cuda(b, tq, h, hkv, d, tk, mask_fn, kv_positions, config=None):
    """Trace fwd + bwd through `impl="mosaic_gpu"` and lower them for CUDA (Pallas to Mosaic
    GPU; no GPU needed, nothing compiled)."""
    q = jax.ShapeDtypeStruct((b, tq, h, d), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((b, tk, hkv, d), jnp.bfloat16)

    def loss(q, k, v):
        r = flash_attention(q, k, v, mask_fn=mask_fn, kv_positions=kv_positions, return_lse=True,
                            impl="mosaic_gpu", config=config)
        return r.out.astype(jnp.float32).sum() + jnp.where(jnp.isfinite(r.lse), r.lse, 0.0).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return grad.trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()


def test_mosaic_gpu_kernels_lower_for_cuda_on_the_cpu():
    """The kernels (forward, dQ, dK/dV with the GQA group split; the fused dK/dV/dQ kernel
    at D = 128 (dQ's columns split) and 64 (unsplit); `dkv_two_rounds`) lower to Mosaic GPU for
    NSA's compressed keys (ragged) and for a window on default positions."""
    from pallas_kernels.flash.api import MosaicGPUBackwardConfig, MosaicGPUConfig

    text = _lowers_for_cuda(1, 1000, 16, 1, 128, 61, P.Causal(), _compressed_positions(1, 61, 16, 31))
    for name in ("flash_fwd_mosaic_gpu", "flash_bwd_dq_mosaic_gpu", "flash_bwd_dkv_mosaic_gpu"):
        assert name in text
    _lowers_for_cuda(2, 300, 4, 2, 64, 300, P.causal_window(100), None)
    for d, two_rounds in ((128, False), (64, False), (128, True)):
        fused = MosaicGPUConfig(backward=MosaicGPUBackwardConfig(fused_dq=True, dkv_two_rounds=two_rounds))
        text = _lowers_for_cuda(1, 1000, 16, 4, d, 61, P.Causal(),
                                _compressed_positions(1, 61, 16, 31), fused)
        assert "flash_bwd_dkvq_mosaic_gpu" in text and "flash_bwd_dq_mosaic_gpu" not in text
    two_rounds = MosaicGPUConfig(backward=MosaicGPUBackwardConfig(dkv_two_rounds=True))
    assert "flash_bwd_dkv_mosaic_gpu" in _lowers_for_cuda(1, 256, 4, 4, 128, 256, P.Causal(), None,
                                                          two_rounds)


def _affine_ref(q, k, v, mask_fn, kv_positions):
    """float32 `flash_reference` (out, lse) with queries at arange, keys at kv_positions."""
    qpos = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), q.shape[:2])
    return flash_reference(*(x.astype(jnp.float32) for x in (q, k, v)), mask_fn=mask_fn,
                           q_positions=qpos, kv_positions=kv_positions, q_segment_ids=None,
                           kv_segment_ids=None, sink_logits=None, softcap=None,
                           scale=q.shape[-1] ** -0.5, return_lse=True, block_score_size=None,
                           block_score_reduce_gqa=False)


@pytest.mark.gpu
@pytest.mark.skipif(hopper_device() is None, reason="needs a Hopper (sm_90) GPU")
@pytest.mark.parametrize("b,tq,h,hkv,n,n_pad,stride,offset,window", [
    (1, 1000, 16, 1, 61, 0, 16, 31, None),      # NSA (d=16, l=32), GQA 16, ragged Tq and Tk
    (2, 520, 8, 2, 31, 2, 16, 31, None),        # GQA 4, padded key slots
    (1, 300, 4, 4, 140, 0, 2, 3, None),         # GQA 1, stride 2
    (1, 700, 8, 2, 40, 0, 16, 31, 100),         # a causal window over the compressed keys
    (1, 2048, 16, 4, 127, 0, 16, 31, None),     # several KV tiles, split dK/dV grid
    (1, 1000, 8, 2, 1000, 0, 1, 0, None),       # default positions, ragged (padded) lengths
])
@pytest.mark.parametrize("fused", [False, True], ids=["split", "fused"])
def test_mosaic_gpu_compressed_keys_match_the_reference(b, tq, h, hkv, n, n_pad, stride, offset,
                                                       window, fused):
    """Keys at `stride * j + offset` (NSA's compressed branch): out, lse and dq, dk, dv
    (with an lse cotangent, either backward plan) against the float32 reference on bf16
    inputs; rows that see no key give out 0, lse -inf and zero dq, never NaN."""
    from pallas_kernels.flash.api import MosaicGPUBackwardConfig, MosaicGPUConfig

    mask_fn = P.Causal() if window is None else P.causal_window(window)
    config = MosaicGPUConfig(backward=MosaicGPUBackwardConfig(fused_dq=fused))
    kv_pos = _compressed_positions(b, n, stride, offset, n_pad)
    with jax.default_device(hopper_device()):
        q, _, _, do = _inputs(b, tq, h, hkv, 128, jnp.bfloat16, seed=tq + n)
        _, k, v, _ = _inputs(b, n + n_pad, h, hkv, 128, jnp.bfloat16, seed=n)
        res = jax.jit(lambda q, k, v: flash_attention(q, k, v, mask_fn=mask_fn, kv_positions=kv_pos,
                                                      return_lse=True, impl="mosaic_gpu"))(q, k, v)
        ref = _affine_ref(q, k, v, mask_fn, kv_pos)
        assert res.out.dtype == jnp.bfloat16 and res.out.shape == q.shape
        assert np.all(np.isfinite(np.asarray(res.out, np.float32)))
        assert rel_err(res.out, ref.out) < 1e-2
        np.testing.assert_allclose(np.asarray(res.lse), np.asarray(ref.lse), atol=2e-2, rtol=1e-3)
        blind = slice(0, offset)                             # rows t < offset see no key
        assert np.all(np.asarray(res.out[:, blind], np.float32) == 0)
        assert np.all(np.isneginf(np.asarray(res.lse[:, :, blind])))

        def loss(q, k, v, impl):
            r = (flash_attention(q, k, v, mask_fn=mask_fn, kv_positions=kv_pos, return_lse=True,
                                 impl=impl, config=config)
                 if impl else _affine_ref(q, k, v, mask_fn, kv_pos))
            lse = jnp.where(jnp.isfinite(r.lse), r.lse, 0.0)
            return (r.out.astype(jnp.float32) * do.astype(jnp.float32)).sum() + 0.37 * lse.sum()

        got = jax.jit(jax.grad(lambda *a: loss(*a, "mosaic_gpu"), argnums=(0, 1, 2)))(q, k, v)
        want = jax.grad(lambda *a: loss(*a, None), argnums=(0, 1, 2))(
            *(x.astype(jnp.float32) for x in (q, k, v)))
        for g, r, name in zip(got, want, "qkv"):
            assert g.dtype == jnp.bfloat16
            assert np.all(np.isfinite(np.asarray(g, np.float32))), name
            assert rel_err(g, r) < 2e-2, (name, rel_err(g, r))
        assert np.all(np.asarray(got[0][:, blind], np.float32) == 0)


@pytest.mark.gpu
@pytest.mark.skipif(hopper_device() is None, reason="needs a Hopper (sm_90) GPU")
def test_auto_runs_nsa_compressed_branch_on_mosaic_gpu(monkeypatch):
    """NSA's compressed branch (`compressed_branch_lse`, impl='auto') with concrete positions
    runs on Mosaic GPU on Hopper, and matches the XLA path."""
    from pallas_kernels.flash import api
    from sparse_jax.ops import nsa

    calls = []
    fn = api.IMPLEMENTATIONS["mosaic_gpu"]
    monkeypatch.setitem(api.IMPLEMENTATIONS, "mosaic_gpu",
                        lambda *a, **kw: (calls.append("mosaic_gpu"), fn(*a, **kw))[1])
    cfg = nsa.NSAConfig()
    t = 1000
    n = nsa.num_cmp_blocks(t, cfg)
    qpos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, t))
    cpos = jnp.broadcast_to(nsa.cmp_block_end(jnp.arange(n, dtype=jnp.int32), cfg), (1, n))
    with jax.default_device(hopper_device()):
        q, _, _, _ = _inputs(1, t, 16, 1, 128, jnp.bfloat16, seed=5)
        _, k, v, _ = _inputs(1, n, 16, 1, 128, jnp.bfloat16, seed=6)
        out, lse = jax.jit(lambda q, k, v: nsa.compressed_branch_lse(q, k, v, qpos, cpos))(q, k, v)
        assert calls == ["mosaic_gpu"]
        ref_out, ref_lse = nsa.compressed_branch_lse(q, k, v, qpos, cpos, impl="xla")
        assert rel_err(out, ref_out) < 2e-2
        np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), atol=2e-2, rtol=1e-3)


@needs_gpu_interpret_pool
@pytest.mark.parametrize("tq,h,hkv,n,n_pad,stride,offset,mask,tiles,d", [
    (200, 2, 2, 200, 0, 1, 0, "causal", "kv64-bwd128", 64),  # GQA 1, ragged; the two consumers
                                                             # of a CTA see different KV tiles
    (200, 4, 1, 200, 0, 1, 0, "full", "unsplit", 64),   # GQA 4 summed on chip (one dK/dV CTA)
    (300, 2, 2, 300, 0, 1, 0, "window64", "mosaic64", 64),  # GQA 1, a causal window
    (300, 4, 1, 17, 0, 16, 31, "causal", "mosaic64", 64),   # NSA's compressed keys (d=16, l=32)
    (300, 4, 1, 17, 2, 16, 31, "window100", "mosaic64", 64),  # ... padded key slots, a window
    (200, 2, 1, 12, 0, 16, 31, "causal", "triton-bwd", 64),  # the Triton backward (its interpreter)
    # the one-kernel backward (fused_dq): D=128 splits dQ's columns over the consumers
    (200, 2, 2, 200, 0, 1, 0, "causal", "fused", 128),  # ragged, two KV tiles add into dq
    (200, 4, 1, 200, 0, 1, 0, "full", "fused", 64),     # GQA 4 split over CTAs, own dQ rows
    (200, 4, 1, 200, 0, 1, 0, "causal", "fused-2rounds", 128),  # dkv_two_rounds, GQA 4
    (300, 4, 1, 17, 2, 16, 31, "window100", "fused", 128),  # NSA keys, padded slots, window
], ids=["causal", "full-gqa4", "window", "nsa-cmp", "nsa-cmp-window-padded", "triton-bwd",
        "fused-causal", "fused-full-gqa4", "fused-2rounds", "fused-nsa-cmp-window-padded"])
def test_mosaic_gpu_kernels_in_gpu_interpret_mode(tq, h, hkv, n, n_pad, stride, offset, mask,
                                                  tiles, d):
    """The Mosaic GPU forward and backward kernels run on the CPU in GPU interpret mode
    (`interpret=plgpu.InterpretGPUParams()`: simulated SMEM, TMA, barriers, warpgroups) on
    the smallest shapes they take: out, lse and dq, dk, dv (with an lse cotangent) against
    the float32 reference; rows that see no key (t < offset) give out 0, lse -inf, dq 0.
    (One case takes the Triton backward behind the Mosaic forward: Triton's interpreter;
    the `fused` cases the one-kernel backward, whose TMA reduce-add the interpreter lacks:
    see `mosaic_gpu_vjp`.)"""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    from pallas_kernels.flash.api import MosaicGPUBackwardConfig, MosaicGPUConfig, TritonConfig

    mask_fn = {"causal": P.Causal(), "full": None, "window64": P.causal_window(64),
               "window100": P.causal_window(100)}[mask]
    config = {"mosaic64": MosaicGPUConfig(),
              "kv64-bwd128": MosaicGPUConfig(block_kv=64, backward=MosaicGPUBackwardConfig(
                  block_kv_dq=128, block_q_dkv=128)),
              "unsplit": MosaicGPUConfig(backward=MosaicGPUBackwardConfig(dkv_min_ctas=1)),
              "fused": MosaicGPUConfig(backward=MosaicGPUBackwardConfig(fused_dq=True)),
              "fused-2rounds": MosaicGPUConfig(backward=MosaicGPUBackwardConfig(
                  fused_dq=True, dkv_two_rounds=True)),
              "triton-bwd": MosaicGPUConfig(backward=TritonConfig())}[tiles]
    kv_pos = _compressed_positions(1, n, stride, offset, n_pad)
    q, _, _, do = _inputs(1, tq, h, hkv, d, jnp.bfloat16, seed=tq + n)
    _, k, v, _ = _inputs(1, n + n_pad, h, hkv, d, jnp.bfloat16, seed=n)

    def loss(q, k, v, interpret):
        r = (flash_attention(q, k, v, mask_fn=mask_fn, kv_positions=kv_pos, return_lse=True,
                             impl="mosaic_gpu", interpret=interpret,
                             config=config)
             if interpret else _affine_ref(q, k, v, mask_fn, kv_pos))
        lse = jnp.where(jnp.isfinite(r.lse), r.lse, 0.0)
        return (r.out.astype(jnp.float32) * do.astype(jnp.float32)).sum() + 0.37 * lse.sum(), r

    grad = lambda interpret, *a: jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(*a, interpret)  # noqa: E731
    got, res = jax.jit(lambda *a: grad(plgpu.InterpretGPUParams(), *a))(q, k, v)
    want, ref = jax.jit(lambda *a: grad(None, *a))(*(x.astype(jnp.float32) for x in (q, k, v)))  # not op by op
    assert res.out.dtype == jnp.bfloat16 and res.out.shape == q.shape
    assert rel_err(res.out, ref.out) < 1e-2
    np.testing.assert_array_equal(np.isneginf(np.asarray(res.lse)), np.isneginf(np.asarray(ref.lse)))
    seen = np.isfinite(np.asarray(ref.lse))
    np.testing.assert_allclose(np.asarray(res.lse)[seen], np.asarray(ref.lse)[seen], atol=1e-4)
    blind = slice(0, offset)
    assert np.all(np.asarray(res.out[:, blind], np.float32) == 0)
    for g, r, name in zip(got, want, "qkv"):
        assert g.dtype == jnp.bfloat16
        assert np.all(np.isfinite(np.asarray(g, np.float32))), name
        assert rel_err(g, r) < 1e-2, (name, rel_err(g, r))
    assert np.all(np.asarray(got[0][:, blind], np.float32) == 0)
