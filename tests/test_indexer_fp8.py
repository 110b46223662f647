"""FP8 lightning-indexer scores (`indexer_topk(score_dtype="float8_e4m3fn")`, issue 15 item 1):
the Hadamard rotation and e4m3 rounding, the FP8 scores against the float32 reference within a
bound derived from e4m3's precision, the selected set against float32 `lax.top_k`'s, the
Triton kernel (interpret mode, and compiled with `-m gpu`) against the XLA FP8 path, and the
option's checks and threading through `sparse_jax.ops.dsa`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.indexer import api, fp8, indexer_topk
from pallas_kernels.indexer.reference import chunk_scores_reference
from pallas_kernels.indexer.triton import IndexerTritonConfig, chunk_scores_triton
from sparse_jax.ops import dsa
from gpu_testing import has_gpu
from test_indexer_kernels import ascending, make

FP8 = "float8_e4m3fn"
# e4m3 keeps 3 mantissa bits: rounding a normal value errs by at most 2^-4 of it, so a dot of
# rounded rows errs by at most (2 * 2^-4 + 2^-8) |q| |k| (Cauchy-Schwarz); ReLU is
# 1-Lipschitz. Subnormals (below 2^-6 of the scale) err by at most 2^-10 of the scale, itself
# amax / 448 <= |row| / 448: negligible. Margin for float32 rounding.
REL_BOUND = 2 * 2.0**-4 + 2.0**-8 + 1e-3


def score_bound(q, w, k):
    """`[B, T, S]` bound on |I8 - I|: `REL_BOUND * sum_j |w[t, j]| |q[t, j]| |k[s]|`."""
    qn = np.linalg.norm(np.asarray(q, np.float32), axis=-1)                # [B, T, H]
    kn = np.linalg.norm(np.asarray(k, np.float32), axis=-1)                # [B, S]
    return REL_BOUND * np.einsum("btj,bs->bts", np.abs(np.asarray(w, np.float32)) * qn, kn)


def fp8_scores(q, w, k, qp, kp):
    return fp8.chunk_scores_fp8(*fp8.quantize_indexer(q, w, k), qp, kp)


def test_hadamard_is_the_orthonormal_sylvester_matrix():
    """Against the explicit Sylvester construction (n = 8), and dot products kept when D is
    zero-padded to a power of two (D = 24 -> 32)."""
    h = np.array([[1.0]])
    for _ in range(3):
        h = np.block([[h, h], [h, -h]])
    x = jax.random.normal(jax.random.key(0), (5, 8))
    np.testing.assert_allclose(fp8.hadamard(x), np.asarray(x) @ h.T / np.sqrt(8), rtol=1e-5, atol=1e-5)
    a, b = jax.random.normal(jax.random.key(1), (2, 7, 24))
    ha, hb = fp8.hadamard(a), fp8.hadamard(b)
    assert ha.shape == (7, 32)
    np.testing.assert_allclose((ha * hb).sum(-1), (a * b).sum(-1), rtol=1e-4, atol=1e-4)


def test_quantize_rows_error_and_scales():
    """Per-row and per-block-of-8 scales: the largest |entry| maps to 448 exactly, every entry
    comes back within 2^-4 of itself (or 2^-10 of the scale, subnormals), zero rows stay zero."""
    x = jax.random.normal(jax.random.key(2), (6, 32)) * jnp.logspace(-3, 3, 6)[:, None]
    x = x.at[0].set(0.0)
    for block, groups in ((None, ()), (8, (4,))):
        x8, sc = fp8.quantize_rows(x, block)
        assert x8.dtype == jnp.float8_e4m3fn and sc.shape == (6,) + groups
        rep = np.repeat(np.asarray(sc).reshape(6, -1), block or 32, axis=1)
        back = np.asarray(x8, np.float32) * rep
        err = np.abs(back - np.asarray(x))
        assert (err <= np.maximum(np.abs(np.asarray(x)) * 2.0**-4, rep * 2.0**-10) * (1 + 1e-6)).all()
        peak = np.abs(np.asarray(x8, np.float32)).reshape(6, -1, block or 32).max(-1)
        np.testing.assert_array_equal(peak[1:], 448.0)
        assert not np.asarray(x8[0], np.float32).any()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fp8_scores_within_e4m3_bound_of_float32(dtype):
    """Ragged inputs (offset and padded queries, empty slots): -inf exactly where the
    reference has it; |I8 - I| within the e4m3 bound everywhere; and much closer on average
    (rms error < 2% of the score scale `sum_j |w| |q| |k|`)."""
    q, w, k, qp, kp = make(10, d=32)
    q, w, k = (a.astype(dtype) for a in (q, w, k))
    ref = np.asarray(chunk_scores_reference(q, w, k, qp, kp))
    got = np.asarray(fp8_scores(q, w, k, qp, kp))
    fin = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(got), fin)
    bound = score_bound(q, w, k)
    err = np.abs(np.where(fin, got, 0) - np.where(fin, ref, 0))
    assert (err <= bound).all()
    assert np.sqrt((err[fin] ** 2).mean()) < 0.02 * (bound[fin] / REL_BOUND).mean()
    assert err.max() > 0                                     # the scores are quantised


def selection_report(ref, idx, kk):
    """Overlap of the selected sets `idx [.., kk]` with the float32 top-kk of `ref`, and the
    largest `I(missed) - I(k-th)` over missed items (>= 0)."""
    ref2 = ref.reshape(-1, ref.shape[-1])
    want = np.argsort(-ref2, -1, kind="stable")[:, :kk]
    kth = np.take_along_axis(ref2, want[:, -1:], -1)[:, 0]
    got = np.asarray(idx).reshape(-1, kk)
    overlap, worst = [], 0.0
    for r, (a, b) in enumerate(zip(want, got)):
        missed = np.setdiff1d(a, b)
        overlap.append(1 - len(missed) / kk)
        if len(missed):
            worst = max(worst, float((ref2[r, missed] - kth[r]).max()))
    return float(np.mean(overlap)), worst


def test_selection_overlap_random_and_misses_near_the_boundary():
    """Random normal inputs (B=1, T=48 queries over S=1024 keys, 4 heads x 64, k=64): the FP8
    set keeps >= 93% of float32 `lax.top_k`'s (0.966 measured at S=8192, k=512), and a missed
    item can only be one the float32 scores put within twice the e4m3 bound of the k-th score
    (the item that displaced it scores at most the k-th)."""
    ks = jax.random.split(jax.random.key(11), 3)
    b, t, s, h, d, kk = 1, 48, 1024, 4, 64, 64
    q, w, k = (jax.random.normal(ks[0], (b, t, h, d)), jax.random.normal(ks[1], (b, t, h)),
               jax.random.normal(ks[2], (b, s, d)))
    qp = jnp.full((b, t), s, jnp.int32)                      # every key visible
    kp = jnp.arange(s, dtype=jnp.int32)[None]
    ref = np.asarray(chunk_scores_reference(q, w, k, qp, kp))
    idx = indexer_topk(q, w, k, k=kk, q_positions=qp, kv_positions=kp, impl="xla", score_dtype=FP8)
    exact = indexer_topk(q, w, k, k=kk, q_positions=qp, kv_positions=kp, impl="xla")
    overlap, worst = selection_report(ref, idx, kk)
    assert selection_report(ref, exact, kk) == (1.0, 0.0)
    assert 0.93 <= overlap < 1.0, overlap
    bound = score_bound(q, w, k).reshape(t, s).max(-1)
    assert worst <= 2 * bound.max(), (worst, bound.max())
    reranked = indexer_topk(q, w, k, k=kk, q_positions=qp, kv_positions=kp, impl="xla", score_dtype=FP8,
                            fp8_rerank=1.5)
    rr, _ = selection_report(ref, reranked, kk)
    assert rr >= 0.99 and rr > overlap, (rr, overlap)


@pytest.mark.parametrize("fp8_dot", [True, False])
def test_triton_interpret_equals_xla_fp8_ragged(fp8_dot):
    """The Triton kernel (interpret mode, e4m3 dot or widened to bf16, small tiles so the ragged
    lengths span several) gives the XLA FP8 path's scores up to float32 summation order, and
    the op the same selected sets (several query chunks, k > visible keys on some rows)."""
    q, w, k, qp, kp = make(12, t=40, s=70)
    ops = fp8.quantize_indexer(q, w, k)
    want = np.asarray(fp8.chunk_scores_fp8(*ops, qp, kp))
    cfg = IndexerTritonConfig(block_q=16, block_k=32, fp8_dot=fp8_dot)
    got = np.asarray(chunk_scores_triton(ops[0], ops[1], ops[2], qp, kp, k_scale=ops[3], interpret=True,
                                         config=cfg))
    fin = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), fin)
    assert np.isneginf(want).any() and fin.any()
    scale = np.abs(np.where(fin, want, 0)).max()
    np.testing.assert_allclose(np.where(fin, got, 0), np.where(fin, want, 0), rtol=1e-5, atol=1e-6 * scale)
    kw = dict(k=48, q_positions=qp, kv_positions=kp, query_chunk=16, score_dtype=FP8)
    a = indexer_topk(q, w, k, impl="xla", **kw)
    c = indexer_topk(q, w, k, impl="triton", interpret=True, config=cfg, **kw)
    np.testing.assert_array_equal(c, a)
    assert (np.asarray(a) == -1).any()
    n_visible = np.isfinite(np.asarray(chunk_scores_reference(q, w, k, qp, kp))).sum(-1)
    np.testing.assert_array_equal((np.asarray(a) >= 0).sum(-1), np.minimum(n_visible, 48))


def test_default_positions_short_t_and_returned_scores():
    """Default positions (the causal prefix chunk loop, T = 14 shorter than a tile, S > T) on
    both paths: same sets, ascending, and the returned scores are the FP8 scores of the picked
    slots."""
    q, w, k, _, _ = make(13, b=1, t=14, s=27)
    out = {impl: indexer_topk(q, w, k, k=6, query_chunk=8, impl=impl, interpret=True, return_scores=True,
                              score_dtype=FP8) for impl in ("xla", "triton")}
    np.testing.assert_array_equal(out["triton"][0], out["xla"][0])
    idx, vals = (np.asarray(a) for a in out["xla"])
    np.testing.assert_array_equal(idx, ascending(idx))
    pos_q, pos_k = jnp.arange(14)[None], jnp.arange(27)[None]
    full = np.asarray(fp8_scores(q, w, k, pos_q, pos_k))
    picked = np.where(idx >= 0, np.take_along_axis(full, np.maximum(idx, 0), -1), -np.inf)
    np.testing.assert_allclose(vals, picked, rtol=1e-6)
    assert int(idx[0, 0, 0]) == 0 and (idx[0, 0, 1:] == -1).all()


def test_rerank_over_all_keys_is_the_float32_set_with_ties():
    """With `fp8_rerank` large enough that every visible key is a candidate, the re-scored set
    is float32 `lax.top_k`'s exactly: integer inputs (exact scores, many ties: lower slot
    first), ragged positions, several query chunks; the returned scores are float32's."""
    q, w, k, qp, kp = make(17, t=21, s=40, integer=True)
    kk = 6
    vals_ref, idx_ref = jax.lax.top_k(chunk_scores_reference(q, w, k, qp, kp), kk)
    want = np.where(np.isfinite(vals_ref), idx_ref, -1)
    idx, vals = indexer_topk(q, w, k, k=kk, q_positions=qp, kv_positions=kp, query_chunk=8, impl="xla",
                             score_dtype=FP8, fp8_rerank=40 / kk, return_scores=True)
    np.testing.assert_array_equal(idx, ascending(want))
    full = np.asarray(chunk_scores_reference(q, w, k, qp, kp))
    picked = np.where(np.asarray(idx) >= 0, np.take_along_axis(full, np.maximum(np.asarray(idx), 0), -1), -np.inf)
    np.testing.assert_array_equal(vals, picked)
    assert (np.asarray(idx) == -1).any()


