"""`mla_decode` (absorbed MLA decode over the latent cache, sparse and dense) kernels against
`mla_decode_reference`, and the reference against an independent dense-mask attention over
the concatenated keys `[c_kv | k_rope]` (mask built in numpy loops): output and lse in
float32 on fresh random inputs. Triton in `interpret=True`, Mosaic TPU in
`pltpu.InterpretParams()`, Mosaic GPU (bf16, H a multiple of 64; sparse with the rows
gathered in the kernel, and over XLA-gathered rows) in GPU interpret mode (`plgpu.InterpretGPUParams()`) and lowered for CUDA. Sparse (K with -1
padding, slots of future positions listed) and dense modes, ragged cache rows (positions
-1), a padded query, a query that sees nothing, T = 1 and 2, one and several splits, widths
that are not multiples of 16, the real widths (Dc=512, Dr=64); the reference VJP of the
kernels; argument errors. `gpu`-marked tests compile the Triton kernel at H=64, Dc=512,
Dr=64, S=4096, K=256, and the Mosaic GPU one (dense at S=4096 and 4100, sparse K=300 and
2047 with duplicated entries, S=4101).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import masked_attention
from pallas_kernels.mla_decode import mla_decode
from pallas_kernels.mla_decode.api import MlaDecodeMosaicGpuConfig
from pallas_kernels.mla_decode.reference import mla_decode_reference
from pallas_kernels.mla_decode.tpu import MlaDecodeTpuConfig, mla_decode_tpu
from pallas_kernels.mla_decode.triton import MlaDecodeTritonConfig, geometry, mla_decode_triton
from gpu_testing import has_gpu, needs_gpu_interpret_pool
from kernel_testing import max_rel_err

SCALE = 0.15


@dataclasses.dataclass(frozen=True)
class MlaCase:
    name: str
    b: int = 2
    t: int = 1
    h: int = 16
    dc: int = 64
    dr: int = 16
    s: int = 45
    k: int | None = 20          # listed entries per query; None: dense
    num_splits: int | None = None
    seed: int = 0


CASES = [
    MlaCase("sparse_t2_ragged", t=2, s=45, k=20, num_splits=2, seed=1),
    MlaCase("sparse_t1_one_split", t=1, s=37, k=40, num_splits=1, seed=2),
    MlaCase("dense_t2_ragged", t=2, s=45, k=None, num_splits=2, seed=3),
    MlaCase("dense_t1_auto_splits", t=1, s=70, k=None, seed=4),
]


def make_inputs(c: MlaCase, dtype=jnp.float32):
    """Random q / cache. The last batch row is ragged (slots from 30 on empty, position -1)
    and its query 0 is padding (position -1: zeros). Queries sit a few positions before the
    end of their row, so listed slots can be in their future (masked). Sparse: random
    distinct slots with -1 padding; row 0's last query lists only future slots (sees
    nothing though valid: zeros)."""
    rng = np.random.default_rng(c.seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731
    q = normal(c.b, c.t, c.h, c.dc + c.dr)
    c_kv, k_rope = normal(c.b, c.s, c.dc), normal(c.b, c.s, c.dr)
    kv_pos = np.tile(np.arange(c.s, dtype=np.int32), (c.b, 1))
    fill = min(30, c.s)
    kv_pos[-1, fill:] = -1
    q_pos = np.stack([np.arange(c.t) + c.s - c.t - 4, np.arange(c.t) + fill - c.t]).astype(np.int32)[:c.b]
    q_pos[-1, 0] = -1                                                   # sees nothing
    idx = None
    if c.k is not None:
        idx = np.full((c.b, c.t, c.k), -1, np.int32)
        for row in np.ndindex(c.b, c.t):
            n = rng.integers(1, min(c.k, c.s) + 1)
            idx[row][:n] = rng.choice(c.s, n, replace=False)            # distinct; future and empty slots too
            rng.shuffle(idx[row])
        idx[0, -1] = -1
        idx[0, -1, 0] = c.s - 1                                         # only a future slot
        idx = jnp.asarray(idx)
    kw = dict(indices=idx, q_positions=jnp.asarray(q_pos), kv_positions=jnp.asarray(kv_pos), scale=SCALE,
              return_lse=True, num_splits=c.num_splits)
    return (q, c_kv, k_rope), kw


def with_duplicates(kw):
    """`kw` with each query's first -1 padding entry (if any) listing its first entry again:
    a slot listed twice counts twice (the reference's gather semantics)."""
    idx = np.asarray(kw["indices"]).copy()
    dups = 0
    for row in np.ndindex(*idx.shape[:2]):
        pad = np.flatnonzero(idx[row] < 0)
        if len(pad) and idx[row][0] >= 0:
            idx[row][pad[0]] = idx[row][0]
            dups += 1
    assert dups
    return dict(kw, indices=jnp.asarray(idx))


def dense_mask_attention(q, c_kv, k_rope, *, indices, q_positions, kv_positions, scale, **_):
    """Independent check: keys `[c_kv | k_rope]` as one MQA head, values `c_kv`, and the
    visibility mask built element by element in numpy."""
    b, t = q_positions.shape
    s = c_kv.shape[1]
    qp, kp = np.asarray(q_positions), np.asarray(kv_positions)
    mask = np.zeros((b, t, s), bool)
    for bi, ti, si in np.ndindex(b, t, s):
        listed = indices is None or si in np.asarray(indices)[bi, ti]
        mask[bi, ti, si] = listed and qp[bi, ti] >= 0 and 0 <= kp[bi, si] <= qp[bi, ti]
    k = jnp.concatenate([c_kv, k_rope], -1)[:, :, None]
    out, _, lse = jax.jit(masked_attention, static_argnames="scale")(q, k, c_kv[:, :, None], mask, scale=scale)
    return out, lse


def assert_matches(got, want, tol=1e-5):
    assert max_rel_err(got[0], want[0]) < tol
    fin = np.isfinite(np.asarray(want[1]))
    np.testing.assert_array_equal(np.isfinite(np.asarray(got[1])), fin)
    np.testing.assert_allclose(np.asarray(got[1])[fin], np.asarray(want[1])[fin], atol=1e-5, rtol=1e-5)


def check_zero_rows(out, kw):
    """The padded query (last row, query 0) and, sparse, row 0's last query give zeros."""
    assert np.abs(np.asarray(out)[-1, 0]).max() == 0.0
    if kw["indices"] is not None:
        assert np.abs(np.asarray(out)[0, -1]).max() == 0.0


def run(fn, args, kw, **extra):
    """`fn(*args, **kw, **extra)` under one jit (interpret mode compiles much faster whole)."""
    return jax.jit(lambda *a: fn(*a, **kw, **extra))(*args)


@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=lambda c: c.name)
def test_reference_matches_dense_mask_attention(case):
    args, kw = make_inputs(case)
    got = run(mla_decode_reference, args, kw)
    assert_matches(got, dense_mask_attention(*args, **kw))
    check_zero_rows(got.out, kw)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_triton_matches_reference(case):
    args, kw = make_inputs(case)
    got = run(mla_decode_triton, args, kw, interpret=True, config=MlaDecodeTritonConfig(block_k=16))
    assert_matches(got, mla_decode_reference(*args, **kw))
    check_zero_rows(got.out, kw)


