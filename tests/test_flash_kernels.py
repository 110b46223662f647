"""`flash` kernels against `flash_reference`: forward (out, lse) and gradients (dq, dk, dv,
d sink_logits), Triton path in `interpret=True`, Mosaic TPU path in
`pltpu.InterpretParams()`, on tiny ragged shapes (interpret mode is slow), GQA 1/2/4/16,
causal / window+sinks / segments / padding / soft-cap / fully masked rows. A `gpu`-marked
test compiles the real Triton kernels.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash import api
from pallas_kernels.flash.reference import flash_reference
from pallas_kernels.flash.tpu import TpuConfig, flash_tpu
from pallas_kernels.flash.triton import TritonConfig, flash_triton
from sparse_jax import patterns as P
from gpu_testing import has_gpu
import kernel_testing
from kernel_testing import (assert_close_tf32, assert_matches_reference, qkv_and_positions, rel_err, run_vjp,
                            sinks_and_cotangent)


@dataclasses.dataclass(frozen=True)
class Case(kernel_testing.Case):
    q_offset: int = 0            # q positions start at tk - tq + ... (decode-like chunk)


CASES = [
    Case("causal_gqa1", tq=64, tk=64, h=2, hkv=2, seed=1),
    Case("ragged_window_sinks_softcap_gqa2", b=2, tq=37, tk=75, h=4, hkv=2, d=32,
         mask_fn=P.causal_window(24, num_sinks=4), q_offset=38, pad_q=3, sinks=True,
         softcap=4.0, seed=2),
    Case("segments_bidirectional_gqa4", b=2, tq=45, tk=45, h=4, hkv=1, mask_fn=None,
         segments=True, pad_k=5, seed=3),
    Case("segments_causal_chunked_gqa2", tq=50, tk=50, h=2, hkv=1,
         mask_fn=P.SameSegment() & P.Causal() & P.Chunked(20), segments=True, sinks=True, seed=4),
    Case("fallback_predicate_gqa4_empty_rows", b=2, tq=40, tk=33, h=4, hkv=1,
         mask_fn=P.bigbird(block=16, num_random_blocks=1), pad_q=6, pad_k=4, seed=5),
    Case("gqa16_window_ragged", tq=27, tk=27, h=16, hkv=1, d=16,
         mask_fn=P.causal_window(9), sinks=True, seed=6),
]
TPU_CASES = [CASES[1], CASES[2], CASES[5]]

SMALL_TRITON = TritonConfig(block_q=32, block_k=16, num_warps=4, num_stages=2, block_q_dq=16,
                            block_k_dq=32, block_q_dkv=32, block_k_dkv=16)
SMALL_TPU = TpuConfig(32, 16, 16, 32, 32, 16)


def make_inputs(c: Case, dtype=jnp.float32):
    rng = np.random.default_rng(1000 + c.seed)
    normal, (q, k, v), q_pos, kv_pos = qkv_and_positions(c, rng, dtype, c.q_offset)
    kw = dict(mask_fn=c.mask_fn, q_positions=jnp.asarray(q_pos, jnp.int32),
              kv_positions=jnp.asarray(kv_pos, jnp.int32), q_segment_ids=None,
              kv_segment_ids=None, sink_logits=None, softcap=c.softcap, scale=c.d ** -0.5,
              return_lse=True, block_score_size=None, block_score_reduce_gqa=False)
    if c.segments:
        kw["q_segment_ids"] = jnp.asarray(np.sort(rng.integers(0, 3, (c.b, c.tq)), -1), jnp.int32)
        kw["kv_segment_ids"] = jnp.asarray(np.sort(rng.integers(0, 3, (c.b, c.tk)), -1), jnp.int32)
    sinks, cot = sinks_and_cotangent(c, normal, rng)
    return (q, k, v, sinks), kw, cot


def check_against_reference(kernel, c: Case):
    args, kw, cot = make_inputs(c)
    assert_matches_reference(run_vjp(kernel, args, kw, cot), run_vjp(flash_reference, args, kw, cot))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_triton_interpret_matches_reference(case):
    check_against_reference(
        lambda *a, **kw: flash_triton(*a, **kw, interpret=True, config=SMALL_TRITON), case)


@pytest.mark.parametrize("case", TPU_CASES, ids=lambda c: c.name)
def test_tpu_interpret_matches_reference(case):
    check_against_reference(lambda *a, **kw: flash_tpu(*a, **kw, interpret=True, config=SMALL_TPU), case)


@pytest.mark.parametrize("impl", ["triton", "mosaic_tpu"])
def test_api_dispatch_bf16_forward(impl):
    """Through the public entry point with default block sizes, bf16, GQA 4, causal."""
    c = Case("bf16", b=1, tq=48, tk=48, h=4, hkv=1, d=32, seed=7)
    (q, k, v, _), _, _ = make_inputs(c, jnp.bfloat16)
    out = api.flash_attention(q, k, v, mask_fn=P.Causal(), impl=impl, interpret=True)
    ref = api.flash_attention(q, k, v, mask_fn=P.Causal(), impl="xla")
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, ref) < 1e-2


def test_block_scores_raise_clearly():
    """Score block sizes the kernels cannot tile raise ValueError naming the argument."""
    c = Case("scores", tq=16, tk=16)
    (q, k, v, _), _, _ = make_inputs(c)
    with pytest.raises(ValueError, match="block_score_size=8"):
        api.flash_attention(q, k, v, mask_fn=P.Causal(), block_score_size=8, impl="triton",
                            interpret=True)
    with pytest.raises(ValueError, match="block_score_size=12"):
        flash_tpu(q, k, v, mask_fn=P.Causal(), q_positions=jnp.arange(16)[None],
                  kv_positions=jnp.arange(16)[None], q_segment_ids=None, kv_segment_ids=None,
                  sink_logits=None, softcap=None, scale=0.25, return_lse=False,
                  block_score_size=12, block_score_reduce_gqa=False, interpret=True,
                  config=SMALL_TPU)


def test_block_tables_skip_causal_upper_triangle():
    from pallas_kernels.flash import blocks
    pos = jnp.arange(256)[None]
    ranges = np.asarray(blocks.tables(P.Causal(), pos, pos, None, None, 64, 64))[0]
    # query block i visits KV blocks 0..i, the first i of them without the element mask
    np.testing.assert_array_equal(ranges, [[0, 1, 1, 1]] + [[0, 0, i, i + 1] for i in range(1, 4)])
    window = np.asarray(blocks.tables(P.causal_window(64), pos, pos, None, None, 64, 64))[0]
    assert (window[:, 3] - window[:, 0]).max() == 2


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: c.name)
def test_triton_compiled_on_gpu(case):
    """The real Triton kernels (float32 dots run as TF32 in the Triton lowering)."""
    # float32 dots run as TF32 on GPU, in the kernel (Triton's default) and in XLA's
    # reference alike: compare against a float32-exact reference with TF32 tolerances.
    with jax.default_device(jax.devices("gpu")[0]):
        args, kw, cot = make_inputs(case)
        got = run_vjp(flash_triton, args, kw, cot)
        with jax.default_matmul_precision("highest"):
            want = run_vjp(flash_reference, args, kw, cot)
        assert_close_tf32(got, want)
        c = dataclasses.replace(case, tq=300, tk=300 if case.tq == case.tk else 333, d=64)
        args, kw, _ = make_inputs(c, jnp.bfloat16)
        out = flash_triton(*args[:3], **{**kw, "sink_logits": args[3]})
        ref = flash_reference(*args[:3], **{**kw, "sink_logits": args[3]})
        assert rel_err(out.out, ref.out) < 1e-2


# ----------------------------------------------------------------------------- block scores
# HySparse block-max scores (`block_score_size`) from the forward kernels against
# `reference.block_max_scores`. SMALL_TRITON's KV tile is 16: sizes 16 (one tile per score
# block), 32 and 48 (a score block spans 2 or 3 tiles); the default tile (128 or less) with
# size 32 shrinks the tile to the score block. SMALL_TPU's KV tile is 16: size 8 (a tile
# spans two score blocks, static lane slices) and 24 (tile shrunk to gcd 8, 3 tiles a block).

SCORE_CASES = [  # (case, block_score_size, reduce_gqa)
    (CASES[0], 32, False),
    (CASES[1], 16, True),
    (CASES[4], 48, False),
]
TPU_SCORE_CASES = [(CASES[1], 8, True), (CASES[2], 24, False)]


def check_scores(kernel, c: Case, size: int, reduce_gqa: bool, grads: bool = False):
    args, kw, cot = make_inputs(c)
    kw = {**kw, "block_score_size": size, "block_score_reduce_gqa": reduce_gqa}
    ref = flash_reference(*args[:3], **{**kw, "sink_logits": args[3]})
    if grads:   # scores requested: out, lse and their gradients are those of the plain op
        out, lse, g = run_vjp(kernel, args, kw, cot)
        _, _, r_g = run_vjp(flash_reference, args, kw, cot)
        np.testing.assert_allclose(out, ref.out, rtol=1e-5, atol=1e-5)
        for name, a, r in zip(("dq", "dk", "dv", "dsinks"), g, r_g):
            assert (a is None) == (r is None), name
            if r is not None:
                assert rel_err(a, r) < 2e-5, f"{name}: rel err {rel_err(a, r):.2e}"
    res = jax.jit(lambda q, k, v, s: kernel(q, k, v, **{**kw, "sink_logits": s}))(*args)
    nk = -(-c.tk // size)
    assert res.block_scores.shape == (c.b, c.hkv if reduce_gqa else c.h, c.tq, nk)
    assert res.block_scores.dtype == jnp.float32
    np.testing.assert_allclose(res.out, ref.out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(res.block_scores, ref.block_scores, rtol=1e-5, atol=1e-6)
    return args, kw, res


@pytest.mark.parametrize("case,size,reduce_gqa", SCORE_CASES,
                         ids=lambda x: x.name if isinstance(x, Case) else str(x))
def test_triton_block_scores_match_reference(case, size, reduce_gqa):
    kernel = lambda *a, **kw: flash_triton(*a, **kw, interpret=True, config=SMALL_TRITON)  # noqa: E731
    check_scores(kernel, case, size, reduce_gqa, grads=case is CASES[1])


@pytest.mark.parametrize("case,size,reduce_gqa", TPU_SCORE_CASES,
                         ids=lambda x: x.name if isinstance(x, Case) else str(x))
def test_tpu_block_scores_match_reference(case, size, reduce_gqa):
    kernel = lambda *a, **kw: flash_tpu(*a, **kw, interpret=True, config=SMALL_TPU)  # noqa: E731
    check_scores(kernel, case, size, reduce_gqa)   # (the score custom_vjp is tested via Triton)


def test_block_scores_default_tiles_and_no_gradient():
    """Public entry point, default tiles (size 32 < the KV tile: the tile shrinks to 32);
    the scores are a stop_gradient side output."""
    c = Case("scores_api", b=1, tq=40, tk=70, h=4, hkv=2, d=16, mask_fn=P.causal_window(20),
             q_offset=30, seed=8)
    (q, k, v, _), _, _ = make_inputs(c)
    kw = dict(mask_fn=c.mask_fn, q_positions=jnp.arange(30, 70, dtype=jnp.int32)[None],
              block_score_size=32, block_score_reduce_gqa=True)
    res = api.flash_attention(q, k, v, **kw, impl="triton", interpret=True)
    ref = api.flash_attention(q, k, v, **kw, impl="xla")
    assert res.lse is None and res.block_scores.shape == (1, 2, 40, 3)
    np.testing.assert_allclose(res.block_scores, ref.block_scores, rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda q: api.flash_attention(q, k, v, **kw, impl="triton", interpret=True)
                 .block_scores.sum())(q)
    assert not np.any(np.asarray(g))


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("case,size,reduce_gqa", SCORE_CASES + [(CASES[2], 16, True), (CASES[3], 64, False)],
                         ids=lambda x: x.name if isinstance(x, Case) else str(x))
def test_triton_block_scores_compiled_on_gpu(case, size, reduce_gqa):
    """Compiled score specialisation (default tiles, so sizes below the tile shrink it)
    against a float32-exact reference: TF32 logits in the kernel, so TF32 tolerances."""
    with jax.default_device(jax.devices("gpu")[0]):
        args, kw, cot = make_inputs(case)
        kw = {**kw, "block_score_size": size, "block_score_reduce_gqa": reduce_gqa,
              "sink_logits": args[3]}
        res = jax.jit(lambda q, k, v: flash_triton(q, k, v, **kw))(*args[:3])
        with jax.default_matmul_precision("highest"):
            ref = flash_reference(*args[:3], **kw)
        assert res.block_scores.shape == ref.block_scores.shape
        assert np.all(np.isfinite(res.block_scores))
        assert rel_err(res.block_scores, ref.block_scores) < 5e-3
        np.testing.assert_array_equal(np.asarray(res.block_scores) == 0,
                                      np.asarray(ref.block_scores) == 0)
        # gradients with scores requested are those of the plain op
        g = run_vjp(flash_triton, args[:3] + (args[3],), kw, cot)[2]
        g0 = run_vjp(flash_triton, args[:3] + (args[3],), {**kw, "block_score_size": None}, cot)[2]
        for a, b in zip(g, g0):
            assert (a is None) == (b is None)
            if b is not None:   # other KV tile in the score path: rounding only
                assert rel_err(a, b) < 1e-3
        c = dataclasses.replace(case, tq=300, tk=300 if case.tq == case.tk else 333, d=64)
        args, kw, _ = make_inputs(c, jnp.bfloat16)
        kw = {**kw, "block_score_size": 64, "block_score_reduce_gqa": reduce_gqa,
              "sink_logits": args[3]}
        res = flash_triton(*args[:3], **kw)
        ref = flash_reference(*args[:3], **kw)
        assert rel_err(res.block_scores, ref.block_scores) < 2e-2


def test_triton_block_scores_split_tiles():
    """`score_split=1`: the KV tile (64) stays and spans 4 score blocks of 16."""
    cfg = dataclasses.replace(SMALL_TRITON, block_k=64, score_split=1)
    kernel = lambda *a, **kw: flash_triton(*a, **kw, interpret=True, config=cfg)  # noqa: E731
    check_scores(kernel, CASES[4], 16, True)


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=lambda c: c.name)
def test_triton_block_scores_split_compiled_on_gpu(case):
    """Compiled `score_split=1` (128-wide KV tile, score blocks of 64 and 32), bf16."""
    c = dataclasses.replace(case, tq=300, tk=300 if case.tq == case.tk else 333, d=64)
    args, kw, _ = make_inputs(c, jnp.bfloat16)
    with jax.default_device(jax.devices("gpu")[0]):
        for size in (64, 32):
            kw = {**kw, "block_score_size": size, "sink_logits": args[3]}
            res = flash_triton(*args[:3], **kw, config=TritonConfig(score_split=1))
            ref = flash_reference(*args[:3], **kw)
            assert rel_err(res.block_scores, ref.block_scores) < 2e-2
            assert rel_err(res.out, ref.out) < 1e-2
