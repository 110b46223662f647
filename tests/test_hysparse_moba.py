"""HySparse (full + sparse layers, shared KV and block selection) and MoBA."""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels.block_sparse import block_sparse_attention
from pallas_kernels.common import masked_attention
from pallas_kernels.flash import flash_attention
from sparse_jax import patterns as P
from sparse_jax.cache.hysparse import HySparseSparseCache
from sparse_jax.layers.attention import AttentionConfig, FullAttention
from sparse_jax.layers.hysparse import HySparseConfig, HySparseFullAttention, HySparseSparseAttention
from sparse_jax.layers.moba import MoBAAttention
from sparse_jax.models.lm import LMConfig, SparseLM
from sparse_jax.ops import hysparse as hops
from sparse_jax.ops import moba as mops
from sparse_jax.ops import selection as sel
from sparse_jax.ops.rope import apply_rope
from gpu_testing import has_gpu

CFG = AttentionConfig(d_model=32, num_heads=4, num_kv_heads=2, impl="xla")


def _inputs(b=2, t=24, d=32, seed=0):
    x = jax.random.normal(jax.random.key(seed), (b, t, d))
    return x, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def _q(layer, x, pos):
    q = jnp.einsum("btd,dhk->bthk", x, layer.wq[...])
    return apply_rope(q, pos, layer.config.rope_theta)


def test_sparse_layer_with_all_blocks_and_full_window_equals_full_attention():
    t = 24
    hs = HySparseConfig(block_size=8, top_k_tokens=32, window=32)            # k >= T, w >= T
    full = HySparseFullAttention(CFG, hs, rngs=nnx.Rngs(0))
    sp = HySparseSparseAttention(CFG, hs, rngs=nnx.Rngs(1))
    sp.sink_sparse[...] = jnp.array([0.5, -1.0, 0.0, 2.0])
    sp.sink_swa[...] = jnp.array([-0.3, 1.0, 0.2, 0.0])
    x, pos = _inputs(t=t)
    y_full, none, shared = full.forward(x, pos)
    assert none is None and shared.block_indices.shape == (2, t, 2, 3)
    np.testing.assert_allclose(full(x, pos)[0], y_full, atol=1e-6)
    o_sparse, o_swa, gates, _ = sp.branches(x, pos, shared=shared)
    q = _q(sp, x, pos)
    ref_sparse = flash_attention(q, shared.k, shared.v, mask_fn=P.Causal(), q_positions=pos,
                                 kv_positions=shared.kv_positions, sink_logits=sp.sink_sparse[...], impl="xla")
    np.testing.assert_allclose(o_sparse, ref_sparse, atol=1e-5, rtol=1e-5)
    k = apply_rope(jnp.einsum("btd,dhk->bthk", x, sp.wk_swa[...]), pos, CFG.rope_theta)
    v = jnp.einsum("btd,dhk->bthk", x, sp.wv_swa[...])
    ref_swa = flash_attention(q, k, v, mask_fn=P.Causal(), q_positions=pos, kv_positions=pos,
                              sink_logits=sp.sink_swa[...], impl="xla")
    np.testing.assert_allclose(o_swa, ref_swa, atol=1e-5, rtol=1e-5)
    y, _ = sp(x, pos, shared=shared)
    o = gates[..., :1] * ref_sparse + gates[..., 1:] * ref_swa
    np.testing.assert_allclose(y, jnp.einsum("bthk,hkd->btd", o, sp.wo[...]), atol=1e-5, rtol=1e-5)


