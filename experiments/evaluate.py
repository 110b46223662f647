"""Evaluate a run of `experiments/train.py`: accuracy by context length and needle distance.

Loads `<workdir>/config.json` and the newest good checkpoint of `<workdir>/checkpoints`
(damaged ones are skipped with a message). Then, for each task of the run (a RULER-style
mix is scored task by task) and every `--seq_lens` x `--distances` pair, it draws
`--batches` x `--batch` fresh sequences whose needed facts lie at least `distance` tokens
before the answer and scores exact match (every answer token right). Prints a table and
writes one JSON line per case to `--out` (default `<workdir>/eval.jsonl`): step, task,
seq_len, min_distance, accuracy, sequences; and each accuracy as a TensorBoard scalar
`eval/<task>/T<seq_len>_d<min_distance>` at the checkpoint's step, in the `tb/` folder beside
`--out` (by default the run's own `<workdir>/tb`, next to its training curves).

    python experiments/train.py --workdir=/tmp/run1 --layer_spec=WF --steps=300
    python experiments/evaluate.py --workdir=/tmp/run1          # at T: distances 0, T/4, T/2, 3T/4
    python experiments/evaluate.py --workdir=/tmp/run1 --seq_lens=128,256 --distances=2,64,200

Evaluation sequences come from their own seeded stream (`--seed`), never the training one.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags, logging
from flax import nnx
from tqdm import tqdm

from sparse_jax.checkpoint import Checkpointer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from script_io import MetricsLog, run as run_script  # noqa: E402 (experiments/script_io.py)
from train import build_model, make_sampler, read_run_config, task_names  # noqa: E402 (experiments/train.py)

flags.DEFINE_string("workdir", None, "A workdir written by experiments/train.py.", required=True)
flags.DEFINE_list("seq_lens", [], "Context lengths to evaluate; default: the training --seq_len.")
flags.DEFINE_list("distances", [], "Minimum distances (tokens between the needed facts and the "
                  "answer) to evaluate; default: 0, T/4, T/2, 3T/4 for each length T.")
flags.DEFINE_integer("batch", 32, "Sequences per batch.")
flags.DEFINE_integer("batches", 4, "Batches per (length, distance) pair.")
flags.DEFINE_integer("seed", 1, "Seed of the evaluation stream.")
flags.DEFINE_string("out", None, "JSONL output; default <workdir>/eval.jsonl (overwritten).")


def evaluate(model, sample, batch: int, batches: int, rng, min_distance: int) -> float:
    """Fraction of `batch * batches` sequences whose answer tokens are all predicted right."""
    hits = []
    for _ in range(batches):
        tokens, targets, mask = sample(rng, batch, min_distance)
        pred = np.asarray(_predict(model, tokens))
        hits.append(np.all((pred == targets) | (mask == 0), axis=-1))
    return float(np.concatenate(hits).mean())


@nnx.jit
def _predict(model, tokens):
    """Greedy next-token predictions `[B, T]` for tokens `[B, T]`."""
    return model(tokens)[0].argmax(-1)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    F = flags.FLAGS
    try:
        run = read_run_config(F.workdir)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    if run is None:
        raise app.UsageError(f"{F.workdir} has no config.json: not a workdir of experiments/train.py")
    try:
        seq_lens = [int(x) for x in F.seq_lens] or [run["seq_len"]]
        distances = [int(x) for x in F.distances]
    except ValueError as e:
        raise app.UsageError(f"--seq_lens and --distances take integers: {e}") from e
    if F.batch < 1 or F.batches < 1:
        raise app.UsageError("--batch and --batches must be >= 1")

    try:
        model = build_model(run, make_sampler(run["task"], run["seq_len"])[1])
    except (KeyError, TypeError, ValueError) as e:
        raise app.UsageError(f"{F.workdir}/config.json does not describe a run of this "
                             f"experiments/train.py ({type(e).__name__}: {e})") from e
    checkpoints = os.path.join(F.workdir, "checkpoints")
    if not os.path.isdir(checkpoints):
        raise app.UsageError(f"{checkpoints} does not exist: train first (experiments/train.py "
                             f"--workdir={F.workdir} with the run's flags)")
    with Checkpointer(checkpoints, read_only=True) as ckpt:
        restored = ckpt.restore_latest(model)
    if restored.step is None:
        raise app.UsageError(f"no usable checkpoint in {checkpoints}")

    cases = [(name, t, d) for name in task_names(run["task"]) for t in seq_lens
             for d in (distances or sorted({0, t // 4, t // 2, 3 * t // 4}))]
    rows = []
    out = F.out or os.path.join(F.workdir, "eval.jsonl")
    with MetricsLog(out) as log:
        for i, (name, seq_len, distance) in enumerate(tqdm(cases, desc="evaluate", ncols=100)):
            sample, _ = make_sampler(name, seq_len)
            # 5 seed words: never equal to a training stream's step_rng(seed, step)
            rng = np.random.default_rng([F.seed, i, seq_len, distance, 1])
            row = dict(step=restored.step, task=name, seq_len=seq_len, min_distance=distance)
            try:
                row.update(accuracy=evaluate(model, sample, F.batch, F.batches, rng, distance),
                           sequences=F.batch * F.batches)
            except ValueError as e:             # the distance does not fit this length
                row.update(accuracy=None, sequences=0, note=str(e))
            rows.append(row)
            log.write(row, step=restored.step, tag=f"eval/{name}/T{seq_len}_d{distance}", keys=["accuracy"])
    print(f"\n[{run['layer_spec']}] trained on {run['task']}, step {restored.step}: exact match")
    print(f"{'task':<18}{'seq_len':>8}{'min dist':>10}{'accuracy':>10}{'seqs':>7}")
    for r in rows:
        acc = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        print(f"{r['task']:<18}{r['seq_len']:>8}{r['min_distance']:>10}{acc:>10}{r['sequences']:>7}")
    print(f"(written to {out})")


if __name__ == "__main__":
    run_script(main)
