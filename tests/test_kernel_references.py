"""The XLA references of `pallas_kernels.flash` and `pallas_kernels.block_sparse`.

They are the ground truth of every kernel, so they are checked here against a naive
attention written in this file from the definitions (KV heads repeated, float64 numpy
softmax; float64 jnp for gradients), on fresh random inputs.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse import BlockSparseMetadata, block_sparse_attention
from pallas_kernels.flash import flash_attention
from sparse_jax.patterns import (
    Causal, SameSegment, Sinks, SlidingWindow, block_metadata, causal_window,
    static_block_metadata)

B, H, D, DV = 2, 4, 8, 6

# ----------------------------------------------------------------------------- naive reference


def naive_attention(q, k, v, mask, *, scale, sink_logits=None, softcap=None):
    """float64 numpy attention. mask: `[B, Tq, Tk]` or `[B, Hkv, Tq, Tk]` (True = visible).

    Returns out `[B, Tq, H, Dv]`, probs `[B, H, Tq, Tk]` (sink in the denominator), lse
    `[B, H, Tq]` (-inf where nothing is visible and there is no sink).
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    h, hkv = q.shape[2], k.shape[2]
    g = h // hkv
    k = np.repeat(k, g, axis=2)          # head i reads kv head i // g
    v = np.repeat(v, g, axis=2)
    mask = np.asarray(mask)
    mask = mask[:, None] if mask.ndim == 3 else np.repeat(mask, g, axis=1)   # [B, H, Tq, Tk]
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    s = np.where(mask, s, -np.inf)
    cols = [s]
    if sink_logits is not None:
        sink = np.broadcast_to(np.asarray(sink_logits, np.float64)[None, :, None, None],
                               s.shape[:3] + (1,))
        cols.append(sink)
    allz = np.concatenate(cols, -1)
    m = allz.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(allz - m)
    denom = e.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        probs = np.where(denom > 0, e / denom, 0.0)[..., :s.shape[-1]]
        lse = np.where(denom[..., 0] > 0, m[..., 0] + np.log(denom[..., 0]), -np.inf)
    out = np.einsum("bhqk,bkhd->bqhd", probs, v)
    return out, probs, lse


