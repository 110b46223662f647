"""How much do neighbouring tokens share their NSA selected blocks? The union of the blocks
that chunks of 4 and 8 consecutive query tokens select, per layer and KV head, divided by n
(the "work ratio" of the Mosaic GPU token-sparse kernel, whose 64-row tiles hold 4 or 8
tokens and walk that union: 1.0 = every token of the chunk lists the same n blocks,
4 or 8 = nothing shared). Union sizes from `pallas_kernels.token_sparse.layout.union_blocks`.

Rows:
  * `trained`: a small SparseLM of NSA layers trained here (`--steps` AdamW steps of
    experiments/train.py's `train_step` on `--task`), selections on held-out sequences;
  * `init`: the same model before training (random projections of the embeddings);
  * `paper_init` (with `--paper_len` > 0): an untrained model with the paper's NSAConfig()
    (l=32, d=16, l'=64, n=16, w=512) at T = `--paper_len`;
  * controls `shared` (every token of a chunk lists its first token's blocks: ratio 1.0
    by construction) and `uniform` (n distinct causal blocks per token, uniformly at random,
    the forced ones included).
Only chunks whose first query has at least 2n causal blocks are counted (earlier queries
have few candidates, so their unions are small for no interesting reason). `free` is the
union of the non-forced picks (the `num_initial` first and `num_local` most recent blocks
left out) divided by `n - num_initial - num_local`.

    # the measurement of docs/RESULTS.md (~8 CPU-minutes on 2 cores)
    python experiments/nsa_selection_locality.py --out=/tmp/nsa_locality.json
    # tiny smoke run (tests)
    python experiments/nsa_selection_locality.py --small --out=/tmp/nsa_locality_small.json

Writes a JSON (config, training loss/accuracy, rows) to `--out` and prints a markdown table.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from pallas_kernels.token_sparse.layout import union_blocks
from sparse_jax.data import step_rng
from sparse_jax.models.lm import LMConfig, SparseLM
from sparse_jax.ops.nsa import NSAConfig, forced_blocks, select_blocks
from sparse_jax.train import eval_step, make_optimizer, train_step

from script_io import run as run_script  # experiments/script_io.py
from train import make_sampler           # experiments/train.py

CHUNKS = (4, 8)

flags.DEFINE_string("out", None, "JSON output path.", required=True)
flags.DEFINE_string("task", "needle", "Training task (experiments/train.py --task).")
flags.DEFINE_string("layer_spec", "NN", "Layers (experiments/train.py --layer_spec); N layers are measured.")
flags.DEFINE_integer("seq_len", 512, "Training and evaluation length.")
flags.DEFINE_integer("d_model", 64, "Model width.")
flags.DEFINE_integer("heads", 4, "Query heads.")
flags.DEFINE_integer("kv_heads", 1, "KV heads (one selection per KV head).")
flags.DEFINE_integer("steps", 400, "Training steps (0: init rows only).")
flags.DEFINE_integer("batch", 8, "Training sequences per step.")
flags.DEFINE_float("lr", 3e-3, "Peak learning rate.")
flags.DEFINE_integer("seed", 0, "Seed of parameters and data.")
flags.DEFINE_integer("eval_batch", 8, "Held-out sequences for the accuracy and the selections.")
flags.DEFINE_integer("cmp_block", 8, "NSA l of the trained model.")
flags.DEFINE_integer("cmp_stride", 4, "NSA d.")
flags.DEFINE_integer("sel_block", 8, "NSA l'.")
flags.DEFINE_integer("num_selected", 8, "NSA n (forced blocks included).")
flags.DEFINE_integer("window", 32, "NSA sliding window.")
flags.DEFINE_integer("paper_len", 4096, "T of the paper-config init row (0: skip).")
flags.DEFINE_bool("small", False, "Tiny shapes for a smoke test (overrides the sizes above).")


def layer_selections(model, tokens):
    """`[block_indices [B, T, Hkv, n] for each N layer]` of `model` on `tokens [B, T]`: each
    layer's own `branches` on its normed input, inside the model's forward."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    x = jnp.take(model.embed[...], tokens, axis=0).astype(model.config.dtype)
    out, shared = [], None
    for kind, block in zip(model.config.layer_spec, model.blocks):
        if kind == "N":
            out.append(block.attn.branches(block.attn_norm(x), positions)[0].block_indices)
        x, _, shared = block.forward(x, positions, None, shared)
    return out


