"""The fused indexer top-k (`pallas_kernels.indexer.fused`: sampled threshold, candidate
kernel, radix select over the candidates) in interpret mode against `lax.top_k` on the float32
reference scores: the candidate kernel alone, both branches of the op (sampled threshold and
the exact fallback), ties, ragged / padded rows, k > visible keys, FP8 operands."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.indexer import indexer_topk
from pallas_kernels.indexer.api import FusedIndexerConfig
from pallas_kernels.indexer.fused import chunk_candidates
from pallas_kernels.indexer.reference import chunk_scores_reference
from pallas_kernels.indexer.select import TopkSelectConfig
from pallas_kernels.indexer.triton import IndexerTritonConfig
from gpu_testing import has_gpu
from test_indexer_kernels import ascending, best_first, make

# small tiles: C = 37 and S = 150 are not multiples of them; at k = 12, cap = 48 < S (a sample
# of rank 12 out of every 2nd key; a tiny k needs wide margins)
SMALL = FusedIndexerConfig(block_q=16, block_k=16, sample_stride=2, oversample=2.0, capacity=4.0,
                           fallback_rows=16)


def failing_rows(q, w, k, qp, kp, kk, cfg):
    """`[B]`: per batch row, the queries whose candidates fail the op's checks (fewer than
    min(k', visible), or more than cap), predicted from the reference scores: 0 everywhere =
    the sampled threshold holds; at most `fallback_rows` = those rows are redone alone; more =
    the whole chunk is."""
    ref = np.asarray(chunk_scores_reference(q, w, k, qp, kp))
    width = min(kk, ref.shape[-1])
    m = cfg.sample_stride
    r = min(-(-int(cfg.oversample * width) // m), ref[..., ::m].shape[-1])
    th = -np.sort(-ref[..., ::m], -1)[..., r - 1:r]
    vis = np.isfinite(ref)
    above, tie = vis & (ref > th), vis & (ref == th)
    reach = (above | tie).sum(-1)
    count = (above | (tie & (np.cumsum(above | tie, -1) - (above | tie) < width))).sum(-1)
    cap = -(-int(cfg.capacity * width) // cfg.block_k) * cfg.block_k
    return (~((reach >= np.minimum(width, vis.sum(-1))) & (count <= cap))).sum(-1)


def test_candidate_kernel():
    """Every visible key above the row's threshold and those equal to it while fewer than
    `keep_ties` precede them, in slot order; counts beyond cap; -inf thresholds keep every
    visible key; exact integer scores (many ties)."""
    q, w, k, qp, kp = make(11, integer=True)
    ref = np.asarray(chunk_scores_reference(q, w, k, qp, kp))
    th = np.where(np.arange(37) % 3 == 0, -np.inf, np.asarray(q[..., 0, 0]) * 3 + 1).astype(np.float32)  # not 0
    slots, vals, count, reach, nvis = chunk_candidates(q, w, k, qp, kp, jnp.asarray(th), cap=48, keep_ties=20,
                                                       interpret=True,
                                                       config=IndexerTritonConfig(block_q=16, block_k=16))
    assert slots.shape == vals.shape == (2, 37, 48)
    vis = np.isfinite(ref)
    above, tie = vis & (ref > th[..., None]), vis & (ref == th[..., None])
    ge_before = np.cumsum(above | tie, -1) - (above | tie)
    want = above | (tie & (ge_before < 20))
    np.testing.assert_array_equal(count, want.sum(-1))
    np.testing.assert_array_equal(reach, (vis & (ref >= th[..., None])).sum(-1))
    np.testing.assert_array_equal(nvis, vis.sum(-1))
    assert (np.asarray(count) > 48).any() and (np.asarray(count) < 48).any()
    assert (tie & ~want).any() and (tie & want).any()                 # ties dropped and kept
    for bi in range(2):
        for t in range(37):
            cand = np.flatnonzero(want[bi, t])[:48]
            n = len(cand)
            np.testing.assert_array_equal(slots[bi, t, :n], cand)
            np.testing.assert_array_equal(vals[bi, t, :n], ref[bi, t, cand])


@pytest.mark.parametrize("integer,oversample,fallback_rows,path", [
    (False, 2.0, 16, "sampled"), (True, 1.2, 16, "rows redone"), (True, 1.2, 4, "whole chunk redone")])
def test_matches_lax_top_k(integer, oversample, fallback_rows, path):
    """Float inputs (the sampled threshold holds for every row); integer inputs (exact
    scores, many ties) with a low sample rank, so that 11 rows get fewer than k' candidates:
    redone alone, or, with room for 4, the whole chunk. `lax.top_k`'s set (lower slot first
    among ties) in ascending slot order, -1 where fewer keys are visible; padded queries and
    keys; several chunks, T not a multiple of the chunk."""
    kk, chunk = 12, (40 if path == "sampled" else 16)
    cfg = dataclasses.replace(SMALL, oversample=oversample, fallback_rows=fallback_rows, fallback_chunk=fallback_rows)
    q, w, k, qp, kp = make(12 + integer, integer=integer)
    n_bad = failing_rows(q, w, k, qp, kp, kk, cfg).max()
    assert path == ("sampled" if n_bad == 0 else "rows redone" if n_bad <= fallback_rows else "whole chunk redone")
    got, vals = indexer_topk(q, w, k, k=kk, q_positions=qp, kv_positions=kp, query_chunk=chunk, impl="triton",
                             interpret=True, config=cfg, return_scores=True)
    ref = ascending(best_first(q, w, k, qp, kp, kk))
    assert got.shape == (2, 37, kk) and (ref == -1).any()
    np.testing.assert_array_equal(got, ref)
    full = np.asarray(chunk_scores_reference(q, w, k, qp, kp))
    picked = np.where(ref >= 0, np.take_along_axis(full, np.maximum(ref, 0), -1), -np.inf)
    np.testing.assert_allclose(vals, picked, rtol=1e-5, atol=1e-6)


def test_default_positions_k_above_visible():
    """Default positions (the causal prefix chunks: the first has no more keys than cap, the
    second samples) with k larger than the early queries' visible keys."""
    q, w, k, _, _ = make(14, b=1, t=64, s=64)
    got = indexer_topk(q, w, k, k=8, query_chunk=32, impl="triton", interpret=True, config=SMALL)
    pos = jnp.arange(64)[None]
    np.testing.assert_array_equal(got, ascending(best_first(q, w, k, pos, pos, 8)))
    assert (np.asarray(got[0, :7]) == -1).any()


