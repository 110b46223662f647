"""The experiment scripts: `--help` explains each and exits 0; metrics go to JSONL and
TensorBoard (`experiments/script_io.MetricsLog`, read back here from the event files); one tiny
real run of `compare_hybrids.py` writes all its outputs."""

import glob
import json
import os
import struct
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")
sys.path.insert(0, EXPERIMENTS)
from script_io import MetricsLog  # noqa: E402

# script -> words its --help must show: its main flags and a command to run
HELP = {
    "train.py": ["--workdir", "--layer_spec", "--task", "--steps", "python experiments/train.py"],
    "evaluate.py": ["--workdir", "--seq_lens", "--distances", "--out", "python experiments/evaluate.py"],
    "compare_hybrids.py": ["--preset", "--models", "--tasks", "--out_dir", "--log_every", "--merge",
                           "python experiments/compare_hybrids.py"],
    "frontier.py": ["--workdir", "--methods", "--budgets", "--jsonl", "--log_every", "python experiments/frontier.py"],
    "bench_kernels.py": ["--out", "--seq_lens", "--heads", "--block_sparse", "--scores", "--mosaic_gpu",
                         "python experiments/bench_kernels.py"],
}


def _env():
    return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_force_host_platform_device_count=1")


def read_events(folder):
    """[(tag, step, value)] of the scalars, and the purge steps, in the event files under
    `folder` (TFRecord framing: length u64, its crc u32, the Event proto, its crc u32)."""
    from tensorboardX.proto.event_pb2 import Event
    scalars, purges = [], []
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            scalars += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                purges.append(event.step)
    return scalars, purges


def test_every_script_help_exits_0_and_names_its_flags():
    """All five at once (imports dominate: seconds each)."""
    procs = {name: subprocess.Popen([sys.executable, os.path.join(EXPERIMENTS, name), "--help"], env=_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in HELP}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, err[-2000:])
        missing = [w for w in HELP[name] if w not in out]
        assert not missing, (name, missing)
        assert "TensorBoard" in out or "tensorboard" in out, name     # where the metrics go


def test_metrics_log_writes_jsonl_and_tensorboard(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with MetricsLog(str(path)) as log:
        for step in (1, 2, 3):
            log.write(dict(step=step, loss=1.0 / step, accuracy=None, note="x"), step=step, tag="train")
        log.write(dict(model="a", step=3, acc=0.25, flag=True), step=3, tag="eval", keys=["acc", "flag"], run="a")
    lines = [json.loads(line) for line in open(path)]
    assert lines[0] == dict(step=1, loss=1.0, accuracy=None, note="x") and len(lines) == 4
    scalars, purges = read_events(tmp_path / "run" / "tb")
    assert scalars == [("train/loss", s, pytest.approx(1.0 / s)) for s in (1, 2, 3)]   # no None, str
    assert purges == []
    assert read_events(tmp_path / "run" / "tb" / "a")[0] == [("eval/acc", 3, 0.25)]    # bool left out

    # a killed run resumed from its step-2 checkpoint: steps 3.. dropped, a cut line too
    with open(path, "a") as f:
        f.write('{"step": 4, "lo')
    with MetricsLog(str(path), resume_from=2) as log:
        log.write(dict(step=3, loss=7.0), step=3, tag="train")
    assert [(r["step"], r.get("loss")) for r in map(json.loads, open(path))] == [(1, 1.0), (2, 0.5), (3, 7.0)]
    scalars, purges = read_events(tmp_path / "run" / "tb")
    assert purges == [3] and scalars[-1] == ("train/loss", 3, 7.0)

    with pytest.raises(ValueError, match="resume_from"):
        MetricsLog(str(path), resume_from=-1)


def test_compare_hybrids_tiny_run_writes_results_and_metrics(tmp_path):
    out = tmp_path / "hybrids"
    done = subprocess.run(
        [sys.executable, os.path.join(EXPERIMENTS, "compare_hybrids.py"), f"--out_dir={out}", "--models=swa",
         "--tasks=single_needle", "--layers=1", "--d_model=8", "--heads=1", "--window=4", "--train_len=16",
         "--eval_lens=12,16", "--steps=3", "--batch=2", "--eval_batches=1", "--log_every=2"],
        env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {"results.jsonl", "results.md", "hybrids.png", "metrics.jsonl", "tb"} <= set(os.listdir(out))
    (result,) = [json.loads(line) for line in open(out / "results.jsonl")]
    assert result["model"] == "swa" and set(result["acc"]) == {"12", "16"}
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3]
    assert [(r["eval_len"], r["single_needle"]) for r in lines if "eval_len" in r] == [
        (12, result["acc"]["12"]["single_needle"]), (16, result["acc"]["16"]["single_needle"])]
    scalars, _ = read_events(out / "tb" / "swa")
    tags = {tag for tag, _, _ in scalars}
    assert {"train/loss", "train/accuracy", "eval_T12/single_needle", "eval_T16/mean"} <= tags
    assert [s for tag, s, _ in scalars if tag == "train/loss"] == [1, 2, 3]
