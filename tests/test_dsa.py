"""DSA (DeepSeek-V3.2): indexer top-k vs a numpy loop (ties, causal edge, padding), DSA
with k >= T equals MLA, top-k attention and gradients vs a dense-masked reference,
decode == prefill, the indexer loss of both training stages, cache size, bad configs,
`DSAConfig.fused_topk`'s backend choice."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_jax.cache.mla import DSACache
from sparse_jax.layers.attention import AttentionConfig
from sparse_jax.layers.dsa import DSAAttention, indexer_filter, total_indexer_loss
from sparse_jax.layers.mla import MLAAttention
from sparse_jax.models.lm import LMConfig
from sparse_jax.ops import dsa as D
from sparse_jax.ops import mla as M
from sparse_jax.ops.dsa import DSAConfig
from sparse_jax.ops.mla import MLAConfig

from gpu_testing import hopper_device
from kernel_testing import rel_err
from layer_testing import assert_grads_close, call, fwd, output_and_grads, ragged_positions, step

ATT = AttentionConfig(d_model=24, num_heads=3)
MLA = MLAConfig(kv_lora_rank=10, q_lora_rank=8, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5)
DSA = DSAConfig(index_heads=2, index_head_dim=4, top_k=4)


def numpy_topk(scores, qpos, kpos, k):
    b, t, s = scores.shape
    out = -np.ones((b, t, min(k, s)), np.int32)
    for i in range(b):
        for j in range(t):
            cand = [c for c in range(s) if qpos[i, j] >= 0 and 0 <= kpos[i, c] <= qpos[i, j]]
            cand.sort(key=lambda c: (-scores[i, j, c], c))
            out[i, j, :len(cand[:k])] = sorted(cand[:k])      # the indexer op's order: ascending
    return out


@pytest.mark.parametrize("query_chunk", [64, 3])
def test_indexer_topk_matches_numpy_loop_with_ties(query_chunk):
    rng = np.random.default_rng(0)
    b, t, hi, di, k = 2, 10, 2, 3, 4
    q = jnp.asarray(rng.integers(-1, 2, (b, t, hi, di)), jnp.float32)       # integer scores: many ties
    kk = jnp.asarray(rng.integers(0, 2, (b, t, di)), jnp.float32)
    w = jnp.asarray(rng.integers(0, 3, (b, t, hi)), jnp.float32)
    pos = ragged_positions(t, [0, 3])
    scores = D.indexer_scores(q, w, kk, pos, pos)
    s_np = np.einsum("btj,btjs->bts", np.asarray(w), np.maximum(np.einsum("btjd,bsd->btjs", q, kk), 0))
    got = D.indexer_topk(q, w, kk, pos, pos, k=k, query_chunk=query_chunk)
    want = numpy_topk(s_np, np.asarray(pos), np.asarray(pos), k)
    np.testing.assert_array_equal(got, want)
    assert (np.asarray(got)[0, 0] == [0, -1, -1, -1]).all()           # causal edge: one key only
    assert (np.asarray(got)[1, :3] == -1).all()                        # padded queries select nothing
    assert np.isneginf(np.asarray(scores)[0, 2, 3])                    # future key invisible


def dsa_pair(seed, dsa=DSA):
    """A DSA layer and an MLA layer with the same MLA parameters."""
    return (DSAAttention(ATT, MLA, dsa, rngs=nnx.Rngs(seed)), MLAAttention(ATT, MLA, rngs=nnx.Rngs(seed)))


def test_dsa_with_k_at_least_t_equals_mla():
    t = 9
    dsa, mla = dsa_pair(0, dataclasses.replace(DSA, top_k=t))
    x = jax.random.normal(jax.random.key(1), (2, t, 24))
    pos = ragged_positions(t, [0, 2])
    np.testing.assert_allclose(fwd(dsa, x, pos), fwd(mla, x, pos), atol=2e-5, rtol=1e-5)


def dense_masked_dsa(layer, x, pos):
    """Reference: absorbed MLA with a dense mask of the indexer's selection."""
    c = layer.config
    qn, qr, ckv, kr = layer.project(x, pos)
    qi, wi, ki = layer.indexer(x, pos)
    sel = D.selected_mask(D.indexer_topk(qi, wi, ki, pos, pos, k=layer.dsa.top_k), x.shape[1])
    mask = sel & D.visible(pos, pos)
    q_abs = M.absorb_query(qn, qr, layer.w_uk[...])
    k_lat, _ = M.latent_kv(ckv, kr)
    s = jnp.einsum("bthc,bsc->bhts", q_abs, k_lat[:, :, 0]) * layer.mla.scale
    p = jax.nn.softmax(jnp.where(mask[:, None], s, -1e30), -1) * mask[:, None]
    o = M.unabsorb_output(jnp.einsum("bhts,bsc->bthc", p, ckv), layer.w_uv[...])
    return jnp.einsum("bthk,hkd->btd", o, layer.wo[...]).astype(c.dtype)


