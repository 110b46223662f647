"""Benchmark NSA (arXiv 2502.11089) attention on the kernels against cuDNN dense causal attention.

Paper configuration: bf16, HQ=64, HKV=4, D=128, l=32, d=16, l'=64, n=16, w=512; B=1, T in
--seq_lens (16K, 64K). Attention only (the three branches on projected q / k / v, their
sum as the output; projections, compression MLP and gates are not timed). Per T and
selection mode ("token": exact per-token selection on `token_sparse`; "query_block":
shared per 64 queries on `block_sparse`):

* NSA forward and forward+backward (gradients for q and every branch's k / v);
* per-branch breakdown as `nsa_branches` runs it: on the kernel path
  (`ops.selects_on_kernels`) compressed = flash over the compressed keys with its lse,
  selection = the `nsa_select` kernels from that lse (forward only); else compressed = the
  `compressed` op (flash + the group-summed probabilities p_group) and selection = XLA
  `selection_scores` + `select_blocks`. `selection_xla` always times the latter on the
  `compressed` op's p_group (the old path, for comparison; `compressed_op` the op itself,
  and `selection_rows_differing` the fraction of (query, kv head) rows whose selected sets
  differ between the two paths: near-ties only); selected (slc branch on precomputed
  indices), window (`flash`, w=512);
* cuDNN dense causal (`jax.nn.dot_product_attention(..., implementation="cudnn")`) with
  the same heads in the same run; ratio = cuDNN time / NSA time;
* fla-core's Triton NSA (`parallel_nsa`, PyTorch; same heads, l'=64, n=16, w=512, its own
  selection) when importable (`experiments/peers.py`), columns `fla_fwd_ms` / `fla_fwdbwd_ms`.

Decode: batch --decode_batch at --decode_context tokens of context, one query per row: the
NSA decode step (`nsa_decode_branches`: compressed entries + n*l' selected tokens + w
window tokens) vs `decode_attention` over the whole raw cache of the same size.

Correctness first: the last --check_rows queries of the NSA forward against the XLA
references of every branch (`impl="xla"`), and the decode step against its XLA reference.

--cmp_triton also times the compressed branch on Triton (rows `<mode>_compressed_triton_*`),
the path `impl="auto"` took before Mosaic GPU covered it.

--slc_impls triton,mosaic_gpu times the selected branch ("token" mode) on each backend with
the same selection, and TFLOP/s (rows `token_selected_<impl>_*`):
  PYTHONPATH=. python experiments/bench_nsa.py --modes token --slc_impls triton,mosaic_gpu \
      --decode_batch 0
(--slc_only: that alone, the selection taken from one NSA forward.)

Reuses `experiments/bench_kernels.py`'s timer and its --out / --seq_lens / --iters /
--backward flags (defaults changed here). On a GPU machine, repo root:
  PYTHONPATH=. python experiments/bench_nsa.py --out /tmp/bench_nsa.json
Tile sweep of the selection kernels (rows `<mode>_selection_<cfg>_fwd_ms`):
  PYTHONPATH=. python experiments/bench_nsa.py --seq_lens 65536 --modes token --nobackward \
      --select_configs 64:128:4:4096,64:128:8:4096,64:64:4:4096,128:64:8:4096
Launch plans of the fused decode kernel (rows `nsa_<cfg>_ms` of the decode row; a sixth
field `sel` picks the three-kernel plan, `TritonConfig(select_kernel=True)`):
  PYTHONPATH=. python experiments/bench_nsa.py --seq_lens= --decode_configs \
      4:4:64:3:4,2:4:64:3:4,8:4:64:3:4,1:1:64:3:4,4:8:64:3:4:sel
Decode plans, old (default split, three-kernel) vs new (one launch), against dense decode at
B=16 and B=1, 64K: ms per step, GB/s on the must-read bytes, ratio to dense:
  PYTHONPATH=. python experiments/bench_nsa.py --decode_one_launch 16,1 --out /tmp/nsa_dec.json
The compressed branch + selection, two kernels vs the fused Mosaic GPU kernel
(`NSAConfig.fused_cmp_select`; rows `cmp_select_*`, see `time_cmp_select`):
  PYTHONPATH=. python experiments/bench_nsa.py --cmp_select --decode_batch 0
CPU smoke run (tiny shapes and config, kernels in interpret mode, XLA dense baseline):
  PYTHONPATH=. python experiments/bench_nsa.py --small --out /tmp/nsa_small.json
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root: `experiments.` imports

import jax
import jax.numpy as jnp
from absl import flags

from experiments.bench_kernels import median_time, rel
from pallas_kernels.block_sparse import block_sparse_attention
from pallas_kernels.decode import decode_attention
from pallas_kernels.flash.api import MosaicGPUConfig
from pallas_kernels.flash.mosaic_gpu_pooled import flash_pooled_mosaic_gpu
from pallas_kernels.nsa_decode.api import TritonConfig as NsaDecodeConfig, nsa_decode
from pallas_kernels.nsa_decode.triton import make_plan, nsa_decode_triton
from pallas_kernels.nsa_select.api import TritonConfig as NsaSelectConfig, nsa_select
from pallas_kernels.nsa_select.reference import overlap_weights
from sparse_jax import patterns as P
from sparse_jax.ops import nsa as ops
from sparse_jax.ops import selection
from sparse_jax.ops.nsa import NSAConfig

FLAGS = flags.FLAGS
flags.DEFINE_bool("small", False, "CPU smoke run: tiny shapes, interpret mode, XLA dense baseline")
flags.DEFINE_list("modes", ["token", "query_block"], "selection modes")
flags.DEFINE_integer("check_rows", 64, "query rows checked against the XLA references")
flags.DEFINE_integer("decode_batch", 16, "decode batch")
flags.DEFINE_integer("decode_context", 65536, "decode context length")
flags.DEFINE_bool("branches", True, "also time each branch on its own")
flags.DEFINE_bool("cmp_triton", False, "with --branches on the kernel path: also time the compressed "
                  "branch on Triton (impl='triton'; on Hopper 'auto' takes Mosaic GPU), rows "
                  "<mode>_compressed_triton_fwd_ms / _fwdbwd_ms")
flags.DEFINE_list("slc_impls", [], "token mode: also time the selected branch on these token_sparse "
                  "impls (e.g. triton,mosaic_gpu,mosaic_gpu_split; f+b through each one's backward: "
                  "Triton's for all), rows token_selected_<impl>_fwd_ms / _fwdbwd_ms / _fwd_tflops / "
                  "_fwdbwd_tflops / _err_vs_<first>; with mosaic_gpu also its union build and size, and "
                  "every impl's forward on chunk-shared selections (token_selected_shared_<impl>_fwd_ms; "
                  "see time_selected_impls)")
flags.DEFINE_bool("slc_only", False, "with --slc_impls: time only the selected branch per impl (its selection "
                  "from one NSA forward), no dense / NSA / other-branch / peer figures")
flags.DEFINE_list("decode_configs", [], "nsa_decode Triton launch plans to time in the decode row, each "
                  "cmp_splits:tail_splits:block_cmp:num_stages:num_warps[:sel] (1:1:... = one fused kernel; "
                  "sel = the three-kernel plan: cmp + window, selection once, slc parts); rows nsa_<cfg>_ms")
flags.DEFINE_integer("decode_reps", 8, "decode steps per jitted program for the amortised decode times "
                     "(*_amortised_ms; 0: off)")
flags.DEFINE_bool("decode_stages", False, "also time each --decode_configs plan cut after its first one and "
                  "two launches (amortised; rows nsa_<cfg>_k1_ms / _k12_ms)")
flags.DEFINE_list("select_configs", [], "nsa_select Triton configs to sweep on the kernel path, each "
                  "block_q:block_k:num_warps:topn_elements (e.g. 64:128:8:16384); rows "
                  "<mode>_selection_<cfg>_fwd_ms")
flags.DEFINE_list("decode_one_launch", [], "only the decode plans (default split, three-kernel, one-launch) "
                  "against dense decode at these batches and --decode_context, per step (amortised) and per "
                  "call, GB/s on the must-read bytes (e.g. 16,1)")
flags.DEFINE_list("decode_plans", ["split", "three_kernel", "one_launch"], "with --decode_one_launch: the "
                  "plans to time (split = the default TritonConfig, three_kernel = select_kernel=True, "
                  "one_launch = one_launch=True)")
flags.DEFINE_bool("cmp_select", False, "time only the compressed branch + selection: the two-kernel path "
                  "(flash over the compressed keys with its lse, then the nsa_select kernels) against the "
                  "fused Mosaic GPU kernel (NSAConfig.fused_cmp_select: ops.compressed_select_fused; Hopper), "
                  "rows cmp_select_* (see time_cmp_select)")
FLAGS.set_default("out", "bench_nsa.json")
FLAGS.set_default("seq_lens", ["16384", "65536"])


@dataclasses.dataclass(frozen=True)
class Setup:
    h: int
    hkv: int
    d: int
    cfg: NSAConfig
    dtype: object
    impl: str
    interpret: bool


PAPER = Setup(64, 4, 128, NSAConfig(), jnp.bfloat16, "auto", False)
SMALL = Setup(8, 2, 16, NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=4, window=32,
                                  query_block=16), jnp.float32, "triton", True)


def make_inputs(s: Setup, b: int, t: int, tq=None, seed=0):
    """Branch keys over `t` tokens: dict of q / cotangent (the last `tq` tokens, default
    all), k/v per branch, positions."""
    tq = t if tq is None else tq
    n = max(1, ops.num_cmp_blocks(t, s.cfg))
    ks = jax.random.split(jax.random.key(seed), 8)
    rnd = lambda i, shape: jax.random.normal(ks[i], shape, s.dtype)          # noqa: E731
    x = dict(q=rnd(0, (b, tq, s.h, s.d)), do=rnd(7, (b, tq, s.h, s.d)),
             k_cmp=rnd(1, (b, n, s.hkv, s.d)), v_cmp=rnd(2, (b, n, s.hkv, s.d)),
             k_slc=rnd(3, (b, t, s.hkv, s.d)), v_slc=rnd(4, (b, t, s.hkv, s.d)),
             k_win=rnd(5, (b, t, s.hkv, s.d)), v_win=rnd(6, (b, t, s.hkv, s.d)))
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cpos = jnp.broadcast_to(ops.cmp_block_end(jnp.arange(n, dtype=jnp.int32), s.cfg), (b, n))
    x["cmp_positions"] = jnp.where(cpos < t, cpos, -1)
    x["pos"] = pos
    return x


KV = ("k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win")


def nsa_fn(s: Setup, cfg: NSAConfig, x, impl=None):
    """(q, *kv) -> summed branch outputs at positions `x["pos"]`."""
    def f(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, q_positions=None):
        qp = x["pos"] if q_positions is None else q_positions
        out = ops.nsa_branches(q, qp, k_cmp=k_cmp, v_cmp=v_cmp, cmp_positions=x["cmp_positions"],
                               k_slc=k_slc, v_slc=v_slc, slc_positions=x["pos"], k_win=k_win,
                               v_win=v_win, win_positions=x["pos"], cfg=cfg,
                               impl=impl or s.impl, interpret=s.interpret and impl is None)
        return (out.cmp.astype(jnp.float32) + out.slc + out.win).astype(q.dtype)
    return f


def fwd_bwd_all(f, nargs):
    def g(*args):
        out, pull = jax.vjp(f, *args[:nargs])
        return pull(args[nargs])
    return jax.jit(g)


def dense(s: Setup):
    def f(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                            implementation=None if FLAGS.small else "cudnn")
    return f


def check_nsa(s: Setup, cfg, x, rows):
    """Max relative error of the kernel forward's last `rows` queries vs all-XLA branches."""
    t = x["q"].shape[1]
    args = [x["q"]] + [x[n] for n in KV]
    out = jax.jit(nsa_fn(s, cfg, x))(*args)[:, t - rows:]
    ref = jax.jit(nsa_fn(s, cfg, x, impl="xla"))(x["q"][:, t - rows:], *args[1:],
                                                 q_positions=x["pos"][:, t - rows:])
    return rel(out, ref)


