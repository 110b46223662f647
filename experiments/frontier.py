"""The sparsity frontier of training-free KV-cache policies (in the manner of The Sparse
Frontier, arXiv 2504.17768) on a small full-attention model trained by this library.

1. Train (or load from `--workdir/checkpoints`) a small `SparseLM` of full-attention layers
   on the RULER-style task mix of `sparse_jax.tasks`.
2. For each task, prefill the context and the question densely, then generate the answer
   token by token (teacher-forced) under each policy of `sparse_jax.kv_policies` at each
   budget: eviction after prefill (StreamingLLM, H2O, SnapKV, PyramidKV, Ada-SnapKV,
   DuoAttention) or query-aware page selection at decode (Quest, top-p), or Double-P's
   top-p over k-means clusters of the prompt keys (exact members + weighted centroids).
3. Record per (method, budget, task): exact-match accuracy; the attention-mass recall of the
   first answer query (the share of the dense model's attention, layer by layer, that falls
   on the entries the policy let it read); the fraction of prompt KV entries it read
   ("density", 1 / compression; Double-P's centroid slots count as entries read); and the
   KV bytes held (`nbytes()` of all caches).
4. Write JSONL, a PNG of accuracy and recall against density (one curve per method), and
   the table with the command into `docs/RESULTS.md` under "## Sparse frontier (issue 8)".

Metrics: training loss / token accuracy every `--log_every` steps to `<workdir>/metrics.jsonl`
(TensorBoard `train/*`); each (method, setting, task) row to `--jsonl` as it is measured, with
its accuracy, recall, density and KV bytes as TensorBoard scalars `sweep/<method>/<task>/*` at
step = round(1000 * density) (so TensorBoard draws each method's frontier over density, per
mille). TensorBoard files go to the `tb/` folder beside each JSONL: `tensorboard --logdir
<workdir>/tb`.

    python experiments/frontier.py --workdir=/tmp/frontier --steps=1000   # the docs/ run
    python experiments/frontier.py --workdir=/tmp/frontier --methods=snapkv,quest --budgets=8,32

On 2 shared CPU cores, training 1000 steps took ~20 min and the default sweep ~10 min; a
second run with the same --workdir loads the model and only sweeps.

Budgets are tokens per kv head per layer (Quest: rounded up to pages); top-p sweeps
`--top_p`, Double-P sweeps `--doublep_p` (clusters of `--doublep_cluster` tokens on
average), DuoAttention sweeps the fraction of retrieval heads (`--duo_fractions`) with
streaming heads of `--duo_streaming` tokens, calibrated on training-distribution prompts.
"""

from __future__ import annotations

import os
import time

import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from tqdm import tqdm

from sparse_jax import kv_policies as kvp
from sparse_jax.checkpoint import CheckpointConfig, Checkpointer
from sparse_jax.kv_policies.duo import calibrate
from sparse_jax.models.lm import LMConfig, SparseLM
from sparse_jax.tasks import TASKS, VOCAB_SIZE, exact_match, mixed_batch
from sparse_jax.train import make_optimizer, train_step

from script_io import MetricsLog, replace_section, run as run_script  # experiments/script_io.py

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "/tmp/sparse_jax_frontier", "Trained model cache (checkpoints/) and results.")
flags.DEFINE_list("tasks", ["single_needle", "multikey_needle", "multivalue", "multiquery"],
                  f"Tasks of sparse_jax.tasks to train and evaluate on: {sorted(TASKS)}.")
flags.DEFINE_integer("seq_len", 128, "Sequence length (context + question + answer).")
flags.DEFINE_integer("layers", 2, "Full-attention layers.")
flags.DEFINE_integer("d_model", 64, "Model width.")
flags.DEFINE_integer("heads", 4, "Query heads.")
flags.DEFINE_integer("kv_heads", 2, "KV heads (GQA).")
flags.DEFINE_integer("steps", 600, "Training steps (skipped when --workdir holds a checkpoint).")
flags.DEFINE_integer("batch", 32, "Training sequences per step.")
flags.DEFINE_float("lr", 3e-3, "Peak learning rate.")
flags.DEFINE_integer("seed", 0, "Seed of parameters and the training stream.")
flags.DEFINE_integer("log_every", 25, "Log the training loss and accuracy every this many steps.")
flags.DEFINE_list("methods", ["streaming", "h2o", "snapkv", "pyramidkv", "ada_snapkv", "duo", "quest", "top_p",
                               "doublep", "vattention"],
                  "Policies to sweep.")
