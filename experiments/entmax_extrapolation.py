"""Length extrapolation of softmax, alpha-entmax and ASEntmax attention on associative recall.

A small-scale check of the claim of "Long-Context Generalization with Sparse Attention"
(Vasylenko et al., arXiv 2506.16640): models trained on short sequences keep retrieving
at many times the training length when their attention is alpha-entmax with ASEntmax's
length-scaled temperature, where softmax attention disperses.

Task: multi-query associative recall in a haystack (`recall_batch`, generated in-process
with the `sparse_jax.tasks` vocabulary): `--needles` pairs `key value` of distinct keys
among noise words, then `QUERY` and `--queries` of the keys, each followed by its value;
every asked key is scored on predicting its value (teacher-forced). Every model
(`--models`, each `--layers` deep, `SparseLM` layer letters) sees the same data stream at
`--train_len`, then is evaluated on fresh rows at `--train_len` times each of
`--eval_mults`: the same number of pairs, drawn anywhere in a longer haystack. Metric:
answer accuracy (per asked key), and the fraction of rows with every answer right.

    softmax   F * L  (full causal softmax attention)
    entmax    E * L  (alpha-entmax, `--alpha`)
    asentmax  A * L  (ASEntmax: alpha-entmax with queries scaled by delta + beta_h log(t+2)^gamma_h)

Long evaluation rows are run as a chunked prefill through each layer's full KV cache
(`--eval_chunk` queries a call), so memory is `chunk x length` scores, not `length^2`.

Writes `--out_dir/results.jsonl` (one line per model; a model run again replaces its
line, so models can be trained in separate runs), `--out_dir/metrics_<model>.jsonl` and
`tb/<model>/` (training curves, evaluation accuracies), and from every line of results.jsonl: `--json` (all models' settings,
training accuracy and accuracy per evaluation length) and the plot `--plot` (accuracy vs
length, log scale).

    # CPU, 3 models, about 5-10 minutes each on a quiet 2-core machine
    python experiments/entmax_extrapolation.py --out_dir=/tmp/entmax_extrap
    python experiments/entmax_extrapolation.py --models=asentmax --out_dir=/tmp/entmax_extrap
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from sparse_jax.models.lm import LAYER_KINDS, LMConfig, SparseLM
from sparse_jax.tasks import Vocab, exact_match
from sparse_jax.train import count_params, make_optimizer, train_step

from script_io import MetricsLog, run as run_script, write_atomic  # experiments/script_io.py

MODELS = {"softmax": "F", "entmax": "E", "asentmax": "A"}

FLAGS = flags.FLAGS
flags.DEFINE_list("models", list(MODELS), f"Models to train: {list(MODELS)}.")
flags.DEFINE_integer("layers", 2, "Layers per model.")
flags.DEFINE_integer("d_model", 64, "Model width.")
flags.DEFINE_integer("heads", 4, "Attention heads.")
flags.DEFINE_float("alpha", 1.5, "alpha of the entmax layers (E, A).")
flags.DEFINE_float("rope_theta", 1e6, "RoPE base (large: content matching barely rotates over 64x the training length).")
flags.DEFINE_integer("needles", 4, "Key-value facts per sequence.")
flags.DEFINE_integer("fact_tokens", 1, "Tokens per fact: 1 (one id per (key, value) pair) or 2 (`key value`).")
flags.DEFINE_integer("queries", 4, "Keys asked per sequence (distinct needles; each answer is scored).")
flags.DEFINE_integer("keys", 8, "Keys in the vocabulary.")
flags.DEFINE_integer("values", 8, "Values in the vocabulary.")
flags.DEFINE_integer("words", 16, "Haystack words in the vocabulary.")
flags.DEFINE_integer("train_len", 64, "Training sequence length.")
flags.DEFINE_list("eval_mults", ["1", "2", "4", "8", "16", "32", "64"],
                  "Evaluation lengths as multiples of --train_len.")
flags.DEFINE_integer("steps", 800, "Training steps per model.")
flags.DEFINE_integer("batch", 32, "Sequences per step.")
flags.DEFINE_float("lr", 3e-3, "Peak learning rate (AdamW, warmup + cosine).")
flags.DEFINE_float("max_minutes", 12.0, "Stop a model's training after this many minutes (logged).")
flags.DEFINE_float("eval_max_minutes", 30.0, "Evaluate no longer length once a model's evaluation took this long "
                   "(the entmax reference sorts every score row: about quadratic in the length on CPU).")
flags.DEFINE_integer("eval_rows", 48, "Evaluation rows per length.")
flags.DEFINE_integer("eval_tokens", 8192, "Tokens per evaluation call (rows per call = this / length, >= 1).")
flags.DEFINE_integer("eval_chunk", 512, "Queries per prefill call at evaluation lengths above it.")
flags.DEFINE_integer("seed", 0, "Seed of data and parameters.")
flags.DEFINE_integer("log_every", 50, "Log the training loss and accuracy every this many steps.")
flags.DEFINE_string("out_dir", "/tmp/entmax_extrapolation", "Where results.jsonl and metrics.jsonl go.")
flags.DEFINE_string("json", None, "The combined JSON (default <out_dir>/entmax_extrapolation.json).")
flags.DEFINE_string("plot", None, "The plot (default <out_dir>/entmax_extrapolation.png).")
flags.DEFINE_list("merge", None, "Train nothing: write --json and --plot from these results.jsonl files "
                  "(e.g. of models trained in separate runs).")


def vocab() -> Vocab:
    return Vocab(num_keys=FLAGS.keys, num_values=FLAGS.values, num_words=FLAGS.words)


def vocab_size() -> int:
    """`Vocab.size`, plus one id per (key, value) pair with `--fact_tokens=1`."""
    v = vocab()
    return v.size + (v.num_keys * v.num_values if FLAGS.fact_tokens == 1 else 0)


def recall_batch(rng: np.random.Generator, batch: int, seq_len: int, needles: int, queries: int):
    """Multi-query associative recall (MQAR, Arora et al. 2023, arXiv 2312.04927) in a
    haystack: tokens, targets `[B, T]` int32, loss_mask `[B, T]` float32.

    Row layout: `context[n] | QUERY k_1 v_1 k_2 v_2 ... k_Q` (`n = T - 2Q`): the context is
    haystack words (`Vocab.words`) holding `needles` facts of distinct keys at uniform
    non-overlapping places; a fact is the two tokens `k v` (`--fact_tokens=2`) or one token
    naming the pair (`--fact_tokens=1`, ids after `Vocab.size`). The `Q` asked keys are
    distinct needles in random order; the target at each asked key is its value
    (next-token prediction, teacher-forced). Token ids are those of `sparse_jax.tasks.Vocab`.
    """
    v, width = vocab(), FLAGS.fact_tokens
    n = seq_len - 2 * queries
    if n < width * needles + 1 or not 1 <= queries <= needles <= v.num_keys:
        raise ValueError(f"seq_len={seq_len} with {needles} needles and {queries} queries does not fit")
    tokens = np.zeros((batch, seq_len), np.int32)
    targets = np.zeros((batch, seq_len), np.int32)
    mask = np.zeros((batch, seq_len), np.float32)
    for b in range(batch):
        key_ids = rng.choice(v.num_keys, size=needles, replace=False)
        value_ids = rng.integers(v.num_values, size=needles)
        keys, values = v.keys[key_ids], v.values[value_ids]
        context = rng.choice(v.words, size=n)
        starts = np.sort(rng.choice(n - (width - 1) * needles, size=needles, replace=False))
        starts = starts + (width - 1) * np.arange(needles)
        if width == 2:
            context[starts], context[starts + 1] = keys, values
        else:
            context[starts] = v.size + key_ids * v.num_values + value_ids
        asked = rng.choice(needles, size=queries, replace=False)
        pairs = np.stack([keys[asked], values[asked]], axis=1).reshape(-1)[:-1]
        tokens[b] = np.concatenate([context, [Vocab.QUERY], pairs])
        at = n + 1 + 2 * np.arange(queries)
        targets[b, at], mask[b, at] = values[asked], 1.0
    return tokens, targets, mask


def lm_config(letter: str) -> LMConfig:
    entmax = dict(entmax_alpha=FLAGS.alpha) if letter in "EA" else {}
    return LMConfig(vocab_size=vocab_size(), layer_spec=letter * FLAGS.layers, d_model=FLAGS.d_model,
                    num_heads=FLAGS.heads, rope_theta=FLAGS.rope_theta, **entmax)


@nnx.jit
def _logits_argmax(model, tokens, positions, caches):
    logits, caches = model(tokens, positions, caches)
    return logits.argmax(-1), caches


def predict(model, tokens, chunk: int):
    """argmax `[B, T]` of `model` on `tokens [B, T]`: one call when T <= chunk, else a chunked
    prefill through the layers' caches (the same outputs, `chunk x T` scores per call)."""
    b, t = tokens.shape
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    if t <= chunk:
        return np.asarray(_logits_argmax(model, jnp.asarray(tokens), jnp.asarray(positions), None)[0])
    caches = model.init_cache(b, t)
    out = []
    for s in range(0, t, chunk):
        pred, caches = _logits_argmax(model, jnp.asarray(tokens[:, s:s + chunk]),
                                      jnp.asarray(positions[:, s:s + chunk]), caches)
        out.append(np.asarray(pred))
    return np.concatenate(out, axis=1)


