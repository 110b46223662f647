"""MLA (arXiv 2405.04434): absorbed == expanded, decode == prefill, gradients vs a naive
reference, cache size, bad configs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_jax.cache.mla import MLACache
from sparse_jax.layers.attention import AttentionConfig
from sparse_jax.layers.mla import MLAAttention
from sparse_jax.ops.mla import MLAConfig, rms_norm
from sparse_jax.ops.rope import apply_rope

from layer_testing import assert_grads_close, call, fwd, output_and_grads, ragged_positions, step

ATT = AttentionConfig(d_model=24, num_heads=3)
MLA = MLAConfig(kv_lora_rank=10, q_lora_rank=8, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5)


def naive_mla(layer, x, positions):
    """Per-head expanded MLA written out with a dense causal mask (float32)."""
    m, theta = layer.mla, layer.config.rope_theta
    p = {k: v[...] for k, v in nnx.state(layer, nnx.Param).items()}
    if m.q_lora_rank is None:
        q = jnp.einsum("btd,dhk->bthk", x, p["wq"])
    else:
        q = jnp.einsum("btr,rhk->bthk", rms_norm(x @ p["wq_a"], p["q_norm"]), p["wq"])
    qn, qr = q[..., :m.qk_nope_head_dim], apply_rope(q[..., m.qk_nope_head_dim:], positions, theta)
    kv = x @ p["wkv_a"]
    ckv = rms_norm(kv[..., :m.kv_lora_rank], p["kv_norm"])
    kr = apply_rope(kv[:, :, None, m.kv_lora_rank:], positions, theta)[:, :, 0]
    kn = jnp.einsum("bsc,chd->bshd", ckv, p["w_uk"])
    v = jnp.einsum("bsc,chd->bshd", ckv, p["w_uv"])
    s = (jnp.einsum("bthd,bshd->bhts", qn, kn) + jnp.einsum("bthd,bsd->bhts", qr, kr)) * m.scale
    qp, kp = positions[:, None, :, None], positions[:, None, None, :]
    mask = (qp >= 0) & (kp >= 0) & (kp <= qp)
    pr = jax.nn.softmax(jnp.where(mask, s, -1e30), -1) * mask
    o = jnp.einsum("bhts,bshd->bthd", pr, v)
    return jnp.einsum("bthk,hkd->btd", o, p["wo"])


def test_absorbed_equals_expanded():
    mla = MLA
    layer = MLAAttention(ATT, mla, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 13, 24))
    pos = ragged_positions(13, [0, 4])
    y_exp = fwd(layer, x, pos)
    layer.mla = dataclasses.replace(mla, absorb="always")
    y_abs = fwd(layer, x, pos)
    np.testing.assert_allclose(y_abs, y_exp, atol=2e-5, rtol=1e-5)
    assert np.abs(np.asarray(y_exp)[1, :4]).max() == 0.0          # padded queries give zeros


def test_outputs_and_gradients_against_naive():
    layer = MLAAttention(ATT, MLA, rngs=nnx.Rngs(2))              # training: the expanded form
    x = jax.random.normal(jax.random.key(3), (2, 9, 24))
    pos = ragged_positions(9, [0, 3])
    r = jax.random.normal(jax.random.key(4), (2, 9, 24))
    y, g = output_and_grads(call, layer, x, pos, r)
    y_ref, g_ref = output_and_grads(naive_mla, layer, x, pos, r)
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-5)
    assert_grads_close(g, g_ref)


def test_decode_equals_prefill_ragged():
    """Absorbed decode over the cache == expanded prefill (direct query projection here)."""
    layer = MLAAttention(ATT, dataclasses.replace(MLA, q_lora_rank=None), rngs=nnx.Rngs(5))
    t = 10
    x = jax.random.normal(jax.random.key(6), (2, t, 24))
    pos = ragged_positions(t, [0, 3])
    y_full = fwd(layer, x, pos)
    cache = layer.init_cache(2, 12)
    y_pre, cache = step(layer, x[:, :6], pos[:, :6], cache)          # chunked prefill
    outs = [y_pre]
    for i in range(6, t):                                       # decode steps (absorbed)
        y, cache = step(layer, x[:, i:i + 1], pos[:, i:i + 1], cache)
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), y_full, atol=2e-5, rtol=1e-5)


def test_cache_holds_latent_and_rope_key_only():
    layer = MLAAttention(ATT, MLA, rngs=nnx.Rngs(0))
    cache = layer.init_cache(3, 20)
    assert isinstance(cache, MLACache)
    assert cache.nbytes() == 3 * 20 * ((MLA.kv_lora_rank + MLA.qk_rope_head_dim) * 4 + 4)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="kv_lora_rank"):
        MLAConfig(kv_lora_rank=0)
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        MLAConfig(qk_rope_head_dim=3)
    with pytest.raises(ValueError, match="absorb"):
        MLAConfig(absorb="sometimes")
    with pytest.raises(ValueError, match="rope_theta"):
        MLAAttention(dataclasses.replace(ATT, rope_theta=None), MLA, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="learned_sinks"):
        MLAAttention(dataclasses.replace(ATT, learned_sinks=True), MLA, rngs=nnx.Rngs(0))
    layer = MLAAttention(ATT, MLA, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="positions"):
        layer(jnp.zeros((1, 4, 24)), jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(ValueError, match="x must be"):
        layer(jnp.zeros((1, 4, 23)), jnp.zeros((1, 4), jnp.int32))
