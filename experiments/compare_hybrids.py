"""Full vs hybrid vs sparse attention on RULER-style tasks: same size, same token budget.

Small decoder LMs of equal width, depth and training tokens, differing only in their
layers' attention (`sparse_jax.models.lm` spec letters), are trained on the mix of the
`sparse_jax.tasks` tasks (needles, multi-key/value/query, variable tracking, common words)
at `--train_len` and evaluated per task (exact match of the whole answer) at two context
lengths `--eval_lens`, with every fact the answer needs at least `--window` tokens before
the question (beyond any single local layer's reach).

Models (`--models`; all `--layers` deep):

    full           F * L
    swa_1_3        Hybrid SWA, one full layer per 4: "WWWF" * (L/4)  (hybrid_spec(L, 4))
    swa_1_11       Hybrid SWA, one full layer per 12: "W" * 11 + "F"  (hybrid_spec(L, 12))
    hysparse_1_3   HySparse (Xiaomi; METHODS.md): "H" + "YYY" repeated, last layer "H"
    hysparse_1_11  HySparse: "H" + "Y" * 11 repeated, last layer "H"
    nsa            N * L (Native Sparse Attention, arXiv 2502.11089)
    moba           M * L (MoBA, Moonshot)
    swa            W * L (pure sliding window: the floor)
    dsa            D * L (DeepSeek Sparse Attention over MLA), when LAYER_TYPES has it; its
                   lightning indexer trained by its KL loss (sparse stage, `indexer_loss=True`)

Writes to `--out_dir`: `results.jsonl` (one line per model), `results.md` (the table:
accuracy per task at both lengths, KV bytes per token at the longer length, train tokens/s),
`hybrids.png`, `metrics.jsonl` (per model: loss and token accuracy every `--log_every`
steps, then the accuracy per task at each evaluation length) and the same as TensorBoard
scalars in `tb/<model>/` (`tensorboard --logdir <out_dir>/tb` overlays the models' curves).

    python experiments/compare_hybrids.py                          # CPU preset, a few minutes
    python experiments/compare_hybrids.py --preset=gpu --out_dir=/tmp/hybrids_gpu
    python experiments/compare_hybrids.py --preset=gpu --models=full,swa_1_3,swa_1_11,hysparse_1_3
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx
from tqdm import tqdm

from sparse_jax.layers.hysparse import HySparseConfig
from sparse_jax.models.lm import LAYER_TYPES, LMConfig, SparseLM, hybrid_spec
from sparse_jax.ops.dsa import DSAConfig
from sparse_jax.ops.nsa import NSAConfig
from sparse_jax.tasks import TASKS, VOCAB_SIZE, exact_match, mixed_batch
from sparse_jax.train import count_params, make_optimizer, train_step

from script_io import MetricsLog, run as run_script  # experiments/script_io.py


@dataclasses.dataclass(frozen=True)
class Preset:
    d_model: int
    heads: int
    layers: int
    window: int
    train_len: int
    eval_lens: tuple[int, int]
    steps: int
    batch: int
    lr: float
    eval_batches: int
    block: int            # HySparse / NSA selection / MoBA block
    top_k_blocks: int     # blocks selected per query (HySparse, NSA, MoBA)


PRESETS = {
    # 2 CPU cores: a few minutes for the default (CPU) models; a pipeline check, too few
    # tokens for the tasks to be learnt
    "cpu": Preset(d_model=32, heads=2, layers=12, window=8, train_len=64, eval_lens=(64, 128),
                  steps=300, batch=16, lr=3e-3, eval_batches=2, block=8, top_k_blocks=2),
    # one H200: meant for one device call of <= 9 minutes for all default models, compiles
    # included (not measured here; split with --models and join with --merge if needed)
    "gpu": Preset(d_model=128, heads=4, layers=12, window=32, train_len=256, eval_lens=(256, 512),
                  steps=1200, batch=32, lr=2e-3, eval_batches=4, block=16, top_k_blocks=4),
}
CORE_MODELS = ["full", "swa_1_3", "swa_1_11", "hysparse_1_3", "hysparse_1_11"]
DEFAULT_MODELS = {"cpu": CORE_MODELS, "gpu": CORE_MODELS + ["nsa", "moba", "dsa"]}

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "cpu", sorted(PRESETS), "Size preset; flags below override its fields.")
flags.DEFINE_list("models", None,
                  "Models: full, swa, swa_1_3, swa_1_11, hysparse_1_3, hysparse_1_11, nsa, moba, dsa (dsa "
                  f"only if LAYER_TYPES has a DSA letter). Default: {DEFAULT_MODELS} by preset (gpu: dsa "
                  "when it exists).")
flags.DEFINE_list("tasks", sorted(TASKS), f"Tasks of sparse_jax.tasks.TASKS: {sorted(TASKS)}.")
flags.DEFINE_integer("layers", None, "Layers per model (a multiple of 12 keeps 1:3 and 1:11 exact).")
flags.DEFINE_integer("d_model", None, "Model width.")
flags.DEFINE_integer("heads", None, "Attention heads.")
flags.DEFINE_integer("window", None, "Sliding window of W layers and of the SWA branches (HySparse, NSA); "
                     "also the minimum distance of the needed facts at evaluation.")
flags.DEFINE_integer("train_len", None, "Training sequence length.")
flags.DEFINE_list("eval_lens", None, "The two evaluation sequence lengths.")
flags.DEFINE_integer("steps", None, "Training steps per model.")
flags.DEFINE_integer("batch", None, "Sequences per step (rows cycle through the tasks).")
flags.DEFINE_float("lr", None, "Peak learning rate (AdamW, warmup + cosine).")
flags.DEFINE_integer("eval_batches", None, "Evaluation batches per task and length (of --batch rows).")
flags.DEFINE_integer("seed", 0, "Seed of data and parameters.")
flags.DEFINE_integer("log_every", 25, "Log the training loss and accuracy every this many steps.")
flags.DEFINE_string("out_dir", "/tmp/compare_hybrids", "Where results.jsonl, results.md and hybrids.png go.")
flags.DEFINE_list("merge", None, "Train nothing: merge these results.jsonl files (e.g. of a run split by "
                  "--models) into one results.md and hybrids.png in --out_dir.")


def preset() -> Preset:
    p = PRESETS[FLAGS.preset]
    overrides = {f.name: getattr(FLAGS, f.name) for f in dataclasses.fields(Preset)
                 if f.name in FLAGS and getattr(FLAGS, f.name) is not None}
    if "eval_lens" in overrides:
        overrides["eval_lens"] = tuple(int(x) for x in overrides["eval_lens"])
    return dataclasses.replace(p, **overrides)


def dsa_letter() -> str | None:
    return next((k for k, v in LAYER_TYPES.items() if "DSA" in v.upper() or "deepseek sparse" in v.lower()),
                None)


def hysparse_spec(num_layers: int, ratio: int) -> str:
    """HySparse 1:ratio: "H" then `ratio` "Y", repeated, the last layer "H" (the paper's
    layout), e.g. (12, 3) -> "HYYYHYYYHYYH", (12, 11) -> "HYYYYYYYYYYH"."""
    body = ("H" + "Y" * ratio) * num_layers
    return body[:num_layers - 1] + "H"


def model_specs(layers: int) -> dict[str, str]:
    specs = {"full": "F" * layers, "swa": "W" * layers,
             "swa_1_3": hybrid_spec(layers, 4), "swa_1_11": hybrid_spec(layers, 12),
             "hysparse_1_3": hysparse_spec(layers, 3), "hysparse_1_11": hysparse_spec(layers, 11),
             "nsa": "N" * layers, "moba": "M" * layers}
    if dsa_letter() is not None:
        specs["dsa"] = dsa_letter() * layers
    return specs


def lm_config(p: Preset, spec: str) -> LMConfig:
    return LMConfig(
        vocab_size=VOCAB_SIZE, layer_spec=spec, d_model=p.d_model, num_heads=p.heads, window=p.window,
        hysparse=HySparseConfig(block_size=p.block, top_k_tokens=p.block * p.top_k_blocks, window=p.window),
        nsa=NSAConfig(cmp_block=p.block, cmp_stride=p.block // 2, sel_block=p.block,
                      num_selected=p.top_k_blocks + 3, window=p.window),   # + 1 initial, 2 local forced
        moba_block=p.block, moba_top_k=p.top_k_blocks,
        # DSA: the same token budget; train_step adds its indexer KL (sparse stage)
        dsa=DSAConfig(index_heads=4, index_head_dim=16, top_k=p.block * p.top_k_blocks,
                      indexer_loss=True))


@nnx.jit
def predict(model, tokens):
    logits, _ = model(tokens)
    return logits.argmax(-1)


def evaluate(model, p: Preset, names, seq_len: int, seed: int) -> dict[str, float]:
    """Exact-match accuracy per task at `seq_len`, facts >= `p.window` before the question."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in names:
        hits = []
        for _ in range(p.eval_batches):
            tokens, targets, mask = TASKS[name].batch(rng, p.batch, seq_len, min_distance=p.window)
            hits.append(exact_match(np.asarray(predict(model, tokens)), targets, mask))
        out[name] = float(np.concatenate(hits).mean())
    return out


