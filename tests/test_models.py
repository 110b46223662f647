"""SparseLM, the needle task, the training step and the demo script."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_jax import patterns as P
from sparse_jax.data import NeedleTask
from sparse_jax.models.lm import LMConfig, SparseLM, hybrid_spec
from sparse_jax.train import make_optimizer, train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(spec, **kw):
    base = dict(vocab_size=40, layer_spec=spec, d_model=32, num_heads=4, num_kv_heads=2,
                window=6, num_sinks=2, pattern=P.longformer(5, num_global=2), pattern_block=4)
    base.update(kw)
    return LMConfig(**base)


def test_hybrid_spec():
    assert hybrid_spec(8, 4) == "WWWFWWWF"
    assert hybrid_spec(3, 1) == "FFF"
    with pytest.raises(ValueError, match="global_every"):
        hybrid_spec(4, 0)


@pytest.mark.parametrize("bad, match", [
    (dict(layer_spec="FX"), "layer_spec"), (dict(layer_spec=""), "layer_spec"),
    (dict(layer_spec="P", pattern=None), "pattern"), (dict(vocab_size=1), "vocab_size"),
    (dict(window=0), "window"), (dict(num_heads=3), "num_heads|divisible")])
def test_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        small_config(bad.pop("layer_spec", "FW"), **bad)


def test_decode_equals_prefill_for_every_layer_type():
    """A model mixing all layer types: chunked prefill + token-by-token decode == prefill."""
    model = SparseLM(small_config("FWSP"), rngs=nnx.Rngs(0))
    b, t = 2, 19
    tokens = jax.random.randint(jax.random.key(0), (b, t), 0, 40)
    logits, none = model(tokens)
    assert none is None and logits.shape == (b, t, 40)
    caches = model.init_cache(b, 32)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    out, caches = model(tokens[:, :5], pos[:, :5], caches)
    outs = [out]
    for i in range(5, t):
        out, caches = model(tokens[:, i:i + 1], pos[:, i:i + 1], caches)
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), logits, atol=2e-5, rtol=2e-5)


def test_kv_bytes_per_token_from_caches():
    cfg = small_config("FW")
    model = SparseLM(cfg, rngs=nnx.Rngs(0))
    t = 64
    hkv, hd = cfg.attention.num_kv_heads, cfg.attention.head_dim
    full = t * (2 * hkv * hd * 4 + 4)               # k + v fp32 + int32 position per slot
    window = cfg.window * (2 * hkv * hd * 4 + 4)
    assert model.kv_bytes_per_token(t) == pytest.approx((full + window) / t)


def test_every_parameter_has_logical_axis_names():
    model = SparseLM(small_config("FWSP", learned_sinks=True, output_gate=True), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert leaves
    for var in leaves:
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var[...].ndim, var


def test_training_reduces_loss():
    task = NeedleTask(seq_len=24, num_values=4, num_noise=8)
    model = SparseLM(small_config("WF", vocab_size=task.vocab_size), rngs=nnx.Rngs(0))
    opt = make_optimizer(model, 1e-2, warmup=5, total_steps=60)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(60):
        tokens, targets, mask, _ = task.batch(rng, 16)
        loss, _ = train_step(model, opt, tokens, targets, mask)
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5])


def test_needle_task_layout():
    task = NeedleTask(seq_len=32, num_values=5, num_noise=7)
    tokens, targets, mask, dist = task.batch(np.random.default_rng(1), 64, 3, 20)
    assert tokens.shape == targets.shape == mask.shape == (64, 32)
    assert (tokens[:, -1] == task.KEY).all() and (mask.sum(1) == 1).all() and mask[:, -1].all()
    for row, d in zip(range(64), dist):
        assert 3 <= d <= 20
        vpos = 31 - d
        assert tokens[row, vpos - 1] == task.KEY and tokens[row, vpos] == targets[row, -1]
        assert 2 <= targets[row, -1] < 7
        assert (tokens[row] == task.KEY).sum() == 2        # the needle's KEY and the query
    with pytest.raises(ValueError, match="distance"):
        task.batch(np.random.default_rng(0), 2, 1, 5)


def test_demo_script_runs():
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "retrieval_demo.py"), "--steps=3",
         "--seq_len=32", "--window=4", "--d_model=16", "--batch=4", "--eval_batches=1",
         "--models=full,swa"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "acc far" in proc.stdout and "swa" in proc.stdout


def ragged_positions(t, pads):
    """Row i left-padded with `pads[i]` entries of -1, then 0, 1, ..."""
    return jnp.asarray(np.stack([np.concatenate([-np.ones(p), np.arange(t - p)]) for p in pads]), jnp.int32)


def test_decode_equals_prefill_mla_dsa_csa_hca():
    """'LDCRF' (MLA, DSA, CSA, HCA, full), ragged batch: chunked prefill + token-by-token
    decode == prefill logits, with top-k budgets small enough that DSA/CSA really select."""
    cfg = small_config("LDCRF", dsa=dataclasses.replace(LMConfig.dsa, top_k=4),
                       csa=dataclasses.replace(LMConfig.csa, top_k=2, window=4),
                       hca=dataclasses.replace(LMConfig.hca, ratio=8, window=4))
    model = SparseLM(cfg, rngs=nnx.Rngs(1))
    b, t = 2, 21
    tokens = jax.random.randint(jax.random.key(1), (b, t), 0, 40)
    pos = ragged_positions(t, [0, 3])
    step = nnx.jit(lambda m, x, p, c: m(x, p, c))          # one compile per chunk length
    logits, _ = step(model, tokens, pos, None)
    out, caches = step(model, tokens[:, :6], pos[:, :6], model.init_cache(b, 24))
    outs = [out]
    for i in range(6, t):
        out, caches = step(model, tokens[:, i:i + 1], pos[:, i:i + 1], caches)
        outs.append(out)
    valid = np.asarray(pos >= 0)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1))[valid], np.asarray(logits)[valid],
                               atol=5e-5, rtol=5e-5)


def test_kv_bytes_per_token_mla_dsa_csa_hca_vs_full():
    """Per-layer KV bytes: MLA < DSA (adds indexer keys) < full MHA; HCA < CSA < full."""
    kw = dict(d_model=64, num_heads=4, num_kv_heads=4)
    per = {k: SparseLM(small_config(k, **kw), rngs=nnx.Rngs(0)).kv_bytes_per_token(256) for k in "FLDCR"}
    assert all(v > 0 for v in per.values()), per
    assert per["L"] < per["D"] < per["F"], per
    assert per["R"] < per["C"] < per["F"], per
    both = SparseLM(small_config("LDCRF", **kw), rngs=nnx.Rngs(0)).kv_bytes_per_token(256)
    assert both == pytest.approx(sum(per.values()))


def test_train_step_trains_dsa_indexer():
    """The train step adds the sown DSA indexer KL, reports it, and follows `optimizer.wrt`:
    a warm-up ('FD', stage "warmup", only the indexer trained) lowers the KL over 30 steps
    and leaves every other parameter as it was."""
    import optax

    from sparse_jax.layers.dsa import indexer_filter
    task = NeedleTask(seq_len=24, num_values=4, num_noise=8)
    dsa = dataclasses.replace(LMConfig.dsa, top_k=6, stage="warmup", indexer_loss=True)
    model = SparseLM(small_config("FD", vocab_size=task.vocab_size, dsa=dsa), rngs=nnx.Rngs(0))
    frozen = nnx.clone(nnx.state(model, nnx.All(nnx.Param, nnx.Not(indexer_filter()))))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=indexer_filter())
    rng = np.random.default_rng(0)
    kls = []
    for _ in range(30):
        metrics = train_step(model, opt, *task.batch(rng, 8)[:3])
        kls.append(float(metrics.indexer_loss))
        assert len(metrics) == 2 and metrics.loss is metrics[0]
    assert np.isfinite(kls).all() and kls[0] > 0
    assert np.mean(kls[-5:]) < 0.5 * np.mean(kls[:3]), kls
    after = nnx.state(model, nnx.All(nnx.Param, nnx.Not(indexer_filter())))
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)


def test_train_step_unchanged_without_dsa():
    """A model without DSA layers: same losses as the plain step (LM loss only), indexer 0."""
    from sparse_jax.train import masked_cross_entropy

    @nnx.jit
    def plain_step(model, optimizer, tokens, targets, mask):
        def loss_fn(model):
            return masked_cross_entropy(model(tokens)[0], targets, mask)
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    task = NeedleTask(seq_len=16, num_values=4, num_noise=8)
    model = SparseLM(small_config("WF", vocab_size=task.vocab_size), rngs=nnx.Rngs(0))
    ref = nnx.clone(model)
    opt, ref_opt = make_optimizer(model, 1e-2, warmup=1), make_optimizer(ref, 1e-2, warmup=1)
    rng = np.random.default_rng(0)
    for _ in range(3):
        batch = task.batch(rng, 4)[:3]
        metrics = train_step(model, opt, *batch)
        assert float(metrics.indexer_loss) == 0.0
        np.testing.assert_allclose(float(metrics.loss), float(plain_step(ref, ref_opt, *batch)), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(ref, nnx.Param))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_layer_registry_builds_every_letter():
    """`LAYER_KINDS` is the one map from letter to layer: `make_attention` builds its class
    with its options for every letter, and every layer has the one interface
    (`AttentionLayer`: `__call__`, `init_cache`, `forward`)."""
    from sparse_jax.layers.base import AttentionLayer
    from sparse_jax.models.lm import LAYER_KINDS, LAYER_TYPES, make_attention

    assert set(LAYER_TYPES) == set(LAYER_KINDS)
    cfg = small_config("F")
    for letter, kind in LAYER_KINDS.items():
        layer = make_attention(letter, cfg, nnx.Rngs(0))
        assert type(layer) is kind.layer and isinstance(layer, AttentionLayer), letter
    with pytest.raises(ValueError, match="unknown layer type"):
        make_attention("X", cfg, nnx.Rngs(0))


def test_shared_goes_through_forward_of_every_layer():
    """A layer that shares nothing passes `shared` through `forward`; HySparse's full layer
    returns its own (the one way a layer hands something to later layers)."""
    from sparse_jax.layers.hysparse import HySparseConfig

    hysparse = HySparseConfig(block_size=4, top_k_tokens=8, window=6)
    model = SparseLM(small_config("HWY", hysparse=hysparse), rngs=nnx.Rngs(0))
    x = jnp.ones((1, 8, 32))
    pos = jnp.arange(8, dtype=jnp.int32)[None]
    marker = object()
    _, _, passed = model.blocks[1].attn.forward(x, pos, None, marker)
    assert passed is marker
    _, _, made = model.blocks[0].attn.forward(x, pos, None, marker)
    assert made is not marker and made.block_indices.shape[:3] == (1, 8, 2)     # [B, T, Hkv, k]


def test_jit_decode_past_max_len_is_reported_by_checkify():
    """A jitted decode step past the caches' max_len: without checkify nothing raises (the
    token is dropped); wrapped with `checkify.checkify` the error comes back."""
    from jax.experimental import checkify

    model = SparseLM(small_config("FW"), rngs=nnx.Rngs(0))
    graph, state = nnx.split(model)

    @jax.jit
    def step(state, tokens, positions, caches):
        return nnx.merge(graph, state)(tokens, positions, caches)

    caches = model.init_cache(1, 4)
    tokens = jnp.zeros((1, 4), jnp.int32)
    _, caches = step(state, tokens, jnp.arange(4, dtype=jnp.int32)[None], caches)
    err, _ = checkify.checkify(step)(state, tokens[:, :1], jnp.asarray([[3]], jnp.int32), caches)
    assert err.get() is None
    err, _ = checkify.checkify(step)(state, tokens[:, :1], jnp.asarray([[4]], jnp.int32), caches)
    assert "beyond the cache (max_len=4)" in str(err.get())
    with pytest.raises(ValueError, match="beyond the cache"):
        model(tokens[:, :1], jnp.asarray([[4]], jnp.int32), caches)
