"""DSA's two training stages (DeepSeek-V3.2, arXiv 2512.02556) on a tiny model, on CPU.

0. dense pre-training: a small LM of DSA layers in the "warmup" stage (dense MLA main
   attention) learns the needle task (`sparse_jax.data.NeedleTask`) with the LM loss;
1. dense warm-up: main model frozen, only the lightning indexer trains, on the KL from
   the main attention distribution (summed over heads) to softmax(I), summed over layers;
2. sparse training: the main attention sees only the indexer's top-k tokens; the whole
   model trains on LM loss + the indexer KL restricted to the selected set (indexer
   input detached, so the KL reaches only the indexer and the LM loss never does).

Prints the KL curve of stage 1, the LM loss / KL / accuracy of stage 2 (and whether the
LM loss spiked: any step more than 1 nat above the median of the previous 20, and the
largest sparse-stage loss beside the largest of the second half of the dense stage), and writes them
as JSON. `--warmup_steps=0` is the control: sparse training with an untrained indexer.

    python experiments/dsa_warmup.py                       # CPU, a few minutes
    python experiments/dsa_warmup.py --top_k=8 --seq_len=128 --json_out=/tmp/dsa.json
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import optax
from absl import flags
from flax import nnx

from sparse_jax.data import NeedleTask
from sparse_jax.layers.dsa import indexer_filter
from sparse_jax.models.lm import LMConfig, SparseLM
from sparse_jax.ops.dsa import DSAConfig
from sparse_jax.ops.mla import MLAConfig
from sparse_jax.train import train_step

FLAGS = flags.FLAGS
flags.DEFINE_integer("layers", 2, "DSA layers.")
flags.DEFINE_integer("seq_len", 64, "Sequence length.")
flags.DEFINE_integer("d_model", 32, "Model width.")
flags.DEFINE_integer("heads", 2, "Query heads.")
flags.DEFINE_integer("top_k", 8, "Tokens selected per query in the sparse stage.")
flags.DEFINE_integer("batch", 16, "Sequences per step.")
flags.DEFINE_integer("dense_steps", 300, "Stage 0: dense pre-training steps.")
flags.DEFINE_integer("warmup_steps", 150, "Stage 1: indexer warm-up steps.")
flags.DEFINE_integer("sparse_steps", 150, "Stage 2: sparse training steps.")
flags.DEFINE_float("lr", 3e-3, "Learning rate of stages 0 and 2 (AdamW).")
flags.DEFINE_float("warmup_lr", 1e-3, "Learning rate of the indexer warm-up (paper: 1e-3).")
flags.DEFINE_float("kl_weight", 1.0, "Weight of the indexer KL in stage 2.")
flags.DEFINE_integer("seed", 0, "Seed of data and parameters.")
flags.DEFINE_string("json_out", None, "Optional path for the curves as JSON.")


def set_stage(model, stage: str):
    for block in model.blocks:
        block.attn.dsa = dataclasses.replace(block.attn.dsa, stage=stage)


def run_stage(name, model, optimizer, task, rng, steps, kl_weight):
    """`steps` of the shared `train_step` (LM + `kl_weight` * indexer KL w.r.t. the optimizer's
    `wrt`; the LM loss has no gradient to the detached indexer, so the warm-up needs no LM weight)."""
    curve = {"lm": [], "kl": [], "acc": []}
    t0 = time.time()
    for i in range(steps):
        tokens, targets, mask, _ = task.batch(rng, FLAGS.batch)
        metrics = train_step(model, optimizer, tokens, targets, mask, kl_weight)
        lm, acc, kl = metrics.loss, metrics.accuracy, metrics.indexer_loss
        for key, val in (("lm", lm), ("kl", kl), ("acc", acc)):
            curve[key].append(float(val))
        if i % max(1, steps // 10) == 0 or i == steps - 1:
            print(f"[{name}] step {i:4d}  lm {float(lm):.4f}  kl {float(kl):.4f}  acc {float(acc):.2f}  "
                  f"({time.time() - t0:.0f}s)", flush=True)
    return curve


def spikes(curve, jump=1.0, window=20):
    """Steps whose LM loss exceeds the median of the previous `window` steps by `jump` nats
    (the needle loss sits on one token per sequence, so ratios of tiny losses are noise)."""
    lm = np.asarray(curve)
    return [i for i in range(window, len(lm)) if lm[i] > np.median(lm[i - window:i]) + jump]


def main(argv):
    del argv
    task = NeedleTask(seq_len=FLAGS.seq_len)
    rng = np.random.default_rng(FLAGS.seed)
    cfg = LMConfig(vocab_size=task.vocab_size, layer_spec="D" * FLAGS.layers, d_model=FLAGS.d_model,
                   num_heads=FLAGS.heads,
                   mla=MLAConfig(kv_lora_rank=32, q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                 v_head_dim=16),
                   dsa=DSAConfig(index_heads=4, index_head_dim=16, top_k=FLAGS.top_k, stage="warmup",
                                 indexer_loss=True))
    model = SparseLM(cfg, rngs=nnx.Rngs(FLAGS.seed))
    main_params = nnx.All(nnx.Param, nnx.Not(indexer_filter()))
    adamw = lambda lr: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.01))
    dense = run_stage("dense pre-train", model, nnx.Optimizer(model, adamw(FLAGS.lr), wrt=main_params),
                      task, rng, FLAGS.dense_steps, 0.0)
    warm = run_stage("indexer warm-up", model, nnx.Optimizer(model, adamw(FLAGS.warmup_lr), wrt=indexer_filter()),
                     task, rng, FLAGS.warmup_steps, 1.0)
    set_stage(model, "sparse")
    sparse = run_stage("sparse", model, nnx.Optimizer(model, adamw(FLAGS.lr), wrt=nnx.Param),
                       task, rng, FLAGS.sparse_steps, FLAGS.kl_weight)
    tail = lambda c, k, n=20: float(np.mean(c[k][-n:])) if c[k] else None
    head = lambda c, k, n=10: float(np.mean(c[k][:n])) if c[k] else None
    summary = {
        "config": {k: FLAGS[k].value for k in ("layers", "seq_len", "d_model", "heads", "top_k", "batch",
                                                "dense_steps", "warmup_steps", "sparse_steps", "lr",
                                                "warmup_lr", "kl_weight", "seed")},
        "dense_final_lm": tail(dense, "lm"), "dense_final_acc": tail(dense, "acc"),
        "warmup_kl_first": head(warm, "kl"), "warmup_kl_last": tail(warm, "kl"),
        "sparse_first_lm": head(sparse, "lm"), "sparse_first_kl": head(sparse, "kl"), "sparse_final_lm": tail(sparse, "lm"),
        "sparse_final_acc": tail(sparse, "acc"), "sparse_final_kl": tail(sparse, "kl"),
        "sparse_lm_spikes": spikes(sparse["lm"]), "sparse_max_lm": float(np.max(sparse["lm"])),
        "dense_max_lm_second_half": float(np.max(dense["lm"][len(dense["lm"]) // 2:])),
    }
    print(json.dumps(summary, indent=1))
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump({"summary": summary, "dense": dense, "warmup": warm, "sparse": sparse}, f)


if __name__ == "__main__":
    from script_io import run  # noqa: PLC0415 (experiments/script_io.py: --help exits 0)
    run(main)
