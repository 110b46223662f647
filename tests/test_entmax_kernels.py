"""`entmax` op: the plain-jnp reference (sort-based exact threshold vs bisection, the
sparse-Jacobian backward vs autodiff through the sort) and the Pallas Triton kernel
against it in `interpret=True` (forward, tau and gradients; fp32 and bf16; ragged lengths,
Tq shorter than a block, GQA 1/4/16, alpha in {1.25, 1.5, 2}, causal and not, padding and
rows that see nothing). A `gpu`-marked test compiles the real kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dataclasses
import functools

from pallas_kernels.entmax import api, entmax_attention
from pallas_kernels.entmax import reference as R
from pallas_kernels.entmax import triton as T
from pallas_kernels.entmax.triton import EntmaxTritonConfig
from gpu_testing import has_gpu, hopper_device, needs_gpu_interpret_pool
from kernel_testing import rel_err


def masked_rows(rng, shape, p_visible=0.7):
    z = jnp.asarray(rng.standard_normal(shape) * 1.5, jnp.float32)
    mask = rng.random(shape) < p_visible
    mask[0] = False                      # a row that sees nothing
    mask[1] = False
    mask[1, 3] = True                    # a row that sees one key
    return z, jnp.asarray(mask)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_sort_threshold_is_exact_and_matches_bisection(alpha):
    rng = np.random.default_rng(int(alpha * 10))
    z, mask = masked_rows(rng, (24, 53))
    tau = R.threshold_sort(z, mask, alpha)
    np.testing.assert_allclose(tau[2:], R.threshold_bisect(z, mask, alpha)[2:], atol=2e-6, rtol=0)
    assert np.isinf(tau[0]) and np.isfinite(tau[1:]).all()
    # exact: the unnormalised probabilities already sum to one
    r = jnp.where(mask, jnp.maximum(z - jnp.where(jnp.isfinite(tau), tau, 0.0)[:, None], 0.0), 0.0)
    p = r if alpha == 2.0 else r * r
    np.testing.assert_allclose(p.sum(-1)[1:], 1.0, atol=2e-6)
    assert (p.sum(-1)[0] == 0) and (p[1, 3] == 1.0)
    assert (p == 0).mean() > 0.3              # sparse: many exact zeros


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_sort_threshold_over_the_top_candidates_equals_the_full_sort(alpha):
    """Long rows search their top `candidates` first: the same tau as the full sort, for
    sparse rows (support < candidates) and for rows whose support is larger (near-uniform
    scores: redone by the full sort), masked and empty rows included."""
    rng = np.random.default_rng(11)
    z, mask = masked_rows(rng, (16, 300), 0.9)
    z = z.at[5].set(1e-3 * z[5]).at[6].set(0.0)          # supports of ~all visible keys
    sort = jax.jit(R.threshold_sort, static_argnums=2, static_argnames="candidates")   # not op by op
    full = sort(z, mask, alpha, candidates=None)
    for c in (8, 64, 299):
        got = sort(z, mask, alpha, candidates=c)
        np.testing.assert_allclose(got, full, atol=1e-6, rtol=0)
    sparse = sort(z[7:], mask[7:], alpha, candidates=64)    # no row redone
    np.testing.assert_allclose(sparse, full[7:], atol=1e-6, rtol=0)
    support = ((z[5] > full[5]) & mask[5]).sum()
    assert support > 64                                   # the redo path really ran


@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0])
def test_reference_backward_is_the_entmax_jacobian(alpha):
    """The custom_vjp (sparse Jacobian) equals autodiff through the threshold: through the
    sort (alpha 1.5, 2) or through the converged bisection's fixed point via finite
    differences (1.25)."""
    rng = np.random.default_rng(7)
    z, mask = masked_rows(rng, (6, 19), 0.8)
    s = z / (alpha - 1.0)
    w = jnp.asarray(rng.standard_normal((6, 19)), jnp.float32)
    loss = lambda s: (R.entmax(s, mask, alpha)[0] * w).sum()  # noqa: E731
    got = jax.grad(loss)(s)
    assert np.isfinite(got).all()
    if alpha in (1.5, 2.0):
        def plain(s):
            zz = jnp.where(mask, (alpha - 1.0) * s, R.NEG)
            return (R.probabilities(zz, mask, R.threshold_sort(zz, mask, alpha), alpha) * w).sum()
        np.testing.assert_allclose(got, jax.grad(plain)(s), atol=2e-5)
    else:
        eps = 1e-2
        idx = [(2, 0), (3, 5), (5, 18)]
        for i, j in idx:
            fd = (loss(s.at[i, j].add(eps)) - loss(s.at[i, j].add(-eps))) / (2 * eps)
            np.testing.assert_allclose(got[i, j], fd, atol=2e-3)
    np.testing.assert_array_equal(got[0], 0.0)


def test_reference_attention_matches_a_dense_loop():
    """out = sum_j p_j v_j with p from the row's own entmax; GQA heads read their kv head;
    causal and padding (negative positions) hide keys; a padded query returns zeros."""
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((1, 5, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 7, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, 7, 2, 8)), jnp.float32)
    qp = jnp.array([[2, 3, -1, 5, 6]])
    kp = jnp.array([[0, 1, 2, 3, 4, -1, 6]])
    o, tau = entmax_attention(q, k, v, alpha=1.5, q_positions=qp, kv_positions=kp, return_tau=True)
    for t in range(5):
        for h in range(4):
            vis = (np.array(kp[0]) >= 0) & (np.array(kp[0]) <= int(qp[0, t])) & (int(qp[0, t]) >= 0)
            if not vis.any():
                np.testing.assert_array_equal(o[0, t, h], 0.0)
                assert np.isinf(tau[0, h, t])
                continue
            s = np.array(k[0, :, h // 2] @ q[0, t, h]) / np.sqrt(8)
            z = jnp.asarray(0.5 * s)
            tt = float(R.threshold_sort(z[None], jnp.asarray(vis)[None], 1.5)[0])
            p = np.where(vis, np.maximum(0.5 * s - tt, 0.0) ** 2, 0.0)
            np.testing.assert_allclose(p.sum(), 1.0, atol=1e-5)
            np.testing.assert_allclose(o[0, t, h], p @ np.array(v[0, :, h // 2]), atol=1e-5)
            np.testing.assert_allclose(tau[0, h, t], tt, atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(alpha=1.0), "alpha=1 is softmax"),
    (dict(alpha=2.5), r"alpha must be in \(1, 2\]"),
    (dict(alpha=0.5), r"alpha must be in \(1, 2\]"),
    (dict(alpha="1.5"), "alpha must be a concrete"),
    (dict(scale=-1.0), "scale must be"),
    (dict(causal="yes"), "causal must be a bool"),
    (dict(impl="mosaic_tpu"), "not implemented"),
    (dict(q_positions=jnp.zeros((1, 3), jnp.int32)), "q_positions must be int"),
])
def test_bad_arguments_raise_value_error(bad, match):
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match=match):
        entmax_attention(q, q, q, **bad)


def test_traced_alpha_is_refused():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="alpha must be a concrete"):
        jax.jit(lambda a: entmax_attention(q, q, q, alpha=a))(1.5)


# ----------------------------------------------------------------------------- the kernel

# stats tiles coarser than the others: the fine tiles' maxima are the coarse ones
SMALL = EntmaxTritonConfig(block_q=16, block_k=16, stats_block_q=32, stats_block_k=32)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    alpha: float
    causal: bool = True
    b: int = 1
    tq: int = 37
    tk: int = 45
    h: int = 4
    hkv: int = 2
    d: int = 16
    q_offset: int = 8          # queries at positions q_offset + arange(tq)
    pad_q: int = 0             # leading query rows of batch 0 marked padding (rows see nothing)
    pad_k: int = 0             # trailing keys of the last batch marked padding
    q_gain: float = 2.0        # larger logits: sparser rows
    seed: int = 0


CASES = [
    Case("alpha1.5_causal_gqa2_ragged_padding", 1.5, b=2, pad_q=3, pad_k=5, seed=1),
    Case("sparsemax_bidirectional_gqa4_tq_below_block", 2.0, causal=False, tq=9, tk=50, hkv=1,
         pad_k=7, seed=2),
    Case("alpha1.25_causal_gqa1", 1.25, tq=30, tk=30, h=2, hkv=2, q_offset=0, seed=3),
    Case("alpha1.5_bidirectional_gqa16", 1.5, causal=False, tq=20, tk=27, h=16, hkv=1, seed=4),
]


def make_inputs(c: Case, dtype=jnp.float32):
    rng = np.random.default_rng(100 + c.seed)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    q = (normal(c.b, c.tq, c.h, c.d) * c.q_gain).astype(dtype)
    k, v = normal(c.b, c.tk, c.hkv, c.d).astype(dtype), normal(c.b, c.tk, c.hkv, c.d).astype(dtype)
    q_pos = np.broadcast_to(np.arange(c.tq) + c.q_offset, (c.b, c.tq)).copy()
    kv_pos = np.broadcast_to(np.arange(c.tk), (c.b, c.tk)).copy()
    q_pos[0, :c.pad_q] = -1
    if c.pad_k:
        kv_pos[-1, -c.pad_k:] = -1
    kw = dict(alpha=c.alpha, causal=c.causal, q_positions=jnp.asarray(q_pos), kv_positions=jnp.asarray(kv_pos))
    return (q, k, v), kw, normal(c.b, c.tq, c.h, c.d).astype(dtype)


def run(impl, qkv, kw, cot, config=None, interpret=True):
    """`(out, tau, (dq, dk, dv))` under one jit (interpret mode compiles once)."""
    def both(q, k, v, cot):
        def f(q, k, v):
            return entmax_attention(q, k, v, **kw, impl=impl, interpret=interpret, config=config,
                                    return_tau=True)
        (out, tau), vjp = jax.vjp(f, q, k, v)
        return out, tau, vjp((cot, jnp.zeros_like(tau)))
    return jax.jit(both)(*qkv, cot)


def run_forward(impl, qkv, kw, config=None):
    """`(out, tau)` under one jit, no backward (for checks that read only the forward)."""
    return jax.jit(lambda q, k, v: entmax_attention(q, k, v, **kw, impl=impl, interpret=True, config=config,
                                                    return_tau=True))(*qkv)


@pytest.mark.parametrize("case", [CASES[0]] + [pytest.param(c, marks=pytest.mark.slow) for c in CASES[1:]],
                         ids=lambda c: c.name)
def test_triton_interpret_matches_reference_fp32(case):
    qkv, kw, cot = make_inputs(case)
    out, tau, grads = run("triton", qkv, kw, cot, SMALL)
    r_out, r_tau, r_grads = run("xla", qkv, kw, cot)
    np.testing.assert_allclose(out, r_out, atol=2e-5, rtol=1e-4)
    assert np.array_equal(np.isinf(tau), np.isinf(r_tau)), "rows that see nothing: tau = inf"
    fin = np.isfinite(np.asarray(r_tau))
    np.testing.assert_allclose(np.asarray(tau)[fin], np.asarray(r_tau)[fin], atol=2e-5)
    empty = ~fin.transpose(0, 2, 1)                                        # [B, Tq, H]
    assert case.pad_q == 0 or empty.any()
    assert np.all(np.asarray(out)[empty] == 0)
    for name, g, r in zip(("dq", "dk", "dv"), grads, r_grads):
        assert np.all(np.isfinite(g)), name
        assert rel_err(g, r) < 1e-4, f"{name}: rel err {rel_err(g, r):.2e}"
    # the case is sparse (else it would not test the support's edges)
    p, vis = jax.jit(lambda q, k: R.entmax_probabilities(q, k, scale=case.d ** -0.5, **kw))(*qkv[:2])
    assert 0.2 < float(((p == 0) & vis[:, None]).sum() / vis.sum() / case.h) < 0.99


@pytest.mark.slow
@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=lambda c: c.name)
def test_triton_interpret_matches_reference_bf16(case):
    qkv, kw, cot = make_inputs(case, jnp.bfloat16)
    out, tau, grads = run("triton", qkv, kw, cot, SMALL)
    r_out, r_tau, r_grads = run("xla", qkv, kw, cot)
    assert out.dtype == jnp.bfloat16 and grads[0].dtype == jnp.bfloat16
    assert rel_err(out, r_out) < 1e-2
    fin = np.isfinite(np.asarray(r_tau))
    np.testing.assert_allclose(np.asarray(tau)[fin], np.asarray(r_tau)[fin], atol=1e-4)
    for name, g, r in zip(("dq", "dk", "dv"), grads, r_grads):
        assert rel_err(g, r) < 2e-2, f"{name}: rel err {rel_err(g, r):.2e}"


def structured(rng, b, t, h, d, num_topics=4, gain=4.0, dtype=jnp.float32):
    """Queries and keys in runs of orthogonal topics (a query of topic c aligns with the
    keys of topic c): each query tile's support sits in the few KV tiles of its topic, so
    whole tiles fall below the threshold (random N(0, 1) inputs never do that)."""
    topics = np.linalg.qr(rng.standard_normal((d, d)))[0][:num_topics] * gain
    runs = np.sort(rng.integers(0, num_topics, (b, t)), axis=1)       # locality: runs
    k = topics[runs][:, :, None] + 0.1 * rng.standard_normal((b, t, h, d))
    q = topics[runs][:, :, None] + 0.1 * rng.standard_normal((b, t, h, d))
    v = rng.standard_normal((b, t, h, d))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def test_block_skipping_triggers_on_structured_inputs_and_stays_exact():
    """On topic-structured keys most (query tile, KV tile) pairs are dead after the
    threshold (skipped by the output pass and the backward) and the result still equals
    the reference; on N(0, 1) inputs every visited tile stays live."""
    rng = np.random.default_rng(11)
    q, k, v = structured(rng, 1, 96, 2, 16)
    kw = dict(alpha=1.5, causal=False)
    cfg = dataclasses.replace(SMALL, stats_block_q=16, stats_block_k=16)
    st = T.Static(alpha=1.5, causal=False, scale=0.25, config=cfg, interpret=True)
    pos = jnp.arange(96)[None]
    live, lower_live = jax.jit(lambda q, k: T.tile_statistics(st, q, k, pos, pos))(q, k)
    assert float(live) <= 0.6 and float(lower_live) < 1.0
    # taller stats tiles keep each 16-row part's max: the same live tiles
    tall = dataclasses.replace(st, config=dataclasses.replace(cfg, stats_block_q=32))
    live_tall, lower_tall = jax.jit(lambda q, k: T.tile_statistics(tall, q, k, pos, pos))(q, k)
    assert float(live_tall) == float(live) and float(lower_tall) == float(lower_live)
    cot = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    out, tau, grads = run("triton", (q, k, v), {**kw, "scale": 0.25}, cot, cfg)
    r_out, r_tau, r_grads = run("xla", (q, k, v), {**kw, "scale": 0.25}, cot)
    np.testing.assert_allclose(out, r_out, atol=2e-5, rtol=1e-4)
    for g, r in zip(grads, r_grads):
        assert rel_err(g, r) < 1e-4
    # skipping dead tiles pass by pass changes no threshold
    _, tau_all = run_forward("triton", (q, k, v), {**kw, "scale": 0.25},
                             dataclasses.replace(cfg, recheck_tiles=False))
    np.testing.assert_allclose(tau, tau_all, atol=1e-6)
    qn, kn, _ = (jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in (q, k, v))
    live_n, _ = jax.jit(lambda q, k: T.tile_statistics(st, q, k, pos, pos))(qn, kn)
    assert float(live_n) == 1.0


@pytest.mark.parametrize("bad, match", [
    (dict(block_q=48), "block_q must be a power of two"),
    (dict(block_k=8), "block_k must be a power of two"),
    (dict(stats_block_q=32), "must be multiples of"),
    (dict(stats_num_warps=0), "stats_num_warps must be an int"),
    (dict(num_candidates=0), "num_candidates must be an int"),
    (dict(num_passes=0), "num_passes must be None or an int"),
    (dict(finish_passes=-1), "finish_passes must be None or an int"),
    (dict(recheck_tiles=2), "recheck_tiles must be a bool"),
])
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        EntmaxTritonConfig(**{"block_q": 64, **bad})


def test_compact_lists_full_tiles_first():
    """The kernels' tile lists: live tiles needing no element mask first, then the masked
    ones, each ascending; counts (full, all)."""
    live = jnp.array([[True, False, True, True, True, False]])
    full = jnp.array([[True, True, False, True, False, True]])
    idx, counts = T.compact(live, full)
    np.testing.assert_array_equal(idx[0, :4], [0, 3, 2, 4])
    np.testing.assert_array_equal(counts[0], [2, 4])


@pytest.mark.slow
def test_threshold_passes_trade_accuracy():
    """Fewer threshold passes than needed leave rows inexact (the renormalised output is
    then off); the default is exact on this case."""
    case = dataclasses.replace(CASES[1], tk=64, tq=16)
    qkv, kw, _ = make_inputs(case)
    ref = jax.jit(lambda q, k, v: entmax_attention(q, k, v, **kw, impl="xla"))(*qkv)
    fn = jax.jit(lambda q, k, v, cfg: entmax_attention(q, k, v, **kw, impl="triton", interpret=True,
                                                       config=cfg), static_argnums=3)
    one = fn(*qkv, dataclasses.replace(SMALL, num_passes=1, finish_passes=0, num_candidates=1))
    default = fn(*qkv, SMALL)
    np.testing.assert_allclose(default, ref, atol=2e-5)
    assert float(jnp.abs(one - ref).max()) > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_triton_compiled_on_gpu(case):
    """The real kernels. float32 dots run as TF32 in Triton: the support's edge moves with
    the scores, so tolerances are TF32-sized; bf16 on a larger ragged shape."""
    with jax.default_device(jax.devices("gpu")[0]):
        qkv, kw, cot = make_inputs(case)
        out, tau, grads = run("triton", qkv, kw, cot, interpret=False)
        with jax.default_matmul_precision("highest"):
            r_out, r_tau, r_grads = run("xla", qkv, kw, cot)
        assert rel_err(out, r_out) < 5e-3
        fin = np.isfinite(np.asarray(r_tau))
        assert np.array_equal(np.isfinite(np.asarray(tau)), fin)
        for g, r in zip(grads, r_grads):
            assert np.all(np.isfinite(g)) and rel_err(g, r) < 2e-2
        c = dataclasses.replace(case, tq=300, tk=300 if case.causal else 333, d=64)
        qkv, kw, cot = make_inputs(c, jnp.bfloat16)
        out, tau, grads = run("triton", qkv, kw, cot, interpret=False)
        r_out, r_tau, r_grads = run("xla", qkv, kw, cot)
        assert rel_err(out, r_out) < 2e-2
        for g, r in zip(grads, r_grads):
            assert np.all(np.isfinite(np.asarray(g, np.float32))) and rel_err(g, r) < 5e-2


# ----------------------------------------------------------------------------- Mosaic GPU stats


@functools.partial(jax.jit, static_argnames=("causal", "zscale", "bq", "bk"))
def stats_reference(q, k, q_pos, kv_pos, *, causal, zscale, bq, bk):
    """Plain jnp `(m, n, tmax)`: row max of `z = zscale q.k` over the visible keys (`NEG` if
    none), visible count, and the max of each `(bq, bk)` tile (lengths padded with `NEG`)."""
    group = q.shape[2] // k.shape[2]
    kf = jnp.repeat(k.astype(jnp.float32), group, axis=2)
    z = zscale * jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kf,
                            precision=jax.lax.Precision.HIGHEST)
    qp, kp = jnp.asarray(q_pos)[:, None, :, None], jnp.asarray(kv_pos)[:, None, None, :]
    vis = jnp.broadcast_to((qp >= 0) & (kp >= 0) & ((kp <= qp) if causal else True), z.shape)
    zm = jnp.where(vis, z, T.NEG)
    tq_p, tk_p = -(-z.shape[2] // bq) * bq, -(-z.shape[3] // bk) * bk
    tiles = jnp.pad(zm, ((0, 0), (0, 0), (0, tq_p - z.shape[2]), (0, tk_p - z.shape[3])),
                    constant_values=T.NEG)
    b, h = z.shape[:2]
    tmax = tiles.reshape(b, h, tq_p // bq, bq, tk_p // bk, bk).max((3, 5))
    return zm.max(-1), vis.sum(-1).astype(jnp.float32), tmax


def run_stats_impl(case: Case, impl: str, cfg: EntmaxTritonConfig, dtype=jnp.bfloat16):
    """`T.run_stats` through `pad_inputs` with `stats_impl=impl` in interpret mode (Mosaic
    GPU: its GPU interpret mode), and the case's inputs and tiles."""
    (q, k, v), kw, _ = make_inputs(case, dtype)
    st = T.Static(alpha=case.alpha, causal=case.causal, scale=case.d ** -0.5,
                  config=dataclasses.replace(cfg, stats_impl=impl), interpret=True)
    bq, bk = T.tiles(st, case.tq, case.tk)

    def f(q, k, v, q_pos, kv_pos):
        chosen, qp, kp, _, q_pos_p, kv_pos_p = T.pad_inputs(st, q, k, v, q_pos, kv_pos)
        return T.run_stats(st, chosen, qp, kp, q_pos_p, kv_pos_p, bq, bk)

    return jax.jit(f)(q, k, v, kw["q_positions"], kw["kv_positions"]), (q, k, kw, st, bq, bk)


