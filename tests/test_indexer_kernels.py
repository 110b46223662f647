"""The `indexer` op (DSA lightning-indexer scores + top-k): Triton and Mosaic TPU kernels in
interpret mode against the plain-jnp reference, chunked top-k against `sparse_jax.ops.dsa`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.indexer import indexer_topk
from pallas_kernels.indexer.reference import chunk_scores_reference as _chunk_scores_reference
from pallas_kernels.indexer.tpu import chunk_scores_tpu
from pallas_kernels.indexer.triton import IndexerTritonConfig, chunk_scores_triton
from sparse_jax.ops import dsa
from gpu_testing import has_gpu

KERNELS = {"triton": chunk_scores_triton, "mosaic_tpu": chunk_scores_tpu}
# The plain-jnp reference under one jit: op by op it compiled each op for every new shape.
chunk_scores_reference = jax.jit(_chunk_scores_reference)


def ascending(idx):
    """Slots of each row sorted ascending, -1 pads last: the op's order, from any order."""
    idx = np.asarray(idx)
    big = np.iinfo(np.int32).max
    srt = np.sort(np.where(idx >= 0, idx, big), -1)
    return np.where(srt == big, -1, srt)


@functools.partial(jax.jit, static_argnums=5)
def best_first(q, w, k, qp, kp, kk):
    """The reference selection, best first: `lax.top_k` over the whole `[B, T, S]` score
    matrix (lower slot first among ties), -1 where fewer keys are visible."""
    vals, idx = jax.lax.top_k(_chunk_scores_reference(q, w, k, qp, kp), kk)
    return jnp.where(jnp.isfinite(vals), idx, -1)


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
    op = jax.jit(lambda q, w, k, **pos: indexer_topk(q, w, k, k=12, query_chunk=chunk, impl=impl,  # noqa: E731
                                                     interpret=True, return_scores=True, **pos))
    got, vals = op(q, w, k)
    pos_q, pos_k = jnp.arange(t)[None], jnp.arange(s)[None]
    ref, ref_vals = op(q, w, k, q_positions=pos_q, kv_positions=pos_k)
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
    op = jax.jit(lambda q, w, k, **pos: indexer_topk(q, w, k, k=4, query_chunk=1, impl="xla", **pos))  # noqa: E731
    got = op(q, w, k)
    assert len(widths) == api.PREFIX_WIDTH_CLASSES == len(set(widths)), widths
    pos = jnp.arange(64)[None]
    np.testing.assert_array_equal(got, op(q, w, k, q_positions=pos, kv_positions=pos))


def width_cases(t, s):
    """Explicit `(q_positions [2, t], kv_positions [2, s])`: row 0 a plain prefill (arange),
    row 1 the DSA / CSA layers' other kinds of positions, so that the rows need different key
    widths (the chunk's is their maximum)."""
    ar_q, ar_k = np.arange(t), np.arange(s)
    pad = lambda a, n: np.where(np.arange(len(a)) < n, -1, a - n)        # noqa: E731
    row1 = {
        "arange": (ar_q, ar_k),                                          # causal prefill
        "left_padded": (pad(ar_q, 9), pad(ar_k, 9)),                     # 9 padding tokens first
        "cache": (ar_q + 17, np.where(ar_k < 17 + t, ar_k, -1)),         # 17 cached, empty slots last
        "reversed": (ar_q, ar_k[::-1]),                                  # slot j holds key S - 1 - j
    }
    out = {name: (np.stack([ar_q, qp]), np.stack([ar_k, kp])) for name, (qp, kp) in row1.items()}
    out["padded_chunk"] = (np.where(ar_q < 20, -1, ar_q)[None].repeat(2, 0), ar_k[None].repeat(2, 0))
    return {name: (jnp.asarray(qp, jnp.int32), jnp.asarray(kp, jnp.int32)) for name, (qp, kp) in out.items()}


def test_needed_keys_is_one_past_the_last_visible_slot():
    """`api._needed_keys` against the reference's visibility (`chunk_scores_reference`'s
    -inf): random positions with padding queries, empty slots and unsorted keys."""
    from pallas_kernels.indexer import api

    rng = np.random.default_rng(0)
    q, w, k, _, _ = make(23, b=3, t=8, s=40)
    wants = set()
    for i in range(30):
        qp = rng.integers(-3, rng.integers(-1, 45), (3, 8))
        kp = np.arange(40)[None].repeat(3, 0) if i % 2 else rng.permuted(np.tile(np.arange(40), (3, 1)), axis=1)
        kp = np.where(np.arange(40) < rng.integers(0, 41, (3, 1)), kp, -1)          # empty slots last
        kp = np.where(rng.random((3, 40)) < 0.2, -1, kp)                             # and anywhere
        vis = np.isfinite(np.asarray(chunk_scores_reference(q, w, k, jnp.asarray(qp), jnp.asarray(kp))))
        slots = np.flatnonzero(vis.any((0, 1)))
        want = slots.max() + 1 if len(slots) else 0
        assert int(api._needed_keys(jnp.asarray(qp, jnp.int32), jnp.asarray(kp, jnp.int32))) == want, (qp, kp)
        wants.add(want)
    assert 0 in wants and max(wants) >= 36 and len(wants) > 10, [int(x) for x in sorted(wants)]