def test_sparse_branch_matches_dense_block_mask_reference():
    b, t, bs = 2, 40, 8
    hs = HySparseConfig(block_size=bs, top_k_tokens=16, window=8)
    full = HySparseFullAttention(CFG, hs, rngs=nnx.Rngs(0))
    sp = HySparseSparseAttention(CFG, hs, rngs=nnx.Rngs(1))
    x, pos = _inputs(b, t)
    _, _, shared = full.forward(x, pos)
    idx = shared.block_indices
    # per token: <= 2 blocks, all causal-visible, ascending, -1 only at the end
    assert idx.shape == (b, t, 2, 2)
    assert bool(jnp.all((idx == -1) | (idx * bs <= pos[:, :, None, None])))
    assert bool(jnp.all(idx[:, 8:] >= 0)) and bool(jnp.all(idx[:, :8, :, 1] == -1))
    o_sparse, _, _, _ = sp.branches(x, pos, shared=shared)
    mask = sel.selected_block_dense_mask(pos, shared.kv_positions, idx, bs)
    ref, _, _ = masked_attention(_q(sp, x, pos), shared.k, shared.v, mask, scale=CFG.head_dim ** -0.5,
                                 sink_logits=sp.sink_sparse[...])
    np.testing.assert_allclose(o_sparse, ref, atol=1e-5, rtol=1e-5)


