"""Checkpoints: a SIGKILLed `experiments/train.py` resumes with the identical loss sequence;
damaged or unfinished checkpoints are skipped with a message and never loaded."""

import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sparse_jax.checkpoint import COMMIT_MARKER, CheckpointConfig, Checkpointer
from sparse_jax.data import step_rng
from sparse_jax.models.lm import LMConfig, SparseLM
from sparse_jax.train import make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "experiments", "train.py")
TINY = ["--layer_spec=F", "--d_model=16", "--heads=2", "--seq_len=16", "--batch=2",
        "--steps=12", "--save_every=4", "--keep=2"]


def _env(cache_dir):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1",
               # runs 2 and 3 reuse run 1's compiled step: the test then takes seconds, not tens
               JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _losses(workdir):
    """{step: loss} and the logged steps in order; a line still being written is left out."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.endswith("\n")]
    return {r["step"]: r["loss"] for r in records}, [r["step"] for r in records]


def _train(workdir, env, *extra):
    return subprocess.run([sys.executable, TRAIN, f"--workdir={workdir}", *TINY, *extra], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """An uninterrupted 12-step run: (workdir, env with the shared compilation cache)."""
    root = tmp_path_factory.mktemp("runs")
    env = _env(root / "jax_cache")
    done = _train(root / "a", env)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "a", env


def test_sigkilled_run_resumes_with_identical_losses(run_a, tmp_path):
    a, env = run_a
    b = tmp_path / "b"
    losses_a, steps_a = _losses(a)
    assert steps_a == list(range(1, 13))
    assert glob.glob(str(a / "tb" / "events.out.tfevents.*"))

    # run B, slowed down, SIGKILLed once it has logged step 6 (not a save step: 5, 6 are lost)
    log = tmp_path / "b_killed.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, TRAIN, f"--workdir={b}", *TINY, "--step_delay=0.5"],
                                env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(b / "metrics.jsonl") and max(_losses(b)[1], default=0) >= 6:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        assert proc.wait(timeout=60) == -signal.SIGKILL, log.read_text()[-3000:]
    finally:
        proc.kill()
    killed, killed_steps = _losses(b)
    last_logged = max(killed_steps)
    assert last_logged < 12 and last_logged % 4 != 0, killed_steps
    assert all(killed[s] == losses_a[s] for s in killed_steps)

    resumed = _train(b, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint step 4" in resumed.stdout, resumed.stdout + resumed.stderr[-2000:]
    losses_b, steps_b = _losses(b)
    assert steps_b == list(range(1, 13))            # the lost steps' lines were replaced
    assert losses_b == losses_a                      # exactly, step for step


def test_evaluate_reads_the_latest_checkpoint(run_a, tmp_path):
    a, env = run_a
    out = tmp_path / "eval.jsonl"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "evaluate.py"),
                           f"--workdir={a}", "--batch=2", "--batches=1", "--seq_lens=16,24",
                           "--distances=2,20", f"--out={out}"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in open(out)]
    assert [(r["seq_len"], r["min_distance"]) for r in rows] == [(16, 2), (16, 20), (24, 2), (24, 20)]
    assert all(r["step"] == 12 and r["task"] == "needle" for r in rows)
    assert rows[1]["accuracy"] is None                        # a needle 20 back does not fit in 16
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["sequences"] == 2 for r in rows if r is not rows[1])
    assert "exact match" in done.stdout


def _tiny_model():
    model = SparseLM(LMConfig(vocab_size=32, layer_spec="F", d_model=16, num_heads=2), rngs=nnx.Rngs(0))
    return model, make_optimizer(model, total_steps=10)


def _params(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _save_three(directory):
    """Steps 1, 2, 3, each with parameters shifted by the step; returns their parameters."""
    model, opt = _tiny_model()
    saved = {}
    with Checkpointer(directory, CheckpointConfig(save_every=1, keep=5, async_save=True)) as ckpt:
        for step in (1, 2, 3):
            state = nnx.state(model, nnx.Param)
            nnx.update(model, jax.tree.map(lambda x: x + 1.0, state))
            saved[step] = _params(model)
            assert ckpt.save(step, model, opt, extra={"note": "t"})
    return saved


def _data_files(step_dir):
    """Every OCDBT data file of the model item. All of them, not the largest: OCDBT is
    copy-on-write, so a step's folder can keep files of superseded b-tree versions that no
    restore reads, and the largest was one of them in a loaded full-suite run (the truncated
    case then restored step 3: a flaky test)."""
    files = [f for f in glob.glob(os.path.join(step_dir, "model", "**", "d", "*"), recursive=True)
             if os.path.isfile(f)]
    assert files, f"no OCDBT data files under {step_dir}/model"
    return files


def _truncate_data_files(step_dir):
    for f in _data_files(step_dir):
        os.truncate(f, os.path.getsize(f) // 2)


def _flip_bytes(step_dir):
    for f in _data_files(step_dir):
        data = bytearray(open(f, "rb").read())
        for i in range(min(64, len(data) // 4), len(data), 101):
            data[i] ^= 0xFF
        open(f, "wb").write(bytes(data))


def _tamper_checksum(step_dir):
    path = os.path.join(step_dir, "meta", "metadata")
    meta = json.load(open(path))
    meta["crc32"]["model"] ^= 1
    json.dump(meta, open(path, "w"))


CORRUPTIONS = {
    "truncated files": (_truncate_data_files, "restore failed"),
    "flipped bytes": (_flip_bytes, ""),                      # orbax or our checksum catches it
    "commit marker removed": (lambda d: os.remove(os.path.join(d, COMMIT_MARKER)), "no commit marker"),
    "model item deleted": (lambda d: shutil.rmtree(os.path.join(d, "model")), "restore failed"),
    "checksum mismatch": (_tamper_checksum, "checksum mismatch"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_damaged_newest_checkpoint_is_skipped(tmp_path, kind, caplog):
    saved = _save_three(tmp_path)
    damage, reason = CORRUPTIONS[kind]
    damage(str(tmp_path / "3"))
    reader, _ = _tiny_model()
    with Checkpointer(tmp_path, read_only=True) as ckpt:        # a reader: skips, changes nothing
        assert ckpt.restore_latest(reader).step == 2
        with pytest.raises(ValueError, match="read_only"):
            ckpt.save(4, reader, force=True)
    assert os.path.isdir(tmp_path / "3") and not os.path.exists(tmp_path / "3.bad-0")
    for got, want in zip(_params(reader), saved[2]):
        np.testing.assert_array_equal(got, want)
    model, opt = _tiny_model()
    fresh = _params(model)
    with caplog.at_level(logging.WARNING), Checkpointer(tmp_path) as ckpt:
        restored = ckpt.restore_latest(model, opt)
        assert restored.step == 2 and restored.meta["data_position"] == 2
        assert restored.meta["extra"] == {"note": "t"}
        assert [s for s, _ in restored.skipped] == [3] and reason in restored.skipped[0][1]
        assert "checkpoint step 3" in caplog.text and "skipped" in caplog.text
        for got, want, init in zip(_params(model), saved[2], fresh):
            np.testing.assert_array_equal(got, want)
            assert not np.array_equal(got, init)
        assert os.path.isdir(tmp_path / "3.bad-0")          # set aside, and step 3 can be saved again
        assert ckpt.save(3, model, opt, force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2, 3]


def test_unfinished_save_is_reported_and_all_bad_loads_nothing(tmp_path, caplog):
    _save_three(tmp_path)
    os.rename(tmp_path / "3", tmp_path / "3.orbax-checkpoint-tmp-1234")    # killed mid-save
    for step in (1, 2):
        os.remove(tmp_path / str(step) / COMMIT_MARKER)
    model, opt = _tiny_model()
    fresh = _params(model)
    with caplog.at_level(logging.WARNING), Checkpointer(tmp_path) as ckpt:
        assert "checkpoint step 3" in caplog.text and "unfinished save" in caplog.text
        restored = ckpt.restore_latest(model, opt)
    assert restored.step is None and [s for s, _ in restored.skipped] == [2, 1]
    for got, init in zip(_params(model), fresh):
        np.testing.assert_array_equal(got, init)


class _WithRngs(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.arange(3.0))
        self.rngs = nnx.Rngs(dropout=7)


def test_prng_keys_and_optimizer_state_round_trip(tmp_path):
    model = _WithRngs()
    opt = nnx.Optimizer(model, optax.adam(0.1), wrt=nnx.Param)
    opt.update(model, jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param)))
    model.rngs.dropout()                                     # advance the key's counter
    want_opt = [np.asarray(x) for x in jax.tree.leaves(nnx.state(opt))]
    with Checkpointer(tmp_path, CheckpointConfig(save_every=5)) as ckpt:
        assert not ckpt.save(3, model, opt)                  # not a multiple of save_every
        assert ckpt.save(5, model, opt)
    other = _WithRngs()
    other_opt = nnx.Optimizer(other, optax.adam(0.1), wrt=nnx.Param)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore_latest(other, other_opt).step == 5
    np.testing.assert_array_equal(other.w[...], model.w[...])
    got_opt = [np.asarray(x) for x in jax.tree.leaves(nnx.state(other_opt))]
    assert len(got_opt) == len(want_opt) and int(other_opt.step[...]) == 1
    for g, w in zip(got_opt, want_opt):
        np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(jax.random.key_data(other.rngs.dropout()),
                                  jax.random.key_data(model.rngs.dropout()))


def test_step_rng_is_a_pure_function_of_seed_and_step():
    assert np.array_equal(step_rng(3, 7).integers(1000, size=8), step_rng(3, 7).integers(1000, size=8))
    assert not np.array_equal(step_rng(3, 7).integers(1000, size=8), step_rng(3, 8).integers(1000, size=8))
    with pytest.raises(ValueError, match="step"):
        step_rng(0, -1)


def test_train_help_explains_itself():
    out = subprocess.run([sys.executable, TRAIN, "--help"], env=dict(os.environ, PYTHONPATH=ROOT),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for word in ("--workdir", "--layer_spec", "--task", "--steps", "--save_every", "--keep",
                 "resumes", "metrics.jsonl", "evaluate.py"):
        assert word in out.stdout, word


def test_checkpoint_config_validates():
    with pytest.raises(ValueError, match="save_every"):
        CheckpointConfig(save_every=0)
    with pytest.raises(ValueError, match="keep"):
        CheckpointConfig(keep=0)


def test_sharded_state_restores_onto_its_mesh(tmp_path):
    from sparse_jax.sharding import make_mesh, shard_model
    mesh = make_mesh(fsdp=2, tensor=4)
    model, opt = _tiny_model()
    shard_model(model, mesh, opt)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(1, model, opt, force=True)
    other, other_opt = _tiny_model()
    nnx.update(other, jax.tree.map(lambda x: x * 0.0, nnx.state(other, nnx.Param)))
    shard_model(other, mesh, other_opt)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore_latest(other, other_opt).step == 1
    pairs = zip(jax.tree.leaves(nnx.state((model, opt))), jax.tree.leaves(nnx.state((other, other_opt))))
    for want, got in pairs:
        assert got.sharding.is_equivalent_to(want.sharding, want.ndim)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert any(len(x.sharding.device_set) > 1 for x in jax.tree.leaves(nnx.state(other)))
