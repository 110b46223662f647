"""Benchmark the `flash` kernel against cuDNN, side by side in one process (BENCHMARKING.md).

For each shape (B=1, causal, bf16, D=128; H/Hkv in 16/16, 16/4, 64/4; T in 4K/16K/64K):
correctness first (max relative error against `flash_reference` on the last query rows,
and against cuDNN on the whole output), then the median of `--iters` timed calls of the
forward and of forward+backward, each wrapped in `jax.block_until_ready`. TFLOP/s count
the causal half only (fwd 2*B*H*T^2*D; fwd+bwd 3.5x that). `--sweep` first times a few
Triton tile configurations at one shape and benchmarks the table with the fastest.

Run on a GPU machine:
  PYTHONPATH=. python experiments/bench_kernels.py --out /tmp/bench.json
HySparse block-max score output vs the plain forward (H=16, causal, bf16):
  PYTHONPATH=. python experiments/bench_kernels.py --scores --heads 16:16 \
      --seq_lens 16384,65536 --score_blocks 64,128 --out /tmp/bench_scores.json
block_sparse (random block metadata at --densities, and causal) vs density x dense flash
and cuDNN (non-causal), H=16/16 and 16/4:
  PYTHONPATH=. python experiments/bench_kernels.py --block_sparse --heads 16:16,16:4 \
      --seq_lens 16384,65536 --out /tmp/bench_block_sparse.json
Mosaic GPU forward and forward+backward (impl='mosaic_gpu', Hopper; also with the Triton
backward) beside Triton, cuDNN and tokamax's Mosaic GPU kernel (when importable), causal:
  PYTHONPATH=. python experiments/bench_kernels.py --mosaic_gpu --heads 16:16,16:4,64:4 \
      --seq_lens 16384,65536 --out /tmp/bench_mosaic_gpu.json
The Mosaic GPU backward's plans (`--mosaic_bwd`: `split`, the two-kernel FA2 one, row
`mosaic_s<stages>`; `fused`, the one-kernel FA3 one, row `mosaic_s<stages>_fused`;
`split_2r` / `fused_2r` with
`dkv_two_rounds`) beside cuDNN only (`--mosaic_peers=` drops the Triton and tokamax rows):
  PYTHONPATH=. python experiments/bench_kernels.py --mosaic_gpu --mosaic_bwd split,fused \
      --mosaic_peers= --heads 16:16,64:4 --seq_lens 16384,65536 --out /tmp/bench_fa3.json

Besides `--out` (all rows, the settings and the device, one JSON), each row goes as it is
measured to `<out>.jsonl` (`--out` with `.jsonl` for `.json`), and its timings, ratios and
errors to TensorBoard scalars `<table>/H<h>_Hkv<hkv>[/<pattern>]/<name>` at step = T, in
`tb/<out name>/` beside `--out` (`tensorboard --logdir /tmp/tb` for the runs above).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from tqdm import tqdm

from pallas_kernels.block_sparse.api import BlockSparseMetadata, block_sparse_attention
from pallas_kernels.block_sparse.api import TritonConfig as TritonConfigBS
from pallas_kernels.flash.api import (MosaicGPUBackwardConfig, MosaicGPUConfig, TritonConfig,
                                      flash_attention)
from sparse_jax import patterns as P

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "bench_kernels.json", "where to write the JSON results")
flags.DEFINE_list("seq_lens", ["4096", "16384", "65536"], "sequence lengths")
flags.DEFINE_list("heads", ["16:16", "16:4", "64:4"], "num_heads:num_kv_heads pairs")
flags.DEFINE_integer("head_dim", 128, "head dim")
flags.DEFINE_integer("iters", 10, "timed calls per figure (median)")
flags.DEFINE_bool("backward", True, "also time forward+backward")
flags.DEFINE_bool("sweep", False, "tune Triton tiles at --sweep_shape first")
flags.DEFINE_bool("sweep_bwd", True, "also sweep the backward tiles")
flags.DEFINE_string("sweep_shape", "16:16:16384", "H:Hkv:T for the sweep")
flags.DEFINE_string("config", "", "TritonConfig overrides, e.g. block_q=128,block_k=64")
flags.DEFINE_bool("scores", False, "instead of the cuDNN table: forward with HySparse block-max "
                  "scores vs the plain forward (same kernel family, same inputs)")
flags.DEFINE_list("score_blocks", ["64"], "block_score_size values for --scores")
flags.DEFINE_bool("block_sparse", False, "instead of the flash table: block_sparse at random "
                  "block densities (--densities) and causal, vs density x dense flash / cuDNN")
flags.DEFINE_list("densities", ["0.1", "0.25", "0.5"], "--block_sparse: KV block densities")
flags.DEFINE_bool("score_reduce_gqa", False, "--scores: max over each GQA group")
flags.DEFINE_bool("mosaic_gpu", False, "instead of the flash table: causal forward of the "
                  "Mosaic GPU kernel (impl='mosaic_gpu') beside Triton and cuDNN")
flags.DEFINE_list("mosaic_stages", ["2"], "--mosaic_gpu: max_concurrent_steps values to time")
flags.DEFINE_list("mosaic_bwd", ["split"], "--mosaic_gpu: backward plans to time, of split "
                  "(two kernels), fused (one kernel, MosaicGPUBackwardConfig.fused_dq), "
                  "split_2r / fused_2r (split / fused with dkv_two_rounds)")
flags.DEFINE_list("mosaic_peers", ["triton", "tritonbwd", "tokamax"], "--mosaic_gpu: the rows "
                  "besides cuDNN and Mosaic GPU, of triton, tritonbwd (the Mosaic forward with "
                  "the Triton backward) and tokamax (when importable)")

FWD_SWEEP = [dict(block_q=128, block_k=64, num_warps=8, num_stages=3),
             dict(block_q=128, block_k=64, num_warps=8, num_stages=5),
             dict(block_q=64, block_k=128, num_warps=4, num_stages=3),
             dict(block_q=128, block_k=128, num_warps=8, num_stages=3),
             dict(block_q=128, block_k=64, num_warps=4, num_stages=3),
             dict(block_q=128, block_k=64, num_warps=8, num_stages=4),
             dict(block_q=128, block_k=128, num_warps=8, num_stages=2),
             dict(block_q=64, block_k=64, num_warps=4, num_stages=3)]
BWD_SWEEP = [dict(block_q_dq=64, block_k_dq=64, block_q_dkv=64, block_k_dkv=64, num_warps_bwd=4, num_stages_bwd=2),
             dict(block_q_dq=128, block_k_dq=32, block_q_dkv=32, block_k_dkv=128, num_warps_bwd=8, num_stages_bwd=2),
             dict(block_q_dq=128, block_k_dq=64, block_q_dkv=64, block_k_dkv=128, num_warps_bwd=8, num_stages_bwd=2),
             dict(block_q_dq=64, block_k_dq=64, block_q_dkv=64, block_k_dkv=64, num_warps_bwd=8, num_stages_bwd=3),
             dict(block_q_dq=128, block_k_dq=32, block_q_dkv=32, block_k_dkv=128, num_warps_bwd=4, num_stages_bwd=3)]


def shapes(desc: str):
    """(H, Hkv, T) of `--heads` x `--seq_lens`, under a progress bar."""
    cases = [(*(int(x) for x in hh.split(":")), int(t)) for hh in FLAGS.heads for t in FLAGS.seq_lens]
    return tqdm(cases, desc=desc, ncols=100)


def log_row(log, table: str, row: dict):
    """`row` as a JSON line, its numbers but the shape as TensorBoard scalars at step T."""
    tag = f"{table}/H{row['h']}_Hkv{row['hkv']}"
    if "pattern" in row:
        tag += "/" + row["pattern"].replace(" ", "_")
    log.write(row, step=row["t"], tag=tag, keys=[k for k in row if k not in ("h", "hkv", "t", "d")])


def median_time(fn, *args, iters):
    jax.block_until_ready(fn(*args))                     # compile + warm-up
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make(h, hkv, t, d, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (1, t, h, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, t, hkv, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, t, hkv, d), jnp.bfloat16)
    do = jax.random.normal(ks[3], (1, t, h, d), jnp.bfloat16)
    return q, k, v, do


def ours(cfg):
    def f(q, k, v):
        t = q.shape[1]
        pos = jnp.arange(t, dtype=jnp.int32)[None]
        return flash_attention(q, k, v, mask_fn=P.Causal(), q_positions=pos, kv_positions=pos,
                               scale=q.shape[-1] ** -0.5, impl="triton", config=cfg)
    return f


def cudnn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def fwd_bwd(f):
    def g(q, k, v, do):
        out, vjp = jax.vjp(f, q, k, v)
        return vjp(do)
    return jax.jit(g)


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def check(f, q, k, v, do, rows=256):
    """Max relative error of the forward on the last `rows` queries vs the XLA reference,
    and of the whole output (and gradients, up to 16K) vs cuDNN."""
    t = q.shape[1]
    out = jax.jit(f)(q, k, v)
    qs = q[:, t - rows:]
    ref = flash_attention(qs, k, v, mask_fn=P.Causal(),
                          q_positions=jnp.arange(t - rows, t, dtype=jnp.int32)[None],
                          kv_positions=jnp.arange(t, dtype=jnp.int32)[None],
                          scale=q.shape[-1] ** -0.5, impl="xla")
    res = dict(err_ref=rel(out[:, t - rows:], ref), err_cudnn=rel(out, jax.jit(cudnn)(q, k, v)))
    if t <= 16384 and FLAGS.backward:
        g1, g2 = fwd_bwd(f)(q, k, v, do), fwd_bwd(cudnn)(q, k, v, do)
        res["err_grad_cudnn"] = max(rel(a, b) for a, b in zip(g1, g2))
    return res


def bench_shape(cfg, h, hkv, t, d, iters, backward=True):
    q, k, v, do = make(h, hkv, t, d)
    flops = 2.0 * h * t * t * d            # causal: half of 4*H*T^2*D
    row = dict(h=h, hkv=hkv, t=t, d=d, config=dataclasses.asdict(cfg))
    row.update(check(ours(cfg), q, k, v, do))
    for name, f in (("ours", ours(cfg)), ("cudnn", cudnn)):
        row[f"{name}_fwd_ms"] = 1e3 * median_time(jax.jit(f), q, k, v, iters=iters)
        if backward:
            row[f"{name}_fwdbwd_ms"] = 1e3 * median_time(fwd_bwd(f), q, k, v, do, iters=iters)
    row["fwd_ratio"] = row["cudnn_fwd_ms"] / row["ours_fwd_ms"]
    row["ours_fwd_tflops"] = flops / row["ours_fwd_ms"] / 1e9
    row["cudnn_fwd_tflops"] = flops / row["cudnn_fwd_ms"] / 1e9
    if backward:
        row["fwdbwd_ratio"] = row["cudnn_fwdbwd_ms"] / row["ours_fwdbwd_ms"]
        row["ours_fwdbwd_tflops"] = 3.5 * flops / row["ours_fwdbwd_ms"] / 1e9
        row["cudnn_fwdbwd_tflops"] = 3.5 * flops / row["cudnn_fwdbwd_ms"] / 1e9
    print(json.dumps(row), flush=True)
    return row


def ours_scores(cfg, size, reduce_gqa):
    def f(q, k, v):
        t = q.shape[1]
        pos = jnp.arange(t, dtype=jnp.int32)[None]
        res = flash_attention(q, k, v, mask_fn=P.Causal(), q_positions=pos, kv_positions=pos,
                              scale=q.shape[-1] ** -0.5, block_score_size=size,
                              block_score_reduce_gqa=reduce_gqa, impl="triton", config=cfg)
        return res.out, res.block_scores
    return f


def bench_scores(cfg, h, hkv, t, d, iters):
    """Forward with block-max scores vs the plain forward, one process, same inputs.

    Plain forward is timed twice (before and after) to show the run-to-run spread, and
    once with the score path's KV tile (block_k = score block when it is smaller), so the
    overhead splits into the tile change and the score work itself. Scores checked first
    against `flash_reference` on the last 128 query rows (max error relative to max |ref|).
    """
    q, k, v, _ = make(h, hkv, t, d)
    reduce_gqa = FLAGS.score_reduce_gqa
    row = dict(h=h, hkv=hkv, t=t, d=d, config=dataclasses.asdict(cfg), reduce_gqa=reduce_gqa)
    row["plain_ms"] = 1e3 * median_time(jax.jit(ours(cfg)), q, k, v, iters=iters)
    rows_chk = 128
    for size in (int(x) for x in FLAGS.score_blocks):
        f = jax.jit(ours_scores(cfg, size, reduce_gqa))
        out, sc = f(q, k, v)
        ref = flash_attention(q[:, t - rows_chk:], k, v, mask_fn=P.Causal(),
                              q_positions=jnp.arange(t - rows_chk, t, dtype=jnp.int32)[None],
                              kv_positions=jnp.arange(t, dtype=jnp.int32)[None],
                              scale=d ** -0.5, block_score_size=size,
                              block_score_reduce_gqa=reduce_gqa, impl="xla")
        row[f"s{size}_err_scores"] = rel(sc[:, :, t - rows_chk:], ref.block_scores)
        row[f"s{size}_err_out"] = rel(out[:, t - rows_chk:], ref.out)
        del out, sc, ref
        row[f"s{size}_ms"] = 1e3 * median_time(f, q, k, v, iters=iters)
        tile = min(cfg.block_k, size & -size)
        if tile != cfg.block_k:
            cfg_t = dataclasses.replace(cfg, block_k=tile)
            row[f"s{size}_plain_same_tile_ms"] = 1e3 * median_time(jax.jit(ours(cfg_t)), q, k, v,
                                                                   iters=iters)
        row[f"s{size}_overhead"] = row[f"s{size}_ms"] / row["plain_ms"] - 1.0
    row["plain_again_ms"] = 1e3 * median_time(jax.jit(ours(cfg)), q, k, v, iters=iters)
    for size in (int(x) for x in FLAGS.score_blocks):
        base = min(row["plain_ms"], row["plain_again_ms"])
        row[f"s{size}_overhead_vs_best_plain"] = row[f"s{size}_ms"] / base - 1.0
    print(json.dumps(row), flush=True)
    return row


def main_scores(cfg, info, log):
    rows = []
    for h, hkv, t in shapes("scores"):
        try:
            rows.append(bench_scores(cfg, h, hkv, t, FLAGS.head_dim, FLAGS.iters))
            log_row(log, "scores", rows[-1])
        except Exception as e:  # noqa: BLE001 - report and go on with the other shapes
            print(f"shape H={h} Hkv={hkv} T={t} failed: {str(e)[:800]}", flush=True)
    with open(FLAGS.out, "w") as fh:
        json.dump(dict(info=info, config=dataclasses.asdict(cfg), rows=rows), fh, indent=1)
    print(f"\n{info}\nconfig {cfg}")
    print(f"{'H/Hkv':>6} {'T':>6} | {'plain ms':>8} {'again':>8} | {'size':>4} {'scores ms':>9} "
          f"{'overhead':>8} {'vs best':>7} {'plain@tile':>10} | {'err S':>7} {'err out':>7}")
    for r in rows:
        for size in (int(x) for x in FLAGS.score_blocks):
            if f"s{size}_ms" not in r:
                continue
            print(f"{r['h']:>3}/{r['hkv']:<2} {r['t']:>6} | {r['plain_ms']:8.3f} {r['plain_again_ms']:8.3f} | "
                  f"{size:>4} {r[f's{size}_ms']:9.3f} {100 * r[f's{size}_overhead']:7.1f}% "
                  f"{100 * r[f's{size}_overhead_vs_best_plain']:6.1f}% "
                  f"{r.get(f's{size}_plain_same_tile_ms', float('nan')):10.3f} | "
                  f"{r[f's{size}_err_scores']:7.1e} {r[f's{size}_err_out']:7.1e}")


# ----------------------------------------------------------------------------- block_sparse


def bs_args(t, mask_fn):
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    return dict(mask_fn=mask_fn, q_positions=pos, kv_positions=pos, q_segment_ids=None,
                kv_segment_ids=None, sink_logits=None, softcap=None, return_lse=False)


def bs_kernel(mask_fn, config=None):
    """block_sparse Triton kernel with the metadata as a jit argument (tables built inside)."""
    def f(q, k, v, meta):
        return block_sparse_attention(q, k, v, meta, scale=q.shape[-1] ** -0.5, impl="triton",
                                      config=config, **bs_args(q.shape[1], mask_fn))
    return f


def bs_fwd_bwd(f):
    def g(q, k, v, meta, do):
        _, vjp = jax.vjp(lambda q_, k_, v_: f(q_, k_, v_, meta), q, k, v)
        return vjp(do)
    return jax.jit(g)


def dense_flash(q, k, v):
    t = q.shape[1]
    return flash_attention(q, k, v, scale=q.shape[-1] ** -0.5, impl="triton", **bs_args(t, None))


def cudnn_full(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=False, implementation="cudnn")


def random_block_metadata(seed, hkv, nq, nk, density, block):
    """Top-k style: per (kv head, query block) round(density * nK) random KV blocks, all full.
    Slots padded to nK (one compiled program per shape whatever the density)."""
    m = max(1, round(density * nk))
    scores = jax.random.uniform(jax.random.key(seed), (1, hkv, nq, nk))
    idx = jnp.sort(jax.lax.top_k(scores, m)[1], -1).astype(jnp.int32)
    idx = jnp.pad(idx, ((0, 0), (0, 0), (0, 0), (0, nk - m)), mode="edge")
    cnt = jnp.full((1, hkv, nq), m, jnp.int32)
    return BlockSparseMetadata(idx, cnt, jnp.ones(idx.shape, bool), block, block), m / nk


def bs_check(f, q, k, v, meta, mask_fn, rows=256):
    """Max error relative to max |ref| of the last `rows` query rows vs the XLA reference."""
    t, block = q.shape[1], meta.block_q
    out = jax.jit(f)(q, k, v, meta)
    nb = rows // block
    sl = BlockSparseMetadata(meta.kv_block_indices[:, :, -nb:], meta.kv_block_counts[:, :, -nb:],
                             meta.kv_block_full[:, :, -nb:], block, meta.block_kv)
    args = bs_args(t, mask_fn)
    args["q_positions"] = args["q_positions"][:, t - rows:]
    ref = jax.jit(lambda q_, k_, v_, m_: block_sparse_attention(
        q_, k_, v_, m_, scale=q.shape[-1] ** -0.5, impl="xla", **args))(q[:, t - rows:], k, v, sl)
    return rel(out[:, t - rows:], ref)


def bench_block_sparse_shape(h, hkv, t, d, iters, block=128):
    """One (H, Hkv, T): dense flash / cuDNN (full and causal) once, then block_sparse at each
    density; each figure a median of `iters` calls, fwd and fwd+bwd."""
    q, k, v, do = make(h, hkv, t, d)
    n = t // block
    dense = {}
    for name, f in (("flash", dense_flash), ("cudnn", cudnn_full), ("flash_causal", ours(TritonConfig())),
                    ("cudnn_causal", cudnn)):
        dense[f"{name}_fwd_ms"] = 1e3 * median_time(jax.jit(f), q, k, v, iters=iters)
        dense[f"{name}_fwdbwd_ms"] = 1e3 * median_time(fwd_bwd(f), q, k, v, do, iters=iters)
    print(json.dumps(dict(h=h, hkv=hkv, t=t, **dense)), flush=True)
    cases = [random_block_metadata(i, hkv, n, n, float(x), block) + (None, f"random {x}")
             for i, x in enumerate(FLAGS.densities)]
    causal = P.static_block_metadata(P.Causal(), t, t, block, block)
    cases.append((causal, float(np.asarray(causal.kv_block_counts).mean()) / n, P.Causal(), "causal"))
    rows = []
    for meta, density, mask_fn, label in cases:
        f = bs_kernel(mask_fn)
        row = dict(h=h, hkv=hkv, t=t, d=d, pattern=label, density=density, **dense)
        row["err_ref"] = bs_check(f, q, k, v, meta, mask_fn)
        row["bs_fwd_ms"] = 1e3 * median_time(jax.jit(f), q, k, v, meta, iters=iters)
        row["bs_fwdbwd_ms"] = 1e3 * median_time(bs_fwd_bwd(f), q, k, v, meta, do, iters=iters)
        for kind in ("fwd", "fwdbwd"):
            row[f"{kind}_vs_scaled_flash"] = row[f"bs_{kind}_ms"] / (density * dense[f"flash_{kind}_ms"])
            row[f"{kind}_vs_scaled_cudnn"] = row[f"bs_{kind}_ms"] / (density * dense[f"cudnn_{kind}_ms"])
        flops = density * 4.0 * h * t * t * d
        row["bs_fwd_tflops"] = flops / row["bs_fwd_ms"] / 1e9
        row["bs_fwdbwd_tflops"] = 3.5 * flops / row["bs_fwdbwd_ms"] / 1e9
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main_block_sparse(info, log):
    rows = []
    for h, hkv, t in shapes("block_sparse"):
        try:
            new = bench_block_sparse_shape(h, hkv, t, FLAGS.head_dim, FLAGS.iters)
            rows += new
            for row in new:
                log_row(log, "block_sparse", row)
        except Exception as e:  # noqa: BLE001 - report and go on with the other shapes
            print(f"block_sparse H={h} Hkv={hkv} T={t} failed: {str(e)[:800]}", flush=True)
    with open(FLAGS.out, "w") as fh:
        json.dump(dict(info=info, rows=rows), fh, indent=1)
    print(f"\n{info}\nblock_sparse (Triton, tiles {TritonConfigBS()}), metadata blocks 128")
    print(f"{'H/Hkv':>6} {'T':>6} {'pattern':>12} {'dens':>5} | {'fwd ms':>8} {'/d*fl':>6} {'/d*cu':>6} "
          f"{'TF/s':>5} | {'f+b ms':>8} {'/d*fl':>6} {'/d*cu':>6} {'TF/s':>5} | {'flash f':>8} "
          f"{'f+b':>8} | {'err':>7}")
    for r in rows:
        print(f"{r['h']:>3}/{r['hkv']:<2} {r['t']:>6} {r['pattern']:>12} {r['density']:5.3f} | "
              f"{r['bs_fwd_ms']:8.3f} {r['fwd_vs_scaled_flash']:6.2f} {r['fwd_vs_scaled_cudnn']:6.2f} "
              f"{r['bs_fwd_tflops']:5.0f} | {r['bs_fwdbwd_ms']:8.3f} {r['fwdbwd_vs_scaled_flash']:6.2f} "
              f"{r['fwdbwd_vs_scaled_cudnn']:6.2f} {r['bs_fwdbwd_tflops']:5.0f} | "
              f"{r['flash_fwd_ms']:8.3f} {r['flash_fwdbwd_ms']:8.3f} | {r['err_ref']:7.1e}")
    print("dense (ms): " + "; ".join(
        f"{r['h']}/{r['hkv']} T={r['t']}: flash {r['flash_fwd_ms']:.2f}/{r['flash_fwdbwd_ms']:.2f}, "
        f"cudnn {r['cudnn_fwd_ms']:.2f}/{r['cudnn_fwdbwd_ms']:.2f}, causal flash "
        f"{r['flash_causal_fwd_ms']:.2f}/{r['flash_causal_fwdbwd_ms']:.2f} cudnn "
        f"{r['cudnn_causal_fwd_ms']:.2f}/{r['cudnn_causal_fwdbwd_ms']:.2f}"
        for r in rows if r["pattern"] == "causal"))


def sweep(base, iters):
    h, hkv, t = (int(x) for x in FLAGS.sweep_shape.split(":"))
    q, k, v, do = make(h, hkv, t, FLAGS.head_dim)
    results, best = [], base
    best_t = float("inf")
    for over in FWD_SWEEP:
        cfg = dataclasses.replace(base, **over)
        try:
            ms = 1e3 * median_time(jax.jit(ours(cfg)), q, k, v, iters=iters)
        except Exception as e:  # noqa: BLE001 - a config that fails to compile is skipped
            print("sweep fwd", over, "failed:", str(e)[:300], flush=True)
            continue
        results.append(dict(kind="fwd", ms=ms, **over))
        print("sweep fwd", over, f"{ms:.3f} ms", flush=True)
        if ms < best_t:
            best, best_t = cfg, ms
    best_t = float("inf")
    base = best
    for over in BWD_SWEEP if FLAGS.backward and FLAGS.sweep_bwd else []:
        cfg = dataclasses.replace(base, **over)
        try:
            ms = 1e3 * median_time(fwd_bwd(ours(cfg)), q, k, v, do, iters=iters)
        except Exception as e:  # noqa: BLE001
            print("sweep bwd", over, "failed:", str(e)[:300], flush=True)
            continue
        results.append(dict(kind="fwdbwd", ms=ms, **over))
        print("sweep fwd+bwd", over, f"{ms:.3f} ms", flush=True)
        if ms < best_t:
            best, best_t = cfg, ms
    return best, results


def ours_mosaic(cfg):
    def f(q, k, v):        # default positions: concrete arange, which the kernel needs
        return flash_attention(q, k, v, mask_fn=P.Causal(), scale=q.shape[-1] ** -0.5,
                               impl="mosaic_gpu", config=cfg)
    return f


def main_mosaic_gpu(cfg, info, log):
    """Causal forward (and with --backward forward+backward), bf16, one process: cuDNN,
    Mosaic GPU (per --mosaic_stages and --mosaic_bwd), and per --mosaic_peers Triton, the
    Mosaic forward with the Triton backward and tokamax's Mosaic GPU kernel (when
    importable)."""
    rows = []
    plans = {"split": MosaicGPUBackwardConfig(), "fused": MosaicGPUBackwardConfig(fused_dq=True),
             "split_2r": MosaicGPUBackwardConfig(dkv_two_rounds=True),
             "fused_2r": MosaicGPUBackwardConfig(fused_dq=True, dkv_two_rounds=True)}
    bad = set(FLAGS.mosaic_bwd) - set(plans) or set(FLAGS.mosaic_peers) - {
        "triton", "tritonbwd", "tokamax"}
    if bad:
        raise ValueError(f"--mosaic_bwd / --mosaic_peers: unknown {sorted(bad)}")
    from peers import tokamax_attention  # noqa: PLC0415 (experiments/ is on the path as a script)

    peer = tokamax_attention() if "tokamax" in FLAGS.mosaic_peers else None
    for h, hkv, t in shapes("mosaic_gpu"):
        q, k, v, do = make(h, hkv, t, FLAGS.head_dim)
        flops = 2.0 * h * t * t * FLAGS.head_dim
        row = dict(h=h, hkv=hkv, t=t, d=FLAGS.head_dim)
        fns = [("triton", ours(cfg))] if "triton" in FLAGS.mosaic_peers else []
        fns.append(("cudnn", cudnn))
        fns += [(f"mosaic_s{s}" + ("" if plan == "split" else f"_{plan}"),
                 ours_mosaic(MosaicGPUConfig(max_concurrent_steps=int(s), backward=plans[plan])))
                for s in FLAGS.mosaic_stages for plan in FLAGS.mosaic_bwd]
        if FLAGS.backward and "tritonbwd" in FLAGS.mosaic_peers:
            fns.append(("mosaic_tritonbwd", ours_mosaic(MosaicGPUConfig(backward=cfg))))
        if peer is not None:
            fns.append(("tokamax", peer))
        for name, f in fns:
            try:
                if name != "cudnn":
                    chk = check(f, q, k, v, do)
                    row[f"{name}_err_ref"] = chk["err_ref"]
                    if "err_grad_cudnn" in chk:
                        row[f"{name}_err_grad_cudnn"] = chk["err_grad_cudnn"]
                row[f"{name}_fwd_ms"] = 1e3 * median_time(jax.jit(f), q, k, v, iters=FLAGS.iters)
                row[f"{name}_tflops"] = flops / row[f"{name}_fwd_ms"] / 1e9
                if FLAGS.backward:
                    row[f"{name}_fwdbwd_ms"] = 1e3 * median_time(fwd_bwd(f), q, k, v, do,
                                                                 iters=FLAGS.iters)
            except Exception as e:  # noqa: BLE001 - report and go on
                row[f"{name}_error"] = str(e)[:2000]
                print(f"{name} H={h}/{hkv} T={t} failed: {str(e)[:2000]}", flush=True)
        for name, _ in fns:
            if f"{name}_fwd_ms" in row and "cudnn_fwd_ms" in row:
                row[f"{name}_ratio"] = row["cudnn_fwd_ms"] / row[f"{name}_fwd_ms"]
            if f"{name}_fwdbwd_ms" in row and "cudnn_fwdbwd_ms" in row:
                row[f"{name}_fwdbwd_ratio"] = row["cudnn_fwdbwd_ms"] / row[f"{name}_fwdbwd_ms"]
        print(json.dumps(row), flush=True)
        rows.append(row)
        log_row(log, "mosaic_gpu", row)
    with open(FLAGS.out, "w") as fh:
        json.dump(dict(info=info, config=dataclasses.asdict(cfg), rows=rows), fh, indent=1)
    print(f"\n{info}\ncausal forward, bf16, D={FLAGS.head_dim}: ms (ratio = cuDNN time / time, err = max rel vs ref)")
    for r in rows:
        cells = [f"{n[:-7]} {r[n]:.3f} ({r.get(n[:-7] + '_ratio', float('nan')):.2f}x, "
                 f"err {r.get(n[:-7] + '_err_ref', float('nan')):.1e})"
                 for n in r if n.endswith("_fwd_ms")]
        print(f"H={r['h']}/{r['hkv']} T={r['t']}: " + " | ".join(cells))
    if FLAGS.backward:
        print("causal forward+backward: ms (ratio = cuDNN time / time)")
        for r in rows:
            cells = [f"{n[:-10]} {r[n]:.3f} ({r.get(n[:-10] + '_fwdbwd_ratio', float('nan')):.2f}x)"
                     for n in r if n.endswith("_fwdbwd_ms")]
            print(f"H={r['h']}/{r['hkv']} T={r['t']}: " + " | ".join(cells))


def main(argv):
    del argv
    cfg = TritonConfig()
    if FLAGS.config:
        over = dict(kv.split("=") for kv in FLAGS.config.split(","))
        cfg = dataclasses.replace(cfg, **{k_: int(v_) for k_, v_ in over.items()})
    info = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                date=time.strftime("%Y-%m-%d %H:%M:%S"))
    from script_io import MetricsLog  # noqa: PLC0415 (experiments/ is on the path when run as a script)
    stem = os.path.splitext(FLAGS.out)[0]
    tb_dir = os.path.join(os.path.dirname(os.path.abspath(stem)), "tb", os.path.basename(stem))
    with MetricsLog(stem + ".jsonl", tb_dir) as log:
        if FLAGS.scores:
            return main_scores(cfg, info, log)
        if FLAGS.block_sparse:
            return main_block_sparse(info, log)
        if FLAGS.mosaic_gpu:
            return main_mosaic_gpu(cfg, info, log)
        return main_flash(cfg, info, log)


def main_flash(cfg, info, log):
    """The default table: flash (Triton) vs cuDNN, causal, fwd and fwd+bwd (after `--sweep`)."""
    sweep_results = []
    if FLAGS.sweep:
        cfg, sweep_results = sweep(cfg, FLAGS.iters)
    print("config:", cfg, flush=True)
    rows = []
    for h, hkv, t in shapes("flash"):
        try:
            rows.append(bench_shape(cfg, h, hkv, t, FLAGS.head_dim, FLAGS.iters, FLAGS.backward))
            log_row(log, "flash", rows[-1])
        except Exception as e:  # noqa: BLE001 - report and go on with the other shapes
            print(f"shape H={h} Hkv={hkv} T={t} failed: {str(e)[:500]}", flush=True)
    with open(FLAGS.out, "w") as fh:
        json.dump(dict(info=info, config=dataclasses.asdict(cfg), sweep=sweep_results, rows=rows), fh,
                  indent=1)
    print(f"\n{info}\nconfig {cfg}")
    head = (f"{'H/Hkv':>6} {'T':>6} | {'fwd ms':>8} {'cudnn':>8} {'ratio':>6} {'TF/s':>5} | "
            f"{'f+b ms':>8} {'cudnn':>8} {'ratio':>6} {'TF/s':>5} | {'err ref':>8} {'err cudnn':>9}")
    print(head)
    for r in rows:
        print(f"{r['h']:>3}/{r['hkv']:<2} {r['t']:>6} | {r['ours_fwd_ms']:8.3f} {r['cudnn_fwd_ms']:8.3f} "
              f"{r['fwd_ratio']:6.2f} {r['ours_fwd_tflops']:5.0f} | "
              f"{r.get('ours_fwdbwd_ms', float('nan')):8.3f} {r.get('cudnn_fwdbwd_ms', float('nan')):8.3f} "
              f"{r.get('fwdbwd_ratio', float('nan')):6.2f} {r.get('ours_fwdbwd_tflops', float('nan')):5.0f} | "
              f"{r['err_ref']:8.1e} {r['err_cudnn']:9.1e}")


if __name__ == "__main__":
    # not at the top: notebooks and other benchmarks import this module as experiments.bench_kernels
    from script_io import run  # noqa: PLC0415
    run(main)
