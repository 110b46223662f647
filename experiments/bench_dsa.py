"""Benchmark DSA (DeepSeek-V3.2 sparse attention) on GPU, bf16, B=1, one process (issue 5).

(a) `indexer`: the fused lightning-indexer score kernel + chunked `lax.top_k`
    (`pallas_kernels.indexer`, Triton), H_I x D_I = `--index_heads` x `--index_dim`
    (BENCHMARKING.md: 4 x 64; the paper's is 64 x 128), top-k `--top_k`, causal S = T. TFLOP/s on
    its own FLOPs, `2 * (T^2 / 2) * H_I * D_I`, against a plain bf16 matmul (8192^3) measured
    in the same run; the score kernel alone (top-k replaced by a row max) is reported beside it.
    Correctness: the last `--check_rows` queries' selections against the float32 reference
    scores (tie-aware: the reference scores of the picked slots vs the reference's sorted top-k).
    `--fp8`: also the FP8 indexer (`score_dtype="float8_e4m3fn"`, quantisation included) with
    the e4m3 dot (`fp8`) and widened to bf16 in the kernel (`fp8_widened`), end to end and
    scores only, and its set overlap with the float32 top-k on the checked rows.
    `--fused`: also the fused top-k (`FusedIndexerConfig`, `pallas_kernels/indexer/fused.py`:
    sampled threshold, candidates kept by a kernel that recomputes the scores, radix select
    over them; no float32 score rows), end to end (its sel_err and the share of checked rows
    whose set equals the radix path's), and its steps timed apart on the last query chunk
    (sample scores, threshold = sample scores + select, candidate kernel, final select) with the
    share of that chunk's rows whose candidates passed (else the chunk falls back to the exact
    full path). `--fused_query_chunk` (default T: one chunk) sets its chunk.
(b) DSA attention forward = indexer + top-k + `token_sparse` attention (MLA in MQA form: H=64
    query heads over one latent head, D = 576 = 512 + 64 rope, Dv = 512, k = 2048) against
    dense causal attention. cuDNN cannot take D=576 / Dv=512 (D <= 256), so two stand-ins:
    `cudnn_mla192`: DeepSeek-V3's dense MLA in its training form, H = Hkv = 64, D = Dv = 192
    (the attention DSA replaces; V padded from 128, as in bench_token_sparse.py), and
    `cudnn_sameflops`: MHA with exactly the absorbed form's FLOPs per (query, key) pair,
    H=136, D = Dv = 256 (2 * 136 * 512 = 2 * 64 * (576 + 512)), the fairest kernel-to-kernel
    stand-in; plus our flash Triton dense MQA at 576/512 when it compiles (`flash_mqa576`).
(c) Sparse-MLA decode, batch `--decode_batch`, context `--decode_context` (bf16, H=64, latent
    Dc=512 + Dr=64 rope, one new token): `mla_decode` (Triton) over `--top_k` random distinct
    slots per query, fresh per call, reading the cache as stored (`c_kv`, `k_rope`), against
    dense MLA decode over the whole cache: `mla_decode`'s dense mode and `decode_attention`
    over the concatenated latent (K 576 + V 512 per token: the path before `mla_decode`);
    plus the old sparse path (`token_sparse`, separate K / V). All amortised over `--reps`
    calls per program (bench_decode.py's `repeated`). Configurations: the automatic split
    count, 1/2/4/8 splits, block_k 16 / 64 (best reported, all in the JSON) and float32
    partials (`--nodecode_sweep`: the automatic configuration only). `--mla_impls
    triton,mosaic_gpu` also times the Mosaic GPU kernel (Hopper; sparse with the rows gathered
    first by XLA, the default; the default and the others of 128 / 256 / 512 tokens per split
    at least, best reported; `--nodecode_sweep`: the default only), sparse and dense, beside
    Triton's best, and its sparse rows gathered in the kernel (`gather_in_kernel=True`,
    default split). Bandwidth on the
    bytes it must read: 576 bf16 per visited token plus q read and out written, against the
    measured copy (bench_decode.py's `copy_bandwidth`, `x + 1` over 2 GiB, read + write).
(d) `attention` (not in the default `--parts`): DSA's main attention alone at T (S = T, k =
    `--top_k` from the indexer on random inputs, as (b)), `mla_sparse_attention` per
    `--attention_impls` on the same selection and latent (values = the keys' first 512
    columns): `triton` (token_sparse over the concatenated latent, what DSA runs by default)
    and `mosaic_gpu` (mla_decode's Mosaic GPU kernel over every query token, Hopper; its
    backward is token_sparse's Triton one); forward and, with `--attention_grad`, forward +
    backward (gradients of q, c_kv, k_rope); error on the last `--check_rows` queries
    against the XLA reference. `--small` times Triton alone (H=16: the Mosaic GPU kernel
    needs 64 heads). One command for 16K and 64K:
      PYTHONPATH=. python experiments/bench_dsa.py --parts attention --seq_lens 16384,65536 \
        --attention_impls triton,mosaic_gpu --out /tmp/dsa_attention.json

Timers, the copy and `repeated` come from experiments/bench_decode.py (its --out / --iters /
--reps flags). On a GPU machine, repo root:
  PYTHONPATH=. python experiments/bench_dsa.py --out /tmp/bench_dsa.json
CPU smoke run (tiny shapes, kernels in interpret mode, no cuDNN):
  PYTHONPATH=. python experiments/bench_dsa.py --small --out /tmp/dsa_small.json
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
import numpy as np
from absl import flags

from experiments.bench_decode import copy_bandwidth, median_time, rel, repeated
from pallas_kernels.decode import decode_attention
from pallas_kernels.flash import blocks, flash_attention
from pallas_kernels.indexer.api import (FusedIndexerConfig, chunk_scores_reference, chunk_scores_triton,
                                        indexer_topk)
from pallas_kernels.indexer.fp8 import quantize_indexer
from pallas_kernels.indexer.fused import chunk_candidates, sample_threshold
from pallas_kernels.indexer.select import topk_select
from pallas_kernels.indexer.triton import IndexerTritonConfig
from pallas_kernels.mla_decode.api import (MlaDecodeMosaicGpuConfig, MlaDecodeTritonConfig, mla_decode,
                                           mla_sparse_attention, triton_launch_plan)
from pallas_kernels.token_sparse import token_sparse_attention
from pallas_kernels.token_sparse.api import TritonConfig, token_sparse_backward
from sparse_jax import patterns as P
from sparse_jax.ops import dsa as dops

FLAGS = flags.FLAGS      # --out --iters --reps: bench_decode's
flags.DEFINE_bool("small", False, "CPU smoke run: tiny shapes, interpret mode, no cuDNN")
flags.DEFINE_list("seq_lens", ["16384", "65536", "131072"], "T for (a) and (b)")
flags.DEFINE_list("parts", ["indexer", "decode", "forward"], "which of (a), (c), (b), (d) `attention`, in "
                  "this order (the longest last: rows are saved as they finish)")
flags.DEFINE_integer("index_heads", 4, "indexer heads H_I")
flags.DEFINE_integer("index_dim", 64, "indexer head dim D_I")
flags.DEFINE_integer("top_k", 2048, "selected tokens per query")
flags.DEFINE_integer("query_chunk", 2048, "indexer queries per chunk (chunk x S float32 scores)")
flags.DEFINE_integer("check_rows", 64, "query rows checked against the reference")
flags.DEFINE_bool("fp8", False, "(a) also time the FP8 indexer (e4m3 dot, widened to bf16, reranked)")
flags.DEFINE_list("fp8_variants", ["fp8", "fp8_widened", "fp8_rerank1.25"], "with --fp8: which variants")
flags.DEFINE_bool("forward_layer", True, "(b) also time the DSA layer's own calls (`ops.dsa.indexer_topk` with "
                  "positions and `DSAConfig()`'s defaults, then `ops.dsa.selected_attention` impl auto), forward and "
                  "forward + backward (gradients of q, c_kv, k_rope), beside cuDNN MLA-192's")
flags.DEFINE_bool("forward_fast", False, "(b) also time the forward on the fused top-k (one chunk) and "
                  "mla_sparse_attention impl='auto' (Mosaic GPU on Hopper): fast_ms, fast_speedup_vs_*")
flags.DEFINE_bool("fused", False, "(a) also time the fused top-k (FusedIndexerConfig) and its steps")
flags.DEFINE_list("fused_variants", ["fused"], "with --fused: which of FUSED_VARIANTS")
flags.DEFINE_integer("fused_query_chunk", 0, "with --fused: its query chunk (0: T, one chunk; it keeps "
                     "chunk x (S / sample_stride + 3 cap) x 4 bytes, no chunk x S scores)")
flags.DEFINE_bool("layer_positions", False, "(a) pass explicit positions, as the DSA layer does (under "
                  "lax.map, each chunk switches at run time to the smallest of up to 16 key width classes "
                  "holding its visible keys) instead of the default causal prefixes (up to 16 static key "
                  "widths); one kernel set compiled per width either way")
flags.DEFINE_bool("scores_only", True, "(a) also time the score kernel alone (one more compile per chunk)")
flags.DEFINE_integer("decode_batch", 16, "(c) batch")
flags.DEFINE_integer("decode_context", 131072, "(c) cache length")
flags.DEFINE_list("mla_impls", ["triton"], "(c) mla_decode backends: triton (always, the reference "
                  "row) plus e.g. mosaic_gpu (Hopper), timed sparse and dense beside it")
flags.DEFINE_bool("decode_sweep", True, "(c) sweep Triton's split counts and tiles and Mosaic GPU's split floors "
                  "(off: the defaults only)")
flags.DEFINE_list("attention_impls", ["triton", "mosaic_gpu"], "(d) mla_sparse_attention backends")
flags.DEFINE_bool("attention_grad", True, "(d) also time forward + backward")
flags.DEFINE_list("attention_bwd", [], "(d) also time the backward alone (`token_sparse_backward` on the "
                  "forward's out / lse) per variant ROWS:FOLD, e.g. 32:0,32:1,64:1: ROWS query heads per "
                  "program (TritonConfig.max_rows; 32 = the default at 64 heads, two programs per token), "
                  "FOLD 1 = value_is_key_prefix (dV added into dK's latent columns before one scatter); "
                  "optional :BLOCK_K[:WARPS[:STAGES]] set TritonConfig's block_k_bwd / num_warps_bwd / "
                  "num_stages_bwd (e.g. 64:1:16:8:1)")
FLAGS.set_default("out", "bench_dsa.json")

H, D, DV = 64, 576, 512          # MLA in MQA form: query heads, latent + rope, latent


def matmul_tflops(n, iters):
    a = jax.random.normal(jax.random.key(7), (n, n), jnp.bfloat16)
    sec = median_time(jax.jit(lambda x, y: x @ y), a, a, iters=iters)
    return 2 * n ** 3 / sec / 1e12


def indexer_inputs(t, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    qi = jax.random.normal(ks[0], (1, t, FLAGS.index_heads, FLAGS.index_dim), jnp.bfloat16)
    w = jax.random.normal(ks[1], (1, t, FLAGS.index_heads), jnp.bfloat16)
    ki = jax.random.normal(ks[2], (1, t, FLAGS.index_dim), jnp.bfloat16)
    return qi, w, ki


FP8_VARIANTS = {                # name -> (score kernel tiles, fp8_rerank)
    "fp8": (IndexerTritonConfig(), None),
    "fp8_widened": (IndexerTritonConfig(fp8_dot=False), None),
    "fp8_rerank1.25": (IndexerTritonConfig(), 1.25),
}


FUSED_VARIANTS = {             # name -> FusedIndexerConfig
    "fused": FusedIndexerConfig(),
    "fused_m16": FusedIndexerConfig(sample_stride=16),
    "fused_64x128w8": FusedIndexerConfig(block_k=128, num_warps=8),   # the default before 2026-12-07
    "fused_cap1.5": FusedIndexerConfig(oversample=1.25, capacity=1.5, sample_stride=4),
}


def indexer_fn(k, chunk, interpret, score_dtype="bfloat16", config=None, fp8_rerank=None):
    """The op as timed: default positions (each group of query chunks scores only its
    causal key prefix: at most 16 key widths compiled, `api.PREFIX_WIDTH_CLASSES`), or with
    `--layer_positions` explicit ones, as the DSA layer calls it (under `lax.map`, each chunk
    takes, by `lax.switch`, the smallest of at most 16 key width classes past its last
    visible slot: at T = S = 64K, chunk 512, the causal prefixes' widths, 4096 apart)."""
    def f(qi, w, ki):
        pos = {}
        if FLAGS.layer_positions:
            b, t, s = qi.shape[0], qi.shape[1], ki.shape[1]
            pos = dict(q_positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
                       kv_positions=jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)))
        return indexer_topk(qi, w, ki, k=k, query_chunk=chunk, impl="triton", interpret=interpret,
                            score_dtype=score_dtype, config=config, fp8_rerank=fp8_rerank, **pos)
    return f


