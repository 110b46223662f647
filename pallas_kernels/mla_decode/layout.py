"""Pieces the `mla_decode` kernels (Triton and Mosaic TPU) share: how many cache tiles each
query row visits, and the merge of the split-K partial results (flash-decoding, through
`decode.layout.combine`)."""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.decode import layout


def row_tiles(indices, q_positions, kv_positions, block_k: int):
    """Tiles of `block_k` each query row must visit, int32 `[B * T]`: up to its last listed
    entry (sparse) or its last visible slot (dense: a partly filled cache is not read whole)."""
    if indices is not None:
        n, ok = indices.shape[2], (indices >= 0) & (indices < kv_positions.shape[1])
    else:
        qp, kp = q_positions[:, :, None], kv_positions[:, None, :]
        n, ok = kv_positions.shape[1], (kp >= 0) & (kp <= qp) & (qp >= 0)
    last = jnp.max(jnp.where(ok, jnp.arange(1, n + 1, dtype=jnp.int32), 0), -1)
    return layout.cdiv(last, block_k).reshape(-1)


def merge(o_part, lse_part, *, t: int, h: int, dc: int, dtype):
    """Per-split partials `[B, splits, T, H_p, Dc_p]` -> `(out [B, T, H, Dc], lse [B, H, T])`
    through `decode.layout.combine` (one latent head, rows `t * H + h`)."""
    b, n = o_part.shape[:2]
    if n == 1:
        return o_part[:, 0, :, :h, :dc].astype(dtype), lse_part[:, 0, :, :h].transpose(0, 2, 1)
    o = o_part[:, :, :, :h].reshape(b, 1, n, t * h, o_part.shape[-1])
    lse = lse_part[:, :, :, :h].reshape(b, 1, n, t * h)
    return layout.combine(o, lse, sink_logits=None, tq=t, num_heads=h, dv=dc, dtype=dtype)
