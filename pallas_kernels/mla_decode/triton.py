"""`mla_decode` on GPU: Pallas with the Triton lowering, split-K flash-decoding over the
latent cache (FlashAttention-2 online softmax, arXiv 2307.08691; flash-decoding's split).

Grid `(num_splits * parts, B, T)`. A program holds `rows_q` of the `H` absorbed query heads
of one query token as the rows of its tile (MQA: the one latent head serves them all);
when `H_p x (Dc_p + Dr_p + Dc_p)` would not fit in registers (DeepSeek's 64 heads x
(576 + 512)) the heads are split over `parts` programs (`token_sparse.triton.row_split`),
adjacent on the fastest grid axis so the second read of each row mostly hits L2. Each
program walks its share (split-K) of the row's tiles of `block_k` tokens:

* sparse: tile j = the slots `indices[b, t, j * block_k:(j + 1) * block_k]`, all K / block_k
  tiles (padding entries are masked; nothing runs before the kernel);
* dense: tile j = slots `[j * block_k, (j + 1) * block_k)`, up to the row's last visible
  slot (a partly filled cache is not read past its end).

Per tile it gathers the rows of `c_kv` (Dc) and `k_rope` (Dr) once, as power-of-two pieces
(512 and 64: no padding at the paper's sizes), scores `q_c c^T + q_r r^T` and accumulates
`p c` from the same loaded `c_kv` rows: `Dc + Dr` values per token, never the 1088 of
separate K and V arrays. Each split writes a partial `(out, lse)` (out in q's dtype by
default: bf16 partials halve the split-K traffic for one more rounding; lse float32);
`decode.layout.combine` merges them (with one split the partial is the result).

The cache is read in place; only when Dc or Dr is not a multiple of 16 (toy sizes) are the
feature axes zero-padded (an O(S) copy).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import AttentionOutput
from pallas_kernels.decode import layout
from pallas_kernels.flash import blocks
from pallas_kernels.mla_decode.layout import merge, row_tiles
from pallas_kernels.tiles_common import LOG2E, MASK_VALUE, NN, NT
from pallas_kernels.tiles_triton import pieces, row_split


@dataclasses.dataclass(frozen=True)
class MlaDecodeTritonConfig:
    """`block_k`: tokens gathered per iteration (power of two >= 16); `max_rows`: query heads
    per program (0: `row_split`'s register budget); `num_warps` 0: 8 for tiles over 16K
    elements, else 4; `split_target`: programs the split heuristic aims for;
    `min_tokens_per_split`: the fewest tokens a split gets from the heuristic (the partials,
    `splits x H x Dc` per query, are written and read again: at B=16, k=2048 four splits'
    bf16 partials add ~20% to the selected rows' bytes); `partial_dtype`: dtype of the
    per-split outputs (None: q's; lse always float32). `block_k` 0: 128 for 2-byte caches, 32
    for float32 (a float32 tile of 128 x 512 asks 370 KB of shared memory); from one H200
    run in bf16 (B=16, 128K cache, k=2048, H=64): 128 -> 67 us, 64 -> 75 us, 32 -> 95 us."""

    block_k: int = 0
    max_rows: int = 0
    num_warps: int = 0
    num_stages: int = 2
    split_target: int = 264
    min_tokens_per_split: int = 512
    partial_dtype: str | None = None

    def __post_init__(self):
        pow2 = lambda x: x > 0 and x & (x - 1) == 0  # noqa: E731
        if self.block_k and not (pow2(self.block_k) and self.block_k >= 16):
            raise ValueError(f"block_k must be 0 (auto) or a power of two >= 16, got {self.block_k}")
        if self.max_rows and not (pow2(self.max_rows) and self.max_rows >= 16):
            raise ValueError(f"max_rows must be 0 (auto) or a power of two >= 16, got {self.max_rows}")
        if self.num_warps and not pow2(self.num_warps):
            raise ValueError(f"num_warps must be 0 (auto) or a power of two, got {self.num_warps}")
        if self.num_stages < 1 or self.split_target < 1 or self.min_tokens_per_split < 1:
            raise ValueError("num_stages, split_target and min_tokens_per_split must be >= 1")
        if self.partial_dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"partial_dtype must be None, 'float32' or 'bfloat16', got {self.partial_dtype!r}")


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static sizes of one call (hashable)."""

    t: int
    s: int                    # cache slots
    h: int
    h_p: int                  # heads padded to a power of two >= 16
    rows_q: int               # heads per program
    parts: int                # programs per (query, split): h_p // rows_q
    dc_p: int
    c_pieces: tuple           # power-of-two (start, width) pieces of Dc_p
    r_pieces: tuple           # ... of Dr_p
    block_k: int
    sparse: bool
    k_p: int                  # listed entries padded to whole tiles (sparse)
    max_tiles: int
    num_splits: int


def geometry(q_abs, c_kv, k_rope, indices, cfg: MlaDecodeTritonConfig, num_splits) -> Geometry:
    b, t, h, _ = q_abs.shape
    s = c_kv.shape[1]
    dc_p, dr_p = blocks.round_up(c_kv.shape[2], 16), blocks.round_up(k_rope.shape[2], 16)
    h_p = max(16, blocks.pl_next_pow2(h))
    rows_q = row_split(h_p, dc_p + dr_p + dc_p, cfg.max_rows)
    n = s if indices is None else indices.shape[2]
    block_k = blocks.pow2_block(cfg.block_k or (128 if c_kv.dtype.itemsize <= 2 else 32), n)
    k_p = blocks.round_up(n, block_k)
    max_tiles = k_p // block_k
    if num_splits is None:
        per_split = layout.cdiv(cfg.min_tokens_per_split, block_k)
        want = layout.cdiv(cfg.split_target, b * t * (h_p // rows_q))
        num_splits = max(1, min(want, layout.cdiv(max_tiles, per_split)))
    return Geometry(t=t, s=s, h=h, h_p=h_p, rows_q=rows_q, parts=h_p // rows_q, dc_p=dc_p,
                    c_pieces=pieces(dc_p), r_pieces=pieces(dr_p), block_k=block_k,
                    sparse=indices is not None, k_p=k_p, max_tiles=max_tiles,
                    num_splits=min(int(num_splits), max_tiles))


def _kernel(nt_ref, qpos_ref, idx_ref, kpos_ref, q_ref, c_ref, r_ref, o_ref, lse_ref, *,
            geo: Geometry, scale):
    sp, b, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    split = lax.div(sp, jnp.int32(geo.parts))
    n_tiles = jnp.int32(geo.max_tiles) if nt_ref is None else nt_ref[b * geo.t + t]
    lo, hi = layout.split_range(n_tiles, split, geo.num_splits)
    q_pos = qpos_ref[b * geo.t + t]
    qcs = [q_ref[:, pl.ds(st, w)] for st, w in geo.c_pieces]
    qrs = [q_ref[:, pl.ds(geo.dc_p + st, w)] for st, w in geo.r_pieces]
    r = jnp.arange(geo.block_k, dtype=jnp.int32)
    c2 = scale * LOG2E

    def step(j, carry):
        m, l, acc = carry
        if geo.sparse:
            ent = idx_ref[pl.ds(pl.multiple_of(j * geo.block_k, geo.block_k), geo.block_k)]
            listed = (ent >= 0) & (ent < geo.s)
            rows = jnp.where(listed, ent, 0)
        else:
            slot = j * geo.block_k + r
            listed = slot < geo.s
            rows = jnp.minimum(slot, geo.s - 1)       # clamped gather: no masked loads
        kp = kpos_ref[rows]
        vis = (listed & (kp >= 0) & (kp <= q_pos) & (q_pos >= 0))[None, :]
        cs = [c_ref[rows, pl.ds(st, w)] for st, w in geo.c_pieces]
        s = None
        for a, kk in zip(qcs + qrs, cs + [r_ref[rows, pl.ds(st, w)] for st, w in geo.r_pieces]):
            part = lax.dot_general(a, kk, NT, preferred_element_type=jnp.float32)
            s = part if s is None else s + part
        s = jnp.where(vis, s * c2, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.where(vis, jnp.exp2(s - m_new[:, None]), 0.0)
        acc = tuple(a * alpha[:, None] + lax.dot_general(p.astype(cc.dtype), cc, NN,
                                                         preferred_element_type=jnp.float32)
                    for a, cc in zip(acc, cs))
        return m_new, l * alpha + p.sum(axis=-1), acc

    rq = geo.rows_q
    carry = (jnp.full((rq,), MASK_VALUE, jnp.float32), jnp.zeros((rq,), jnp.float32),
             tuple(jnp.zeros((rq, w), jnp.float32) for _, w in geo.c_pieces))
    m, l, acc = lax.fori_loop(lo, hi, step, carry)
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    for (st, w), a in zip(geo.c_pieces, acc):
        o_ref[:, pl.ds(st, w)] = (a / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, (m + jnp.log2(l_safe)) * (1.0 / LOG2E), -jnp.inf)


def partials(geo: Geometry, cfg: MlaDecodeTritonConfig, q_abs, c_kv, k_rope, indices, q_positions,
             kv_positions, scale, interpret):
    """`(o_part [B, splits, T, H_p, Dc_p]` in `cfg.partial_dtype` or q's,
    `lse_part [B, splits, T, H_p]` float32)."""
    b, t, h, _ = q_abs.shape
    dc, dr = c_kv.shape[2], k_rope.shape[2]
    dr_p = geo.r_pieces[-1][0] + geo.r_pieces[-1][1]
    q = blocks.pad_axis(q_abs, geo.h_p, 2)                 # no-op when H is a power of two >= 16
    if (dc, dr) != (geo.dc_p, dr_p):
        q = jnp.concatenate([blocks.pad_axis(q[..., :dc], geo.dc_p, 3), blocks.pad_axis(q[..., dc:], dr_p, 3)], -1)
    c_kv = blocks.pad_axis(c_kv, geo.dc_p, 2)            # no-ops unless Dc, Dr % 16 != 0
    k_rope = blocks.pad_axis(k_rope, dr_p, 2)
    # dense: stop at each row's last visible slot; sparse: every tile (no XLA pass over the
    # indices before the kernel; -1 padding is masked, and top-k lists are rarely padded)
    n_tiles = None if geo.sparse else row_tiles(indices, q_positions, kv_positions, geo.block_k)
    idx = None if indices is None else blocks.pad_axis(indices, geo.k_p, 2, -1).reshape(b * t, geo.k_p)
    parts, rq = geo.parts, geo.rows_q
    part = lambda sp: sp - lax.div(sp, jnp.int32(parts)) * parts  # noqa: E731
    split = lambda sp: lax.div(sp, jnp.int32(parts))  # noqa: E731
    whole = pl.BlockSpec()
    q_spec = lambda w: pl.BlockSpec((None, None, rq, w), lambda sp, b_, t_: (b_, t_, part(sp), 0))  # noqa: E731
    cache = lambda w: pl.BlockSpec((None, geo.s, w), lambda sp, b_, t_: (b_, 0, 0))  # noqa: E731
    in_specs = [None if n_tiles is None else whole, whole,
                None if idx is None else pl.BlockSpec((None, geo.k_p), lambda sp, b_, t_: (b_ * geo.t + t_, 0)),
                pl.BlockSpec((None, geo.s), lambda sp, b_, t_: (b_, 0)),
                q_spec(geo.dc_p + dr_p), cache(geo.dc_p), cache(dr_p)]
    out_specs = [
        pl.BlockSpec((None, None, None, rq, geo.dc_p), lambda sp, b_, t_: (b_, split(sp), t_, part(sp), 0)),
        pl.BlockSpec((None, None, None, rq), lambda sp, b_, t_: (b_, split(sp), t_, part(sp))),
    ]
    width = rq * (geo.dc_p + dr_p + geo.dc_p)
    return pl.pallas_call(
        functools.partial(_kernel, geo=geo, scale=scale),
        grid=(geo.num_splits * parts, b, t),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct((b, geo.num_splits, t, geo.h_p, geo.dc_p),
                                        cfg.partial_dtype or q_abs.dtype),
                   jax.ShapeDtypeStruct((b, geo.num_splits, t, geo.h_p), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps or (8 if width > 16384 else 4),
                                             num_stages=cfg.num_stages),
        interpret=interpret,
        name="mla_decode_sparse" if geo.sparse else "mla_decode_dense",
    )(n_tiles, q_positions.reshape(-1), idx, kv_positions, q, c_kv, k_rope)


def mla_decode_triton(q_abs, c_kv, k_rope, *, indices, q_positions, kv_positions, scale, return_lse,
                      num_splits, interpret=False, config: MlaDecodeTritonConfig | None = None):
    """`mla_decode_reference`'s contract on the Triton kernel (`interpret=True`: CPU). Forward."""
    cfg = config or MlaDecodeTritonConfig()
    geo = geometry(q_abs, c_kv, k_rope, indices, cfg, num_splits)
    o_part, lse_part = partials(geo, cfg, q_abs, c_kv, k_rope, indices, q_positions, kv_positions,
                                float(scale), bool(interpret))
    out, lse = merge(o_part, lse_part, t=geo.t, h=geo.h, dc=c_kv.shape[2], dtype=q_abs.dtype)
    return AttentionOutput(out, lse) if return_lse else out


# Backend declaration for `pallas_kernels.common.resolve`: a GPU (or interpret mode); every call the api
# accepts; tiles `MlaDecodeTritonConfig`.
CONFIG = MlaDecodeTritonConfig