def scores_only_fn(chunk, interpret, config=None):
    """The score kernel over the chunks' causal key prefixes (as `indexer_topk` runs it with
    default positions), each chunk reduced to its row max instead of the top-k; with
    `config` the FP8 kernel after `quantize_indexer` (timed with it)."""
    def f(qi, w, ki):
        t = qi.shape[1]
        ks = None
        if config is not None:
            qi, w, ki, ks = quantize_indexer(qi, w, ki)
        outs = []
        for lo in range(0, t, chunk):
            hi = min(t, lo + chunk)
            qpos, kpos = jnp.arange(lo, hi, dtype=jnp.int32)[None], jnp.arange(hi, dtype=jnp.int32)[None]
            outs.append(chunk_scores_triton(qi[:, lo:hi], w[:, lo:hi], ki[:, :hi], qpos, kpos,
                                            k_scale=None if ks is None else ks[:, :hi],
                                            interpret=interpret, config=config).max(-1))
        return jnp.concatenate(outs, 1)
    return f


def reference_rows(qi, w, ki, rows):
    """float32 reference scores `[rows, T]` of the last `rows` queries."""
    t = qi.shape[1]
    ref = chunk_scores_reference(qi[:, t - rows:], w[:, t - rows:], ki,
                                 jnp.arange(t - rows, t, dtype=jnp.int32)[None],
                                 jnp.arange(t, dtype=jnp.int32)[None])
    return np.asarray(ref)[0]


