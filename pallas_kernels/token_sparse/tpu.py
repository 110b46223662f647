"""`token_sparse` on TPU: Pallas Mosaic kernels with manual DMA gathers, forward and backward.

Forward, grid `(B, Hkv, T, steps)`, the last axis the reduction ("arbitrary"). A step takes
the next `E = max(1, block_k // block_size)` listed entries of the row (`block_size == 1`: E
token indices; else E blocks) and gathers their K/V rows (and key positions) from HBM into
VMEM with one async copy per entry (`_gather`), then folds the `[E * block_size, D]` tile
into the FlashAttention-2 online softmax (arXiv 2307.08691) of the `G = H / Hkv` query heads
of the kv head, stacked as rows (group-centric, as NSA's kernel, arXiv 2502.11089: one load
serves the group). Unlisted entries copy block 0 and mark its positions -1 (invisible);
steps past the row's last listed entry are skipped (no DMA).

Backward (FlashAttention-2, Alg. 2: `P = exp2(S2 - lse2)` recomputed from the forward's lse,
`dS = P (dO V^T - delta)`; `delta = rowsum(dO * O) - dlse` is one fused XLA reduction in
`flash.autodiff`, as for the other TPU kernels):

* dq: `_dq_kernel`, the forward's grid and gathers, dq accumulated in VMEM scratch.
* dk/dv: TPU has no atomics, so the traversal is inverted (`tpu_vjp.py`): one program per
  (batch, kv head, KV block) gathers by DMA the q / dO / lse / delta of the query tokens that
  listed the block (the Triton path's `inverted_index`), dk/dv in VMEM scratch, written once.
* token indices (block_size 1): by default (`TpuConfig.backward="auto"`) the jnp backward
  `tpu_vjp.xla_backward` (gathers, XLA scatter-add), as the Triton path keeps atomics for
  them: the inverted kernel's traffic is G times the forward's there (`tpu_vjp.py`);
  `backward="mosaic"` runs the kernels (tested) for any block size.

A query row's index list, step count and query position (`row_table`, `[B, Hkv, T, K_p +
2]`) come in SMEM blocks of `TABLE_ROWS` = 8 rows (a whole DSA table, `[B, T, Hkv, 2048]`,
is far too large to scalar-prefetch; a block of one row breaks the TPU lowering's (8, 128)
block-shape rule). KV stays in HBM (`pl.ANY`), viewed `[B, S, Hkv * D]`, never copied.

Checked in `pltpu.InterpretParams()` mode on CPU, and lowered through Pallas' TPU lowering
for a v5e on CPU (bf16, the NSA and DSA head shapes; `tests/test_token_sparse_tpu.py`), which
enforces the block-shape rules: G must be a multiple of 8 or G = H (the `[G, D]` query
tiles). The Mosaic compiler proper, speed (the gathers are not double-buffered) and the
numerics on hardware are unverified: this workplace has no TPU.
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
from pallas_kernels.tiles_common import LOG2E, MASK_VALUE, NN, NT, logits2
from pallas_kernels.tiles_tpu import dot, fold_tile, write_normalized
from pallas_kernels.token_sparse import tpu_vjp

TABLE_ROWS = tpu_vjp.TABLE_ROWS
BACKWARDS = ("auto", "mosaic", "xla")


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """`block_k`: key rows gathered per forward / dq grid step (at least one whole block);
    `block_q_dkv`: query rows (listing query tokens x G heads) gathered per dk/dv step;
    `backward`: "mosaic" (the kernels), "xla" (`tpu_vjp.xla_backward`) or "auto" (mosaic
    iff block_size > 1: see `tpu_vjp.py` on token indices);
    `backward_budget`: gathered elements per query chunk of the "xla" backward."""

    block_k: int = 128
    block_q_dkv: int = 128
    backward: str = "auto"
    backward_budget: int = 1 << 24

    def __post_init__(self):
        if self.block_k < 1 or self.block_q_dkv < 1 or self.backward_budget < 1:
            raise ValueError(f"block_k, block_q_dkv and backward_budget must be >= 1, got "
                             f"{self.block_k}, {self.block_q_dkv}, {self.backward_budget}")
        if self.backward not in BACKWARDS:
            raise ValueError(f"backward must be one of {BACKWARDS}, got {self.backward!r}")


@dataclasses.dataclass(frozen=True)
class Geometry:
    hkv: int
    group: int
    d: int
    dv: int
    block_size: int
    per_step: int             # listed entries per forward / dq grid step
    k_p: int                  # entries per row, padded to whole steps
    nblk: int
    causal: bool
    pairs: int                # listing query tokens per dk/dv step
    backward: str             # "mosaic" | "xla" ("auto" resolved)
    backward_budget: int


def geometry(q, k, v, indices, block_size: int, causal: bool, cfg: TpuConfig) -> Geometry:
    per_step = min(max(1, cfg.block_k // block_size), indices.shape[3])
    group = q.shape[2] // k.shape[2]
    return Geometry(hkv=k.shape[2], group=group, d=q.shape[3], dv=v.shape[3],
                    block_size=block_size, per_step=per_step,
                    k_p=blocks.round_up(indices.shape[3], per_step),
                    nblk=-(-k.shape[1] // block_size), causal=causal,
                    pairs=min(max(1, cfg.block_q_dkv // group), q.shape[1]),
                    backward=("mosaic" if block_size > 1 else "xla") if cfg.backward == "auto"
                    else cfg.backward, backward_budget=cfg.backward_budget)


def _gather(geo: Geometry, idx_ref, b, h, c, k_hbm, v_hbm, kpos_hbm, kbuf, vbuf, pbuf, sem):
    """DMA the K rows `kbuf [E * bs, D]`, V rows `vbuf [E * bs, Dv]` and key positions
    `pbuf [1, E * bs]` of step c's E entries; unlisted entries read block 0, positions -1."""
    bs, e = geo.block_size, geo.per_step

    def entry(i):
        """(listed?, first key slot) of entry i of this step."""
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

    lax.fori_loop(0, e, start, None)
    lax.fori_loop(0, e, wait, None)
    lax.fori_loop(0, e, hide_unlisted, None)


