"""`compressed` on GPU: the output from the `flash` Triton kernel, the group-summed
probabilities from a Pallas (Triton lowering) score kernel.

Score kernel: one program per (query tile, compressed-key tile, batch * kv head). It loads
the key tile `[bk, D]` once and, for each of the G query heads of the group, the query
tile `[bq, D]` and the head's log-sum-exp, and adds `exp(q k^T * scale - lse)` (masked)
into one `[bq, bk]` float32 accumulator, written once: the per-head probabilities never
reach HBM. A tile wholly after its query tile (causal) writes zeros without a dot.
Head dims are padded to a multiple of 16 (tensor-core dots).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash import blocks, flash_attention
from pallas_kernels.tiles_common import BIG, NT, causal


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2


def _score_kernel(qpos_ref, kpos_ref, lse_ref, q_ref, k_ref, p_ref, *, group: int, scale: float):
    qp = qpos_ref[...]                                                     # [bq]
    kp = kpos_ref[...]                                                     # [bk]
    q_last = jnp.max(qp)
    k_first = jnp.min(jnp.where(kp >= 0, kp, BIG))

    @pl.when(k_first > q_last)
    def _():
        p_ref[...] = jnp.zeros(p_ref.shape, p_ref.dtype)

    @pl.when(k_first <= q_last)
    def _():
        vis = (qp[:, None] >= 0) & (kp[None, :] >= 0) & (kp[None, :] <= qp[:, None])
        k = k_ref[...]
        acc = jnp.zeros(p_ref.shape, jnp.float32)
        for g in range(group):
            s = lax.dot_general(q_ref[g], k, NT, preferred_element_type=jnp.float32) * scale
            lse = lse_ref[g, :]
            lse = jnp.where(lse > -jnp.inf, lse, 0.0)
            acc += jnp.where(vis, jnp.exp(s - lse[:, None]), 0.0)
        p_ref[...] = acc


def group_probabilities(q, k, lse, q_positions, kv_positions, *, scale: float, interpret=False,
                        config: TritonConfig | None = None):
    """`sum_g exp(q_g k^T * scale - lse_g)` under the causal mask: `[B, Hkv, T, N]` float32.

    q `[B, T, H, D]`, k `[B, N, Hkv, D]`, lse `[B, H, T]` (natural log, -inf on empty rows).
    """
    cfg = config or TritonConfig()
    b, t, h, d = q.shape
    n, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    bq, bk = blocks.pow2_block(cfg.block_q, t), blocks.pow2_block(cfg.block_k, n)
    t_p, n_p, d_p = blocks.round_up(t, bq), blocks.round_up(n, bk), blocks.round_up(d, 16)
    qx = blocks.pad_axis(blocks.pad_axis(q, t_p, 1), d_p, 3).transpose(0, 2, 1, 3)   # [B, H, T, D]
    kx = blocks.pad_axis(blocks.pad_axis(k, n_p, 1), d_p, 3)
    lse = blocks.pad_axis(lse.astype(jnp.float32), t_p, 2)
    qpos = blocks.pad_axis(q_positions, t_p, 1, -1)
    kpos = blocks.pad_axis(kv_positions, n_p, 1, -1)
    p = pl.pallas_call(
        functools.partial(_score_kernel, group=g, scale=float(scale)),
        grid=(t_p // bq, n_p // bk, b * hkv),
        in_specs=[pl.BlockSpec((None, bq), lambda i, j, bh: (bh // hkv, i)),
                  pl.BlockSpec((None, bk), lambda i, j, bh: (bh // hkv, j)),
                  pl.BlockSpec((None, g, bq), lambda i, j, bh: (bh // hkv, bh % hkv, i)),
                  pl.BlockSpec((None, g, bq, d_p), lambda i, j, bh: (bh // hkv, bh % hkv, i, 0)),
                  pl.BlockSpec((None, bk, None, d_p), lambda i, j, bh: (bh // hkv, j, bh % hkv, 0))],
        out_specs=pl.BlockSpec((None, None, bq, bk), lambda i, j, bh: (bh // hkv, bh % hkv, i, j)),
        out_shape=jax.ShapeDtypeStruct((b, hkv, t_p, n_p), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="compressed_scores",
    )(qpos, kpos, lse, qx, kx)
    return p[:, :, :t, :n]


def compressed_triton(q, k, v, *, q_positions, kv_positions, scale, interpret=False,
                      config: TritonConfig | None = None):
    """`compressed_reference`'s contract: flash (Triton) output + lse, then the scores."""
    res = flash_attention(q, k, v, mask_fn=causal, q_positions=q_positions, kv_positions=kv_positions,
                          scale=scale, return_lse=True, impl="triton", interpret=interpret)
    sg = jax.lax.stop_gradient
    p = group_probabilities(sg(q), sg(k), sg(res.lse), q_positions, kv_positions, scale=scale,
                            interpret=interpret, config=config)
    return res.out, p


# Backend declaration for `pallas_kernels.common.resolve`: a GPU (or interpret mode); every call the api
# accepts; tiles `TritonConfig`.
CONFIG = TritonConfig
