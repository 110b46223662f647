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

`--fp8_overlap` (issue 15 item 1): after training, the selected sets of FP8 indexer scores
(`indexer_topk(score_dtype="float8_e4m3fn")`: Hadamard rotation, per-row e4m3 scales) and of
the variants in `pallas_kernels.indexer.fp8.quantized_scores` against the exact float32
`lax.top_k` set, on the trained indexer's operands (every DSA layer, `--fp8_batches` fresh
batches, queries with more than `top_k` visible keys) and on N(0, 1) operands of the same
shapes and of a longer row (`--fp8_random_keys` keys, top-`--fp8_random_k`, 4 heads x 64).
Per variant: overlap (= recall of the float32 set), the tie-aware overlap (picks whose float32
score reaches the k-th), the share of the float32 top-k's softmax(I) mass that is missed, where
in the float32 ranking the misses sit, and a rerank (FP8 top-(1.25 k), then float32 scores
of those) as the way to a set the float32 one nearly contains.

    python experiments/dsa_warmup.py                       # CPU, a few minutes
    python experiments/dsa_warmup.py --top_k=8 --seq_len=128 --json_out=/tmp/dsa.json
    nice python experiments/dsa_warmup.py --fp8_overlap --index_dim=64 --json_out=/tmp/fp8.json
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from flax import nnx