flags.DEFINE_list("budgets", ["4", "8", "16", "32", "64"], "Tokens per kv head per layer.")
flags.DEFINE_list("top_p", ["0.5", "0.8", "0.9", "0.95", "0.99"], "Top-p thresholds.")
# Double-P (arXiv 2602.05191)
flags.DEFINE_list("doublep_p", ["0.5", "0.8", "0.9", "0.95", "0.99"], "Double-P: top-p thresholds over clusters.")
flags.DEFINE_integer("doublep_cluster", 8, "Double-P: prompt tokens per k-means cluster (on average).")
flags.DEFINE_integer("doublep_iters", 4, "Double-P: Lloyd iterations.")
flags.DEFINE_float("doublep_keep_p", 1.0, "Double-P: clusters past this top-p share are dropped (1: none; "
                   "settings with p above it are skipped).")
flags.DEFINE_list("duo_fractions", ["0", "0.25", "0.5", "0.75"], "DuoAttention retrieval-head fractions.")
flags.DEFINE_integer("duo_streaming", 8, "DuoAttention: tokens of a streaming head (sinks included).")
flags.DEFINE_integer("num_sinks", 2, "Sinks of StreamingLLM and DuoAttention.")
flags.DEFINE_integer("snap_window", 8, "SnapKV / PyramidKV observation window.")
flags.DEFINE_integer("snap_kernel", 5, "SnapKV / PyramidKV pooling kernel.")
flags.DEFINE_integer("page_size", 4, "Quest / top-p page size (Quest budgets under 2 pages are skipped).")
flags.DEFINE_integer("eval_batch", 64, "Evaluation sequences per task.")
flags.DEFINE_string("jsonl", None, "Results, one JSON line per (method, budget, task); default "
                    "<workdir>/frontier.jsonl.")
flags.DEFINE_string("plot", "docs/frontier.png", "Figure path ('' for none).")
flags.DEFINE_string("results_md", "docs/RESULTS.md", "Markdown file whose '## Sparse frontier (issue 8)' "
                    "section is (re)written ('' for none).")

SECTION = "## Sparse frontier (issue 8)"
NAMES = {"streaming": "StreamingLLM", "h2o": "H2O", "snapkv": "SnapKV", "pyramidkv": "PyramidKV",
         "ada_snapkv": "Ada-SnapKV", "duo": "DuoAttention", "quest": "Quest", "top_p": "top-p",
         "doublep": "Double-P"}

# ---- vAttention (verified sparse attention, arXiv 2510.05688; issue 16 item 3) ----------
# Swept over its stated relative error epsilon (delta fixed): sinks (--num_sinks), window and
# oracle top-k read exactly, plus the weighted uniform sample the (epsilon, delta) budget asks.
flags.DEFINE_list("vattention_epsilons", ["0.05", "0.2", "0.5", "0.9"], "vAttention: epsilons swept.")
flags.DEFINE_float("vattention_delta", 0.05, "vAttention: delta of the stated bound.")
flags.DEFINE_integer("vattention_window", 8, "vAttention: local window (tokens).")
flags.DEFINE_integer("vattention_top_k", 8, "vAttention: top-k keys (by q.k) read exactly.")
flags.DEFINE_enum("vattention_mode", "output", ["output", "denominator"], "vAttention: what the bound "
                  "covers (the attention output, or the paper's cheaper denominator-only relaxation).")
NAMES["vattention"] = "vAttention"


def vattention_policies():
    """(method, epsilon, policy) of the vAttention sweep."""
    return [("vattention", float(e), kvp.VAttention(epsilon=float(e), delta=FLAGS.vattention_delta,
                                                     num_sinks=FLAGS.num_sinks, window=FLAGS.vattention_window,
                                                     top_k=FLAGS.vattention_top_k, mode=FLAGS.vattention_mode,
                                                     seed=FLAGS.seed))
            for e in FLAGS.vattention_epsilons]
