"""`token_sparse` backward on GPU: Pallas with the Triton lowering (FlashAttention-2, arXiv
2307.08691, Alg. 2: `P = exp2(S - lse2)` recomputed, `dS = P * (dO V^T - delta)`).

* dq: one program per (query token, batch, kv head), the group's query heads as rows,
  walking the same listed KV rows as the forward (`triton.tile`), dq kept on chip.
* dk/dv, "inverted" (`TritonConfig.dkdv`; the default for block_size > 1): the query tokens
  that listed each KV block (the inverted index of `indices`, built on device by
  `inverted_index`: one stable sort and a bincount, O(B * T * Hkv * K)), cut into chunks of
  at most `TritonConfig.dkdv_chunk` tokens (`dkdv_chunks`); one program per (chunk, batch,
  kv head) holds the block's partial dk/dv in registers, looping over its tokens (all G
  heads of each: `P^T dO`, `dS^T Q`), and writes it once in float32; a second kernel
  (`_sum_kernel`) adds the chunks of each block in order (no atomics, deterministic).
  Without the chunks, NSA's forced block 0 (listed by every query) was one program walking
  all T tokens: at 64K the selected branch's fwd+bwd took 155 ms with real NSA selections
  vs 74.8 ms with random ones (H200, before this split).
* dk/dv, "atomic" (the default for token indices): the dq pass also scatters `P^T dO` and
  `dS^T Q` into float32 dk/dv buffers with atomic adds
  (`triton_atomics.relaxed_add`: relaxed memory order; Pallas' `atomic_add` is
  acquire-release, a fence per add). The buffers carry one spare row that
  unlisted entries point at; on GPU the atomics are also masked, so that row stays idle. In
  interpret mode (CPU) the atomics run sequentially through Pallas' discharge rule (no mask
  there, hence the spare row; it needs the rows of one tile distinct, which is why the
  listed entries must be).
* `value_is_key_prefix` (`Geometry`; `token_sparse_backward(value_is_key_prefix=True)`, the
  atomic path only, else ValueError): the caller promises `v == k[..., :Dv]` (MLA, DSA's
  main attention: keys `[c_kv | k_rope]`, 576 wide, values `c_kv`, their first 512). The
  kernel then takes the values from the gathered k rows, adds the `P^T dO` tile into the
  `dS^T Q` tile of the same columns in registers and scatters one D-wide row per (query,
  listed row) instead of a D-wide dk row and a Dv-wide dv row; dv comes back as zeros (dk's
  first Dv columns hold the shared array's whole gradient). DeepSeek's shape (64 heads in
  two programs of 32 rows): 2 x (576 + 512) = 2176 float32 atomic adds per (query, slot)
  pair -> 2 x 576 = 1152 (-47%). Why: H100, 64K tokens, 64 heads, k = 2048, the Mosaic GPU
  prefill forward took 86 ms and forward + backward 2575 ms with the two scatters (2.9e11
  atomic adds); the folded path's time is not yet measured (a GPU run is owed).

H200, bf16, NSA selection (64/4 heads, 16 x 64 blocks), fwd+bwd: 64.3 -> 21.7 ms at 16K and
300.1 -> 74.8 ms at 64K tokens, atomic -> inverted (cuDNN dense causal: 28.8 / 451.4 ms);
random selections, measured before the chunk split (not yet re-timed with it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash import blocks
from pallas_kernels.triton_atomics import relaxed_add
from pallas_kernels.tiles_common import NN, TN, logits2
from pallas_kernels.token_sparse.layout import inverted_index
from pallas_kernels.token_sparse.triton import (geometry, group_view, load_pieces, prepare, qk, specs,
                                                tile, warps)


def _scatter_add(ref, rows, listed, start, width, val, interpret):
    """`ref[rows, start:start + width] += val` (float32 atomics, relaxed: the sums are read
    only after the kernel); unlisted rows go to the spare last row (and are masked off on GPU)."""
    spare = ref.shape[0] - 1
    r = jnp.broadcast_to(jnp.where(listed, rows, spare)[:, None], val.shape)
    c = jnp.broadcast_to(start + jnp.arange(width, dtype=jnp.int32)[None, :], val.shape)
    mask = None if interpret else jnp.broadcast_to(listed[:, None], val.shape)
    relaxed_add(ref, (r, c), val, mask=mask)


def _tn(a, b):
    """`a^T b` in float32, a cast to b's dtype: `a [G_p, R]`, `b [G_p, w]` -> `[R, w]`."""
    return lax.dot_general(a.astype(b.dtype), b, TN, preferred_element_type=jnp.float32)