def set_overlap(idx, ref):
    """Mean share of the float32 top-k set (`ref [rows, S]`) in the selected slots of the
    last `rows` queries of `idx [1, T, k]`, over rows with at least k visible keys."""
    sel = np.asarray(idx)[0, -ref.shape[0]:]
    kk = sel.shape[-1]
    keep = np.isfinite(ref).sum(-1) >= kk
    want = np.argsort(-ref[keep], -1, kind="stable")[:, :kk]
    return float(np.mean([np.isin(a, b).mean() for a, b in zip(want, sel[keep])])) if keep.any() else None


def check_selection(idx, qi, w, ki, rows):
    """Worst gap between the reference scores of the picked slots and the reference's own
    sorted top-k on the last `rows` queries, relative to the row's largest |score|."""
    t = qi.shape[1]
    ref = reference_rows(qi, w, ki, rows)
    sel = np.asarray(idx)[0, t - rows:]
    kk = sel.shape[-1]
    best = -np.sort(-ref, -1)[:, :kk]
    picked = np.where(sel >= 0, np.take_along_axis(ref, np.maximum(sel, 0), -1), -np.inf)
    fin = np.isfinite(best)
    if not np.array_equal(fin, np.isfinite(picked)):
        return float("inf")
    scale = np.abs(np.where(fin, best, 0)).max(-1, keepdims=True) + 1e-30
    return float((np.abs(np.where(fin, np.sort(picked, -1)[:, ::-1] - best, 0)) / scale).max())


CANDIDATE_TILES = [(64, 128, 4), (128, 128, 8), (64, 64, 4), (32, 128, 4)]   # (block_q, block_k, warps)


def fused_steps(qi, w, ki, chunk, cfg, iters, interpret):
    """The fused path's steps on the last (widest) query chunk (explicit positions), timed
    apart (ms): the sample's score kernel alone, the threshold (sample scores + their select),
    the candidate kernel, the final select; and the share of the chunk's rows whose candidates
    passed the checks (keys >= th: >= min(k', visible); candidates <= cap; else redone)."""
    t = qi.shape[1]
    lo, m, width = t - chunk, cfg.sample_stride, min(FLAGS.top_k, t)
    qc, wc = qi[:, lo:], w[:, lo:]
    qp, kp = jnp.arange(lo, t, dtype=jnp.int32)[None], jnp.arange(t, dtype=jnp.int32)[None]
    bk = blocks.pow2_block(cfg.block_k, t)
    cap = min(blocks.round_up(t, bk), blocks.round_up(int(np.ceil(cfg.capacity * width)), bk))
    sample = jax.jit(lambda q, w, k, qp, kp: chunk_scores_triton(q, w, k[:, ::m], qp, kp[:, ::m], config=cfg,
                                                                 interpret=interpret))
    thresh = jax.jit(lambda q, w, k, qp, kp: sample_threshold(q, w, k, qp, kp, k=FLAGS.top_k, config=cfg,
                                                              interpret=interpret))
    cands = jax.jit(lambda q, w, k, qp, kp, th: chunk_candidates(q, w, k, qp, kp, th, cap=cap, keep_ties=width,
                                                                 config=cfg, interpret=interpret))
    final = jax.jit(lambda v, n: topk_select(v[0], width, lengths=jnp.minimum(n[0], cap), config=cfg.select,
                                             interpret=interpret))
    th = thresh(qc, wc, ki, qp, kp)
    _, vals, count, reach, nvis = cands(qc, wc, ki, qp, kp, th)
    ok = (reach >= jnp.minimum(width, nvis)) & (count <= cap)
    out = dict(sample_scores_ms=median_time(sample, qc, wc, ki, qp, kp, iters=iters) * 1e3,
               threshold_ms=median_time(thresh, qc, wc, ki, qp, kp, iters=iters) * 1e3,
               candidates_ms=median_time(cands, qc, wc, ki, qp, kp, th, iters=iters) * 1e3,
               final_select_ms=median_time(final, vals, count, iters=iters) * 1e3,
               rows_ok=float(ok.mean()), mean_count=float(count.mean()), cap=cap, chunk=chunk)
    for bq, bk_, nw in CANDIDATE_TILES:             # the candidate kernel at other tiles (same cap)
        c2 = dataclasses.replace(cfg, block_q=bq, block_k=bk_, num_warps=nw)
        f2 = jax.jit(lambda q, w, k, qp, kp, th, c2=c2: chunk_candidates(q, w, k, qp, kp, th, cap=cap,
                                                                        keep_ties=width, config=c2,
                                                                        interpret=interpret))
        try:
            out[f"candidates_ms_{bq}x{bk_}w{nw}"] = median_time(f2, qc, wc, ki, qp, kp, th, iters=iters) * 1e3
        except Exception as e:  # noqa: BLE001 - a tile that does not compile must not lose the row
            out[f"candidates_{bq}x{bk_}w{nw}_error"] = str(e)[:200]
    return out