def naive_block_max(probs, block, hkv=None):
    """`S[b, h, t, j] = max over keys i of block j of probs[b, h, t, i]` (tail block ragged)."""
    b, h, tq, tk = probs.shape
    nk = -(-tk // block)
    out = np.zeros((b, h, tq, nk))
    for j in range(nk):
        out[..., j] = probs[..., j * block:min((j + 1) * block, tk)].max(-1)
    if hkv is not None:
        g = h // hkv
        out = np.stack([out[:, i * g:(i + 1) * g].max(1) for i in range(hkv)], 1)
    return out


def naive_jnp_loss(q, k, v, sink_logits, cot, mask, *, scale, softcap=None):
    """float64 jnp version of naive_attention, for gradients: sum(out * cot)."""
    h, hkv = q.shape[2], k.shape[2]
    g = h // hkv
    k = jnp.repeat(k, g, axis=2)
    v = jnp.repeat(v, g, axis=2)
    mask = jnp.asarray(mask)[:, None]
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    m = jnp.max(jnp.where(mask, s, -jnp.inf), -1, keepdims=True)
    if sink_logits is not None:
        m = jnp.maximum(m, sink_logits[None, :, None, None])
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.where(mask, jnp.exp(jnp.where(mask, s, 0.0) - m), 0.0)
    denom = p.sum(-1, keepdims=True)
    if sink_logits is not None:
        denom = denom + jnp.exp(sink_logits[None, :, None, None] - m)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", p, v)
    return jnp.sum(out * cot)


# ----------------------------------------------------------------------------- masks (by hand)

# (mask_fn, numpy formula on broadcast positions / segments): the formulas are written here
# from the predicates' definitions, not taken from the library.
MASKS = {
    "none": (None, lambda q, k, qs, ks: np.ones(np.broadcast_shapes(q.shape, k.shape), bool)),
    "causal": (Causal(), lambda q, k, qs, ks: k <= q),
    "window3_sink2": (causal_window(3, num_sinks=2),
                      lambda q, k, qs, ks: (k <= q) & ((q - k < 3) | (k < 2))),
    "bidir_window": (SlidingWindow(3, 2), lambda q, k, qs, ks: (q - k < 3) & (k - q <= 2)),
    "causal_segments": (Causal() & SameSegment(), lambda q, k, qs, ks: (k <= q) & (qs == ks)),
}


def make_mask(kind, q_pos, kv_pos, q_seg=None, kv_seg=None):
    """`[B, Tq, Tk]`: the kind's formula, no padding, same segment whenever segment ids are
    given (whatever the kind)."""
    _, fn = MASKS[kind]
    q, k = q_pos[:, :, None], kv_pos[:, None, :]
    qs = None if q_seg is None else q_seg[:, :, None]
    ks = None if kv_seg is None else kv_seg[:, None, :]
    vis = fn(q, k, qs, ks) & (q >= 0) & (k >= 0)
    if q_seg is not None:
        vis = vis & (qs == ks)
    return np.broadcast_to(vis, (q_pos.shape[0], q_pos.shape[1], kv_pos.shape[1]))


def make_inputs(rng, tq, tk, hkv, *, dtype=np.float32, ragged=False, segments=False,
                sinks=False, dv=DV):
    q = rng.standard_normal((B, tq, H, D)).astype(dtype)
    k = rng.standard_normal((B, tk, hkv, D)).astype(dtype)
    v = rng.standard_normal((B, tk, hkv, dv)).astype(dtype)
    # Queries are the last tq positions of the tk keys (prefill when tq == tk, else a chunk).
    q_pos = np.tile(np.arange(tk - tq, tk, dtype=np.int32), (B, 1))
    kv_pos = np.tile(np.arange(tk, dtype=np.int32), (B, 1))
    if ragged:   # batch row 1 is shorter: trailing positions are padding (-1)
        lk = tk - 3
        kv_pos[1, lk:] = -1
        q_pos[1] = np.where(q_pos[1] < lk, q_pos[1], -1)
        q_pos[0, 0] = -1    # and one padded query in the middle of row 0's batch
    q_seg = kv_seg = None
    if segments:
        kv_seg = (np.arange(tk)[None] >= rng.integers(1, tk, (B, 1))).astype(np.int32)
        kv_seg += (np.arange(tk)[None] >= rng.integers(1, tk, (B, 1))).astype(np.int32)
        q_seg = np.ascontiguousarray(kv_seg[:, tk - tq:])
    sink_logits = rng.standard_normal(H).astype(np.float32) if sinks else None
    return dict(q=q, k=k, v=v, q_pos=q_pos, kv_pos=kv_pos, q_seg=q_seg, kv_seg=kv_seg,
                sink_logits=sink_logits)


def _kwargs(inp, kind):
    return dict(mask_fn=MASKS[kind][0], q_positions=inp["q_pos"], kv_positions=inp["kv_pos"],
                q_segment_ids=inp["q_seg"], kv_segment_ids=inp["kv_seg"],
                sink_logits=inp["sink_logits"])


# ----------------------------------------------------------------------------- flash forward

CASES = [  # (hkv, kind, ragged, segments, sinks, softcap, tq, tk)
    (4, "causal", False, False, False, None, 11, 11),
    (2, "causal", True, False, False, None, 11, 11),
    (1, "causal", True, False, True, None, 11, 11),
    (2, "window3_sink2", False, False, True, 2.0, 11, 11),
    (1, "window3_sink2", True, False, False, None, 5, 13),
    (4, "bidir_window", True, False, False, 1.5, 11, 11),
    (2, "none", False, True, False, None, 11, 11),
    (1, "none", True, False, True, None, 5, 13),
    (2, "causal_segments", True, True, True, 3.0, 11, 11),
    (4, "causal_segments", False, True, False, None, 5, 13),
]


@pytest.mark.parametrize("hkv,kind,ragged,segments,sinks,softcap,tq,tk", CASES)
def test_flash_matches_naive(hkv, kind, ragged, segments, sinks, softcap, tq, tk):
    rng = np.random.default_rng(zlib.crc32(repr((hkv, kind, ragged, segments, sinks, tq)).encode()))
    inp = make_inputs(rng, tq, tk, hkv, ragged=ragged, segments=segments, sinks=sinks)
    mask = make_mask(kind, inp["q_pos"], inp["kv_pos"], inp["q_seg"], inp["kv_seg"])
    scale = 0.7 if softcap else 1.0 / np.sqrt(D)
    out_ref, probs_ref, lse_ref = naive_attention(inp["q"], inp["k"], inp["v"], mask, scale=scale,
                                                  sink_logits=inp["sink_logits"], softcap=softcap)
    res = flash_attention(inp["q"], inp["k"], inp["v"], **_kwargs(inp, kind), softcap=softcap,
                          scale=scale if softcap else None, return_lse=True, impl="xla",
                          block_score_size=4)
    assert res.out.shape == (B, tq, H, DV) and res.out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(res.out), out_ref, rtol=2e-5, atol=2e-5)
    lse = np.asarray(res.lse)
    assert lse.shape == (B, H, tq) and res.lse.dtype == jnp.float32
    sees = mask.any(-1)[:, None].repeat(H, 1)          # [B, H, Tq]
    np.testing.assert_allclose(lse[sees], lse_ref[sees], rtol=2e-5, atol=2e-5)
    if inp["sink_logits"] is None:
        assert np.all(lse[~sees] == -np.inf)
    np.testing.assert_allclose(np.asarray(res.block_scores), naive_block_max(probs_ref, 4),
                               rtol=2e-5, atol=2e-6)
    # A fully masked row (padded query) is zeros, never NaN.
    if ragged:
        assert (~mask.any(-1)).any()
        assert np.all(np.asarray(res.out)[~mask.any(-1)] == 0)
    assert np.isfinite(np.asarray(res.out)).all()