@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=lambda c: c.name)
def test_tpu_matches_reference(case):
    args, kw = make_inputs(case)
    got = run(mla_decode_tpu, args, kw, interpret=True, config=MlaDecodeTpuConfig(block_k=8))
    assert_matches(got, mla_decode_reference(*args, **kw))
    check_zero_rows(got.out, kw)


def test_triton_odd_widths_and_rows_split_over_programs():
    """Dc=10, Dr=4 (padded to 16 inside), H=3; then H=32 forced to 16 heads per program."""
    case = MlaCase("odd", t=2, h=3, dc=10, dr=4, s=23, k=9, num_splits=3, seed=5)
    args, kw = make_inputs(case)
    got = run(mla_decode_triton, args, kw, interpret=True)
    assert_matches(got, mla_decode_reference(*args, **kw))
    case = MlaCase("parts", t=1, h=32, s=40, k=None, num_splits=2, seed=6)
    args, kw = make_inputs(case)
    cfg = MlaDecodeTritonConfig(block_k=16, max_rows=16)
    assert geometry(args[0], args[1], args[2], None, cfg, 2).parts == 2
    got = run(mla_decode_triton, args, kw, interpret=True, config=cfg)
    assert_matches(got, mla_decode_reference(*args, **kw))


@pytest.mark.parametrize("impl", ["triton", "mosaic_tpu"])
def test_real_widths_tiny_cache(impl):
    """DeepSeek's Dc=512, Dr=64 (Triton: one 512 piece + one 64 piece); H=16, S=24, K=12."""
    case = MlaCase("real", b=2, t=1, h=16, dc=512, dr=64, s=24, k=12, num_splits=2, seed=7)
    args, kw = make_inputs(case)
    got = run(mla_decode, args, kw, impl=impl, interpret=True)
    assert_matches(got, mla_decode_reference(*args, **kw), tol=2e-5)