# ---- end vAttention ----------------------------------------------------------------------


def build_model() -> SparseLM:
    cfg = LMConfig(vocab_size=VOCAB_SIZE, layer_spec="F" * FLAGS.layers, d_model=FLAGS.d_model,
                   num_heads=FLAGS.heads, num_kv_heads=FLAGS.kv_heads)
    return SparseLM(cfg, rngs=nnx.Rngs(FLAGS.seed))


def train_or_load(model):
    with Checkpointer(os.path.join(FLAGS.workdir, "checkpoints"), CheckpointConfig(async_save=False)) as ckpt:
        if ckpt.restore_latest(model).step is not None:
            print(f"loaded the model from {FLAGS.workdir}/checkpoints")
            return
        optimizer = make_optimizer(model, FLAGS.lr, warmup=FLAGS.steps // 10, total_steps=FLAGS.steps)
        rng = np.random.default_rng(FLAGS.seed)
        bar = tqdm(range(1, FLAGS.steps + 1), desc="train", ncols=100, mininterval=2.0)
        with MetricsLog(os.path.join(FLAGS.workdir, "metrics.jsonl")) as log:
            for step in bar:
                tokens, targets, mask = mixed_batch(rng, FLAGS.tasks, FLAGS.batch, FLAGS.seq_len)
                loss, acc = train_step(model, optimizer, tokens, targets, mask)
                if step % FLAGS.log_every == 0 or step in (1, FLAGS.steps):     # float() waits for the step
                    log.write(dict(step=step, loss=float(loss), accuracy=float(acc)), step=step, tag="train")
                    bar.set_postfix(loss=f"{float(loss):.3f}", acc=f"{float(acc):.2f}")
        ckpt.save(FLAGS.steps, model, force=True)


@nnx.jit
def _forward(model, tokens, positions, caches):
    return model(tokens, positions, caches)


def generate(model, caches, tokens, prompt_len):
    """Dense-or-policy prefill of `tokens[:, :prompt_len]`, then one token per call.
    Returns (predictions `[B, T]` (-1 in the prompt but its last), caches after the first
    decode step, caches at the end)."""
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, caches = _forward(model, tokens[:, :prompt_len], pos[:, :prompt_len], caches)
    preds = [np.full((b, prompt_len - 1), -1), np.asarray(logits[:, -1:].argmax(-1))]
    first = None
    for i in range(prompt_len, t):
        logits, caches = _forward(model, tokens[:, i:i + 1], pos[:, i:i + 1], caches)
        preds.append(np.asarray(logits.argmax(-1)))
        first = caches if first is None else first
    return np.concatenate(preds, axis=1)[:, :t], first, caches


def policies(model, calib_tokens):
    """(method, setting, policy) for every method and budget of the flags."""
    budgets = [int(x) for x in FLAGS.budgets]
    w, kern, s = FLAGS.snap_window, FLAGS.snap_kernel, FLAGS.num_sinks
    make = {
        "streaming": lambda b: kvp.StreamingLLM(b, num_sinks=min(s, b)),
        "h2o": lambda b: kvp.H2O(b),
        "snapkv": lambda b: kvp.SnapKV(b, window=w, kernel=kern),
        "pyramidkv": lambda b: kvp.PyramidKV(b, window=w, kernel=kern),
        "ada_snapkv": lambda b: kvp.AdaKV(kvp.SnapKV(b, window=w, kernel=kern)),
        "quest": lambda b: kvp.Quest(b, page_size=FLAGS.page_size),
    }
    out = []
    for method in FLAGS.methods:
        if method == "quest":        # under 2 pages Quest reads only its forced first / last page
            out += [(method, b, make[method](b)) for b in budgets if b >= 2 * FLAGS.page_size]
        elif method in make:
            out += [(method, b, make[method](b)) for b in budgets]
        elif method == "top_p":
            out += [(method, float(p), kvp.TopP(float(p), page_size=FLAGS.page_size)) for p in FLAGS.top_p]
        elif method == "doublep":      # Double-P: top-p over k-means clusters (arXiv 2602.05191)
            out += [(method, float(p), kvp.DoubleP(float(p), keep_p=FLAGS.doublep_keep_p,
                                                   cluster_size=FLAGS.doublep_cluster, iters=FLAGS.doublep_iters))
                    for p in FLAGS.doublep_p if float(p) <= FLAGS.doublep_keep_p]
        elif method == "vattention":
            out += vattention_policies()
        elif method == "duo":
            for f in FLAGS.duo_fractions:
                gates = calibrate(model, calib_tokens, fraction=float(f), num_sinks=s,
                                  recent=FLAGS.duo_streaming - s)
                out.append((method, float(f), kvp.DuoAttention(FLAGS.duo_streaming, retrieval=gates, num_sinks=s)))
        else:
            raise app.UsageError(f"unknown method {method!r}; choose from {sorted(NAMES)}")
    return out


def recall_and_density(model, oracle, caches, length):
    """Mean over managed layers, rows and query heads of the dense attention mass of the
    first answer query on the entries it read, and of the share of entries it read."""
    recalls, densities = [], []
    for i in kvp.managed_layers(model):
        c = caches[i]
        g = model.blocks[i].attn.config.num_heads // model.blocks[i].attn.config.num_kv_heads
        if hasattr(c, "kept_mask"):
            kept = np.repeat(np.asarray(c.kept_mask(length)), g, axis=1)            # [B, H, length]
        else:                                                                       # dense: all
            kept = np.ones(oracle[i].probs[..., :length].shape, bool)
        probs = np.asarray(oracle[i].probs)[..., :length]
        recalls.append((probs * kept).sum(-1).mean())
        # Double-P also reads one slot per approximated cluster (its recall counts exact tokens only)
        extra = np.repeat(np.asarray(c.num_centroids()), g, axis=1) if hasattr(c, "num_centroids") else 0
        densities.append((kept.sum(-1) + extra).mean() / length)
    return float(np.mean(recalls)), float(np.mean(densities))


def evaluate(model, calib_tokens, log: MetricsLog):
    """Rows (method, setting, task, accuracy, recall, density, kv_bytes, prompt_len) of the dense
    model and of every policy; each also written to `log` as it is measured."""
    rows = []

    def add(row):
        rows.append(row)
        log.write(row, step=round(1000 * row["density"]), tag=f"sweep/{row['method']}/{row['task']}",
                  keys=["accuracy", "recall", "density", "kv_bytes"])
    rng = np.random.default_rng(FLAGS.seed + 1)
    data = {name: TASKS[name].batch(rng, FLAGS.eval_batch, FLAGS.seq_len) for name in FLAGS.tasks}
    oracles, dense_acc = {}, {}
    for name, (tokens, targets, mask) in data.items():
        task = TASKS[name]
        prompt = task.context_len(FLAGS.seq_len) + 1 + task.num_queries          # up to ANS, excluded
        caches = kvp.oracle_caches(model, batch=FLAGS.eval_batch, max_len=FLAGS.seq_len)
        preds, first, end = generate(model, caches, tokens, prompt)
        oracles[name] = (prompt, first)
        dense_acc[name] = float(exact_match(preds, targets, mask).mean())
        add(dict(method="dense", setting=None, task=name, accuracy=dense_acc[name], recall=1.0,
                 density=1.0, kv_bytes=sum(c.nbytes() for c in end), prompt_len=prompt))
    for method, setting, policy in tqdm(policies(model, calib_tokens), desc="sweep", ncols=100):
        for name, (tokens, targets, mask) in data.items():
            prompt, oracle = oracles[name]
            caches = kvp.policy_caches(model, policy, batch=FLAGS.eval_batch, prompt_len=prompt,
                                       max_new=FLAGS.seq_len - prompt)
            preds, first, end = generate(model, caches, tokens, prompt)
            recall, density = recall_and_density(model, oracle, first, prompt + 1)
            add(dict(method=method, setting=setting, task=name,
                     accuracy=float(exact_match(preds, targets, mask).mean()), recall=recall,
                     density=density, kv_bytes=sum(c.nbytes() for c in end), prompt_len=prompt))
    return rows


def summarize(rows):
    """Mean over tasks per (method, setting)."""
    out = {}
    for r in rows:
        out.setdefault((r["method"], r["setting"]), []).append(r)
    return [dict(method=m, setting=s, **{k: float(np.mean([r[k] for r in rs]))
                                         for k in ("accuracy", "recall", "density", "kv_bytes")})
            for (m, s), rs in out.items()]


def plot(summary, dense, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=90)
    for ax, key, label in ((axes[0], "accuracy", "exact-match accuracy (task mean)"),
                           (axes[1], "recall", "attention-mass recall (first answer query)")):
        for method in FLAGS.methods:
            pts = sorted((1.0 / max(r["density"], 1e-9), r[key]) for r in summary if r["method"] == method)
            ax.plot(*zip(*pts), marker="o", ms=3, label=NAMES[method])
        ax.axhline(dense[key], color="k", ls="--", lw=0.8, label="dense")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compression (prompt KV entries / entries read)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)


