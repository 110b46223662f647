"""Train a SparseLM on a synthetic long-context task, with checkpoints that survive a kill.

Everything lives in `--workdir`: `config.json` (the run's settings), `checkpoints/` (orbax:
model, optimizer, step; saved asynchronously every `--save_every` steps, newest `--keep`
kept), `metrics.jsonl` (one line per step: step, loss, accuracy, tokens_per_s) and
`tb/` (TensorBoard event files: `tensorboard --logdir <workdir>/tb`).

Run the same command again and it resumes from the newest good checkpoint (a damaged or
half-written one is skipped with a message): the data stream is a pure function of
(seed, step), so a resumed run continues with exactly the losses an uninterrupted one has.

    # a hybrid (sliding window, full every 2nd layer) on needle retrieval: ~1 CPU-minute
    python experiments/train.py --workdir=/tmp/run1 --layer_spec=WF --steps=300
    # continue it later to the same --steps (or after a crash): same command
    python experiments/train.py --workdir=/tmp/run1 --layer_spec=WF --steps=300
    # the RULER-style suite (sparse_jax/tasks.py), NSA layers, longer sequences
    python experiments/train.py --workdir=/tmp/run2 --task=ruler --layer_spec=NNNN --seq_len=256
    # then evaluate by distance bucket
    python experiments/evaluate.py --workdir=/tmp/run1

Layer letters (`--layer_spec`, one per layer): F full, W sliding window, S StreamingLLM,
P static pattern (`--pattern`), N native sparse attention, H/Y HySparse full/sparse, M MoBA
(see sparse_jax/models/lm.py), e.g. `--layer_spec=PF --pattern=longformer:16`.

`config.json` is written once the first step has run, so a command that fails at once (a
wrong `--impl`, a kernel this platform cannot run) leaves nothing that blocks the corrected one.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging
from flax import nnx

from sparse_jax import patterns
from sparse_jax.checkpoint import CheckpointConfig, Checkpointer
from sparse_jax.data import NeedleTask, step_rng
from sparse_jax.models.lm import LMConfig, SparseLM
from sparse_jax.train import make_optimizer, train_step

from script_io import MetricsLog, run as run_script, write_atomic  # experiments/script_io.py

# Settings that define a run: recorded in <workdir>/config.json, checked on resume.
RUN_KEYS = ("task", "seq_len", "layer_spec", "d_model", "heads", "kv_heads", "window", "impl",
            "steps", "batch", "lr", "warmup", "seed", "pattern", "pattern_block")

# `--pattern` names: NAME or NAME:INT,INT,... calls sparse_jax.patterns.NAME(INT, INT, ...)
PATTERNS = {
    "causal_window": patterns.causal_window,               # window[, num_sinks]
    "longformer": patterns.longformer,                     # window[, num_global[, dilation]]
    "bigbird": patterns.bigbird,                           # block[, window / global / random blocks]
    "strided": patterns.sparse_transformer_strided,        # stride
    "fixed": patterns.sparse_transformer_fixed,            # block[, summary]
}


def define_flags():
    """Registers this script's flags (called by `__main__`, so `evaluate.py` can import the
    helpers below without them)."""
    flags.DEFINE_string("workdir", None, "Folder for config.json, checkpoints/, metrics.jsonl and "
                        "tb/; an existing run there is resumed.", required=True)
    flags.DEFINE_string("task", "needle", "Task: 'needle' (sparse_jax.data.NeedleTask), 'ruler' (all "
                        "RULER-style tasks of sparse_jax/tasks.py, mixed) or comma-separated names "
                        "from its TASKS registry, e.g. 'single_needle,multiquery'.")
    flags.DEFINE_integer("seq_len", 128, "Training sequence length (tokens).")
    flags.DEFINE_string("layer_spec", "WF", "One letter per layer: F full, W sliding window, "
                        "S StreamingLLM, P static pattern (--pattern), N NSA, H/Y HySparse, M MoBA.")
    flags.DEFINE_string("pattern", None, "Pattern of the P layers: NAME or NAME:INT,INT,... with NAME "
                        f"one of {', '.join(PATTERNS)} (sparse_jax.patterns; strided = "
                        "sparse_transformer_strided, fixed = sparse_transformer_fixed), e.g. "
                        "longformer:16 or bigbird:16.")
    flags.DEFINE_integer("pattern_block", None, "Block size of the P layers' block-sparse metadata; "
                         "default LMConfig's (64).")
    flags.DEFINE_integer("d_model", 64, "Model width.")
    flags.DEFINE_integer("heads", 4, "Query heads.")
    flags.DEFINE_integer("kv_heads", None, "KV heads (grouped-query attention); default = --heads.")
    flags.DEFINE_integer("window", 16, "Sliding window of W/S layers (tokens, query included).")
    flags.DEFINE_string("impl", "auto", "Attention implementation: auto, xla, or a kernel backend.")
    flags.DEFINE_integer("steps", 1000, "Total optimizer steps of the run (resuming counts from "
                         "the checkpoint's step).")
    flags.DEFINE_integer("batch", 32, "Sequences per step.")
    flags.DEFINE_float("lr", 3e-3, "Peak learning rate (AdamW, linear warmup then cosine decay).")
    flags.DEFINE_integer("warmup", None, "Warmup steps; default steps // 10.")
    flags.DEFINE_integer("seed", 0, "Seed of the parameters and of the data stream.")
    flags.DEFINE_integer("save_every", 100, "Save a checkpoint every this many steps (and at the end).")
    flags.DEFINE_integer("keep", 3, "Newest checkpoints kept.")
    flags.DEFINE_bool("async_save", True, "Write checkpoints in the background while training runs.")
    flags.DEFINE_float("step_delay", 0.0, "Seconds to sleep after each step (0: none); lets a test "
                       "or a demo kill the run part-way.")


def task_names(task: str) -> list[str]:
    """The single tasks a `--task` value mixes: ['needle'], or names of sparse_jax.tasks.TASKS."""
    if task == "needle":
        return ["needle"]
    try:
        from sparse_jax import tasks
    except ImportError as e:
        raise ValueError(f"task {task!r} needs sparse_jax/tasks.py (RULER-style tasks): {e}") from e
    names = list(tasks.TASKS) if task == "ruler" else task.split(",")
    unknown = sorted(set(names) - set(tasks.TASKS))
    if unknown:
        raise ValueError(f"task: unknown {unknown}; choose 'needle', 'ruler' or names from "
                         f"{sorted(tasks.TASKS)}")
    return names


def make_sampler(task: str, seq_len: int):
    """`(sample, vocab_size)`: `sample(rng, batch, min_distance=None)` returns tokens,
    targets `[B, T]` int32 and the loss mask `[B, T]` float32 (rows cycle through the
    tasks of `task_names(task)`). `min_distance`: the facts the answer needs lie at least
    this many tokens back (None: anywhere)."""
    names = task_names(task)
    if names == ["needle"]:
        needle = NeedleTask(seq_len=seq_len)

        def sample(rng, batch, min_distance=None):
            return needle.batch(rng, batch, min_distance=max(2, min_distance or 2))[:3]
        return sample, needle.vocab_size
    from sparse_jax import tasks

    def sample(rng, batch, min_distance=None):
        return tasks.mixed_batch(rng, names, batch, seq_len, min_distance or 0)
    return sample, tasks.VOCAB_SIZE


def parse_pattern(text: str) -> patterns.Pattern:
    """The `sparse_jax.patterns.Pattern` of a `--pattern` value: 'NAME' or 'NAME:INT,INT,...'
    (NAME a key of `PATTERNS`, the integers its positional arguments)."""
    name, _, args = text.partition(":")
    if name not in PATTERNS:
        raise ValueError(f"pattern: unknown name {name!r} in {text!r}; expected NAME or NAME:INT,..."
                         f" with NAME one of {sorted(PATTERNS)}")
    try:
        values = [int(a) for a in args.split(",")] if args else []
    except ValueError:
        raise ValueError(f"pattern: arguments of {text!r} must be integers, e.g. longformer:16") from None
    try:
        return PATTERNS[name](*values)
    except TypeError as e:
        raise ValueError(f"pattern: {text!r} does not fit {name}: {e}") from None


def build_model(run: dict, vocab_size: int) -> SparseLM:
    """The SparseLM of a run config (`RUN_KEYS`), initialised from `run['seed']`. Raises
    ValueError for settings that do not fit together (e.g. P layers without a pattern)."""
    has_p = "P" in run["layer_spec"]
    if has_p != (run.get("pattern") is not None):
        raise ValueError("--layer_spec has P layers: set --pattern, e.g. --pattern=longformer:16" if has_p
                         else f"--pattern={run['pattern']} is only used by P layers, and --layer_spec="
                              f"{run['layer_spec']} has none")
    extra = {} if not has_p else dict(pattern=parse_pattern(run["pattern"]))
    if has_p and run.get("pattern_block") is not None:
        extra["pattern_block"] = run["pattern_block"]
    config = LMConfig(vocab_size=vocab_size, layer_spec=run["layer_spec"], d_model=run["d_model"],
                      num_heads=run["heads"], num_kv_heads=run["kv_heads"], window=run["window"],
                      impl=run["impl"], **extra)
    return SparseLM(config, rngs=nnx.Rngs(run["seed"]))


def read_run_config(workdir: str) -> dict | None:
    """The settings saved in `<workdir>/config.json`, or None without one. Raises ValueError
    (naming the file) when it is not a JSON object."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            run = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable JSON file ({e}); delete it or use another --workdir") from None
    if not isinstance(run, dict):
        raise ValueError(f"{path} holds {type(run).__name__}, not a JSON object of run settings")
    return run