def time_branches(s: Setup, cfg, x, iters, row, prefix):
    """Forward (and fwd+bwd where differentiable) of each branch on its own."""
    q, pos, cpos = x["q"], x["pos"], x["cmp_positions"]
    kw = dict(impl=s.impl, interpret=s.interpret)
    ns = -(-q.shape[1] // cfg.sel_block)
    cmp_op = lambda q, k, v: ops.compressed_branch(q, k, v, pos, cpos, **kw)     # noqa: E731
    _, p_grp = jax.jit(cmp_op)(q, x["k_cmp"], x["v_cmp"])

    def select_xla(p):
        return ops.select_blocks(ops.selection_scores(p, ns, cfg), pos, cfg)

    row[f"{prefix}selection_xla_fwd_ms"] = 1e3 * median_time(jax.jit(select_xla), p_grp, iters=iters)
    if ops.selects_on_kernels(s.impl, s.interpret, cfg):
        cmp = lambda q, k, v: ops.compressed_branch_lse(q, k, v, pos, cpos, interpret=s.interpret)  # noqa: E731
        _, lse = jax.jit(cmp)(q, x["k_cmp"], x["v_cmp"])
        select = jax.jit(lambda q, k, lse: ops.select_from_lse(q, k, lse, pos, cpos, ns, cfg,
                                                               interpret=s.interpret))
        sel_args = (q, x["k_cmp"], lse)
        row[f"{prefix}compressed_op_fwd_ms"] = 1e3 * median_time(jax.jit(cmp_op), q, x["k_cmp"], x["v_cmp"],
                                                                 iters=iters)
    else:
        cmp, select, sel_args = cmp_op, jax.jit(select_xla), (p_grp,)
    idx = select(*sel_args)
    same = jnp.sort(idx, axis=-1) == jnp.sort(jax.jit(select_xla)(p_grp), axis=-1)
    row[f"{prefix}selection_rows_differing"] = float(1.0 - same.all(-1).mean())   # near-ties only
    if cfg.selection == "token":
        slc = lambda q, k, v: ops.selected_attention_sparse(q, k, v, pos, pos, idx, cfg, **kw)  # noqa: E731
    else:
        meta = jax.jit(lambda i: selection.union_metadata(i, pos, pos, block_size=cfg.sel_block,
                                                            query_block=cfg.query_block))(idx)
        slc = lambda q, k, v: block_sparse_attention(q, k, v, meta, mask_fn=P.Causal(), q_positions=pos,  # noqa: E731
                                                     kv_positions=pos, **kw)
    win = lambda q, k, v: ops.window_attention(q, k, v, pos, pos, window=cfg.window, **kw)  # noqa: E731
    row[f"{prefix}selection_fwd_ms"] = 1e3 * median_time(select, *sel_args, iters=iters)
    if ops.selects_on_kernels(s.impl, s.interpret, cfg):
        sweep_selection(s, cfg, sel_args, pos, cpos, ns, iters, row, prefix)
    timed = [("compressed", lambda *a: cmp(*a)[0], "k_cmp", "v_cmp"),
             ("selected", slc, "k_slc", "v_slc"), ("window", win, "k_win", "v_win")]
    if FLAGS.cmp_triton and ops.selects_on_kernels(s.impl, s.interpret, cfg):
        cmp_triton = lambda q, k, v: ops.compressed_branch_lse(q, k, v, pos, cpos, impl="triton",  # noqa: E731
                                                               interpret=s.interpret)[0]
        timed.append(("compressed_triton", cmp_triton, "k_cmp", "v_cmp"))
    for name, f, k, v in timed:
        row[f"{prefix}{name}_fwd_ms"] = 1e3 * median_time(jax.jit(f), q, x[k], x[v], iters=iters)
        if FLAGS.backward:
            row[f"{prefix}{name}_fwdbwd_ms"] = 1e3 * median_time(fwd_bwd_all(f, 3), q, x[k], x[v],
                                                                 x["do"], iters=iters)
    if cfg.selection == "token" and FLAGS.slc_impls:
        time_selected_impls(s, cfg, x, idx, iters, row, prefix)


def time_selected_impls(s: Setup, cfg, x, idx, iters, row, prefix):
    """The selected branch on each --slc_impls backend (same selection `idx`): fwd and f+b
    ms and TFLOP/s, counting every listed key (`4 B T H n l' D` forward, 3.5x that for
    f+b: 7 matmuls to 2; no causal discount, the convention of the issue's 137 TFLOP/s).

    "mosaic_gpu_split" is the Mosaic GPU forward with `MosaicGPUConfig(split_kv=True)`
    (its backward is the same Triton one: forward only). With mosaic_gpu among them, also
    its XLA union build alone and the mean union size per chunk of `2 * 64 / G` tokens (the
    blocks each of its 64-row tiles walks: n when the chunk's tokens agree, up to `chunk *
    n` when they share nothing; `_union_blocks_split`: chunks of `64 / G`), and the forward
    of every impl on the "shared" selection (each token takes the list of its chunk's first
    token: unions of exactly n blocks, the Mosaic kernel's best case; rows
    `<prefix>selected_shared_<impl>_fwd_ms` / `_fwd_tflops`)."""
    from pallas_kernels.token_sparse import layout, token_sparse_attention  # noqa: PLC0415
    from pallas_kernels.token_sparse.api import MosaicGPUConfig  # noqa: PLC0415

    q, pos = x["q"], x["pos"]
    b, t, h, d = q.shape
    fwd_flop = 4 * b * t * h * cfg.num_selected * cfg.sel_block * d
    chunk = 2 * 64 // max(1, h // s.hkv)
    variants = [("", idx, FLAGS.backward)]
    if {"mosaic_gpu", "mosaic_gpu_split"} & set(FLAGS.slc_impls):
        variants.append(("shared_", idx[:, (jnp.arange(t) // chunk) * chunk], False))
        nblk = -(-x["k_slc"].shape[1] // cfg.sel_block)
        union = jax.jit(lambda i: layout.union_blocks(i, pos[:, :i.shape[1]], nblk, chunk))
        tp = t - t % chunk                  # whole chunks (the kernel pads T; timing only)
        if tp:
            row[f"{prefix}selected_mosaic_gpu_union_ms"] = 1e3 * median_time(union, idx[:, :tp], iters=iters)
            row[f"{prefix}selected_mosaic_gpu_union_blocks"] = float(jnp.mean(union(idx[:, :tp])[2]))
            half = layout.union_blocks(idx[:, :tp], pos[:, :tp], nblk, chunk // 2)[2]
            row[f"{prefix}selected_mosaic_gpu_union_blocks_split"] = float(jnp.mean(half))

    def branch(impl, sel):
        if impl == "mosaic_gpu_split":
            return lambda q, k, v: token_sparse_attention(  # noqa: E731
                q, k, v, sel, block_size=cfg.sel_block, q_positions=pos, kv_positions=pos, causal=True,
                impl="mosaic_gpu", interpret=s.interpret, config=MosaicGPUConfig(split_kv=True))
        return lambda q, k, v: ops.selected_attention_sparse(  # noqa: E731
            q, k, v, pos, pos, sel, cfg, impl=impl, interpret=s.interpret)
    for variant, sel, backward in variants:
        first = None                              # the first impl's output: the others' check
        for impl in FLAGS.slc_impls:
            p = f"{prefix}selected_{variant}{impl}_"
            f = branch(impl, sel)
            try:
                row[p + "fwd_ms"] = 1e3 * median_time(jax.jit(f), q, x["k_slc"], x["v_slc"], iters=iters)
                row[p + "fwd_tflops"] = fwd_flop / row[p + "fwd_ms"] * 1e-9
                out = jax.jit(f)(q, x["k_slc"], x["v_slc"])
                if first is None:
                    first = out
                else:
                    row[p + f"err_vs_{FLAGS.slc_impls[0]}"] = rel(out, first)
                if backward and impl != "mosaic_gpu_split":
                    row[p + "fwdbwd_ms"] = 1e3 * median_time(fwd_bwd_all(f, 3), q, x["k_slc"], x["v_slc"],
                                                             x["do"], iters=iters)
                    row[p + "fwdbwd_tflops"] = 3.5 * fwd_flop / row[p + "fwdbwd_ms"] * 1e-9
            except Exception as e:  # noqa: BLE001 - an impl that cannot run: report, go on
                row[p + "error"] = str(e)[:500]
                print(f"selected branch impl={impl} T={t} failed: {str(e)[:500]}", flush=True)


def time_cmp_select(s: Setup, x, iters, row):
    """--cmp_select: the compressed branch and the selection, old (`compressed_branch_lse` then
    `select_from_lse`; each part alone too) vs fused (`compressed_select_fused`: the pooled
    flash kernel, then the top-n kernel; the pooled kernel alone too, with and without its
    sweep-1 ping-pong, `use_schedule_barrier`), forward ms, and
    forward + backward of the branch output (the same flash backward on both); the fused
    output's relative error and the fraction of (query, kv head) rows whose selected sets
    differ (near-ties only). On hardware the fused kernel does not take, its reason."""
    q, pos, cpos, kv = x["q"], x["pos"], x["cmp_positions"], (x["k_cmp"], x["v_cmp"])
    cfg = s.cfg
    ns = -(-q.shape[1] // cfg.sel_block)
    kw = dict(impl=s.impl, interpret=s.interpret)

    def old(q, k, v):
        o, lse = ops.compressed_branch_lse(q, k, v, pos, cpos, **kw)
        return o, ops.select_from_lse(q, k, lse, pos, cpos, ns, cfg, **kw)

    def fused(q, k, v):
        return ops.compressed_select_fused(q, k, v, pos, cpos, ns, cfg)

    _, lse = jax.jit(lambda q, k, v: ops.compressed_branch_lse(q, k, v, pos, cpos, **kw))(q, *kv)
    parts = dict(old=old, old_compressed=lambda q, k, v: ops.compressed_branch_lse(q, k, v, pos, cpos, **kw),
                 old_selection=lambda q, k, v: ops.select_from_lse(q, k, lse, pos, cpos, ns, cfg, **kw))
    reason = ops.fused_cmp_select_reason(q, *kv, pos, cpos, ns, cfg, **kw)
    row["cmp_select_fused_reason"] = reason
    if reason is None:
        r, offsets = overlap_weights(cmp_block=cfg.cmp_block, cmp_stride=cfg.cmp_stride,
                                     sel_block=cfg.sel_block)
        kernel = lambda q, k, v, ping_pong=True: flash_pooled_mosaic_gpu(  # noqa: E731
            q, k, v, mask_fn=P.Causal(), kv_positions=cpos, pool_keys=r, pool_offsets=offsets,
            pool_blocks=ns, config=MosaicGPUConfig(use_schedule_barrier=ping_pong))
        parts.update(fused=fused, fused_kernel=kernel,
                     fused_kernel_no_ping_pong=lambda q, k, v: kernel(q, k, v, ping_pong=False))
    for name, f in parts.items():
        row[f"cmp_select_{name}_fwd_ms"] = 1e3 * median_time(jax.jit(f), q, *kv, iters=iters)
    if reason is None:
        o_old, i_old = jax.jit(old)(q, *kv)
        o_new, i_new = jax.jit(fused)(q, *kv)
        row["cmp_select_out_err"] = rel(o_new, o_old)
        same = jnp.sort(i_new, axis=-1) == jnp.sort(i_old, axis=-1)
        row["cmp_select_rows_differing"] = float(1.0 - same.all(-1).mean())
    if FLAGS.backward:
        for name in ("old", "fused") if reason is None else ("old",):
            f = lambda q, k, v, f=parts[name]: f(q, k, v)[0]   # noqa: E731
            row[f"cmp_select_{name}_fwdbwd_ms"] = 1e3 * median_time(fwd_bwd_all(f, 3), q, *kv, x["do"],
                                                                     iters=iters)


def sweep_selection(s: Setup, cfg, sel_args, pos, cpos, ns, iters, row, prefix):
    """Time `nsa_select`'s kernels under each --select_configs entry (tile sizes to tune)."""
    for spec in FLAGS.select_configs:
        bq, bk, warps, topn = (int(v) for v in spec.split(":"))
        kc = NsaSelectConfig(block_q=bq, block_k=bk, num_warps=warps, topn_elements=topn)
        f = jax.jit(lambda q, k, lse, kc=kc: nsa_select(
            q, k, lse, pos, cpos, num_sel_blocks=ns, cmp_block=cfg.cmp_block, cmp_stride=cfg.cmp_stride,
            sel_block=cfg.sel_block, num_selected=cfg.num_selected, num_initial=cfg.num_initial,
            num_local=cfg.num_local, scale=sel_args[0].shape[-1] ** -0.5, impl="triton",
            interpret=s.interpret, config=kc))
        try:
            row[f"{prefix}selection_{spec}_fwd_ms"] = 1e3 * median_time(f, *sel_args, iters=iters)
        except Exception as e:  # noqa: BLE001 - a config that does not compile: report, go on
            row[f"{prefix}selection_{spec}_error"] = str(e)[:300]


def bench_prefill(s: Setup, t: int, iters: int):
    x = make_inputs(s, 1, t)
    args = [x["q"]] + [x[n] for n in KV]
    row = dict(kind="prefill", t=t, h=s.h, hkv=s.hkv, d=s.d, cfg=dataclasses.asdict(s.cfg))
    if FLAGS.cmp_select:
        time_cmp_select(s, x, iters, row)
        print(json.dumps(row), flush=True)
        return row
    if FLAGS.slc_only:
        cfg = dataclasses.replace(s.cfg, selection="token")
        sel = jax.jit(lambda *a: ops.nsa_branches(
            a[0], x["pos"], k_cmp=a[1], v_cmp=a[2], cmp_positions=x["cmp_positions"], k_slc=a[3],
            v_slc=a[4], slc_positions=x["pos"], k_win=a[5], v_win=a[6], win_positions=x["pos"], cfg=cfg,
            impl=s.impl, interpret=s.interpret).block_indices)
        time_selected_impls(s, cfg, x, sel(*args), iters, row, "token_")
        print(json.dumps(row), flush=True)
        return row
    f = dense(s)
    row["dense_fwd_ms"] = 1e3 * median_time(jax.jit(f), x["q"], x["k_slc"], x["v_slc"], iters=iters)
    if FLAGS.backward:
        row["dense_fwdbwd_ms"] = 1e3 * median_time(fwd_bwd_all(f, 3), x["q"], x["k_slc"], x["v_slc"],
                                                   x["do"], iters=iters)
    for mode in FLAGS.modes:
        cfg = dataclasses.replace(s.cfg, selection=mode)
        p = f"{mode}_"
        try:
            row[f"{p}err_ref"] = check_nsa(s, cfg, x, min(FLAGS.check_rows, t))
            g = nsa_fn(s, cfg, x)
            row[f"{p}fwd_ms"] = 1e3 * median_time(jax.jit(g), *args, iters=iters)
            row[f"{p}fwd_ratio"] = row["dense_fwd_ms"] / row[f"{p}fwd_ms"]
            if FLAGS.backward:
                row[f"{p}fwdbwd_ms"] = 1e3 * median_time(fwd_bwd_all(g, 7), *args, x["do"], iters=iters)
                row[f"{p}fwdbwd_ratio"] = row["dense_fwdbwd_ms"] / row[f"{p}fwdbwd_ms"]
            if FLAGS.branches:
                time_branches(s, cfg, x, iters, row, p)
        except Exception as e:  # noqa: BLE001 - report and go on with the other modes
            row[f"{p}error"] = str(e)[:1000]
            print(f"NSA {mode} T={t} failed: {str(e)[:1000]}", flush=True)
    if not FLAGS.small:
        from peers import fla_parallel_nsa_ms  # noqa: PLC0415 (experiments/ is on the path)

        peer = fla_parallel_nsa_ms(t, s.h, s.hkv, s.d, block_size=s.cfg.sel_block,
                                   block_counts=s.cfg.num_selected, window=s.cfg.window,
                                   iters=iters, backward=FLAGS.backward)
        row.update(peer or {})
    print(json.dumps(row), flush=True)
    return row


def amortised_ms(f, args, iters: int) -> float:
    """ms per step of `--decode_reps` steps of `f(q, *args[1:])` in one jitted program, each
    on its own query tied to the previous step's output by an optimization barrier (launch
    and host overhead amortised as in a serving loop: `bench_decode.py`'s method; the
    per-call `*_ms` figures include the host's dispatch and sync)."""
    reps, q = FLAGS.decode_reps, args[0]
    qs = jax.random.normal(jax.random.key(1), (reps, *q.shape), q.dtype)

    def run(qs, *rest):
        # Every step's output is returned (one element each): the barriers alone let XLA drop
        # the steps whose outputs fed only a barrier (an H200 run read 13 TB/s for dense decode).
        prev, firsts = None, []
        for i in range(reps):
            qi = qs[i] if prev is None else jax.lax.optimization_barrier((qs[i], prev))[0]
            prev = f(qi, *rest)
            firsts.append(jax.tree.leaves(prev)[0].ravel()[0])
        return prev, jnp.stack(firsts)

    return 1e3 * median_time(jax.jit(run), qs, *args[1:], iters=iters) / reps


def decode_case(s: Setup, b: int, ctx: int):
    """One decode step at position ctx-1 over a cache of ctx tokens (batch b): `(cfg, args)`,
    args `(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, qpos, cpos, pos, win_pos)` as
    `decode_step`'s functions take them (a rolling window of the last w tokens)."""
    x = make_inputs(s, b, ctx, tq=1)
    cfg = dataclasses.replace(s.cfg, selection="token")
    w = cfg.window
    return cfg, (x["q"], x["k_cmp"], x["v_cmp"], x["k_slc"], x["v_slc"], x["k_win"][:, -w:], x["v_win"][:, -w:],
                 x["pos"][:, -1:], x["cmp_positions"], x["pos"], x["pos"][:, -w:])


def decode_step(cfg, impl, interpret, config=None, indices_only=False):
    """Jitted `f(*decode_case args)`: the summed branch outputs of `nsa_decode_branches`
    (`config` None) or of the Triton plan `config`; `indices_only`: that plan's selected
    blocks. Positions are arguments: no HLO constants."""
    def f(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, qpos, cpos, pos, win_pos):
        kw = dict(k_cmp=k_cmp, v_cmp=v_cmp, cmp_positions=cpos, k_slc=k_slc, v_slc=v_slc,
                  slc_positions=pos, k_win=k_win, v_win=v_win, win_positions=win_pos)
        if indices_only:
            return nsa_decode(q, qpos, cfg=cfg, impl="triton", config=config, interpret=interpret, **kw)[3]
        if config is None:
            out = ops.nsa_decode_branches(q, qpos, impl=impl, interpret=interpret, cfg=cfg, **kw)
            outs = (out.cmp, out.slc, out.win)
        else:
            outs = nsa_decode(q, qpos, cfg=cfg, impl="triton", config=config,   # scale 1/sqrt(d)
                              interpret=interpret, **kw)[:3]
        return (outs[0].astype(jnp.float32) + outs[1] + outs[2]).astype(q.dtype)
    return jax.jit(f)


def dense_decode_step(s: Setup):
    """Jitted dense `decode_attention` over the whole raw cache, on `decode_case` args."""
    def f(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, qpos, cpos, pos, win_pos):
        del k_cmp, v_cmp, k_win, v_win, cpos, win_pos
        return decode_attention(q, k_slc, v_slc, kv_positions=pos, q_positions=qpos, impl=s.impl,
                                interpret=s.interpret)
    return jax.jit(f)


def bench_decode(s: Setup, b: int, ctx: int, iters: int):
    """One decode step at position ctx-1 over a cache of ctx tokens (batch b)."""
    cfg, args = decode_case(s, b, ctx)
    w = cfg.window
    step = functools.partial(decode_step, cfg)
    indices = lambda config: step(s.impl, s.interpret, config, indices_only=True)   # noqa: E731

    def first_launches(config, k):              # the plan's first k kernels only (per-kernel timing)
        def f(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, qpos, cpos, pos, win_pos):
            return nsa_decode_triton(q, qpos, k_cmp=k_cmp, v_cmp=v_cmp, cmp_positions=cpos, k_slc=k_slc,
                                     v_slc=v_slc, slc_positions=pos, k_win=k_win, v_win=v_win,
                                     win_positions=win_pos, cfg=cfg, scale=q.shape[-1] ** -0.5,
                                     interpret=s.interpret, config=config, stop_after=k)
        return jax.jit(f)

    row = dict(kind="decode", batch=b, context=ctx, h=s.h, hkv=s.hkv, d=s.d)
    want = step("xla", False)(*args)
    row["err_ref"] = rel(step(s.impl, s.interpret)(*args), want)
    row["nsa_ms"] = 1e3 * median_time(step(s.impl, s.interpret), *args, iters=iters)
    if FLAGS.decode_reps:
        row["nsa_amortised_ms"] = amortised_ms(step(s.impl, s.interpret), args, iters)
    row["dense_ms"] = 1e3 * median_time(dense_decode_step(s), *args, iters=iters)
    row["ratio"] = row["dense_ms"] / row["nsa_ms"]
    if FLAGS.decode_reps:
        row["dense_amortised_ms"] = amortised_ms(dense_decode_step(s), args, iters)
        row["ratio_amortised"] = row["dense_amortised_ms"] / row["nsa_amortised_ms"]
    print(json.dumps(row), flush=True)                 # progress: default plan and dense
    default_idx = None
    for spec in FLAGS.decode_configs:       # nsa_decode Triton launch plans
        try:
            fields = spec.split(":")
            if len(fields) not in (5, 6) or fields[5:] not in ([], ["sel"]):
                raise ValueError(f"decode config {spec!r}: want c:p:block_cmp:stages:warps[:sel]")
            c, p, bc, st, nw = (int(v) for v in fields[:5])
            conf = NsaDecodeConfig(cmp_splits=c, tail_splits=p, block_cmp=bc, num_stages=st, num_warps=nw,
                                   select_kernel=fields[5:] == ["sel"])
            f = step(s.impl, s.interpret, conf)
            row[f"nsa_{spec}_err_ref"] = rel(f(*args), want)
            # (b, kv head) rows whose selected set equals the default plan's (near-ties aside: 1.0)
            default_idx = default_idx if default_idx is not None else jnp.sort(indices(NsaDecodeConfig())(*args), -1)
            same = jnp.sort(indices(conf)(*args), -1) == default_idx
            row[f"nsa_{spec}_same_selection"] = float(same.all(-1).mean())
            row[f"nsa_{spec}_ms"] = 1e3 * median_time(f, *args, iters=iters)
            if FLAGS.decode_reps:
                row[f"nsa_{spec}_amortised_ms"] = amortised_ms(f, args, iters)
            q, k_cmp, _, k_slc, _, k_win = args[:6]   # the split count as clamped to the context
            several = make_plan(q, k_cmp, k_slc, k_win, cfg, conf, q.shape[-1] ** -0.5).splits > 1
            for k in (1, 2) if FLAGS.decode_stages and FLAGS.decode_reps and (several or conf.select_kernel) else ():
                row[f"nsa_{spec}_k{'12'[:k]}_ms"] = amortised_ms(first_launches(conf, k), args, iters)
        except Exception as e:  # noqa: BLE001 - a plan that fails is reported, not fatal
            row[f"nsa_{spec}_error"] = str(e)[:300]
        print(json.dumps({k: v for k, v in row.items() if k.startswith(f"nsa_{spec}_")}), flush=True)  # progress
    row["nsa_tokens_read"] = must_read_tokens(cfg, args)
    row["dense_tokens_read"] = ctx
    print(json.dumps(row), flush=True)
    return row


def must_read_tokens(cfg, args) -> int:
    """Tokens a decode step must read per (row, kv head): the compressed entries, the
    `n * l'` selected and the `w` window tokens (`decode_case` args)."""
    return args[1].shape[1] + cfg.num_selected * cfg.sel_block + args[5].shape[1]


def bench_decode_plans(s: Setup, b: int, ctx: int, iters: int):
    """--decode_one_launch: the decode step per plan (`PLANS`: the default split plan, the
    three-kernel plan, the one-launch plan) against dense decode, batch b at ctx, amortised
    (`--decode_reps` steps in one program) and per call; bytes/s on the must-read bytes
    (K and V of `must_read_tokens`), ratio = dense / plan (amortised), the plan's selection
    against the default's and its error against the XLA reference."""
    unknown = set(FLAGS.decode_plans) - set(PLANS)
    if unknown:
        raise ValueError(f"--decode_plans: unknown {sorted(unknown)}, pick from {list(PLANS)}")
    cfg, args = decode_case(s, b, ctx)
    reps = FLAGS.decode_reps or 1
    amortised = (lambda f: amortised_ms(f, args, iters)) if FLAGS.decode_reps else (  # noqa: E731
        lambda f: 1e3 * median_time(f, *args, iters=iters))
    k = args[1]
    must_read = b * k.shape[2] * k.shape[3] * 2 * k.dtype.itemsize * must_read_tokens(cfg, args)
    row = dict(kind="decode_plans", batch=b, context=ctx, h=s.h, hkv=s.hkv, d=s.d, reps=reps,
               must_read_mb=must_read / 1e6, dense_ms=amortised(dense_decode_step(s)))
    want = decode_step(cfg, "xla", False)(*args)
    idx = {}                                  # each plan's selection, sorted (one more compile each)
    for name in FLAGS.decode_plans:
        conf = PLANS[name]
        try:
            f = decode_step(cfg, s.impl, s.interpret, conf)
            row[f"{name}_err_ref"] = rel(f(*args), want)
            for p in {name, "split"} - set(idx):
                idx[p] = jnp.sort(decode_step(cfg, s.impl, s.interpret, PLANS[p], indices_only=True)(*args), -1)
            row[f"{name}_same_selection"] = float((idx[name] == idx["split"]).all(-1).mean())
            row[f"{name}_call_ms"] = 1e3 * median_time(f, *args, iters=iters)
            row[f"{name}_ms"] = amortised(f)
            row[f"{name}_gbps"] = must_read / row[f"{name}_ms"] / 1e6
            row[f"{name}_ratio"] = row["dense_ms"] / row[f"{name}_ms"]
        except Exception as e:  # noqa: BLE001 - a plan that fails is reported, not fatal
            row[f"{name}_error"] = str(e)[:300]
    print(json.dumps(row), flush=True)
    return row


PLANS = dict(split=NsaDecodeConfig(), three_kernel=NsaDecodeConfig(select_kernel=True),
             one_launch=NsaDecodeConfig(one_launch=True))


def plans_table(rows) -> str:
    fmt = lambda r, k, spec=".4f": format(r[k], spec) if k in r else "n/a"  # noqa: E731
    lines = ["| B | context | plan | ms / step (amortised) | ms per call | GB/s on must-read | "
             "ratio to dense | dense ms | err ref | same selection | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for p in FLAGS.decode_plans:
            lines.append(f"| {r['batch']} | {r['context']} | {p} | {fmt(r, p + '_ms')} | {fmt(r, p + '_call_ms')} | "
                         f"{fmt(r, p + '_gbps', '.0f')} | {fmt(r, p + '_ratio', '.2f')} | {fmt(r, 'dense_ms')} | "
                         f"{fmt(r, p + '_err_ref', '.1e')} | {fmt(r, p + '_same_selection', '.3f')} | "
                         f"{r.get(p + '_error', '')} |")
    return "\n".join(lines)


def table(rows) -> str:
    fmt = lambda r, k, spec=".2f": format(r[k], spec) if k in r else "n/a"  # noqa: E731
    lines = ["| T | mode | fwd ms | cuDNN fwd ms | fwd ratio | f+b ms | cuDNN f+b ms | f+b ratio | "
             "cmp / sel / slc / win fwd ms | sel XLA fwd ms | cmp / slc / win f+b ms | err ref | "
             "fla-core fwd / f+b ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "decode" or "cmp_select_old_fwd_ms" in r:
            continue
        for m in FLAGS.modes:
            p = f"{m}_"
            br = " / ".join(fmt(r, f"{p}{n}_fwd_ms") for n in ("compressed", "selection", "selected", "window"))
            bb = " / ".join(fmt(r, f"{p}{n}_fwdbwd_ms") for n in ("compressed", "selected", "window"))
            lines.append(f"| {r['t']} | {m} | {fmt(r, p + 'fwd_ms')} | {fmt(r, 'dense_fwd_ms')} | "
                         f"{fmt(r, p + 'fwd_ratio')} | {fmt(r, p + 'fwdbwd_ms')} | "
                         f"{fmt(r, 'dense_fwdbwd_ms')} | {fmt(r, p + 'fwdbwd_ratio')} | {br} | "
                         f"{fmt(r, p + 'selection_xla_fwd_ms')} | {bb} | "
                         f"{fmt(r, p + 'err_ref', '.1e')} | "
                         f"{fmt(r, 'fla_fwd_ms')} / {fmt(r, 'fla_fwdbwd_ms')} |")
    cs = [r for r in rows if "cmp_select_old_fwd_ms" in r]
    if cs:
        lines += ["", "| T | cmp + sel fwd ms: two kernels (cmp / sel) | fused (pooled kernel alone) | "
                  "speedup | cmp out f+b ms: two kernels / fused | out err | rows differing |",
                  "|---|---|---|---|---|---|---|"]
        for r in cs:
            lines.append(f"| {r['t']} | {fmt(r, 'cmp_select_old_fwd_ms')} ({fmt(r, 'cmp_select_old_compressed_fwd_ms')}"
                         f" / {fmt(r, 'cmp_select_old_selection_fwd_ms')}) | {fmt(r, 'cmp_select_fused_fwd_ms')} "
                         f"({fmt(r, 'cmp_select_fused_kernel_fwd_ms')}) | "
                         + (f"{r['cmp_select_old_fwd_ms'] / r['cmp_select_fused_fwd_ms']:.2f}"
                            if "cmp_select_fused_fwd_ms" in r else "n/a")
                         + f" | {fmt(r, 'cmp_select_old_fwdbwd_ms')} / {fmt(r, 'cmp_select_fused_fwdbwd_ms')} | "
                         f"{fmt(r, 'cmp_select_out_err', '.1e')} | {fmt(r, 'cmp_select_rows_differing', '.1e')} "
                         f"{r.get('cmp_select_fused_reason') or ''} |")
    dec = [r for r in rows if r["kind"] == "decode"]
    if dec:
        lines += ["", "| decode batch | context | NSA step ms | dense step ms | ratio | amortised NSA / dense "
                  "ms | amortised ratio | tokens read NSA / dense | err ref |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in dec:
            lines.append(f"| {r['batch']} | {r['context']} | {r['nsa_ms']:.3f} | {r['dense_ms']:.3f} | "
                         f"{r['ratio']:.2f} | {fmt(r, 'nsa_amortised_ms', '.4f')} / "
                         f"{fmt(r, 'dense_amortised_ms', '.4f')} | {fmt(r, 'ratio_amortised')} | "
                         f"{r['nsa_tokens_read']} / {r['dense_tokens_read']} | {r['err_ref']:.1e} |")
        plans = [k[4:-3] for k in dec[0] if k.startswith("nsa_") and k.endswith("_ms") and k != "nsa_ms"
                 and not k.endswith(("amortised_ms", "_k1_ms", "_k12_ms"))]
        plans += [k[4:-6] for k in dec[0] if k.startswith("nsa_") and k.endswith("_error")]
        if plans:
            lines += ["", "| decode plan (--decode_configs) | ms | amortised ms | amortised: first kernel / "
                      "first two | err ref | same selection as default |", "|---|---|---|---|---|---|"]
            for r in dec:
                for p in plans:
                    lines.append(f"| {p} | {fmt(r, f'nsa_{p}_ms', '.4f')} | {fmt(r, f'nsa_{p}_amortised_ms', '.4f')} | "
                                 f"{fmt(r, f'nsa_{p}_k1_ms', '.4f')} / {fmt(r, f'nsa_{p}_k12_ms', '.4f')} | "
                                 f"{fmt(r, f'nsa_{p}_err_ref', '.1e')} | "
                                 f"{fmt(r, f'nsa_{p}_same_selection', '.3f')} {r.get(f'nsa_{p}_error', '')} |")
    return "\n".join(lines)


def main(argv):
    del argv
    s = SMALL if FLAGS.small else PAPER
    seq_lens = [96] if FLAGS.small else [int(x) for x in FLAGS.seq_lens]
    iters = 1 if FLAGS.small else FLAGS.iters
    info = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                date=time.strftime("%Y-%m-%d %H:%M:%S"), small=FLAGS.small)
    if FLAGS.decode_one_launch:
        ctx = 128 if FLAGS.small else FLAGS.decode_context
        rows = [bench_decode_plans(s, int(b), ctx, iters) for b in FLAGS.decode_one_launch]
        with open(FLAGS.out, "w") as fh:
            json.dump(dict(info=info, rows=rows), fh, indent=1)
        print(f"\n{info}\n\n{plans_table(rows)}")
        return
    rows = []
    for t in seq_lens:
        try:
            rows.append(bench_prefill(s, t, iters))
        except Exception as e:  # noqa: BLE001 - report and go on with the other lengths
            print(f"T={t} failed: {str(e)[:1000]}", flush=True)
    b, ctx = (2, 128) if FLAGS.small else (FLAGS.decode_batch, FLAGS.decode_context)
    if b > 0:
        try:
            rows.append(bench_decode(s, b, ctx, iters))
        except Exception as e:  # noqa: BLE001
            print(f"decode failed: {str(e)[:1000]}", flush=True)
    with open(FLAGS.out, "w") as fh:
        json.dump(dict(info=info, rows=rows), fh, indent=1)
    print(f"\n{info}\n\n{table(rows)}")


if __name__ == "__main__":
    from script_io import run  # noqa: PLC0415 (experiments/script_io.py: --help exits 0)
    run(main)