STATS_CASES = [   # bf16, D = 64 (the Mosaic kernel's dtypes and head dims)
    (Case("causal_gqa2_ragged_padding", 1.5, b=2, tq=37, tk=45, d=64, pad_q=3, pad_k=5, seed=5),
     EntmaxTritonConfig()),                        # 64x64 tiles, two per 128-key Mosaic tile
    (Case("bidirectional_gqa4_tq_below_tile", 2.0, causal=False, tq=9, tk=150, hkv=1, d=64,
          pad_k=7, seed=6),
     dataclasses.replace(SMALL, stats_mosaic_block_k=64)),   # 16x16 tiles: 4x4 parts a tile
    (Case("causal_gqa1_ring_wraps_128_tiles", 1.5, tq=300, tk=300, h=2, hkv=2, d=64, q_offset=0,
          seed=7),
     EntmaxTritonConfig(block_q=128, block_k=128, stats_block_q=128, stats_block_k=128,
                        stats_mosaic_block_k=64, stats_mosaic_stages=2)),   # tiles of 2x2 maxima
    (Case("causal_gqa2_tmax_rows_fill", 1.5, tq=1100, tk=1100, h=2, hkv=1, d=64, seed=8),
     EntmaxTritonConfig(block_q=32, block_k=16, stats_block_q=32, stats_block_k=16,
                        stats_mosaic_block_k=64)),   # 2 x 4 parts a tile: 18 tiles fill 64 entries
]


