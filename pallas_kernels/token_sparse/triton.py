"""`token_sparse` forward on GPU: Pallas with the Triton lowering, group-centric.

One program per (query token, batch, kv head). It holds the `G = H / Hkv` query heads of
its kv group as the rows of one tile (`[G_p, D]`, G padded to >= 16 rows for the tensor-core
dot), so every KV row it gathers serves the whole group (NSA's group-centric selection,
arXiv 2502.11089 Sec. 3.4; DSA's MQA form reads the one latent KV head once for all 64
query heads). When the group's q tile and accumulator would not fit in registers (DSA:
64 x (576 + 512)), the rows are split over `split` programs (`row_split`), each reading the
same KV rows (the second read mostly hits L2). Per iteration it reads

* `block_size == 1`: `block_k` listed token indices and gathers those K/V rows;
* `block_size > 1`: one listed block, `block_size` contiguous K/V rows;

and folds them in with the FlashAttention-2 online softmax (arXiv 2307.08691) in base 2;
a learned sink logit starts the running max and denominator. Visibility: listed entry
(>= 0, < number of blocks), key position >= 0, query position >= 0 and, with `causal`,
`kv_pos <= q_pos`. The loop stops after the tile of the row's last listed entry.

Head dims are padded to a multiple of 16 and split into power-of-two pieces (576 = 512 + 64:
the DSA latent costs no padding). The backward pass is in `triton_vjp.py` (dq in the same
traversal; dk/dv per KV block over an inverted index, or by float32 atomic adds); the
custom_vjp wiring is `flash.autodiff`'s.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash import autodiff, blocks
from pallas_kernels.tiles_common import LOG2E, MASK_VALUE, NN, NT, logits2
from pallas_kernels.tiles_triton import pieces, row_split


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """`block_k`: gathered token rows per iteration (block_size == 1; capped to K);
    `num_warps*` 0: auto (`warps`: 4 in the forward; the backward 8 when a program's q tile and
    accumulator exceed 16K elements, else 4).
    `dkdv`: how the backward gets dk/dv: "inverted" (one program per KV block over the
    query tokens that listed it, no atomics), "atomic" (scattered from the query-centric
    pass), "auto" (inverted iff block_size > 1: with token indices a KV block is one row, and
    each (query, row) pair would reload the query's whole q/dO group tile for one key).
    `dkdv_chunk`: the inverted path's most query tokens per program: a KV block listed by
    more is split over several programs whose float32 partials are summed (NSA lists its
    forced blocks in every query). 1024: loading the block's K/V once costs about as much as
    4 of its tokens (64 rows vs a 16-row q/dO tile), and at 64K tokens block 0's 64 chunks are
    no longer than an average block (~1M entries per kv head / 1024 blocks)."""

    block_k: int = 32
    max_rows: int = 0          # query rows (heads) per program; 0: auto (see `row_split`)
    num_warps: int = 0
    num_stages: int = 2
    block_k_bwd: int = 32
    num_warps_bwd: int = 0
    num_stages_bwd: int = 1
    dkdv: str = "auto"
    dkdv_chunk: int = 1024

    def __post_init__(self):
        if self.dkdv not in ("auto", "inverted", "atomic"):
            raise ValueError(f"dkdv must be 'auto', 'inverted' or 'atomic', got {self.dkdv!r}")
        if not (isinstance(self.dkdv_chunk, int) and self.dkdv_chunk >= 1):
            raise ValueError(f"dkdv_chunk must be an int >= 1, got {self.dkdv_chunk!r}")
        pow2 = lambda x: x > 0 and x & (x - 1) == 0  # noqa: E731
        for name in ("block_k", "block_k_bwd"):
            if not (pow2(getattr(self, name)) and getattr(self, name) >= 16):
                raise ValueError(f"{name} must be a power of two >= 16, got {getattr(self, name)}")
        if self.max_rows and not (pow2(self.max_rows) and self.max_rows >= 16):
            raise ValueError(f"max_rows must be 0 (auto) or a power of two >= 16, got {self.max_rows}")
        for name in ("num_warps", "num_warps_bwd"):
            if getattr(self, name) and not pow2(getattr(self, name)):
                raise ValueError(f"{name} must be 0 (auto) or a power of two, got {getattr(self, name)}")
        for name in ("num_stages", "num_stages_bwd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static sizes of one call (hashable)."""

    t: int                    # query tokens
    s_p: int                  # padded key slots
    hkv: int
    group: int                # G = H / Hkv
    group_p: int              # G padded to a power of two >= 16
    rows_q: int               # query rows per program (a power of two dividing group_p)
    split: int                # programs per kv head: group_p // rows_q
    d_pieces: tuple           # (start, width) power-of-two pieces of the padded head dim
    dv_pieces: tuple
    block_size: int
    rows: int                 # key rows per iteration
    per_iter: int             # listed entries per iteration
    k_p: int                  # padded entries per row
    nblk: int                 # number of KV blocks of the unpadded keys
    causal: bool
    value_is_key_prefix: bool = False   # v == k[..., :Dv] (MLA's latent): see `geometry`


def warps(requested: int, geo: "Geometry", *, backward: bool = False) -> int:
    """`requested`, or for 0 the auto choice: 4 in the forward; in the backward 8 when the
    per-program register footprint (q tile + accumulator) exceeds 16K elements, else 4.
    H200, DSA shape (64 heads in 2 x 32 rows, D 576 / Dv 512, 2048 tokens) at 16K, same run:
    forward 25.6 ms with 4 warps, 51.1 ms with 8; the backward was slower with 4."""
    if requested:
        return requested
    width = sum(w for _, w in geo.d_pieces + geo.dv_pieces)
    return 8 if backward and geo.rows_q * width > 16384 else 4


def value_pieces_lead(d: int, dv: int) -> bool:
    """Whether the padded value width's power-of-two pieces are the first of the padded key
    width's, the layout `value_is_key_prefix` needs (576 = 512 + 64 with Dv 512, 192 = 128 +
    64 with Dv 128: yes; 128 with Dv 64, 48 = 32 + 16 with Dv 16: no)."""
    d_pieces, dv_pieces = pieces(blocks.round_up(d, 16)), pieces(blocks.round_up(dv, 16))
    return d_pieces[:len(dv_pieces)] == dv_pieces


def geometry(q, k, v, indices, block_size: int, causal: bool, block_k: int,
             max_rows: int = 0, value_is_key_prefix: bool = False) -> Geometry:
    """The static sizes of a call. `value_is_key_prefix`: the caller promises `v == k[...,
    :Dv]` (MLA: values are the latent c_kv, keys `[c_kv | k_rope]`); the atomic backward
    then reads the values from k's rows and adds dv into dk's first Dv columns before one
    scatter (`triton_vjp`). Needs v's head-dim pieces to be the first of k's (576 = 512 + 64
    with Dv 512; not 48 = 32 + 16 with Dv 16) and v's dtype k's: ValueError otherwise."""
    t, h, d = q.shape[1], q.shape[2], q.shape[3]
    s, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    nblk = -(-s // block_size)
    n = indices.shape[3]
    if block_size == 1:
        rows = per_iter = blocks.pow2_block(block_k, n)
        s_p = s
    else:
        rows, per_iter = max(16, blocks.pl_next_pow2(block_size)), 1
        s_p = nblk * block_size + rows - block_size     # a block's rows never run off the end
    group_p = max(16, blocks.pl_next_pow2(h // hkv))
    d_p, dv_p = blocks.round_up(d, 16), blocks.round_up(dv, 16)
    rows_q = row_split(group_p, d_p + dv_p, max_rows)
    d_pieces, dv_pieces = pieces(d_p), pieces(dv_p)
    if value_is_key_prefix and (not value_pieces_lead(d, dv) or k.dtype != v.dtype):
        raise ValueError(f"value_is_key_prefix needs v's head-dim pieces {dv_pieces} to be the first "
                         f"of k's {d_pieces} and v's dtype ({v.dtype}) to be k's ({k.dtype})")
    return Geometry(t=t, s_p=s_p, hkv=hkv, group=h // hkv, group_p=group_p, rows_q=rows_q,
                    split=group_p // rows_q, d_pieces=d_pieces, dv_pieces=dv_pieces,
                    block_size=block_size, rows=rows, per_iter=per_iter,
                    k_p=blocks.round_up(n, per_iter), nblk=nblk, causal=causal,
                    value_is_key_prefix=value_is_key_prefix)


def prepare(geo: Geometry, q, k, v, q_pos, kv_pos, indices):
    """Padded kernel operands: q `[B, T, Hkv, G_p, D_p]`, k/v `[B, S_p, Hkv, D_p]`, kv_pos
    `[B, S_p]` (-1 pads), indices `[B, T, Hkv, K_p]` (-1 pads), the per-row iteration count
    `[B * T * Hkv]` and q_pos flattened `[B * T]`."""
    b, t, h, d = q.shape
    d_p = blocks.round_up(d, 16)
    dv_p = blocks.round_up(v.shape[3], 16)
    qg = blocks.pad_axis(q, d_p, 3).reshape(b, t, geo.hkv, geo.group, d_p)
    qg = blocks.pad_axis(qg, geo.group_p, 3)
    k = blocks.pad_axis(blocks.pad_axis(k, geo.s_p, 1), d_p, 3)
    v = blocks.pad_axis(blocks.pad_axis(v, geo.s_p, 1), dv_p, 3)
    kv_pos = blocks.pad_axis(kv_pos, geo.s_p, 1, -1)
    indices = blocks.pad_axis(indices, geo.k_p, 3, -1)
    listed = (indices >= 0) & (indices < geo.nblk)
    last = jnp.max(jnp.where(listed, jnp.arange(1, geo.k_p + 1, dtype=jnp.int32), 0), axis=-1)
    n_iter = (last + geo.per_iter - 1) // geo.per_iter
    return qg, k, v, kv_pos, indices, n_iter.reshape(-1), q_pos.reshape(-1)


def group_view(x, geo: Geometry):
    """`[B, T, H, ...] -> [B, T, Hkv, G_p, ...]` (padded rows zero)."""
    b, t = x.shape[:2]
    x = x.reshape(b, t, geo.hkv, geo.group, *x.shape[3:])
    return blocks.pad_axis(x, geo.group_p, 3)


def tile(geo: Geometry, idx_ref, kpos_ref, j, q_pos):
    """Key rows of iteration j: `(rows [R] int32 in [0, S_p), listed [R], visible [1, R])`."""
    r = jnp.arange(geo.rows, dtype=jnp.int32)
    if geo.block_size == 1:
        blk = idx_ref[pl.ds(pl.multiple_of(j * geo.per_iter, geo.per_iter), geo.per_iter)]
        listed = (blk >= 0) & (blk < geo.nblk)
        rows = jnp.where(listed, blk, 0)
    else:
        blk = idx_ref[j]
        ok = (blk >= 0) & (blk < geo.nblk)
        rows = jnp.where(ok, blk, 0) * geo.block_size + r
        listed = ok & (r < geo.block_size)
    kp = kpos_ref[rows]
    vis = listed & (kp >= 0) & (q_pos >= 0)
    if geo.causal:
        vis = vis & (kp <= q_pos)
    return rows, listed, vis[None, :]


def load_pieces(ref, rows, dims):
    """Gathered `[R, w]` pieces of `ref [S_p, D_p]` at `rows`."""
    return [ref[rows, pl.ds(start, w)] for start, w in dims]


def qk(q_pieces, k_pieces):
    s = None
    for a, b in zip(q_pieces, k_pieces):
        part = lax.dot_general(a, b, NT, preferred_element_type=jnp.float32)
        s = part if s is None else s + part
    return s


def _fwd_kernel(cnt_ref, qpos_ref, sink_ref, idx_ref, kpos_ref, q_ref, k_ref, v_ref, o_ref,
                lse_ref, *, geo: Geometry, scale, softcap):
    t, b, h = pl.program_id(0), pl.program_id(1), lax.div(pl.program_id(2), jnp.int32(geo.split))
    n_iter = cnt_ref[(b * geo.t + t) * geo.hkv + h]
    q_pos = qpos_ref[b * geo.t + t]
    qs = [q_ref[:, pl.ds(start, w)] for start, w in geo.d_pieces]
    rows_q = geo.rows_q
    if sink_ref is not None:
        m0 = sink_ref[...].astype(jnp.float32) * LOG2E
        l0 = jnp.ones((rows_q,), jnp.float32)
    else:
        m0 = jnp.full((rows_q,), MASK_VALUE, jnp.float32)
        l0 = jnp.zeros((rows_q,), jnp.float32)
    acc0 = tuple(jnp.zeros((rows_q, w), jnp.float32) for _, w in geo.dv_pieces)

    def step(j, carry):
        m, l, acc = carry
        rows, _, vis = tile(geo, idx_ref, kpos_ref, j, q_pos)
        s = qk(qs, load_pieces(k_ref, rows, geo.d_pieces))
        if softcap is None:
            c = scale * LOG2E
        else:
            s, c = logits2(s, scale, softcap)[0], 1.0
        s = jnp.where(vis, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1) * c)
        alpha = jnp.exp2(m - m_new)
        p = jnp.where(vis, jnp.exp2(s * c - m_new[:, None]), 0.0)
        vs = load_pieces(v_ref, rows, geo.dv_pieces)
        acc = tuple(a * alpha[:, None] + lax.dot_general(p.astype(vv.dtype), vv, NN,
                                                         preferred_element_type=jnp.float32)
                    for a, vv in zip(acc, vs))
        return m_new, l * alpha + p.sum(axis=-1), acc

    m, l, acc = lax.fori_loop(0, n_iter, step, (m0, l0, acc0))
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    for (start, w), a in zip(geo.dv_pieces, acc):
        o_ref[:, pl.ds(start, w)] = (a / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, (m + jnp.log2(l_safe)) * (1.0 / LOG2E), -jnp.inf)


def specs(geo: Geometry, b: int):
    """BlockSpecs shared by the forward and backward kernels, grid (T, B, Hkv)."""
    d_p = geo.d_pieces[-1][0] + geo.d_pieces[-1][1]
    dv_p = geo.dv_pieces[-1][0] + geo.dv_pieces[-1][1]
    whole = pl.BlockSpec()
    kv = lambda hh: lax.div(hh, jnp.int32(geo.split))  # noqa: E731   grid axis 2: (kv head, part)
    part = lambda hh: hh - kv(hh) * geo.split  # noqa: E731
    per_row = lambda *tail: pl.BlockSpec((None, None, None) + tail,  # noqa: E731
                                         lambda t, b_, hh: (b_, t, kv(hh)) + (0,) * len(tail))
    per_rows = lambda *tail: pl.BlockSpec((None, None, None, geo.rows_q) + tail,  # noqa: E731
                                          lambda t, b_, hh: (b_, t, kv(hh), part(hh)) + (0,) * len(tail))
    per_head = lambda width: pl.BlockSpec((None, geo.s_p, None, width),  # noqa: E731
                                          lambda t, b_, hh: (b_, 0, kv(hh), 0))
    return dict(whole=whole, idx=per_row(geo.k_p), q=per_rows(d_p), o=per_rows(dv_p),
                row=per_rows(), kpos=pl.BlockSpec((None, geo.s_p), lambda t, b_, hh: (b_, 0)),
                k=per_head(d_p), v=per_head(dv_p),
                sink=pl.BlockSpec((None, geo.rows_q), lambda t, b_, hh: (kv(hh), part(hh))),
                grid=(geo.t, b, geo.hkv * geo.split), d_p=d_p, dv_p=dv_p)


def forward(st, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg, indices):
    """Unpadded `[B, T, H, D]` in, `(out [B, T, H, Dv], lse [B, H, T])` out."""
    del q_seg, kv_seg
    cfg, geo = st.config
    b, t, h, _ = q.shape
    dv = v.shape[3]
    qg, kp, vp, kv_pos_p, idx, n_iter, q_pos_f = prepare(geo, q, k, v, q_pos, kv_pos, indices)
    sp = specs(geo, b)
    sink_rows = None
    if sinks is not None:
        sink_rows = blocks.pad_axis(sinks.reshape(geo.hkv, geo.group), geo.group_p, 1)
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, geo=geo, scale=st.scale, softcap=st.softcap),
        grid=sp["grid"],
        in_specs=[sp["whole"], sp["whole"], None if sinks is None else sp["sink"], sp["idx"],
                  sp["kpos"], sp["q"], sp["k"], sp["v"]],
        out_specs=[sp["o"], sp["row"]],
        out_shape=[jax.ShapeDtypeStruct((b, t, geo.hkv, geo.group_p, sp["dv_p"]), q.dtype),
                   jax.ShapeDtypeStruct((b, t, geo.hkv, geo.group_p), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=warps(cfg.num_warps, geo), num_stages=cfg.num_stages),
        interpret=st.interpret,
        name="token_sparse_fwd",
    )(n_iter, q_pos_f, sink_rows, idx, kv_pos_p, qg, kp, vp)
    out = out[:, :, :, :geo.group, :dv].reshape(b, t, h, dv)
    lse = lse[:, :, :, :geo.group].reshape(b, t, h).transpose(0, 2, 1)
    return out, lse


def token_sparse_triton(q, k, v, indices, *, block_size, q_positions, kv_positions, causal,
                        sink_logits, softcap, scale, return_lse, interpret=False,
                        config: TritonConfig | None = None):
    """`token_sparse_reference`'s contract on the Triton kernels (`interpret=True`: CPU)."""
    from pallas_kernels.token_sparse import triton_vjp  # noqa: PLC0415 - fwd file standalone

    cfg = config or TritonConfig()
    st = autodiff.Static(
        forward=forward, backward=triton_vjp.backward, mask_fn=None, scale=float(scale),
        softcap=None if softcap is None else float(softcap), has_sinks=sink_logits is not None,
        config=(cfg, geometry(q, k, v, indices, block_size, causal, cfg.block_k, cfg.max_rows)),
        interpret=bool(interpret))
    return autodiff.attention(st, q, k, v, sink_logits=sink_logits, q_positions=q_positions,
                              kv_positions=kv_positions, q_segment_ids=None, kv_segment_ids=None,
                              return_lse=return_lse, aux=(indices,))


# Backend declaration for `pallas_kernels.common.resolve`: a GPU (or interpret mode); every call the api
# accepts; tiles `TritonConfig`.
CONFIG = TritonConfig