def test_topk_attention_and_gradients_against_dense_mask():
    t = 11
    layer, _ = dsa_pair(2)
    x = jax.random.normal(jax.random.key(3), (2, t, 24))
    pos = ragged_positions(t, [0, 3])
    r = jax.random.normal(jax.random.key(4), (2, t, 24))
    y, g = output_and_grads(call, layer, x, pos, r)
    y_ref, g_ref = output_and_grads(dense_masked_dsa, layer, x, pos, r)
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-5)
    assert_grads_close(g, g_ref)
    assert float(jnp.abs(g["index_wq"][...]).max()) == 0.0       # no gradient through top-k


def prefill_then_decode(layer, x, pos, cache, *, prefill):
    """Outputs `[B, T, d]` of a prefill of the first `prefill` tokens, then one token a step."""
    y, cache = step(layer, x[:, :prefill], pos[:, :prefill], cache)
    outs = [y]
    for i in range(prefill, x.shape[1]):
        y, cache = step(layer, x[:, i:i + 1], pos[:, i:i + 1], cache)
        outs.append(y)
    return jnp.concatenate(outs, 1)


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_float8_index_keys_scaled_per_token(dtype):
    """Keys far above the float8 range and far below it round-trip within float8's relative
    precision (a plain cast gives NaN above 448 in e4m3fn and 0 for tiny keys)."""
    rng = np.random.default_rng(0)
    k = rng.normal(size=(2, 5, 8)).astype(np.float32) * np.array([1e-4, 1.0, 3e3, 5e4, 0.0])[None, :, None]
    codes, scale = D.index_key_codes(jnp.asarray(k), dtype)
    assert codes.dtype == dtype and scale.dtype == dtype and scale.shape == (2, 5, 1)
    back = np.asarray(D.index_keys_from_codes(codes, scale, jnp.float32))
    assert np.isfinite(back).all()
    rel = 2.0 ** -3 if dtype == jnp.float8_e4m3fn else 2.0 ** -2   # half an ulp, mantissa bits 3 / 2
    amax = np.abs(k).max(-1, keepdims=True)
    assert (np.abs(back - k) <= rel * amax + 1e-30).all()
    assert np.log2(np.asarray(scale, np.float32)).round().tolist() == np.log2(np.asarray(scale, np.float32)).tolist()
    np.testing.assert_array_equal(D.round_index_keys(jnp.asarray(back), dtype), back)   # idempotent


def test_decode_equals_prefill_float8_index_keys():
    t = 10
    layer, _ = dsa_pair(5, dataclasses.replace(DSA, index_dtype=jnp.float8_e4m3fn))
    layer.index_wk[...] = layer.index_wk[...] * 1e3          # keys far over e4m3's 448
    x = jax.random.normal(jax.random.key(6), (2, t, 24))
    pos = ragged_positions(t, [0, 3])
    y_full = fwd(layer, x, pos)
    assert np.isfinite(np.asarray(y_full)).all()
    cache = layer.init_cache(2, 12)
    assert cache.index_keys.k.dtype == jnp.float8_e4m3fn and cache.index_keys.v.shape == (2, 12, 1, 1)
    np.testing.assert_allclose(prefill_then_decode(layer, x, pos, cache, prefill=6), y_full,
                               atol=2e-5, rtol=1e-5)


