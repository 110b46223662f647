"""`block_sparse` forward on GPU: Pallas with the Triton lowering.

FlashAttention-2 (arXiv 2307.08691) over a block list: one program per (query tile,
batch, GQA head group). A program stacks `heads_per_program` query heads of one KV head
as rows (`[bq, hp, D] -> [bq * hp, D]`), so every KV block it loads serves the whole
group (KV never repeated, and read once per group rather than once per head). It visits
only the KV blocks its metadata row lists (`plan.kernel_tables`): the full ones first
without the element predicate, then the partial ones with it (`mask_fn` on positions,
segment ids, padding). Online softmax in base 2 and the sink logit as the initial running
max, as in `flash.triton`.

Kernel tiles divide the metadata blocks: a metadata query block of 128 may be served by
programs of 32 query positions x 4 heads, and a listed KV block of 128 by two 64-key
tiles. Lengths are padded to whole metadata blocks (positions -1) and sliced back. The
backward pass is in `triton_vjp.py`; the custom_vjp wiring is `flash.autodiff`'s.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.block_sparse import plan
from pallas_kernels.block_sparse.plan import masked_visible
from pallas_kernels.flash import autodiff, blocks
from pallas_kernels.tiles_common import LOG2E, MASK_VALUE, NT, logits2


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Tiles (each capped to, and dividing, the metadata blocks) and launch parameters.

    `block_rows`: query rows per program (query positions x stacked GQA heads);
    `max_heads_per_program`: how many heads of a group to stack (1 = one head per program).
    """

    block_rows: int = 128
    block_k: int = 128
    max_heads_per_program: int = 16
    num_warps: int = 8
    num_stages: int = 3
    block_rows_dq: int = 64
    block_k_dq: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2