def test_fp8_scores():
    """FP8 operands (the sampled threshold with its key scales) against the XLA FP8 path (the
    same quantised scores: equal selected scores, up to float32 summation order)."""
    q, w, k, qp, kp = make(17, t=16)
    args = dict(k=12, q_positions=qp, kv_positions=kp, score_dtype="float8_e4m3fn", return_scores=True)
    idx, vals = indexer_topk(q, w, k, impl="triton", interpret=True, config=SMALL, **args)
    ref_idx, ref_vals = indexer_topk(q, w, k, impl="xla", **args)
    np.testing.assert_array_equal(idx == -1, ref_idx == -1)
    np.testing.assert_allclose(np.sort(vals, -1), np.sort(ref_vals, -1), rtol=1e-5, atol=1e-5)


def test_bad_config_raises():
    for kw, name in ((dict(sample_stride=0), "sample_stride"), (dict(oversample=0.5), "oversample"),
                     (dict(oversample=2.0, capacity=1.5), "capacity"), (dict(block_k=24), "block_k"),
                     (dict(fallback_rows=0), "fallback_rows"), (dict(fallback_chunk=0), "fallback_chunk")):
        with pytest.raises(ValueError, match=name):
            FusedIndexerConfig(**kw)
    q, w, k, qp, kp = make(15, b=1, t=8, s=40)
    with pytest.raises(ValueError, match="cap"):
        chunk_candidates(q, w, k, qp, kp, jnp.zeros((1, 8)), cap=24, keep_ties=4, interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("integer,kk,cfg", [(False, 1024, FusedIndexerConfig()),
                                            (True, 256, FusedIndexerConfig(oversample=1.2))])
def test_compiled_on_gpu(integer, kk, cfg):
    """The compiled path, bf16 inputs, 600 queries x 4096 keys: float inputs at k = 1024, the
    default config (the sampled threshold holds for every row), against the radix-select path
    (the same selected scores; near-ties aside, the same sets) and the float32 reference;
    integer inputs (exact scores, many ties) at k = 256 with a low sample rank (35 and 15 rows
    redone), exactly the radix path's sets."""
    with jax.default_device(jax.devices("gpu")[0]):
        q, w, k, qp, kp = make(16, t=600, s=4096, h=4, d=64, integer=integer)
        q, w, k = (a.astype(jnp.bfloat16) for a in (q, w, k))
        args = dict(k=kk, q_positions=qp, kv_positions=kp, query_chunk=512, impl="triton")
        got = np.asarray(indexer_topk(q, w, k, config=cfg, **args))
        radix = np.asarray(indexer_topk(q, w, k, **args))
        with jax.default_matmul_precision("highest"):
            ref = np.asarray(chunk_scores_reference(q, w, k, qp, kp))
            assert (failing_rows(q, w, k, qp, kp, kk, cfg).max() > 0) == integer
        same = (got == radix).all(-1).mean()
        print(f"rows with the radix path's set: {same:.4f}")
        if integer:
            np.testing.assert_array_equal(got, radix)
        assert same >= 0.99
        np.testing.assert_array_equal(got, ascending(got))
        picked = np.where(got >= 0, np.take_along_axis(ref, np.maximum(got, 0), -1), -np.inf)
        np.testing.assert_allclose(-np.sort(-picked, -1), -np.sort(-ref, -1)[..., :kk], rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("score_dtype", ["bfloat16", "float8_e4m3fn"])
def test_lowers_to_triton_at_paper_shape(score_dtype):
    """The whole op (sample scores, sample select with row lengths, candidate kernel, final
    select, the fallback's kernels) lowers to Triton IR for an H100 at T = S = 64K, 4 x 64,
    k = 2048, one query chunk, without a GPU (abstract device; compiles nothing)."""
    mesh_lib = pytest.importorskip("jax._src.mesh")
    t = 65536
    f = jax.jit(lambda q, w, k: indexer_topk(q, w, k, k=2048, query_chunk=t, impl="triton", score_dtype=score_dtype,
                                             config=FusedIndexerConfig(select=TopkSelectConfig(block_r=4))))
    dev = mesh_lib.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    args = (jax.ShapeDtypeStruct((1, t, 4, 64), jnp.bfloat16), jax.ShapeDtypeStruct((1, t, 4), jnp.bfloat16),
            jax.ShapeDtypeStruct((1, t, 64), jnp.bfloat16))
    with jax.sharding.use_abstract_mesh(mesh_lib.AbstractMesh((1,), ("x",), abstract_device=dev)):
        text = f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("indexer_candidates") >= 2 and "topk_select" in text
