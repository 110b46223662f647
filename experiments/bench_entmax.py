"""Benchmark the alpha-entmax attention kernel (`pallas_kernels.entmax`) against our softmax
`flash` (impl="auto") and AdaSplash (PyTorch/Triton, arXiv 2502.12082, when importable),
side by side in one process (BENCHMARKING.md), causal, bf16, B=1, H/Hkv=16/16, D=128.

For each `--inputs` kind and length: correctness first (relative error of our output
against the plain-jnp reference on `--check_rows` query rows spread over the sequence),
the measured fraction of exact zeros among the visible probabilities on those rows, the
fraction of visited (query tile, KV tile) pairs that stay live (after the lower bound
`max - 1` and after the final threshold: block skipping), then the median of `--iters`
timed calls of the forward and of forward+backward, each in `jax.block_until_ready`.

Inputs (`--inputs`):
* `random`: q, k, v ~ N(0, 1). Probabilities are >99% zero at long T, yet nearly every tile
  holds some row's support: block skipping cannot trigger.
* `topics`: keys and queries in runs of `--run` tokens, each run one of `--topics`
  orthogonal topic directions (gain `--gain`, plus N(0, `--noise`)); a query aligns with
  the keys of its topic, so whole KV tiles fall below the threshold (local, clustered
  attention, the case AdaSplash's block masks are built for).

Measured (H100 80GB, jax 0.11.2, 2026-12-06 ~20:30 UTC, code of cf662ea (stats on 128x128
tiles); `--seq_lens 4096,16384,65536 --iters 5 --check_rows 32 --noadasplash --inputs
topics,random`, cut at 150 s before random 64K; flash = impl "auto", i.e. Mosaic GPU; ms,
x = flash time / ours):

  inputs     T | zeros  live tiles (lower bound) | fwd  ours / flash      x | f+b  ours / flash     x
  topics  4096 | 0.978  0.17 (0.20)             |      0.707 / 0.280  0.40 |      0.927 / 0.916  0.99
  topics 16384 | 0.994  0.06 (0.10)             |      3.421 / 1.926  0.56 |      4.549 / 7.607  1.67
  topics 65536 | 0.998  0.03 (0.04)             |     27.701 / 28.659 1.03 |     34.065 / 120.70 3.54
  random  4096 | 0.990  1.00 (1.00)             |      1.368 / 0.303  0.22 |      2.162 / 0.891  0.41
  random 16384 | 0.997  1.00 (1.00)             |     14.141 / 1.851  0.13 |     21.985 / 7.625  0.35

(relative error against the reference on 32 rows: 2.1e-3 to 2.5e-3, bf16.) The previous
kernels (commit 516d7bd, same flags at 4K/16K): topics 16K 4.575 / 5.540 ms, random 16K
26.01 / 34.39 ms.

Run on a GPU machine:
  PYTHONPATH=. python experiments/bench_entmax.py --out /tmp/bench_entmax.json
Tile / search sweep (one extra row per entry, same inputs; flash is timed once, on the
base row, and its figures reused):
  PYTHONPATH=. python experiments/bench_entmax.py --seq_lens 16384 \
      --sweep recheck_tiles=0,block_q=128/num_warps=8,num_candidates=3/num_passes=4/finish_passes=0
Besides `--out` (all rows, the settings and the device), each row goes as it is measured
to `<out>.jsonl` and its figures to TensorBoard scalars `entmax/<inputs>/<name>` at step = T.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
from absl import flags

from pallas_kernels.entmax import api as entmax_api
from pallas_kernels.entmax import reference as entmax_ref
from pallas_kernels.entmax import triton as entmax_triton
from pallas_kernels.entmax.triton import EntmaxTritonConfig
from pallas_kernels.flash.api import flash_attention
from sparse_jax import patterns as P

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "bench_entmax.json", "where to write the JSON results")
flags.DEFINE_list("seq_lens", ["4096", "16384", "65536"], "sequence lengths")
flags.DEFINE_string("heads", "16:16", "num_heads:num_kv_heads")
flags.DEFINE_integer("head_dim", 128, "head dim")
flags.DEFINE_float("alpha", 1.5, "entmax alpha in (1, 2]")
flags.DEFINE_list("inputs", ["random", "topics"], "input kinds: random, topics")
flags.DEFINE_integer("run", 512, "topics: tokens per run")
flags.DEFINE_integer("topics", 32, "topics: number of orthogonal topic directions")
flags.DEFINE_float("gain", 7.0, "topics: norm of a topic direction")
flags.DEFINE_float("noise", 0.5, "topics: std of the N(0, s^2) noise added to q and k")
flags.DEFINE_integer("iters", 10, "timed calls per figure (median)")
flags.DEFINE_bool("backward", True, "also time forward+backward")
flags.DEFINE_integer("check_rows", 64, "query rows checked against the reference")
flags.DEFINE_string("config", "", "EntmaxTritonConfig overrides, e.g. block_q=128,num_passes=3")
flags.DEFINE_list("sweep", [], "extra EntmaxTritonConfig overrides to time beside --config, each "
                  "'key=value/key=value' (e.g. block_q=128/num_warps=8,num_candidates=1); their rows "
                  "carry the overrides under 'config'")
flags.DEFINE_bool("breakdown", True, "also time the stats kernel (each impl: Triton, Mosaic GPU where "
                  "it runs) and stats + threshold alone")
flags.DEFINE_enum("stats_impl", "auto", ["auto", "triton", "mosaic_gpu"],
                  "EntmaxTritonConfig.stats_impl of the timed rows (a --sweep entry "
                  "'stats_impl=mosaic_gpu' times the other beside it)")
flags.DEFINE_bool("adasplash", True, "time adasplash when importable")
flags.DEFINE_bool("interpret", False, "Pallas interpret mode (a CPU smoke test of the script)")


def median_ms(fn, *args, iters):
    jax.block_until_ready(fn(*args))                     # compile + warm-up
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def make_inputs(kind: str, t: int, h: int, hkv: int, d: int, seed: int = 0):
    """bf16 `q [1, T, H, D]`, `k, v [1, T, Hkv, D]` of the kind (see the module docstring)."""
    ks = jax.random.split(jax.random.key(seed), 4)
    v = jax.random.normal(ks[2], (1, t, hkv, d), jnp.bfloat16)
    if kind == "random":
        return (jax.random.normal(ks[0], (1, t, h, d), jnp.bfloat16),
                jax.random.normal(ks[1], (1, t, hkv, d), jnp.bfloat16), v)
    if kind != "topics":
        raise ValueError(f"--inputs: unknown kind {kind!r} (random, topics)")
    if FLAGS.topics > d:
        raise ValueError(f"--topics ({FLAGS.topics}) must be <= head_dim ({d}) (orthogonal)")
    basis = jnp.linalg.qr(jax.random.normal(ks[3], (d, d)))[0][:FLAGS.topics] * FLAGS.gain
    topic = basis[(jnp.arange(t) // FLAGS.run) % FLAGS.topics]                       # [T, D]
    q = topic[None, :, None] + FLAGS.noise * jax.random.normal(ks[0], (1, t, h, d))
    k = topic[None, :, None] + FLAGS.noise * jax.random.normal(ks[1], (1, t, hkv, d))
    return q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v


def check(q, k, v, alpha, cfg, rows: int):
    """(relative error of our output vs the reference, zero fraction, live tiles after the
    threshold, live tiles after the lower bound) on `rows` query rows spread over T."""
    t = q.shape[1]
    sel = jnp.linspace(0, t - 1, rows).astype(jnp.int32)
    qs = q[:, sel]
    pos_q = sel[None]
    pos_k = jnp.arange(t, dtype=jnp.int32)[None]
    ours = entmax_api.entmax_attention(qs, k, v, alpha=alpha, q_positions=pos_q, kv_positions=pos_k,
                                       impl="triton", config=cfg, interpret=FLAGS.interpret)
    with jax.default_matmul_precision("highest"):
        ref = entmax_api.entmax_attention(qs, k, v, alpha=alpha, q_positions=pos_q,
                                          kv_positions=pos_k, impl="xla")
        p, vis = entmax_ref.entmax_probabilities(qs, k, alpha=alpha, q_positions=pos_q,
                                                 kv_positions=pos_k, causal=True,
                                                 scale=q.shape[-1] ** -0.5)
    err = float(jnp.linalg.norm((ours - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32)))
    zeros = float((((p == 0) & vis[:, None]).sum()) / (vis.sum() * q.shape[2]))
    st = entmax_triton.Static(alpha=alpha, causal=True, scale=q.shape[-1] ** -0.5, config=cfg,
                              interpret=FLAGS.interpret)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    live, lower = jax.jit(lambda q, k: entmax_triton.tile_statistics(st, q, k, pos, pos))(q, k)
    return err, zeros, float(live), float(lower)


def breakdown_ms(q, k, alpha, cfg, iters):
    """Forward stages alone: the stats kernel of each impl (`stats_ms_triton`,
    `stats_ms_mosaic_gpu`, NaN where it does not run; `stats_ms` the row's own), and stats +
    threshold passes with the row's (the rest of the forward is the output pass and the
    live-tile bookkeeping)."""
    pos = jnp.arange(q.shape[1], dtype=jnp.int32)[None]

    def stages(q, k, upto, st):
        bq, bk = entmax_triton.tiles(st, q.shape[1], k.shape[1])
        impl, qp, kp, _, qpp, kpp = entmax_triton.pad_inputs(st, q, k, k[..., :1], pos, pos)
        m, n, tmax, full = entmax_triton.run_stats(st, impl, qp, kp, qpp, kpp, bq, bk)
        if upto == "stats":
            return m, tmax
        return entmax_triton.run_tau(st, qp, kp, qpp, kpp, m, n, tmax, full, bq, bk)

    def static(c):
        return entmax_triton.Static(alpha=alpha, causal=True, scale=q.shape[-1] ** -0.5, config=c,
                                    interpret=FLAGS.interpret)

    st = static(cfg)
    res = {}
    for impl in ("triton", "mosaic_gpu"):
        try:
            res[f"stats_ms_{impl}"] = median_ms(jax.jit(functools.partial(
                stages, upto="stats", st=static(dataclasses.replace(cfg, stats_impl=impl)))),
                q, k, iters=iters)
        except Exception as e:  # noqa: BLE001 - e.g. Mosaic GPU off Hopper: report, go on
            print(f"stats impl={impl}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            res[f"stats_ms_{impl}"] = float("nan")
    res["stats_impl"] = stats_impl_of(st, q, k)
    res["stats_ms"] = res[f"stats_ms_{res['stats_impl']}"]
    res["stats_tau_ms"] = median_ms(jax.jit(functools.partial(stages, upto="tau", st=st)), q, k,
                                    iters=iters)
    try:
        res.update(stage_ms(q, k, st, iters))
    except Exception as e:  # noqa: BLE001 - a diagnostic: report, keep the row
        print(f"stage_ms: {type(e).__name__}: {str(e)[:300]}", flush=True)
    return res


def stage_ms(q, k, st, iters):
    """Each later stage of the forward alone, on the earlier stages' outputs computed once:
    `lists_ms` (the threshold pass's live-tile lists, XLA), `tau_ms` (the threshold kernel,
    lists included), `out_ms` (the output pass with its lists, no residuals)."""
    pos = jnp.arange(q.shape[1], dtype=jnp.int32)[None]
    bq, bk = entmax_triton.tiles(st, q.shape[1], k.shape[1])
    T = entmax_triton

    @jax.jit
    def prepare(q, k):
        impl, qp, kp, vp, qpp, kpp = T.pad_inputs(st, q, k, k, pos, pos)
        m, n, tmax, full = T.run_stats(st, impl, qp, kp, qpp, kpp, bq, bk)
        return qp, kp, vp, qpp, kpp, m, n, tmax, full

    qp, kp, vp, qpp, kpp, m, n, tmax, full = prepare(q, k)
    lists = jax.jit(lambda m, n, tmax, full: T.tau_tile_list(m, n, tmax, full, bq))
    tau_fn = jax.jit(lambda *a: T.run_tau(st, *a, bq, bk))
    tau = tau_fn(qp, kp, qpp, kpp, m, n, tmax, full)
    out_fn = jax.jit(lambda qp, kp, vp, qpp, kpp, tau, tmax, full: T.run_out(
        st, qp, kp, vp, qpp, kpp, tau, T.compact(T.live_tiles(tmax, tau, bq), full[:, None]),
        bq, bk, False))
    return {"lists_ms": median_ms(lists, m, n, tmax, full, iters=iters),
            "tau_ms": median_ms(tau_fn, qp, kp, qpp, kpp, m, n, tmax, full, iters=iters),
            "out_ms": median_ms(out_fn, qp, kp, vp, qpp, kpp, tau, tmax, full, iters=iters)}


def stats_impl_of(st, q, k):
    """Which stats kernel `st` runs on these inputs ("triton" | "mosaic_gpu")."""
    return entmax_triton.stats_layout(st, q.dtype, q.shape[1], k.shape[1], q.shape[3])[0]


def bench(kind, t, h, hkv, d, alpha, cfg, iters, backward, label="", peers=True, flash=None):
    """One row. `flash`: the flash figures already timed on these inputs (a sweep row
    reuses its base row's), else None: time them here."""
    q, k, v = make_inputs(kind, t, h, hkv, d)
    do = jax.random.normal(jax.random.key(9), (1, t, h, d), jnp.bfloat16)
    err, zeros, live, lower = check(q, k, v, alpha, cfg, FLAGS.check_rows)
    row = dict(inputs=kind, t=t, h=h, hkv=hkv, d=d, alpha=alpha, config=label, err_ref=err,
               zero_frac=zeros, live_tiles=live, live_tiles_lower_bound=lower)
    print(json.dumps(row), flush=True)
    ours = lambda q, k, v: entmax_api.entmax_attention(  # noqa: E731
        q, k, v, alpha=alpha, impl="triton", config=cfg, interpret=FLAGS.interpret)
    soft = lambda q, k, v: flash_attention(q, k, v, mask_fn=P.Causal(), interpret=FLAGS.interpret)  # noqa: E731

    def fwdbwd(fn):
        def f(q, k, v, do):
            out, vjp = jax.vjp(fn, q, k, v)
            return vjp(do)
        return jax.jit(f)

    row["ours_fwd_ms"] = median_ms(jax.jit(ours), q, k, v, iters=iters)
    if FLAGS.breakdown:
        row.update(breakdown_ms(q, k, alpha, cfg, iters))
    flash = flash or {}
    row["flash_fwd_ms"] = flash.get("flash_fwd_ms") or median_ms(jax.jit(soft), q, k, v, iters=iters)
    row["fwd_speedup_vs_flash"] = row["flash_fwd_ms"] / row["ours_fwd_ms"]
    if backward:
        row["ours_fwdbwd_ms"] = median_ms(fwdbwd(ours), q, k, v, do, iters=iters)
        row["flash_fwdbwd_ms"] = (flash.get("flash_fwdbwd_ms")
                                  or median_ms(fwdbwd(soft), q, k, v, do, iters=iters))
        row["fwdbwd_speedup_vs_flash"] = row["flash_fwdbwd_ms"] / row["ours_fwdbwd_ms"]
    if FLAGS.adasplash and peers:
        print(json.dumps(row), flush=True)   # ours and flash kept should the peer's autotuning run out of time
        from peers import adasplash_ms  # noqa: PLC0415 (experiments/ is on the path)

        peer = adasplash_ms(q, k, v, alpha=alpha, iters=iters, backward=backward)
        if peer:
            row.update(peer)
    print(json.dumps(row), flush=True)
    return row


def main(argv):
    del argv
    entmax_api.check_alpha(FLAGS.alpha)
    def parse(text, sep):
        over = dict(kv.split("=") for kv in text.split(sep) if kv)
        return {k_: int(v_) if v_.lstrip("-").isdigit() else v_ for k_, v_ in over.items()}

    cfg = dataclasses.replace(EntmaxTritonConfig(stats_impl=FLAGS.stats_impl), **parse(FLAGS.config, ","))
    variants = [("", cfg)] + [(text, dataclasses.replace(cfg, **parse(text, "/"))) for text in FLAGS.sweep]
    h, hkv = (int(x) for x in FLAGS.heads.split(":"))
    info = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                date=time.strftime("%Y-%m-%d %H:%M:%S"), config=dataclasses.asdict(cfg),
                flags={n: FLAGS[n].value for n in ("alpha", "inputs", "run", "topics", "gain", "noise",
                                                   "iters", "heads", "head_dim")})
    print("config:", cfg, flush=True)
    from script_io import MetricsLog  # noqa: PLC0415 (experiments/ is on the path when run as a script)
    stem = os.path.splitext(FLAGS.out)[0]
    tb_dir = os.path.join(os.path.dirname(os.path.abspath(stem)), "tb", os.path.basename(stem))
    rows = []
    with MetricsLog(stem + ".jsonl", tb_dir) as log:
        for kind, t, (label, var) in ((kind, int(t), v) for kind in FLAGS.inputs
                                      for t in FLAGS.seq_lens for v in variants):
                base = [r for r in rows if r["inputs"] == kind and r["t"] == t and not r["config"]]
                flash = {k_: v_ for k_, v_ in base[0].items() if k_.startswith("flash_")} if base else None
                try:
                    rows.append(bench(kind, t, h, hkv, FLAGS.head_dim, FLAGS.alpha, var, FLAGS.iters,
                                      FLAGS.backward, label, peers=not label, flash=flash))
                except Exception as e:  # noqa: BLE001 - report and go on with the other shapes
                    print(f"inputs={kind} T={t} {label} failed: {type(e).__name__}: {str(e)[:800]}",
                          flush=True)
                    continue
                log.write(rows[-1], step=t, tag=f"entmax/{kind}" + (f"/{label}" if label else ""),
                          keys=[k_ for k_, v_ in rows[-1].items()
                                if isinstance(v_, float) and k_ != "alpha"])
    with open(FLAGS.out, "w") as fh:
        json.dump(dict(info=info, rows=rows), fh, indent=1)
    print(f"\n{info}")
    nan = float("nan")
    print("stages alone (ms): " + "; ".join(
        f"{r['inputs']} {r['t']} {r['config'] or 'base'}: lists {r.get('lists_ms', nan):.3f} tau "
        f"{r.get('tau_ms', nan):.3f} out {r.get('out_ms', nan):.3f}" for r in rows))
    print(f"{'inputs':>7} {'T':>6} {'config':>12} | {'zeros':>6} {'live':>5} {'live0':>5} | {'fwd ms':>8} {'flash':>8} "
          f"{'x':>5} | {'st tri':>7} {'st mgpu':>7} {'+tau':>7} | {'f+b ms':>8} {'flash':>8} {'x':>5} | {'ada fwd':>8} "
          f"{'ada f+b':>8} | {'err':>7}")
    for r in rows:
        print(f"{r['inputs']:>7} {r['t']:>6} {r['config'][:12]:>12} | {r['zero_frac']:6.3f} {r['live_tiles']:5.2f} "
              f"{r['live_tiles_lower_bound']:5.2f} | {r['ours_fwd_ms']:8.3f} {r['flash_fwd_ms']:8.3f} "
              f"{r['fwd_speedup_vs_flash']:5.2f} | {r.get('stats_ms_triton', nan):7.3f} "
              f"{r.get('stats_ms_mosaic_gpu', nan):7.3f} {r.get('stats_tau_ms', nan):7.3f} | "
              f"{r.get('ours_fwdbwd_ms', nan):8.3f} "
              f"{r.get('flash_fwdbwd_ms', nan):8.3f} {r.get('fwdbwd_speedup_vs_flash', nan):5.2f} | "
              f"{r.get('adasplash_fwd_ms', nan):8.3f} {r.get('adasplash_fwdbwd_ms', nan):8.3f} | "
              f"{r['err_ref']:7.1e}")


if __name__ == "__main__":
    from script_io import run  # noqa: PLC0415
    run(main)
