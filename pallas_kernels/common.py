"""Shared pieces of every kernel op: argument checks, the masked-softmax reference, dispatch.

Arrays in, arrays out: nothing here knows of Flax, configs or models. Layout is
`[batch, seq, heads, head_dim]`; GQA/MQA when `num_kv_heads` divides `num_heads`.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("auto", "xla", "triton", "mosaic_tpu", "mosaic_gpu")


class AttentionOutput(NamedTuple):
    """Returned when an op is asked for more than the output.

    out: `[B, Tq, H, Dv]`; lse: `[B, H, Tq]` float32 log-sum-exp of the logits and the
    sink logit, if any (so a row that sees no key has lse = its sink logit, or -inf without
    sinks); block_scores: op-specific.
    """

    out: jax.Array
    lse: jax.Array | None = None
    block_scores: jax.Array | None = None


def check_qkv(q, k, v) -> tuple[int, int, int, int, int, int]:
    """Validate `q [B,Tq,H,D]`, `k [B,Tk,Hkv,D]`, `v [B,Tk,Hkv,Dv]`; return the sizes."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, tq, h, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch mismatch: q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape[3] != d:
        raise ValueError(f"head_dim mismatch: q has {d}, k has {k.shape[3]}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {k.shape} and v {v.shape} must share [batch, seq, kv_heads]")
    hkv = k.shape[2]
    if hkv < 1 or h % hkv:
        raise ValueError(f"num_heads ({h}) must be a multiple of num_kv_heads ({hkv})")
    return b, tq, k.shape[1], h, hkv, d


def check_positions(name: str, pos, batch: int, length: int):
    """Default `arange(length)`, as a numpy constant (concrete even under `jit`, so kernels
    that only support default positions can tell them apart); else check `[batch, length]`
    integers."""
    if pos is None:
        return np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
    pos = jnp.asarray(pos)
    if pos.shape != (batch, length) or not jnp.issubdtype(pos.dtype, jnp.integer):
        raise ValueError(f"{name} must be int [{batch}, {length}], got {pos.dtype}{list(pos.shape)}")
    return pos.astype(jnp.int32)


def check_optional(name: str, x, shape: tuple, integer: bool = False):
    if x is None:
        return None
    x = jnp.asarray(x)
    ok_dtype = jnp.issubdtype(x.dtype, jnp.integer) if integer else jnp.issubdtype(x.dtype, jnp.floating)
    if x.shape != shape or not ok_dtype:
        kind = "int" if integer else "float"
        raise ValueError(f"{name} must be {kind} {list(shape)}, got {x.dtype}{list(x.shape)}")
    return x


def check_softcap(softcap):
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap!r}")


def check_attention_args(q, k, v, *, mask_fn, q_positions, kv_positions, q_segment_ids,
                         kv_segment_ids, sink_logits, softcap, scale) -> dict:
    """The checks every attention op shares; returns the normalised keyword arguments
    (positions defaulted to `arange`, scale to `1/sqrt(D)`)."""
    b, tq, tk, h, _, d = check_qkv(q, k, v)
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    if mask_fn is not None and getattr(mask_fn, "needs_segments", False) and q_segment_ids is None:
        raise ValueError(f"mask_fn {mask_fn!r} reads segment ids: pass q_segment_ids and kv_segment_ids")
    check_softcap(softcap)
    return dict(
        mask_fn=mask_fn,
        q_positions=check_positions("q_positions", q_positions, b, tq),
        kv_positions=check_positions("kv_positions", kv_positions, b, tk),
        q_segment_ids=check_optional("q_segment_ids", q_segment_ids, (b, tq), integer=True),
        kv_segment_ids=check_optional("kv_segment_ids", kv_segment_ids, (b, tk), integer=True),
        sink_logits=check_optional("sink_logits", sink_logits, (h,)),
        softcap=softcap,
        scale=1.0 / math.sqrt(d) if scale is None else float(scale))


def masked_attention(q, k, v, mask, *, scale: float, sink_logits=None, softcap=None):
    """Plain-jnp masked softmax attention, float32 inside: the ground truth of every kernel.

    Args:
      q: `[B, Tq, H, D]`; k: `[B, Tk, Hkv, D]`; v: `[B, Tk, Hkv, Dv]`.
      mask: bool `[B, Tq, Tk]` or `[B, Hkv, Tq, Tk]` (True = visible).
      sink_logits: optional `[H]` learned sink logit per head (gpt-oss): joins the softmax
        denominator only.
      softcap: optional logit soft-cap c: `s -> c * tanh(s / c)`.
    Returns:
      out `[B, Tq, H, Dv]` in q's dtype, probs `[B, Hkv, G, Tq, Tk]` float32 (normalised,
      sink included in the denominator), lse `[B, H, Tq]` float32. Rows that see nothing
      give zeros (and lse = -inf), never NaN.
    """
    b, tq, h, d = q.shape
    hkv = k.shape[2]
    g = h // hkv
    qg = q.reshape(b, tq, hkv, g, d).astype(jnp.float32)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32)) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    mask = mask[:, None, None] if mask.ndim == 3 else mask[:, :, None]
    s = jnp.where(mask, s, -jnp.inf)
    m = s.max(-1)
    if sink_logits is not None:
        sinks = sink_logits.astype(jnp.float32).reshape(1, hkv, g, 1)
        m = jnp.maximum(m, sinks)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.exp(s - m[..., None])
    denom = p.sum(-1)
    if sink_logits is not None:
        denom = denom + jnp.exp(sinks - m)
    safe = jnp.where(denom > 0, denom, 1.0)
    probs = p / safe[..., None]
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v.astype(jnp.float32))
    lse = jnp.where(denom > 0, m + jnp.log(safe), -jnp.inf)
    out = out.reshape(b, tq, h, v.shape[-1]).astype(q.dtype)
    return out, probs, lse.reshape(b, h, tq)


def dispatch(op: str, impl: str, table: dict[str, Callable], interpret) -> Callable:
    """Pick the implementation of `op` from `table` (keys among IMPLS, "xla" always present).

    `auto`: the platform's kernel when one exists (triton on GPU, mosaic_tpu on TPU), else
    the XLA reference; on CPU with `interpret` set, the first kernel in interpret mode.
    Kernels receive `interpret=`; the reference does not.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        platform = jax.default_backend()
        preferred = {"gpu": ("triton",), "tpu": ("mosaic_tpu",)}.get(platform, ())
        if interpret:
            preferred = ("triton", "mosaic_tpu")
        impl = next((name for name in preferred if name in table), "xla")
    if impl not in table:
        raise ValueError(f"{op}: impl={impl!r} is not implemented yet; available: {sorted(table)}")
    if impl == "xla":
        return table["xla"]
    return functools.partial(table[impl], interpret=interpret)