@pytest.mark.parametrize("hkv", [1, 2, 4])
@pytest.mark.parametrize("block", [3, 4, 16])
def test_flash_block_scores_gqa_reduce(hkv, block):
    rng = np.random.default_rng(100 * hkv + block)
    inp = make_inputs(rng, 11, 11, hkv, ragged=True, sinks=True)
    mask = make_mask("causal", inp["q_pos"], inp["kv_pos"])
    _, probs, _ = naive_attention(inp["q"], inp["k"], inp["v"], mask, scale=D ** -0.5,
                                  sink_logits=inp["sink_logits"])
    kw = _kwargs(inp, "causal")
    per_head = flash_attention(inp["q"], inp["k"], inp["v"], **kw, block_score_size=block,
                               impl="xla")
    reduced = flash_attention(inp["q"], inp["k"], inp["v"], **kw, block_score_size=block,
                              block_score_reduce_gqa=True, impl="xla")
    nk = -(-11 // block)
    assert per_head.lse is None and per_head.block_scores.shape == (B, H, 11, nk)
    assert reduced.block_scores.shape == (B, hkv, 11, nk)
    np.testing.assert_allclose(np.asarray(per_head.block_scores), naive_block_max(probs, block),
                               rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(reduced.block_scores),
                               naive_block_max(probs, block, hkv=hkv), rtol=2e-5, atol=2e-6)


def test_flash_plain_output_defaults_and_bf16():
    rng = np.random.default_rng(0)
    inp = make_inputs(rng, 9, 9, 2)
    out = flash_attention(inp["q"], inp["k"], inp["v"], mask_fn=Causal(), impl="xla")
    assert isinstance(out, jax.Array)            # neither lse nor scores asked: a bare array
    mask = make_mask("causal", inp["q_pos"], inp["kv_pos"])
    ref, _, _ = naive_attention(inp["q"], inp["k"], inp["v"], mask, scale=D ** -0.5)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-5, atol=2e-5)
    # "auto" on CPU is the reference; default positions are arange.
    auto = flash_attention(inp["q"], inp["k"], inp["v"], mask_fn=Causal(),
                           q_positions=inp["q_pos"], kv_positions=inp["kv_pos"])
    np.testing.assert_allclose(np.asarray(auto), np.asarray(out), rtol=1e-6, atol=1e-6)
    # bf16 in, bf16 out, close to the float64 reference at bf16 precision.
    qb, kb, vb = (jnp.asarray(inp[n], jnp.bfloat16) for n in "qkv")
    outb = flash_attention(qb, kb, vb, mask_fn=Causal(), impl="xla")
    assert outb.dtype == jnp.bfloat16
    refb, _, _ = naive_attention(*(np.asarray(x.astype(jnp.float32)) for x in (qb, kb, vb)), mask,
                                 scale=D ** -0.5)
    np.testing.assert_allclose(np.asarray(outb.astype(jnp.float32)), refb, rtol=2e-2, atol=2e-2)


