"""`jax.custom_vjp` wiring shared by the `flash` kernels (Triton and Mosaic TPU).

A backend supplies two functions on unpadded `[B, T, H, D]` arrays:

* `forward(st, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg, *aux) -> (out [B, Tq, H, Dv],
  lse [B, H, Tq] float32)`;
* `backward(st, q, k, v, dout, q_pos, kv_pos, q_seg, kv_seg, lse2, delta, *aux) -> (dq, dk, dv)`,
  where `aux` is a tuple of non-differentiable arrays (block metadata for `block_sparse`;
  empty for `flash`), and
  `lse2` is the log-sum-exp in base 2 with rows that see nothing set to a huge finite
  value (so `exp2(s - lse2) == 0` there) and `delta = rowsum(dO * O) - dlse` (float32,
  `[B, H, Tq]`): the FlashAttention-2 backward (arXiv 2307.08691, Alg. 2) with the
  cotangent of the lse output folded in (`d lse / d s = P`).

Sink logits join only the denominator, so their gradient is computed here from the
residuals: `d sink_h = -sum_t exp(sink_h - lse_t) * delta_t`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from pallas_kernels.common import AttentionOutput
from pallas_kernels.tiles_common import LOG2E


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything static about one call (hashable; a custom_vjp nondiff argument)."""

    forward: Callable
    backward: Callable
    mask_fn: Any
    scale: float
    softcap: float | None
    has_sinks: bool
    config: Any
    interpret: Any
    kernel_mask: Any = None    # a backend's static form of the mask (Mosaic GPU: `MaskSpec`)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st: Static, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg, aux):
    return st.forward(st, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg, *aux)


def _attention_fwd(st, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg, aux):
    out, lse = st.forward(st, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg, *aux)
    return (out, lse), (q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg, aux, out, lse)


def backward(st, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg, aux, out, lse, dout, dlse):
    """dq, dk, dv, d sinks from the forward residuals and the cotangents of (out, lse)."""
    delta = jnp.einsum("bthd,bthd->bht", dout.astype(jnp.float32), out.astype(jnp.float32))
    delta = delta - dlse.astype(jnp.float32)
    lse2 = jnp.where(jnp.isfinite(lse), lse * LOG2E, 1e30)
    dq, dk, dv = st.backward(st, q, k, v, dout, q_pos, kv_pos, q_seg, kv_seg, lse2, delta, *aux)
    dsinks = None
    if sinks is not None:
        p_sink = jnp.exp(sinks.astype(jnp.float32)[None, :, None] - lse)
        dsinks = (-(p_sink * delta).sum((0, 2))).astype(sinks.dtype)
    return dq, dk, dv, dsinks


def _attention_bwd(st, res, cts):
    q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg, aux, out, lse = res
    grads = backward(st, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg, aux, out, lse, *cts)
    return grads + (None, None, None, None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(st: Static, q, k, v, *, sink_logits, q_positions, kv_positions, q_segment_ids,
              kv_segment_ids, return_lse, aux=()):
    """Run a backend through the custom_vjp; format like `flash_reference`."""
    out, lse = _attention(st, q, k, v, sink_logits, q_positions.astype(jnp.int32),
                          kv_positions.astype(jnp.int32), q_segment_ids, kv_segment_ids,
                          tuple(aux))
    if return_lse:
        return AttentionOutput(out, lse, None)
    return out

