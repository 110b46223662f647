"""`token_sparse` dk/dv on TPU without atomics: the inverted traversal (FlashAttention-2
backward, arXiv 2307.08691, Alg. 2, over per-query gathered KV, as NSA's kernel, arXiv
2502.11089, with the roles of queries and keys swapped).

`inverted_index` (the Triton path's, `triton_vjp.py`: one stable sort and a bincount) lists,
per segment = (batch, kv head, KV block), the query tokens that listed the block
(padding queries left out). `chunk_tables` cuts each segment's list into chunks of `pairs`
tokens (at least one chunk per segment, so unlisted blocks get zeros) and lays them out
back to back: the kernel's grid is one flat "arbitrary" axis over the chunks (a static
bound, `ceil(N / pairs) + segments` for `N = B * T * Hkv * K` listed slots; the trailing
chunks do nothing). The chunk table (per chunk: segment, token count, first / last flags,
tokens, query positions) comes in SMEM blocks of 8 chunks; a step gathers by DMA, for
each of its tokens, the `[G, D]` q, `[G, Dv]` dO and `[G, 2]` (lse2, delta) rows of the kv
head's G query heads (stacked as `pairs * G` rows), recomputes `P = exp2(S2 - lse2)`
against the block's `[block_size, D]` keys (loaded once per segment by DMA) and accumulates
`dV += P^T dO`, `dK += dS^T Q` in VMEM scratch; the segment's last chunk writes dk/dv to
HBM by DMA, once.

block_size 1 (DSA token indices): each (query, key row) pair moves the G * (D + Dv) q / dO
elements of the query for one key row, where the forward moves D + Dv: for DSA (MQA,
G = 128, D = 576, Dv = 512, top-2048) about 278 KB per pair, 37 TB per layer at 64K
tokens (the forward gathers 0.3 TB), hopeless at ~0.8-1.6 TB/s; the dots also have one key
row (done on the VPU in float32: Pallas' TPU lowering rejects bf16 matmuls with a unit
dimension). So `TpuConfig(backward="auto")` uses `xla_backward` (jnp gathers and XLA
scatter-add, ~10 KB per pair) for block_size 1, as the Triton path keeps atomics there;
`backward="mosaic"` runs this kernel anyway (correct, tested). A key-tile variant (one
gather of q per (query, tile of R rows) with a listed-row mask) would cut the kernel's
traffic by the rows a query lists per tile; not built. None of this is measured: this
workplace has no TPU. On hardware the single "arbitrary" grid axis runs on one TensorCore
(no megacore split), the q / dO gathers are not double-buffered, and `G` must be a
multiple of 8 or G = H (as the forward). Lowering for a TPU v5e is checked on CPU; the
Mosaic compile is not.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash import blocks
from pallas_kernels.tiles_common import NT, TN, logits2
from pallas_kernels.tiles_tpu import dot
from pallas_kernels.token_sparse.layout import inverted_index

TABLE_ROWS = 8     # rows per SMEM block of a table (a block of one row breaks the TPU
                   # lowering's (8, 128) block-shape rule)


def _rows_dot(a, b, dims):
    """`dot` of query rows `[R, .]` with the block's keys: on the MXU, or for a one-row
    block (block_size 1) as a float32 multiply-reduce on the VPU (Pallas' TPU lowering
    rejects a bf16 matmul with a unit dimension; checked by lowering on CPU)."""
    if dims == TN and a.shape[1] > 1 or dims == NT and b.shape[0] > 1:
        return dot(a, b, dims)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    if dims == NT:                                        # [R, W] x [1, W] -> [R, 1]
        return jnp.sum(f32(a) * f32(b), axis=1, keepdims=True)
    return jnp.sum(f32(a) * f32(b), axis=0, keepdims=True)  # [R, 1]^T x [R, W] -> [1, W]


def chunk_tables(indices, q_pos, nblk: int, pairs: int):
    """The inverted index in chunks of `pairs` tokens.

    Args: `indices [B, T, Hkv, K]`, `q_pos [B, T]` (negative: padding query).
    Returns: `meta [C, 4]` int32 per chunk (segment `(b * Hkv + h) * nblk + j`, listing
    tokens in it, is first chunk of its segment, is last), `tokens [C, pairs]` (0 on unused
    lanes) and `q_pos [C, pairs]` (-1 on unused lanes), `C = ceil(N / pairs) + segments`.
    """
    b, t, hkv, k = indices.shape
    n, nseg = b * t * hkv * k, b * hkv * nblk
    n_chunks = -(-n // pairs) + nseg
    tokens, start, count = inverted_index(indices, q_pos, nblk)
    per_seg = jnp.maximum(1, (count + pairs - 1) // pairs)
    seg_end = jnp.cumsum(per_seg)
    seg_first = seg_end - per_seg
    # listed slot i (sorted by segment) -> (chunk, lane); the padding tail goes nowhere
    i = jnp.arange(n, dtype=jnp.int32)
    seg = jnp.searchsorted(jnp.cumsum(count), i, side="right")
    seg_c = jnp.minimum(seg, nseg - 1)
    r = i - start[seg_c]
    chunk = jnp.where(seg < nseg, seg_first[seg_c] + r // pairs, n_chunks)
    lane = r % pairs
    tok_tab = jnp.zeros((n_chunks, pairs), jnp.int32).at[chunk, lane].set(tokens, mode="drop")
    qpos = q_pos[seg_c // (hkv * nblk), tokens]
    qpos_tab = jnp.full((n_chunks, pairs), -1, jnp.int32).at[chunk, lane].set(qpos, mode="drop")
    # chunk -> segment; trailing chunks (past the last segment) are neither first nor last
    c = jnp.arange(n_chunks, dtype=jnp.int32)
    cseg = jnp.searchsorted(seg_end, c, side="right")
    live = cseg < nseg
    cseg_c = jnp.minimum(cseg, nseg - 1)
    rc = c - seg_first[cseg_c]
    n_valid = jnp.where(live, jnp.clip(count[cseg_c] - rc * pairs, 0, pairs), 0)
    meta = jnp.stack([cseg_c, n_valid, live & (rc == 0), live & (rc == per_seg[cseg_c] - 1)],
                     axis=-1).astype(jnp.int32)
    return meta, tok_tab, qpos_tab


def _dkdv_kernel(tab_ref, q_hbm, do_hbm, stats_hbm, k_hbm, v_hbm, kpos_hbm, dk_hbm, dv_hbm,
                 qbuf, dobuf, sbuf, qcol, kblk, vblk, kpblk, dk_sc, dv_sc, dk_out, dv_out, sem,
                 *, geo, scale, softcap):
    """One chunk of one segment's listing tokens: `pairs * G` query rows against the
    block's `block_size` keys. `tab_ref`: an SMEM block of `TABLE_ROWS` rows of the packed
    `chunk_tables` (meta, tokens, query positions)."""
    tab = tab_ref.at[pl.program_id(0) % TABLE_ROWS]
    seg, n, first, last = tab[0], tab[1], tab[2], tab[3]
    b, h, j = seg // (geo.hkv * geo.nblk), (seg // geo.nblk) % geo.hkv, seg % geo.nblk
    bs, g, d, dv = geo.block_size, geo.group, geo.d, geo.dv
    block = lambda ref, width: ref.at[b, pl.ds(j * bs, bs), pl.ds(h * width, width)]  # noqa: E731

    @pl.when(pl.program_id(0) == 0)
    def _zero_buffers():           # lanes past a chunk's tokens keep finite (masked) rows
        for buf in (qbuf, dobuf, sbuf):
            buf[...] = jnp.zeros(buf.shape, buf.dtype)

    @pl.when(first == 1)
    def _load_block():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)
        copies = (pltpu.make_async_copy(block(k_hbm, d), kblk, sem.at[0]),
                  pltpu.make_async_copy(block(v_hbm, dv), vblk, sem.at[1]),
                  pltpu.make_async_copy(kpos_hbm.at[b, :, pl.ds(j * bs, bs)], kpblk, sem.at[2]))
        for cp in copies:
            cp.start()
        for cp in copies:
            cp.wait()

    def copies(i):
        tok, rows = tab[4 + i], pl.ds(i * g, g)
        return (pltpu.make_async_copy(q_hbm.at[b, tok, h], qbuf.at[rows], sem.at[3]),
                pltpu.make_async_copy(do_hbm.at[b, tok, h], dobuf.at[rows], sem.at[4]),
                pltpu.make_async_copy(stats_hbm.at[b, tok, h], sbuf.at[rows], sem.at[5]))

    def start(i, _):
        for cp in copies(i):
            cp.start()

    def wait(i, _):
        for cp in copies(i):
            cp.wait()

    def query_position(i, _):
        qcol[pl.ds(i * g, g)] = jnp.full((g, 1), tab[4 + geo.pairs + i], jnp.int32)

    @pl.when(n > 0)
    def _step():
        lax.fori_loop(0, n, start, None)
        lax.fori_loop(0, geo.pairs, query_position, None)
        lax.fori_loop(0, n, wait, None)
        q, do, kp, qp = qbuf[...], dobuf[...], kpblk[...], qcol[...]
        vis = (kp >= 0) & (qp >= 0)                                        # [pairs * G, bs]
        if geo.causal:
            vis = vis & (kp <= qp)
        s2, tanh = logits2(_rows_dot(q, kblk[...], NT), scale, softcap)
        p = jnp.where(vis, jnp.exp2(s2 - sbuf[:, 0:1]), 0.0)
        dv_sc[...] += _rows_dot(p.astype(do.dtype), do, TN)
        ds = p * (_rows_dot(do, vblk[...], NT) - sbuf[:, 1:2])
        if tanh is not None:
            ds = ds * (1.0 - tanh * tanh)
        dk_sc[...] += _rows_dot(ds.astype(q.dtype), q, TN)

    @pl.when(last == 1)
    def _write():
        dk_out[...] = (dk_sc[...] * scale).astype(dk_out.dtype)
        dv_out[...] = dv_sc[...].astype(dv_out.dtype)
        copies = (pltpu.make_async_copy(dk_out, block(dk_hbm, d), sem.at[6]),
                  pltpu.make_async_copy(dv_out, block(dv_hbm, dv), sem.at[7]))
        for cp in copies:
            cp.start()
        for cp in copies:
            cp.wait()


def dkdv(st, q, dout, lse2, delta, q_pos, indices, k2, v2, kpos):
    """dk `[B, S_p, Hkv, D]`, dv `[B, S_p, Hkv, Dv]` (k's / v's dtype, S_p = nblk *
    block_size) from q `[B, T, H, D]`, dO `[B, T, H, Dv]`, lse2 / delta `[B, H, T]` and the
    kernels' HBM views of K, V, key positions (`tpu.kv_views`)."""
    geo = st.config
    b, t, _, d = q.shape
    g, bs, pairs, hkv, dv = geo.group, geo.block_size, geo.pairs, geo.hkv, geo.dv
    meta, tok_tab, qpos_tab = chunk_tables(indices, q_pos, geo.nblk, pairs)
    stats = jnp.stack([lse2, delta], axis=-1).transpose(0, 2, 1, 3).reshape(b, t, hkv, g, 2)
    tab = jnp.concatenate([meta, tok_tab, qpos_tab], axis=1)
    tab = blocks.pad_axis(tab, blocks.round_up(tab.shape[0], TABLE_ROWS), 0, 0)  # idle chunks
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    rows = pairs * g
    s_p = k2.shape[1]
    dk, dv_ = pl.pallas_call(
        functools.partial(_dkdv_kernel, geo=geo, scale=st.scale, softcap=st.softcap),
        grid=(tab.shape[0],),
        in_specs=[pl.BlockSpec((TABLE_ROWS, tab.shape[1]), lambda c: (c // TABLE_ROWS, 0),
                               memory_space=pltpu.SMEM)] + [hbm] * 6,
        out_specs=[hbm, hbm],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (k2, v2)],
        scratch_shapes=[pltpu.VMEM((rows, d), q.dtype), pltpu.VMEM((rows, dv), dout.dtype),
                        pltpu.VMEM((rows, 2), jnp.float32), pltpu.VMEM((rows, 1), jnp.int32),
                        pltpu.VMEM((bs, d), k2.dtype), pltpu.VMEM((bs, dv), v2.dtype),
                        pltpu.VMEM((1, bs), jnp.int32),
                        pltpu.VMEM((bs, d), jnp.float32), pltpu.VMEM((bs, dv), jnp.float32),
                        pltpu.VMEM((bs, d), k2.dtype), pltpu.VMEM((bs, dv), v2.dtype),
                        pltpu.SemaphoreType.DMA((8,))],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=st.interpret, name="token_sparse_bwd_dkdv_tpu",
    )(tab, q.reshape(b, t, hkv, g, d),
      dout.reshape(b, t, hkv, g, dv), stats, k2, v2, kpos)
    return dk.reshape(b, s_p, hkv, d), dv_.reshape(b, s_p, hkv, dv)


def listed_slots(indices, kv_pos, q_pos, geo, kv_len: int):
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
    # [B, H, T] -> [B, T, Hkv, G]
    rows = lambda x: x.reshape(b, geo.hkv, g, t).transpose(0, 3, 1, 2)  # noqa: E731
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
        s2, tanh = logits2(jnp.einsum("bchgd,bchmd->bchgm", qc, kg), st.scale, st.softcap)
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


