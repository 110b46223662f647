"""`token_sparse` on TPU: Pallas Mosaic forward with manual DMA gathers; XLA backward.

Grid `(B, Hkv, T, steps)`, the last axis the reduction ("arbitrary"). A step takes the next
`E = max(1, block_k // block_size)` listed entries of the row (`block_size == 1`: E token
indices; else E blocks) and gathers their K/V rows (and key positions) from HBM into VMEM
with one async copy per entry, then folds the `[E * block_size, D]` tile into the
FlashAttention-2 online softmax (arXiv 2307.08691) of the `G = H / Hkv` query heads of the
kv head, stacked as rows (group-centric, as NSA's kernel, arXiv 2502.11089: one load
serves the group). Unlisted entries copy block 0 and mark its positions -1 (invisible);
steps past the row's last listed entry are skipped (no DMA).

The per-row index list, query position and step count are blocked SMEM inputs (a whole
DSA table, `[B, T, Hkv, 2048]`, is far too large to scalar-prefetch). KV stays in HBM
(`pl.ANY`), viewed `[B, S, Hkv * D]`, never copied.

Backward: no Mosaic kernel (TPU has no atomics; dk/dv would need the inverted index, per
KV block the list of (query, entry) pairs that read it). The VJP is the FlashAttention-2
backward in jnp over the gathered keys from the forward's lse (`xla_backward`): a chunk of
queries at a time, dk/dv by XLA scatter-add; memory O(chunk * K * block_size * D).

Checked in `pltpu.InterpretParams()` mode on CPU only (this workplace has no TPU). On
hardware, expect to need G a multiple of 8 (or G = H), D and Dv multiples of 128 (or
Hkv = 1) and a double-buffered gather for speed; none of that is verified here.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash import autodiff, blocks
from pallas_kernels.flash.blocks import LOG2E, MASK_VALUE
from pallas_kernels.flash.tpu import _dot, _logits2

_NT = (((1,), (1,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """`block_k`: key rows gathered per grid step (at least one whole block);
    `backward_budget`: gathered elements per query chunk of the XLA backward."""

    block_k: int = 128
    backward_budget: int = 1 << 24

    def __post_init__(self):
        if self.block_k < 1 or self.backward_budget < 1:
            raise ValueError(f"block_k and backward_budget must be >= 1, got {self.block_k}, "
                             f"{self.backward_budget}")


@dataclasses.dataclass(frozen=True)
class Geometry:
    hkv: int
    group: int
    d: int
    dv: int
    block_size: int
    per_step: int             # listed entries per grid step
    k_p: int                  # entries per row, padded to whole steps
    nblk: int
    causal: bool
    backward_budget: int


def geometry(q, k, v, indices, block_size: int, causal: bool, block_k: int,
             backward_budget: int) -> Geometry:
    per_step = min(max(1, block_k // block_size), indices.shape[3])
    return Geometry(hkv=k.shape[2], group=q.shape[2] // k.shape[2], d=q.shape[3], dv=v.shape[3],
                    block_size=block_size, per_step=per_step,
                    k_p=blocks.round_up(indices.shape[3], per_step),
                    nblk=-(-k.shape[1] // block_size), causal=causal,
                    backward_budget=backward_budget)


def _kernel(idx_ref, cnt_ref, qpos_ref, sink_ref, q_ref, k_hbm, v_hbm, kpos_hbm, o_ref, lse_ref,
            kbuf, vbuf, pbuf, sem, m_sc, l_sc, acc_sc, *, geo: Geometry, scale, softcap):
    b, h, c = pl.program_id(0), pl.program_id(1), pl.program_id(3)
    g, bs, e = geo.group, geo.block_size, geo.per_step

    @pl.when(c == 0)
    def _init():
        if sink_ref is not None:
            for gg in range(g):
                m_sc[gg:gg + 1] = jnp.full((1, 1), sink_ref[h * g + gg] * LOG2E, jnp.float32)
            l_sc[...] = jnp.ones(l_sc.shape, jnp.float32)
        else:
            m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
            l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def entry(i):
        """(listed?, first key slot) of entry i of this step; unlisted entries read block 0."""
        blk = idx_ref[c * e + i]
        ok = (blk >= 0) & (blk < geo.nblk)
        return ok, jnp.where(ok, blk, 0) * bs

    def copies(i):
        start, rows = entry(i)[1], pl.ds(i * bs, bs)
        return (
            pltpu.make_async_copy(k_hbm.at[b, pl.ds(start, bs), pl.ds(h * geo.d, geo.d)],
                                  kbuf.at[rows], sem.at[0]),
            pltpu.make_async_copy(v_hbm.at[b, pl.ds(start, bs), pl.ds(h * geo.dv, geo.dv)],
                                  vbuf.at[rows], sem.at[1]),
            pltpu.make_async_copy(kpos_hbm.at[b, :, pl.ds(start, bs)], pbuf.at[:, rows], sem.at[2]))

    def start(i, _):
        for cp in copies(i):
            cp.start()

    def wait(i, _):
        for cp in copies(i):
            cp.wait()

    def hide_unlisted(i, _):           # after all waits: copies share their semaphores
        @pl.when(jnp.logical_not(entry(i)[0]))
        def _hide():
            pbuf[:, pl.ds(i * bs, bs)] = jnp.full((1, bs), -1, jnp.int32)

    @pl.when(c < cnt_ref[0])
    def _step():
        lax.fori_loop(0, e, start, None)
        lax.fori_loop(0, e, wait, None)
        lax.fori_loop(0, e, hide_unlisted, None)
        q_pos = qpos_ref[0]
        kp = pbuf[...]                                                   # [1, R]
        vis = (kp >= 0) & (q_pos >= 0)
        if geo.causal:
            vis = vis & (kp <= q_pos)
        s, _ = _logits2(_dot(q_ref[...], kbuf[...], _NT), scale, softcap)
        s = jnp.where(vis, s, MASK_VALUE)
        m_old = m_sc[...]
        m_new = jnp.maximum(m_old, s.max(axis=-1, keepdims=True))
        alpha = jnp.exp2(m_old - m_new)
        p = jnp.where(vis, jnp.exp2(s - m_new), 0.0)
        m_sc[...] = m_new
        l_sc[...] = l_sc[...] * alpha + p.sum(axis=-1, keepdims=True)
        v = vbuf[...]
        acc_sc[...] = acc_sc[...] * alpha + _dot(p.astype(v.dtype), v, _NN)

    @pl.when(c == pl.num_programs(3) - 1)
    def _finish():
        l = l_sc[...]
        seen = l > 0.0
        l_safe = jnp.where(seen, l, 1.0)
        o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, (m_sc[...] + jnp.log2(l_safe)) * (1.0 / LOG2E), -jnp.inf)


def forward(st, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg, indices):
    """Unpadded `[B, T, H, D]` in, `(out [B, T, H, Dv], lse [B, H, T])` out."""
    del q_seg, kv_seg
    geo = st.config
    b, t, h, _ = q.shape
    g, bs, e = geo.group, geo.block_size, geo.per_step
    s_p = geo.nblk * bs
    k2 = blocks.pad_axis(k, s_p, 1).reshape(b, s_p, geo.hkv * geo.d)
    v2 = blocks.pad_axis(v, s_p, 1).reshape(b, s_p, geo.hkv * geo.dv)
    kpos = blocks.pad_axis(kv_pos, s_p, 1, -1)[:, None, :]
    idx = blocks.pad_axis(indices, geo.k_p, 3, -1)
    listed = (idx >= 0) & (idx < geo.nblk)
    last = jnp.max(jnp.where(listed, jnp.arange(1, geo.k_p + 1, dtype=jnp.int32), 0), axis=-1)
    n_steps = ((last + e - 1) // e)[..., None]                           # [B, T, Hkv, 1]
    smem = functools.partial(pl.BlockSpec, memory_space=pltpu.SMEM)
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    rows = e * bs
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=0, grid=(b, geo.hkv, t, geo.k_p // e),
        in_specs=[
            smem((None, None, None, geo.k_p), lambda b_, h_, t_, c: (b_, t_, h_, 0)),
            smem((None, None, None, 1), lambda b_, h_, t_, c: (b_, t_, h_, 0)),
            smem((None, None, 1), lambda b_, h_, t_, c: (b_, t_, 0)),
            None if sinks is None else smem(),
            pl.BlockSpec((None, None, g, geo.d), lambda b_, h_, t_, c: (b_, t_, h_, 0)),
            hbm, hbm, hbm,
        ],
        out_specs=[pl.BlockSpec((None, None, g, geo.dv), lambda b_, h_, t_, c: (b_, t_, h_, 0)),
                   pl.BlockSpec((None, None, g, 1), lambda b_, h_, t_, c: (b_, t_, h_, 0))],
        scratch_shapes=[pltpu.VMEM((rows, geo.d), k.dtype), pltpu.VMEM((rows, geo.dv), v.dtype),
                        pltpu.VMEM((1, rows), jnp.int32), pltpu.SemaphoreType.DMA((3,)),
                        pltpu.VMEM((g, 1), jnp.float32), pltpu.VMEM((g, 1), jnp.float32),
                        pltpu.VMEM((g, geo.dv), jnp.float32)])
    out, lse = pl.pallas_call(
        functools.partial(_kernel, geo=geo, scale=st.scale, softcap=st.softcap),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, t, h, geo.dv), q.dtype),
                   jax.ShapeDtypeStruct((b, t, h, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=st.interpret,
        name="token_sparse_fwd_tpu",
    )(idx, n_steps, q_pos[:, :, None], sinks, q, k2, v2, kpos)
    return out, lse[..., 0].transpose(0, 2, 1)


def listed_slots(indices, kv_pos, q_pos, geo: Geometry, kv_len: int):
    """Key slots of each row's listed entries, `[B, T, Hkv, K * block_size]` (clamped to 0
    where unlisted), and their visibility (listed, key and query valid, causal)."""
    bs = geo.block_size
    ok = (indices >= 0) & (indices < geo.nblk)
    slots = (jnp.where(ok, indices, 0)[..., None] * bs + jnp.arange(bs, dtype=jnp.int32))
    listed = ok[..., None] & (slots < kv_len)
    b, t, hkv = indices.shape[:3]
    slots = jnp.where(listed, slots, 0).reshape(b, t, hkv, -1)
    kp = jnp.take_along_axis(kv_pos[:, None, None, :], slots.reshape(b, 1, 1, -1), axis=-1)
    kp = kp.reshape(slots.shape)
    qp = q_pos[:, :, None, None]
    vis = listed.reshape(slots.shape) & (kp >= 0) & (qp >= 0)
    if geo.causal:
        vis = vis & (kp <= qp)
    return slots, vis


def xla_backward(st, q, k, v, dout, q_pos, kv_pos, q_seg, kv_seg, lse2, delta, indices):
    """The FlashAttention-2 backward (arXiv 2307.08691, Alg. 2) over the gathered keys, in
    jnp, a chunk of queries at a time (about `geo.backward_budget` gathered elements): gather
    each query's listed K/V rows, recompute `P = exp2(S2 - lse2)`, `dS = P (dO V^T - delta)`,
    `dQ = dS K`, and scatter-add `dV += P^T dO`, `dK += dS^T Q` into the slots. Memory
    O(chunk * K * block_size * D), not O(T * S)."""
    del q_seg, kv_seg
    geo = st.config
    b, t, h, d = q.shape
    s_len, g, dv = k.shape[1], geo.group, geo.dv
    slots, vis = listed_slots(indices, kv_pos, q_pos, geo, s_len)            # [B, T, Hkv, M]
    m = slots.shape[-1]
    chunk = max(1, min(t, geo.backward_budget // max(1, b * geo.hkv * m * (d + dv + g))))
    n = -(-t // chunk)
    pad_t = lambda x, fill=0: blocks.pad_axis(x, n * chunk, 1, fill)  # noqa: E731
    split = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)  # noqa: E731
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    qg = split(pad_t(f32(q).reshape(b, t, geo.hkv, g, d)))
    do = split(pad_t(f32(dout).reshape(b, t, geo.hkv, g, dv)))
    rows = lambda x: x.reshape(b, geo.hkv, g, t).transpose(0, 3, 1, 2)  # noqa: E731  -> [B, T, Hkv, G]
    lse2_c = split(pad_t(rows(lse2), 1e30))
    delta_c = split(pad_t(rows(delta)))
    slots_c, vis_c = split(pad_t(slots)), split(pad_t(vis, False))
    kf, vf = f32(k), f32(v)
    bi = jnp.arange(b)[:, None, None, None]
    hi = jnp.arange(geo.hkv)[None, None, :, None]

    def one_chunk(carry, xs):
        dk, dv_ = carry
        qc, doc, l2, dl, sl, vi = xs
        kg, vg = kf[bi, sl, hi], vf[bi, sl, hi]                                  # [B, C, Hkv, M, D]
        s2, tanh = _logits2(jnp.einsum("bchgd,bchmd->bchgm", qc, kg), st.scale, st.softcap)
        p = jnp.where(vi[:, :, :, None], jnp.exp2(s2 - l2[..., None]), 0.0)
        ds = p * (jnp.einsum("bchgd,bchmd->bchgm", doc, vg) - dl[..., None])
        if tanh is not None:
            ds = ds * (1.0 - tanh * tanh)
        dq = jnp.einsum("bchgm,bchmd->bchgd", ds, kg) * st.scale
        dv_ = dv_.at[bi, sl, hi].add(jnp.einsum("bchgm,bchgd->bchmd", p, doc))
        dk = dk.at[bi, sl, hi].add(jnp.einsum("bchgm,bchgd->bchmd", ds, qc) * st.scale)
        return (dk, dv_), dq

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    (dk, dv_), dq = lax.scan(one_chunk, init, (qg, do, lse2_c, delta_c, slots_c, vis_c))
    dq = jnp.moveaxis(dq, 0, 1).reshape(b, n * chunk, h, d)[:, :t]
    return dq.astype(q.dtype), dk.astype(k.dtype), dv_.astype(v.dtype)


def token_sparse_tpu(q, k, v, indices, *, block_size, q_positions, kv_positions, causal,
                     sink_logits, softcap, scale, return_lse, interpret=False,
                     config: TpuConfig | None = None):
    """`token_sparse_reference`'s contract: Mosaic TPU forward, XLA backward
    (`interpret=True` -> `pltpu.InterpretParams()`)."""
    if interpret is True:
        interpret = pltpu.InterpretParams()
    cfg = config or TpuConfig()
    st = autodiff.Static(
        forward=forward, backward=xla_backward, mask_fn=None, scale=float(scale),
        softcap=None if softcap is None else float(softcap), has_sinks=sink_logits is not None,
        config=geometry(q, k, v, indices, block_size, causal, cfg.block_k, cfg.backward_budget),
        interpret=interpret or False)
    return autodiff.attention(st, q, k, v, sink_logits=sink_logits, q_positions=q_positions,
                              kv_positions=kv_positions, q_segment_ids=None, kv_segment_ids=None,
                              return_lse=return_lse, aux=(indices,))