def bench_indexer(t, matmul, iters, small):
    qi, w, ki = indexer_inputs(t)
    chunk = min(FLAGS.query_chunk, t)
    flops = 2 * (t * t / 2) * FLAGS.index_heads * FLAGS.index_dim
    f = jax.jit(indexer_fn(FLAGS.top_k, chunk, small))
    idx = f(qi, w, ki)
    row = dict(part="indexer", T=t, index_heads=FLAGS.index_heads, index_dim=FLAGS.index_dim,
               top_k=FLAGS.top_k, query_chunk=chunk,
               sel_err=check_selection(idx, qi, w, ki, min(FLAGS.check_rows, t)))
    sec = median_time(f, qi, w, ki, iters=iters)
    row.update(ms=sec * 1e3, tflops=flops / sec / 1e12, matmul_tflops=matmul,
               frac_of_matmul=flops / sec / 1e12 / matmul)
    print(json.dumps(row), flush=True)
    if FLAGS.scores_only:
        sc = median_time(jax.jit(scores_only_fn(chunk, small)), qi, w, ki, iters=iters)
        row.update(scores_ms=sc * 1e3, scores_tflops=flops / sc / 1e12,
                   scores_frac_of_matmul=flops / sc / 1e12 / matmul)
    if FLAGS.fused:
        rows = min(FLAGS.check_rows, t)
        fchunk = min(FLAGS.fused_query_chunk or t, t)
        row["fused_query_chunk"] = fchunk
        for name in FLAGS.fused_variants:
            cfg = FUSED_VARIANTS[name]
            try:
                g = jax.jit(indexer_fn(FLAGS.top_k, fchunk, small, config=cfg))
                got = g(qi, w, ki)
                row[f"{name}_sel_err"] = check_selection(got, qi, w, ki, rows)
                row[f"{name}_same_set"] = float(np.mean(np.all(np.asarray(got)[0, -rows:] == np.asarray(idx)[0, -rows:],
                                                               -1)))
                s2 = median_time(g, qi, w, ki, iters=iters)
                row.update({f"{name}_ms": s2 * 1e3, f"{name}_frac_of_matmul": flops / s2 / 1e12 / matmul,
                            f"{name}_speedup": sec / s2})
                print(json.dumps({key: v for key, v in row.items() if key.startswith(name + "_")}), flush=True)
                steps = fused_steps(qi, w, ki, fchunk, cfg, iters, small)
                row.update({f"{name}_last_chunk_{key}": v for key, v in steps.items()})
                print(json.dumps({key: v for key, v in row.items() if key.startswith(name + "_last")}), flush=True)
            except Exception as e:  # noqa: BLE001 - a variant that does not compile must not lose the row
                row[f"{name}_error"] = str(e)[:300]
                print(f"{name}: {str(e)[:300]}", flush=True)
    if FLAGS.fp8:
        ref = reference_rows(qi, w, ki, min(FLAGS.check_rows, t))
        for name in FLAGS.fp8_variants:
            cfg, rerank = FP8_VARIANTS[name]
            try:
                g = jax.jit(indexer_fn(FLAGS.top_k, chunk, small, "float8_e4m3fn", cfg, rerank))
                row[f"{name}_overlap"] = set_overlap(g(qi, w, ki), ref)
                s8 = median_time(g, qi, w, ki, iters=iters)
                row.update({f"{name}_ms": s8 * 1e3, f"{name}_frac_of_matmul": flops / s8 / 1e12 / matmul,
                            f"{name}_speedup": sec / s8})
                if rerank is None and FLAGS.scores_only:
                    c8 = median_time(jax.jit(scores_only_fn(chunk, small, cfg)), qi, w, ki, iters=iters)
                    row.update({f"{name}_scores_ms": c8 * 1e3, f"{name}_scores_speedup": sc / c8})
                print(json.dumps({key: v for key, v in row.items() if key.startswith(name + "_")}), flush=True)
            except Exception as e:  # noqa: BLE001 - a variant that does not compile must not lose the row
                row[f"{name}_error"] = str(e)[:300]
    return row


def mla_inputs(b, t, s, seed=1):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, t, H, D), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, s, 1, D), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, s, 1, DV), jnp.bfloat16)
    return q, k, v


def dsa_forward(k, chunk, interpret):
    def f(q, kl, vl, qi, w, ki):
        idx = indexer_topk(qi, w, ki, k=k, query_chunk=chunk, impl="triton", interpret=interpret)
        return token_sparse_attention(q, kl, vl, idx[:, :, None], scale=D ** -0.5, impl="triton",
                                      interpret=interpret)
    return f


def dsa_forward_fast(k):
    """(b) on the fastest paths: the fused top-k over one query chunk (`FusedIndexerConfig`),
    then `mla_sparse_attention(impl="auto")` (Mosaic GPU on Hopper) on the latent as stored."""
    def f(q, c, r, qi, w, ki):
        idx = indexer_topk(qi, w, ki, k=k, query_chunk=qi.shape[1], impl="triton", config=FusedIndexerConfig())
        return mla_sparse_attention(q, c, r, idx, scale=D ** -0.5)
    return f


def dsa_layer_forward(k):
    """(b) as the DSA layer calls its ops (`DSALayer.__call__` without cache): the indexer with
    explicit positions and `DSAConfig()`'s defaults, then `selected_attention` (impl auto)."""
    s = dops.DSAConfig(top_k=k)

    def f(q, c, r, qi, w, ki):
        pos = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), q.shape[:2])
        idx = dops.indexer_topk(qi, w, ki, pos, pos, k=s.top_k, query_chunk=s.query_chunk, impl=s.impl,
                                score_dtype=s.score_dtype, fp8_rerank=s.fp8_rerank, fused_topk=s.fused_topk)
        return dops.selected_attention(q, c, r, idx, pos, pos, scale=D ** -0.5)
    return f