def union_stats(indices, cfg: NSAConfig, tokens: int) -> dict:
    """Mean union / n per KV head over the counted chunks (module docstring), all picks and
    free picks. indices `[B, T, Hkv, n]` (-1 unused)."""
    b, t, hkv, n = indices.shape
    q_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    nblk = -(-t // cfg.sel_block)
    first = jnp.arange(0, t, tokens)
    keep = np.asarray(first // cfg.sel_block + 1 >= 2 * n)                      # [C]
    if not keep.any():
        raise ValueError(f"T={t} too short: no chunk has 2n={2 * n} causal blocks of {cfg.sel_block}")
    free = jnp.where(forced_blocks(indices, jnp.arange(t)[None, :, None, None], cfg), -1, indices)
    n_free = n - cfg.num_initial - cfg.num_local
    res = {}
    for name, ind, den in (("all", indices, n), ("free", free, n_free)):
        count = np.asarray(union_blocks(ind, q_pos, nblk, tokens)[2])[:, :, keep]   # [B, Hkv, C']
        res[name] = float(count.mean() / den)
        res[name + "_per_kv_head"] = [round(float(v), 3) for v in count.mean((0, 2)) / den]
    return res


def controls(b, t, hkv, cfg: NSAConfig, seed: int) -> dict:
    """`{"shared": indices, "uniform": indices}` `[B, T, Hkv, n]` (module docstring): `uniform`
    is NSA's own `select_blocks` on uniformly random scores (the forced blocks, then n distinct
    causal blocks at random); `shared` gives every token of a chunk of `max(CHUNKS)` its
    first token's list (the smaller chunks nest in it)."""
    nblk = -(-t // cfg.sel_block)
    q_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    uniform = select_blocks(jax.random.uniform(jax.random.key(seed), (b, hkv, t, nblk)), q_pos, cfg)
    c = max(CHUNKS)
    shared = jnp.repeat(uniform[:, ::c], c, axis=1)[:, :t]
    return {"shared": shared, "uniform": uniform}


def measure(label, selections, cfg: NSAConfig, rows: list):
    for layer, ind in enumerate(selections):
        row = dict(model=label, layer=layer, seq_len=int(ind.shape[1]), sel_block=cfg.sel_block,
                   n=cfg.num_selected)
        for tok in CHUNKS:
            for k, v in union_stats(ind, cfg, tok).items():
                row[f"u{tok}_{k}"] = v
        rows.append(row)
        print(f"  {label} layer {layer}: " + ", ".join(f"u{c}/n {row[f'u{c}_all']:.2f}" for c in CHUNKS),
              flush=True)


def main(argv):
    del argv
    F = flags.FLAGS
    sizes = dict(seq_len=F.seq_len, d_model=F.d_model, heads=F.heads, kv_heads=F.kv_heads, steps=F.steps,
                 batch=F.batch, eval_batch=F.eval_batch, paper_len=F.paper_len,
                 nsa=dict(cmp_block=F.cmp_block, cmp_stride=F.cmp_stride, sel_block=F.sel_block,
                          num_selected=F.num_selected, window=F.window))
    if F.small:
        sizes.update(seq_len=256, d_model=16, heads=2, kv_heads=1, steps=2, batch=2, eval_batch=2,
                     paper_len=0, nsa=dict(cmp_block=8, cmp_stride=4, sel_block=8, num_selected=4, window=16))
    cfg = NSAConfig(**sizes["nsa"])
    sample, vocab = make_sampler(F.task, sizes["seq_len"])

    def build(nsa, seed=F.seed):
        return SparseLM(LMConfig(vocab_size=vocab, layer_spec=F.layer_spec, d_model=sizes["d_model"],
                                 num_heads=sizes["heads"], num_kv_heads=sizes["kv_heads"], nsa=nsa),
                        rngs=nnx.Rngs(seed))

    eval_tokens, eval_targets, eval_mask = sample(np.random.default_rng([F.seed, 10**9]), sizes["eval_batch"])
    eval_tokens = jnp.asarray(eval_tokens)
    model = build(cfg)
    rows = []
    b, t = eval_tokens.shape
    for label, ind in controls(b, t, sizes["kv_heads"], cfg, F.seed).items():
        measure(label, [ind], cfg, rows)
    measure("init", layer_selections(model, eval_tokens), cfg, rows)
    init_acc = float(eval_step(model, eval_tokens, eval_targets, eval_mask))
    optimizer = make_optimizer(model, F.lr, warmup=max(1, sizes["steps"] // 10), total_steps=max(1, sizes["steps"]))
    losses, accs, start = [], [], time.perf_counter()
    for step in range(1, sizes["steps"] + 1):
        loss, acc = train_step(model, optimizer, *sample(step_rng(F.seed, step), sizes["batch"]))
        losses.append(float(loss))
        accs.append(float(acc))
        if step % 25 == 0 or step == sizes["steps"]:
            print(f"step {step}: loss {np.mean(losses[-25:]):.3f} acc {np.mean(accs[-25:]):.2f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    train_s = time.perf_counter() - start
    trained_acc = float(eval_step(model, eval_tokens, eval_targets, eval_mask))
    if sizes["steps"]:
        measure("trained", layer_selections(model, eval_tokens), cfg, rows)
    if sizes["paper_len"]:
        paper = NSAConfig()
        psample, _ = make_sampler(F.task, sizes["paper_len"])
        ptok = jnp.asarray(psample(np.random.default_rng([F.seed, 10**9 + 1]), 1)[0])
        measure("paper_init", layer_selections(build(paper), ptok), paper, rows)
        measure("paper_uniform", [controls(1, sizes["paper_len"], sizes["kv_heads"], paper, F.seed)["uniform"]],
                paper, rows)
    result = dict(config=dict(sizes, task=F.task, layer_spec=F.layer_spec, lr=F.lr, seed=F.seed),
                  training=dict(steps=sizes["steps"], seconds=round(train_s, 1),
                                final_loss_last25=float(np.mean(losses[-25:])) if losses else None,
                                final_train_acc_last25=float(np.mean(accs[-25:])) if accs else None,
                                heldout_acc_init=init_acc, heldout_acc_trained=trained_acc),
                  rows=rows)
    with open(F.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nheld-out accuracy: init {init_acc:.2f}, trained {trained_acc:.2f}\n")
    print("| model | layer | T | l' | n | union4/n | union8/n | free union4 | free union8 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['layer']} | {r['seq_len']} | {r['sel_block']} | {r['n']} | "
              f"{r['u4_all']:.2f} | {r['u8_all']:.2f} | {r['u4_free']:.2f} | {r['u8_free']:.2f} |")


if __name__ == "__main__":
    run_script(main)