from pallas_kernels.indexer import fp8 as fp8_scores
from pallas_kernels.indexer import indexer_topk
from pallas_kernels.indexer.reference import chunk_scores_reference

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
flags.DEFINE_integer("index_heads", 4, "Lightning-indexer heads H_I.")
flags.DEFINE_integer("index_dim", 16, "Lightning-indexer head dim D_I.")
flags.DEFINE_bool("fp8_overlap", False, "After training, report FP8 vs float32 selected-set overlap.")
flags.DEFINE_integer("fp8_batches", 4, "Batches of the trained-data overlap report.")
flags.DEFINE_integer("fp8_random_keys", 8192, "Keys of the long random-row overlap report.")
flags.DEFINE_integer("fp8_random_k", 256, "top-k of the long random-row overlap report.")


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
                   dsa=DSAConfig(index_heads=FLAGS.index_heads, index_head_dim=FLAGS.index_dim,
                                 top_k=FLAGS.top_k, stage="warmup",
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
    if FLAGS.fp8_overlap:
        summary["fp8_overlap"] = fp8_overlap_report(model, task, rng)
    print(json.dumps(summary, indent=1))
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump({"summary": summary, "dense": dense, "warmup": warm, "sparse": sparse}, f)


FP8 = "float8_e4m3fn"
VARIANTS = {          # name -> `fp8.quantized_scores` kwargs; None: the op itself
    "fp8_op": None,                                          # Hadamard + per-row scales (the op)
    "fp8_no_rotation": dict(rotate=False),
    "fp8_block32": dict(block=32),                           # DeepGEMM-like 1 x 32 scale groups
    "q_bf16_k_fp8": dict(q_dtype="bfloat16"),                # only the keys in e4m3
}


def indexer_operands(model, tokens):
    """Per DSA layer, the indexer's `(q_I, w, k_I)` on `tokens` (the layers' own `indexer` on
    their normed inputs, the blocks run as `SparseLM` runs them)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    x = jnp.take(model.embed[...], tokens, axis=0).astype(model.config.dtype)
    out = []
    for block in model.blocks:
        out.append(block.attn.indexer(block.attn_norm(x), positions))
        x, _, _ = block.forward(x, positions)
    return out


def selection_stats(ref, picks, k):
    """ref `[N, S]` float32 scores (-inf invisible), picks `[N, k]` slots of the rows with more
    than k visible keys: overlap with float32 `lax.top_k`'s set, tie-aware overlap (picks
    scoring at least the k-th), rows whose set is exact, the missed share of the top-k's
    softmax(I) mass, and on the rows without a float32 tie at the boundary (k-th > (k+1)-th:
    N(0, 1) rows whose head weights are all negative tie at 0) the float32 rank of the misses
    and of the wrong picks (rank / k: 1.0 is the boundary); on all rows the largest distance
    of a missed item above, and of a wrong pick below, the k-th float32 score, in row stds."""
    order = np.argsort(-ref, -1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(ref.shape[-1])[None], -1)
    want = order[:, :k]
    kth = np.take_along_axis(ref, want[:, -1:], -1)
    untied = (kth > np.take_along_axis(ref, order[:, k:k + 1], -1))[:, 0]
    p = np.exp(ref - ref.max(-1, keepdims=True))
    in_ref = np.zeros(ref.shape, bool)
    np.put_along_axis(in_ref, want, True, -1)
    in_got = np.zeros(ref.shape, bool)
    np.put_along_axis(in_got, picks, True, -1)
    missed, wrong = in_ref & ~in_got, in_got & ~in_ref
    mass = (p * missed).sum(-1) / (p * in_ref).sum(-1)
    r_missed = (rank[missed & untied[:, None]] + 1) / k
    r_wrong = (rank[wrong & untied[:, None]] + 1) / k
    fin = np.isfinite(ref)
    std = np.sqrt((np.where(fin, ref - np.where(fin, ref, 0).sum(-1, keepdims=True) / fin.sum(-1, keepdims=True),
                            0) ** 2).sum(-1, keepdims=True) / fin.sum(-1, keepdims=True))
    gap = np.broadcast_to((ref - kth) / np.maximum(std, 1e-30), ref.shape)   # float32 score - k-th, in row stds
    g_missed, g_wrong = gap[missed], -gap[wrong]
    return dict(rows=int(ref.shape[0]), tied_rows=float(1 - untied.mean()),
                overlap=float(1 - missed.sum() / (k * ref.shape[0])),
                tie_aware=float((np.take_along_axis(ref, picks, -1) >= kth).mean()),
                rows_exact=float((missed.sum(-1) == 0).mean()),
                missed_mass=float(mass.mean()), missed_mass_max=float(mass.max()),
                missed_rank_min=float(r_missed.min()) if r_missed.size else None,
                missed_rank_median=float(np.median(r_missed)) if r_missed.size else None,
                wrong_rank_max=float(r_wrong.max()) if r_wrong.size else None,
                missed_gap_max=float(g_missed.max()) if g_missed.size else None,
                wrong_gap_max=float(g_wrong.max()) if g_wrong.size else None)


def overlap_of(q, w, kk, k):
    """`{variant: selection_stats}` for causal operands `q [B,T,H,D]`, `w [B,T,H]`, `kk [B,S,D]`
    (query t sees keys 0..t + S - T), over the rows with more than k visible keys."""
    b, t = q.shape[:2]
    s = kk.shape[1]
    qp = jnp.broadcast_to(jnp.arange(s - t, s, dtype=jnp.int32), (b, t))
    kp = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    q, w, kk = (a.astype(jnp.float32) for a in (q, w, kk))
    ref = np.asarray(chunk_scores_reference(q, w, kk, qp, kp))
    rows = np.isfinite(ref).sum(-1) > k
    vis = np.isfinite(ref)
    ref_r = ref[rows]
    out = {}
    exact = np.asarray(indexer_topk(q, w, kk, k=k, q_positions=qp, kv_positions=kp, impl="xla"))[rows]
    out["float32_check"] = selection_stats(ref_r, exact, k)["overlap"]          # 1.0 by construction
    for name, kw in VARIANTS.items():
        if kw is None:
            picks = np.asarray(indexer_topk(q, w, kk, k=k, q_positions=qp, kv_positions=kp, impl="xla",
                                            score_dtype=FP8))[rows]
        else:
            sc = np.where(vis, np.asarray(fp8_scores.quantized_scores(q, w, kk, **kw)), -np.inf)
            picks = np.argsort(-sc[rows], -1, kind="stable")[:, :k]
        out[name] = selection_stats(ref_r, picks, k)
    for m in (1.25, 1.5):                      # the op's FP8 top-(m k), then float32 scores of those
        picks = np.asarray(indexer_topk(q, w, kk, k=k, q_positions=qp, kv_positions=kp, impl="xla",
                                        score_dtype=FP8, fp8_rerank=m))[rows]
        out[f"fp8_rerank_{m}k"] = selection_stats(ref_r, picks, k)
    return out


def fp8_overlap_report(model, task, rng):
    """The FP8 overlap figures on trained-indexer operands and on random ones (printed, returned)."""
    k = FLAGS.top_k
    layers = [indexer_operands(model, jnp.asarray(task.batch(rng, FLAGS.batch)[0]))
              for _ in range(FLAGS.fp8_batches)]
    report = {}
    for li in range(len(model.blocks)):
        q, w, kk = (jnp.concatenate([b[li][i] for b in layers]) for i in range(3))
        report[f"trained_layer{li}"] = overlap_of(q, w, kk, k)
        ks = jax.random.split(jax.random.key(FLAGS.seed + li), 3)
        rand = [jax.random.normal(key, a.shape) for key, a in zip(ks, (q, w, kk))]
        report[f"random_layer{li}_shapes"] = overlap_of(*rand, k)
    ks = jax.random.split(jax.random.key(FLAGS.seed + 99), 3)
    s, t = FLAGS.fp8_random_keys, 64
    report["random_long"] = overlap_of(jax.random.normal(ks[0], (1, t, 4, 64)), jax.random.normal(ks[1], (1, t, 4)),
                                       jax.random.normal(ks[2], (1, s, 64)), FLAGS.fp8_random_k)
    print(f"\nFP8 vs float32 selected sets (top_k={k}; random_long: top-{FLAGS.fp8_random_k} of {s} keys, 4 x 64)")
    print("| data | variant | overlap | tie-aware | rows exact | missed softmax mass (mean / max) | "
          "missed rank/k, untied rows (min / median) | worst wrong pick rank/k | max gap to k-th, missed / wrong "
          "(row stds) |")
    print("|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for data, res in report.items():
        for name, st in res.items():
            if name == "float32_check":
                continue
            print(f"| {data} | {name} | {st['overlap']:.4f} | {st['tie_aware']:.4f} | {st['rows_exact']:.3f} | "
                  f"{st['missed_mass']:.2e} / {st['missed_mass_max']:.2e} | {fmt(st['missed_rank_min'])} / "
                  f"{fmt(st['missed_rank_median'])} | {fmt(st['wrong_rank_max'])} | {fmt(st['missed_gap_max'])} / "
                  f"{fmt(st['wrong_gap_max'])} |")
    return report


if __name__ == "__main__":
    from script_io import run  # noqa: PLC0415 (experiments/script_io.py: --help exits 0)
    run(main)