def test_fully_masked_rows_zero_with_and_without_sinks():
    rng = np.random.default_rng(1)
    inp = make_inputs(rng, 6, 6, 2, sinks=True)
    # Window of 1 (the key at the query's own position) but the keys sit 100 positions
    # later: no query sees any key.
    kv_pos = inp["kv_pos"] + 100
    for sinks in (None, inp["sink_logits"]):
        res = flash_attention(inp["q"], inp["k"], inp["v"], mask_fn=SlidingWindow(1),
                              kv_positions=kv_pos, sink_logits=sinks, return_lse=True,
                              block_score_size=2, impl="xla")
        assert np.all(np.asarray(res.out) == 0)
        assert np.all(np.asarray(res.block_scores) == 0)
        if sinks is None:
            assert np.all(np.asarray(res.lse) == -np.inf)
        assert not np.isnan(np.asarray(res.lse)).any()


# ----------------------------------------------------------------------------- gradients


def _flash_loss(q, k, v, sink_logits, cot, inp, kind, softcap):
    kw = _kwargs(inp, kind) | dict(sink_logits=sink_logits)
    out = flash_attention(q, k, v, **kw, softcap=softcap, impl="xla")
    return jnp.sum(out * cot)


@pytest.mark.parametrize("hkv,kind,ragged,segments,sinks,softcap", [
    (4, "causal", True, False, False, None),
    (2, "window3_sink2", True, False, True, 2.0),
    (1, "causal_segments", True, True, True, None),
    (2, "none", False, True, False, 1.0),
])
def test_flash_gradients_match_float64_naive(hkv, kind, ragged, segments, sinks, softcap):
    rng = np.random.default_rng(7 * hkv + len(kind))
    tq = tk = 10
    inp = make_inputs(rng, tq, tk, hkv, ragged=ragged, segments=segments, sinks=True)
    sink = inp["sink_logits"] if sinks else None
    cot = rng.standard_normal((B, tq, H, DV)).astype(np.float32)
    argnums = (0, 1, 2, 3) if sinks else (0, 1, 2)
    grads = jax.grad(_flash_loss, argnums=argnums)(
        jnp.asarray(inp["q"]), jnp.asarray(inp["k"]), jnp.asarray(inp["v"]),
        None if sink is None else jnp.asarray(sink), cot, inp, kind, softcap)
    mask = make_mask(kind, inp["q_pos"], inp["kv_pos"], inp["q_seg"], inp["kv_seg"])
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x, np.float64)) for x in (inp["q"], inp["k"], inp["v"])]
        s64 = None if sink is None else jnp.asarray(np.asarray(sink, np.float64))
        ref = jax.grad(naive_jnp_loss, argnums=argnums)(
            *f64, s64, jnp.asarray(cot, jnp.float64), mask, scale=D ** -0.5, softcap=softcap)
        ref = [np.asarray(r) for r in ref]
    for name, g, r in zip("q k v sink".split(), grads, ref):
        g = np.asarray(g)
        assert np.isfinite(g).all(), name
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5, err_msg=name)
    # Padded queries see nothing: no gradient flows into them.
    dq = np.asarray(grads[0])
    assert np.all(dq[~mask.any(-1)] == 0)
    if ragged:
        assert (~mask.any(-1)).any()