def _query_kernel(cnt_ref, qpos_ref, idx_ref, kpos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                  delta_ref, *refs, geo, scale, softcap, interpret, atomic):
    """dq; with `atomic` also the dk/dv scatter. refs: the float32 accumulators in, dq, the
    accumulators out (aliased with the ins): `(dk_in, dv_in, dq, dk, dv)`; with
    `geo.value_is_key_prefix` (v_ref None: the values are k's first Dv columns, `ks[0:n]`
    pieces) `(dk_in, dq, dk)`, dv added into dk's first pieces before one scatter per row;
    without `atomic` `(dq,)`."""
    n_acc = (1 if geo.value_is_key_prefix else 2) if atomic else 0
    dq_ref, acc_refs = refs[n_acc], refs[n_acc + 1:]
    t, b, h = pl.program_id(0), pl.program_id(1), lax.div(pl.program_id(2), jnp.int32(geo.split))
    n_iter = cnt_ref[(b * geo.t + t) * geo.hkv + h]
    q_pos = qpos_ref[b * geo.t + t]
    qs = [q_ref[:, pl.ds(start, w)] for start, w in geo.d_pieces]
    dos = [do_ref[:, pl.ds(start, w)] for start, w in geo.dv_pieces]
    lse2 = lse_ref[...][:, None]
    delta = delta_ref[...][:, None]

    def step(j, dq):
        rows, listed, vis = tile(geo, idx_ref, kpos_ref, j, q_pos)
        ks = load_pieces(k_ref, rows, geo.d_pieces)
        if geo.value_is_key_prefix:          # `geometry` checked: dv's pieces are k's first
            vs = ks[:len(geo.dv_pieces)]
        else:
            vs = load_pieces(v_ref, rows, geo.dv_pieces)
        s2, tanh = logits2(qk(qs, ks), scale, softcap)
        p = jnp.where(vis, jnp.exp2(s2 - lse2), 0.0)                          # [G_p, R]
        ds = p * (qk(dos, vs) - delta)
        if tanh is not None:
            ds = ds * (1.0 - tanh * tanh)
        if atomic:
            if not geo.value_is_key_prefix:
                for (start, w), do in zip(geo.dv_pieces, dos):
                    _scatter_add(acc_refs[1], rows, listed, start, w, _tn(p, do), interpret)
            for i, ((start, w), q) in enumerate(zip(geo.d_pieces, qs)):
                dk_t = _tn(ds, q) * scale                                     # [R, w]
                if geo.value_is_key_prefix and i < len(dos):                  # dv's columns
                    dk_t = dk_t + _tn(p, dos[i])
                _scatter_add(acc_refs[0], rows, listed, start, w, dk_t, interpret)
        return tuple(a + lax.dot_general(ds.astype(kk.dtype), kk, NN,
                                         preferred_element_type=jnp.float32)
                     for a, kk in zip(dq, ks))

    dq0 = tuple(jnp.zeros((geo.rows_q, w), jnp.float32) for _, w in geo.d_pieces)
    dq = lax.fori_loop(0, n_iter, step, dq0)
    for (start, w), a in zip(geo.d_pieces, dq):
        dq_ref[:, pl.ds(start, w)] = (a * scale).astype(dq_ref.dtype)


def dkdv_chunks(start, count, b: int, hkv: int, nblk: int, entries: int, cap: int):
    """Cut each KV block's token list (`inverted_index`'s `start`, `count`) into chunks of at
    most `cap` tokens, per (batch, kv head) in block order.

    Args: `start`, `count` `[B * Hkv * nblk]`; `entries`: listed entries per (batch, kv head)
    (T * K), so `C = nblk + entries // cap` bounds the chunks of one (batch, kv head).
    Returns: `(block, first, n)`, each `[B * Hkv * C]` int32: chunk `(b * Hkv + h) * C + c`
    covers `tokens[first : first + n]` of KV block `block` (padding chunks: `n = 0`,
    `block = nblk - 1`); and `(chunk0, nch)`, each `[B * Hkv * nblk]` int32: the chunks of
    block `(b * Hkv + h) * nblk + j` are `chunk0 .. chunk0 + nch - 1` of its (batch, kv head).
    """
    c = nblk + entries // cap
    count3, start3 = count.reshape(b, hkv, nblk), start.reshape(b, hkv, nblk)
    nch = (count3 + cap - 1) // cap                                         # [B, Hkv, nblk]
    cend = jnp.cumsum(nch, axis=-1)
    ci = jnp.arange(c, dtype=jnp.int32)
    j = jax.vmap(jax.vmap(lambda e: jnp.searchsorted(e, ci, side="right")))(cend)
    real = j < nblk
    j = jnp.minimum(j, nblk - 1).astype(jnp.int32)                          # [B, Hkv, C]
    at = lambda x: jnp.take_along_axis(x, j, axis=-1)  # noqa: E731
    skip = (ci - (at(cend) - at(nch))) * cap                                # tokens of earlier chunks
    first = at(start3) + skip
    n = jnp.where(real, jnp.clip(at(count3) - skip, 0, cap), 0)
    flat = lambda x: x.astype(jnp.int32).reshape(-1)  # noqa: E731
    return flat(j), flat(first), flat(n), flat(cend - nch), flat(nch)