def dense_rows(t, iters, small):
    """Dense causal stand-ins (ms): cuDNN MLA training form, cuDNN same-FLOPs MHA, our flash
    MQA 576/512."""
    out = {}
    shapes = {"cudnn_mla192": (64, 192), "cudnn_sameflops": (136, 256)}
    for name, (h, d) in shapes.items():
        if small:
            continue
        ks = jax.random.split(jax.random.key(3), 3)
        q, k, v = (jax.random.normal(kk, (1, t, h, d), jnp.bfloat16) for kk in ks)
        f = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
        try:
            out[name] = median_time(f, q, k, v, iters=iters) * 1e3
            if name == "cudnn_mla192" and FLAGS.forward_layer:     # beside the layer's forward + backward
                g = jax.jit(jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
                out[name + "_fwdbwd"] = median_time(g, q, k, v, iters=iters) * 1e3
        except Exception as e:  # noqa: BLE001 - report, keep going
            out[name + "_error"] = str(e)[:200]
        del q, k, v
    q, k, v = mla_inputs(1, t, t)
    f = jax.jit(lambda q, k, v: flash_attention(q, k, v, mask_fn=P.Causal(), scale=D ** -0.5,
                                                      impl="triton", interpret=small))
    try:
        out["flash_mqa576"] = median_time(f, q, k, v, iters=iters) * 1e3
    except Exception as e:  # noqa: BLE001
        out["flash_mqa576_error"] = str(e)[:200]
    return out


def bench_forward(t, iters, small):
    q, kl, vl = mla_inputs(1, t, t)
    qi, w, ki = indexer_inputs(t)
    chunk = min(FLAGS.query_chunk, t)
    f = jax.jit(dsa_forward(FLAGS.top_k, chunk, small))
    row = dict(part="forward", T=t, top_k=FLAGS.top_k)
    sec = median_time(f, q, kl, vl, qi, w, ki, iters=iters)
    idx = jax.jit(indexer_fn(FLAGS.top_k, chunk, small))(qi, w, ki)
    attn = jax.jit(lambda q, kl, vl, idx: token_sparse_attention(q, kl, vl, idx[:, :, None], scale=D ** -0.5,
                                                                 impl="triton", interpret=small))
    rows = min(FLAGS.check_rows, t)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    ref = token_sparse_attention(q[:, t - rows:], kl, vl, idx[:, t - rows:, None], scale=D ** -0.5, impl="xla",
                                 q_positions=pos[:, t - rows:], kv_positions=pos)
    row["attn_err"] = rel(attn(q, kl, vl, idx)[:, t - rows:], ref)
    row.update(ms=sec * 1e3, attention_ms=median_time(attn, q, kl, vl, idx, iters=iters) * 1e3)
    if FLAGS.forward_fast and not small:     # the fused top-k (one query chunk) + mla_sparse_attention auto
        fast = jax.jit(dsa_forward_fast(FLAGS.top_k))
        c, r = kl[:, :, 0, :DV], kl[:, :, 0, DV:]
        row["fast_ms"] = median_time(fast, q, c, r, qi, w, ki, iters=iters) * 1e3
        ref_fast = mla_sparse_attention(q[:, t - rows:], c, r, idx[:, t - rows:], q_positions=pos[:, t - rows:],
                                        kv_positions=pos, scale=D ** -0.5, impl="xla")
        row["fast_err"] = rel(fast(q, c, r, qi, w, ki)[:, t - rows:], ref_fast)     # vs the default's set
        del c, r
    if FLAGS.forward_layer:    # the layer's own op calls, forward and forward + backward
        layer = dsa_layer_forward(FLAGS.top_k)
        c, r = kl[:, :, 0, :DV], kl[:, :, 0, DV:]
        row["layer_ms"] = median_time(jax.jit(layer), q, c, r, qi, w, ki, iters=iters) * 1e3
        grad = jax.jit(jax.grad(lambda q, c, r, *a: layer(q, c, r, *a).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
        row["layer_fwdbwd_ms"] = median_time(grad, q, c, r, qi, w, ki, iters=iters) * 1e3
        del c, r
    del q, kl, vl
    dense = dense_rows(t, iters, small)
    row.update(dense)
    for name in ("cudnn_mla192", "cudnn_sameflops", "flash_mqa576"):
        if name in dense:
            row["speedup_vs_" + name] = dense[name] / row["ms"]
            if "layer_ms" in row:
                row["layer_speedup_vs_" + name] = dense[name] / row["layer_ms"]
            if "fast_ms" in row:
                row["fast_speedup_vs_" + name] = dense[name] / row["fast_ms"]
    if "layer_fwdbwd_ms" in row and "cudnn_mla192_fwdbwd" in row:
        row["layer_fwdbwd_speedup_vs_cudnn_mla192"] = row["cudnn_mla192_fwdbwd"] / row["layer_fwdbwd_ms"]
    return row


def bench_attention(t, iters, small):
    """(d): DSA's main attention per `--attention_impls` (ms), forward and forward + backward."""
    q, kl, _ = mla_inputs(1, t, t)
    c, r = kl[:, :, 0, :DV], kl[:, :, 0, DV:]
    del kl
    qi, w, ki = indexer_inputs(t)
    idx = jax.jit(indexer_fn(FLAGS.top_k, min(FLAGS.query_chunk, t), small))(qi, w, ki)
    del qi, w, ki
    rows = min(FLAGS.check_rows, t)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    kw = dict(scale=D ** -0.5, kv_positions=pos)
    ref = mla_sparse_attention(q[:, t - rows:], c, r, idx[:, t - rows:], q_positions=pos[:, t - rows:],
                               impl="xla", **kw)
    row = dict(part="attention", T=t, top_k=FLAGS.top_k)
    for impl in FLAGS.attention_impls:
        if small and impl != "triton":
            continue

        def attn(q, c, r, idx, impl=impl):
            return mla_sparse_attention(q, c, r, idx, q_positions=pos, impl=impl, interpret=small, **kw)

        def loss(q, c, r, idx, attn=attn):
            return jnp.sum(attn(q, c, r, idx).astype(jnp.float32))

        try:
            f = jax.jit(attn)
            row[impl + "_err"] = rel(f(q, c, r, idx)[:, t - rows:], ref)
            row[impl + "_ms"] = median_time(f, q, c, r, idx, iters=iters) * 1e3
            if FLAGS.attention_grad:
                g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
                row[impl + "_fwd_bwd_ms"] = median_time(g, q, c, r, idx, iters=iters) * 1e3
        except Exception as e:  # noqa: BLE001 - one failing impl must not lose the others
            row[impl + "_error"] = str(e)[:300]
        if impl != "triton" and impl + "_ms" in row and "triton_ms" in row:
            row[impl + "_speedup_vs_triton"] = row["triton_ms"] / row[impl + "_ms"]
            if impl + "_fwd_bwd_ms" in row and "triton_fwd_bwd_ms" in row:
                row[impl + "_fwd_bwd_speedup_vs_triton"] = row["triton_fwd_bwd_ms"] / row[impl + "_fwd_bwd_ms"]
    if FLAGS.attention_bwd:
        row.update(backward_variants(q, c, r, idx, pos, kw["scale"], iters, small))
    return row


def backward_variants(q, c, r, idx, pos, scale, iters, small):
    """`--attention_bwd`: the sparse-MLA backward alone (ms, and error vs the first variant's
    gradients), on the Triton forward's out / lse with random cotangents."""
    keys = jnp.concatenate([c, r], axis=-1)[:, :, None]
    vals, sel = c[:, :, None], idx[:, :, None]
    res_fwd = jax.jit(lambda *a: mla_sparse_attention(*a, q_positions=pos, kv_positions=pos, scale=scale,
                                                      return_lse=True, impl="triton", interpret=small))(q, c, r, idx)
    out, lse = res_fwd.out, res_fwd.lse
    dout = jax.random.normal(jax.random.key(9), out.shape, out.dtype)
    dlse = jnp.zeros_like(lse)
    res, first = {}, None
    for name in FLAGS.attention_bwd:
        rows, fold, *tiles = (int(x) for x in name.split(":"))
        knobs = dict(zip(("block_k_bwd", "num_warps_bwd", "num_stages_bwd"), tiles))
        config = TritonConfig(max_rows=rows, **knobs)
        tag = f"bwd_{rows}rows_fold{fold}" + "".join(f"_{k.removesuffix('_bwd')}{v}" for k, v in knobs.items())

        def bwd(q, keys, vals, out, dout, config=config, fold=bool(fold)):
            dq, dk, dv = token_sparse_backward(q, keys, vals, sel, out, lse, dout, dlse, q_positions=pos,
                                               kv_positions=pos, scale=scale, interpret=small,
                                               config=config, value_is_key_prefix=fold)
            dk = dk.astype(jnp.float32)
            return dq, dk.at[..., :DV].add(dv.astype(jnp.float32))        # (dq, [dc_kv | dk_rope])
        try:
            f = jax.jit(bwd)
            got = f(q, keys, vals, out, dout)
            first = first or got
            res[f"{tag}_err_vs_first"] = max(rel(a, b) for a, b in zip(got, first))
            res[f"{tag}_ms"] = median_time(f, q, keys, vals, out, dout, iters=iters) * 1e3
        except Exception as e:  # noqa: BLE001 - a variant that does not compile must not lose the others
            res[f"{tag}_error"] = str(e)[:300]
        print(json.dumps({k: v for k, v in res.items() if k.startswith(tag + "_")}), flush=True)
    return res


def bench_decode_part(b, s, copy_bw, iters, reps, small):
    """(c): `mla_decode` sparse over the `top_k` selected tokens vs dense MLA decode over the
    whole cache (`mla_decode`'s dense mode, and `decode_attention` over the concatenated
    latent, the path dense MLA decode took before), plus the old sparse path (`token_sparse`
    over separate K / V arrays)."""
    k = min(FLAGS.top_k, s)
    dc, dr = DV, D - DV
    scale = D ** -0.5
    ks = jax.random.split(jax.random.key(5), 3)
    qs = jax.random.normal(ks[0], (reps, b, 1, H, D), jnp.bfloat16)
    c_kv = jax.random.normal(ks[1], (b, s, dc), jnp.bfloat16)
    k_rope = jax.random.normal(ks[2], (b, s, dr), jnp.bfloat16)
    rng = np.random.default_rng(0)
    sels = jnp.asarray(np.stack([np.stack([rng.permutation(s)[:k] for _ in range(b)]) for _ in range(reps)]
                                )[:, :, None, :], jnp.int32)                  # [reps, B, 1, k], distinct
    qpos = jnp.full((b, 1), s - 1, jnp.int32)
    kvpos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    lengths = jnp.full((b,), s, jnp.int32)

    def mla(num_splits=None, config=None):
        def f(q, c, r, idx=None):
            return mla_decode(q, c, r, indices=idx, q_positions=qpos, kv_positions=kvpos, scale=scale,
                              num_splits=num_splits, impl="triton", interpret=small, config=config)
        return f

    def timed(f, *args, sels_=None):
        return median_time(repeated(f, None), qs, *args, sels_, iters=iters) / reps

    extra = b * H * (D + DV) * 2                                          # q read + out written
    must_sparse, must_dense = b * k * D * 2 + extra, b * s * D * 2 + extra
    row = dict(part="decode", batch=b, context=s, top_k=k, must_read_bytes=must_sparse,
               dense_must_read_bytes=must_dense)
    ref_kw = dict(q_positions=qpos[:2], kv_positions=kvpos[:2], scale=scale, return_lse=False, num_splits=None)
    args2 = (qs[0][:2], c_kv[:2], k_rope[:2])
    ref_sparse = mla_decode(*args2, indices=sels[0][:2], **ref_kw, impl="xla")
    ref_dense = mla_decode(*args2, indices=None, **ref_kw, impl="xla")
    row["sparse_err"] = rel(jax.jit(mla())(qs[0], c_kv, k_rope, sels[0])[:2], ref_sparse)
    row["dense_err"] = rel(jax.jit(mla())(qs[0], c_kv, k_rope)[:2], ref_dense)
    geo = triton_launch_plan(qs[0], c_kv, k_rope, sels[0])
    auto = geo.num_splits
    sp = timed(mla(), c_kv, k_rope, sels_=sels)
    row.update(sparse_auto_splits=auto, sparse_auto_us=sp * 1e6, row_parts=geo.parts)
    sweep = {}
    for ns in sorted({1, 2, 4, 8} - {auto}) if FLAGS.decode_sweep else ():
        if ns <= geo.max_tiles:
            sweep[f"splits{ns}"] = timed(mla(ns), c_kv, k_rope, sels_=sels)
    sweep_cfgs = () if not FLAGS.decode_sweep else (("f32_partials", MlaDecodeTritonConfig(partial_dtype="float32")),
                      ("block_k16", MlaDecodeTritonConfig(block_k=16)),
                      ("block_k64", MlaDecodeTritonConfig(block_k=64)),
                      ("block_k128", MlaDecodeTritonConfig(block_k=128)),
                      ("block_k64_w8", MlaDecodeTritonConfig(block_k=64, num_warps=8)),
                      ("block_k64_rows64_w8", MlaDecodeTritonConfig(block_k=64, max_rows=64, num_warps=8)))
    for name, cfg in sweep_cfgs:
        try:
            sweep[name] = timed(mla(None, cfg), c_kv, k_rope, sels_=sels)
        except Exception as e:  # noqa: BLE001 - a config that does not compile
            row[f"{name}_error"] = str(e)[:200]
    row["sparse_sweep_us"] = {n: t * 1e6 for n, t in sweep.items()}
    best_name, best = min([("auto", sp)] + [(n, t) for n, t in sweep.items() if n != "f32_partials"],
                          key=lambda x: x[1])
    row.update(sparse_us=best * 1e6, sparse_best=best_name, sparse_gbps=must_sparse / best / 1e9,
               sparse_frac_of_copy=must_sparse / best / copy_bw,
               sparse_auto_frac_of_copy=must_sparse / sp / copy_bw)
    best_cfg = dict(sweep_cfgs).get(best_name)
    de = min(timed(mla(), c_kv, k_rope), timed(mla(None, best_cfg), c_kv, k_rope))
    row.update(dense_mla_us=de * 1e6, dense_mla_frac_of_copy=must_dense / de / copy_bw,
               speedup_vs_dense_mla=de / best)
    for impl in FLAGS.mla_impls:
        if impl == "triton":
            continue

        def other(config=None, impl=impl):
            def f(q, c, r, idx=None):
                return mla_decode(q, c, r, indices=idx, q_positions=qpos, kv_positions=kvpos, scale=scale,
                                  impl=impl, config=config)
            return f
        # mosaic_gpu: the split heuristic's floor (tokens per split) swept, best reported
        floor = MlaDecodeMosaicGpuConfig().min_tokens_per_split
        cfgs = [None] + ([MlaDecodeMosaicGpuConfig(min_tokens_per_split=n) for n in (128, 256, 512) if n != floor]
                         if impl == "mosaic_gpu" and FLAGS.decode_sweep else [])
        try:
            row[f"{impl}_sparse_err"] = rel(jax.jit(other())(qs[0], c_kv, k_rope, sels[0])[:2], ref_sparse)
            row[f"{impl}_dense_err"] = rel(jax.jit(other())(qs[0], c_kv, k_rope)[:2], ref_dense)
            tss = [timed(other(cfg), c_kv, k_rope, sels_=sels) for cfg in cfgs]
            tds = [timed(other(cfg), c_kv, k_rope) for cfg in cfgs]
            row[f"{impl}_sweep_us"] = {("default" if cfg is None else f"min_tokens{cfg.min_tokens_per_split}"):
                                      [a * 1e6, b_ * 1e6] for cfg, a, b_ in zip(cfgs, tss, tds)}  # sparse, dense
            ts, td = min(tss), min(tds)
            if impl == "mosaic_gpu":    # sparse with the rows gathered in the kernel (opt-in), same run
                cfg_in = MlaDecodeMosaicGpuConfig(gather_in_kernel=True)
                row["mosaic_gpu_sparse_in_kernel_gather_err"] = rel(
                    jax.jit(other(cfg_in))(qs[0], c_kv, k_rope, sels[0])[:2], ref_sparse)
                tx = timed(other(cfg_in), c_kv, k_rope, sels_=sels)
                row.update(mosaic_gpu_sparse_in_kernel_gather_us=tx * 1e6,
                           mosaic_gpu_sparse_in_kernel_gather_frac_of_copy=must_sparse / tx / copy_bw)
            row.update({f"{impl}_sparse_us": ts * 1e6, f"{impl}_sparse_gbps": must_sparse / ts / 1e9,
                        f"{impl}_sparse_frac_of_copy": must_sparse / ts / copy_bw,
                        f"{impl}_sparse_speedup_vs_triton": best / ts, f"{impl}_dense_us": td * 1e6,
                        f"{impl}_dense_frac_of_copy": must_dense / td / copy_bw,
                        f"{impl}_dense_speedup_vs_triton": de / td})
            # as soon as timed (a short GPU slot may stop the run before its table)
            print(json.dumps({key: v for key, v in row.items() if key.startswith(impl + "_")}), flush=True)
        except Exception as e:  # noqa: BLE001 - report, keep the row
            row[f"{impl}_error"] = str(e)[:300]

    def dense_xla(q, c, r):     # XLA's two matmuls over the latent, no concatenation
        return mla_decode(q, c, r, indices=None, q_positions=qpos, kv_positions=kvpos,
                          scale=scale, impl="xla")
    try:
        dx = timed(dense_xla, c_kv, k_rope)
        row.update(dense_xla_us=dx * 1e6, speedup_vs_dense_xla=dx / best)
    except Exception as e:  # noqa: BLE001 - report, keep the row
        row["dense_xla_error"] = str(e)[:200]
    kl, vl = jnp.concatenate([c_kv, k_rope], -1)[:, :, None], c_kv[:, :, None]   # the old latent_kv copy

    def dense_old(q, kc, vc):
        return decode_attention(q, kc, vc, lengths=lengths, q_positions=qpos, scale=scale, impl="triton",
                                interpret=small)

    def sparse_old(q, kc, vc, idx):
        return token_sparse_attention(q, kc, vc, idx[:, :, None], q_positions=qpos, scale=scale, impl="triton",
                                      interpret=small)
    for name, f, sl in (("decode_attention", dense_old, None), ("token_sparse", sparse_old, sels)):
        try:
            t = timed(f, kl, vl, sels_=sl)
            row.update({f"{name}_us": t * 1e6, f"speedup_vs_{name}": t / best})
        except Exception as e:  # noqa: BLE001 - report, keep the row
            row[f"{name}_error"] = str(e)[:200]
    return row


def table(rows, copy_bw) -> str:
    lines = [f"copy {copy_bw / 1e9:.0f} GB/s", "", "| part | shape | ours | baseline(s) | ratio |",
             "|---|---|---|---|---|"]
    for r in rows:
        if r["part"] == "indexer":
            only = (f" (scores only {r['scores_tflops']:.0f})", f" (scores {r['scores_frac_of_matmul']:.2f})") \
                if "scores_ms" in r else ("", "")
            lines.append(f"| indexer | T={r['T']} H_I={r['index_heads']}x{r['index_dim']} k={r['top_k']} | "
                         f"{r['ms']:.2f} ms, {r['tflops']:.0f} TFLOP/s{only[0]} "
                         f"| matmul {r['matmul_tflops']:.0f} TFLOP/s | {r['frac_of_matmul']:.2f}{only[1]}, "
                         f"sel_err {r['sel_err']:.1e} |")
            for name in FUSED_VARIANTS:
                if f"{name}_ms" in r:
                    lines.append(f"| indexer {name} | T={r['T']} | {r[name + '_ms']:.2f} ms | radix select "
                                 f"{r['ms']:.2f} ms | {r[name + '_speedup']:.2f}x, "
                                 f"{r[name + '_frac_of_matmul']:.2f} of matmul, sel_err {r[name + '_sel_err']:.1e}, "
                                 f"same set {r[name + '_same_set']:.3f} |")
            for name in FP8_VARIANTS:
                if f"{name}_ms" in r:
                    only = (f" (scores only {r[name + '_scores_ms']:.2f})" if name + "_scores_ms" in r else "")
                    ratio = (f" (scores {r[name + '_scores_speedup']:.2f}x)" if name + "_scores_ms" in r else "")
                    lines.append(f"| indexer {name} | T={r['T']} | {r[name + '_ms']:.2f} ms{only} | bf16 "
                                 f"{r['ms']:.2f} ms (scores {r.get('scores_ms', float('nan')):.2f}) | "
                                 f"{r[name + '_speedup']:.2f}x{ratio}, {r[name + '_frac_of_matmul']:.2f} of matmul, "
                                 f"overlap {r[name + '_overlap']:.4f} |")
        elif r["part"] == "attention":
            for impl in FLAGS.attention_impls:
                if impl + "_ms" in r:
                    bwd = f", fwd+bwd {r[impl + '_fwd_bwd_ms']:.1f} ms" if impl + "_fwd_bwd_ms" in r else ""
                    ratio = f"{r[impl + '_speedup_vs_triton']:.2f}x" if impl + "_speedup_vs_triton" in r else "-"
                    lines.append(f"| DSA attention {impl} | T={r['T']} k={r['top_k']} | {r[impl + '_ms']:.1f} ms"
                                 f"{bwd}, err {r[impl + '_err']:.1e} | triton {r.get('triton_ms', 0):.1f} ms | "
                                 f"{ratio} |")
        elif r["part"] == "forward":
            base = ", ".join(f"{n} {r[n]:.1f} ms" for n in ("cudnn_mla192", "cudnn_sameflops", "flash_mqa576")
                             if n in r)
            ratio = ", ".join(f"{r['speedup_vs_' + n]:.2f}x" for n in ("cudnn_mla192", "cudnn_sameflops",
                                                                      "flash_mqa576") if n in r)
            lines.append(f"| DSA fwd | T={r['T']} k={r['top_k']} | {r['ms']:.1f} ms (attn {r['attention_ms']:.1f}) "
                         f"| {base} | {ratio} |")
            if "layer_ms" in r:
                mla = r.get("cudnn_mla192", float("nan")), r.get("cudnn_mla192_fwdbwd", float("nan"))
                lines.append(f"| DSA layer ops fwd / f+b | T={r['T']} k={r['top_k']} | {r['layer_ms']:.1f} / "
                             f"{r['layer_fwdbwd_ms']:.1f} ms | cudnn_mla192 {mla[0]:.1f} / {mla[1]:.1f} ms | "
                             f"{mla[0] / r['layer_ms']:.2f}x / {mla[1] / r['layer_fwdbwd_ms']:.2f}x |")
        else:
            old = ", ".join(f"{n} {r[n + '_us']:.0f} us" for n in ("dense_xla", "decode_attention", "token_sparse")
                            if n + "_us" in r)
            ratio = ", ".join(f"{r['speedup_vs_' + n]:.1f}x" for n in ("dense_mla", "dense_xla",
                                                                      "decode_attention", "token_sparse") if "speedup_vs_" + n in r)
            lines.append(f"| sparse-MLA decode | B={r['batch']} ctx={r['context']} k={r['top_k']} | "
                         f"{r['sparse_us']:.1f} us ({r['sparse_best']}), {r['sparse_gbps']:.0f} GB/s must-read, "
                         f"{r['sparse_frac_of_copy']:.2f} of copy | dense mla_decode {r['dense_mla_us']:.0f} us "
                         f"({r['dense_mla_frac_of_copy']:.2f} of copy), {old} | {ratio} |")
            for impl in FLAGS.mla_impls:
                if f"{impl}_sparse_us" in r:
                    xla = r.get(impl + "_sparse_in_kernel_gather_us")
                    xla = "" if xla is None else (f", gathered in the kernel {xla:.1f} us "
                                                  f"({r[impl + '_sparse_in_kernel_gather_frac_of_copy']:.2f} of copy)")
                    lines.append(f"| mla_decode {impl} | B={r['batch']} ctx={r['context']} k={r['top_k']} | "
                                 f"sparse {r[impl + '_sparse_us']:.1f} us ({r[impl + '_sparse_gbps']:.0f} GB/s, "
                                 f"{r[impl + '_sparse_frac_of_copy']:.2f} of copy){xla}, "
                                 f"dense {r[impl + '_dense_us']:.0f} us "
                                 f"({r[impl + '_dense_frac_of_copy']:.2f} of copy) | triton sparse "
                                 f"{r['sparse_us']:.1f} us, dense {r['dense_mla_us']:.0f} us | "
                                 f"{r[impl + '_sparse_speedup_vs_triton']:.2f}x, "
                                 f"{r[impl + '_dense_speedup_vs_triton']:.2f}x |")
    return "\n".join(lines)


def main(argv):
    del argv
    small = FLAGS.small
    if small:
        FLAGS.index_heads, FLAGS.index_dim, FLAGS.top_k, FLAGS.query_chunk = 2, 16, 8, 16
        FLAGS.decode_batch, FLAGS.decode_context, FLAGS.check_rows = 2, 64, 8
        seq_lens, iters, reps = [48], 1, 2
    else:
        seq_lens, iters, reps = [int(x) for x in FLAGS.seq_lens], FLAGS.iters, FLAGS.reps
    global H, D, DV
    if small:
        H, D, DV = 16, 72, 64
    info = dict(device=str(jax.devices()[0]), small=small, H=H, D=D, DV=DV)
    copy_bw = 1e12 if small else copy_bandwidth(iters)[0]
    matmul = 1.0 if small else matmul_tflops(8192, iters)
    info.update(copy_bytes_per_s=copy_bw, matmul_tflops=matmul)
    rows = []

    def save():
        with open(FLAGS.out, "w") as fh:
            json.dump(dict(info=info, rows=rows), fh, indent=1)

    t0 = time.perf_counter()
    for part in FLAGS.parts:
        for t in (seq_lens if part != "decode" else [None]):
            try:
                if part == "indexer":
                    rows.append(bench_indexer(t, matmul, iters, small))
                elif part == "forward":
                    rows.append(bench_forward(t, iters, small))
                elif part == "attention":
                    rows.append(bench_attention(t, iters, small))
                else:
                    rows.append(bench_decode_part(FLAGS.decode_batch, FLAGS.decode_context, copy_bw, iters,
                                                  reps, small))
            except Exception as e:  # noqa: BLE001 - one failing row must not lose the others
                rows.append(dict(part=part, T=t, error=str(e)[:400]))
                print(f"{part} T={t}: {str(e)[:400]}", flush=True)
                continue
            print(json.dumps(rows[-1]), f"({time.perf_counter() - t0:.0f} s)", flush=True)
            save()
    save()
    print(table([r for r in rows if "error" not in r], copy_bw))


if __name__ == "__main__":
    from script_io import run  # noqa: PLC0415 (experiments/script_io.py: --help exits 0)
    run(main)
