"""Benchmark the `decode` kernel (Triton) against the measured copy bandwidth, one process.

Shapes (BENCHMARKING.md "decode"): bf16, H=32 / Hkv=8, D=128, one new token, batch in
{1, 16}, context in {32K, 128K}, as (a) a full contiguous cache, (b) a paged cache (pages
of `--page`, pool pages in random order) and (c) selected blocks (`--selected` tokens per
kv head in blocks of `--block`, random distinct blocks), beside a plain XLA decode (one
einsum, softmax, one einsum) on the same cache.

Method (METHOD.md): the copy ceiling is `x + 1` over a ~2 GiB bf16 array (bytes read plus
written). Decode bytes are the cache bytes read (K and V of the visited tokens; q, out and
the split partials are under 2% and not counted). Correctness first: max relative error
against `decode_reference` on two batch rows. Each figure is the median of `--iters`
timed calls of one jitted program that runs `--reps` decode calls on distinct queries
(so per-call launch and host overhead, a few microseconds, is amortised as in a serving
loop), divided by `--reps`; the per-call wall time with `block_until_ready` around each
call is reported beside it (JSON). Caveat: the plain-XLA figure in the amortised mode is
not a bandwidth (on an H200 it came out above the HBM peak: XLA shares work on the
common cache between the calls despite the barrier); compare with its per-call wall time
(`xla_wall_us` in the JSON). `--sweep` tries a few tiles / split counts per shape (within
`--budget_s`) and reports the best beside the default.

Run on a GPU machine:
  PYTHONPATH=. python experiments/bench_decode.py --out /tmp/bench_decode.json
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from pallas_kernels.decode.api import DecodeTritonConfig, decode_attention, layout

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "bench_decode.json", "where to write the JSON results")
flags.DEFINE_list("batches", ["1", "16"], "batch sizes")
flags.DEFINE_list("contexts", ["32768", "131072"], "cache lengths")
flags.DEFINE_list("forms", ["contiguous", "paged", "selected"], "cache forms")
flags.DEFINE_integer("heads", 32, "query heads")
flags.DEFINE_integer("kv_heads", 8, "kv heads")
flags.DEFINE_integer("head_dim", 128, "head dim")
flags.DEFINE_integer("page", 64, "page size of the paged form")
flags.DEFINE_integer("block", 64, "block size of the selected form")
flags.DEFINE_integer("selected", 2048, "tokens selected per kv head (selected form)")
flags.DEFINE_integer("iters", 10, "timed calls per figure (median)")
flags.DEFINE_integer("reps", 10, "decode calls per timed program")
flags.DEFINE_bool("sweep", True, "try a few configurations per shape")
flags.DEFINE_float("budget_s", 150.0, "stop sweeping once the run has taken this long")

SWEEP = [dict(block_k=128, num_stages=3), dict(block_k=64, num_stages=4)]


def median_time(fn, *args, iters):
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(iters):
    x = jax.random.normal(jax.random.key(1), (1024, 1024, 1024), jnp.bfloat16)   # 2 GiB
    t = median_time(jax.jit(lambda x: x + 1), x, iters=iters)
    read = median_time(jax.jit(lambda x: jnp.max(x, axis=(1, 2))), x, iters=iters)
    n = x.size * 2
    del x
    return 2 * n / t, n / read


def make(form, b, t, seed=0):
    h, hkv, d = FLAGS.heads, FLAGS.kv_heads, FLAGS.head_dim
    ks = jax.random.split(jax.random.key(seed), 4)
    reps = FLAGS.reps
    qs = jax.random.normal(ks[0], (reps, b, 1, h, d), jnp.bfloat16)
    kw = dict(lengths=jnp.full((b,), t, jnp.int32), kv_positions=None,
              q_positions=jnp.full((b, 1), t - 1, jnp.int32), page_table=None, block_indices=None,
              block_counts=None, block_size=None, sink_logits=None, softcap=None,
              scale=d ** -0.5, mask_fn=None, return_lse=False)
    rng = np.random.default_rng(seed)
    if form == "paged":
        pages = b * t // FLAGS.page
        k = jax.random.normal(ks[1], (pages, FLAGS.page, hkv, d), jnp.bfloat16)
        v = jax.random.normal(ks[2], (pages, FLAGS.page, hkv, d), jnp.bfloat16)
        kw["page_table"] = jnp.asarray(rng.permutation(pages).reshape(b, t // FLAGS.page), jnp.int32)
        tokens = b * t
    else:
        k = jax.random.normal(ks[1], (b, t, hkv, d), jnp.bfloat16)
        v = jax.random.normal(ks[2], (b, t, hkv, d), jnp.bfloat16)
        tokens = b * t
        if form == "selected":
            nsel, nblk = FLAGS.selected // FLAGS.block, t // FLAGS.block
            pick = lambda: np.sort(np.stack([rng.permutation(nblk)[:nsel] for _ in range(b * hkv)]  # noqa: E731
                                            ).reshape(b, hkv, nsel), -1)
            kw["_sels"] = jnp.asarray(np.stack([pick() for _ in range(reps)]), jnp.int32)
            kw.update(block_indices=kw["_sels"][0],
                      block_counts=jnp.full((b, hkv), nsel, jnp.int32), block_size=FLAGS.block)
            tokens = b * FLAGS.selected
    nbytes = 2 * tokens * hkv * d * 2
    return qs, k, v, kw, nbytes


def ours(kw, cfg, num_splits):
    kw = {n: x for n, x in kw.items() if not n.startswith("_")}

    def f(q, k, v, **over):
        return decode_attention(q, k, v, **{**kw, **over}, num_splits=num_splits, impl="triton",
                                config=cfg)
    return f


def plain_xla(kw):
    """One einsum, softmax, one einsum (the dense form only): XLA's own decode."""
    def f(q, k, v, **_):
        b, _, h, d = q.shape
        hkv = k.shape[2]
        qg = q.reshape(b, hkv, h // hkv, d)
        s = jnp.einsum("bhgd,bkhd->bhgk", qg, k, preferred_element_type=jnp.float32) * kw["scale"]
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        return jnp.einsum("bhgk,bkhd->bhgd", p, v).reshape(b, 1, h, d)
    return f


def repeated(f, kw):
    """`reps` decode calls in one program, each query tied to the previous output through an
    optimization barrier (so XLA cannot merge the calls' dots into one pass over the cache),
    each selected-form call with its own block lists (so the blocks do not stay in L2)."""
    def run(qs, k, v, sels):
        outs, prev = [], None
        for i in range(qs.shape[0]):
            q = qs[i] if prev is None else jax.lax.optimization_barrier((qs[i], prev))[0]
            prev = f(q, k, v) if sels is None else f(q, k, v, sels[i])
            outs.append(prev)
        return jnp.stack(outs)
    return jax.jit(run)


def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def check(f, qs, k, v, kw, form, rows=2):
    """Max relative error against the reference on the first `rows` batch rows."""
    out = jax.jit(f)(qs[0], k, v)
    cut = ("lengths", "q_positions", "page_table", "block_indices", "block_counts")
    sub = {n: (x[:rows] if n in cut and x is not None else x) for n, x in kw.items()}
    kc, vc = (k, v) if form == "paged" else (k[:rows], v[:rows])
    ref = decode_attention(qs[0][:rows], kc, vc, **sub, num_splits=None, impl="xla")
    return rel(out[:rows], ref)


def timed(f, qs, k, v, kw):
    per_call = median_time(jax.jit(f), qs[0], k, v, iters=FLAGS.iters)
    sels = kw.get("_sels")
    if sels is not None:
        g = lambda q, k, v, idx: f(q, k, v, block_indices=idx)  # noqa: E731
    else:
        g = f
    amortised = median_time(repeated(g, kw), qs, k, v, sels, iters=FLAGS.iters) / qs.shape[0]
    return amortised, per_call


def bench(form, b, t, copy_bw, t_start, dense_ms):
    qs, k, v, kw, nbytes = make(form, b, t)
    base = DecodeTritonConfig()
    f_form = layout.form_of(k, page_table=kw["page_table"], block_indices=kw["block_indices"],
                     block_size=kw["block_size"], kv_positions=None, block_k=base.block_k)
    auto = layout.default_num_splits(b, FLAGS.kv_heads, f_form)
    row = dict(form=form, batch=b, context=t, bytes=nbytes, default_splits=auto,
               err_ref=check(ours(kw, base, None), qs, k, v,
                             {n: x for n, x in kw.items() if not n.startswith("_")}, form))
    sec, wall = timed(ours(kw, base, None), qs, k, v, kw)
    row.update(default_us=sec * 1e6, default_wall_us=wall * 1e6)
    best = (sec, dataclasses.asdict(base), auto)
    tries = []
    if FLAGS.sweep:
        splits = sorted({max(1, auto // 2), auto, auto * 2})
        for over in [{}] + SWEEP:
            for ns in splits:
                if time.perf_counter() - t_start > FLAGS.budget_s or (not over and ns == auto):
                    continue
                if form != "contiguous" and "block_k" in over and over != SWEEP[0]:
                    continue                          # block_k only shapes the contiguous form
                cfg = dataclasses.replace(base, **over)
                try:
                    s_ = timed(ours(kw, cfg, ns), qs, k, v, kw)[0]
                except Exception as e:  # noqa: BLE001 - a config that does not compile
                    tries.append(dict(config=over, splits=ns, error=str(e)[:200]))
                    continue
                tries.append(dict(config=over, splits=ns, us=s_ * 1e6))
                if s_ < best[0]:
                    best = (s_, dataclasses.asdict(cfg), ns)
    row.update(best_us=best[0] * 1e6, best_config=best[1], best_splits=best[2], sweep=tries)
    row["best_tbps"] = nbytes / best[0] / 1e12
    row["frac_copy"] = row["best_tbps"] * 1e12 / copy_bw
    row["default_frac_copy"] = nbytes / sec / copy_bw
    if form == "contiguous":
        try:
            row["xla_us"], xla_wall = timed(plain_xla(kw), qs, k, v, kw)
            row["xla_us"], row["xla_wall_us"] = row["xla_us"] * 1e6, xla_wall * 1e6
            row["xla_frac_copy"] = nbytes / (row["xla_us"] * 1e-6) / copy_bw
        except Exception as e:  # noqa: BLE001
            row["xla_error"] = str(e)[:200]
    if form == "selected" and (b, t) in dense_ms:
        row["speedup_vs_dense"] = dense_ms[(b, t)] / row["best_us"]
    print(json.dumps(row), flush=True)
    del qs, k, v
    return row


def main(_):
    t_start = time.perf_counter()
    copy_bw, read_bw = copy_bandwidth(FLAGS.iters)
    print(json.dumps(dict(device=str(jax.devices()[0]), jax=jax.__version__,
                          copy_tbps=copy_bw / 1e12, read_tbps=read_bw / 1e12)), flush=True)
    rows, dense = [], {}
    for form in FLAGS.forms:
        for b in map(int, FLAGS.batches):
            for t in map(int, FLAGS.contexts):
                try:
                    r = bench(form, b, t, copy_bw, t_start, dense)
                except Exception as e:  # noqa: BLE001 - keep the other shapes
                    r = dict(form=form, batch=b, context=t, error=str(e)[:500])
                    print(json.dumps(r), flush=True)
                rows.append(r)
                if form == "contiguous" and "best_us" in r:
                    dense[(b, t)] = r["best_us"]
    res = dict(device=str(jax.devices()[0]), jax=jax.__version__, copy_tbps=copy_bw / 1e12,
               read_tbps=read_bw / 1e12, rows=rows)
    with open(FLAGS.out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(f"\ncopy bandwidth (x+1, 2 GiB, read+write): {copy_bw / 1e12:.2f} TB/s; "
          f"read-only (max-reduce): {read_bw / 1e12:.2f} TB/s; {res['device']}, jax {jax.__version__}")
    print("| form | B | context | bytes read | default us (splits) | best us | TB/s | of copy | "
          "config (block_k, stages, splits) | XLA us (of copy) | vs dense | err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['form']} | {r['batch']} | {r['context']} | error: {r['error'][:120]} |")
            continue
        c = r["best_config"]
        xla = f"{r['xla_us']:.1f} ({r['xla_frac_copy']:.0%})" if "xla_us" in r else "-"
        vs = f"{r['speedup_vs_dense']:.1f}x" if "speedup_vs_dense" in r else "-"
        print(f"| {r['form']} | {r['batch']} | {r['context'] // 1024}K | {r['bytes'] / 2**20:.0f} MiB | "
              f"{r['default_us']:.1f} ({r['default_splits']}) | {r['best_us']:.1f} | "
              f"{r['best_tbps']:.2f} | {r['frac_copy']:.0%} | {c['block_k']}, {c['num_stages']}, "
              f"{r['best_splits']} | {xla} | {vs} | {r['err_ref']:.1e} |")


if __name__ == "__main__":
    from script_io import run  # noqa: PLC0415 (experiments/script_io.py: --help exits 0)
    run(main)
