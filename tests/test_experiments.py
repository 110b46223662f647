"""The experiment scripts: `--help` explains each and exits 0 (every script, with and without
the repo root on PYTHONPATH); a usage error is a short message; metrics go to JSONL and
TensorBoard (`experiments/script_io.MetricsLog`, read back here from the event files); one tiny
real run of `compare_hybrids.py` writes all its outputs; `train.py` / `evaluate.py` refuse
bad flags and workdirs with one clear line and leave nothing that blocks the corrected command."""

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
    "verified_bound.py": ["--workdir", "--epsilons", "--deltas", "--estimates",
                          "python experiments/verified_bound.py"],
    "bench_kernels.py": ["--out", "--seq_lens", "--heads", "--block_sparse", "--scores", "--mosaic_gpu",
                         "python experiments/bench_kernels.py"],
}


# every runnable script of experiments/ (script_io.py and peers.py are shared modules)
SCRIPTS = sorted(name for name in os.listdir(EXPERIMENTS)
                 if name.endswith(".py") and name not in ("script_io.py", "peers.py")) + ["bench_all.sh"]
TINY_TRAIN = ["--steps=2", "--batch=2", "--seq_len=32", "--d_model=16", "--heads=1", "--window=4"]


def _env(pythonpath=True):
    """Subprocess environment: CPU, one device; the repo root on PYTHONPATH or no PYTHONPATH
    (as a user runs the scripts with the venv's python from the repo root)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = ROOT
    return env


def _command(name, *args):
    if name.endswith(".sh"):
        return ["bash", os.path.join("experiments", name), *args]
    return [sys.executable, os.path.join("experiments", name), *args]


def _run(name, *args, timeout=300):
    """Runs experiments/`name` from the repo root (no PYTHONPATH); the CompletedProcess."""
    return subprocess.run(_command(name, *args), cwd=ROOT, env=_env(pythonpath=False),
                          capture_output=True, text=True, timeout=timeout)


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


# Runs each script's `--help` as `python experiments/<name> --help` would, in a child forked
# from one interpreter that has imported the heavy modules once (each script's imports took
# ~2 CPU-s; 28 fresh interpreters were ~45 CPU-s of the suite). Per child: `sys.path` is the
# script's folder, then the repo root only with PYTHONPATH, then the interpreter's own path
# (the working folder of `-c` left out, as `python script.py` has it); `sys.argv`, `__main__`
# and `__file__` as for the real command. Prints one JSON line: [[name, pythonpath, exit
# status, stdout, stderr], ...].
HELP_RUNNER = r"""
import json, os, runpy, signal, sys, tempfile, traceback
root, names = sys.argv[1], sys.argv[2:]
base = sys.path[1:]                       # without `-c`'s working folder
import numpy, jax, jax.numpy, flax.nnx, optax, absl.app, absl.flags, absl.logging, tqdm, tensorboardX
import orbax.checkpoint, sparse_jax, sparse_jax.models.lm, sparse_jax.train, sparse_jax.checkpoint
assert "experiments" not in sys.modules and "script_io" not in sys.modules
results = []
for pythonpath in (False, True):
    for name in names:
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        sys.stdout.flush(); sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            signal.alarm(300)
            os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)
            sys.path[:] = [os.path.join(root, "experiments")] + ([root] if pythonpath else []) + base
            if pythonpath:
                os.environ["PYTHONPATH"] = root
            sys.argv = [os.path.join("experiments", name), "--help"]
            code = 0
            try:
                runpy.run_path(os.path.join("experiments", name), run_name="__main__")
            except SystemExit as e:
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:
                    print(e.code, file=sys.stderr); code = 1
            except BaseException:
                traceback.print_exc(); code = 1
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0); err.seek(0)
        results.append([name, pythonpath, os.waitstatus_to_exitcode(status), out.read(), err.read()])
print(json.dumps(results))
"""


def test_every_script_help_exits_0_and_prints_usage():
    """Every script of experiments/, run from the repo root with and without the repo root on
    PYTHONPATH: `--help` prints its docstring and exits 0, without starting any work (four
    imported `experiments.` and crashed without PYTHONPATH; several exited 1; bench_all.sh
    started the whole benchmark run). The scripts of HELP show their main flags, a command
    to run and where the metrics go. The Python scripts run in children of one interpreter
    (HELP_RUNNER); bench_all.sh in bash."""
    python = [name for name in SCRIPTS if name.endswith(".py")]
    done = subprocess.run([sys.executable, "-c", HELP_RUNNER, ROOT, *python], cwd=ROOT, env=_env(False),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [tuple(r) for r in json.loads(done.stdout.strip().splitlines()[-1])]
    assert sorted((name, pp) for name, pp, *_ in runs) == sorted((n, pp) for n in python for pp in (False, True))
    for pythonpath in (False, True):
        shell = subprocess.run(_command("bench_all.sh", "--help"), cwd=ROOT, env=_env(pythonpath),
                               capture_output=True, text=True, timeout=300)
        runs.append(("bench_all.sh", pythonpath, shell.returncode, shell.stdout, shell.stderr))
    failures = []
    for name, pythonpath, code, out, err in runs:
        if code != 0 or len(out.strip().splitlines()) < 2:
            failures.append((name, pythonpath, code, err[-1500:]))
        elif name in HELP:
            missing = [w for w in HELP[name] if w not in out]
            if missing or not ("TensorBoard" in out or "tensorboard" in out):   # where the metrics go
                failures.append((name, pythonpath, "--help lacks", missing))
    assert not failures


def test_usage_error_is_one_short_message(tmp_path):
    """absl printed the whole flag help (~78 lines) before a usage error's message."""
    done = _run("train.py", f"--workdir={tmp_path / 'run'}", "--steps=0")
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) <= 3 and "--steps must be >= 1, got 0" in lines[0], done.stderr[-3000:]