def test_block_indices_from_kernel_equal_reference_scores():
    b, t, h, hkv, d, bs = 1, 64, 4, 2, 16, 16
    kq, kk, kv = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(kq, (b, t, h, d))
    k = jax.random.normal(kk, (b, t, hkv, d))
    v = jax.random.normal(kv, (b, t, hkv, d))
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    kw = dict(block_size=bs, top_k_blocks=2)
    out_x, idx_x = hops.hysparse_full_attention(q, k, v, pos, pos, impl="xla", **kw)
    out_k, idx_k = hops.hysparse_full_attention(q, k, v, pos, pos, impl="triton", interpret=True, **kw)
    np.testing.assert_array_equal(idx_k, idx_x)
    np.testing.assert_allclose(out_k, out_x, atol=1e-4, rtol=1e-4)
    # and the reference indices are the top-2 of max_{i in block, head in group} softmax
    logits = np.einsum("bthd,bshd->bhts", np.asarray(q), np.repeat(np.asarray(k), h // hkv, 2)) / np.sqrt(d)
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    s = p.reshape(b, hkv, h // hkv, t, t // bs, bs).max((2, 5))
    for tq in range(t):
        nvis = tq // bs + 1
        want = sorted(np.argsort(-s[0, :, tq, :nvis], kind="stable", axis=-1)[:, :2].tolist()[0]) if nvis else []
        got = [i for i in np.asarray(idx_x[0, tq, 0]).tolist() if i >= 0]
        assert got == want, (tq, got, want)


def test_select_top_blocks_ties_go_to_lower_index():
    scores = jnp.array([[0.5, 0.5, 0.5, 0.9]])[None, None]                     # [B, Hkv, T, nK]
    vis = jnp.array([[True, True, True, False]])
    np.testing.assert_array_equal(sel.select_top_k(scores, vis, 2)[0, 0], [[0, 1]])
    np.testing.assert_array_equal(sel.select_top_k(scores, vis, 4)[0, 0], [[0, 1, 2, -1]])


def _lm(spec, **kw):
    return LMConfig(vocab_size=40, layer_spec=spec, d_model=32, num_heads=4, num_kv_heads=2,
                    hysparse=HySparseConfig(block_size=8, top_k_tokens=16, window=8), moba_block=8,
                    moba_top_k=1, impl="xla", **kw)


@pytest.mark.parametrize("spec,hs", [
    ("HYYHM", None),
    ("HYH", HySparseConfig(block_size=8, top_k_tokens=16, window=8, swa_shares_kv=True)),
    ("HYH", HySparseConfig(block_size=8, top_k_tokens=8, window=8, swa_branch=False)),
])
def test_decode_equals_prefill(spec, hs):
    cfg = _lm(spec)
    if hs is not None:
        cfg = LMConfig(**{**cfg.__dict__, "hysparse": hs})
    model = SparseLM(cfg, rngs=nnx.Rngs(0))
    b, t = 2, 30
    tokens = jax.random.randint(jax.random.key(0), (b, t), 0, 40)
    logits, _ = model(tokens)
    caches = model.init_cache(b, 40)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    step = jax.jit(lambda m, tok, p, c: m(tok, p, c))
    out, caches = step(model, tokens[:, :11], pos[:, :11], caches)
    outs = [out]
    for i in range(11, t):
        out, caches = step(model, tokens[:, i:i + 1], pos[:, i:i + 1], caches)
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), logits, atol=2e-4, rtol=2e-4)


def test_kv_bytes_sparse_layers_hold_only_the_window():
    model = SparseLM(_lm("HYY"), rngs=nnx.Rngs(0))
    caches = model.init_cache(1, 64)
    assert isinstance(caches[1], HySparseSparseCache)
    assert caches[1].nbytes() * 8 == caches[0].nbytes()                     # window 8 of 64 slots
    shared_cfg = HySparseConfig(block_size=8, top_k_tokens=16, window=8, swa_shares_kv=True)
    sp = HySparseSparseAttention(CFG, shared_cfg, rngs=nnx.Rngs(0))
    assert sp.init_cache(1, 64).nbytes() == 0


def test_moba_with_all_blocks_equals_causal_full_attention():
    x, pos = _inputs(t=30)
    moba = MoBAAttention(CFG, block_size=8, top_k=4, rngs=nnx.Rngs(0))
    full = FullAttention(CFG, rngs=nnx.Rngs(1))
    nnx.update(full, nnx.state(moba))
    np.testing.assert_allclose(moba(x, pos)[0], full(x, pos)[0], atol=1e-5, rtol=1e-5)


def test_moba_selection_is_own_block_plus_top_past_blocks():
    b, t, h, hkv, d, bs = 1, 32, 2, 1, 8, 8
    kq, kk = jax.random.split(jax.random.key(1))
    q = jax.random.normal(kq, (b, t, h, d))
    k = jax.random.normal(kk, (b, t, hkv, d))
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    idx = np.asarray(mops.moba_select(q, k, pos, pos, block_size=bs, top_k=1))
    kmean = np.asarray(k).reshape(b, t // bs, bs, hkv, d).mean(2)
    for tq in range(t):
        own = tq // bs
        got = [i for i in idx[0, tq, 0].tolist() if i >= 0]
        if own == 0:
            assert got == [0]
            continue
        s = np.einsum("hd,nd->n", np.asarray(q)[0, tq], kmean[0, :own, 0])
        assert got == sorted({int(np.argmax(s)), own})


def test_gradients_finite():
    model = SparseLM(_lm("HYM"), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 20), 0, 40)

    def loss(m):
        logits, _ = m(tokens)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    grads = nnx.grad(loss)(model)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert float(jnp.abs(grads.blocks[1].attn.sink_sparse[...]).sum()) > 0


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="top_k_tokens"):
        HySparseConfig(block_size=64, top_k_tokens=100)
    with pytest.raises(ValueError, match="swa_shares_kv"):
        HySparseConfig(swa_branch=False, swa_shares_kv=True)
    with pytest.raises(ValueError, match="window"):
        HySparseConfig(window=0)
    with pytest.raises(ValueError, match="query_block"):
        HySparseConfig(query_block=0)
    with pytest.raises(ValueError, match="query_block"):
        MoBAAttention(CFG, query_block=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="'Y'"):
        _lm("YH")
    with pytest.raises(ValueError, match="top_k"):
        MoBAAttention(CFG, top_k=-1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="block_size"):
        MoBAAttention(CFG, block_size=0, rngs=nnx.Rngs(0))
    sp = HySparseSparseAttention(CFG, HySparseConfig(block_size=8, top_k_tokens=8), rngs=nnx.Rngs(0))
    x, pos = _inputs()
    with pytest.raises(ValueError, match="shared"):
        sp(x, pos)
    with pytest.raises(ValueError, match="hysparse"):
        HySparseFullAttention(CFG, hysparse="bad", rngs=nnx.Rngs(0))


