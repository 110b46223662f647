"""The main job: tiny full / sliding-window / hybrid / NSA LMs on needle retrieval, one table.

Each model is trained on the same seeded stream of `NeedleTask` sequences (a `KEY v`
needle somewhere in a noise haystack; the sequence ends with `KEY`, the answer is `v`),
then evaluated on needles near the query (inside the window) and far from it (beyond the
receptive field of the stacked windows). Pure sliding-window attention cannot see far
needles; full attention, the hybrid (a global layer every few local ones) and NSA (same
window, plus compressed and selected branches) can.

    python experiments/retrieval_demo.py                  # CPU default, a few minutes
    python experiments/retrieval_demo.py --steps=1500 --seq_len=256 --window=32
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx
from tqdm import tqdm

from sparse_jax.data import NeedleTask
from sparse_jax.models.lm import LMConfig, SparseLM, hybrid_spec
from sparse_jax.ops.nsa import NSAConfig
from sparse_jax.train import count_params, eval_step, make_optimizer, train_step

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["full", "swa", "hybrid", "nsa"], "Models to train: full, swa, hybrid, streaming, nsa.")
flags.DEFINE_integer("layers", 2, "Layers per model (hybrid: a full layer every --global_every).")
flags.DEFINE_integer("global_every", 2, "Hybrid: one full-attention layer every this many layers.")
flags.DEFINE_integer("seq_len", 128, "Training and evaluation sequence length.")
flags.DEFINE_integer("window", 16, "Sliding window (tokens, query included).")
flags.DEFINE_integer("d_model", 64, "Model width.")
flags.DEFINE_integer("heads", 4, "Attention heads.")
flags.DEFINE_integer("steps", 300, "Training steps per model.")
flags.DEFINE_integer("batch", 32, "Sequences per step.")
flags.DEFINE_float("lr", 3e-3, "Peak learning rate (AdamW, warmup + cosine).")
flags.DEFINE_integer("eval_batches", 8, "Evaluation batches per distance bucket.")
flags.DEFINE_integer("seed", 0, "Seed of data and parameters.")
flags.DEFINE_string("json_out", None, "Optional path for the results as JSON.")

SPECS = {
    "full": lambda: "F" * FLAGS.layers,
    "swa": lambda: "W" * FLAGS.layers,
    "hybrid": lambda: hybrid_spec(FLAGS.layers, FLAGS.global_every),
    "streaming": lambda: "S" * FLAGS.layers,
    "nsa": lambda: "N" * FLAGS.layers,
}


def nsa_config() -> NSAConfig:
    """NSA scaled to the demo: blocks of 8 (stride 4), 6 selected blocks of 8 (the first,
    the 2 most recent and 3 chosen by the compressed branch), the same window as SWA."""
    return NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, num_selected=6, window=FLAGS.window)


def evaluate(model, task, rng, lo, hi):
    accs = []
    for _ in range(FLAGS.eval_batches):
        tokens, targets, mask, _ = task.batch(rng, FLAGS.batch, lo, hi)
        accs.append(float(eval_step(model, tokens, targets, mask)))
    return float(np.mean(accs))


def run_model(name: str, task: NeedleTask) -> dict:
    spec = SPECS[name]()
    config = LMConfig(vocab_size=task.vocab_size, layer_spec=spec, d_model=FLAGS.d_model,
                      num_heads=FLAGS.heads, window=FLAGS.window, nsa=nsa_config())
    model = SparseLM(config, rngs=nnx.Rngs(FLAGS.seed))
    optimizer = make_optimizer(model, FLAGS.lr, warmup=FLAGS.steps // 10, total_steps=FLAGS.steps)
    rng = np.random.default_rng(FLAGS.seed)
    tokens, targets, mask, _ = task.batch(rng, FLAGS.batch)
    train_step(model, optimizer, tokens, targets, mask)        # compile outside the timing
    start, loss, acc = time.perf_counter(), float("nan"), float("nan")
    bar = tqdm(range(FLAGS.steps), desc=f"{name:>9} [{spec}]", ncols=100, mininterval=2.0)
    for step in bar:
        tokens, targets, mask, _ = task.batch(rng, FLAGS.batch)
        loss, acc = train_step(model, optimizer, tokens, targets, mask)
        if step % 25 == 0 or step == FLAGS.steps - 1:
            bar.set_postfix(loss=f"{float(loss):.3f}", acc=f"{float(acc):.2f}")
    jax.block_until_ready(loss)
    elapsed = time.perf_counter() - start
    eval_rng = np.random.default_rng(FLAGS.seed + 1)
    receptive = FLAGS.layers * (FLAGS.window - 1)
    near_hi = FLAGS.window - 2
    far_lo = min(receptive + 2, task.seq_len - 2)
    return dict(model=name, spec=spec, params=count_params(model),
                acc_near=evaluate(model, task, eval_rng, 2, near_hi),
                acc_far=evaluate(model, task, eval_rng, far_lo, task.seq_len - 2),
                near=f"2-{near_hi}", far=f"{far_lo}-{task.seq_len - 2}",
                kv_bytes_per_token=model.kv_bytes_per_token(task.seq_len),
                tokens_per_s=FLAGS.steps * FLAGS.batch * task.seq_len / elapsed)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    unknown = set(FLAGS.models) - set(SPECS)
    if unknown:
        raise app.UsageError(f"unknown --models {sorted(unknown)}; choose from {sorted(SPECS)}")
    if FLAGS.window + 2 >= FLAGS.seq_len:
        raise app.UsageError("--window must be well below --seq_len for far needles to exist")
    start = time.perf_counter()
    task = NeedleTask(seq_len=FLAGS.seq_len)
    print(f"needle retrieval: T={task.seq_len}, window={FLAGS.window}, {FLAGS.layers} layers, "
          f"{FLAGS.steps} steps x {FLAGS.batch} sequences, chance = {1 / task.num_values:.2f}")
    rows = [run_model(name, task) for name in FLAGS.models]
    header = f"{'model':<10}{'layers':<8}{'acc near':>10}{'acc far':>10}{'KV B/token':>12}{'tokens/s':>11}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['model']:<10}{r['spec']:<8}{r['acc_near']:>10.2f}{r['acc_far']:>10.2f}"
              f"{r['kv_bytes_per_token']:>12.0f}{r['tokens_per_s']:>11.0f}")
    print(f"(near: needle {rows[0]['near']} tokens back; far: {rows[0]['far']} tokens back; "
          f"KV bytes per token at T={task.seq_len}, fp32)")
    print(f"(wall time {time.perf_counter() - start:.0f} s with compilation, jax {jax.__version__} on "
          f"{jax.default_backend()}, {os.cpu_count()} CPU cores; tokens/s: training steps after compilation)")
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    from script_io import run  # noqa: PLC0415 (experiments/script_io.py: --help exits 0)
    run(main)