def make_workdir(workdir: str):
    """Makes the folder `workdir` (kept if there); app.UsageError if it cannot be one."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise app.UsageError(f"--workdir={workdir} is a file, not a folder")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise app.UsageError(f"--workdir={workdir}: cannot make this folder ({e})") from e


def main(argv):
    del argv
    from tqdm import tqdm

    logging.set_verbosity(logging.WARNING)      # orbax logs every file at INFO
    F = flags.FLAGS
    run = {key: getattr(F, key) for key in RUN_KEYS}
    run["warmup"] = F.steps // 10 if F.warmup is None else F.warmup
    for key in ("steps", "batch", "seq_len"):
        if run[key] < 1:
            raise app.UsageError(f"--{key} must be >= 1, got {run[key]}")
    make_workdir(F.workdir)
    try:
        sample, vocab_size = make_sampler(run["task"], run["seq_len"])
        model = build_model(run, vocab_size)
        ckpt_config = CheckpointConfig(save_every=F.save_every, keep=F.keep, async_save=F.async_save)
        previous = read_run_config(F.workdir)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    # a config.json of before --pattern lacks its keys: their None matches
    diff = {} if previous is None else {
        k: (previous.get(k), run[k]) for k in RUN_KEYS if previous.get(k) != run[k]}
    if diff:
        raise app.UsageError(f"{F.workdir} holds a run with other settings (saved, given): {diff}; "
                             "use a new --workdir or the same flags")
    config_path = os.path.join(F.workdir, "config.json")

    optimizer = make_optimizer(model, run["lr"], warmup=run["warmup"], total_steps=run["steps"])
    with Checkpointer(os.path.join(F.workdir, "checkpoints"), ckpt_config) as ckpt:
        restored = ckpt.restore_latest(model, optimizer)
        start = restored.step or 0
        if start:
            print(f"resumed from checkpoint step {start} in {ckpt.directory}", flush=True)
        tokens_per_step = run["batch"] * run["seq_len"]
        bar = tqdm(range(start + 1, run["steps"] + 1), initial=start, total=run["steps"],
                   desc="train", ncols=100, mininterval=1.0)
        # metrics past the checkpoint (a killed run's lost steps) are dropped, then appended
        with MetricsLog(os.path.join(F.workdir, "metrics.jsonl"), resume_from=start) as metrics:
            last = time.perf_counter()
            for step in bar:
                tokens, targets, mask = sample(step_rng(run["seed"], step), run["batch"])
                try:
                    loss, acc = train_step(model, optimizer, tokens, targets, mask)
                except ValueError as e:
                    if previous is not None:
                        raise
                    raise app.UsageError(f"the first training step failed (check --impl and the "
                                         f"layer flags): {e}") from e
                if previous is None:        # the first step ran: the settings work here
                    write_atomic(config_path, json.dumps(run, indent=2))
                    previous = run
                loss, acc = float(loss), float(acc)
                now = time.perf_counter()
                record = dict(step=step, loss=loss, accuracy=acc,
                              tokens_per_s=tokens_per_step / (now - last))
                last = now
                metrics.write(record, step=step, tag="train")
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.2f}", refresh=False)
                ckpt.save(step, model, optimizer, force=step == run["steps"], extra={"seed": run["seed"]})
                if F.step_delay:
                    time.sleep(F.step_delay)
                    last = time.perf_counter()
    print(f"done: step {run['steps']}, workdir {F.workdir}", flush=True)


if __name__ == "__main__":
    define_flags()
    run_script(main)
