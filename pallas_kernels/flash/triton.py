"""`flash` forward on GPU: Pallas with the Triton lowering (FlashAttention-2, arXiv 2307.08691).

One program per (query block, batch, head). It keeps `q [block_q, D]` on chip and streams
the KV blocks its row of the block table lists (`blocks.tables`): blocks `lo..flo-1` and
`fhi..hi-1` apply the element predicate (`mask_fn` on positions, segment ids, padding),
blocks `flo..fhi-1` are wholly visible and skip it; blocks outside `lo..hi-1` are never
read, so causal attention costs half. Online softmax in base 2; a learned sink logit
starts the running max and denominator (`m = sink, l = 1`), so it joins the denominator
only. GQA reads KV head `h // G` directly (never repeated in memory).

Layout `[B, T, H, D]` throughout; lengths are padded to whole blocks (positions -1, which
the predicate treats as padding) and sliced back. The backward pass is in `triton_vjp.py`.
HySparse block-max scores (`block_score_size`) are a separate specialisation of the same
kernel (`forward_scores`; see `scores.py`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash import autodiff, blocks, scores
from pallas_kernels.tiles_common import LOG2E, MASK_VALUE, NT, logits2


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Tile sizes and launch parameters (tuned on an H200 for D=128, bf16)."""

    block_q: int = 128
    block_k: int = 128
    num_warps: int = 8
    num_stages: int = 3
    block_q_dq: int = 64
    block_k_dq: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2
    # Block scores with a score block smaller than block_k: 0 shrinks the KV tile to the
    # score block; 1 keeps the tile and takes each sub-block's max by a masked reduction.
    score_split: int = 0


def padded_sizes(cfg: TritonConfig, tq: int, tk: int, d: int):
    bq = blocks.pow2_block(max(cfg.block_q, cfg.block_q_dq, cfg.block_q_dkv), tq)
    bk = blocks.pow2_block(max(cfg.block_k, cfg.block_k_dq, cfg.block_k_dkv), tk)
    return blocks.round_up(tq, bq), blocks.round_up(tk, bk), max(16, blocks.pl_next_pow2(d))


def fit_block(block: int, length: int) -> int:
    return blocks.pow2_block(block, length)


def pad_all(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    """Pad sequence axes to whole blocks and head dims to a power of two."""
    tq_p, tk_p, d_p = padded_sizes(st.config, q.shape[1], k.shape[1], q.shape[3])
    dv_p = max(16, blocks.pl_next_pow2(v.shape[3]))
    q = blocks.pad_axis(blocks.pad_axis(q, tq_p, 1), d_p, 3)
    k = blocks.pad_axis(blocks.pad_axis(k, tk_p, 1), d_p, 3)
    v = blocks.pad_axis(blocks.pad_axis(v, tk_p, 1), dv_p, 3)
    q_pos = blocks.pad_axis(q_pos, tq_p, 1, -1)
    kv_pos = blocks.pad_axis(kv_pos, tk_p, 1, -1)
    q_seg = blocks.pad_axis(q_seg, tq_p, 1, -1)
    kv_seg = blocks.pad_axis(kv_seg, tk_p, 1, -1)
    return q, k, v, q_pos, kv_pos, q_seg, kv_seg


def _fwd_kernel(tab_ref, sink_ref, qpos_ref, kpos_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref,
                o_ref, lse_ref, sc_ref=None, *, mask_fn, scale, softcap, block_k, num_q_blocks,
                score_r=1, score_sub=1):
    """`sc_ref` (score specialisation only): `[nS, block_q]` raw block-max logits (base 2)
    of score block `j // score_r` for KV tile `j` (or of blocks `j * score_sub + u` when a
    tile spans `score_sub` score blocks), written for the visited tiles only."""
    i = num_q_blocks - 1 - pl.program_id(0)   # heaviest (causal) query blocks first
    b, h = pl.program_id(1), pl.program_id(2)
    base = (b * num_q_blocks + i) * 4
    lo, flo, fhi, hi = (tab_ref[base + c] for c in range(4))
    q = q_ref[...]
    block_q = q.shape[0]
    qp = qpos_ref[...][:, None]
    qs = None if qseg_ref is None else qseg_ref[...][:, None]
    if sink_ref is not None:
        m0 = jnp.zeros((block_q,), jnp.float32) + sink_ref[h].astype(jnp.float32) * LOG2E
        l0 = jnp.ones((block_q,), jnp.float32)
    else:
        m0 = jnp.full((block_q,), MASK_VALUE, jnp.float32)
        l0 = jnp.zeros((block_q,), jnp.float32)
    acc0 = jnp.zeros((block_q, v_ref.shape[-1]), jnp.float32)
    track = sc_ref is not None and score_r > 1    # running block max across score_r tiles

    def step(j, carry, masked):
        m, l, acc, *bm = carry
        sl = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        k = k_ref[sl, :]
        s = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32)
        if softcap is None:
            c = scale * LOG2E        # scale folded into one FMA: exp2(s * c - m)
        else:
            s, c = logits2(s, scale, softcap)[0], 1.0
        if masked:
            ks = None if kseg_ref is None else kseg_ref[sl][None, :]
            vis = blocks.visible(mask_fn, qp, kpos_ref[sl][None, :], qs, ks)
            s = jnp.where(vis, s, MASK_VALUE)
        if sc_ref is not None and score_sub > 1:     # sub-block maxima, masked reductions
            sub_w = block_k // score_sub
            col = lax.broadcasted_iota(jnp.int32, s.shape, 1)
            sub_max = [jnp.where((col >= u * sub_w) & (col < (u + 1) * sub_w), s, MASK_VALUE)
                       .max(axis=-1) * c for u in range(score_sub)]
            s_max = functools.reduce(jnp.maximum, sub_max)
            for u in range(score_sub):
                sc_ref[pl.ds(j * score_sub + u, 1), :] = sub_max[u][None, :]
        else:
            s_max = s.max(axis=-1) * c
        m_new = jnp.maximum(m, s_max)
        if sc_ref is not None and score_sub == 1:    # HySparse Alg. 1: per-block row max
            col = j
            if track:   # lax.div, not `//` / `%`: see block_sparse (Triton rem lowering)
                col = lax.div(j, jnp.int32(score_r))
                first = (j == col * score_r) | (j == lo)
                s_max = jnp.where(first, s_max, jnp.maximum(bm[0], s_max))
                bm = [s_max]
            sc_ref[pl.ds(col, 1), :] = s_max[None, :]
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s * c - m_new[:, None])
        if masked:
            p = jnp.where(vis, p, 0.0)
        l = l * alpha + p.sum(axis=-1)
        v = v_ref[sl, :]
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
        return (m_new, l, acc * alpha[:, None] + pv, *bm)

    carry = (m0, l0, acc0) + ((jnp.full((block_q,), MASK_VALUE, jnp.float32),) if track else ())
    carry = lax.fori_loop(lo, flo, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(flo, fhi, functools.partial(step, masked=False), carry)
    m, l, acc, *_ = lax.fori_loop(fhi, hi, functools.partial(step, masked=True), carry)
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, (m + jnp.log2(l_safe)) * (1.0 / LOG2E), -jnp.inf)


