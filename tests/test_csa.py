"""DeepSeek-V4 CSA / HCA: ratio 1 with k >= T equals dense attention (and its gradients),
records vs a numpy loop, decode == prefill incl. the uncompressed tail for each SWA cache
strategy, SWA rewind on prefix hits, cache sizes, bad configs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels.flash import flash_attention
from sparse_jax import patterns as P
from sparse_jax.cache.csa import SWACache
from sparse_jax.layers.attention import AttentionConfig
from sparse_jax.layers.csa import CompressedAttention
from sparse_jax.models.lm import LMConfig
from sparse_jax.ops import csa as C
from sparse_jax.ops.csa import CSAConfig
from sparse_jax.ops.mla import rms_norm

from layer_testing import assert_grads_close, call, fwd, output_and_grads, ragged_positions, step

ATT = AttentionConfig(d_model=16, num_heads=2)
SMALL = CSAConfig(ratio=2, overlap=True, head_dim=8, rope_dim=4, top_k=3, index_heads=2, index_head_dim=4,
                  window=3, swa_cache="none", checkpoint_every=4)

def dense_ratio1(layer, x, pos):
    """Ratio 1, no window: plain causal MQA over `rope(norm(x W))` keys = values."""
    s, theta = layer.csa, layer.config.rope_theta
    rec = rms_norm(x @ layer.cmp_state[...][0], layer.cmp_norm[...])
    rec = C.rope_tail(rec[:, :, None], pos, s.rope_dim, theta)[:, :, 0]
    q = C.rope_tail(jnp.einsum("btd,dhk->bthk", x, layer.wq[...]), pos, s.rope_dim, theta)
    logits = jnp.einsum("bthk,bsk->bhts", q, rec) / np.sqrt(s.head_dim)
    mask = (pos[:, None, :, None] >= 0) & (pos[:, None, None, :] >= 0) & (pos[:, None, None, :] <= pos[:, None, :, None])
    p = jax.nn.softmax(jnp.where(mask, logits, -1e30), -1) * mask
    o = C.rope_tail(jnp.einsum("bhts,bsk->bthk", p, rec), pos, s.rope_dim, theta, inverse=True)
    return jnp.einsum("bthk,hkd->btd", o, layer.wo[...])


@pytest.mark.parametrize("top_k", [16, None])
def test_ratio_one_with_k_at_least_t_equals_dense(top_k):
    cfg = dataclasses.replace(SMALL, ratio=1, overlap=False, window=0, top_k=top_k)
    layer = CompressedAttention(ATT, cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 9, 16))
    pos = ragged_positions(9, [0, 2])
    if top_k is not None:          # top-k path: forward only (test_dsa checks token_sparse gradients)
        np.testing.assert_allclose(fwd(layer, x, pos), jax.jit(dense_ratio1)(layer, x, pos), atol=2e-5, rtol=1e-5)
        return
    r = jax.random.normal(jax.random.key(2), (2, 9, 16))
    y, g = output_and_grads(call, layer, x, pos, r)
    y_ref, g_ref = output_and_grads(dense_ratio1, layer, x, pos, r)
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-5)
    assert_grads_close(g, g_ref)                                 # HCA path (flash) gradients


def test_records_against_numpy_loop():
    layer = CompressedAttention(ATT, SMALL, rngs=nnx.Rngs(3))
    layer.cmp_ape[...] = jax.random.normal(jax.random.key(9), layer.cmp_ape.shape)
    t, m, w = 9, SMALL.ratio, SMALL.record_window
    x = jax.random.normal(jax.random.key(4), (1, t, 16))
    pos = jnp.arange(t)[None]
    rec, _, ids = nnx.jit(lambda l, x, p: l.records(x, p, p))(layer, x, pos)
    xs, st, sc, ape = (np.asarray(a, np.float64) for a in (x[0], layer.cmp_state[...], layer.cmp_score[...],
                                                           layer.cmp_ape[...]))
    got = {int(i): np.asarray(r) for i, r in zip(ids[0], rec[0]) if i >= 0}
    assert sorted(got) == [0, 1, 2, 3]                     # boundaries 1, 3, 5, 7; token 8 waits in the tail
    pooled_want = []
    for i in sorted(got):
        end = (i + 1) * m - 1
        toks = [p for p in range(end - w + 1, end + 1) if p >= 0]
        slots = [p - (end - w + 1) for p in toks]
        part = [0 if sl >= w - m else 1 for sl in slots]
        states = np.stack([xs[p] @ st[pt] for p, pt in zip(toks, part)])
        scores = np.stack([xs[p] @ sc[pt] + ape[sl] for p, pt, sl in zip(toks, part, slots)])
        wts = np.exp(scores - scores.max(0)) / np.exp(scores - scores.max(0)).sum(0)
        pooled_want.append((wts * states).sum(0))
    want = C.finish_records(jnp.asarray(np.stack(pooled_want), jnp.float32)[None], jnp.array([sorted(got)]),
                            layer.cmp_norm[...], ratio=m, rope_dim=SMALL.rope_dim, theta=ATT.rope_theta)
    np.testing.assert_allclose(np.stack([got[i] for i in sorted(got)]), want[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,cfg", [
    ("csa_none", SMALL),
    ("csa_periodic", dataclasses.replace(SMALL, swa_cache="periodic")),
    ("hca_full", dataclasses.replace(SMALL, ratio=3, overlap=False, top_k=None, swa_cache="full")),
])
def test_decode_equals_prefill_with_tail(name, cfg):
    layer = CompressedAttention(ATT, cfg, rngs=nnx.Rngs(5))
    t = 11                                                       # not a multiple of the ratio
    x = jax.random.normal(jax.random.key(6), (2, t, 16))
    pos = ragged_positions(t, [0, 3])
    y_full = fwd(layer, x, pos)
    cache = layer.init_cache(2, 12)
    y, cache = step(layer, x[:, :5], pos[:, :5], cache)          # chunked prefill, ends mid-record
    outs = [y]
    for i in range(5, t):
        y, cache = step(layer, x[:, i:i + 1], pos[:, i:i + 1], cache)
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), y_full, atol=3e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("strategy", ["full", "periodic", "none"])
def test_swa_rewind_then_refeed_equals_prefill(strategy):
    b, t, d, w, every, prefix = 1, 14, 4, 3, 4, 9
    keys = jax.random.normal(jax.random.key(7), (b, t, d))
    q = jax.random.normal(jax.random.key(8), (b, t, 2, d))
    pos = jnp.arange(t)[None]
    resumed = []

    @jax.jit
    def scenario(keys, q):
        """Cache 12 tokens, rewind to a prefix hit of 9, re-feed what the strategy lost, go on."""
        cache = SWACache.init(b, 16, w, d, strategy=strategy, every=every)
        _, _, cache = cache.update(keys[:, :12], pos[:, :12])
        cache, resume = cache.rewind(prefix)
        resumed.append(resume)
        if resume < prefix:
            _, _, cache = cache.update(keys[:, resume:prefix], pos[:, resume:prefix])
        ks, kp, _ = cache.update(keys[:, prefix:], pos[:, prefix:])
        got = flash_attention(q[:, prefix:], ks[:, :, None], ks[:, :, None], mask_fn=P.causal_window(w),
                              q_positions=pos[:, prefix:], kv_positions=kp)
        want = flash_attention(q, keys[:, :, None], keys[:, :, None], mask_fn=P.causal_window(w))[:, prefix:]
        return got, want

    got, want = scenario(keys, q)
    assert resumed == [{"full": prefix, "periodic": 8, "none": prefix - w}[strategy]]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_cache_sizes_follow_the_strategy():
    sizes = {}
    for strategy in ("full", "periodic", "none"):
        layer = CompressedAttention(ATT, dataclasses.replace(SMALL, swa_cache=strategy), rngs=nnx.Rngs(0))
        sizes[strategy] = layer.init_cache(1, 64).nbytes()
    assert sizes["full"] > sizes["periodic"] > sizes["none"]
    cache = CompressedAttention(ATT, SMALL, rngs=nnx.Rngs(0)).init_cache(1, 64)
    n = 64 // SMALL.ratio + 1
    assert cache.records.nbytes() == n * ((SMALL.head_dim + SMALL.index_head_dim) * 4 + 4)


def test_rope_tail_inverse_and_bad_configs():
    x = jax.random.normal(jax.random.key(0), (1, 5, 2, 8))
    pos = jnp.arange(5)[None]
    np.testing.assert_allclose(C.rope_tail(C.rope_tail(x, pos, 4, 1e4), pos, 4, 1e4, inverse=True), x, atol=1e-6)
    for kw, name in ((dict(ratio=0), "ratio"), (dict(window=-1), "window"), (dict(top_k=0), "top_k"),
                     (dict(rope_dim=3), "rope_dim"), (dict(rope_dim=1024), "rope_dim"),
                     (dict(swa_cache="some"), "swa_cache")):
        with pytest.raises(ValueError, match=name):
            dataclasses.replace(SMALL, **kw)
    for letter, name in (("C", "csa"), ("R", "hca")):
        with pytest.raises(ValueError, match=name):
            LMConfig(vocab_size=8, layer_spec="W" + letter, **{name: None})
    with pytest.raises(ValueError, match="csa must be"):
        CompressedAttention(ATT, {"ratio": 4}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rope_theta"):
        CompressedAttention(dataclasses.replace(ATT, rope_theta=None), SMALL, rngs=nnx.Rngs(0))