def _sum_kernel(chunk0_ref, nch_ref, dk_part_ref, dv_part_ref, dk_ref, dv_ref, *, geo):
    """dk/dv of KV block j: its chunks' float32 partials added in chunk order (deterministic)."""
    j, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    blk = (b * geo.hkv + h) * geo.nblk + j
    c0, m = chunk0_ref[blk], nch_ref[blk]
    for part_ref, out_ref, dims in ((dk_part_ref, dk_ref, geo.d_pieces),
                                    (dv_part_ref, dv_ref, geo.dv_pieces)):
        for s0, w in dims:
            add = lambda i, a, s0=s0, w=w, ref=part_ref: a + ref[c0 + i, :, pl.ds(s0, w)]  # noqa: E731
            acc = lax.fori_loop(0, m, add, jnp.zeros((geo.rows, w), jnp.float32))
            out_ref[:, pl.ds(s0, w)] = acc.astype(out_ref.dtype)


def _kv_kernel(blk_ref, first_ref, n_ref, tok_ref, qpos_ref, kpos_ref, q_ref, do_ref, lse_ref,
               delta_ref, k_ref, v_ref, dk_ref, dv_ref, *, geo, scale, softcap, nchunk):
    """Partial float32 dk/dv of one chunk (`dkdv_chunks`) of KV block j's query tokens: rows
    `[j * block_size, + R)` (the first block_size listed), each token with all G_p heads of
    the group; a padding chunk (n = 0) writes zeros."""
    c, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    chunk = (b * geo.hkv + h) * nchunk + c
    j, first, n = blk_ref[chunk], first_ref[chunk], n_ref[chunk]
    r = jnp.arange(geo.rows, dtype=jnp.int32)
    rows = j * geo.block_size + r
    kp = kpos_ref[rows]
    ok = (r < geo.block_size) & (kp >= 0)
    ks = load_pieces(k_ref, rows, geo.d_pieces)
    vs = load_pieces(v_ref, rows, geo.dv_pieces)

    def step(i, acc):
        dk, dv = acc
        t = tok_ref[first + i]
        q_pos = qpos_ref[b * geo.t + t]
        vis = ok & (kp <= q_pos) if geo.causal else ok
        vis = vis[None, :]
        for part in range(geo.split):
            sl = pl.ds(part * geo.rows_q, geo.rows_q)
            qs = [q_ref[t, sl, pl.ds(s0, w)] for s0, w in geo.d_pieces]
            dos = [do_ref[t, sl, pl.ds(s0, w)] for s0, w in geo.dv_pieces]
            lse2 = lse_ref[t, sl][:, None]
            delta = delta_ref[t, sl][:, None]
            s2, tanh = logits2(qk(qs, ks), scale, softcap)
            p = jnp.where(vis, jnp.exp2(s2 - lse2), 0.0)                      # [rows_q, R]
            ds = p * (qk(dos, vs) - delta)
            if tanh is not None:
                ds = ds * (1.0 - tanh * tanh)
            dv = tuple(a + lax.dot_general(p.astype(do.dtype), do, TN,
                                           preferred_element_type=jnp.float32)
                       for a, do in zip(dv, dos))
            dk = tuple(a + lax.dot_general(ds.astype(q.dtype), q, TN,
                                           preferred_element_type=jnp.float32)
                       for a, q in zip(dk, qs))
        return dk, dv

    acc0 = (tuple(jnp.zeros((geo.rows, w), jnp.float32) for _, w in geo.d_pieces),
            tuple(jnp.zeros((geo.rows, w), jnp.float32) for _, w in geo.dv_pieces))
    dk, dv = lax.fori_loop(0, n, step, acc0)
    for (s0, w), a in zip(geo.d_pieces, dk):
        dk_ref[:, pl.ds(s0, w)] = a * scale
    for (s0, w), a in zip(geo.dv_pieces, dv):
        dv_ref[:, pl.ds(s0, w)] = a