def write_section(summary, dense, command, path):
    lines = [SECTION, "",
             f"Model: {FLAGS.layers} full-attention layers, d_model {FLAGS.d_model}, {FLAGS.heads} heads / "
             f"{FLAGS.kv_heads} KV heads, trained {FLAGS.steps} steps x {FLAGS.batch} on "
             f"`{','.join(FLAGS.tasks)}` (`sparse_jax.tasks`, T={FLAGS.seq_len}); {FLAGS.eval_batch} fresh "
             "sequences per task. Context and question are prefilled densely, the answer is generated "
             "(teacher-forced) over the policy's cache. Accuracy: exact match, mean over tasks. Recall: "
             "share of the dense model's attention (first answer query, mean over layers and heads) on "
             "the entries read. Density: share of prompt KV entries read (compression = 1 / density). "
             "KV bytes: `nbytes()` of all caches at the end (Quest / top-p hold the full cache plus page "
             "bounds, Double-P the full cache plus its clusters; they only read less). Double-P's density "
             "counts its centroid slots; its recall, the exact tokens only.", "",
             "Command:", "", "```", command, "```", "",
             "![frontier](frontier.png)", "",
             "| method | budget / p / retrieval frac. | density | accuracy | recall | KV bytes vs dense |",
             "|---|---|---|---|---|---|",
             f"| dense | - | 1.00 | {dense['accuracy']:.3f} | 1.000 | 1.00 |"]
    for r in summary:
        if r["method"] != "dense":
            lines.append(f"| {NAMES[r['method']]} | {r['setting']} | {r['density']:.3f} | {r['accuracy']:.3f} | "
                         f"{r['recall']:.3f} | {r['kv_bytes'] / dense['kv_bytes']:.2f} |")
    replace_section(path, SECTION, "\n".join(lines) + "\n")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    unknown = set(FLAGS.tasks) - set(TASKS)
    if unknown:
        raise app.UsageError(f"unknown --tasks {sorted(unknown)}; choose from {sorted(TASKS)}")
    if FLAGS.log_every < 1:
        raise app.UsageError(f"--log_every must be >= 1, got {FLAGS.log_every}")
    start = time.time()
    model = build_model()
    train_or_load(model)
    calib, _, _ = mixed_batch(np.random.default_rng(FLAGS.seed + 2), FLAGS.tasks, 16, FLAGS.seq_len)
    for path in (FLAGS.plot, FLAGS.results_md):      # (the workdir exists by now)
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    with MetricsLog(FLAGS.jsonl or os.path.join(FLAGS.workdir, "frontier.jsonl")) as log:
        rows = evaluate(model, jnp.asarray(calib), log)
    summary = summarize(rows)
    dense = next(r for r in summary if r["method"] == "dense")
    print(f"\n{'method':<14}{'setting':>9}{'density':>9}{'accuracy':>10}{'recall':>8}{'KV bytes':>10}")
    for r in summary:
        print(f"{NAMES.get(r['method'], r['method']):<14}{str(r['setting']):>9}{r['density']:>9.3f}"
              f"{r['accuracy']:>10.3f}{r['recall']:>8.3f}{r['kv_bytes'] / dense['kv_bytes']:>10.2f}")
    if FLAGS.plot:
        plot(summary, dense, FLAGS.plot)
    if FLAGS.results_md:
        import sys
        write_section(summary, dense, "python " + " ".join(sys.argv), FLAGS.results_md)
    print(f"done in {time.time() - start:.0f} s")


if __name__ == "__main__":
    run_script(main)