def _row(geo: Geometry, tab_ref):
    """This query row's table row (entries, step count, query position) in the SMEM block
    of `TABLE_ROWS` rows: `(row ref [K_p + 2], step count, query position)`."""
    row = tab_ref.at[pl.program_id(2) % TABLE_ROWS]
    return row, row[geo.k_p], row[geo.k_p + 1]


def _visible(geo: Geometry, q_pos, kp):
    """bool `[1, R]`: key positions `kp [1, R]` seen by the query at `q_pos` (scalar)."""
    vis = (kp >= 0) & (q_pos >= 0)
    return vis & (kp <= q_pos) if geo.causal else vis


def _fwd_kernel(tab_ref, sink_ref, q_ref, k_hbm, v_hbm, kpos_hbm, o_ref, lse_ref, kbuf, vbuf,
                pbuf, sem, m_sc, l_sc, acc_sc, *, geo: Geometry, scale, softcap):
    b, h, c = pl.program_id(0), pl.program_id(1), pl.program_id(3)
    g = geo.group
    row, n_steps, q_pos = _row(geo, tab_ref)

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

    @pl.when(c < n_steps)
    def _step():
        _gather(geo, row, b, h, c, k_hbm, v_hbm, kpos_hbm, kbuf, vbuf, pbuf, sem)
        vis = _visible(geo, q_pos, pbuf[...])
        s, _ = logits2(dot(q_ref[...], kbuf[...], NT), scale, softcap)
        s = jnp.where(vis, s, MASK_VALUE)
        fold_tile(m_sc, l_sc, acc_sc, s, vis, vbuf[...])

    @pl.when(c == pl.num_programs(3) - 1)
    def _finish():
        write_normalized(m_sc, l_sc, acc_sc, o_ref, lse_ref)