def _union_mask(idx, bs, qb, pos, kv_pos, tk):
    """Dense reference of the query-block union: token t sees every block listed by any
    token of its query block, causally."""
    b, tq, hkv, k = idx.shape
    per_tok = np.zeros((b, hkv, tq, -(-tk // bs)), bool)
    for bi, ti, hi, ki in zip(*np.nonzero(np.asarray(idx) >= 0)):
        per_tok[bi, hi, ti, idx[bi, ti, hi, ki]] = True
    union = np.zeros_like(per_tok)
    for t0 in range(0, tq, qb):
        union[:, :, t0:t0 + qb] = per_tok[:, :, t0:t0 + qb].any(2, keepdims=True)
    el = np.repeat(union, bs, axis=3)[..., :tk]
    causal = np.asarray(kv_pos)[:, None, None, :] <= np.asarray(pos)[:, None, :, None]
    return jnp.asarray(el & causal)


@pytest.mark.parametrize("impl,interpret,qb", [("xla", False, 8), ("triton", True, 16)])
def test_query_block_union_matches_dense_reference(impl, interpret, qb):
    b, t, h, hkv, d, bs = 1, 48, 2, 1, 16, 16
    kq, kk, kv = jax.random.split(jax.random.key(5), 3)
    q = jax.random.normal(kq, (b, t, h, d))
    k = jax.random.normal(kk, (b, t, hkv, d))
    v = jax.random.normal(kv, (b, t, hkv, d))
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    _, idx = hops.hysparse_full_attention(q, k, v, pos, pos, block_size=bs, top_k_blocks=1, impl="xla")
    sinks = jnp.array([0.3, -0.2])
    out = sel.selected_block_attention(q, k, v, pos, pos, idx, block_size=bs, query_block=qb,
                                       sink_logits=sinks, impl=impl, interpret=interpret)
    ref, _, _ = masked_attention(q, k, v, _union_mask(idx, bs, qb, pos, pos, t), scale=d ** -0.5,
                                 sink_logits=sinks)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_moba_query_block_union_with_all_blocks_equals_full():
    x, pos = _inputs(t=30)
    moba = MoBAAttention(CFG, block_size=8, top_k=4, query_block=8, rngs=nnx.Rngs(0))
    full = FullAttention(CFG, rngs=nnx.Rngs(1))
    nnx.update(full, nnx.state(moba))
    np.testing.assert_allclose(moba(x, pos)[0], full(x, pos)[0], atol=1e-5, rtol=1e-5)


def test_padded_rows_match_unpadded():
    """Padding (-1 positions) at the end of a row changes nothing for the valid tokens."""
    model = SparseLM(_lm("HYM"), rngs=nnx.Rngs(0))
    t, n = 26, 17
    tokens = jax.random.randint(jax.random.key(2), (1, t), 0, 40)
    pos = jnp.where(jnp.arange(t) < n, jnp.arange(t), -1)[None].astype(jnp.int32)
    padded, _ = model(tokens, pos)
    short, _ = model(tokens[:, :n])
    np.testing.assert_allclose(padded[:, :n], short, atol=2e-5, rtol=2e-5)
    assert bool(jnp.all(jnp.isfinite(padded)))


def _per_token_case(select: str, seed: int = 7):
    """Tiny ragged case, T = 20 not a multiple of the block 8: row 1 is valid on 0..12."""
    b, t, h, hkv, d, bs = 2, 20, 4, 2, 16, 8
    kq, kk, kv, ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (b, t, h, d))
    k = jax.random.normal(kk, (b, t, hkv, d))
    v = jax.random.normal(kv, (b, t, hkv, d))
    pos = jnp.stack([jnp.arange(t), jnp.where(jnp.arange(t) < 13, jnp.arange(t), -1)]).astype(jnp.int32)
    if select == "moba":
        idx = mops.moba_select(q, k, pos, pos, block_size=bs, top_k=1)             # own + 1 past
    else:                                                      # HySparse: top-2 of random scores
        bmin = hops.block_min_positions(pos, bs)
        visible = (bmin[:, None, :] <= pos[:, :, None]) & (pos[:, :, None] >= 0)
        idx = sel.ascending(sel.select_top_k(jax.random.normal(ks, (b, hkv, t, 3)), visible[:, None], 2))
    return q, k, v, pos, idx, bs


@pytest.mark.parametrize("select", ["moba", "hysparse"])
def test_per_token_token_sparse_kernel_equals_block_sparse_xla_path(select):
    """query_block=1 on `token_sparse` (Triton, interpret) == the old `block_sparse`
    block_q=1 XLA path: output, LSE and gradients (q, k, v, sinks), ragged, T % bs != 0."""
    q, k, v, pos, idx, bs = _per_token_case(select)
    sinks = jnp.array([0.4, -0.3, 0.0, 1.0])
    w = jax.random.normal(jax.random.key(11), q.shape)
    valid = (pos >= 0)[:, None, :]

    def new(q, k, v, s):
        return sel.selected_block_attention(q, k, v, pos, pos, idx, block_size=bs, sink_logits=s,
                                            return_lse=True, impl="triton", interpret=True)

    def old(q, k, v, s):
        meta = sel.union_metadata(idx, pos, pos, block_size=bs, query_block=1)
        return block_sparse_attention(q, k, v, meta, mask_fn=P.Causal(),
                                      q_positions=pos, kv_positions=pos, sink_logits=s,
                                      return_lse=True, impl="xla")

    res_new, res_old = new(q, k, v, sinks), old(q, k, v, sinks)
    np.testing.assert_allclose(res_new.out, res_old.out, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(jnp.where(valid, res_new.lse, 0), jnp.where(valid, res_old.lse, 0),
                               atol=2e-5, rtol=2e-5)
    assert float(jnp.abs(res_old.out[1, 13:]).max()) == 0.0                    # padded queries

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a).out * w)

    g_new = jax.grad(loss(new), argnums=(0, 1, 2, 3))(q, k, v, sinks)
    g_old = jax.grad(loss(old), argnums=(0, 1, 2, 3))(q, k, v, sinks)
    for a, e in zip(g_new, g_old):
        assert float(jnp.abs(e).max()) > 0
        np.testing.assert_allclose(a, e, atol=5e-5, rtol=5e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("spec", ["HYM", "HYYHM"])
def test_hysparse_moba_model_compiles_on_gpu_with_auto(spec, caplog):
    """impl="auto" on a GPU: per-token MoBA and HySparse (query_block=1) run the Triton
    `token_sparse` kernel (checked in the dispatch log: an "auto" that fell back to the XLA
    reference would compare the XLA model with itself); forward and gradient equal the XLA
    model."""
    kw = dict(vocab_size=64, layer_spec=spec, d_model=64, num_heads=4, num_kv_heads=2,
              hysparse=HySparseConfig(block_size=16, top_k_tokens=32, window=16), moba_block=16,
              moba_top_k=2)
    tokens = jax.random.randint(jax.random.key(0), (2, 100), 0, 64)

    def run(impl):
        model = SparseLM(LMConfig(impl=impl, **kw), rngs=nnx.Rngs(0))

        @nnx.jit
        def step(m):
            return nnx.value_and_grad(lambda m: jnp.mean(jax.nn.log_softmax(m(tokens)[0])[..., 0]))(m)

        return step(model)

    with caplog.at_level(logging.DEBUG, logger="pallas_kernels"):
        l_auto, g_auto = run("auto")
    chosen = set(re.findall(r"(\w+) impl='auto': runs '(\w+)'", caplog.text))
    assert ("token_sparse", "triton") in chosen and "flash" in {op for op, _ in chosen}, chosen
    assert not {op for op, name in chosen if name == "xla"}, chosen
    l_xla, g_xla = run("xla")
    np.testing.assert_allclose(l_auto, l_xla, atol=1e-3, rtol=1e-3)
    for a, e in zip(jax.tree.leaves(g_auto), jax.tree.leaves(g_xla)):   # TF32 dots: relative norm
        assert float(jnp.linalg.norm(a - e)) <= 2e-2 * float(jnp.linalg.norm(e)) + 1e-6