def test_decode_equals_prefill_ragged_low_precision_index_keys():
    t = 10
    layer, _ = dsa_pair(5, dataclasses.replace(DSA, index_dtype=jnp.bfloat16))
    x = jax.random.normal(jax.random.key(6), (2, t, 24))
    pos = ragged_positions(t, [0, 3])
    y_full = fwd(layer, x, pos)
    cache = layer.init_cache(2, 12)
    assert isinstance(cache, DSACache) and cache.index_keys.k.dtype == jnp.bfloat16
    assert cache.nbytes() == 2 * 12 * ((10 + 4) * 4 + 4) + 2 * 12 * (4 * 2 + 4)
    np.testing.assert_allclose(prefill_then_decode(layer, x, pos, cache, prefill=6), y_full,
                               atol=2e-5, rtol=1e-5)


def test_indexer_loss_value_against_numpy():
    rng = np.random.default_rng(1)
    b, t = 1, 6
    pos = ragged_positions(t, [1])
    vis = np.asarray(D.visible(pos, pos))
    scores = jnp.where(vis, jnp.asarray(rng.normal(size=(b, t, t)), jnp.float32), -jnp.inf)
    target = np.where(vis, rng.random((b, t, t)), 0.0)
    target = jnp.asarray(target / np.maximum(target.sum(-1, keepdims=True), 1e-9), jnp.float32)
    vals, idx = jax.lax.top_k(scores, 2)
    idx = jnp.where(vals > -jnp.inf, idx, -1)
    for sel in (None, idx):
        mask = vis if sel is None else vis & np.asarray(D.selected_mask(sel, t))
        kls = []
        for j in range(1, t):
            m = mask[0, j]
            lq = np.asarray(scores)[0, j, m] - np.log(np.exp(np.asarray(scores)[0, j, m]).sum())
            p = np.asarray(target)[0, j, m]
            kls.append(float((p * (np.log(np.where(p > 0, p, 1)) - lq) * (p > 0)).sum()))
        np.testing.assert_allclose(D.dsa_indexer_loss(scores, target, pos, sel), np.mean(kls), rtol=1e-5)
    # KL vanishes when the indexer's softmax is the target
    exact = jnp.where(vis, jnp.log(jnp.maximum(target, 1e-30)), -jnp.inf)
    assert abs(float(D.dsa_indexer_loss(exact, target, pos))) < 1e-5


@pytest.mark.parametrize("stage", ["warmup", "sparse"])
def test_indexer_loss_trains_only_the_indexer(stage):
    layer, _ = dsa_pair(7, dataclasses.replace(DSA, stage=stage, indexer_loss=True))
    x = jax.random.normal(jax.random.key(8), (1, 8, 24))
    pos = jnp.arange(8)[None]
    graphdef, params = nnx.split(layer, nnx.Param)

    def losses(params):
        (y, _), inter = nnx.capture(lambda l: l(x, pos), nnx.Intermediate)(nnx.merge(graphdef, params))
        return total_indexer_loss(inter), y

    def kl_and_output(params):
        kl, y = losses(params)
        return kl, y.sum()

    g_kl, g_y = jax.jit(jax.jacrev(kl_and_output))(params)          # both gradients, one compile
    index = nnx.state(layer, indexer_filter())
    for path, g in nnx.to_flat_state(g_kl):
        is_index = path[0].startswith("index_")
        assert (float(jnp.abs(g[...]).max()) > 0) == is_index, path      # KL: indexer only
    for path, g in nnx.to_flat_state(g_y):
        if path[0].startswith("index_"):
            assert float(jnp.abs(g[...]).max()) == 0.0, path             # output: never the indexer
    assert set(k for k, _ in index.items()) == {"index_wq", "index_wk", "index_ww"}


