"""alpha-entmax and ASEntmax layers (`sparse_jax/layers/entmax.py`, letters E and A; issue 16
item 1): alpha=1 is the full softmax layer, decode equals prefill (jitted, ragged rows, GQA)
for the alphas the reference handles by sort (2) and by bisection (1.25), ASEntmax equals a
hand-written plain-jnp forward with its temperature, gradients reach every parameter, bad
settings raise ValueError. The conformance suite (`tests/test_layer_conformance.py`) runs
the common checks for E and A at alpha=1.5."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels.entmax import entmax_attention as entmax_op
from sparse_jax.layers import ASEntmaxAttention, AttentionConfig, EntmaxAttention, FullAttention
from sparse_jax.models.lm import LMConfig, SparseLM
from sparse_jax.ops.entmax import asentmax_scale, entmax_attention
from sparse_jax.ops.rope import apply_rope

T, D = 13, 32


def ragged(seed=0, batch=2):
    """x `[B, T, D]`, positions `[B, T]`: row 0 left-padded by 3, row 1 right-padded (length 9)."""
    x = np.random.default_rng(seed).normal(size=(batch, T, D)).astype(np.float32)
    pos = np.full((batch, T), -1, np.int32)
    pos[0, 3:] = np.arange(T - 3)
    pos[1, :9] = np.arange(9)
    return jnp.asarray(x), jnp.asarray(pos)


def config(kv_heads=2, **kw):
    return AttentionConfig(d_model=D, num_heads=4, num_kv_heads=kv_heads, **kw)


_call = nnx.jit(lambda layer, x, pos, cache: layer(x, pos, cache))


def test_alpha_one_is_full_attention():
    """Same seed, same parameters: E with alpha=1 runs the softmax path of F exactly."""
    x, pos = ragged()
    got, _ = _call(EntmaxAttention(config(), alpha=1.0, rngs=nnx.Rngs(0)), x, pos, None)
    want, _ = _call(FullAttention(config(), rngs=nnx.Rngs(0)), x, pos, None)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    entmax15, _ = _call(EntmaxAttention(config(), alpha=1.5, rngs=nnx.Rngs(0)), x, pos, None)
    assert np.abs(np.asarray(entmax15) - np.asarray(want))[np.asarray(pos) >= 0].max() > 1e-3


@pytest.mark.parametrize("make", [
    lambda: EntmaxAttention(config(kv_heads=1), alpha=2.0, rngs=nnx.Rngs(1)),          # sparsemax, MQA
    lambda: EntmaxAttention(config(kv_heads=4), alpha=1.25, rngs=nnx.Rngs(2)),         # bisection, MHA
    lambda: ASEntmaxAttention(config(), alpha=1.5, learn_gamma=False, rngs=nnx.Rngs(3)),
], ids=["sparsemax-mqa", "alpha1.25-mha", "asentmax-ssmax-gqa"])
def test_decode_equals_prefill(make):
    layer = make()
    x, pos = ragged(seed=4)
    want, _ = _call(layer, x, pos, None)
    cache = layer.init_cache(2, T)
    got = []
    for t in range(T):
        out, cache = _call(layer, x[:, t:t + 1], pos[:, t:t + 1], cache)
        got.append(np.asarray(out)[:, 0])
    valid = np.asarray(pos) >= 0
    np.testing.assert_allclose(np.stack(got, 1)[valid], np.asarray(want)[valid], atol=2e-5, rtol=2e-5)


def test_asentmax_equals_plain_forward():
    """The layer against its math written out: RoPE'd queries times
    `delta + beta log(t + 2)^gamma` (numpy), entmax-1.5 attention by the op's XLA reference."""
    layer = ASEntmaxAttention(config(), alpha=1.5, delta=0.5, rngs=nnx.Rngs(5))
    layer.beta[...] = jnp.asarray([0.2, 0.9, 1.5, 0.0])
    layer.gamma[...] = jnp.asarray([0.0, 1.0, -0.3, 2.0])
    x, pos = ragged(seed=6)
    got, _ = _call(layer, x, pos, None)

    theta = layer.config.rope_theta
    q = apply_rope(jnp.einsum("btd,dhk->bthk", x, layer.wq[...]), pos, theta)
    k = apply_rope(jnp.einsum("btd,dhk->bthk", x, layer.wk[...]), pos, theta)
    v = jnp.einsum("btd,dhk->bthk", x, layer.wv[...])
    log_n = np.log(np.maximum(np.asarray(pos), 0) + 2.0)[..., None]
    temp = 0.5 + np.array([0.2, 0.9, 1.5, 0.0]) * log_n ** np.array([0.0, 1.0, -0.3, 2.0])
    q = q * jnp.asarray(temp, jnp.float32)[..., None]
    o = entmax_op(q, k, v, alpha=1.5, q_positions=pos, kv_positions=pos, impl="xla")
    want = jnp.einsum("bthk,hkd->btd", o, layer.wo[...])
    valid = np.asarray(pos) >= 0
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-5, rtol=1e-5)


