"""Shared pieces of every kernel op: argument checks, the masked-softmax reference, and the
one backend resolver (`resolve`) every `api.py` calls.

Arrays in, arrays out: nothing here knows of Flax, configs or models. Layout is
`[batch, seq, heads, head_dim]`; GQA/MQA when `num_kv_heads` divides `num_heads`.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("auto", "xla", "triton", "mosaic_tpu", "mosaic_gpu")
logger = logging.getLogger("pallas_kernels")


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


def check_scale(scale, head_dim: int) -> float:
    """The logit scale: default `1/sqrt(head_dim)`; else a finite number > 0 (0 would make
    every row uniform and a negative scale reverses the ranking: both are mistakes, refused
    by every op)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    try:
        value = None if isinstance(scale, (bool, str)) else float(scale)
    except TypeError:                      # not a number, or traced (ConcretizationTypeError)
        value = None
    if value is None or not math.isfinite(value) or not value > 0:
        raise ValueError(f"scale must be a concrete finite number > 0 or None (default "
                         f"1/sqrt(head_dim)), got {scale!r}")
    return value


def check_mask_fn(mask_fn):
    """`mask_fn` must be None or a callable predicate `(q_pos, kv_pos, q_seg, kv_seg) -> bool`
    (e.g. `sparse_jax.patterns.Causal()`); a string such as "causal" is not one."""
    if mask_fn is not None and not callable(mask_fn):
        raise ValueError(f"mask_fn must be None or a callable predicate (q_pos, kv_pos, q_seg, kv_seg) "
                         f"-> bool such as sparse_jax.patterns.Causal(), got {mask_fn!r}")


def check_attention_args(q, k, v, *, mask_fn, q_positions, kv_positions, q_segment_ids,
                         kv_segment_ids, sink_logits, softcap, scale) -> dict:
    """The checks every attention op shares; returns the normalised keyword arguments
    (positions defaulted to `arange`, scale to `1/sqrt(D)`)."""
    b, tq, tk, h, _, d = check_qkv(q, k, v)
    check_mask_fn(mask_fn)
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
        scale=check_scale(scale, d))


def masked_attention(q, k, v, mask, *, scale: float, sink_logits=None, softcap=None, bias=None):
    """Plain-jnp masked softmax attention, float32 inside: the ground truth of every kernel.

    Args:
      q: `[B, Tq, H, D]`; k: `[B, Tk, Hkv, D]`; v: `[B, Tk, Hkv, Dv]`.
      mask: bool `[B, Tq, Tk]` or `[B, Hkv, Tq, Tk]` (True = visible).
      sink_logits: optional `[H]` learned sink logit per head (gpt-oss): joins the softmax
        denominator only.
      softcap: optional logit soft-cap c: `s -> c * tanh(s / c)`.
      bias: optional additive logit bias `[B, Hkv, Tk]` float (after the soft-cap; a key of
        log-weight w counts as e^w copies of itself: cluster sizes, sampling weights).
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
    if bias is not None:
        s = s + bias.astype(jnp.float32)[:, :, None, None, :]
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


class Device(NamedTuple):
    """What `impl="auto"` looks at: the default backend's platform ("cpu" | "gpu" | "tpu")
    and, on GPU, the first device's compute capability ("9.0" on Hopper, else "")."""

    platform: str
    compute_capability: str = ""


def current_device() -> Device:
    """The device `impl="auto"` resolves for (tests monkeypatch this to fake a GPU)."""
    platform = jax.default_backend()
    cc = str(getattr(jax.devices()[0], "compute_capability", "")) if platform == "gpu" else ""
    return Device(platform, cc)


def is_gpu_interpret(interpret) -> bool:
    """`interpret` asks for Mosaic GPU's interpret mode (a `plgpu.InterpretGPUParams`;
    `interpret=True` is the Triton / Mosaic TPU interpreters)."""
    if not interpret or interpret is True:
        return False
    from jax.experimental.pallas.mosaic_gpu import InterpretGPUParams  # noqa: PLC0415

    return isinstance(interpret, InterpretGPUParams)


def interpret_reason(name: str, interpret) -> str | None:
    """Why `interpret` cannot drive backend `name` (None: it can): `interpret=True` is the
    Triton and Mosaic TPU interpreters', a `plgpu.InterpretGPUParams` Mosaic GPU's."""
    if name == "xla" or not interpret:
        return None
    if is_gpu_interpret(interpret):
        return None if name == "mosaic_gpu" else (
            "interpret=InterpretGPUParams is Mosaic GPU's (the Triton / Mosaic TPU "
            "interpreters take interpret=True)")
    if name == "mosaic_gpu":
        return ("interpret=True is the Triton interpreter (Mosaic GPU's interpret mode: "
                "interpret=plgpu.InterpretGPUParams())")
    return None


