"""Benchmark training-free sparsity (issue 8, items 3 and 4): Quest decode, MInference and
FlexPrefill prefill, each against its dense baseline in the same process.

(a) Quest decode (arXiv 2406.10774), bf16, the decode rows of BENCHMARKING.md (H=32 /
    Hkv=8, D=128, one new token; `--batches`, `--contexts`, default 1 and 16 x 128K), a
    budget of `--quest_fraction` (1/16) of the pages, pages of `--quest_pages` tokens. One
    *step* is what a serving loop runs per token with a `QuestKVCache`: page scores from
    the kept per-page bounds (`kmin`/`kmax`, read once: `2 / page` of the key bytes) +
    top-k page selection + the `decode` kernel over the selected pages. Also timed: the
    scoring + selection alone, and its two parts alone (the page scores; the top-k pages
    of given scores), the page scores by the Triton kernel (`impl="triton"`, error against
    the XLA scores), the general `selection.block_lists` (union grid + sort over every
    page) that the top-k's lists went through before `sorted_block_lists`, the selected
    decode alone, and dense `decode_attention` of
    the same cache (the faster of the `lengths` and `kv_positions` forms is the baseline).
    Bytes ceiling of the speedup: `t / (pages + kept * page)` (the bounds of every page are
    read each step): 8x at pages of 16 and a 1/16 budget, 12.8x at pages of 64.
    With `--quest_bounds bfloat16,float8_e4m3fn`, a row per bounds dtype (float8 codes: the
    bytes ceiling counts (D + 2) / 2D of a token per page). `--quest_hlo` prints the compiled
    XLA score program and the bytes each of its instructions reads and writes (is a widened or
    transposed copy of the bounds written first? The bounds are head-major `[B, Hkv, P, D]`
    since issue 14 item 4; page-major they were copied twice). `--quest_score_forms` times
    other forms of the scores (one XLA reduction; the Triton kernel's configs, its tensor-core
    form) and `--quest_topk` other top-k's (lax.top_k, radix select configs, approx_max_k,
    a two-stage chunked top-k, the radix kernel's whole-row form) beside the defaults, each with
    its error / share of the exact set. `--quest_blocks_per_tile 1,2,4,8` times the selected
    decode alone at each `DecodeTritonConfig.blocks_per_tile` (selected pages gathered per
    kernel tile; 0: automatic) in the same run (`selected_decode_by_blocks_per_tile`: us,
    error against the default config's output).
    Each figure is the median of `--iters` timed calls of one jitted program running
    `--reps` steps on distinct queries (bench_decode's `repeated`: optimization barriers
    between steps), divided by `--reps`.
(b) MInference-style prefill (arXiv 2407.02490): causal, bf16, B=1, `--prefill_heads`,
    D=128, `--prefill_lens` (32K and 128K), metadata blocks of `--prefill_block`, budgets
    set for about `--density` of the causal blocks (density = listed blocks / causal
    blocks, measured from the metadata and reported); per pattern type (all heads one
    type, and `mixed`: heads cycling through the three types): the online estimation
    alone, the `block_sparse` kernel alone (metadata given), and both in one program,
    against cuDNN dense causal (`jax.nn.dot_product_attention(..., implementation="cudnn")`)
    on the same inputs. FlexPrefill (arXiv 2502.20766, gamma 0.9) at `--flex_lens`:
    on random inputs the attention is nearly uniform, so its density is high (it adapts
    to the input; the figure says what the estimation costs, not what real text gives).

(c) Double-P decode (arXiv 2602.05191; off unless `--doublep`), bf16, H / Hkv / D as (a),
    `--doublep_batches` x `--doublep_contexts`: prompt keys drawn around T / `--doublep_cluster`
    prototypes (so the attention concentrates on a few clusters; random keys would make it
    flat), clusters of `--doublep_cluster` tokens on average, top-p `--doublep_p`. Timed: the
    prefill clustering (`cluster_prompt`, `--doublep_iters` Lloyd iterations, once per
    prompt), one decode step on the XLA path (cluster mass + top-p + `weighted_attention`
    over the tokens and the centroids: plain jnp, it still reads every slot, masked), the
    estimation + selection alone, and dense `decode_attention` of the same cache. Reported:
    the share of slots a step reads (exact tokens + centroids, per kv head, / T) and the
    error against dense. No kernel yet: the XLA step is no faster than dense; the read share
    is what a gathering kernel could save.

Correctness first: Quest against `quest_decode(impl="xla")` on two batch rows; prefill
against the `block_sparse` XLA reference on the last `--check_rows` queries (max error
relative to max |ref|).

    PYTHONPATH=. python experiments/bench_training_free.py --out /tmp/training_free.json
    PYTHONPATH=. python experiments/bench_training_free.py --small       # CPU: tiny sizes
    PYTHONPATH=. python experiments/bench_training_free.py --doublep --noquest --noprefill
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root: `experiments.` imports

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments.bench_decode import median_time, rel, repeated
from pallas_kernels.block_sparse import BlockSparseMetadata, block_sparse_attention
from pallas_kernels.decode.api import DecodeTritonConfig, decode_attention
from pallas_kernels.indexer import top_k_set
from pallas_kernels.indexer.select import TopkSelectConfig, float_keys, two_stage_top_k, whole_row_config
from pallas_kernels.page_scores.api import PageScoresConfig, page_scores
from sparse_jax import patterns as P
from sparse_jax.cache.base import weighted_attention
from sparse_jax.ops import doublep as DP
from sparse_jax.ops import flexprefill as F
from sparse_jax.ops import quest as Q
from sparse_jax.ops import selection
from sparse_jax.ops import sparse_prefill as S

FLAGS = flags.FLAGS      # --out --batches --contexts --heads --kv_heads --head_dim --iters --reps: bench_decode's
flags.DEFINE_list("quest_pages", ["16", "64"], "Quest page sizes")
flags.DEFINE_float("quest_fraction", 1 / 16, "Quest page budget as a fraction of the pages")
flags.DEFINE_list("quest_bounds", ["bfloat16"], "Quest bounds dtypes, one row each (bfloat16: the cache's; "
                  "float8_e4m3fn: codes + a scale per page and head)")
flags.DEFINE_bool("quest_hlo", False, "print the fusions / custom calls of the compiled XLA page-score program "
                  "and the bytes each reads and writes (whether the bounds are read in place or copied first)")
flags.DEFINE_list("quest_blocks_per_tile", [], "selected decode timed at each of these "
                  "DecodeTritonConfig.blocks_per_tile (pages per kernel tile; 0: automatic), e.g. 1,2,4,8")
flags.DEFINE_list("quest_score_forms", [], "page-score forms timed beside the default XLA dots (each: us, error "
                  "against them): reduce (the elementwise products summed over D by one XLA reduction, no dot), "
                  "triton:BLOCK_PAGES[:NUM_WARPS][:dot] (the Triton kernel, PageScoresConfig; dot: its "
                  "tensor-core form)")
flags.DEFINE_list("quest_topk", [], "top-k variants timed side by side on the same masked scores [B * Hkv, P] "
                  "(each: us, share of the exact set found): xla (lax.top_k), auto (top_k_set's default, "
                  "what Quest runs), radix[:BITS:FULL_PASSES:BLOCK_S[:NUM_WARPS]] (the Triton radix select, "
                  "TopkSelectConfig; tiled from 64 rows), whole[:BITS[:NUM_WARPS]] (its whole-row form, one "
                  "program per row holding the row in registers: select.whole_row_config), "
                  "packed[:BITS[:NUM_WARPS]] (the whole-row form with a pass's counts packed four to an int64 "
                  "reduction, packed_counts; BITS 2 (default) or 4), "
                  "histogram[:BITS] (an exact radix select in plain XLA, all rows at once), "
                  "approx:RECALL (lax.approx_max_k), "
                  "chunked:CHUNK (select.two_stage_top_k: lax.top_k of min(k, CHUNK) per chunk of CHUNK pages, "
                  "then of the candidates; the exact set)")
flags.DEFINE_list("prefill_lens", ["131072", "32768"], "prefill lengths (the target's 128K first)")
flags.DEFINE_list("flex_lens", ["32768"], "FlexPrefill lengths")
flags.DEFINE_string("prefill_heads", "16:16", "prefill num_heads:num_kv_heads")
flags.DEFINE_integer("prefill_block", 128, "metadata block of the sparse prefill")
flags.DEFINE_float("density", 0.1, "target fraction of the causal blocks")
flags.DEFINE_list("patterns", ["mixed", "block_sparse", "vertical_slash", "a_shape"], "MInference rows")
flags.DEFINE_integer("check_rows", 256, "query rows checked against the reference")
flags.DEFINE_bool("quest", True, "run (a)")
flags.DEFINE_bool("prefill", True, "run (b)")
flags.DEFINE_bool("small", False, "tiny sizes (CPU smoke run)")
flags.DEFINE_bool("doublep", False, "run (c), Double-P decode")
flags.DEFINE_list("doublep_batches", ["1", "8"], "Double-P batch sizes")
flags.DEFINE_list("doublep_contexts", ["32768"], "Double-P prompt lengths")
flags.DEFINE_integer("doublep_cluster", 64, "Double-P: prompt tokens per cluster (on average)")
flags.DEFINE_integer("doublep_iters", 4, "Double-P: Lloyd iterations")
flags.DEFINE_float("doublep_p", 0.9, "Double-P: top-p over clusters (read token by token)")
flags.DEFINE_float("doublep_keep_p", 1.0, "Double-P: clusters past this top-p share dropped (1: none)")


# ----------------------------------------------------------------------------- (a) Quest decode


def quest_step(page, budget):
    """One Quest step on a cache `c = (k, v, kv_positions, kmin, kmax, bound_scale)`."""
    def f(q, c, _v=None):
        k, v, pos = c[:3]
        return Q.quest_decode(q, k, v, pos, page_size=page, budget_pages=budget, bounds=c[3:])
    return f


def quest_scores(page, impl="xla"):
    """The page scores of a step (the valid pages from the positions, then the bounds)."""
    def f(q, c, _v=None):
        return Q.quest_page_scores(q, c[3], c[4], Q.valid_pages(c[2], page), bound_scale=c[5], impl=impl)
    return f


def quest_select(page, budget):
    """Scores + selection, packed in one array `[B, Hkv, budget + 1]` (counts last)."""
    def f(q, c, _v=None):
        valid = Q.valid_pages(c[2], page)
        idx, cnt = Q.select_top_pages(quest_scores(page)(q, c), budget, valid)
        return jnp.concatenate([idx, cnt[..., None]], -1)
    return f


HLO_INSTR = re.compile(r"\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][\w-]*)\((.*?)\)(?:,|$)")
HLO_ARRAY = re.compile(r"\b(pred|[a-z]+(\d+)[a-z0-9]*)\[([\d,]*)\]")


def hlo_traffic(text):
    """Rows `(name, op, read bytes, written bytes)` of the ENTRY computation of a compiled
    HLO text (`.compile().as_text()`), from the shapes of each instruction's operands and
    result (an operand sliced inside a fusion counts whole: an upper bound); parameters,
    constants, bitcasts and tuples move nothing and are left out."""
    entry = text.split("\nENTRY ")[-1].split("\n}")[0]
    size, rows = {}, []
    for line in entry.splitlines()[1:]:
        m = HLO_INSTR.match(line)
        if not m:
            continue
        name, shape, op, args = m.groups()
        size[name] = sum(int(np.prod([int(x) for x in dims.split(",") if x] or [1])) * int(bits or 8)
                         // 8 for _, bits, dims in HLO_ARRAY.findall(shape))
        if op not in ("parameter", "constant", "bitcast", "tuple", "get-tuple-element"):
            rows.append((name, op, sum(size.get(a, 0) for a in re.findall(r"%([\w.-]+)", args)), size[name]))
    return rows


def score_form(name, page):
    """`f(q, c) -> [B, Hkv, P]` for one `--quest_score_forms` entry."""
    kind, *arg = name.split(":")
    if kind == "reduce":
        def reduce_form(q, c):
            kmin, kmax, sc = c[3:]
            b, _, h, d = q.shape
            hkv = kmin.shape[1]
            # q in float32: with bfloat16 q, XLA:CPU's YNNPACK fusion of this returned inf (jax 0.11.2)
            qg = jnp.swapaxes(q.reshape(b, -1, hkv, h // hkv, d), 1, 2).reshape(b, hkv, 1, -1, d).astype(jnp.float32)
            lo, hi = (x.astype(jnp.float32)[:, :, :, None] for x in (kmin, kmax))                 # [B, Hkv, P, 1, D]
            s = (jnp.maximum(qg, 0) * hi + jnp.minimum(qg, 0) * lo).sum(-1).max(-1) / d ** 0.5     # [B, Hkv, P]
            if sc.shape[-1]:
                s = s * sc[..., 0].astype(jnp.float32)
            return jnp.where(Q.valid_pages(c[2], page)[:, None], s, -jnp.inf)
        return reduce_form
    if kind == "triton":
        dot = arg[-1:] == ["dot"]
        cfg = PageScoresConfig(**dict(zip(("block_pages", "num_warps"), map(int, arg[:len(arg) - dot]))), dot=dot)
        return lambda q, c: page_scores(q, c[3], c[4], Q.valid_pages(c[2], page), c[5] if c[5].shape[-1] else None,
                                        impl="triton", config=cfg)
    raise ValueError(f"--quest_score_forms: unknown form {name!r}")


def histogram_top_k(s, k, bits):
    """The exact top-k set of `s [R, P]` (-inf counted as a value) in plain XLA, all rows at
    once: the k-th largest key by `32 / bits` passes of `2**bits`-bucket histograms (one fused
    compare-and-count each), then the slots above it plus the first of its ties in slot order,
    compacted by a cumsum and a scatter. Slots `[R, k]`, ascending."""
    r, p = s.shape
    u = jax.lax.bitcast_convert_type(float_keys(s), jnp.uint32) ^ jnp.uint32(1 << 31)   # unsigned order
    prefix, need = jnp.zeros((r,), jnp.uint32), jnp.full((r,), min(k, p), jnp.int32)
    buckets = jnp.arange(2 ** bits, dtype=jnp.uint32)
    for shift in range(32 - bits, -1, -bits):
        high = jnp.uint32((0xFFFFFFFF << (shift + bits)) & 0xFFFFFFFF)
        digit = (u >> shift) & jnp.uint32(2 ** bits - 1)
        in_play = (u & high) == prefix[:, None]
        hist = ((digit[..., None] == buckets) & in_play[..., None]).sum(1, dtype=jnp.int32)   # [R, 2**bits]
        at_least = jnp.cumsum(hist[:, ::-1], axis=1)[:, ::-1]                # in play with digit >= d
        d = (at_least >= need[:, None]).sum(1) - 1                           # the k-th's digit
        above = jnp.where(d + 1 < 2 ** bits, jnp.take_along_axis(at_least, jnp.minimum(d + 1, 2 ** bits - 1)[:, None],
                                                                  axis=1)[:, 0], 0)
        need = need - above
        prefix = prefix | (d.astype(jnp.uint32) << shift)
    equal = u == prefix[:, None]
    take = (u > prefix[:, None]) | (equal & (jnp.cumsum(equal, axis=1, dtype=jnp.int32) <= need[:, None]))
    col = jnp.where(take, jnp.cumsum(take, axis=1, dtype=jnp.int32) - 1, k)
    slots = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (r, p))
    return jnp.full((r, k), -1, jnp.int32).at[jnp.arange(r)[:, None], col].set(slots, mode="drop")


def topk_variant(name, k):
    """`f(scores [R, P] float32) -> slots [R, k]` for one `--quest_topk` entry (ascending
    slots for the exact ones; the set is what is compared)."""
    kind, *arg = name.split(":")
    if kind == "xla":
        return lambda s: top_k_set(s, k, impl="xla")[1]
    if kind == "auto":
        return lambda s: top_k_set(s, k)[1]
    if kind in ("whole", "packed"):
        args = [int(a) for a in arg] or ([2] if kind == "packed" else [])
        return lambda s: top_k_set(s, k, impl="triton", config=whole_row_config(
            s.shape[1], *args, packed_counts=kind == "packed"))[1]
    if kind == "radix":
        cfg = TopkSelectConfig(**dict(zip(("bits_per_pass", "full_passes", "block_s", "num_warps"), map(int, arg))))
        return lambda s: top_k_set(s, k, impl="triton", config=cfg)[1]
    if kind == "approx":
        return lambda s: jax.lax.approx_max_k(s, k, recall_target=float(arg[0]))[1]
    if kind == "histogram":
        return functools.partial(histogram_top_k, k=k, bits=int(arg[0]) if arg else 4)
    if kind == "chunked":
        return lambda s: two_stage_top_k(s, k, int(arg[0]))[1]
    raise ValueError(f"--quest_topk: unknown variant {name!r}")


def bench_quest(b, t, page, bounds_dtype, dense):
    """One row; `bounds_dtype`: the bounds' dtype (`bfloat16`: the cache's, or float8 codes);
    `dense`: the dense figures by (b, t), timed once for the rows sharing them."""
    h, hkv, d = FLAGS.heads, FLAGS.kv_heads, FLAGS.head_dim
    ks = jax.random.split(jax.random.key(0), 3)
    qs = jax.random.normal(ks[0], (FLAGS.reps, b, 1, h, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, t, hkv, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, t, hkv, d), jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    exact = jax.jit(Q.page_bounds, static_argnums=2)(k, pos, page)
    bounds = jax.jit(Q.bound_codes, static_argnums=2)(*exact, bounds_dtype)
    pages = Q.num_pages(t, page)
    budget = max(1, round(FLAGS.quest_fraction * pages))
    cache = (k, v, pos) + bounds
    row = dict(batch=b, context=t, page=page, budget_pages=budget, pages=pages, heads=h, kv_heads=hkv,
               bounds=bounds_dtype)
    step = quest_step(page, budget)
    sub = tuple(x[:2] for x in cache)
    ref = jax.jit(lambda q, c: Q.quest_decode(q, c[0], c[1], c[2], page_size=page, budget_pages=budget,
                                              bounds=c[3:], impl="xla"))(qs[0][:2], sub)
    row["err_ref"] = rel(jax.jit(step)(qs[0], cache)[:2], ref)
    select = jax.jit(quest_select(page, budget))
    if bounds[0].dtype != exact[0].dtype:      # share of the pages the exact bounds choose (first query)
        a, e = (np.asarray(select(qs[0], c))[..., :-1] for c in (cache, (k, v, pos) + exact + (bounds[2][..., :0],)))
        row["overlap_exact"] = float(np.mean([len(set(x) & set(y)) / budget for x, y in
                                              zip(a.reshape(-1, budget).tolist(), e.reshape(-1, budget).tolist())]))

    def amortised(f, c):
        return 1e6 * median_time(repeated(lambda q, c_, _v: f(q, c_), {}), qs, c, None, None,
                                 iters=FLAGS.iters) / FLAGS.reps

    row["step_us"] = amortised(step, cache)
    row["select_us"] = amortised(quest_select(page, budget), cache)
    # The selection's two parts alone: the page scores (reads the bounds, writes [B, Hkv, P]
    # float32) and the top-k over given scores (each step its own scores).
    scores_fn = quest_scores(page)
    row["score_us"] = amortised(scores_fn, cache)
    if FLAGS.quest_hlo:
        text = jax.jit(scores_fn).lower(qs[0], cache).compile().as_text()
        if b == max(map(int, FLAGS.batches)):               # the program's text once per page size / bounds
            entry = text.split("\nENTRY ")[-1].splitlines()
            print("\n".join(re.sub(r", metadata=.*", "", line.strip())[:200] for line in entry
                            if " = " in line and "parameter(" not in line)[:3000], flush=True)
        traffic = hlo_traffic(text)
        for name, op, rd, wr in traffic:
            print(f"  {name} ({op}): reads {rd / 1e6:.1f} MB, writes {wr / 1e6:.1f} MB", flush=True)
        row["score_hlo_read_mb"] = sum(r[2] for r in traffic) / 1e6
        row["score_hlo_written_mb"] = sum(r[3] for r in traffic) / 1e6
    try:    # the page-score Triton kernel (pallas_kernels.page_scores), beside the XLA scores
        kernel = quest_scores(page, impl="triton")
        row["score_triton_err"] = rel(jax.jit(kernel)(qs[0], cache), jax.jit(scores_fn)(qs[0], cache))
        row["score_triton_us"] = amortised(kernel, cache)
    except Exception as e:  # noqa: BLE001 - keep the row
        row["score_triton_error"] = str(e)[:300]
    scores = jnp.stack([jax.jit(scores_fn)(qs[i], cache) for i in range(FLAGS.reps)])

    def top_pages(q, c, _v, s):
        idx, cnt = Q.select_top_pages(s, budget, Q.valid_pages(c, page))
        return jnp.concatenate([idx, cnt[..., None]], -1)

    row["topk_us"] = 1e6 * median_time(repeated(top_pages, {}), qs, pos, None, scores,
                                       iters=FLAGS.iters) / FLAGS.reps
    sels = jnp.stack([select(qs[i], cache) for i in range(FLAGS.reps)])    # each step its own pages

    def general_lists(q, c, _v, sel):     # what the top-k's lists cost before `sorted_block_lists`
        return selection.block_lists(sel[:, None, :, :-1], pages)[0]

    row["old_lists_us"] = 1e6 * median_time(repeated(general_lists, {}), qs, pos, None, sels,
                                            iters=FLAGS.iters) / FLAGS.reps

    def selected(q, c, _v, sel, config=None):
        return decode_attention(q, c[0], c[1], kv_positions=c[2], block_indices=sel[..., :-1],
                                block_counts=sel[..., -1], block_size=page, config=config)

    row["selected_decode_us"] = 1e6 * median_time(repeated(selected, {}), qs, (k, v, pos), None, sels,
                                                  iters=FLAGS.iters) / FLAGS.reps
    base_out = jax.jit(selected)(qs[0], (k, v, pos), None, sels[0])
    for n in FLAGS.quest_blocks_per_tile:       # pages per kernel tile, side by side
        try:
            fn = functools.partial(selected, config=DecodeTritonConfig(blocks_per_tile=int(n)))
            us = 1e6 * median_time(repeated(fn, {}), qs, (k, v, pos), None, sels, iters=FLAGS.iters) / FLAGS.reps
            err = rel(jax.jit(fn)(qs[0], (k, v, pos), None, sels[0]), base_out)
            row.setdefault("selected_decode_by_blocks_per_tile", {})[n] = dict(us=us, err=err)
        except Exception as e:  # noqa: BLE001 - keep the row
            row.setdefault("selected_decode_by_blocks_per_tile", {})[n] = dict(error=str(e)[:300])
    if (b, t) not in dense:
        lengths = jnp.full((b,), t, jnp.int32)
        dense[b, t] = dict(
            dense_lengths_us=amortised(lambda q, c: decode_attention(q, c[0], c[1], lengths=c[2]), (k, v, lengths)),
            dense_positions_us=amortised(lambda q, c: decode_attention(q, c[0], c[1], kv_positions=c[2]), (k, v, pos)))
    row.update(dense[b, t])
    row["dense_us"] = min(row["dense_lengths_us"], row["dense_positions_us"])
    row["speedup"] = row["dense_us"] / row["step_us"]
    row["speedup_decode_only"] = row["dense_us"] / row["selected_decode_us"]
    # Bytes ceiling: dense reads K+V of t tokens; a step reads the bounds of every page (codes +
    # scale: `f` token slots of K+V each, 1 for bf16 bounds, (D + 2) / 2D for float8) and K+V
    # of the kept pages, so at most t / (f * pages + kept * page) faster.
    row["bounds_bytes"] = sum(x.size * x.dtype.itemsize for x in bounds)
    f = row["bounds_bytes"] / (pages * (k.size // t) * 2 * k.dtype.itemsize)
    row["ideal_speedup"] = t / (f * pages + budget * page)
    if FLAGS.quest_score_forms or FLAGS.quest_topk:     # what a time limit cutting the variants would lose
        print(json.dumps(dict(partial=True, **row)), flush=True)
    for name in FLAGS.quest_score_forms:
        try:
            fn = score_form(name, page)
            form = dict(err=rel(jax.jit(fn)(qs[0], cache), jax.jit(scores_fn)(qs[0], cache)), us=amortised(fn, cache))
        except Exception as e:  # noqa: BLE001 - keep the row
            form = dict(error=str(e)[:200])
        row.setdefault("score_forms", {})[name] = form
    masked = jnp.where(Q.valid_pages(pos, page)[:, None], scores, -jnp.inf).reshape(FLAGS.reps, b * hkv, pages)
    exact = np.asarray(jax.jit(topk_variant("xla", budget))(masked[0]))
    for name in FLAGS.quest_topk:       # the top-k alone, variants side by side on the same scores
        try:
            fn = topk_variant(name, budget)
            got = np.asarray(jax.jit(fn)(masked[0]))
            found = np.mean([len(set(x) & set(y)) / budget for x, y in zip(got.tolist(), exact.tolist())])
            us = 1e6 * median_time(repeated(lambda q, c, _v, s_: fn(s_), {}), qs, pos, None, masked,
                                   iters=FLAGS.iters) / FLAGS.reps
            row.setdefault("topk_variants", {})[name] = dict(us=us, found=float(found))
        except Exception as e:  # noqa: BLE001 - keep the row
            row.setdefault("topk_variants", {})[name] = dict(error=str(e)[:200])
    print(json.dumps(row), flush=True)
    return row


# ----------------------------------------------------------------------------- (b) sparse prefill


def budget_for(t, block, density):
    """MInference budgets giving about `density` of the causal blocks on random inputs:
    block-sparse `top_blocks ~ density * nQ / 2`; A-shape `sink + local ~ density * nQ / 2`;
    vertical-slash half from columns (`~density/2 * nQ` columns, one block each, half the
    rows on average) and half from diagonals (a random offset crosses two block diagonals of
    ~nQ/2 blocks each)."""
    n = -(-t // block)
    half = max(1, round(density * n / 2))
    return S.MInferenceBudget(block_size=block, last_q=64, sink_blocks=1, local_blocks=max(1, half - 1),
                              num_vertical=max(1, round(density * n / 2)),
                              num_slash=max(1, round(density * n / 4)), top_blocks=half)


def density_of(meta: BlockSparseMetadata, t):
    n = -(-t // meta.block_q)
    causal = n * (n + 1) / 2 * meta.kv_block_counts.shape[1]
    return float(np.asarray(meta.kv_block_counts).sum()) / causal


def attend(q, k, v, meta):
    return block_sparse_attention(q, k, v, meta, mask_fn=P.Causal())


def dense_causal(q, k, v):
    impl = "cudnn" if jax.default_backend() == "gpu" else None
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)


def check(q, k, v, meta, out, rows):
    t, bq = q.shape[1], meta.block_q
    nb = min(max(1, rows // bq), -(-t // bq))
    lo = (-(-t // bq) - nb) * bq
    sl = BlockSparseMetadata(meta.kv_block_indices[:, :, -nb:], meta.kv_block_counts[:, :, -nb:],
                             meta.kv_block_full[:, :, -nb:], bq, meta.block_kv)
    ref = jax.jit(lambda q_, k_, v_, m_: block_sparse_attention(
        q_, k_, v_, m_, mask_fn=P.Causal(), q_positions=jnp.arange(lo, t, dtype=jnp.int32)[None],
        impl="xla"))(q[:, lo:], k, v, sl)
    return rel(out[:, lo:], ref)


def bench_prefill(t, h, hkv, dense_ms, kind):
    d, block = FLAGS.head_dim, FLAGS.prefill_block
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (1, t, h, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, t, hkv, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, t, hkv, d), jnp.bfloat16)
    if t not in dense_ms:
        dense_ms[t] = 1e3 * median_time(jax.jit(dense_causal), q, k, v, iters=FLAGS.iters)
    if kind == "flexprefill":
        cfg = F.FlexPrefillConfig(block_size=block)
        estimate = jax.jit(lambda q_, k_: F.flexprefill_metadata(q_, k_, None, cfg))
    else:
        patterns = (S.PATTERNS * h)[:h] if kind == "mixed" else (kind,) * h
        budget = budget_for(t, block, FLAGS.density)
        estimate = jax.jit(lambda q_, k_: S.minference_metadata(q_, k_, patterns, budget))
    meta = estimate(q, k)
    out = jax.jit(attend)(q, k, v, meta)
    row = dict(t=t, h=h, hkv=hkv, d=d, block=block, pattern=kind, density=density_of(meta, t),
               err_ref=check(q, k, v, meta, out, FLAGS.check_rows), dense_ms=dense_ms[t])
    row["estimate_ms"] = 1e3 * median_time(estimate, q, k, iters=FLAGS.iters)
    row["attention_ms"] = 1e3 * median_time(jax.jit(attend), q, k, v, meta, iters=FLAGS.iters)
    both = jax.jit(lambda q_, k_, v_: attend(q_, k_, v_, estimate(q_, k_)))
    row["total_ms"] = 1e3 * median_time(both, q, k, v, iters=FLAGS.iters)
    row["speedup"] = row["dense_ms"] / row["total_ms"]
    row["speedup_attention_only"] = row["dense_ms"] / row["attention_ms"]
    print(json.dumps(row), flush=True)
    return row


# ----------------------------------------------------------------------------- (c) Double-P decode


def doublep_step(top_p, select_only=False, keep_p=1.0):
    """One Double-P decode step over `c = (k, v, pos, assign, centroids, log_sizes,
    mean_values, centroid_positions)`: estimate, select, attend (XLA path)."""
    def f(q, c, _v=None):
        k, v, pos, assign, cent, log_sizes, mean_v, cpos = c
        qpos = pos.max(axis=1, keepdims=True) + 1
        mass = DP.cluster_mass(q, cent, log_sizes, scale=q.shape[-1] ** -0.5)
        selected, kept = DP.choose_clusters(mass, top_p, keep_p)
        if select_only:                     # [2, B, Hkv, C]: exact, attended at all
            return jnp.stack([selected, jnp.ones_like(selected) if kept is None else kept])
        keys, values, kpos, lw = DP.doublep_slots(k, v, pos, assign, cent, log_sizes, mean_v, selected, cpos, kept)
        return weighted_attention(q, keys, values, kpos, qpos, lw, scale=q.shape[-1] ** -0.5)
    return f


def bench_doublep(b, t):
    h, hkv, d, cs = FLAGS.heads, FLAGS.kv_heads, FLAGS.head_dim, FLAGS.doublep_cluster
    ks = jax.random.split(jax.random.key(2), 5)
    protos = jax.random.normal(ks[0], (b, max(1, t // cs), hkv, d), jnp.float32)
    label = jax.random.randint(ks[1], (b, t, hkv), 0, protos.shape[1])
    k = (jnp.take_along_axis(protos, label[..., None], axis=1) + 0.3 * jax.random.normal(ks[2], (b, t, hkv, d))).astype(
        jnp.bfloat16)
    v = jax.random.normal(ks[3], (b, t, hkv, d), jnp.bfloat16)
    pick = jax.random.randint(ks[4], (FLAGS.reps, b, 1, h), 0, protos.shape[1])
    kv_of = jnp.arange(h) // (h // hkv)
    qs = (2.0 * protos[jnp.arange(b)[None, :, None, None], pick, kv_of]).astype(jnp.bfloat16)   # [reps, B, 1, H, D]
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    nc = -(-t // cs)
    cluster = jax.jit(lambda k_, v_, p_: DP.cluster_prompt(k_, v_, p_, num_clusters=nc, iters=FLAGS.doublep_iters))
    assign, cent, log_sizes, mean_v = cluster(k, v, pos)
    cache = (k, v, pos, assign, cent.astype(k.dtype), log_sizes, mean_v.astype(v.dtype),
             jnp.full((b, nc), t - 1, jnp.int32))
    row = dict(batch=b, context=t, clusters=nc, top_p=FLAGS.doublep_p, keep_p=FLAGS.doublep_keep_p, heads=h,
               kv_heads=hkv)
    row["cluster_ms"] = 1e3 * median_time(cluster, k, v, pos, iters=max(1, FLAGS.iters // 3))
    step = doublep_step(FLAGS.doublep_p, keep_p=FLAGS.doublep_keep_p)
    out = jax.jit(step)(qs[0], cache)
    dense = jax.jit(lambda q, c: decode_attention(q, c[0], c[1], kv_positions=c[2]))
    row["err_dense"] = rel(out, dense(qs[0], cache))
    selected, kept = jax.jit(doublep_step(FLAGS.doublep_p, True, FLAGS.doublep_keep_p))(qs[0], cache)
    exact = DP.exact_tokens(assign, selected).sum(-1)                                  # [B, Hkv]
    cents = (jnp.isfinite(log_sizes) & kept & ~selected).sum(-1)
    row["read_fraction"] = float(((exact + cents) / t).mean())
    row["exact_fraction_min_max"] = [float((exact / t).min()), float((exact / t).max())]

    def amortised(f, c):
        return 1e6 * median_time(repeated(lambda q, c_, _v: f(q, c_), {}), qs, c, None, None,
                                 iters=FLAGS.iters) / FLAGS.reps

    row["step_us"] = amortised(step, cache)
    row["select_us"] = amortised(doublep_step(FLAGS.doublep_p, True, FLAGS.doublep_keep_p), cache)
    row["dense_us"] = amortised(lambda q, c: decode_attention(q, c[0], c[1], kv_positions=c[2]), cache)
    row["speedup"] = row["dense_us"] / row["step_us"]
    print(json.dumps(row), flush=True)
    return row


# ----------------------------------------------------------------------------- main


def main(_):
    if FLAGS.small:
        FLAGS.batches, FLAGS.contexts, FLAGS.quest_pages = ["1", "2"], ["2048"], ["16"]
        FLAGS.prefill_lens, FLAGS.flex_lens, FLAGS.prefill_heads = ["1024"], ["1024"], "4:2"
        FLAGS.iters, FLAGS.reps, FLAGS.check_rows = 2, 2, 128
        FLAGS.doublep_batches, FLAGS.doublep_contexts, FLAGS.doublep_cluster = ["2"], ["1024"], 16
    info = dict(device=str(jax.devices()[0]), jax=jax.__version__)
    print(json.dumps(info), flush=True)
    quest, prefill, doublep = [], [], []

    def save():            # after every row, so a run cut by a time limit keeps what it measured
        with open(FLAGS.out, "w") as fh:
            json.dump(dict(info=info, quest=quest, prefill=prefill, doublep=doublep), fh, indent=1)

    if FLAGS.quest:
        dense = {}
        for t in map(int, FLAGS.contexts):
            for b in sorted(map(int, FLAGS.batches), reverse=True):       # the target's batch 16 first
                for page in map(int, FLAGS.quest_pages):
                    for bounds in FLAGS.quest_bounds:
                        try:
                            quest.append(bench_quest(b, t, page, bounds, dense))
                        except Exception as e:  # noqa: BLE001 - keep the other shapes
                            quest.append(dict(batch=b, context=t, page=page, bounds=bounds, error=str(e)[:500]))
                            print(json.dumps(quest[-1]), flush=True)
                        save()
    if FLAGS.prefill:
        h, hkv = (int(x) for x in FLAGS.prefill_heads.split(":"))
        dense = {}
        jobs = [(int(t), p) for t in FLAGS.prefill_lens for p in FLAGS.patterns]
        jobs += [(int(t), "flexprefill") for t in FLAGS.flex_lens]
        for t, kind in jobs:
            try:
                prefill.append(bench_prefill(t, h, hkv, dense, kind))
            except Exception as e:  # noqa: BLE001
                prefill.append(dict(t=t, pattern=kind, error=str(e)[:500]))
                print(json.dumps(prefill[-1]), flush=True)
            save()
    if FLAGS.doublep:
        for t in map(int, FLAGS.doublep_contexts):
            for b in map(int, FLAGS.doublep_batches):
                try:
                    doublep.append(bench_doublep(b, t))
                except Exception as e:  # noqa: BLE001
                    doublep.append(dict(batch=b, context=t, error=str(e)[:500]))
                    print(json.dumps(doublep[-1]), flush=True)
                save()
    save()
    print(f"\n{info['device']}, jax {info['jax']}")
    print("\nQuest decode (per step, us; speedup = dense / step; target >= 8x at B=16, 128K, 1/16)")
    print("| B | context | page | pages kept | step | select | selected decode | dense | speedup | "
          "bytes ceiling | decode-only speedup | err | scores alone | top-k alone | bounds | bounds MB | "
          "overlap with exact-bound pages | scores, triton kernel | old lists (sort) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in quest:
        if "error" in r:
            print(f"| {r['batch']} | {r['context']} | {r['page']} | {r['bounds']} error: {r['error'][:150]} |")
            continue
        print(f"| {r['batch']} | {r['context'] // 1024}K | {r['page']} | {r['budget_pages']}/{r['pages']} | "
              f"{r['step_us']:.1f} | {r['select_us']:.1f} | {r['selected_decode_us']:.1f} | "
              f"{r['dense_us']:.1f} | {r['speedup']:.2f}x | {r['ideal_speedup']:.1f}x | "
              f"{r['speedup_decode_only']:.2f}x | "
              f"{r['err_ref']:.1e} | {r['score_us']:.1f} | {r['topk_us']:.1f} | {r['bounds']} | "
              f"{r['bounds_bytes'] / 1e6:.1f} | {r.get('overlap_exact', 1.0):.3f} | "
              + (f"{r['score_triton_us']:.1f} (err {r['score_triton_err']:.1e}) |" if "score_triton_us" in r
                 else f"error: {r.get('score_triton_error', '')[:100]} |") + f" {r['old_lists_us']:.1f} |")
    swept = [r for r in quest if "selected_decode_by_blocks_per_tile" in r]
    if swept:
        print("\nQuest selected decode by blocks per tile (us; err against the default config)")
        print("| B | context | page | default | blocks per tile | us | err |")
        print("|---|---|---|---|---|---|---|")
        for r in swept:
            for n, x in r["selected_decode_by_blocks_per_tile"].items():
                cell = f"{x['us']:.1f} | {x['err']:.1e}" if "us" in x else f"error: {x['error'][:100]} | -"
                print(f"| {r['batch']} | {r['context'] // 1024}K | {r['page']} | {r['selected_decode_us']:.1f} | "
                      f"{n} | {cell} |")
    forms = [r for r in quest if "score_forms" in r]
    if forms:
        print("\nQuest page-score forms (us; err against the default XLA dots)")
        print("| B | page | bounds | XLA dots | form | us | err |")
        print("|---|---|---|---|---|---|---|")
        for r in forms:
            for name, v in r["score_forms"].items():
                timing = f"{v['us']:.1f} | {v['err']:.1e}" if "us" in v else f"error: {v['error'][:80]} |"
                print(f"| {r['batch']} | {r['page']} | {r['bounds']} | {r['score_us']:.1f} | {name} | {timing} |")
    variants = [r for r in quest if "topk_variants" in r or "score_hlo_read_mb" in r]
    if variants:
        print("\nQuest selection parts: top-k variants alone (us; found = share of the exact set) and the compiled "
              "XLA score program's traffic (MB, from its HLO shapes) against the bounds' bytes")
        print("| B | page | bounds | bounds MB | score program reads / writes MB | top-k variant | us | found |")
        print("|---|---|---|---|---|---|---|---|")
        for r in variants:
            hlo = (f"{r['score_hlo_read_mb']:.1f} / {r['score_hlo_written_mb']:.1f}" if "score_hlo_read_mb" in r
                   else "")
            for name, v in (r.get("topk_variants") or {"": {}}).items():
                timing = (f"{v['us']:.1f} | {v['found']:.4f}" if "us" in v else f"error: {v.get('error', '')[:80]} |")
                print(f"| {r['batch']} | {r['page']} | {r['bounds']} | {r['bounds_bytes'] / 1e6:.1f} | {hlo} | "
                      f"{name} | {timing} |")
    print("\nSparse prefill (ms; dense = cuDNN causal; target MInference >= 5x at 128K, 10% density)")
    print("| T | pattern | density | estimate | attention | total | dense | speedup | attention-only | err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in prefill:
        if "error" in r:
            print(f"| {r['t']} | {r['pattern']} | error: {r['error'][:150]} |")
            continue
        print(f"| {r['t'] // 1024}K | {r['pattern']} | {r['density']:.3f} | {r['estimate_ms']:.2f} | "
              f"{r['attention_ms']:.2f} | {r['total_ms']:.2f} | {r['dense_ms']:.2f} | {r['speedup']:.2f}x | "
              f"{r['speedup_attention_only']:.2f}x | {r['err_ref']:.1e} |")

    if doublep:
        print("\nDouble-P decode, XLA path (per step, us; read = exact tokens + centroids per kv head / T)")
        print("| B | context | clusters | top-p | read | exact min-max | cluster (ms) | step | select | dense | "
              "speedup | err vs dense |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in doublep:
            if "error" in r:
                print(f"| {r['batch']} | {r['context']} | error: {r['error'][:150]} |")
                continue
            lo, hi = r["exact_fraction_min_max"]
            print(f"| {r['batch']} | {r['context'] // 1024}K | {r['clusters']} | {r['top_p']} | "
                  f"{r['read_fraction']:.3f} | {lo:.3f}-{hi:.3f} | {r['cluster_ms']:.1f} | {r['step_us']:.1f} | "
                  f"{r['select_us']:.1f} | {r['dense_us']:.1f} | {r['speedup']:.2f}x | {r['err_dense']:.1e} |")


if __name__ == "__main__":
    FLAGS.set_default("contexts", ["131072"])
    FLAGS.set_default("out", "bench_training_free.json")
    from script_io import run  # noqa: PLC0415 (experiments/script_io.py: --help exits 0)
    run(main)