def test_bad_score_dtype_raises():
    q, w, k, qp, kp = make(14, b=1, t=8, s=8)
    for bad in ("float16", "fp8", jnp.float8_e4m3fn, None):
        with pytest.raises(ValueError, match="score_dtype"):
            indexer_topk(q, w, k, k=4, score_dtype=bad)
        with pytest.raises(ValueError, match="score_dtype"):
            dsa.DSAConfig(score_dtype=bad)
    for bad in (0.5, True, "2"):
        with pytest.raises(ValueError, match="fp8_rerank"):
            indexer_topk(q, w, k, k=4, score_dtype=FP8, fp8_rerank=bad)
        with pytest.raises(ValueError, match="fp8_rerank"):
            dsa.DSAConfig(score_dtype=FP8, fp8_rerank=bad)
    with pytest.raises(ValueError, match="fp8_rerank needs score_dtype"):
        indexer_topk(q, w, k, k=4, fp8_rerank=1.5)
    with pytest.raises(ValueError, match="fp8_rerank needs score_dtype"):
        dsa.DSAConfig(fp8_rerank=1.5)
    with pytest.raises(ValueError, match="score_dtype='float8_e4m3fn' is not implemented on Mosaic TPU"):
        indexer_topk(q, w, k, k=4, impl="mosaic_tpu", score_dtype=FP8)
    assert api.BACKENDS["mosaic_tpu"].supports(score_dtype="bfloat16") is None