def test_train_failed_first_step_leaves_no_config_and_corrected_command_runs(tmp_path):
    """A first step that fails (an unknown --impl; a kernel that cannot run on CPU) writes no
    config.json, so the corrected command is not refused as 'a run with other settings'."""
    bad = {impl: subprocess.Popen(_command("train.py", f"--workdir={tmp_path / impl}", f"--impl={impl}",
                                           *TINY_TRAIN), cwd=ROOT, env=_env(False), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for impl in ("foo", "triton")}
    for impl, proc in bad.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode != 0 and "the first training step failed" in err, err[-3000:]
        assert "Traceback" not in err and not (tmp_path / impl / "config.json").exists()
    good = _run("train.py", f"--workdir={tmp_path / 'foo'}", *TINY_TRAIN)
    assert good.returncode == 0, good.stderr[-3000:]
    assert json.loads((tmp_path / "foo" / "config.json").read_text())["impl"] == "auto"


def test_train_workdir_that_is_a_file_is_a_clear_error(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    done = _run("train.py", f"--workdir={path}", *TINY_TRAIN)
    assert done.returncode != 0
    assert f"--workdir={path} is a file, not a folder" in done.stderr and "Traceback" not in done.stderr


def test_train_pattern_layers(tmp_path):
    """`--layer_spec=P...` trains with `--pattern` (and `--pattern_block`); `evaluate.py`
    rebuilds the same model from config.json."""
    workdir = tmp_path / "run"
    done = _run("train.py", f"--workdir={workdir}", "--layer_spec=PF", "--pattern=longformer:8,1",
                "--pattern_block=8", *TINY_TRAIN)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads((workdir / "config.json").read_text())
    assert (run["pattern"], run["pattern_block"]) == ("longformer:8,1", 8)
    done = _run("evaluate.py", f"--workdir={workdir}", "--batch=2", "--batches=1", "--distances=4")
    assert done.returncode == 0 and "exact match" in done.stdout, done.stderr[-3000:]


def test_train_pattern_flags_are_checked():
    """No --pattern for P layers, a --pattern without P layers, a bad --pattern: ValueError
    (a one-line usage error in train.py) before anything is written."""
    import train
    from sparse_jax import patterns
    run = dict(layer_spec="PF", d_model=16, heads=1, kv_heads=None, window=4, impl="auto", seed=0,
               pattern=None, pattern_block=8)
    with pytest.raises(ValueError, match="set --pattern"):
        train.build_model(run, vocab_size=20)
    with pytest.raises(ValueError, match="only used by P layers"):
        train.build_model(dict(run, layer_spec="WF", pattern="strided:4"), vocab_size=20)
    assert train.build_model(dict(run, pattern="strided:4"), vocab_size=20).config.pattern_block == 8
    assert train.parse_pattern("longformer:8,2") == patterns.longformer(8, 2)
    assert train.parse_pattern("strided:4") == patterns.sparse_transformer_strided(4)
    for text, message in [("longformer:x", "must be integers"), ("bigbird:1,2,3,4,5,6,7,8", "does not fit"),
                          ("", "unknown name")]:
        with pytest.raises(ValueError, match=message):
            train.parse_pattern(text)


def test_evaluate_without_checkpoints_or_with_a_corrupt_config_is_a_clear_error(tmp_path):
    run = dict(task="needle", seq_len=32, layer_spec="WF", d_model=16, heads=1, kv_heads=None, window=4,
               impl="auto", steps=2, batch=2, lr=3e-3, warmup=0, seed=0)
    cases = {"no_checkpoints": (json.dumps(run), "checkpoints does not exist: train first"),
             "corrupt": ('{"task": "nee', "config.json is not a readable JSON file")}
    procs = {}
    for name, (text, _) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)
        procs[name] = subprocess.Popen(_command("evaluate.py", f"--workdir={tmp_path / name}"), cwd=ROOT,
                                       env=_env(False), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode != 0 and cases[name][1] in err and "Traceback" not in err, (name, err[-3000:])


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


def test_metrics_log_without_tensorboardx_fails_at_the_start(tmp_path, monkeypatch):
    """A missing tensorboardX is an error when the log opens (before any work), not at the
    first write after minutes of training; no JSONL is left behind."""
    monkeypatch.setitem(sys.modules, "tensorboardX", None)      # import -> ImportError
    with pytest.raises(ImportError, match="pip install tensorboardX"):
        MetricsLog(str(tmp_path / "m.jsonl"))
    assert not (tmp_path / "m.jsonl").exists()


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


def test_offload_decode_tiny_run_reports_bytes_and_keeps_the_store_on_the_host(tmp_path):
    """`offload_decode.py` in tiny form: offload and device variants agree, the offload one
    reports the bytes it moves, keeps the block store in host memory, and a dense variant over
    the share is skipped with its reason."""
    out = tmp_path / "offload.json"
    res = _run("offload_decode.py", "--context=600", "--heads=2", "--kv_heads=1", "--head_dim=8", "--window=64",
               "--block=16", "--sinks=4", "--top_blocks=2", "--steps=1", "--warmup=1", "--device_share_gib=0.00001",
               "--force=false", "--variants=offload,dense", f"--out={out}")
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    off, dense = data["results"]
    assert off["variant"] == "offload" and off["store_memory_kind_after"] == off["memory_kind"] == "pinned_host"
    assert off["h2d_bytes_per_step"] == 2 * 16 * 1 * 8 * 2 * 2 and off["host_bytes"] > off["device_bytes"] > 0
    assert dense["variant"] == "dense" and "device memory > share" in dense["skipped"]


@pytest.mark.slow
def test_entmax_extrapolation_tiny_run_writes_json_and_plot(tmp_path):
    """Two models at toy size; the longer evaluation length runs as a chunked prefill
    (`--eval_chunk` below it); then `--merge` rebuilds the JSON from results.jsonl."""
    out = tmp_path / "extrap"
    args = [f"--out_dir={out}", "--layers=1", "--d_model=16", "--heads=2", "--train_len=24", "--eval_mults=1,2",
            "--steps=3", "--batch=2", "--eval_rows=3", "--eval_tokens=48", "--eval_chunk=20", "--log_every=2"]
    done = subprocess.run([sys.executable, os.path.join(EXPERIMENTS, "entmax_extrapolation.py"),
                           "--models=softmax,asentmax", *args], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {"results.jsonl", "entmax_extrapolation.json", "entmax_extrapolation.png"} <= set(os.listdir(out))
    rows = json.load(open(out / "entmax_extrapolation.json"))["models"]
    assert [r["model"] for r in rows] == ["softmax", "asentmax"] and rows[1]["spec"] == "A"
    assert all(set(r["acc"]) == {"24", "48"} and 0 <= r["acc"]["48"] <= 1 for r in rows)
    merged = subprocess.run([sys.executable, os.path.join(EXPERIMENTS, "entmax_extrapolation.py"),
                             f"--out_dir={tmp_path / 'merged'}", f"--merge={out / 'results.jsonl'}"],
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert json.load(open(tmp_path / "merged" / "entmax_extrapolation.json"))["models"] == rows


def test_bench_dsa_small_runs_every_part_on_the_layer_paths(tmp_path):
    """`bench_dsa.py --small` (CPU, interpret mode) through the rows the owed GPU runs print
    (docs/pending/run.sh): the indexer as the layer calls it (explicit positions), the layer's
    own forward and forward + backward, and the backward variants, folded equal to unfolded.
    A crash here would cost a GPU call."""
    out = tmp_path / "bench_dsa.json"
    run = _run("bench_dsa.py", "--small", "--parts", "indexer,forward,attention", "--layer_positions",
               "--attention_impls", "triton", "--attention_bwd", "16:0,16:1:16:4:1", "--out", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {r["part"]: r for r in json.load(open(out))["rows"]}
    assert rows["indexer"]["sel_err"] == 0.0
    assert rows["forward"]["layer_ms"] > 0 and rows["forward"]["layer_fwdbwd_ms"] > 0
    attention = rows["attention"]
    assert attention["bwd_16rows_fold0_ms"] > 0
    assert attention["bwd_16rows_fold1_block_k16_num_warps4_num_stages1_err_vs_first"] < 1e-2


def test_nsa_selection_locality_small_counts_unions(tmp_path):
    """`nsa_selection_locality.py --small`: the `shared` control (every token of a chunk lists
    the same blocks) has union exactly n, the `uniform` one (random picks) more; the model
    rows exist per N layer and lie between 1 and tokens-per-chunk."""
    out = tmp_path / "locality.json"
    run = _run("nsa_selection_locality.py", "--small", f"--out={out}")
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {(r["model"], r["layer"]): r for r in json.load(open(out))["rows"]}
    assert set(rows) == {("shared", 0), ("uniform", 0), ("init", 0), ("init", 1), ("trained", 0), ("trained", 1)}
    shared, uniform = rows["shared", 0], rows["uniform", 0]
    for tok in (4, 8):
        assert shared[f"u{tok}_all"] == shared[f"u{tok}_free"] == 1.0
        assert uniform[f"u{tok}_all"] > 1.3 and uniform[f"u{tok}_free"] > 2.0
        assert all(1.0 <= r[f"u{tok}_all"] <= tok for r in rows.values())
    assert uniform["u8_all"] > uniform["u4_all"]