def use_inverted(cfg, geo) -> bool:
    """The dk/dv path: `cfg.dkdv`, "auto" = inverted iff block_size > 1."""
    return cfg.dkdv == "inverted" or (cfg.dkdv == "auto" and geo.block_size > 1)


def _dkdv_inverted(st, geo, cfg, qg, kp, vp, do, lse_r, delta_r, kv_pos_p, q_pos, indices):
    """dk `[B, nblk * block_size, Hkv, D_p]`, dv likewise (k's / v's dtype): per-chunk float32
    partials (`dkdv_chunks`, grid (C, B, Hkv)), then `_sum_kernel` adds each block's chunks
    in order (grid (nblk, B, Hkv); deterministic, no atomics). The partial buffer is
    `B * Hkv * C * R * (D_p + Dv_p)` float32: 512 MiB at NSA's 64K shape (Hkv 4, 1024 blocks
    of 64, K 16, D 128, cap 1024 -> C = 2048), written and read once (~0.3 ms at H200
    bandwidth)."""
    b, t = qg.shape[:2]
    d_p, dv_p = qg.shape[-1], do.shape[-1]
    tokens, start, count = inverted_index(indices, q_pos, geo.nblk)
    entries = indices.shape[1] * indices.shape[3]
    nchunk = geo.nblk + entries // cfg.dkdv_chunk
    blk, first, n, chunk0, nch = dkdv_chunks(start, count, b, geo.hkv, geo.nblk, entries, cfg.dkdv_chunk)
    whole = pl.BlockSpec()
    per_head_q = lambda width: pl.BlockSpec((None, t, None, geo.group_p, width),  # noqa: E731
                                            lambda c, b_, h: (b_, 0, h, 0, 0))
    per_head_r = pl.BlockSpec((None, t, None, geo.group_p), lambda c, b_, h: (b_, 0, h, 0))
    per_head_kv = lambda width: pl.BlockSpec((None, geo.s_p, None, width),  # noqa: E731
                                             lambda c, b_, h: (b_, 0, h, 0))
    out_spec = lambda width: pl.BlockSpec((None, None, None, geo.rows, width),  # noqa: E731
                                          lambda c, b_, h: (b_, h, c, 0, 0))
    out_shape = lambda width: jax.ShapeDtypeStruct(  # noqa: E731
        (b, geo.hkv, nchunk, geo.rows, width), jnp.float32)
    width = sum(w for _, w in geo.d_pieces + geo.dv_pieces)
    num_warps = cfg.num_warps_bwd or (8 if geo.rows * width > 16384 else 4)
    dk, dv = pl.pallas_call(
        functools.partial(_kv_kernel, geo=geo, scale=st.scale, softcap=st.softcap, nchunk=nchunk),
        grid=(nchunk, b, geo.hkv),
        in_specs=[whole, whole, whole, whole, whole,
                  pl.BlockSpec((None, geo.s_p), lambda c, b_, h: (b_, 0)),
                  per_head_q(d_p), per_head_q(dv_p), per_head_r, per_head_r,
                  per_head_kv(d_p), per_head_kv(dv_p)],
        out_specs=[out_spec(d_p), out_spec(dv_p)],
        out_shape=[out_shape(d_p), out_shape(dv_p)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=cfg.num_stages_bwd),
        interpret=st.interpret,
        name="token_sparse_bwd_dkdv",
    )(blk, first, n, tokens, q_pos.reshape(-1), kv_pos_p, qg, do, lse_r, delta_r, kp, vp)

    part_spec = lambda width: pl.BlockSpec((None, None, nchunk, geo.rows, width),  # noqa: E731
                                           lambda j, b_, h: (b_, h, 0, 0, 0))
    blk_spec = lambda width: pl.BlockSpec((None, None, None, geo.rows, width),  # noqa: E731
                                          lambda j, b_, h: (b_, j, h, 0, 0))
    blk_shape = lambda width, dtype: jax.ShapeDtypeStruct(  # noqa: E731
        (b, geo.nblk, geo.hkv, geo.rows, width), dtype)
    dk, dv = pl.pallas_call(
        functools.partial(_sum_kernel, geo=geo),
        grid=(geo.nblk, b, geo.hkv),
        in_specs=[whole, whole, part_spec(d_p), part_spec(dv_p)],
        out_specs=[blk_spec(d_p), blk_spec(dv_p)],
        out_shape=[blk_shape(d_p, kp.dtype), blk_shape(dv_p, vp.dtype)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=st.interpret,
        name="token_sparse_bwd_dkdv_sum",
    )(chunk0, nch, dk, dv)
    flat = lambda x: x[:, :, :, :geo.block_size].transpose(0, 1, 3, 2, 4).reshape(  # noqa: E731
        b, geo.nblk * geo.block_size, geo.hkv, x.shape[-1])
    return flat(dk), flat(dv)


def backward(st, q, k, v, dout, q_pos, kv_pos, q_seg, kv_seg, lse2, delta, indices):
    """`(dq, dk, dv)` like q, k, v. With `geo.value_is_key_prefix` (atomic path only, else
    ValueError) dk's first Dv columns hold `dk + dv` and dv is zeros: the caller's gradient
    of the shared array is dk's prefix (MLA: `dc_kv = dk[..., :Dc]`)."""
    del q_seg, kv_seg
    cfg, geo = st.config
    geo = geometry(q, k, v, indices, geo.block_size, geo.causal, cfg.block_k_bwd, cfg.max_rows,
                   geo.value_is_key_prefix)
    b, t, h, d = q.shape
    s, dv = k.shape[1], v.shape[3]
    qg, kp, vp, kv_pos_p, idx, n_iter, q_pos_f = prepare(geo, q, k, v, q_pos, kv_pos, indices)
    sp = specs(geo, b)
    do = group_view(blocks.pad_axis(dout, sp["dv_p"], 3), geo)
    rows_view = lambda x, fill: blocks.pad_axis(  # noqa: E731  [B, H, T] -> [B, T, Hkv, G_p]
        x.transpose(0, 2, 1).reshape(b, t, geo.hkv, geo.group), geo.group_p, 3, fill)
    lse_r, delta_r = rows_view(lse2, 1e30), rows_view(delta, 0.0)
    atomic = not use_inverted(cfg, geo)
    fold = geo.value_is_key_prefix           # dv added into dk's first columns, v never read
    if fold and not atomic:
        raise ValueError("value_is_key_prefix needs the atomic dk/dv path (token indices, "
                         f"TritonConfig.dkdv 'auto' or 'atomic'), got dkdv={cfg.dkdv!r}, "
                         f"block_size={geo.block_size}")
    in_specs = [sp["whole"], sp["whole"], sp["idx"], sp["kpos"], sp["q"], sp["k"],
                None if fold else sp["v"], sp["o"], sp["row"], sp["row"]]
    operands = [n_iter, q_pos_f, idx, kv_pos_p, qg, kp, None if fold else vp, do, lse_r, delta_r]
    out_specs, out_shape, aliases = [sp["q"]], [jax.ShapeDtypeStruct(qg.shape, q.dtype)], {}
    if atomic:
        acc_spec = lambda width: pl.BlockSpec((None, geo.s_p + 1, None, width),  # noqa: E731
                                              lambda t_, b_, hh: (b_, 0, lax.div(hh, jnp.int32(geo.split)), 0))
        widths = (sp["d_p"],) if fold else (sp["d_p"], sp["dv_p"])
        acc = [jnp.zeros((b, geo.s_p + 1, geo.hkv, w), jnp.float32) for w in widths]
        in_specs += [acc_spec(w) for w in widths]
        operands += acc
        out_specs += [acc_spec(w) for w in widths]
        out_shape += [jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in acc]
        first_acc = sum(x is not None for x in operands) - len(acc)   # a None operand is no input
        aliases = {first_acc + i: 1 + i for i in range(len(acc))}
    res = pl.pallas_call(
        functools.partial(_query_kernel, geo=geo, scale=st.scale, softcap=st.softcap,
                          interpret=bool(st.interpret), atomic=atomic),
        grid=sp["grid"], in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=warps(cfg.num_warps_bwd, geo, backward=True),
                                             num_stages=cfg.num_stages_bwd),
        interpret=st.interpret,
        name="token_sparse_bwd" if atomic else "token_sparse_bwd_dq",
    )(*operands)
    dq = res[0][:, :, :, :geo.group, :d].reshape(b, t, h, d)
    if fold:
        return dq, res[1][:, :s, :, :d].astype(k.dtype), jnp.zeros_like(v)
    if atomic:
        dk, dv_ = res[1], res[2]
    else:
        dk, dv_ = _dkdv_inverted(st, geo, cfg, qg, kp, vp, do, lse_r, delta_r, kv_pos_p,
                                 q_pos, idx)
    return dq, dk[:, :s, :, :d].astype(k.dtype), dv_[:, :s, :, :dv].astype(v.dtype)