def forward(st, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg):
    """Unpadded `[B, T, H, D]` in, `(out [B, Tq, H, Dv], lse [B, H, Tq])` out."""
    return _forward(st, None, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg)


def score_tile(block_k: int, size: int) -> int:
    """KV tile of the score specialisation: the kernel's tile if it divides `size`, else the
    largest power of two dividing `size` (so a score block is a whole number of tiles)."""
    tile = min(block_k, scores.lowbit(size))
    if tile < 16:
        raise ValueError(
            f"block_score_size={size} with impl='triton': must be a multiple of 16 (the "
            f"smallest Triton KV tile); the kernel's KV tile here is {block_k}")
    return tile


def forward_scores(st, spec, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg):
    """`forward` plus the HySparse block-max scores `[B, H, Tq, ceil(Tk/size)]` float32.

    The kernel writes, for the KV tiles it visits, the raw per-score-block row max of the
    logits (base 2) into `[B, H, nS, Tq_p]` (coalesced rows of `block_q`); one fused XLA pass
    rescales by the final lse, zeroes blocks never visited, and transposes."""
    return _forward(st, spec, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg)


def _forward(st, spec, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg):
    cfg: TritonConfig = st.config
    b, tq, h, d = q.shape
    tk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    group = h // hkv
    qp, kp, vp, q_pos_p, kv_pos_p, q_seg_p, kv_seg_p = pad_all(
        st, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    tq_p, tk_p = qp.shape[1], kp.shape[1]
    bq, bk = fit_block(cfg.block_q, tq), fit_block(cfg.block_k, tk)
    score_r = score_sub = 1
    if spec is not None:
        if cfg.score_split and spec.size < bk and bk % spec.size == 0 and spec.size >= 16:
            score_sub = bk // spec.size
        else:
            bk = score_tile(bk, spec.size)
            score_r = spec.size // bk
        n_score = scores.num_blocks(spec.size, tk)
        n_score_p = scores.num_blocks(spec.size, tk_p)
    nq = tq_p // bq
    tab = blocks.tables(st.mask_fn, q_pos_p, kv_pos_p, q_seg_p, kv_seg_p, bq, bk).reshape(-1)
    rev = lambda i: nq - 1 - i  # noqa: E731
    whole = pl.BlockSpec()
    seg_q = None if q_seg is None else pl.BlockSpec((None, bq), lambda i, b_, h_: (b_, rev(i)))
    seg_k = None if q_seg is None else pl.BlockSpec((None, tk_p), lambda i, b_, h_: (b_, 0))
    in_specs = [
        whole,
        None if sinks is None else whole,
        pl.BlockSpec((None, bq), lambda i, b_, h_: (b_, rev(i))),
        pl.BlockSpec((None, tk_p), lambda i, b_, h_: (b_, 0)),
        seg_q, seg_k,
        pl.BlockSpec((None, bq, None, qp.shape[3]), lambda i, b_, h_: (b_, rev(i), h_, 0)),
        pl.BlockSpec((None, tk_p, None, kp.shape[3]), lambda i, b_, h_: (b_, 0, h_ // group, 0)),
        pl.BlockSpec((None, tk_p, None, vp.shape[3]), lambda i, b_, h_: (b_, 0, h_ // group, 0)),
    ]
    out_specs = [
        pl.BlockSpec((None, bq, None, vp.shape[3]), lambda i, b_, h_: (b_, rev(i), h_, 0)),
        pl.BlockSpec((None, None, bq), lambda i, b_, h_: (b_, h_, rev(i))),
    ]
    out_shape = [jax.ShapeDtypeStruct((b, tq_p, h, vp.shape[3]), q.dtype),
                 jax.ShapeDtypeStruct((b, h, tq_p), jnp.float32)]
    if spec is not None:
        out_specs.append(pl.BlockSpec((None, None, n_score_p, bq), lambda i, b_, h_: (b_, h_, 0, rev(i))))
        out_shape.append(jax.ShapeDtypeStruct((b, h, n_score_p, tq_p), jnp.float32))
    kernel = functools.partial(_fwd_kernel, mask_fn=st.mask_fn, scale=st.scale,
                               softcap=st.softcap, block_k=bk, num_q_blocks=nq, score_r=score_r,
                               score_sub=score_sub)
    res = pl.pallas_call(
        kernel,
        grid=(nq, b, h),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=st.interpret,
        name="flash_fwd" if spec is None else "flash_fwd_block_scores",
    )(tab, sinks, q_pos_p, kv_pos_p, q_seg_p, kv_seg_p, qp, kp, vp)
    out, lse = res[0][:, :tq, :, :dv], res[1][:, :, :tq]
    if spec is None:
        return out, lse
    # Score block j (keys j*size ..) was written iff it overlaps the query block's visited
    # KV tiles [lo, hi) (tiles outside it hold no visible key).
    ranges = jnp.repeat(tab.reshape(b, nq, 4), bq, axis=1)[:, :tq] * bk       # [B, Tq, 4] keys
    j = jnp.arange(n_score, dtype=jnp.int32) * spec.size
    visited = (j < ranges[:, :, 3:4]) & (j + spec.size > ranges[:, :, 0:1])     # [B, Tq, nS]
    raw = res[2][:, :, :n_score, :tq].swapaxes(2, 3)
    return out, lse, scores.rescale(raw, lse, visited[:, None])


def flash_triton(q, k, v, *, mask_fn, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                 sink_logits, softcap, scale, return_lse, block_score_size,
                 block_score_reduce_gqa, interpret=False, config: TritonConfig | None = None):
    """`flash_reference`'s contract on the Triton kernels (`interpret=True`: CPU)."""
    from pallas_kernels.flash import triton_vjp  # noqa: PLC0415 - keeps the fwd file standalone

    st = autodiff.Static(forward=forward, backward=triton_vjp.backward, mask_fn=mask_fn,
                         scale=float(scale), softcap=None if softcap is None else float(softcap),
                         has_sinks=sink_logits is not None, config=config or TritonConfig(),
                         interpret=bool(interpret))
    if block_score_size is not None:
        score_tile(fit_block(st.config.block_k, k.shape[1]), int(block_score_size))  # eager check
        spec = scores.ScoreSpec(int(block_score_size), bool(block_score_reduce_gqa), forward_scores)
        return scores.attention_with_scores(
            st, spec, q, k, v, sink_logits=sink_logits, q_positions=q_positions,
            kv_positions=kv_positions, q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids, return_lse=return_lse)
    return autodiff.attention(st, q, k, v, sink_logits=sink_logits, q_positions=q_positions,
                              kv_positions=kv_positions, q_segment_ids=q_segment_ids,
                              kv_segment_ids=kv_segment_ids, return_lse=return_lse)


# Backend declaration for `pallas_kernels.common.resolve`: a GPU (or interpret mode); every
# call the api accepts; tiles `TritonConfig`.
CONFIG = TritonConfig
