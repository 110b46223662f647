"""The `indexer` op (DSA lightning-indexer scores + top-k): Triton and Mosaic TPU kernels in
interpret mode against the plain-jnp reference, chunked top-k against `sparse_jax.ops.dsa`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.indexer import indexer_topk
from pallas_kernels.indexer.reference import chunk_scores_reference
from pallas_kernels.indexer.tpu import chunk_scores_tpu
from pallas_kernels.indexer.triton import IndexerTritonConfig, chunk_scores_triton
from sparse_jax.ops import dsa
from gpu_testing import has_gpu

KERNELS = {"triton": chunk_scores_triton, "mosaic_tpu": chunk_scores_tpu}


def ascending(idx):
    """Slots of each row sorted ascending, -1 pads last: the op's order, from any order."""
    idx = np.asarray(idx)
    big = np.iinfo(np.int32).max
    srt = np.sort(np.where(idx >= 0, idx, big), -1)
    return np.where(srt == big, -1, srt)


def best_first(q, w, k, qp, kp, kk):
    """The reference selection, best first: `lax.top_k` over the whole `[B, T, S]` score
    matrix (lower slot first among ties), -1 where fewer keys are visible."""
    vals, idx = jax.lax.top_k(chunk_scores_reference(q, w, k, qp, kp), kk)
    return np.where(np.isfinite(vals), idx, -1)


def make(seed, b=2, t=37, s=150, h=3, d=24, integer=False):
    """Ragged inputs: batch 0 offset queries over a full cache; batch 1 padded queries
    (positions -1) and empty slots. `integer`: small integers, so scores are exact and
    ties are common (ReLU zeros)."""
    ks = jax.random.split(jax.random.key(seed), 3)
    if integer:
        draw = lambda key, shape: jax.random.randint(key, shape, -2, 3).astype(jnp.float32)  # noqa: E731
    else:
        draw = lambda key, shape: jax.random.normal(key, shape)  # noqa: E731
    q, w, k = draw(ks[0], (b, t, h, d)), draw(ks[1], (b, t, h)), draw(ks[2], (b, s, d))
    qp = np.stack([np.arange(t) + s - t, np.where(np.arange(t) < t - 5, np.arange(t) * 3, -1)])
    kp = np.stack([np.arange(s), np.where(np.arange(s) < s - 30, np.arange(s), -1)])
    return q, w, k, jnp.asarray(qp[:b], jnp.int32), jnp.asarray(kp[:b], jnp.int32)


@pytest.mark.parametrize("impl", sorted(KERNELS))
def test_chunk_scores_match_reference(impl):
    q, w, k, qp, kp = make(0)
    ref = chunk_scores_reference(q, w, k, qp, kp)
    got = KERNELS[impl](q, w, k, qp, kp, interpret=True)
    assert got.shape == ref.shape and got.dtype == jnp.float32
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref))
    assert np.isneginf(ref).any() and np.isfinite(ref).any()
    np.testing.assert_allclose(np.where(np.isfinite(ref), got, 0), np.where(np.isfinite(ref), ref, 0),
                               rtol=1e-5, atol=1e-4)