def test_gradients_finite_when_every_row_is_masked():
    rng = np.random.default_rng(3)
    inp = make_inputs(rng, 6, 6, 2, sinks=True)
    kv_pos = np.full_like(inp["kv_pos"], -1)   # every key is padding

    def loss(q, k, v, s):
        return jnp.sum(flash_attention(q, k, v, mask_fn=Causal(), kv_positions=kv_pos,
                                       sink_logits=s, impl="xla") ** 2)

    for sinks in (None, jnp.asarray(inp["sink_logits"])):
        argnums = (0, 1, 2) if sinks is None else (0, 1, 2, 3)
        grads = jax.grad(loss, argnums=argnums)(*(jnp.asarray(inp[n]) for n in "qkv"), sinks)
        for g in grads:
            assert np.isfinite(np.asarray(g)).all()
            assert np.all(np.asarray(g) == 0)


# ----------------------------------------------------------------------------- block sparse


@pytest.mark.parametrize("hkv,kind,ragged,segments,sinks,softcap,tq,tk,bq,bkv", [
    (2, "causal", True, False, False, None, 11, 11, 4, 3),
    (1, "window3_sink2", True, False, True, 2.0, 5, 13, 2, 4),
    (4, "causal_segments", True, True, True, None, 11, 11, 3, 5),
    (2, "bidir_window", False, False, False, None, 11, 11, 8, 2),
])
def test_block_sparse_with_pattern_metadata_equals_flash(hkv, kind, ragged, segments, sinks,
                                                         softcap, tq, tk, bq, bkv):
    rng = np.random.default_rng(tq * tk + bq * bkv + hkv)
    inp = make_inputs(rng, tq, tk, hkv, ragged=ragged, segments=segments, sinks=sinks)
    pattern = MASKS[kind][0]
    meta = block_metadata(pattern, inp["q_pos"], inp["kv_pos"], bq, bkv,
                          q_segment_ids=inp["q_seg"], kv_segment_ids=inp["kv_seg"],
                          num_kv_heads=hkv)
    kw = _kwargs(inp, kind) | dict(softcap=softcap, return_lse=True, impl="xla")
    bs = block_sparse_attention(inp["q"], inp["k"], inp["v"], meta, **kw)
    fl = flash_attention(inp["q"], inp["k"], inp["v"], **kw)
    np.testing.assert_allclose(np.asarray(bs.out), np.asarray(fl.out), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(bs.lse) == -np.inf, np.asarray(fl.lse) == -np.inf)
    finite = np.isfinite(np.asarray(fl.lse))
    np.testing.assert_allclose(np.asarray(bs.lse)[finite], np.asarray(fl.lse)[finite], rtol=1e-6)
    mask = make_mask(kind, inp["q_pos"], inp["kv_pos"], inp["q_seg"], inp["kv_seg"])
    ref, _, _ = naive_attention(inp["q"], inp["k"], inp["v"], mask, scale=D ** -0.5,
                                sink_logits=inp["sink_logits"], softcap=softcap)
    np.testing.assert_allclose(np.asarray(bs.out), ref, rtol=2e-5, atol=2e-5)
    if not segments and not ragged:
        # Static metadata (batch dim 1, broadcast) gives the same result.
        smeta = static_block_metadata(pattern, tq, tk, bq, bkv)
        if tq == tk:
            out = block_sparse_attention(inp["q"], inp["k"], inp["v"], smeta, **kw).out
            np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-5, atol=2e-5)


