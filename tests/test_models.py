"""SparseLM, the needle task, the training step and the demo script."""

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