def run_model(name: str, spec: str, p: Preset, names, log: MetricsLog) -> dict:
    """Trains and evaluates one model; its curves and accuracies go to `log` (TensorBoard run `name`)."""
    model = SparseLM(lm_config(p, spec), rngs=nnx.Rngs(FLAGS.seed))
    optimizer = make_optimizer(model, p.lr, warmup=p.steps // 10, total_steps=p.steps)
    rng = np.random.default_rng(FLAGS.seed)                    # the same data stream for every model
    start = time.perf_counter()
    loss, acc = train_step(model, optimizer, *mixed_batch(rng, names, p.batch, p.train_len))   # + compile
    jax.block_until_ready(nnx.state(model))
    compile_s = time.perf_counter() - start
    log.write(dict(model=name, step=1, loss=float(loss), accuracy=float(acc)), step=1, tag="train", run=name)
    start = time.perf_counter()
    bar = tqdm(range(2, p.steps + 1), desc=f"{name:>13} [{spec}]", ncols=110, mininterval=2.0)
    for step in bar:
        loss, acc = train_step(model, optimizer, *mixed_batch(rng, names, p.batch, p.train_len))
        if step % FLAGS.log_every == 0 or step == p.steps:          # float() waits for the step
            log.write(dict(model=name, step=step, loss=float(loss), accuracy=float(acc)), step=step,
                      tag="train", run=name)
            bar.set_postfix(loss=f"{float(loss):.3f}", acc=f"{float(acc):.2f}")
    jax.block_until_ready(loss)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    acc_by_len = {str(t): evaluate(model, p, names, t, FLAGS.seed + 1 + i) for i, t in enumerate(p.eval_lens)}
    for t, accs in acc_by_len.items():
        record = dict(model=name, step=p.steps, eval_len=int(t), **accs, mean=float(np.mean(list(accs.values()))))
        log.write(record, step=p.steps, tag=f"eval_T{t}", keys=[*accs, "mean"], run=name)
    return dict(model=name, spec=spec, params=count_params(model), final_loss=float(loss),
                final_train_token_acc=float(acc), acc=acc_by_len,
                mean_acc={t: float(np.mean(list(a.values()))) for t, a in acc_by_len.items()},
                kv_bytes_per_token=model.kv_bytes_per_token(max(p.eval_lens)),
                train_tokens_per_s=(p.steps - 1) * p.batch * p.train_len / train_s,
                compile_s=compile_s, train_s=train_s, eval_s=time.perf_counter() - start)


def markdown_table(rows, p: Preset, names) -> str:
    t1, t2 = (str(t) for t in p.eval_lens)
    head = ["model", "layers"] + names + ["mean", f"KV B/token @{t2}", "train tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f"`{r['spec']}`"]
        cells += [f"{r['acc'][t1][n]:.2f} / {r['acc'][t2][n]:.2f}" for n in names]
        cells += [f"{r['mean_acc'][t1]:.2f} / {r['mean_acc'][t2]:.2f}", f"{r['kv_bytes_per_token']:.0f}",
                  f"{r['train_tokens_per_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nExact-match accuracy per task at T={t1} / T={t2} (trained at T={p.train_len}); "
                 f"needed facts >= {p.window} tokens (the window) before the question. "
                 f"{p.layers} layers, d_model={p.d_model}, {p.heads} heads, {p.steps} steps x {p.batch} "
                 f"sequences; KV bytes per token of one sequence at T={t2}, fp32.")
    return "\n".join(lines)


def plot(rows, p: Preset, names, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5), gridspec_kw=dict(width_ratios=[3, 3, 2]))
    width = 0.8 / len(rows)
    x = np.arange(len(names) + 1)
    for ax, t in zip(axes[:2], p.eval_lens):
        for i, r in enumerate(rows):
            vals = [r["acc"][str(t)][n] for n in names] + [r["mean_acc"][str(t)]]
            ax.bar(x + (i - (len(rows) - 1) / 2) * width, vals, width, label=r["model"])
        ax.set_xticks(x, names + ["mean"], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"exact match at T={t} (trained at {p.train_len})")
    axes[0].legend(fontsize=7, ncol=2)
    t2 = str(max(p.eval_lens))
    for r in rows:
        axes[2].scatter(r["kv_bytes_per_token"], r["mean_acc"][t2])
        axes[2].annotate(r["model"], (r["kv_bytes_per_token"], r["mean_acc"][t2]), fontsize=7)
    axes[2].set_xlabel(f"KV bytes / token at T={t2}")
    axes[2].set_ylabel(f"mean exact match at T={t2}")
    axes[2].set_ylim(-0.02, 1.02)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(rows, p: Preset, names):
    table = markdown_table(rows, p, names)
    with open(os.path.join(FLAGS.out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    plot(rows, p, names, os.path.join(FLAGS.out_dir, "hybrids.png"))
    print("\n" + table + f"\n\nwrote {FLAGS.out_dir}/results.md, hybrids.png")


def merge(paths):
    rows = [json.loads(line) for path in paths for line in open(path) if line.strip()]
    if not rows:
        raise app.UsageError(f"no rows in --merge files {paths}")
    p = Preset(**dict(rows[0]["preset"], eval_lens=tuple(rows[0]["preset"]["eval_lens"])))
    if any(r["preset"] != rows[0]["preset"] for r in rows):
        raise app.UsageError("--merge files were run with different settings; their rows do not compare")
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    with open(os.path.join(FLAGS.out_dir, "results.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    write_outputs(rows, p, list(rows[0]["acc"][str(p.eval_lens[0])]))


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if FLAGS.merge:
        return merge(FLAGS.merge)
    p = preset()
    specs = model_specs(p.layers)
    models = FLAGS.models or [m for m in DEFAULT_MODELS[FLAGS.preset] if m in specs]
    unknown = set(models) - set(specs)
    if unknown:
        raise app.UsageError(f"unknown --models {sorted(unknown)}; available: {sorted(specs)}")
    if set(FLAGS.tasks) - set(TASKS):
        raise app.UsageError(f"unknown --tasks {sorted(set(FLAGS.tasks) - set(TASKS))}; known: {sorted(TASKS)}")
    if FLAGS.log_every < 1:
        raise app.UsageError(f"--log_every must be >= 1, got {FLAGS.log_every}")
    if len(p.eval_lens) != 2 or min(p.eval_lens) <= 2 * p.window:
        raise app.UsageError(f"--eval_lens must be two lengths well beyond --window={p.window}, got {p.eval_lens}")
    names = list(FLAGS.tasks)
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    print(f"{FLAGS.preset} preset: {p}\ntasks: {names}; devices: {jax.devices()}")
    rows = []
    with (open(os.path.join(FLAGS.out_dir, "results.jsonl"), "w") as f,
          MetricsLog(os.path.join(FLAGS.out_dir, "metrics.jsonl")) as log):
        for name in models:
            rows.append(run_model(name, specs[name], p, names, log))
            f.write(json.dumps(dict(rows[-1], preset=dataclasses.asdict(p))) + "\n")
            f.flush()
            r = rows[-1]
            print(f"{name}: mean exact match {r['mean_acc']}, compile {r['compile_s']:.0f}s, "
                  f"train {r['train_s']:.0f}s, eval {r['eval_s']:.0f}s")
    write_outputs(rows, p, names)


if __name__ == "__main__":
    run_script(main)