def test_block_sparse_follows_listed_blocks_and_full_flags():
    """Per-kv-head block lists: listed & (full | mask_fn), padding never visible."""
    rng = np.random.default_rng(11)
    tq, tk, bq, bkv, hkv = 10, 14, 4, 3, 2
    nq, nk, mb = -(-tq // bq), -(-tk // bkv), 3
    inp = make_inputs(rng, tq, tk, hkv, ragged=True)
    idx = np.zeros((B, hkv, nq, mb), np.int32)
    cnt = np.zeros((B, hkv, nq), np.int32)
    full = np.zeros((B, hkv, nq, mb), bool)
    for b in range(B):
        for h in range(hkv):
            for i in range(nq):
                c = int(rng.integers(0, mb + 1))
                ids = np.sort(rng.choice(nk, c, replace=False))
                cnt[b, h, i] = c
                idx[b, h, i, :c] = ids
                idx[b, h, i, c:] = ids[-1] if c else 0
                full[b, h, i, :c] = rng.random(c) < 0.5
    meta = BlockSparseMetadata(jnp.asarray(idx), jnp.asarray(cnt), jnp.asarray(full), bq, bkv)
    qp, kp = inp["q_pos"], inp["kv_pos"]
    causal_mask = np.zeros((B, hkv, tq, tk), bool)
    listed_mask = np.zeros((B, hkv, tq, tk), bool)   # mask_fn=None: partial = all visible
    for b, h, t, s in np.ndindex(causal_mask.shape):
        i, j = t // bq, s // bkv
        slots = [x for x in range(cnt[b, h, i]) if idx[b, h, i, x] == j]
        if not slots or qp[b, t] < 0 or kp[b, s] < 0:
            continue
        listed_mask[b, h, t, s] = True
        causal_mask[b, h, t, s] = bool(full[b, h, i, slots[0]]) or kp[b, s] <= qp[b, t]
    assert causal_mask.any() and not np.array_equal(causal_mask, listed_mask)
    assert not np.array_equal(causal_mask[:, 0], causal_mask[:, 1])   # heads differ
    for mask_fn, mask in ((Causal(), causal_mask), (None, listed_mask)):
        res = block_sparse_attention(inp["q"], inp["k"], inp["v"], meta, mask_fn=mask_fn,
                                     q_positions=qp, kv_positions=kp, return_lse=True, impl="xla")
        ref, _, lse = naive_attention(inp["q"], inp["k"], inp["v"], mask, scale=D ** -0.5)
        np.testing.assert_allclose(np.asarray(res.out), ref, rtol=2e-5, atol=2e-5)
        sees = np.repeat(mask.any(-1), H // hkv, axis=1)
        np.testing.assert_allclose(np.asarray(res.lse)[sees], lse[sees], rtol=2e-5)
        assert np.all(np.asarray(res.lse)[~sees] == -np.inf)


def test_block_sparse_gradients_match_flash():
    rng = np.random.default_rng(5)
    inp = make_inputs(rng, 12, 12, 2, ragged=True, sinks=True)
    pattern = causal_window(4, num_sinks=1)
    meta = block_metadata(pattern, inp["q_pos"], inp["kv_pos"], 4, 4, num_kv_heads=2)
    cot = jnp.asarray(rng.standard_normal((B, 12, H, DV)), jnp.float32)
    kw = dict(mask_fn=pattern, q_positions=inp["q_pos"], kv_positions=inp["kv_pos"], impl="xla")

    def loss_bs(q, k, v, s):
        return jnp.sum(block_sparse_attention(q, k, v, meta, sink_logits=s, **kw) * cot)

    def loss_fl(q, k, v, s):
        return jnp.sum(flash_attention(q, k, v, sink_logits=s, **kw) * cot)

    args = [jnp.asarray(inp[n]) for n in "qkv"] + [jnp.asarray(inp["sink_logits"])]
    g_bs = jax.grad(loss_bs, argnums=(0, 1, 2, 3))(*args)
    g_fl = jax.grad(loss_fl, argnums=(0, 1, 2, 3))(*args)
    for a, b in zip(g_bs, g_fl):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- bad inputs


def _qkv(h=4, hkv=2, d=8, dk=None, dtype=jnp.float32, kdtype=None, tk=6):
    q = jnp.zeros((B, 5, h, d), dtype)
    k = jnp.zeros((B, tk, hkv, dk or d), kdtype or dtype)
    v = jnp.zeros((B, tk, hkv, d), kdtype or dtype)
    return q, k, v


BAD = [
    ("heads", dict(qkv=dict(h=3, hkv=2)), "num_heads"),
    ("head_dim", dict(qkv=dict(dk=6)), "head_dim"),
    ("dtype", dict(qkv=dict(kdtype=jnp.bfloat16)), "dtype"),
    ("int_dtype", dict(qkv=dict(dtype=jnp.int32)), "floating"),
    ("q_positions_shape", dict(kw=dict(q_positions=np.zeros((B, 6), np.int32))), "q_positions"),
    ("q_positions_1d", dict(kw=dict(q_positions=np.arange(5, dtype=np.int32))), "q_positions"),
    ("kv_positions_float", dict(kw=dict(kv_positions=np.zeros((B, 6), np.float32))), "kv_positions"),
    ("impl", dict(kw=dict(impl="cuda")), "impl"),
    ("sink_shape", dict(kw=dict(sink_logits=np.zeros(2, np.float32))), "sink_logits"),
    ("softcap", dict(kw=dict(softcap=0.0)), "softcap"),
    ("one_segment", dict(kw=dict(q_segment_ids=np.zeros((B, 5), np.int32))), "segment"),
    ("segment_pattern", dict(kw=dict(mask_fn=SameSegment())), "segment"),
    ("segment_shape", dict(kw=dict(q_segment_ids=np.zeros((B, 4), np.int32),
                                   kv_segment_ids=np.zeros((B, 6), np.int32))), "q_segment_ids"),
]


@pytest.mark.parametrize("op", ["flash", "block_sparse"])
@pytest.mark.parametrize("name,case,match", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise(op, name, case, match):
    q, k, v = _qkv(**case.get("qkv", {}))
    kw = case.get("kw", {})
    if op == "flash":
        call = lambda: flash_attention(q, k, v, **kw)
    else:
        meta = static_block_metadata(Causal(), 5, 6, 2, 2, num_kv_heads=1)
        call = lambda: block_sparse_attention(q, k, v, meta, **kw)
    with pytest.raises(ValueError, match=match):
        call()


def test_flash_only_options_raise():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="block_score_size"):
        flash_attention(q, k, v, block_score_size=0)
    q2, k2, v2 = _qkv()
    with pytest.raises(ValueError):   # k and v sequence lengths differ
        flash_attention(q2, k2, v2[:, :4])


def test_block_sparse_bad_metadata_raises():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="metadata"):
        block_sparse_attention(q, k, v, {"kv_block_indices": None})
    wrong_nq = static_block_metadata(Causal(), 9, 6, 2, 2)    # 5 query blocks, q needs 3
    with pytest.raises(ValueError, match="query blocks"):
        block_sparse_attention(q, k, v, wrong_nq)
    wrong_heads = static_block_metadata(Causal(), 5, 6, 2, 2, num_kv_heads=3)
    with pytest.raises(ValueError, match="kv-head"):
        block_sparse_attention(q, k, v, wrong_heads)
    ok = static_block_metadata(Causal(), 5, 6, 2, 2)
    bad_full = BlockSparseMetadata(ok.kv_block_indices, ok.kv_block_counts,
                                   ok.kv_block_full.astype(np.int32), 2, 2)
    with pytest.raises(ValueError, match="kv_block_full"):
        block_sparse_attention(q, k, v, bad_full)


def test_segment_ids_apply_whatever_the_mask_fn():
    """Segment ids given with a predicate that does not read them still cut attention at
    segment boundaries, in flash, in block_sparse and in the block metadata."""
    from sparse_jax import patterns as P

    rng = np.random.default_rng(7)
    b, t, h, d = 2, 21, 2, 8
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) for _ in range(3))
    seg = jnp.asarray(np.sort(rng.integers(0, 3, (b, t)), axis=1), jnp.int32)
    got = flash_attention(q, k, v, mask_fn=P.Causal(), q_segment_ids=seg, kv_segment_ids=seg, impl="xla")
    want = flash_attention(q, k, v, mask_fn=P.Causal() & P.SameSegment(), q_segment_ids=seg,
                           kv_segment_ids=seg, impl="xla")
    np.testing.assert_allclose(got, want, atol=1e-6)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    meta = P.block_metadata(P.Causal(), pos, pos, 4, 4, q_segment_ids=seg, kv_segment_ids=seg)
    dense = P.dense_mask(P.Causal(), pos, pos, seg, seg)
    assert not bool((dense & (seg[:, :, None] != seg[:, None, :])).any())
    sparse = block_sparse_attention(q, k, v, meta, mask_fn=P.Causal(), q_segment_ids=seg,
                                    kv_segment_ids=seg, impl="xla")
    np.testing.assert_allclose(sparse, want, atol=1e-6)