def test_triton_bf16_inputs_small_tiles():
    q, w, k, qp, kp = make(1, t=40, s=70)
    q, w, k = (a.astype(jnp.bfloat16) for a in (q, w, k))
    ref = chunk_scores_reference(q, w, k, qp, kp)
    got = chunk_scores_triton(q, w, k, qp, kp, interpret=True,
                              config=IndexerTritonConfig(block_q=16, block_k=32))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref))
    np.testing.assert_allclose(np.where(np.isfinite(ref), got, 0), np.where(np.isfinite(ref), ref, 0),
                               rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("impl", sorted(KERNELS))
def test_topk_exact_ties_chunked(impl):
    """Integer inputs: exact scores with many ties, so the kernels must pick the very same
    set (lower slot first among ties) as `lax.top_k` over all scores (best first), in
    ascending slot order, over several query chunks with T not a multiple of the chunk."""
    q, w, k, qp, kp = make(2, integer=True)
    ref = best_first(q, w, k, qp, kp, 16)
    got = indexer_topk(q, w, k, k=16, q_positions=qp, kv_positions=kp, query_chunk=16, impl=impl,
                       interpret=True)
    assert got.shape == ref.shape == (2, 37, 16) and got.dtype == jnp.int32
    np.testing.assert_array_equal(got, ascending(ref))
    assert (np.asarray(ref) == -1).any() and not (np.asarray(ref) == ascending(ref)).all()


@pytest.mark.parametrize("impl", sorted(KERNELS))
def test_topk_float_tie_aware_and_padding(impl):
    """Float inputs, k > S: the selected sets match up to near-ties (same sorted reference
    scores), slots ascending, -1 exactly where fewer keys are visible (last), returned
    scores are the selected slots' reference scores."""
    q, w, k, qp, kp = make(3, s=60, t=21)
    kk = 64
    idx, vals = indexer_topk(q, w, k, k=kk, q_positions=qp, kv_positions=kp, query_chunk=8,
                             return_scores=True, impl=impl, interpret=True)
    assert idx.shape == (2, 21, 60)                                   # min(k, S) columns
    full = np.asarray(chunk_scores_reference(q, w, k, qp, kp))
    n_visible = np.isfinite(full).sum(-1)
    np.testing.assert_array_equal((np.asarray(idx) >= 0).sum(-1), n_visible)
    assert (n_visible < 60).any() and (n_visible == 0).any()
    ref_sorted = -np.sort(-full, axis=-1)
    picked = np.take_along_axis(full, np.maximum(np.asarray(idx), 0), -1)
    picked = np.where(np.asarray(idx) >= 0, picked, -np.inf)
    np.testing.assert_allclose(-np.sort(-picked, -1), ref_sorted, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(vals, picked, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(idx, ascending(idx))
    sel = np.asarray(idx)
    for row in sel.reshape(-1, sel.shape[-1]):                        # distinct slots
        row = row[row >= 0]
        assert len(set(row.tolist())) == len(row)


def test_dsa_ops_routes_to_op():
    """`sparse_jax.ops.dsa.indexer_topk(impl="auto")` goes through this op (its XLA chunk
    reference on CPU, ascending slots) and picks the set of impl="xla" (dsa's own path,
    best first); default positions work."""
    q, w, k, qp, kp = make(4, integer=True)
    a = dsa.indexer_topk(q, w, k, qp, kp, k=8, query_chunk=16, impl="auto")
    b = dsa.indexer_topk(q, w, k, qp, kp, k=8, query_chunk=16, impl="xla")
    np.testing.assert_array_equal(a, ascending(b))
    q1, w1, k1 = q[:1], w[:1], k[:1, :37]
    c = indexer_topk(q1, w1, k1, k=4, impl="xla")
    pos = jnp.arange(37)[None]
    np.testing.assert_array_equal(c, ascending(dsa.indexer_topk(q1, w1, k1, pos, pos, k=4)))
    assert int(c[0, 0, 0]) == 0 and (np.asarray(c[0, 0, 1:]) == -1).all()


def test_bad_inputs_raise():
    q, w, k, qp, kp = make(5, b=1, t=8, s=8)
    cases = ((dict(q_index=q[0]), "q_index"), (dict(weights=w[..., :2]), "weights"),
             (dict(k_index=k[..., :5]), "k_index"), (dict(k=0), "k"),
             (dict(query_chunk=0), "query_chunk"), (dict(q_positions=qp[:, :3]), "q_positions"),
             (dict(impl="cuda"), "impl"), (dict(weights=w.astype(jnp.int32)), "weights"))
    for kw, name in cases:
        args = dict(q_index=q, weights=w, k_index=k, k=4) | kw
        with pytest.raises(ValueError, match=name):
            indexer_topk(args.pop("q_index"), args.pop("weights"), args.pop("k_index"), **args)
    with pytest.raises(ValueError, match="block_q"):
        IndexerTritonConfig(block_q=24)


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
def test_triton_compiled_on_gpu():
    """The real Triton kernel (bf16 inputs, float32 accumulation) against the float32
    reference, and the full op's index sets (tie-aware)."""
    with jax.default_device(jax.devices("gpu")[0]):
        q, w, k, qp, kp = make(6, t=300, s=700, h=4, d=64)
        q, w, k = (a.astype(jnp.bfloat16) for a in (q, w, k))
        with jax.default_matmul_precision("highest"):
            ref = np.asarray(chunk_scores_reference(q, w, k, qp, kp))
        got = np.asarray(chunk_scores_triton(q, w, k, qp, kp))
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref))
        np.testing.assert_allclose(np.where(np.isfinite(ref), got, 0), np.where(np.isfinite(ref), ref, 0),
                                   rtol=2e-2, atol=2e-2)
        idx = np.asarray(indexer_topk(q, w, k, k=64, q_positions=qp, kv_positions=kp, query_chunk=128,
                                      impl="triton"))
        picked = np.where(idx >= 0, np.take_along_axis(ref, np.maximum(idx, 0), -1), -np.inf)
        np.testing.assert_allclose(-np.sort(-picked, -1), -np.sort(-ref, -1)[..., :64], rtol=2e-2, atol=5e-2)
        np.testing.assert_array_equal(idx, ascending(idx))


@pytest.mark.parametrize("impl,t,s,chunk", [("xla", 37, 45, 16), ("xla", 37, 20, 16), ("triton", 37, 20, 16),
                                             ("xla", 37, 45, 2), ("triton", 37, 30, 2)])
def test_default_positions_prefix_path_matches_explicit(impl, t, s, chunk):
    """Default positions take the causal-prefix chunk loop; it must equal the full-width
    path with explicit `arange` positions (exact ties), S > T and S < T; chunk 2: 19
    chunks, more than `PREFIX_WIDTH_CLASSES`, so groups of two under `lax.map` (the last
    one ragged)."""
    q, w, k, _, _ = make(7, b=1, t=t, s=s, integer=True)
    got, vals = indexer_topk(q, w, k, k=12, query_chunk=chunk, impl=impl, interpret=True,
                             return_scores=True)
    pos_q, pos_k = jnp.arange(t)[None], jnp.arange(s)[None]
    ref, ref_vals = indexer_topk(q, w, k, k=12, q_positions=pos_q, kv_positions=pos_k, query_chunk=chunk,
                                 impl=impl, interpret=True, return_scores=True)
    assert got.shape == ref.shape == (1, t, 12)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(vals, ref_vals)


def test_default_positions_compile_at_most_sixteen_key_widths(monkeypatch):
    """64 query chunks with default positions trace the backend at most
    `PREFIX_WIDTH_CLASSES` times, each with its own key width (one compiled kernel set each)."""
    from pallas_kernels.indexer import api

    widths = []

    def recording(q_index, weights, k_index, *a, **kw):
        widths.append(k_index.shape[1])
        return api.chunk_topk_xla(q_index, weights, k_index, *a, **kw)

    monkeypatch.setitem(api.IMPLEMENTATIONS, "xla", recording)
    q, w, k, _, _ = make(3, b=1, t=64, s=64, integer=True)
    got = indexer_topk(q, w, k, k=4, query_chunk=1, impl="xla")
    assert len(widths) == api.PREFIX_WIDTH_CLASSES == len(set(widths)), widths
    pos = jnp.arange(64)[None]
    np.testing.assert_array_equal(got, indexer_topk(q, w, k, k=4, q_positions=pos, kv_positions=pos,
                                                    query_chunk=1, impl="xla"))