def _dq_kernel(tab_ref, q_ref, do_ref, lse_ref, delta_ref, k_hbm, v_hbm, kpos_hbm, dq_ref,
               kbuf, vbuf, pbuf, sem, dq_sc, *, geo: Geometry, scale, softcap):
    """dq `[G, D]` of one (batch, kv head, query token) over its listed entries."""
    b, h, c = pl.program_id(0), pl.program_id(1), pl.program_id(3)
    row, n_steps, q_pos = _row(geo, tab_ref)

    @pl.when(c == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(c < n_steps)
    def _step():
        _gather(geo, row, b, h, c, k_hbm, v_hbm, kpos_hbm, kbuf, vbuf, pbuf, sem)
        vis = _visible(geo, q_pos, pbuf[...])
        k = kbuf[...]
        s2, tanh = logits2(dot(q_ref[...], k, NT), scale, softcap)
        p = jnp.where(vis, jnp.exp2(s2 - lse_ref[...]), 0.0)                  # [G, R]
        ds = p * (dot(do_ref[...], vbuf[...], NT) - delta_ref[...])
        if tanh is not None:
            ds = ds * (1.0 - tanh * tanh)
        dq_sc[...] += dot(ds.astype(k.dtype), k, NN)

    @pl.when(c == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def kv_views(geo: Geometry, k, v, kv_pos):
    """K `[B, S_p, Hkv * D]`, V `[B, S_p, Hkv * Dv]` (S padded to whole blocks) and key
    positions `[B, 1, S_p]` (-1 on the padding): the HBM operands the kernels gather from."""
    b = k.shape[0]
    s_p = geo.nblk * geo.block_size
    return (blocks.pad_axis(k, s_p, 1).reshape(b, s_p, geo.hkv * geo.d),
            blocks.pad_axis(v, s_p, 1).reshape(b, s_p, geo.hkv * geo.dv),
            blocks.pad_axis(kv_pos, s_p, 1, -1)[:, None, :])


def row_table(geo: Geometry, indices, q_pos):
    """int32 `[B, Hkv, T_p, K_p + 2]` (T padded to whole `TABLE_ROWS`): each query row's
    entries (padded with -1 to whole steps), its step count (up to the last listed entry;
    0 on the padding) and its query position."""
    idx = blocks.pad_axis(indices, geo.k_p, 3, -1)
    listed = (idx >= 0) & (idx < geo.nblk)
    last = jnp.max(jnp.where(listed, jnp.arange(1, geo.k_p + 1, dtype=jnp.int32), 0), axis=-1)
    n_steps = (last + geo.per_step - 1) // geo.per_step                     # [B, T, Hkv]
    q_pos = jnp.broadcast_to(q_pos[:, :, None], n_steps.shape)
    tab = jnp.concatenate([idx, n_steps[..., None], q_pos[..., None]], axis=-1)
    return blocks.pad_axis(tab.transpose(0, 2, 1, 3), blocks.round_up(tab.shape[1], TABLE_ROWS),
                           2, 0)


def _row_pass(geo: Geometry, st, kernel, name, indices, q_pos, k, v, kv_pos, *, pre, blocked,
              out, scratch):
    """`pallas_call` of a query-centric kernel on grid `(B, Hkv, T, steps)`. Inputs: the
    `row_table` in SMEM blocks of `TABLE_ROWS` query rows (a block of one row would break
    the TPU lowering's (8, 128) block-shape rule; a whole DSA table, `[B, T, Hkv, 2048]`, is
    far too large to scalar-prefetch), `pre` (whole-array SMEM inputs), the `blocked`
    `[B, T, H, width]` inputs as `[G, width]` tiles, K, V, key positions (HBM); `out`
    `(dtype, width)` pairs give `[B, T, H, width]` outputs; `scratch` follows the gather
    buffers and their DMA semaphores."""
    b, t = q_pos.shape
    e = geo.per_step
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    table = pl.BlockSpec((None, None, TABLE_ROWS, geo.k_p + 2),
                         lambda b_, h_, t_, c: (b_, h_, t_ // TABLE_ROWS, 0),
                         memory_space=pltpu.SMEM)
    tile = lambda width: pl.BlockSpec((None, None, geo.group, width),  # noqa: E731
                                      lambda b_, h_, t_, c: (b_, t_, h_, 0))
    rows = e * geo.block_size
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=0, grid=(b, geo.hkv, t, geo.k_p // e),
        in_specs=[table, *[None if x is None else pl.BlockSpec(memory_space=pltpu.SMEM)
                           for x in pre],
                  *[tile(x.shape[3]) for x in blocked], hbm, hbm, hbm],
        out_specs=[tile(width) for _, width in out],
        scratch_shapes=[pltpu.VMEM((rows, geo.d), k.dtype), pltpu.VMEM((rows, geo.dv), v.dtype),
                        pltpu.VMEM((1, rows), jnp.int32), pltpu.SemaphoreType.DMA((3,)),
                        *scratch])
    h = geo.hkv * geo.group
    return pl.pallas_call(
        functools.partial(kernel, geo=geo, scale=st.scale, softcap=st.softcap),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, t, h, width), dtype) for dtype, width in out],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=st.interpret, name=name,
    )(row_table(geo, indices, q_pos), *pre, *blocked, *kv_views(geo, k, v, kv_pos))