@needs_gpu_interpret_pool
@pytest.mark.parametrize("case,cfg", STATS_CASES, ids=lambda x: getattr(x, "name", ""))
def test_mosaic_gpu_stats_match_a_plain_computation(case, cfg):
    """The Mosaic GPU stats kernel in GPU interpret mode: m, n and the tile maxima equal a
    plain jnp computation on the case's tiles (causal and not, GQA, ragged lengths, padding
    positions, Tq below a tile); the tiles of its extra padding are NEG, `full` matches the
    tiles' visibility."""
    (m, n, tmax, full), (q, k, kw, st, bq, bk) = run_stats_impl(case, "mosaic_gpu", cfg)
    r_m, r_n, r_tmax = stats_reference(q, k, kw["q_positions"], kw["kv_positions"],
                                       causal=case.causal, zscale=st.zscale, bq=bq, bk=bk)
    assert m.shape[2] % 128 == 0 and tmax.shape[2] == m.shape[2] // bq   # padded to its CTAs
    np.testing.assert_allclose(m[:, :, :case.tq], r_m, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(n[:, :, :case.tq], r_n)
    assert np.all(np.asarray(m[:, :, case.tq:]) == T.NEG) and np.all(np.asarray(n[:, :, case.tq:]) == 0)
    nq, nk = r_tmax.shape[2:]
    np.testing.assert_allclose(tmax[:, :, :nq, :nk], r_tmax, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(tmax[:, :, nq:]) == T.NEG) and np.all(np.asarray(tmax[:, :, :, nk:]) == T.NEG)
    assert (np.asarray(r_tmax) > T.NEG / 2).any()
    assert np.asarray(full).shape == tmax.shape[:1] + tmax.shape[2:]


@needs_gpu_interpret_pool
def test_mosaic_gpu_stats_equal_the_triton_stats():
    """Same `(m, n, tmax, full)` as the Triton stats kernel (interpret modes), on the Triton
    kernel's (smaller) padded shapes; the Mosaic kernel's extra padding tiles are NEG."""
    case, cfg = STATS_CASES[0]
    tri, _ = run_stats_impl(case, "triton", cfg)
    mos, _ = run_stats_impl(case, "mosaic_gpu", cfg)
    for name, a, b in zip(("m", "n", "tmax", "full"), tri, mos):
        sl = tuple(slice(0, s) for s in a.shape)
        np.testing.assert_allclose(np.asarray(b)[sl], np.asarray(a), rtol=1e-5, atol=1e-5, err_msg=name)


@needs_gpu_interpret_pool
def test_mosaic_gpu_stats_end_to_end_bf16():
    """`entmax_attention` forward and gradients with the Mosaic GPU stats (GPU interpret
    mode; the other kernels in Triton's interpreter) against the XLA reference. bf16 (the
    Mosaic kernel takes bf16 / f16 only), so bf16 tolerances; and the same as with the
    Triton stats, up to the dots' summation order."""
    case = dataclasses.replace(CASES[0], d=64, seed=8)
    qkv, kw, cot = make_inputs(case, jnp.bfloat16)
    cfg = dataclasses.replace(SMALL, stats_mosaic_block_k=64, stats_impl="mosaic_gpu")
    out, tau, grads = run("triton", qkv, kw, cot, cfg)
    r_out, r_tau, r_grads = run("xla", qkv, kw, cot)
    assert out.dtype == jnp.bfloat16 and rel_err(out, r_out) < 1e-2
    fin = np.isfinite(np.asarray(r_tau))
    assert np.array_equal(np.isfinite(np.asarray(tau)), fin)
    np.testing.assert_allclose(np.asarray(tau)[fin], np.asarray(r_tau)[fin], atol=1e-4)
    for name, g, r in zip(("dq", "dk", "dv"), grads, r_grads):
        assert rel_err(g, r) < 2e-2, f"{name}: rel err {rel_err(g, r):.2e}"
    t_out, t_tau = run_forward("triton", qkv, kw, dataclasses.replace(cfg, stats_impl="triton"))
    np.testing.assert_allclose(np.asarray(tau)[fin], np.asarray(t_tau)[fin], atol=1e-5)
    assert rel_err(out, t_out) < 2e-3


def test_stats_impl_choice_and_refusals(monkeypatch):
    """"auto" takes Triton in interpret mode and off Hopper, Mosaic GPU on Hopper where it
    applies; "mosaic_gpu" refuses f32 and odd head dims with a ValueError naming the reason;
    bad knobs are refused."""
    from pallas_kernels import common

    st = lambda impl, interpret=False: T.Static(alpha=1.5, causal=True, scale=1.0, interpret=interpret,  # noqa: E731
                                                config=EntmaxTritonConfig(stats_impl=impl))
    args = (jnp.bfloat16, 1024, 1024, 128, 64, 64)
    assert T.stats_impl(st("auto", True), *args) == "triton"
    monkeypatch.setattr(common, "current_device", lambda: common.Device("gpu", "8.0"))
    assert T.stats_impl(st("auto"), *args) == "triton"
    monkeypatch.setattr(common, "current_device", lambda: common.Device("gpu", "9.0"))
    assert T.stats_impl(st("auto"), *args) == "mosaic_gpu"
    assert T.stats_impl(st("auto"), jnp.float32, *args[1:]) == "triton"
    assert T.stats_impl(st("triton"), *args) == "triton"
    with pytest.raises(ValueError, match="dtype float32"):
        T.stats_impl(st("mosaic_gpu"), jnp.float32, *args[1:])
    with pytest.raises(ValueError, match="head dim 32"):
        T.stats_impl(st("mosaic_gpu"), jnp.bfloat16, 1024, 1024, 32, 64, 64)
    for bad, match in ((dict(stats_impl="cuda"), "stats_impl must be one of"),
                       (dict(stats_mosaic_block_k=256), "stats_mosaic_block_k must be 64 or 128"),
                       (dict(stats_mosaic_stages=1), "stats_mosaic_stages must be an int >= 2")):
        with pytest.raises(ValueError, match=match):
            EntmaxTritonConfig(**bad)


def test_mosaic_gpu_stats_lower_for_cuda_on_the_cpu():
    """The Mosaic GPU stats kernel lowers to Mosaic GPU for CUDA (no compile) at a realistic
    shape (D=128, GQA 4, ragged T, both KV tiles; one tmax part a tile, two column parts,
    4 x 4 parts)."""
    from gpu_testing import lower_for_cuda

    q = jnp.zeros((1, 1000, 16, 128), jnp.bfloat16)
    k = jnp.zeros((1, 1000, 4, 128), jnp.bfloat16)
    pos = jnp.arange(1000, dtype=jnp.int32)[None]
    for bk_m, bq, bk in ((64, 64, 64), (128, 64, 64), (128, 16, 32)):
        st = T.Static(alpha=1.5, causal=True, scale=128 ** -0.5, interpret=False,
                      config=EntmaxTritonConfig(stats_impl="mosaic_gpu", stats_mosaic_block_k=bk_m))

        def f(q, k, pos, bq=bq, bk=bk):
            impl, qp, kp, _, pp, kpp = T.pad_inputs(st, q, k, k, pos, pos)
            return T.run_stats(st, impl, qp, kp, pp, kpp, bq, bk)

        assert "entmax_stats_mosaic_gpu" in lower_for_cuda(f, q, k, pos).as_text()


@pytest.mark.gpu
@pytest.mark.skipif(hopper_device() is None, reason="needs a Hopper (sm_90) GPU")
@pytest.mark.parametrize("t", [1000, 4096])
@pytest.mark.parametrize("hkv", [16, 4])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_mosaic_gpu_stats_compiled_match_the_triton_stats(t, hkv, causal):
    """The compiled Mosaic GPU stats kernel against the compiled Triton one (bf16, D=128,
    H=16): the same m, n (exact), tmax (float32 summation order apart) and full."""
    with jax.default_device(hopper_device()):
        case = Case("gpu", 1.5, causal=causal, tq=t, tk=t, h=16, hkv=hkv, d=128, q_offset=0,
                    pad_k=37, q_gain=1.0, seed=t + hkv)
        tri, _ = run_stats_impl(case, "triton", EntmaxTritonConfig())
        st = T.Static(alpha=1.5, causal=causal, scale=128 ** -0.5, interpret=False,
                      config=EntmaxTritonConfig(stats_impl="mosaic_gpu"))
        (q, k, v), kw, _ = make_inputs(case, jnp.bfloat16)

        def f(q, k, v, q_pos, kv_pos):
            impl, qp, kp, _, pp, kpp = T.pad_inputs(st, q, k, v, q_pos, kv_pos)
            return T.run_stats(st, impl, qp, kp, pp, kpp, 64, 64)

        mos = jax.jit(f)(q, k, v, kw["q_positions"], kw["kv_positions"])
        for name, a, b in zip(("m", "n", "tmax", "full"), tri, mos):
            sl = tuple(slice(0, s) for s in a.shape)
            b = np.asarray(b)
            np.testing.assert_allclose(b[sl], np.asarray(a), rtol=1e-4, atol=1e-4, err_msg=name)
            rest = np.ones(b.shape, bool)
            rest[sl] = False
            if name in ("m", "tmax"):
                assert np.all(b[rest] == T.NEG), name