def heads_per_program(group: int, rows: int, cap: int) -> int:
    """Largest power of two dividing G and <= cap, keeping >= 16 query positions per program."""
    hp = 1
    while group % (hp * 2) == 0 and hp * 2 <= min(cap, max(rows // 16, 1)):
        hp *= 2
    return hp


def q_tiles(geo: plan.Geometry, rows: int, cap: int):
    """(heads per program, query positions per program) for `rows` target rows."""
    hp = heads_per_program(geo.group, rows, cap)
    bq = plan.pow2_tile(max(rows // hp, 1), geo.block_q, "block_q")
    if bq * hp < 16:
        raise ValueError(f"block_sparse triton: metadata block_q={geo.block_q} gives {bq} query "
                         f"rows x {hp} heads per program; Triton needs >= 16 rows")
    return hp, bq


def head_view(x, hp):
    """`[B, T, H, D] -> [B, T, H // hp, hp, D]` (free reshape)."""
    b, t, h = x.shape[:3]
    return x.reshape(b, t, h // hp, hp, *x.shape[3:])


def head_dim(hp):
    """Block dim of the stacked-heads axis: squeezed when one head per program."""
    return None if hp == 1 else hp


def stack_rows(x, hp):
    """`[bq, hp, ...] -> [bq * hp, ...]` (rows t * hp + g); identity for hp == 1."""
    return x if hp == 1 else x.reshape(x.shape[0] * hp, *x.shape[2:])


def row_column(vec, hp):
    """Per-position `[bq]` -> per-row column `[bq * hp, 1]`."""
    if hp == 1:
        return vec[:, None]
    return jnp.broadcast_to(vec[:, None], (vec.shape[0], hp)).reshape(vec.shape[0] * hp, 1)


def meta_row(geo: plan.Geometry, b, kv_head, block):
    m_head = kv_head if geo.meta_heads > 1 else 0
    return (b * geo.meta_heads + m_head) * geo.nq + block


def pad_inputs(geo: plan.Geometry, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    """Pad sequences to whole metadata blocks (positions and segments -1), head dims to a
    power of two >= 16."""
    tq_p, tk_p = geo.nq * geo.block_q, geo.nk * geo.block_kv
    d_p = max(16, blocks.pl_next_pow2(q.shape[3]))
    dv_p = max(16, blocks.pl_next_pow2(v.shape[3]))
    q = blocks.pad_axis(blocks.pad_axis(q, tq_p, 1), d_p, 3)
    k = blocks.pad_axis(blocks.pad_axis(k, tk_p, 1), d_p, 3)
    v = blocks.pad_axis(blocks.pad_axis(v, tk_p, 1), dv_p, 3)
    pad = lambda x, t: blocks.pad_axis(x, t, 1, -1)  # noqa: E731
    return q, k, v, pad(q_pos, tq_p), pad(kv_pos, tk_p), pad(q_seg, tq_p), pad(kv_seg, tk_p)


def runs(cnt_ref, row):
    """`(0, end_full, end_padded, n_valid)` of a table row: the three loops' bounds."""
    return (0,) + tuple(cnt_ref[row * 3 + c] for c in range(3))


def three_loops(step, bounds, sub, carry):
    """Run `step(t, carry, mode)` over the full, padded-full and partial runs of a row."""
    for mode, lo, hi in zip((None, "pad", "mask"), bounds[:-1], bounds[1:]):
        carry = lax.fori_loop(lo * sub, hi * sub, functools.partial(step, mode=mode), carry)
    return carry


def kv_slice(idx_ref, base, t, sub, block_kv, block_k):
    """Slot `t // sub` of the row, tile `t % sub` inside that metadata KV block."""
    if sub == 1:
        n, r = t, 0
    else:   # no `%`: the Triton lowering of rem on a loop index fails (i32 vs i1)
        n = lax.div(t, jnp.int32(sub))
        r = t - n * sub
    start = idx_ref[base + n] * block_kv + r * block_k
    return pl.ds(pl.multiple_of(start, block_k), block_k)


def _fwd_kernel(idx_ref, cnt_ref, sink_ref, qpos_ref, kpos_ref, qseg_ref, kseg_ref, q_ref, k_ref,
                v_ref, o_ref, lse_ref, *, geo, mask_fn, scale, softcap, hp, block_k, q_per_meta):
    i, b, hh = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row = meta_row(geo, b, lax.div(hh, jnp.int32(geo.group // hp)), lax.div(i, jnp.int32(q_per_meta)))
    bounds = runs(cnt_ref, row)
    base = row * geo.max_blocks
    sub = geo.block_kv // block_k
    q = stack_rows(q_ref[...], hp)
    rows = q.shape[0]
    qp = row_column(qpos_ref[...], hp)
    qs = None if qseg_ref is None else row_column(qseg_ref[...], hp)
    if sink_ref is not None:
        sink = sink_ref[...].astype(jnp.float32) * LOG2E          # scalar, or [hp]
        if hp > 1:
            sink = jnp.broadcast_to(sink[None, :], (rows // hp, hp)).reshape(rows)
        m0 = jnp.zeros((rows,), jnp.float32) + sink
        l0 = jnp.ones((rows,), jnp.float32)
    else:
        m0 = jnp.full((rows,), MASK_VALUE, jnp.float32)
        l0 = jnp.zeros((rows,), jnp.float32)
    acc0 = jnp.zeros((rows, v_ref.shape[-1]), jnp.float32)

    def step(t, carry, mode):
        m, l, acc = carry
        sl = kv_slice(idx_ref, base, t, sub, geo.block_kv, block_k)
        s = lax.dot_general(q, k_ref[sl, :], NT, preferred_element_type=jnp.float32)
        if softcap is None:
            c = scale * LOG2E
        else:
            s, c = logits2(s, scale, softcap)[0], 1.0
        if mode:
            ks = None if kseg_ref is None else kseg_ref[sl][None, :]
            vis = masked_visible(mode, mask_fn, qp, kpos_ref[sl][None, :], qs, ks)
            s = jnp.where(vis, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1) * c)
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s * c - m_new[:, None])
        if mode:
            p = jnp.where(vis, p, 0.0)
        v = v_ref[sl, :]
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
        return m_new, l * alpha + p.sum(axis=-1), acc * alpha[:, None] + pv

    m, l, acc = three_loops(step, bounds, sub, (m0, l0, acc0))
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    out = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse = jnp.where(seen, (m + jnp.log2(l_safe)) * (1.0 / LOG2E), -jnp.inf)
    o_ref[...] = out if hp == 1 else out.reshape(o_ref.shape)
    lse_ref[...] = lse if hp == 1 else lse.reshape(lse_ref.shape)


def forward(st, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg, kv_idx, kv_cnt, q_idx, q_cnt):
    """Unpadded `[B, T, H, D]` in, `(out [B, Tq, H, Dv], lse [B, H, Tq])` out."""
    del q_idx, q_cnt
    cfg, geo = st.config
    b, tq, h, d = q.shape
    tk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    qp, kp, vp, q_pos_p, kv_pos_p, q_seg_p, kv_seg_p = pad_inputs(
        geo, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    tq_p, tk_p, d_p, dv_p = qp.shape[1], kp.shape[1], qp.shape[3], vp.shape[3]
    hp, bq = q_tiles(geo, cfg.block_rows, cfg.max_heads_per_program)
    bk = plan.pow2_tile(cfg.block_k, geo.block_kv, "block_kv", 16)
    per_kv = geo.group // hp                       # programs per KV head
    hd = head_dim(hp)
    kv_head = lambda hh: hh // per_kv  # noqa: E731
    row_q = pl.BlockSpec((None, bq), lambda i, b_, hh: (b_, i))
    row_k = pl.BlockSpec((None, tk_p), lambda i, b_, hh: (b_, 0))
    segs = q_seg is not None
    in_specs = [
        pl.BlockSpec(), pl.BlockSpec(),
        None if sinks is None else pl.BlockSpec((None, hd), lambda i, b_, hh: (hh, 0)),
        row_q, row_k, row_q if segs else None, row_k if segs else None,
        pl.BlockSpec((None, bq, None, hd, d_p), lambda i, b_, hh: (b_, i, hh, 0, 0)),
        pl.BlockSpec((None, tk_p, None, d_p), lambda i, b_, hh: (b_, 0, kv_head(hh), 0)),
        pl.BlockSpec((None, tk_p, None, dv_p), lambda i, b_, hh: (b_, 0, kv_head(hh), 0)),
    ]
    out_specs = [pl.BlockSpec((None, bq, None, hd, dv_p), lambda i, b_, hh: (b_, i, hh, 0, 0)),
                 pl.BlockSpec((None, bq, None, hd), lambda i, b_, hh: (b_, i, hh, 0))]
    kernel = functools.partial(_fwd_kernel, geo=geo, mask_fn=st.mask_fn, scale=st.scale,
                               softcap=st.softcap, hp=hp, block_k=bk, q_per_meta=geo.block_q // bq)
    out, lse = pl.pallas_call(
        kernel,
        grid=(tq_p // bq, b, h // hp),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct((b, tq_p, h // hp, hp, dv_p), q.dtype),
                   jax.ShapeDtypeStruct((b, tq_p, h // hp, hp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=st.interpret,
        name="block_sparse_fwd",
    )(kv_idx.reshape(-1), kv_cnt.reshape(-1), None if sinks is None else sinks.reshape(h // hp, hp),
      q_pos_p, kv_pos_p, q_seg_p, kv_seg_p, head_view(qp, hp), kp, vp)
    out = out.reshape(b, tq_p, h, dv_p)[:, :tq, :, :dv]
    lse = lse.reshape(b, tq_p, h)[:, :tq].transpose(0, 2, 1)
    return out, lse


def block_sparse_triton(q, k, v, metadata, *, mask_fn, q_positions, kv_positions, q_segment_ids,
                        kv_segment_ids, sink_logits, softcap, scale, return_lse, interpret=False,
                        config: TritonConfig | None = None):
    """`block_sparse_reference`'s contract on the Triton kernels (`interpret=True`: CPU)."""
    from pallas_kernels.block_sparse import triton_vjp  # noqa: PLC0415 - fwd file standalone

    cfg = config or TritonConfig()
    geo = plan.geometry(metadata, q, k)
    q_tiles(geo, cfg.block_rows, cfg.max_heads_per_program)           # validate tiles early
    plan.pow2_tile(cfg.block_k, geo.block_kv, "block_kv", 16)

    def make(geo_):
        return autodiff.Static(
            forward=forward, backward=triton_vjp.backward, mask_fn=mask_fn, scale=float(scale),
            softcap=None if softcap is None else float(softcap), has_sinks=sink_logits is not None,
            config=(cfg, geo_), interpret=bool(interpret))

    return plan.run(make, q, k, v, metadata, q_positions=q_positions,
               kv_positions=kv_positions, q_segment_ids=q_segment_ids,
               kv_segment_ids=kv_segment_ids, sink_logits=sink_logits, return_lse=return_lse,
               geo=geo)


# Backend declaration for `pallas_kernels.common.resolve`: a GPU (or interpret mode); every call the api
# accepts; tiles `TritonConfig`.
CONFIG = TritonConfig