def test_bf16_partials_triton():
    """bf16 inputs: bf16 partials over 3 splits, merged in float32, vs the reference (which
    rounds only the output) within bf16 rounding."""
    case = MlaCase("bf16", t=1, s=60, k=None, num_splits=3, seed=12)
    args, kw = make_inputs(case, jnp.bfloat16)
    got = run(mla_decode_triton, args, kw, interpret=True, config=MlaDecodeTritonConfig(block_k=16))
    assert got.out.dtype == jnp.bfloat16
    assert max_rel_err(got.out, mla_decode_reference(*args, **kw).out) < 1.5e-2


def test_gradient_is_the_references():
    """Differentiating the kernel path gives the reference's gradients (its custom VJP)."""
    args, kw = make_inputs(CASES[0])
    kw = {**kw, "return_lse": False}
    cot = jnp.asarray(np.random.default_rng(8).normal(size=(2, 2, 16, 64)), jnp.float32)
    loss = lambda impl: lambda *a: jnp.sum(mla_decode(*a, **kw, impl=impl, interpret=True) * cot)  # noqa: E731
    got = jax.jit(jax.grad(loss("triton"), argnums=(0, 1, 2)))(*args)
    want = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2)))(*args)
    for g, w in zip(got, want):
        assert float(jnp.abs(w).max()) > 0
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_bad_arguments_raise():
    args, kw = make_inputs(CASES[0])
    q, c_kv, k_rope = args
    kw = {n: kw[n] for n in ("indices", "q_positions", "kv_positions", "scale")}
    bad = [
        (dict(q_abs=q[..., 1:]), "Dc \\+ Dr"),
        (dict(c_kv=c_kv[:1]), "c_kv"),
        (dict(k_rope=k_rope.astype(jnp.bfloat16)), "share a dtype"),
        (dict(q_abs=q[0]), "q_abs must be 4-D"),
        (dict(indices=kw["indices"][:, :, :, None]), "indices must be int"),
        (dict(indices=kw["indices"].astype(jnp.float32)), "indices must be int"),
        (dict(indices=kw["indices"].at[0, 0, 0].set(45)), "indices must be < S"),
        (dict(q_positions=kw["q_positions"][:, :1]), "q_positions"),
        (dict(kv_positions=kw["kv_positions"][:, :3]), "kv_positions"),
        (dict(scale=0.0), "scale"),
    ]
    for over, msg in bad:
        a = {"q_abs": q, "c_kv": c_kv, "k_rope": k_rope, **kw, **over}
        with pytest.raises(ValueError, match=msg):
            mla_decode(a.pop("q_abs"), a.pop("c_kv"), a.pop("k_rope"), **a)
    with pytest.raises(ValueError, match="num_splits"):
        mla_decode(q, c_kv, k_rope, **kw, num_splits=0)
    with pytest.raises(ValueError, match="impl"):
        mla_decode(q, c_kv, k_rope, **kw, impl="cuda")
    with pytest.raises(ValueError, match="block_k"):
        MlaDecodeTritonConfig(block_k=24)
    with pytest.raises(ValueError, match="max_rows"):
        MlaDecodeTritonConfig(max_rows=8)
    with pytest.raises(ValueError, match="partial_dtype"):
        MlaDecodeTritonConfig(partial_dtype="int8")
    with pytest.raises(ValueError, match="block_k"):
        MlaDecodeTpuConfig(block_k=0)


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("k", [256, None], ids=["sparse", "dense"])
def test_triton_compiled_on_gpu(k):
    """The compiled kernel at DeepSeek's sizes (TF32 dots in float32, then bf16) against the
    float32-exact reference."""
    case = MlaCase("gpu", b=2, t=2, h=64, dc=512, dr=64, s=4096, k=k, seed=9)
    with jax.default_device(jax.devices("gpu")[0]):
        args, kw = make_inputs(case)
        got = mla_decode(*args, **kw, impl="triton")
        with jax.default_matmul_precision("highest"):
            want = mla_decode_reference(*args, **kw)
        assert max_rel_err(got.out, want.out) < 3e-3
        args16 = tuple(a.astype(jnp.bfloat16) for a in args)
        got = mla_decode(*args16, **kw, impl="triton")
        assert max_rel_err(got.out, mla_decode_reference(*args16, **kw).out) < 2e-2