def forward(st, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg, indices):
    """Unpadded `[B, T, H, D]` in, `(out [B, T, H, Dv], lse [B, H, T])` out."""
    del q_seg, kv_seg
    geo = st.config
    g = geo.group
    out, lse = _row_pass(
        geo, st, _fwd_kernel, "token_sparse_fwd_tpu", indices, q_pos, k, v, kv_pos,
        pre=[sinks], blocked=[q], out=[(q.dtype, geo.dv), (jnp.float32, 1)],
        scratch=[pltpu.VMEM((g, 1), jnp.float32), pltpu.VMEM((g, 1), jnp.float32),
                 pltpu.VMEM((g, geo.dv), jnp.float32)])
    return out, lse[..., 0].transpose(0, 2, 1)


def backward(st, q, k, v, dout, q_pos, kv_pos, q_seg, kv_seg, lse2, delta, indices):
    """`(dq, dk, dv)` in q's / k's / v's dtype: the dq kernel, then the inverted dk/dv."""
    if st.config.backward == "xla":
        return tpu_vjp.xla_backward(st, q, k, v, dout, q_pos, kv_pos, q_seg, kv_seg, lse2,
                                    delta, indices)
    geo = st.config
    rows = lambda x: x.transpose(0, 2, 1)[..., None]  # noqa: E731  [B, H, T] -> [B, T, H, 1]
    (dq,) = _row_pass(
        geo, st, _dq_kernel, "token_sparse_bwd_dq_tpu", indices, q_pos, k, v, kv_pos, pre=[],
        blocked=[q, dout, rows(lse2), rows(delta)], out=[(q.dtype, geo.d)],
        scratch=[pltpu.VMEM((geo.group, geo.d), jnp.float32)])
    dk, dv = tpu_vjp.dkdv(st, q, dout, lse2, delta, q_pos, indices,
                          *kv_views(geo, k, v, kv_pos))
    s = k.shape[1]
    return dq, dk[:, :s].astype(k.dtype), dv[:, :s].astype(v.dtype)


def static(q, k, v, indices, *, block_size, causal, has_sinks, softcap, scale, interpret,
           config: TpuConfig | None) -> autodiff.Static:
    """The `autodiff.Static` of one call (`interpret=True` -> `pltpu.InterpretParams()`)."""
    if interpret is True:
        interpret = pltpu.InterpretParams()
    return autodiff.Static(
        forward=forward, backward=backward, mask_fn=None, scale=float(scale),
        softcap=None if softcap is None else float(softcap), has_sinks=has_sinks,
        config=geometry(q, k, v, indices, block_size, causal, config or TpuConfig()),
        interpret=interpret or False)


def token_sparse_tpu(q, k, v, indices, *, block_size, q_positions, kv_positions, causal,
                     sink_logits, softcap, scale, return_lse, interpret=False,
                     config: TpuConfig | None = None):
    """`token_sparse_reference`'s contract on Mosaic TPU, forward and backward."""
    st = static(q, k, v, indices, block_size=block_size, causal=causal,
                has_sinks=sink_logits is not None, softcap=softcap, scale=scale,
                interpret=interpret, config=config)
    return autodiff.attention(st, q, k, v, sink_logits=sink_logits, q_positions=q_positions,
                              kv_positions=kv_positions, q_segment_ids=None, kv_segment_ids=None,
                              return_lse=return_lse, aux=(indices,))


# Backend declaration for `pallas_kernels.common.resolve`: a TPU (or interpret mode); every call the api
# accepts; tiles `TpuConfig`.
CONFIG = TpuConfig
