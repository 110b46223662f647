"""`block_sparse` kernels against `block_sparse_reference`: forward (out, lse) and gradients
(dq, dk, dv, d sink_logits), the Triton path in `interpret=True` and the Mosaic TPU path in
`pltpu.InterpretParams()`, fp32 on fresh random inputs. Metadata from patterns (causal
window + sinks, Longformer, BigBird) and built directly (random top-k style, per batch and
per KV head, with empty rows, random full flags, unsorted/duplicate entries); ragged
lengths, padding positions, GQA 1/2/4, soft-cap. A `gpu`-marked test compiles the Triton
kernels.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse import BlockSparseMetadata, api, plan
from pallas_kernels.block_sparse.reference import block_sparse_reference
from pallas_kernels.block_sparse.tpu import block_sparse_tpu
from pallas_kernels.block_sparse.triton import TritonConfig, block_sparse_triton
from sparse_jax import patterns as P
from gpu_testing import has_gpu
import kernel_testing
from kernel_testing import (assert_close_tf32, assert_matches_reference, qkv_and_positions, rel_err,
                            run_vjp, sinks_and_cotangent)


@dataclasses.dataclass(frozen=True)
class Case(kernel_testing.Case):
    block_q: int = 16
    block_kv: int = 16
    pattern: object = P.Causal()       # builds the metadata; None: random top-k metadata
    per_head: bool = False             # metadata [B, Hkv, ...] instead of [1, 1, ...]


CASES = [
    Case("causal_window_sinks_softcap_ragged_gqa4", b=2, tq=45, tk=45, h=4, hkv=1, block_q=32,
         block_kv=32, pattern=P.causal_window(20, num_sinks=3), mask_fn=P.causal_window(20, num_sinks=3),
         sinks=True, softcap=5.0, pad_q=3, seed=1),
    Case("longformer_ragged_gqa1", tq=50, tk=50, h=2, hkv=2, pattern=P.longformer(12, num_global=2),
         mask_fn=P.longformer(12, num_global=2), seed=2),
    Case("bigbird_padding_gqa2", b=2, tq=48, tk=40, h=4, hkv=2,
         pattern=P.bigbird(block=16, num_window_blocks=1, num_global_blocks=1, num_random_blocks=1),
         mask_fn=P.bigbird(block=16, num_window_blocks=1, num_global_blocks=1, num_random_blocks=1),
         pad_q=5, pad_k=6, seed=3),
    Case("random_topk_per_head_empty_rows_gqa4", b=2, tq=40, tk=70, h=8, hkv=2, pattern=None,
         mask_fn=P.Causal(), per_head=True, pad_k=3, seed=4),
    Case("strided_gqa16_ragged", tq=35, tk=35, h=16, hkv=1, pattern=P.sparse_transformer_strided(6),
         mask_fn=P.sparse_transformer_strided(6), sinks=True, seed=5),
    Case("segments_causal_ragged_gqa2", b=2, tq=43, tk=43, h=4, hkv=2, segments=True, pad_k=4,
         seed=6),
]
TPU_CASES = [CASES[0], CASES[3], CASES[4], CASES[5]]

SMALL = TritonConfig(block_rows=32, block_k=16, num_warps=4, num_stages=2, block_rows_dq=32,
                     block_k_dq=16, block_q_dkv=16, block_k_dkv=16)


def random_topk_metadata(rng, b, hkv, nq, nk, block_q, block_kv, max_blocks):
    """Top-k style metadata built directly: per (batch, kv head, query block) a random set
    of KV blocks (unsorted, with a duplicate), random full flags, some rows empty."""
    idx = np.zeros((b, hkv, nq, max_blocks), np.int32)
    cnt = rng.integers(0, max_blocks + 1, (b, hkv, nq)).astype(np.int32)
    cnt[0, 0, 0] = 0                                             # an empty row
    for pos in np.ndindex(b, hkv, nq):
        chosen = rng.permutation(nk)[:max_blocks]
        idx[pos] = chosen
        if cnt[pos] >= 2:
            idx[pos][1] = idx[pos][0]                            # a duplicate entry
    full = rng.random(idx.shape) < 0.5
    return BlockSparseMetadata(jnp.asarray(idx), jnp.asarray(cnt), jnp.asarray(full), block_q,
                               block_kv)


def make_inputs(c: Case, dtype=jnp.float32):
    rng = np.random.default_rng(2000 + c.seed)
    normal, (q, k, v), q_pos, kv_pos = qkv_and_positions(c, rng, dtype, c.tk - c.tq)
    q_pos, kv_pos = jnp.asarray(q_pos, jnp.int32), jnp.asarray(kv_pos, jnp.int32)
    q_seg = kv_seg = None
    if c.segments:      # self-attention layout: segment of a position, shared by q and kv
        seg_of = np.sort(rng.integers(0, 3, (c.b, c.tk)), -1)
        q_seg = jnp.asarray(seg_of[:, c.tk - c.tq:], jnp.int32)
        kv_seg = jnp.asarray(seg_of, jnp.int32)
    nq, nk = -(-c.tq // c.block_q), -(-c.tk // c.block_kv)
    if c.pattern is None:
        meta = random_topk_metadata(rng, c.b, c.hkv, nq, nk, c.block_q, c.block_kv, 3)
    else:
        meta = P.block_metadata(c.pattern, q_pos, kv_pos, c.block_q, c.block_kv,
                                q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                                num_kv_heads=c.hkv if c.per_head else 1)
    kw = dict(mask_fn=c.mask_fn, q_positions=q_pos, kv_positions=kv_pos, q_segment_ids=q_seg,
              kv_segment_ids=kv_seg, sink_logits=None, softcap=c.softcap, scale=c.d ** -0.5,
              return_lse=True)
    sinks, cot = sinks_and_cotangent(c, normal, rng)
    return (q, k, v, sinks), meta, kw, cot


def check_against_reference(kernel, c: Case):
    args, meta, kw, cot = make_inputs(c)
    return assert_matches_reference(run_vjp(kernel, args, kw, cot, meta),
                                    run_vjp(block_sparse_reference, args, kw, cot, meta))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_triton_interpret_matches_reference(case):
    fin = check_against_reference(
        lambda *a, **kw: block_sparse_triton(*a, **kw, interpret=True, config=SMALL), case)
    if case.pattern is None:
        assert not fin.all(), "the random metadata case must contain empty rows"


@pytest.mark.parametrize("case", TPU_CASES, ids=lambda c: c.name)
def test_tpu_interpret_matches_reference(case):
    check_against_reference(lambda *a, **kw: block_sparse_tpu(*a, **kw, interpret=True), case)


@pytest.mark.parametrize("impl", ["triton", "mosaic_tpu"])
def test_api_dispatch_bf16_forward(impl):
    """Public entry point, default tiles, bf16, GQA 4, static causal-window metadata."""
    c = Case("bf16", tq=40, tk=40, h=4, hkv=1, d=32, block_q=16, block_kv=16, seed=7)
    (q, k, v, _), _, _, _ = make_inputs(c, jnp.bfloat16)
    pat = P.causal_window(24)
    meta = P.static_block_metadata(pat, 40, 40, 16, 16)
    out = api.block_sparse_attention(q, k, v, meta, mask_fn=pat, impl=impl, interpret=True)
    ref = api.block_sparse_attention(q, k, v, meta, mask_fn=pat, impl="xla")
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, ref) < 1e-2


def test_kernel_tables_order_and_transpose():
    """Full entries first, then full ones holding padding, then partial ones; duplicates and
    out-of-range entries dropped; the transpose lists the same (query, KV) block pairs."""
    idx = jnp.asarray([[[[2, 0, 0, 5], [1, 3, 3, 3], [0, 0, 0, 0]]]], jnp.int32)    # [1,1,3,4]
    cnt = jnp.asarray([[[4, 2, 0]]], jnp.int32)
    full = jnp.asarray([[[[False, True, True, True], [True, True, False, False], [True] * 4]]])
    meta = BlockSparseMetadata(idx, cnt, full, 16, 16)
    q_pos = jnp.arange(48, dtype=jnp.int32)[None]
    kv_pos = jnp.where(jnp.arange(64) < 60, jnp.arange(64), -1).astype(jnp.int32)[None]  # blk 3 padded
    t = plan.kernel_tables(meta, q_pos, kv_pos, transpose=True)
    np.testing.assert_array_equal(t.kv_cnt[0, 0], [[1, 1, 2], [1, 2, 2], [0, 0, 0]])
    np.testing.assert_array_equal(t.kv_idx[0, 0, :2, :2], [[0, 2], [1, 3]])
    np.testing.assert_array_equal(t.q_cnt[0, 0], [[1, 1, 1], [1, 1, 1], [0, 0, 1], [0, 1, 1]])
    np.testing.assert_array_equal(t.q_idx[0, 0, :, 0], [0, 1, 0, 1])


def test_tile_that_does_not_divide_the_metadata_block_raises():
    c = Case("bad", tq=48, tk=48)
    (q, k, v, _), _, _, _ = make_inputs(c)
    meta = P.static_block_metadata(P.Causal(), 48, 48, 24, 24)
    with pytest.raises(ValueError, match="block_(q|kv)=24"):
        api.block_sparse_attention(q, k, v, meta, mask_fn=P.Causal(), impl="triton", interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("config", [None, SMALL], ids=["default_tiles", "small_tiles"])
def test_triton_compiled_on_gpu(case, config):
    """The real Triton kernels, TF32 tolerances against a float32-exact reference."""
    with jax.default_device(jax.devices("gpu")[0]):
        args, meta, kw, cot = make_inputs(case)
        fn = lambda *a, **k_: block_sparse_triton(*a, **k_, config=config)  # noqa: E731
        got = run_vjp(fn, args, kw, cot, meta)
        with jax.default_matmul_precision("highest"):
            want = run_vjp(block_sparse_reference, args, kw, cot, meta)
        assert_close_tf32(got, want)