@needs_gpu_interpret_pool
@pytest.mark.parametrize("case", [
    MlaCase("t2_two_splits", t=2, h=64, dc=128, dr=64, s=100, k=None, num_splits=2, seed=13),
    MlaCase("t1_auto_splits", t=1, h=64, dc=128, dr=64, s=200, k=None, seed=14),
    MlaCase("t1_ring_refill", t=1, h=64, dc=128, dr=64, s=420, k=None, num_splits=3, seed=15),
    MlaCase("t2_h128_one_tile", b=1, t=2, h=128, dc=128, dr=64, s=40, k=None, seed=16),
    MlaCase("sparse_t2_k20", t=2, h=64, dc=128, dr=64, s=100, k=20, num_splits=2, seed=17),
], ids=lambda c: c.name)
def test_mosaic_gpu_in_gpu_interpret_mode(case):
    """The Mosaic GPU kernel on the CPU in GPU interpret mode (simulated SMEM, TMA, barriers,
    warpgroups), bf16, against the float32 reference. Dense: S=100 (padded to 104 for the
    TMA, its last tile zero-filled past the cache), S=200 (in place, last tile past the
    cache), S=420 over 3 splits of 3, 3 and 1 tiles (the producer refills the 2-stage ring;
    the last split has fewer tiles than stages), S=40 (< one tile) with two 64-head groups.
    Sparse (rows gathered in the kernel): K=20 (< one tile; more in
    `test_mosaic_gpu_sparse_gather_in_gpu_interpret_mode`); -1 padding, listed future slots,
    a query whose listed slots are all in its future. Ragged cache rows, a padded query
    (zeros, lse -inf)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    args, kw = make_inputs(case, jnp.bfloat16)
    got = run(mla_decode, args, kw, impl="mosaic_gpu", interpret=plgpu.InterpretGPUParams())
    want = mla_decode_reference(*(a.astype(jnp.float32) for a in args), **kw)
    assert got.out.dtype == jnp.bfloat16 and got.out.shape == want.out.shape
    assert max_rel_err(got.out, want.out) < 1e-2
    fin = np.isfinite(np.asarray(want.lse))
    np.testing.assert_array_equal(np.isfinite(np.asarray(got.lse)), fin)
    np.testing.assert_allclose(np.asarray(got.lse)[fin], np.asarray(want.lse)[fin], atol=1e-4)
    check_zero_rows(got.out, kw)


@needs_gpu_interpret_pool
@pytest.mark.parametrize("case,in_kernel", [
    (MlaCase("t3_s101_k77_two_splits", t=3, h=64, dc=128, dr=64, s=101, k=77, num_splits=2, seed=19), True),
    (MlaCase("t2_s203_k150_ring_refill", t=2, h=64, dc=128, dr=64, s=203, k=150, num_splits=1, seed=20), True),
    (MlaCase("t3_s101_k77_xla_gather", t=3, h=64, dc=128, dr=64, s=101, k=77, num_splits=2, seed=19), False),
], ids=lambda c: getattr(c, "name", str(c)))
def test_mosaic_gpu_sparse_gather_in_gpu_interpret_mode(case, in_kernel):
    """Sparse calls on the CPU in GPU interpret mode, bf16, against the float32 reference:
    the rows gathered in the kernel (one TMA copy per row and 64 columns; `in_kernel`) and
    the XLA-gather fallback (`gather_in_kernel=False`). A cache of S=101 and 203 slots (not
    multiples of 8, read in place), K=77 (ragged: 2 tiles of 64, one per split) and K=150
    (3 tiles in one split: the ring refills), T=3 and 2 queries; -1 padding, duplicated
    entries, listed future slots, a query whose listed slots are all in its future, a padded
    query."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    from pallas_kernels.mla_decode import mosaic_gpu

    args, kw = make_inputs(case, jnp.bfloat16)
    kw = with_duplicates(kw)
    cfg = MlaDecodeMosaicGpuConfig(gather_in_kernel=in_kernel)
    geo = mosaic_gpu.geometry(args[0], args[1], args[2], cfg, case.num_splits, slots=case.k)
    assert mosaic_gpu.gathers_in_kernel(geo, 2) and geo.per_split == geo.tiles // geo.num_splits
    got = run(mla_decode, args, kw, impl="mosaic_gpu", interpret=plgpu.InterpretGPUParams(), config=cfg)
    want = mla_decode_reference(*(a.astype(jnp.float32) for a in args), **kw)
    assert max_rel_err(got.out, want.out) < 1e-2
    fin = np.isfinite(np.asarray(want.lse))
    np.testing.assert_array_equal(np.isfinite(np.asarray(got.lse)), fin)
    np.testing.assert_allclose(np.asarray(got.lse)[fin], np.asarray(want.lse)[fin], atol=1e-4)
    check_zero_rows(got.out, kw)