def _width_backends():
    from pallas_kernels.indexer.fused import FusedIndexerConfig
    tiles = IndexerTritonConfig(block_q=16, block_k=16)
    fused = FusedIndexerConfig(block_q=16, block_k=16, sample_stride=2, oversample=2.0, capacity=4.0,
                               fallback_rows=16)
    fp8 = dict(score_dtype="float8_e4m3fn", fp8_rerank=1.25)
    return {"xla": dict(impl="xla"), "xla-fp8": dict(impl="xla", **fp8),
            "triton": dict(impl="triton", config=tiles), "fused": dict(impl="triton", config=fused),
            "triton-fp8": dict(impl="triton", config=tiles, **fp8)}


@pytest.mark.parametrize("backend", ["xla", "xla-fp8", "triton", "fused", "triton-fp8"])
def test_explicit_positions_width_classes_match_full_width(backend, monkeypatch):
    """Explicit positions, several query chunks: each chunk scores the smallest key width class
    past its last visible slot (`lax.switch` under `lax.map`; classes of 16 slots here, the
    kernels' key tile, so that 5 chunks of S = 150 keys get 5 classes), and returns the arrays
    of the full-width path (`PREFIX_WIDTH_CLASSES = 1`): bit for bit on the Pallas kernels
    (Triton, fused top-k; FP8 with its rerank), the same slots on XLA (whose dots round by
    shape: scores within float32 rounding). Float inputs; T = 70 not a multiple of the chunk,
    S = 150 != T, k = 24 above the first chunk's visible keys; `width_cases`: arange,
    left-padded, cache with empty slots (more keys than row 0's), reversed (every chunk needs
    all S), a chunk of padding queries; and the slots are `lax.top_k`'s on the reference
    scores."""
    from pallas_kernels.indexer import api

    kw = _width_backends()[backend]
    q, w, k, _, _ = make(21, t=70, s=150)
    op = lambda: jax.jit(lambda qp, kp: indexer_topk(q, w, k, k=24, q_positions=qp, kv_positions=kp,  # noqa: E731
                                                     query_chunk=16, return_scores=True, interpret=True, **kw))
    monkeypatch.setattr(api, "KEY_WIDTH_ALIGN", 16)
    narrow = op()
    with monkeypatch.context() as m:
        m.setattr(api, "PREFIX_WIDTH_CLASSES", 1)
        full = op()
        full(*width_cases(70, 150)["arange"])                          # traced with one width
    exact = backend != "xla" and backend != "xla-fp8"
    for name, (qp, kp) in width_cases(70, 150).items():
        (idx, vals), (ref_idx, ref_vals) = narrow(qp, kp), full(qp, kp)
        assert idx.shape == (2, 70, 24), name
        np.testing.assert_array_equal(idx, ref_idx, err_msg=name)
        if exact:
            np.testing.assert_array_equal(vals, ref_vals, err_msg=name)
        else:
            np.testing.assert_allclose(vals, ref_vals, rtol=1e-5, atol=1e-5, err_msg=name)
        if "fp8" not in backend:
            np.testing.assert_array_equal(idx, ascending(best_first(q, w, k, qp, kp, 24)), err_msg=name)
        if name == "padded_chunk":
            assert (np.asarray(idx[:, :20]) == -1).all()


def test_explicit_positions_trace_and_run_the_width_classes(monkeypatch):
    """64 query chunks (T = S = 64, chunk 1; classes of 4 slots here): the backend is traced
    once per class, `PREFIX_WIDTH_CLASSES` widths 4, 8, .., 64, and each chunk runs the
    smallest one past its last visible key: causal positions run every class 4 times (chunk
    i needs i + 1 keys), reversed slots only the full width; T > S (chunks past S all at S);
    the arrays of the full-width path."""
    from pallas_kernels.indexer import api

    traced, ran = [], []

    def recording(q_index, weights, k_index, *a, **kw):
        width = k_index.shape[1]
        traced.append(width)
        jax.debug.callback(lambda: ran.append(width))
        return api.chunk_topk_xla(q_index, weights, k_index, *a, **kw)

    monkeypatch.setitem(api.IMPLEMENTATIONS, "xla", recording)
    monkeypatch.setattr(api, "KEY_WIDTH_ALIGN", 4)
    q, w, k, _, _ = make(22, b=1, t=80, s=64)
    pos = np.arange(80)[None]
    for kp, t, runs in ((pos[:, :64], 64, list(range(4, 65, 4)) * 4), (pos[:, 63::-1], 64, [64] * 64),
                        (pos[:, :64], 80, list(range(4, 65, 4)) * 4 + [64] * 16)):
        traced.clear()
        ran.clear()
        got = indexer_topk(q[:, :t], w[:, :t], k, k=4, q_positions=pos[:, :t], kv_positions=kp, query_chunk=1,
                           impl="xla")
        jax.effects_barrier()
        assert traced == list(range(4, 65, 4)), traced
        assert sorted(ran) == sorted(runs), ran
        np.testing.assert_array_equal(got, ascending(best_first(q[:, :t], w[:, :t], k, pos[:, :t], kp, 4)))