def test_bad_configs_raise():
    for kw, name in ((dict(top_k=0), "top_k"), (dict(stage="dense"), "stage"),
                     (dict(impl="cuda"), "impl"), (dict(index_head_dim=3), "index_head_dim"),
                     (dict(fused_topk=1), "fused_topk")):
        with pytest.raises(ValueError, match=name):
            DSAConfig(**kw)
    with pytest.raises(ValueError, match="dsa must be"):
        DSAAttention(ATT, MLA, dsa={"top_k": 4}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dsa"):
        LMConfig(vocab_size=8, layer_spec="LD", dsa=None)
    with pytest.raises(ValueError, match="mla"):
        LMConfig(vocab_size=8, layer_spec="L", mla=None)
    layer, _ = dsa_pair(0)
    with pytest.raises(ValueError, match="DSACache"):
        layer(jnp.zeros((1, 2, 24)), jnp.zeros((1, 2), jnp.int32), cache=layer.mla)


def test_fused_topk_only_where_the_triton_indexer_runs():
    """`DSAConfig.fused_topk` asks the Triton indexer's fused top-k; on a backend without
    one (here the CPU's XLA reference) the layer selects as usual, same outputs."""
    rng = np.random.default_rng(3)
    q, w, kk = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((1, 8, 2, 4), (1, 8, 2), (1, 8, 4)))
    assert isinstance(D.fused_topk_config(q, w, kk, k=4, impl="triton"), D.indexer_op.FusedIndexerConfig)
    assert D.fused_topk_config(q, w, kk, k=4, impl="xla") is None
    assert D.fused_topk_config(q, w, kk, k=4, impl="auto") is None      # CPU: the XLA reference
    x = jnp.asarray(rng.normal(size=(2, 9, 24)), jnp.float32)
    pos = ragged_positions(9, [0, 2])
    layer, _ = dsa_pair(4)
    fused, _ = dsa_pair(4, dataclasses.replace(DSA, fused_topk=True))
    np.testing.assert_array_equal(fwd(fused, x, pos), fwd(layer, x, pos))


@pytest.mark.gpu
@pytest.mark.skipif(hopper_device() is None, reason="needs a Hopper (sm_90) GPU")
def test_decode_equals_prefill_through_the_gpu_kernels():
    """On Hopper in bf16 at the kernels' shapes (64 heads, latent 128 + rope 64): the prefill
    runs the Triton indexer (`DSAConfig.impl="auto"`) and `mla_sparse_attention`'s Mosaic GPU
    kernel, decode the indexer and `mla_decode`'s Mosaic GPU kernel. A prefill of the whole
    prompt equals a shorter prefill then one token a step (ragged rows), and both equal the
    same layer on the XLA references."""
    att = AttentionConfig(d_model=256, num_heads=64, dtype=jnp.bfloat16)
    mla = MLAConfig(kv_lora_rank=128, q_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32)
    dsa = DSAConfig(index_heads=4, index_head_dim=64, top_k=64)
    t = 150
    with jax.default_device(hopper_device()):
        layer = DSAAttention(att, mla, dsa, rngs=nnx.Rngs(0))
        xla = DSAAttention(dataclasses.replace(att, impl="xla"), mla, dataclasses.replace(dsa, impl="xla"),
                           rngs=nnx.Rngs(0))
        x = jax.random.normal(jax.random.key(1), (2, t, 256))
        pos = ragged_positions(t, [0, 7])
        y_full = np.asarray(fwd(layer, x, pos), np.float32)
        y_steps = np.asarray(prefill_then_decode(layer, x, pos, layer.init_cache(2, t + 4), prefill=120), np.float32)
        y_xla = np.asarray(fwd(xla, x, pos), np.float32)
        fused = DSAAttention(att, mla, dataclasses.replace(dsa, fused_topk=True, query_chunk=t), rngs=nnx.Rngs(0))
        y_fused = np.asarray(fwd(fused, x, pos), np.float32)
    assert np.isfinite(y_full).all() and np.isfinite(y_steps).all()
    assert rel_err(y_fused, y_full) < 2e-2, rel_err(y_fused, y_full)    # the fused top-k: same sets
    assert rel_err(y_steps, y_full) < 2e-2, rel_err(y_steps, y_full)
    assert rel_err(y_full, y_xla) < 2e-2, rel_err(y_full, y_xla)
