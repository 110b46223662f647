"""Compressed Sparse Attention (CSA) and Heavily Compressed Attention (HCA) of DeepSeek-V4.

A compressor turns every token into a KV state and a score (per channel); at each
boundary token (`(pos + 1) % m == 0`) it softmax-pools, channel by channel, the states of
a window of the last m tokens (2m with `overlap`, CSA: the previous block's tokens
through their own projection), applies RMSNorm and RoPE on the trailing `rope_dim`
channels at the record's position (its boundary token, where it becomes visible), and
stores one record (`compress_windows`). Attention is MQA: one record is both key and
value for all heads (width `head_dim`, 512 in V4).

* **CSA** (m=4, overlap): a lightning indexer (`sparse_jax.ops.dsa`) with its own
  compressed keys (`index_head_dim`, 128) picks the top-k visible records per query;
  attention runs over those (`token_sparse` op).
* **HCA** (m=128): dense attention over all visible records (`flash`).
* **SWA branch** (`window` > 0): the last `window` uncompressed tokens (own projection,
  RMSNorm, RoPE) join the same softmax (the two key sets are disjoint; merged by
  log-sum-exp, exact).

Values carry RoPE on their trailing channels (keys = values), so the output's trailing
channels are rotated back by the query position (`rope_tail(..., inverse=True)`): the
result depends on relative positions only. Our reading of the report; (check) details
such as the exact indexer inputs and attention sinks are not modelled.

Tokens after the last boundary wait in an uncompressed tail (the layer keeps their
inputs; `gather_windows` finds the windows completed by a call from tail + new tokens).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from pallas_kernels.flash import flash_attention
from pallas_kernels.token_sparse import token_sparse_attention
from sparse_jax import patterns as P
from sparse_jax.ops.attention import merge_attention
from sparse_jax.ops.masking import guard_shared_kv
from sparse_jax.ops.mla import rms_norm

SWA_CACHE_STRATEGIES = ("full", "periodic", "none")


@dataclasses.dataclass(frozen=True)
class CSAConfig:
    """CSA / HCA hyperparameters (defaults: V4's CSA; `HCA_V4` for HCA; (check) sizes).

    ratio (m): tokens per record. overlap: records pool 2m tokens (CSA). head_dim: record
    width (MQA key = value). rope_dim: trailing channels with RoPE. top_k: records per
    query (None: dense attention over the records, HCA). index_heads / index_head_dim:
    CSA's lightning indexer. window: SWA branch keys (0: none). swa_cache: "full" (keep
    every token's window KV), "periodic" (rolling window + a snapshot every
    `checkpoint_every` tokens), "none" (rolling window only; a prefix hit recomputes the
    last `window` tokens). query_chunk: queries per chunk of the reference top-k.
    """

    ratio: int = 4
    overlap: bool = True
    head_dim: int = 512
    rope_dim: int = 64
    top_k: int | None = 512
    index_heads: int = 64
    index_head_dim: int = 128
    window: int = 128
    swa_cache: str = "none"
    checkpoint_every: int = 4096
    query_chunk: int = 512

    def __post_init__(self):
        for name in ("ratio", "head_dim", "index_heads", "index_head_dim", "checkpoint_every", "query_chunk"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be an int >= 1, got {val!r}")
        if not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"window must be an int >= 0 (0: no SWA branch), got {self.window!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be an int >= 1 or None (dense, HCA), got {self.top_k!r}")
        if not isinstance(self.rope_dim, int) or self.rope_dim < 0 or self.rope_dim % 2 or self.rope_dim > self.head_dim:
            raise ValueError(f"rope_dim must be an even int in [0, head_dim={self.head_dim}], got {self.rope_dim!r}")
        if self.index_head_dim % 2:
            raise ValueError(f"index_head_dim must be even (RoPE), got {self.index_head_dim}")
        if self.swa_cache not in SWA_CACHE_STRATEGIES:
            raise ValueError(f"swa_cache must be one of {SWA_CACHE_STRATEGIES}, got {self.swa_cache!r}")

    @property
    def record_window(self) -> int:
        """Tokens pooled into one record: 2m with overlap, else m."""
        return 2 * self.ratio if self.overlap else self.ratio

    @property
    def parts(self) -> int:
        """Compressor projections: 2 with overlap (current block, previous block), else 1."""
        return 2 if self.overlap else 1


HCA_V4 = CSAConfig(ratio=128, overlap=False, top_k=None)


def record_positions(record_ids, ratio: int):
    """Boundary position of record i, `(i + 1) m - 1`; -1 where i < 0."""
    return jnp.where(record_ids >= 0, (record_ids + 1) * ratio - 1, -1).astype(jnp.int32)


def rope_tail(x, positions, rope_dim: int, theta: float, inverse: bool = False):
    """Rotate the trailing `rope_dim` channels of `x [B, T, H, D]` by `positions [B, T]`
    (half-split RoPE as `ops.rope.apply_rope`); `inverse` rotates by -position."""
    if rope_dim == 0:
        return x
    half = rope_dim // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    ang = jnp.maximum(positions, 0).astype(jnp.float32)[..., None, None] * freqs
    cos, sin = jnp.cos(ang), jnp.sin(ang) * (-1.0 if inverse else 1.0)
    keep, rot = x[..., :-rope_dim], x[..., -rope_dim:].astype(jnp.float32)
    r1, r2 = rot[..., :half], rot[..., half:]
    rot = jnp.concatenate([r1 * cos - r2 * sin, r2 * cos + r1 * sin], axis=-1).astype(x.dtype)
    return jnp.concatenate([keep, rot], axis=-1)


def gather_windows(x, x_positions, new_positions, *, ratio: int, window: int):
    """The record windows completed by this call's tokens.

    Args:
      x: `[B, S, F]` per-token inputs holding the new tokens and (at least) the
        `window - 1` before them; x_positions `[B, S]` (negative = empty).
      new_positions: `[B, C]` this call's positions (consecutive per row, any padding).
    Returns:
      `windows [B, K, window, F]`, `present [B, K, window]` bool (token exists: false
      before position 0 or where missing), `record_ids [B, K]` (-1 none), `K = C // m + 1`:
      the records whose boundary `(i + 1) m - 1` is a new position.
    """
    b, c = new_positions.shape
    big = jnp.iinfo(jnp.int32).max
    valid = new_positions >= 0
    p_min = jnp.min(jnp.where(valid, new_positions, big), axis=1)
    p_max = jnp.max(jnp.where(valid, new_positions, -1), axis=1)
    p_min = jnp.where(valid.any(1), p_min, 0)
    first = (p_min + 1 + ratio - 1) // ratio - 1                  # first record with boundary >= p_min
    n_cand = c // ratio + 1
    ids = jnp.maximum(first, 0)[:, None] + jnp.arange(n_cand)
    ends = (ids + 1) * ratio - 1
    record_ids = jnp.where(valid.any(1)[:, None] & (ends >= p_min[:, None]) & (ends <= p_max[:, None]), ids, -1)
    base = p_min - (window - 1)
    size = window - 1 + c
    slot = x_positions - base[:, None]
    slot = jnp.where((x_positions >= 0) & (slot >= 0) & (slot < size), slot, size)
    rows = jnp.arange(b)[:, None]
    buf = jnp.zeros((b, size) + x.shape[2:], x.dtype).at[rows, slot].set(x, mode="drop")
    buf_pos = jnp.full((b, size), -1, jnp.int32).at[rows, slot].set(x_positions, mode="drop")
    tok = ends[:, :, None] - (window - 1) + jnp.arange(window)            # [B, K, W]
    tslot = jnp.clip(tok - base[:, None, None], 0, size - 1).reshape(b, -1)
    present = (jnp.take_along_axis(buf_pos, tslot, axis=1).reshape(tok.shape) == tok) & (tok >= 0)
    present = present & (record_ids >= 0)[..., None]
    windows = jnp.take_along_axis(buf, tslot[:, :, None], axis=1).reshape((b, n_cand, window) + x.shape[2:])
    return windows, present, record_ids.astype(jnp.int32)


def compress_windows(windows, present, w_state, w_score, ape, *, ratio: int):
    """Softmax-pool each window into one record (before norm and RoPE).

    windows `[B, K, W, F]`; present `[B, K, W]`; w_state / w_score `[parts, F, D]`
    (part 0: the record's own block, the last m slots; part 1: the previous block, with
    overlap); ape `[W, D]` learned position bias of the scores. Returns `[B, K, D]`
    (zeros where no token is present).
    """
    w = windows.shape[2]
    part = jnp.where(jnp.arange(w) >= w - ratio, 0, 1)                          # [W]
    dt = windows.dtype
    states = jnp.einsum("bkwf,wfd->bkwd", windows, w_state.astype(dt)[part])
    scores = jnp.einsum("bkwf,wfd->bkwd", windows, w_score.astype(dt)[part]) + ape.astype(dt)
    scores = jnp.where(present[..., None], scores.astype(jnp.float32), -1e30)
    p = jax.nn.softmax(scores, axis=2) * present[..., None]
    return jnp.einsum("bkwd,bkwd->bkd", p, states.astype(jnp.float32)).astype(dt)


def finish_records(pooled, record_ids, norm_scale, *, ratio: int, rope_dim: int, theta: float):
    """RMSNorm (when `norm_scale` is given) and RoPE at the record positions: `[B, K, D]`."""
    rec = pooled if norm_scale is None else rms_norm(pooled, norm_scale)
    return rope_tail(rec[:, :, None], record_positions(record_ids, ratio), rope_dim, theta)[:, :, 0]


def attention_with_window(q, records, rec_positions, q_positions, *, win_kv=None, win_positions=None,
                          window: int = 0, token_indices=None, scale: float, rope_dim: int, theta: float,
                          impl: str = "auto"):
    """One softmax over the visible records (all, or the selected `token_indices [B, T, K]`)
    and the SWA branch's last `window` tokens; output rotated back at the query positions.

    q `[B, T, H, D]` (RoPE'd trailing channels); records `[B, N, D]`, rec_positions
    `[B, N]`; win_kv `[B, S, D]`, win_positions `[B, S]`. Returns `[B, T, H, D]`.
    """
    k, v = guard_shared_kv(records[:, :, None], rec_positions)      # key = value: NaN key, zero value
    if token_indices is None:
        rec = flash_attention(q, k, v, mask_fn=P.Causal(), q_positions=q_positions, kv_positions=rec_positions,
                              scale=scale, return_lse=True, impl=impl)
    else:
        rec = token_sparse_attention(q, k, v, token_indices[:, :, None], q_positions=q_positions,
                                     kv_positions=rec_positions, scale=scale, return_lse=True, impl=impl)
    outs, lses = [rec.out], [rec.lse]
    if window:
        wk, wv = guard_shared_kv(win_kv[:, :, None], win_positions)
        win = flash_attention(q, wk, wv, mask_fn=P.causal_window(window), q_positions=q_positions,
                              kv_positions=win_positions, scale=scale, return_lse=True, impl=impl)
        outs.append(win.out)
        lses.append(win.lse)
    out, _ = merge_attention(outs, lses)
    return rope_tail(out, q_positions, rope_dim, theta, inverse=True)


def default_scale(cfg: CSAConfig) -> float:
    return 1.0 / math.sqrt(cfg.head_dim)