def evaluate(model, seq_len: int, seed: int) -> tuple[float, float]:
    """(answer accuracy, exact match of whole rows) over `--eval_rows` fresh rows of length `seq_len`."""
    rng = np.random.default_rng(seed)
    per_call = max(1, FLAGS.eval_tokens // seq_len)
    answers, rows, left = [], [], FLAGS.eval_rows
    while left > 0:
        n = min(per_call, left)
        tokens, targets, mask = recall_batch(rng, n, seq_len, FLAGS.needles, FLAGS.queries)
        pred = predict(model, tokens, FLAGS.eval_chunk)
        answers.append((pred == targets)[mask > 0])
        rows.append(exact_match(pred, targets, mask))
        left -= n
    return float(np.concatenate(answers).mean()), float(np.concatenate(rows).mean())


def settings() -> dict:
    keys = ("layers", "d_model", "heads", "alpha", "rope_theta", "needles", "queries", "fact_tokens", "keys", "values",
            "words",
            "train_len", "steps", "batch", "lr", "seed", "eval_rows")
    return {k: getattr(FLAGS, k) for k in keys}


def run_model(name: str, log: MetricsLog) -> dict:
    """Trains `name` at `--train_len`, then evaluates it at every `--eval_mults` length."""
    model = SparseLM(lm_config(MODELS[name]), rngs=nnx.Rngs(FLAGS.seed))
    optimizer = make_optimizer(model, FLAGS.lr, warmup=FLAGS.steps // 20, total_steps=FLAGS.steps)
    rng = np.random.default_rng(FLAGS.seed)                    # the same data stream for every model
    start, step, curve = time.perf_counter(), 0, []
    for step in range(1, FLAGS.steps + 1):
        loss, acc = train_step(model, optimizer, *recall_batch(rng, FLAGS.batch, FLAGS.train_len, FLAGS.needles, FLAGS.queries))
        if step % FLAGS.log_every == 0 or step == FLAGS.steps:          # float() waits for the step
            minutes = (time.perf_counter() - start) / 60
            curve.append(dict(step=step, loss=float(loss), accuracy=float(acc), minutes=minutes))
            log.write(dict(model=name, **curve[-1]), step=step, tag="train")
            print(f"{name} step {step}: loss {float(loss):.3f} answer acc {float(acc):.3f} ({minutes:.1f} min)",
                  flush=True)
            if minutes > FLAGS.max_minutes:
                print(f"{name}: stopped at step {step}, past --max_minutes={FLAGS.max_minutes}", flush=True)
                break
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    accs, exact = {}, {}
    for i, mult in enumerate(int(m) for m in FLAGS.eval_mults):
        t = mult * FLAGS.train_len
        if (time.perf_counter() - start) / 60 > FLAGS.eval_max_minutes:
            print(f"{name}: evaluation stopped before T={t}, past --eval_max_minutes={FLAGS.eval_max_minutes}",
                  flush=True)
            break
        accs[str(t)], exact[str(t)] = evaluate(model, t, FLAGS.seed + 1 + i)
        print(f"{name} T={t}: answer accuracy {accs[str(t)]:.3f}, rows exact {exact[str(t)]:.3f}", flush=True)
        log.write(dict(model=name, eval_len=t, answer_acc=accs[str(t)], exact_match=exact[str(t)]), step=t,
                  tag="eval", keys=["answer_acc", "exact_match"])
    return dict(model=name, spec=MODELS[name] * FLAGS.layers, params=count_params(model), steps_run=step,
                train_curve=curve, acc=accs, exact_match=exact, train_s=train_s, eval_s=time.perf_counter() - start,
                settings=settings())


def plot(rows, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in rows:
        lens = sorted(int(t) for t in r["acc"])
        ax.plot(lens, [r["acc"][str(t)] for t in lens], marker="o",
                label=f"{r['model']} ({r['spec']}, {r['steps_run']} steps, seed {r['settings']['seed']})")
    s = rows[0]["settings"]
    ax.axvline(s["train_len"], color="gray", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("answer accuracy")
    ax.set_title(f"associative recall, trained at {s['train_len']} tokens "
                 f"({s['layers']} layers, d={s['d_model']}, alpha={s['alpha']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    unknown = set(FLAGS.models) - set(MODELS)
    if unknown:
        raise app.UsageError(f"unknown --models {sorted(unknown)}; known: {sorted(MODELS)}")
    missing = {m for m in FLAGS.models if MODELS[m] not in LAYER_KINDS}
    if missing:
        raise app.UsageError(f"--models {sorted(missing)}: their layer letters are not in LAYER_KINDS")
    if not FLAGS.eval_mults or any(not m.isdigit() or int(m) < 1 for m in FLAGS.eval_mults):
        raise app.UsageError(f"--eval_mults must be integers >= 1, got {FLAGS.eval_mults}")
    if FLAGS.fact_tokens not in (1, 2):
        raise app.UsageError(f"--fact_tokens must be 1 or 2, got {FLAGS.fact_tokens}")
    if FLAGS.eval_chunk < 1 or FLAGS.eval_rows < 1:
        raise app.UsageError("--eval_chunk and --eval_rows must be >= 1")
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    results_path = os.path.join(FLAGS.out_dir, "results.jsonl")
    if FLAGS.merge:
        rows = [json.loads(line) for path in FLAGS.merge for line in open(path) if line.strip()]
        if not rows:
            raise app.UsageError(f"no rows in --merge files {FLAGS.merge}")
        return write_outputs(rows, [])
    print(f"settings: {settings()}; models {FLAGS.models}; devices {jax.devices()}", flush=True)
    for name in FLAGS.models:
        with MetricsLog(os.path.join(FLAGS.out_dir, f"metrics_{name}.jsonl"),
                        tb_dir=os.path.join(FLAGS.out_dir, "tb", name)) as log:
            row = run_model(name, log)
        old = [json.loads(line) for line in open(results_path)] if os.path.exists(results_path) else []
        rows = [r for r in old if r["model"] != name] + [row]
        write_atomic(results_path, "".join(json.dumps(r) + "\n" for r in rows))
    write_outputs(rows, [results_path])


def write_outputs(rows, written):
    rows = sorted(rows, key=lambda r: list(MODELS).index(r["model"]))
    json_path = FLAGS.json or os.path.join(FLAGS.out_dir, "entmax_extrapolation.json")
    plot_path = FLAGS.plot or os.path.join(FLAGS.out_dir, "entmax_extrapolation.png")
    write_atomic(json_path, json.dumps(dict(models=rows), indent=1) + "\n")
    plot(rows, plot_path)
    lens = sorted({int(t) for r in rows for t in r["acc"]})
    print("| model | train acc | " + " | ".join(f"T={t}" for t in lens) + " |")
    for r in rows:
        print(f"| {r['model']} | {r['train_curve'][-1]['accuracy']:.2f} | "
              + " | ".join(f"{r['acc'].get(str(t), float('nan')):.2f}" for t in lens) + " |")
    print(f"wrote {', '.join(written + [json_path, plot_path])}")


if __name__ == "__main__":
    run_script(main)