def test_mosaic_gpu_lowers_for_cuda_on_the_cpu():
    """At DeepSeek's sizes (H=128: two head groups, Dc=512, Dr=64; S=4100: padded to a
    multiple of 8, last tile past the cache) the kernel lowers to Mosaic GPU for CUDA (Pallas
    to Mosaic GPU, its layout inference included; nothing compiled), dense and sparse (the
    rows gathered in the kernel: its RefUnion views of the ring, warp-level TMA copies)."""
    q = jax.ShapeDtypeStruct((2, 2, 128, 576), jnp.bfloat16)
    c, r = jax.ShapeDtypeStruct((2, 4100, 512), jnp.bfloat16), jax.ShapeDtypeStruct((2, 4100, 64), jnp.bfloat16)
    idx = jax.ShapeDtypeStruct((2, 2, 2047), jnp.int32)
    cfg = MlaDecodeMosaicGpuConfig(gather_in_kernel=True)
    f = jax.jit(lambda q, c, r, i: mla_decode(q, c, r, indices=i, scale=SCALE, impl="mosaic_gpu", return_lse=True,
                                              config=cfg))
    for i, name in ((None, "mla_decode_mosaic_gpu"), (idx, "mla_decode_mosaic_gpu_gather")):
        text = f.trace(q, c, r, i).lower(lowering_platforms=("cuda",)).as_text()
        assert name in text and ("mla_decode_mosaic_gpu_gather" in text) == (i is not None)


def test_mosaic_gpu_gathers_in_kernel_while_the_slot_list_fits_smem(monkeypatch):
    """One split at Dc=512, Dr=64: a slot list of 36 tiles (K=2304) fits SMEM beside the ring
    and the kernel gathers (its lowering's own SMEM check passes); 37 tiles (K=2305) would
    exceed 227 KB by 56 bytes (`smem_bytes` counts as Pallas lays SMEM out: forced to
    gather, the lowering refuses it), so the rows are gathered by XLA first."""
    from pallas_kernels.mla_decode import mosaic_gpu

    q = jax.ShapeDtypeStruct((1, 1, 64, 576), jnp.bfloat16)
    c, r = jax.ShapeDtypeStruct((1, 4101, 512), jnp.bfloat16), jax.ShapeDtypeStruct((1, 4101, 64), jnp.bfloat16)
    cfg = MlaDecodeMosaicGpuConfig(gather_in_kernel=True)

    def lower(k):           # a fresh jit each time: no cached trace
        f = jax.jit(lambda q, c, r, i: mla_decode(q, c, r, indices=i, scale=SCALE, impl="mosaic_gpu",
                                                  num_splits=1, config=cfg))
        return f.trace(q, c, r, jax.ShapeDtypeStruct((1, 1, k), jnp.int32)).lower(
            lowering_platforms=("cuda",)).as_text()

    for k, gathers in ((2304, True), (2305, False)):
        assert ("mla_decode_mosaic_gpu_gather" in lower(k)) == gathers
    monkeypatch.setattr(mosaic_gpu, "gathers_in_kernel", lambda geo, itemsize: True)
    with pytest.raises(ValueError, match="exceeds available shared memory"):
        lower(2305)