def platform_reason(name: str, device: Device, interpret) -> str | None:
    """Why backend `name` cannot run on `device` (None: it can). Only `impl="auto"` asks:
    an explicit impl is trusted to target a device (e.g. lowering for CUDA from a CPU host).
    An interpreter that suits the backend (`interpret_reason`) runs it anywhere."""
    if name == "xla":
        return None
    if interpret:
        return interpret_reason(name, interpret)
    if name == "mosaic_gpu":
        if device.platform != "gpu":
            return f"needs a Hopper GPU, the platform is {device.platform}"
        if not device.compute_capability.startswith("9."):
            return f"needs Hopper (compute capability 9.x), the GPU has {device.compute_capability!r}"
        return None
    need = {"triton": "gpu", "mosaic_tpu": "tpu"}[name]
    if device.platform != need:
        return f"needs a {need.upper()} or interpret=True, the platform is {device.platform}"
    return None


def config_reason(config, config_type) -> str | None:
    """Why a backend whose tiles are `config_type` (None: no tiles) cannot take `config`."""
    if config is None or (config_type is not None and isinstance(config, config_type)):
        return None
    want = "no tile config" if config_type is None else f"config={config_type.__name__}(...)"
    return f"takes {want}, got config={type(config).__name__}"


def choose(op: str, impl: str, backends: dict, call: dict, *, interpret=False,
           config=None) -> tuple[str | None, dict[str, str | None]]:
    """The backend of `op` that runs `call`, and why each backend would or would not.

    backends: `{name: backend module}` in order of preference (`impl="auto"` takes the
      first that can run the call). Each module declares `CONFIG` (its tile dataclass, or
      None) and, where it covers less than the api accepts, `supports(**call) -> str | None`
      (None, or a short reason why not: dtype, mask, shape, ...).
    call: the api's normalised arguments, passed to `supports`.
    Returns `(name or None, {name: reason or None})`; an explicit `impl` is checked against
    its own declaration only (not the platform).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto" and impl not in backends:
        raise ValueError(f"{op}: impl={impl!r} is not implemented; available: {sorted(backends)}")
    device = current_device()
    reasons = {}
    for name in ([impl] if impl != "auto" else list(backends)):
        module = backends[name]
        reason = (platform_reason(name, device, interpret) if impl == "auto"
                  else interpret_reason(name, interpret))
        reason = reason or config_reason(config, getattr(module, "CONFIG", None))
        if reason is None and hasattr(module, "supports"):
            reason = module.supports(**call, interpret=interpret, config=config)
        reasons[name] = reason
        if reason is None:
            return name, reasons
    return None, reasons


def config_for(op: str, impl: str, backends: dict, call: dict, configs: dict, *, interpret=False):
    """The tile config for the backend `choose` picks for `call` with no config: `configs[name]`
    (`{backend name: config}`), or None where that backend has no entry. For callers that want
    a kernel's tiles when that kernel runs and the plain fallback elsewhere (`impl="auto"` with
    a config refuses the backends that take none, e.g. the XLA reference on a CPU)."""
    name, _ = choose(op, impl, backends, call, interpret=interpret)
    return configs.get(name)


def explanation(op: str, impl: str, name: str | None, reasons: dict) -> str:
    """One line: which backend runs `op` and why the ones before it were skipped."""
    skipped = "; ".join(f"{n}: {r}" for n, r in reasons.items() if r is not None)
    ran = f"runs {name!r}" if name else "no backend can run this call"
    return f"{op} impl={impl!r}: {ran}" + (f" (skipped {skipped})" if skipped else "")


def resolve(op: str, impl: str, backends: dict, table: dict[str, Callable], call: dict, *,
            interpret=False, config=None, explain=False) -> Callable:
    """The one place an op's backend is chosen (`choose`); returns the function to call.

    table: `{name: function}` (the api's `IMPLEMENTATIONS`). Kernels receive `interpret=`
    and, when given, `config=`; the XLA reference receives neither. Logs the choice at
    debug level (logger "pallas_kernels"); `explain=True` also prints it. An explicit
    `impl` that cannot run the call, or a call no backend runs, raises ValueError with the
    reasons.
    """
    name, reasons = choose(op, impl, backends, call, interpret=interpret, config=config)
    line = explanation(op, impl, name, reasons)
    logger.debug(line)
    if explain:
        print(line)
    if name is None:
        if impl == "auto":
            raise ValueError(line)
        raise ValueError(f"{op}: impl={impl!r} cannot run this call: {reasons[impl]}")
    if name == "xla":
        return table["xla"]
    kw = {"interpret": interpret} if config is None else {"interpret": interpret, "config": config}
    return functools.partial(table[name], **kw)