def test_asentmax_scale_formula():
    pos = jnp.asarray([[0, 1, 7, -1]])
    beta, gamma = jnp.asarray([0.5, 2.0]), jnp.asarray([1.0, 0.5])
    log_n = np.log(np.array([2.0, 3.0, 9.0, 2.0]))[None, :, None]
    np.testing.assert_allclose(asentmax_scale(pos, beta, gamma, delta=1.0),
                               1.0 + np.array([0.5, 2.0]) * log_n ** np.array([1.0, 0.5]), rtol=1e-6)
    np.testing.assert_allclose(asentmax_scale(pos, beta), np.array([0.5, 2.0]) * log_n, rtol=1e-6)


def test_gradients_finite_and_reach_the_temperature():
    x, pos = ragged(seed=7)
    layer = ASEntmaxAttention(config(), alpha=1.5, rngs=nnx.Rngs(8))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    r = jax.random.normal(jax.random.key(9), x.shape)

    @jax.jit
    def grads(params, x):
        loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p, rest)(x, pos)[0] * r)
        return jax.grad(loss, argnums=(0, 1))(params, x)

    g_params, g_x = grads(params, x)
    assert np.isfinite(np.asarray(g_x)).all()
    for name in ("wq", "wk", "wv", "wo", "beta", "gamma"):
        g = np.asarray(g_params[name][...])
        assert np.isfinite(g).all() and np.abs(g).max() > 0, name


def test_lm_with_entmax_layers_trains_and_decodes():
    """`SparseLM` with E and A layers: finite loss and gradients; cached decode equals prefill."""
    from sparse_jax.train import make_optimizer, train_step
    cfg = LMConfig(vocab_size=11, layer_spec="EA", d_model=D, num_heads=4, num_kv_heads=2, entmax_alpha=1.5)
    model = SparseLM(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (2, 8)), jnp.int32)
    loss, _ = train_step(model, make_optimizer(model, 1e-2, warmup=1), tokens, tokens, jnp.ones((2, 8)))
    assert np.isfinite(float(loss))
    want, _ = nnx.jit(lambda m, t: m(t))(model, tokens)
    caches, got = model.init_cache(2, 8), []
    step = nnx.jit(lambda m, t, p, c: m(t, p, c))
    for t in range(8):
        logits, caches = step(model, tokens[:, t:t + 1], jnp.full((2, 1), t, jnp.int32), caches)
        got.append(np.asarray(logits)[:, 0])
    np.testing.assert_allclose(np.stack(got, 1), np.asarray(want), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("alpha", [0.5, 2.5, float("nan"), True, "1.5", None])
def test_bad_alpha_raises(alpha):
    with pytest.raises(ValueError, match="alpha"):
        EntmaxAttention(config(), alpha=alpha, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="alpha"):
        LMConfig(vocab_size=11, layer_spec="FA", entmax_alpha=alpha)
    x, pos = ragged()
    q = jnp.zeros((2, T, 4, 8))
    with pytest.raises(ValueError, match="alpha"):
        entmax_attention(q, q, q, pos, pos, alpha=alpha)


def test_softmax_options_and_bad_temperature_raise():
    with pytest.raises(ValueError, match="softcap"):
        EntmaxAttention(config(softcap=30.0), alpha=1.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="learned_sinks"):
        ASEntmaxAttention(config(learned_sinks=True), rngs=nnx.Rngs(0))
    EntmaxAttention(config(learned_sinks=True, softcap=30.0), alpha=1.0, rngs=nnx.Rngs(0))   # softmax: fine
    with pytest.raises(ValueError, match="delta"):
        ASEntmaxAttention(config(), delta="1", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="beta and gamma"):
        asentmax_scale(jnp.zeros((1, 3), jnp.int32), jnp.ones((4,)), jnp.ones((3,)))
    x, pos = ragged()
    q = jnp.zeros((2, T, 4, 8))
    with pytest.raises(ValueError, match="sink_logits or softcap"):
        entmax_attention(q, q, q, pos, pos, alpha=1.5, softcap=5.0)
