"""`flash` with `impl="mosaic_gpu"` (Pallas Mosaic GPU, Hopper only).

Forward and backward (`mosaic_gpu_vjp`): full, causal, causal sliding window, learned
sinks. Mosaic GPU kernels are not run on the CPU here (its GPU interpret mode does not cover
`wgmma` accumulators in this jax), so the kernel itself is tested only under `-m gpu`
on a Hopper GPU, against `flash_reference`; the CPU test checks that everything the
kernel does not cover is refused with a ValueError before anything is compiled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash.api import flash_attention
from pallas_kernels.flash.reference import flash_reference
from sparse_jax import patterns as P
from kernel_testing import rel_err


def _hopper():
    try:
        devs = jax.devices("gpu")
    except RuntimeError:
        return None
    if devs and getattr(devs[0], "compute_capability", "") == "9.0":
        return devs[0]
    return None


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
@pytest.mark.skipif(_hopper() is None, reason="needs a Hopper (sm_90) GPU")
@pytest.mark.parametrize("causal", [True, False, 300], ids=["causal", "full", "window300"])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("t", [256, 1024])
@pytest.mark.parametrize("d,dtype", [(128, jnp.bfloat16), (64, jnp.float16)])
def test_mosaic_gpu_forward_compiled(causal, group, t, d, dtype):
    h = 8
    mask_fn = P.causal_window(causal) if causal not in (True, False) else (P.Causal() if causal else None)
    with jax.default_device(_hopper()):
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
@pytest.mark.skipif(_hopper() is None, reason="needs a Hopper (sm_90) GPU")
@pytest.mark.parametrize("mask", ["causal", "full", "window200", "window128"])
@pytest.mark.parametrize("b,t,h,hkv,d", [(1, 256, 4, 4, 128), (2, 768, 8, 2, 64),
                                          (1, 1024, 16, 1, 128)])
@pytest.mark.parametrize("backward", ["mosaic64", "mosaic128", "triton"])
def test_mosaic_gpu_gradients_match_the_reference(mask, b, t, h, hkv, d, backward):
    """dq, dk, dv of the Mosaic GPU backward (both tile shapes; and the Triton backward
    behind the Mosaic forward) against float32 reference gradients, GQA 1/4/16, with a
    cotangent on the lse output too (it enters through `delta`)."""
    from pallas_kernels.flash.api import MosaicGPUBackwardConfig, MosaicGPUConfig, TritonConfig

    mask_fn = {"causal": P.Causal(), "full": None, "window200": P.causal_window(200),
               "window128": P.causal_window(128)}[mask]
    bwd = {"mosaic64": MosaicGPUBackwardConfig(),
           "mosaic128": MosaicGPUBackwardConfig(block_kv_dq=128, block_q_dkv=128),
           "triton": TritonConfig()}[backward]
    with jax.default_device(_hopper()):
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
@pytest.mark.skipif(_hopper() is None, reason="needs a Hopper (sm_90) GPU")
@pytest.mark.parametrize("mask", ["causal", "window96", "full"])
def test_mosaic_gpu_learned_sinks_forward_and_gradients(mask):
    """gpt-oss sinks on the Mosaic GPU path: output, lse and every gradient (d sinks too)."""
    mask_fn = {"causal": P.Causal(), "window96": P.causal_window(96), "full": None}[mask]
    with jax.default_device(_hopper()):
        q, k, v, do = _inputs(1, 512, 4, 2, 128, jnp.bfloat16, seed=3)
        sinks = jnp.array([0.5, -1.0, 2.0, 0.0], jnp.float32)

        def loss(q, k, v, s):
            r = flash_attention(q, k, v, mask_fn=mask_fn, sink_logits=s, return_lse=True,
                                impl="mosaic_gpu")
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
    with pytest.raises(ValueError, match="lengths"):
        call(q[:, :200], k[:, :200], v[:, :200])
    with pytest.raises(ValueError, match="head_dim"):
        call(q[..., :96], k[..., :96], v[..., :96])
    with pytest.raises(ValueError, match="dtype"):
        call(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    with pytest.raises(ValueError, match="lengths"):   # Tk must be a multiple of block_kv
        call(q, k[:, :192], v[:, :192])


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
@pytest.mark.skipif(_hopper() is None, reason="needs a Hopper (sm_90) GPU")
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