def test_mosaic_gpu_refuses_unsupported_and_auto_prefers_it_on_hopper(monkeypatch):
    """impl="mosaic_gpu" raises ValueError (nothing compiled) for what it does not cover;
    impl="auto" picks it on a Hopper GPU, Triton where it does not apply (H=32, an Ampere
    GPU, the Triton interpreter)."""
    from pallas_kernels import common
    from pallas_kernels.mla_decode import api

    case = MlaCase("refuse", t=1, h=64, dc=128, dr=64, s=64, k=None)
    (q, c_kv, k_rope), kw = make_inputs(case, jnp.bfloat16)
    kw = {n: kw[n] for n in ("q_positions", "kv_positions", "scale")}
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    bad = [
        ((f32(q), f32(c_kv), f32(k_rope)), {}, "dtype float32"),
        ((q[:, :, :32], c_kv, k_rope), {}, "H=32"),
        ((q[..., 64:], c_kv[..., 64:], k_rope), {}, "Dc=64"),
        ((jnp.concatenate([q[..., :128], q[..., 128:160]], -1), c_kv, k_rope[..., :32]), {}, "Dr=32"),
        ((q, c_kv, k_rope), dict(interpret=True), "Triton interpreter"),
    ]
    for args, call, msg in bad:
        with pytest.raises(ValueError, match=msg):
            mla_decode(*args, **kw, impl="mosaic_gpu", **call)
    big = MlaDecodeMosaicGpuConfig(block_k=128)
    zeros = lambda *shape: jnp.zeros(shape, jnp.bfloat16)  # noqa: E731
    with pytest.raises(ValueError, match="SMEM"):      # Dc=512, Dr=64: 2 x 128-slot stages
        mla_decode(zeros(1, 1, 64, 576), zeros(1, 64, 512), zeros(1, 64, 64), scale=SCALE,
                   impl="mosaic_gpu", config=big)
    for over, msg in ((dict(block_k=96), "block_k"), (dict(max_concurrent_steps=1), "max_concurrent_steps")):
        with pytest.raises(ValueError, match=msg):
            MlaDecodeMosaicGpuConfig(**over)
    monkeypatch.setattr(common, "current_device", lambda: common.Device("gpu", "9.0"))
    call = dict(q_abs=q, c_kv=c_kv, k_rope=k_rope, indices=None)
    assert common.choose("mla_decode", "auto", api.BACKENDS, call)[0] == "mosaic_gpu"
    assert common.choose("mla_decode", "mosaic_gpu", api.BACKENDS, call)[0] == "mosaic_gpu"
    assert common.choose("mla_decode", "auto", api.BACKENDS, call, interpret=True)[0] == "triton"
    narrow = dict(call, q_abs=q[:, :, :32])
    assert common.choose("mla_decode", "auto", api.BACKENDS, narrow)[0] == "triton"
    monkeypatch.setattr(common, "current_device", lambda: common.Device("gpu", "8.0"))
    assert common.choose("mla_decode", "auto", api.BACKENDS, call)[0] == "triton"


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("s,k,splits", [(4096, None, None), (4100, None, None), (4096, 300, None),
                                         (4101, 2047, None), (4101, 1500, 1)],
                         ids=["dense", "dense-ragged", "sparse", "sparse-ragged", "sparse-one-split"])