def test_dsa_config_threads_score_dtype(monkeypatch):
    """`DSAConfig(score_dtype=...)` reaches the op through `ops.dsa.indexer_topk` (same sets as
    the op called directly), which the DSA layer's sparse stage calls with it."""
    q, w, k, qp, kp = make(15, t=12, s=30)
    got = dsa.indexer_topk(q, w, k, qp, kp, k=8, query_chunk=16, score_dtype=FP8, fp8_rerank=1.25)
    want = indexer_topk(q, w, k, k=8, q_positions=qp, kv_positions=kp, query_chunk=16, impl="xla",
                        score_dtype=FP8, fp8_rerank=1.25)
    np.testing.assert_array_equal(got, want)

    from flax import nnx
    from sparse_jax.layers import dsa as dsa_layer
    from sparse_jax.layers.attention import AttentionConfig
    from sparse_jax.ops.mla import MLAConfig
    seen = []

    class Reached(Exception):
        pass

    def spy(*args, **kwargs):                # records the call, skips the rest of the layer
        seen.append((kwargs.get("score_dtype"), kwargs.get("fp8_rerank")))
        raise Reached

    monkeypatch.setattr(dsa_layer.dops, "indexer_topk", spy)
    cfg = AttentionConfig(d_model=16, num_heads=2)
    mla = MLAConfig(kv_lora_rank=8, q_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4)
    assert (dsa.DSAConfig().score_dtype, dsa.DSAConfig().fp8_rerank) == ("bfloat16", None)
    cases = [(FP8, 1.25)]
    for score_dtype, rerank in cases:
        layer = dsa_layer.DSAAttention(cfg, mla, dsa.DSAConfig(index_heads=2, index_head_dim=8, top_k=4,
                                                               score_dtype=score_dtype, fp8_rerank=rerank),
                                       rngs=nnx.Rngs(0))
        with pytest.raises(Reached):
            layer(jax.random.normal(jax.random.key(3), (1, 12, 16)), jnp.arange(12)[None])
    assert seen == cases


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("fp8_dot", [True, False])
def test_triton_fp8_compiled_on_gpu(fp8_dot):
    """The compiled kernel (e4m3 tensor-core dot, or widened to bf16) against the XLA FP8 path
    on the GPU (float32 products of e4m3 values are exact), bf16 inputs, ragged lengths; the
    op's sets overlap float32 `lax.top_k`'s by >= 90% (k = 64 of <= 700 keys)."""
    with jax.default_device(jax.devices("gpu")[0]):
        q, w, k, qp, kp = make(16, t=300, s=700, h=4, d=64)
        q, w, k = (a.astype(jnp.bfloat16) for a in (q, w, k))
        ops = fp8.quantize_indexer(q, w, k)
        want = np.asarray(fp8.chunk_scores_fp8(*ops, qp, kp))
        cfg = IndexerTritonConfig(fp8_dot=fp8_dot)
        got = np.asarray(chunk_scores_triton(ops[0], ops[1], ops[2], qp, kp, k_scale=ops[3], config=cfg))
        fin = np.isfinite(want)
        np.testing.assert_array_equal(np.isfinite(got), fin)
        scale = np.abs(np.where(fin, want, 0)).max()
        np.testing.assert_allclose(np.where(fin, got, 0), np.where(fin, want, 0), rtol=1e-4, atol=1e-5 * scale)
        with jax.default_matmul_precision("highest"):
            ref = np.asarray(chunk_scores_reference(q, w, k, qp, kp))
        idx = np.asarray(indexer_topk(q, w, k, k=64, q_positions=qp, kv_positions=kp, query_chunk=128,
                                      impl="triton", config=cfg, score_dtype=FP8))
        np.testing.assert_array_equal(idx, ascending(idx))
        rows = np.isfinite(ref).sum(-1) >= 64
        overlap, _ = selection_report(ref[rows], idx[rows], 64)
        assert overlap >= 0.9, overlap
