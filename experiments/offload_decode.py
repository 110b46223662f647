"""Decode over a context larger than the device's memory share: InfLLM's host-offloaded KV
(`sparse_jax.cache.offload.OffloadKVCache`) beside the same cache kept on the device and a
dense full cache, one process.

Variants (`--variants`):
* `offload`: sinks + ring + representative keys on the device, the memory blocks in
  "pinned_host" memory; each step copies `top_blocks` blocks per row host -> device and
  writes the finalised block(s) back.
* `device`: the same cache and algorithm with the block store in device memory (no copies).
* `dense`: a `FullKVCache` of the whole context, every key read each step.

A variant whose device bytes exceed `--device_share_gib` is skipped (reason in the JSON),
unless `--force`; run the process with a small `XLA_PYTHON_CLIENT_MEM_FRACTION` to make the
share real. The context (random normal keys/values, `--dtype`) is written straight into host
memory for `offload` (numpy -> pinned_host), never whole on the device. Representative keys
come from `ops.infllm.representative_keys` with random scores: this script measures time and
bytes, not retrieval quality.

Reported per variant: median step time (`block_until_ready` around each of `--steps` jitted
decode calls, after `--warmup`; the cache is donated), device bytes, host bytes, bytes moved
host -> device and device -> host per step (`OffloadKVCache.transfer_bytes()`), the
effective host -> device bandwidth (bytes moved / step time: a lower bound of the link's),
the bandwidth implied by the step-time difference to `device`, and a bulk copy of the same
bytes (one `device_put` of a pinned_host array) as the link reference. Correctness first:
the first step's output of `offload` must equal `device`'s (same algorithm, same data).

GPU, two runs. (1) All three variants side by side (share large enough; 512K tokens, B=1,
32/8 heads, D=128, bf16: 2 GiB of KV):
  PYTHONPATH=. JAX_PLATFORMS=cuda,cpu XLA_PYTHON_CLIENT_PREALLOCATE=false \\
    python experiments/offload_decode.py --context=524288 --device_share_gib=64 --out=/tmp/offload_all.json
(2) A context larger than the device memory given to the process (1M tokens = 4 GiB of KV
against 3 GiB of a 80 GiB card; dense and device are skipped, offload runs):
  PYTHONPATH=. JAX_PLATFORMS=cuda,cpu XLA_PYTHON_CLIENT_MEM_FRACTION=0.04 \\
    python experiments/offload_decode.py --context=1048576 --device_share_gib=3 --out=/tmp/offload_1m.json
Tiny CPU form (seconds):
  python experiments/offload_decode.py --context=2048 --heads=4 --kv_heads=2 --head_dim=32 \\
    --window=256 --block=32 --sinks=16 --top_blocks=4 --steps=3 --out=/tmp/offload.json
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from pallas_kernels.decode.api import decode_attention
from sparse_jax.cache.base import Queries, nbytes_of
from sparse_jax.cache.kv import FullKVCache
from sparse_jax.cache.offload import OffloadKVCache, host_memory_kind
from sparse_jax.ops.infllm import representative_keys

FLAGS = flags.FLAGS
flags.DEFINE_list("variants", ["offload", "device", "dense"], "among offload, device, dense")
flags.DEFINE_integer("context", 262144, "tokens already in the cache when decoding starts")
flags.DEFINE_integer("batch", 1, "batch rows")
flags.DEFINE_integer("heads", 32, "query heads")
flags.DEFINE_integer("kv_heads", 8, "kv heads")
flags.DEFINE_integer("head_dim", 128, "head dim")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "cache dtype")
flags.DEFINE_integer("window", 4096, "InfLLM local window")
flags.DEFINE_integer("block", 128, "InfLLM memory block size")
flags.DEFINE_integer("sinks", 128, "InfLLM initial tokens")
flags.DEFINE_integer("repr", 4, "representative keys per block")
flags.DEFINE_integer("top_blocks", 16, "blocks retrieved per step")
flags.DEFINE_integer("steps", 20, "timed decode steps (median)")
flags.DEFINE_integer("warmup", 2, "untimed decode steps first")
flags.DEFINE_float("device_share_gib", 4.0, "device memory share for the cache; larger variants are skipped")
flags.DEFINE_bool("force", False, "run variants that exceed the share anyway")
flags.DEFINE_string("out", "offload_decode.json", "where to write the JSON results")

GIB = 2 ** 30


def synthetic_context(rng, b, n, hkv, d, dtype, pool=65536):
    """Keys and values `[B, n, Hkv, D]` as numpy (host) arrays: `pool` random normal tokens
    repeated (timing and bytes do not depend on the values; generating 1M distinct tokens
    would take most of a GPU call's time limit)."""
    def mk():
        x = rng.standard_normal((b, min(n, pool), hkv, d), dtype=np.float32).astype(dtype)
        return np.tile(x, (1, -(-n // x.shape[1]), 1, 1))[:, :n]
    return mk(), mk()


def offload_cache(k, v, *, max_len, heads, memory_kind, rng):
    """An `OffloadKVCache` holding positions `0 .. n-1` of `k, v` (numpy `[B, n, Hkv, D]`):
    sinks, ring and memory blocks filled directly (the blocks into `memory_kind` memory from
    numpy), representative keys from random scores, a block chunk at a time on the device."""
    b, n, hkv, d = k.shape
    dt = jnp.dtype(k.dtype)
    empty = jax.eval_shape(lambda: OffloadKVCache.init(
        b, max_len, hkv, d, num_heads=heads, window=FLAGS.window, block_size=FLAGS.block, num_sinks=FLAGS.sinks,
        num_repr=FLAGS.repr, top_blocks=FLAGS.top_blocks, dtype=dt, memory_kind="device"))
    s0, bs, nb, r = FLAGS.sinks, FLAGS.block, empty.rep_k.shape[1], empty.ring_pos.shape[1]
    store = lambda x: np.zeros((b, nb + 1, bs, hkv, d), x.dtype)
    hk, hv = store(k), store(v)
    nfill = (n - s0) // bs                                  # whole blocks of the context
    hk[:, :nfill] = k[:, s0:s0 + nfill * bs].reshape(b, nfill, bs, hkv, d)
    hv[:, :nfill] = v[:, s0:s0 + nfill * bs].reshape(b, nfill, bs, hkv, d)
    rep = np.zeros((b, nb, heads, d), k.dtype)
    chunk = max(1, 2 ** 26 // (bs * hkv * d * 4))          # ~64 MiB of keys per pass
    for j in range(0, nfill, chunk):
        kb = jnp.asarray(hk[:, j:min(j + chunk, nfill)])
        sc = jnp.asarray(rng.standard_normal(kb.shape[:3] + (heads,), dtype=np.float32))
        rep[:, j:j + kb.shape[1]] = np.asarray(representative_keys(kb, sc, jnp.ones(kb.shape[:3], bool),
                                                             num_repr=FLAGS.repr, num_heads=heads))
    put = (lambda x: jnp.asarray(x)) if memory_kind == "device" else (lambda x: jax.device_put(
        x, jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind=memory_kind)))
    ring_p = np.arange(max(s0, n - r), n)
    slots = (ring_p - s0) % r
    ring = lambda x: np.zeros((b, r) + x.shape[2:], x.dtype)
    rk, rv = ring(k), ring(v)
    rk[:, slots], rv[:, slots] = k[:, ring_p], v[:, ring_p]
    rpos = np.full((b, r), -1, np.int32)
    rpos[:, slots] = ring_p
    return OffloadKVCache(
        sink_k=jnp.asarray(k[:, :s0]), sink_v=jnp.asarray(v[:, :s0]),
        sink_pos=jnp.broadcast_to(jnp.arange(s0, dtype=jnp.int32), (b, s0)),
        ring_k=jnp.asarray(rk), ring_v=jnp.asarray(rv), ring_pos=jnp.asarray(rpos),
        ring_score=jnp.zeros((b, r, heads), jnp.float32), rep_k=jnp.asarray(rep),
        newest=jnp.full((b,), n - 1, jnp.int32), host_k=put(hk), host_v=put(hv),
        window=FLAGS.window, block_size=bs, num_repr=FLAGS.repr, top_blocks=FLAGS.top_blocks,
        memory_kind=memory_kind)


def dense_cache(k, v, *, max_len):
    b, n = k.shape[:2]
    pad = lambda x: np.concatenate([x, np.zeros((b, max_len - n) + x.shape[2:], x.dtype)], 1)
    pos = np.full((b, max_len), -1, np.int32)
    pos[:, :n] = np.arange(n)
    return FullKVCache(jnp.asarray(pad(k)), jnp.asarray(pad(v)), jnp.asarray(pos))


@jax.jit
def _attend(q, keys, values, kv_positions, positions):
    return decode_attention(q, keys, values, kv_positions=kv_positions, q_positions=positions)


def step_fn(cache):
    """The jitted decode step; the cache is donated and its outputs keep the inputs'
    placement (`out_shardings`: the block store stays in host memory)."""
    def step(cache, q, k, v, positions):
        keys, values, kv_pos, *_, cache = cache.update(k, v, positions, queries=Queries(q))
        return _attend(q, keys, values, kv_pos, positions), cache
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="device")
    return jax.jit(step, donate_argnums=0, out_shardings=(dev, jax.tree.map(lambda x: x.sharding, cache)))


def device_bytes(cache):
    offloaded = isinstance(cache, OffloadKVCache) and cache.memory_kind != "device"
    return cache.nbytes("device") if offloaded else cache.nbytes()


def run_variant(name, cache, tokens, n):
    """Median step time of decode steps at positions n, n+1, ... -> (record, first output)."""
    step = step_fn(cache)
    times, first = [], None
    for i, (q, k, v) in enumerate(tokens):
        pos = jnp.full((q.shape[0], 1), n + i, jnp.int32)
        t0 = time.perf_counter()
        out, cache = step(cache, q, k, v, pos)
        jax.block_until_ready(out)
        if i >= FLAGS.warmup:
            times.append(time.perf_counter() - t0)
        if first is None:
            first = np.asarray(out, np.float32)
    rec = dict(variant=name, step_ms=1e3 * statistics.median(times), device_bytes=device_bytes(cache))
    if isinstance(cache, OffloadKVCache):
        moved = cache.transfer_bytes()
        offloaded = cache.memory_kind != "device"
        rec |= dict(host_bytes=cache.nbytes("host") if offloaded else 0, memory_kind=cache.memory_kind,
                    store_memory_kind_after=cache.host_k.sharding.memory_kind,
                    h2d_bytes_per_step=moved["host_to_device"], d2h_bytes_per_step=moved["device_to_host"],
                    h2d_GBps_effective=moved["host_to_device"] / (rec["step_ms"] / 1e3) / 1e9)
    else:
        rec |= dict(host_bytes=0, h2d_bytes_per_step=0, d2h_bytes_per_step=0)
    return rec, first


def bulk_copy_GBps(nbytes):
    """host -> device bandwidth of one `device_put` of a pinned_host array of `nbytes`."""
    kind = host_memory_kind()
    if kind == "device" or nbytes == 0:
        return None
    x = jax.device_put(np.ones(nbytes // 2, np.uint16), jax.sharding.SingleDeviceSharding(jax.devices()[0],
                                                                                            memory_kind=kind))
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="device")
    times = []
    for i in range(FLAGS.steps + FLAGS.warmup):
        t0 = time.perf_counter()
        jax.block_until_ready(jax.device_put(x, dev))
        if i >= FLAGS.warmup:
            times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def main(argv):
    del argv
    bad = set(FLAGS.variants) - {"offload", "device", "dense"}
    if bad or not FLAGS.variants:
        raise app.UsageError(f"--variants: choose among offload, device, dense; got {FLAGS.variants}")
    if FLAGS.context <= FLAGS.sinks + FLAGS.window:
        raise app.UsageError(f"--context ({FLAGS.context}) must exceed --sinks + --window "
                             f"({FLAGS.sinks + FLAGS.window}) so that memory blocks exist")
    b, n, h, hkv, d = FLAGS.batch, FLAGS.context, FLAGS.heads, FLAGS.kv_heads, FLAGS.head_dim
    if h % hkv:
        raise app.UsageError(f"--heads ({h}) must be a multiple of --kv_heads ({hkv})")
    dtype = jnp.dtype(FLAGS.dtype)
    steps = FLAGS.warmup + FLAGS.steps
    max_len = n + steps
    rng = np.random.default_rng(0)
    k, v = synthetic_context(rng, b, n, hkv, d, dtype)
    tk = jax.random.split(jax.random.key(1), 3)
    tokens = [tuple(jax.random.normal(jax.random.fold_in(key, i), (b, 1, x, d), dtype)
                    for key, x in zip(tk, (h, hkv, hkv))) for i in range(steps)]
    share = FLAGS.device_share_gib * GIB
    results, outputs = [], {}
    for name in FLAGS.variants:
        if name == "dense":
            need = nbytes_of(jax.ShapeDtypeStruct((b, max_len, hkv, d), dtype)) * 2 + 4 * b * max_len
        else:
            kind = host_memory_kind() if name == "offload" else "device"
            probe = jax.eval_shape(lambda: OffloadKVCache.init(
                b, max_len, hkv, d, num_heads=h, window=FLAGS.window, block_size=FLAGS.block, num_sinks=FLAGS.sinks,
                num_repr=FLAGS.repr, top_blocks=FLAGS.top_blocks, dtype=dtype, memory_kind="device"))
            need = probe.nbytes("device") + (probe.nbytes("host") if kind == "device" else 0)
        if need > share and not FLAGS.force:
            results.append(dict(variant=name, skipped=f"needs {need / GIB:.2f} GiB of device memory > share "
                                                      f"{FLAGS.device_share_gib} GiB"))
            print(results[-1])
            continue
        if name == "dense":
            cache = dense_cache(k, v, max_len=max_len)
        else:
            cache = offload_cache(k, v, max_len=max_len, heads=h, rng=np.random.default_rng(2),
                                  memory_kind=host_memory_kind() if name == "offload" else "device")
        rec, outputs[name] = run_variant(name, cache, tokens, n)
        del cache
        results.append(rec)
        print(rec)
    byname = {r["variant"]: r for r in results if "skipped" not in r}
    summary = dict(context=n, batch=b, heads=h, kv_heads=hkv, head_dim=d, dtype=FLAGS.dtype, window=FLAGS.window,
                   block=FLAGS.block, sinks=FLAGS.sinks, top_blocks=FLAGS.top_blocks, steps=FLAGS.steps,
                   device=str(jax.devices()[0].device_kind), platform=jax.devices()[0].platform,
                   jax=jax.__version__, host_memory_kind=host_memory_kind(),
                   device_share_gib=FLAGS.device_share_gib)
    if "offload" in outputs and "device" in outputs:
        summary["offload_vs_device_max_abs_diff"] = float(np.abs(outputs["offload"] - outputs["device"]).max())
        if summary["offload_vs_device_max_abs_diff"] > 1e-2:
            raise SystemExit(f"offload and device outputs differ: {summary['offload_vs_device_max_abs_diff']}")
        extra = byname["offload"]["step_ms"] - byname["device"]["step_ms"]
        summary["transfer_overhead_ms"] = extra
        if extra > 0:
            summary["h2d_GBps_from_overhead"] = byname["offload"]["h2d_bytes_per_step"] / (extra / 1e3) / 1e9
    if "offload" in byname:
        summary["bulk_copy_h2d_GBps"] = bulk_copy_GBps(byname["offload"]["h2d_bytes_per_step"])
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    if stats:
        summary["device_peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
    with open(FLAGS.out, "w") as f:
        json.dump(dict(summary=summary, results=results), f, indent=1)
    print(f"\n{'variant':8} {'step ms':>9} {'device MiB':>11} {'host MiB':>9} {'h2d KiB/step':>13} {'h2d GB/s':>9}")
    for r in results:
        if "skipped" in r:
            print(f"{r['variant']:8} skipped: {r['skipped']}")
        else:
            print(f"{r['variant']:8} {r['step_ms']:9.3f} {r['device_bytes'] / 2**20:11.1f} {r['host_bytes'] / 2**20:9.1f} "
                  f"{r['h2d_bytes_per_step'] / 1024:13.1f} {r.get('h2d_GBps_effective', 0.0):9.2f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    from script_io import run  # noqa: PLC0415 (experiments/script_io.py: --help exits 0)
    run(main)