def test_mosaic_gpu_compiled_on_gpu(s, k, splits):
    """The compiled Mosaic GPU kernel (Hopper) at DeepSeek's sizes, bf16, against the float32
    reference: dense (S=4100: padded to 4104, its last tile past the cache) and sparse with
    the rows gathered in the kernel (S=4101 read in place, K=300, 2047 and 1500: ragged last
    tiles; duplicated entries; split by the heuristic, and one split of 24 tiles: the
    longest slot list that fits SMEM beside the ring)."""
    case = MlaCase("gpu", b=2, t=2, h=64, dc=512, dr=64, s=s, k=k, num_splits=splits, seed=9)
    with jax.default_device(jax.devices("gpu")[0]):
        args, kw = make_inputs(case, jnp.bfloat16)
        if k is not None:
            kw = with_duplicates(kw)
        got = mla_decode(*args, **kw, impl="mosaic_gpu", config=MlaDecodeMosaicGpuConfig(gather_in_kernel=True))
        with jax.default_matmul_precision("highest"):
            want = mla_decode_reference(*(a.astype(jnp.float32) for a in args), **kw)
        assert max_rel_err(got.out, want.out) < 2e-2
        fin = np.isfinite(np.asarray(want.lse))
        np.testing.assert_array_equal(np.isfinite(np.asarray(got.lse)), fin)
        np.testing.assert_allclose(np.asarray(got.lse)[fin], np.asarray(want.lse)[fin], atol=2e-3)
        check_zero_rows(got.out, kw)


def _ops_inputs(seed, t=2, s=21):
    """Small MLA pieces for the ops-level wiring tests: ragged cache row, padded query."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    b, h, dn, dr, dc, dv = 2, 4, 8, 8, 16, 8
    kv_pos = np.tile(np.arange(s, dtype=np.int32), (b, 1))
    kv_pos[1, 15:] = -1
    q_pos = np.stack([np.arange(s - t, s), np.arange(15 - t, 15)]).astype(np.int32)
    q_pos[1, 0] = -1
    return dict(q_nope=normal(b, t, h, dn), q_rope=normal(b, t, h, dr), c_kv=normal(b, s, dc),
                k_rope=normal(b, s, dr), w_uk=normal(dc, h, dn), w_uv=normal(dc, h, dv),
                q_positions=jnp.asarray(q_pos), kv_positions=jnp.asarray(kv_pos))


def test_ops_decode_paths_run_mla_decode():
    """`ops.mla.mla_attention(absorbed, decoding)` and `ops.dsa.selected_attention(decoding)`
    call `mla_decode` (here its Triton kernel in interpret mode) on the cache as stored and
    match their prefill paths (flash / token_sparse over the concatenated latent)."""
    from unittest import mock

    from sparse_jax.ops import dsa as dops
    from sparse_jax.ops import mla as mops

    calls = []

    def kernel(q_abs, c_kv, k_rope, **kw):
        calls.append(c_kv.shape)
        return mla_decode(q_abs, c_kv, k_rope, **{**kw, "impl": "triton"}, interpret=True)

    a = _ops_inputs(10)
    pos = (a["q_positions"], a["kv_positions"])
    weights = (a["w_uk"], a["w_uv"])
    args = (a["q_nope"], a["q_rope"], a["c_kv"], a["k_rope"], *weights, *pos)
    want = mops.mla_attention(*args, scale=SCALE, absorbed=True, decoding=False, impl="xla")
    q_abs = mops.absorb_query(a["q_nope"], a["q_rope"], a["w_uk"])
    idx = jnp.asarray(np.random.default_rng(11).permutation(21)[:12].reshape(1, 1, 12).repeat(2, 0).repeat(2, 1))
    sel_args = (q_abs, a["c_kv"], a["k_rope"], idx, *pos)
    want_sel = dops.selected_attention(*sel_args, scale=SCALE, decoding=False, impl="xla")
    with mock.patch.object(mops, "mla_decode", kernel), mock.patch.object(dops, "mla_decode", kernel):
        got, got_sel = jax.jit(lambda: (
            mops.mla_attention(*args, scale=SCALE, absorbed=True, decoding=True, impl="xla"),
            dops.selected_attention(*sel_args, scale=SCALE, decoding=True, impl="xla")))()
    assert calls == [(2, 21, 16), (2, 21, 16)]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got_sel, want_sel, atol=1e-5, rtol=1e-5)
    assert np.abs(np.asarray(got)[1, 0]).max() == 0.0
