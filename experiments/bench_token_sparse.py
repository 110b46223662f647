"""Benchmark the `token_sparse` Triton kernel against cuDNN dense causal attention (bf16).

Two head configurations, B=1, causal random selections, forward and forward+backward:

* DSA (DeepSeek-V3.2 sparse attention, MLA in MQA form): H=64 query heads over one latent
  KV head, D=576 (512 latent + 64 rope), Dv=512, top-k=2048 token indices per query;
* NSA selection (arXiv 2502.11089): HQ=64, HKV=4, D=Dv=128, 16 blocks of 64 tokens per query
  token and kv head.

Selections are stratified random: query t takes min(k, t + 1) distinct tokens (blocks) of
its causal prefix, one from each of k equal slices (sorted; the rest -1). cuDNN runs the
dense causal attention in the same process: for NSA of the same head configuration; for DSA
(cuDNN rejects D=576 / Dv=512: it needs D <= 256) of DeepSeek-V3's dense MLA in its
training (non-absorbed) form, H = Hkv = 64, D = 192 (128 nope + 64 rope), the dense
attention DSA replaces, with Dv = 192 too (MLA's is 128, but `jax.nn.dot_product_attention`
needs Dv == D: V padded, so an upper bound on the dense cost) (`Shape.dense`; the table's "cuDNN H/Hkv D/Dv" column says
which). Correctness first: the kernel's last `--check_rows` query rows against the
dense-mask reference. TFLOP/s count the visible (query, key) pairs only: fwd 2 * H * (D + Dv)
per pair, fwd+bwd 2.5x that (cuDNN: the causal half). `--ts_config dkdv=atomic` times the
backward with dk/dv by atomics (the default for NSA is the inverted index).

Reuses `experiments/bench_kernels.py`'s timer and its --out / --seq_lens / --iters /
--backward flags (defaults changed here). On a GPU machine, repo root:
  PYTHONPATH=. python experiments/bench_token_sparse.py --out /tmp/bench_token_sparse.json
`--ts_sweep` first tries a few TritonConfig overrides per shape (SWEEP) at the first T.
CPU smoke run (tiny shapes, Triton in interpret mode, no cuDNN):
  PYTHONPATH=. python experiments/bench_token_sparse.py --small --out /tmp/ts_small.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root: `experiments.` imports

import jax
import jax.numpy as jnp
from absl import flags

from experiments.bench_kernels import fwd_bwd, median_time, rel
from pallas_kernels.token_sparse.api import TritonConfig, token_sparse_attention

FLAGS = flags.FLAGS
flags.DEFINE_bool("small", False, "CPU smoke run: tiny shapes, interpret mode, no cuDNN")
flags.DEFINE_list("shapes", ["dsa", "nsa"], "which head configurations")
flags.DEFINE_integer("check_rows", 64, "query rows checked against the reference")
flags.DEFINE_string("ts_config", "", "TritonConfig overrides, e.g. block_k=64,dkdv=atomic")
flags.DEFINE_bool("ts_sweep", False, "first time SWEEP's configs per shape at the first T and "
                  "use the fastest fwd+bwd one for that shape's rows")
FLAGS.set_default("out", "bench_token_sparse.json")
FLAGS.set_default("seq_lens", ["16384", "65536"])


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    h: int
    hkv: int
    d: int
    dv: int
    k: int             # entries per query (tokens or blocks)
    block_size: int
    dense: tuple = ()  # (Hkv, D, Dv) of the cuDNN dense baseline; () = the same as ours


SHAPES = {"dsa": Shape("dsa", 64, 1, 576, 512, 2048, 1, dense=(64, 192, 192)),
          "nsa": Shape("nsa", 64, 4, 128, 128, 16, 64)}

# TritonConfig overrides tried by --ts_sweep ("" = the defaults).
# H200, DSA at 16K (2026-11-24): block_k_bwd=16 and num_warps_bwd=4 slower than the
# defaults; 64 rows per backward program exceed shared memory.
SWEEP = {"dsa": ["", "block_k=64", "num_warps=4", "block_k=16", "max_rows=16", "num_stages=3",
                 "block_k_bwd=16", "num_warps_bwd=4", "block_k=64,num_warps=8",
                 "max_rows=64,num_warps=8", "block_k=64,num_stages=3"],
         "nsa": ["", "num_warps=8", "num_stages=3", "num_warps=8,num_stages=3", "num_warps_bwd=8",
                 "num_stages_bwd=2", "num_warps_bwd=8,num_stages_bwd=2"]}
SMALL = {"dsa": Shape("dsa", 16, 1, 72, 64, 16, 1),
         "nsa": Shape("nsa", 16, 2, 32, 32, 4, 8)}


def stratified_indices(key, t: int, hkv: int, k: int, block_size: int):
    """int32 `[1, T, Hkv, k]`: query t picks min(k, n_t) distinct blocks of its prefix
    (n_t = t // block_size + 1), one uniformly from each of k integer slices; rest -1."""
    n = (jnp.arange(t, dtype=jnp.int32) // block_size + 1)[:, None, None]      # [T, 1, 1]
    j = jnp.arange(k, dtype=jnp.int32)[None, None, :]
    lo, hi = j * n // k, (j + 1) * n // k
    u = jax.random.uniform(key, (t, hkv, k))
    pick = lo + jnp.floor(u * (hi - lo)).astype(jnp.int32)
    idx = jnp.where(n >= k, pick, jnp.where(j < n, j, -1))
    return idx[None].astype(jnp.int32)


def visible_pairs(idx, block_size: int) -> float:
    """(query, key) pairs the selection exposes, summed over kv heads (causal: the last
    block of a query holds t % block_size + 1 keys)."""
    t = idx.shape[1]
    tt = jnp.arange(t)[None, :, None, None]
    full = jnp.where(idx >= 0, block_size, 0)
    last = jnp.where(idx == tt // block_size, tt % block_size + 1, full)
    return float(jnp.sum(last.astype(jnp.float32)))


def make(shape: Shape, t: int, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (1, t, shape.h, shape.d), dtype)
    k = jax.random.normal(ks[1], (1, t, shape.hkv, shape.d), dtype)
    v = jax.random.normal(ks[2], (1, t, shape.hkv, shape.dv), dtype)
    do = jax.random.normal(ks[3], (1, t, shape.h, shape.dv), dtype)
    idx = stratified_indices(ks[4], t, shape.hkv, shape.k, shape.block_size)
    return q, k, v, do, idx


def ours(shape: Shape, idx, cfg, interpret):
    def f(q, k, v):
        t = q.shape[1]
        pos = jnp.arange(t, dtype=jnp.int32)[None]
        return token_sparse_attention(q, k, v, idx, block_size=shape.block_size, q_positions=pos,
                                      kv_positions=pos, causal=True, scale=q.shape[-1] ** -0.5,
                                      impl="triton", interpret=interpret, config=cfg)
    return f


def cudnn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def check(f, shape: Shape, q, k, v, idx, rows: int) -> float:
    """Max relative error of the last `rows` query rows against the dense-mask reference."""
    t = q.shape[1]
    out = jax.jit(f)(q, k, v)[:, t - rows:]
    ref = token_sparse_attention(
        q[:, t - rows:], k, v, idx[:, t - rows:], block_size=shape.block_size,
        q_positions=jnp.arange(t - rows, t, dtype=jnp.int32)[None],
        kv_positions=jnp.arange(t, dtype=jnp.int32)[None], causal=True,
        scale=q.shape[-1] ** -0.5, impl="xla")
    return rel(out, ref)


def bench(shape: Shape, t: int, cfg, iters: int, small: bool, dense: bool = True):
    dtype = jnp.float32 if small else jnp.bfloat16
    q, k, v, do, idx = make(shape, t, dtype)
    f = ours(shape, idx, cfg, interpret=small)
    pairs = visible_pairs(idx, shape.block_size) * (shape.h // shape.hkv)   # per query head
    flops = 2.0 * pairs * (shape.d + shape.dv)
    row = dict(shape=shape.name, t=t, h=shape.h, hkv=shape.hkv, d=shape.d, dv=shape.dv,
               k=shape.k, block_size=shape.block_size, config=dataclasses.asdict(cfg),
               density=pairs / (shape.h * t * (t + 1) / 2))
    row["err_ref"] = check(f, shape, q, k, v, idx, min(FLAGS.check_rows, t))
    row["ours_fwd_ms"] = 1e3 * median_time(jax.jit(f), q, k, v, iters=iters)
    row["ours_fwd_tflops"] = flops / row["ours_fwd_ms"] / 1e9
    if FLAGS.backward:
        row["ours_fwdbwd_ms"] = 1e3 * median_time(fwd_bwd(f), q, k, v, do, iters=iters)
        row["ours_fwdbwd_tflops"] = 2.5 * flops / row["ours_fwdbwd_ms"] / 1e9
    if dense and not small:
        hkv, d, dv = shape.dense or (shape.hkv, shape.d, shape.dv)
        if shape.dense:
            ks = jax.random.split(jax.random.key(1), 4)
            q, k, v, do = (jax.random.normal(kk, (1, t, n, w), dtype) for kk, (n, w) in
                           zip(ks, [(shape.h, d), (hkv, d), (hkv, dv), (shape.h, dv)]))
        row["cudnn_shape"] = f"{shape.h}/{hkv} {d}/{dv}"
        dense_flops = 2.0 * shape.h * t * t / 2 * (d + dv)
        try:
            row["cudnn_fwd_ms"] = 1e3 * median_time(jax.jit(cudnn), q, k, v, iters=iters)
            row["cudnn_fwd_tflops"] = dense_flops / row["cudnn_fwd_ms"] / 1e9
            if FLAGS.backward:
                row["cudnn_fwdbwd_ms"] = 1e3 * median_time(fwd_bwd(cudnn), q, k, v, do, iters=iters)
                row["cudnn_fwdbwd_tflops"] = 2.5 * dense_flops / row["cudnn_fwdbwd_ms"] / 1e9
        except Exception as e:  # noqa: BLE001 - cuDNN rejects some head dims (D=576)
            row["cudnn_error"] = str(e).splitlines()[0][:200]
    print(json.dumps(row), flush=True)
    return row


def table(rows) -> str:
    head = ("| shape | T | H/Hkv | D/Dv | k x block | fwd ms | TF/s | cuDNN fwd ms | f+b ms | TF/s "
            "| cuDNN f+b ms | cuDNN H/Hkv D/Dv | err ref |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda r, key, spec: format(r[key], spec) if key in r else "n/a"  # noqa: E731
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['t']} | {r['h']}/{r['hkv']} | {r['d']}/{r['dv']} | "
            f"{r['k']} x {r['block_size']} | {fmt(r, 'ours_fwd_ms', '.2f')} | "
            f"{fmt(r, 'ours_fwd_tflops', '.0f')} | {fmt(r, 'cudnn_fwd_ms', '.2f')} | "
            f"{fmt(r, 'ours_fwdbwd_ms', '.2f')} | {fmt(r, 'ours_fwdbwd_tflops', '.0f')} | "
            f"{fmt(r, 'cudnn_fwdbwd_ms', '.2f')} | {r.get('cudnn_shape', 'n/a')} | "
            f"{r['err_ref']:.1e} |")
    return "\n".join(lines)


def with_overrides(cfg: TritonConfig, text: str) -> TritonConfig:
    """`cfg` with `key=int,...` overrides applied."""
    if not text:
        return cfg
    over = dict(kv.split("=") for kv in text.split(","))
    return dataclasses.replace(cfg, **{k_: int(v_) if v_.isdigit() else v_
                                       for k_, v_ in over.items()})


def sweep(shape: Shape, t: int, base: TritonConfig, iters: int, small: bool):
    """Time each SWEEP override at T=t; return the fastest fwd+bwd config and all rows."""
    rows = []
    for text in SWEEP[shape.name]:
        cfg = with_overrides(base, text)
        try:
            row = bench(shape, t, cfg, iters, small, dense=False)
        except Exception as e:  # noqa: BLE001 - a config that does not compile: skip it
            print(f"sweep {shape.name} {text!r} failed: {str(e)[:300]}", flush=True)
            continue
        rows.append(dict(row, override=text))
    key = "ours_fwdbwd_ms" if FLAGS.backward else "ours_fwd_ms"
    best = min(rows, key=lambda r: r[key]) if rows else dict(override="")
    print(f"sweep {shape.name} T={t}: best {best['override']!r}", flush=True)
    return with_overrides(base, best["override"]), rows


def main(argv):
    del argv
    cfg = with_overrides(TritonConfig(), FLAGS.ts_config)
    shapes = SMALL if FLAGS.small else SHAPES
    seq_lens = [64, 96] if FLAGS.small else [int(x) for x in FLAGS.seq_lens]
    iters = 2 if FLAGS.small else FLAGS.iters
    info = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                date=time.strftime("%Y-%m-%d %H:%M:%S"), small=FLAGS.small)
    rows, sweeps = [], []
    for name in FLAGS.shapes:
        shape_cfg = cfg
        if FLAGS.ts_sweep:
            shape_cfg, swept = sweep(shapes[name], seq_lens[0], cfg, iters, FLAGS.small)
            sweeps += swept
        for t in seq_lens:
            try:
                rows.append(bench(shapes[name], t, shape_cfg, iters, FLAGS.small))
            except Exception as e:  # noqa: BLE001 - report and go on with the other shapes
                print(f"shape {name} T={t} failed: {str(e)[:500]}", flush=True)
            with open(FLAGS.out, "w") as fh:        # after every row: a timeout keeps the rest
                json.dump(dict(info=info, config=dataclasses.asdict(cfg), rows=rows, sweep=sweeps),
                          fh, indent=1)
    print(f"\n{info}\n\n{table(rows)}")


if __name__ == "__main__":
    from script_io import run  # noqa: PLC0415 (experiments/script_io.py: --help exits 0)
    run(main)
