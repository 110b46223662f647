"""`nsa_decode`: the decode step of Native Sparse Attention (arXiv 2502.11089), fused.

`nsa_decode(q, q_positions, ...)` computes, for a few new queries per row against NSA's
cache (`sparse_jax.cache_nsa.NSACache`), the three branch outputs and the per-query
("token" mode) selection, exactly as `sparse_jax.ops.nsa.nsa_decode_branches`:

* cmp: attention over the compressed keys (slot i = compressed block i, position = its
  last token, -1 empty), and from its probabilities summed over each GQA group the
  selection-block importance (`selection_scores`);
* selection: top `num_selected` causal blocks per (query, kv head), the first
  `num_initial` and the `num_local` most recent forced (`select_blocks`);
* slc: attention over the selected blocks of the position-indexed raw keys;
* win: attention over the window cache, `t - window < pos <= t`.

On GPU it is one fused Triton kernel (one program per batch row, kv head and query; the
GQA group's heads are its tile rows) or, where those programs are too few to fill the
GPU, two kernels that split the cmp pass (one pass over the compressed K and V) and the
slc / win tail (`triton.py`). A step reads only the compressed entries, the `n * l'`
selected tokens and the window.

Forward only (decode needs no gradient; the kernel defines no VJP).

`impl`: "auto" ("triton" on GPU where `supports(cfg)`, else "xla"; `resolved_impl`) | "xla"
| "triton"; `interpret=True` runs the kernels in interpret mode (and makes "auto" pick them).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.nsa_decode.reference import nsa_decode_reference
from pallas_kernels.nsa_decode.triton import nsa_decode_triton


def _reference(q, q_positions, *, scale, **kw):
    del scale      # the reference uses the default 1/sqrt(D), as nsa_decode_branches does
    return nsa_decode_reference(q, q_positions, **kw)


IMPLEMENTATIONS = {"xla": _reference, "triton": nsa_decode_triton}


def supports(cfg) -> bool:
    """Whether the Triton kernel covers `cfg`: token-mode selection, `l'/d` a power of two."""
    r = cfg.sel_block // cfg.cmp_stride
    return cfg.selection == "token" and r & (r - 1) == 0


def resolved_impl(impl: str, interpret, cfg) -> str:
    """The implementation `nsa_decode(impl=...)` runs here: "auto" is "triton" on GPU (or
    CPU with `interpret`) where `supports(cfg)`, else "xla"."""
    if impl != "auto":
        return impl
    on_kernels = bool(interpret) or jax.default_backend() == "gpu"
    return "triton" if on_kernels and supports(cfg) else "xla"


def _check_keys(name, k, v, pos, b, hkv, d):
    for part, x in ((f"k_{name}", k), (f"v_{name}", v)):
        if x.ndim != 4 or x.shape[0] != b or x.shape[2:] != (hkv, d):
            raise ValueError(f"{part} must be [{b}, S, {hkv}, {d}], got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{part} must be floating point, got {x.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k_{name} {k.shape} and v_{name} {v.shape} must have one shape")
    pos = jnp.asarray(pos)
    if pos.shape != k.shape[:2] or not jnp.issubdtype(pos.dtype, jnp.integer):
        raise ValueError(f"{name}_positions must be int {list(k.shape[:2])}, got {pos.dtype}{list(pos.shape)}")
    return pos.astype(jnp.int32)


def nsa_decode(q, q_positions, *, k_cmp, v_cmp, cmp_positions, k_slc, v_slc, slc_positions,
               k_win, v_win, win_positions, cfg, impl="auto", interpret=False):
    """NSA's three branches and token-mode selection for a few queries against the cache.

    Args:
      q: `[B, T, H, D]`, `T <= DECODE_MAX_QUERIES`; q_positions: int `[B, T]` (-1 padding).
      k_cmp, v_cmp: `[B, N, Hkv, D]`, slot i = compressed block i; cmp_positions int
        `[B, N]`: block i's last token `i*d + l - 1`, -1 while empty.
      k_slc, v_slc: `[B, S, Hkv, D]` position-indexed (slot s holds position s or -1),
        slc_positions int `[B, S]`.
      k_win, v_win: `[B, W, Hkv, D]` in any slot order (rolling), win_positions `[B, W]`.
      cfg: `sparse_jax.ops.nsa.NSAConfig` with `selection="token"`.
    Returns:
      `(o_cmp, o_slc, o_win [B, T, H, D] in q's dtype, block_indices [B, T, Hkv, min(n, Ns)]
      int32)`, `Ns = ceil(S / l')`, -1 for unused entries; padded queries give zeros.
    """
    from sparse_jax.ops.attention import DECODE_MAX_QUERIES   # sparse_jax.ops.nsa imports this op
    from sparse_jax.ops.nsa import NSAConfig

    if not isinstance(cfg, NSAConfig):
        raise ValueError(f"cfg must be an NSAConfig, got {type(cfg).__name__}")
    if cfg.selection != "token":
        raise ValueError(f"nsa_decode covers selection='token' only, got cfg.selection={cfg.selection!r}")
    if q.ndim != 4 or not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q must be float [batch, queries, heads, head_dim], got {q.dtype}{list(q.shape)}")
    b, t, h, d = q.shape
    if not 1 <= t <= DECODE_MAX_QUERIES:
        raise ValueError(f"nsa_decode takes 1 to {DECODE_MAX_QUERIES} queries, got T={t}")
    hkv = k_cmp.shape[2] if k_cmp.ndim == 4 else -1
    if hkv < 1 or h % hkv:
        raise ValueError(f"num_heads ({h}) must be a multiple of k_cmp's kv heads ({hkv})")
    q_positions = common.check_positions("q_positions", q_positions, b, t)
    q_positions = jnp.asarray(q_positions)
    cmp_positions = _check_keys("cmp", k_cmp, v_cmp, cmp_positions, b, hkv, d)
    slc_positions = _check_keys("slc", k_slc, v_slc, slc_positions, b, hkv, d)
    win_positions = _check_keys("win", k_win, v_win, win_positions, b, hkv, d)
    if not (q.dtype == k_cmp.dtype == k_slc.dtype == k_win.dtype):
        raise ValueError(f"q and the branch keys must share a dtype, got {q.dtype}, {k_cmp.dtype}, "
                         f"{k_slc.dtype}, {k_win.dtype}")
    fn = common.dispatch("nsa_decode", resolved_impl(impl, interpret, cfg), IMPLEMENTATIONS, interpret)
    return fn(q, q_positions, k_cmp=k_cmp, v_cmp=v_cmp, cmp_positions=cmp_positions, k_slc=k_slc,
              v_slc=v_slc, slc_positions=slc_positions, k_win=k_win, v_win=v_win,
              win_positions=win_positions, cfg=cfg, scale=1.0 / math.sqrt(d))
