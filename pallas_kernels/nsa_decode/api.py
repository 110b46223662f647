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
slc / win tail, or (`TritonConfig(select_kernel=True)`, opt-in, slower per call on an
H200) three: cmp + window, the selection once per (b, hkv, query), the selected blocks
spread over parts, or (`TritonConfig(one_launch=True)`, opt-in, not yet timed) all of it in
one launch: the last cmp program of a (b, hkv, query) selects, its slc programs wait on an
in-kernel flag (`triton.py`). A step reads only the compressed entries, the `n * l'`
selected tokens and the window.

Forward only (decode needs no gradient; the kernel defines no VJP).

`impl`: "auto" ("triton" on GPU where `triton.supports(cfg=cfg)`, else "xla"; resolved by
`common.resolve`, `which_backend` tells the outcome without running) | "xla" | "triton";
`interpret=True` runs the kernels in interpret mode (and makes "auto" pick them).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.nsa_decode import reference, triton
from pallas_kernels.nsa_decode.reference import nsa_decode_reference
from pallas_kernels.nsa_decode.triton import TritonConfig, nsa_decode_triton


def _reference(q, q_positions, *, scale, **kw):
    del scale      # the reference uses the default 1/sqrt(D), as nsa_decode_branches does
    return nsa_decode_reference(q, q_positions, **kw)


BACKENDS = {"triton": triton, "xla": reference}   # impl="auto" order
IMPLEMENTATIONS = {"xla": _reference, "triton": nsa_decode_triton}
MAX_QUERIES = 4     # queries per row a decode step takes (= sparse_jax.ops.attention.DECODE_MAX_QUERIES)
CFG_FIELDS = ("selection", "cmp_block", "cmp_stride", "sel_block", "num_selected", "num_initial",
              "num_local", "window")


def which_backend(impl: str, interpret, cfg, config=None) -> str | None:
    """The backend `nsa_decode(impl=...)` runs for `cfg` here ("triton" or "xla"), or None
    where `impl` is not one of this op's or cannot run it (`common.choose`)."""
    if impl not in ("auto", *BACKENDS):
        return None
    return common.choose("nsa_decode", impl, BACKENDS, dict(cfg=cfg), interpret=interpret,
                         config=config)[0]


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
               k_win, v_win, win_positions, cfg, impl="auto", interpret=False, config=None,
               explain=False):
    """NSA's three branches and token-mode selection for a few queries against the cache.

    Args:
      q: `[B, T, H, D]`, `T <= MAX_QUERIES`; q_positions: int `[B, T]` (-1 padding).
      k_cmp, v_cmp: `[B, N, Hkv, D]`, slot i = compressed block i; cmp_positions int
        `[B, N]`: block i's last token `i*d + l - 1`, -1 while empty.
      k_slc, v_slc: `[B, S, Hkv, D]` position-indexed (slot s holds position s or -1),
        slc_positions int `[B, S]`.
      k_win, v_win: `[B, W, Hkv, D]` in any slot order (rolling), win_positions `[B, W]`.
      cfg: NSA's hyperparameters (`sparse_jax.ops.nsa.NSAConfig`, or any object with the
        fields `CFG_FIELDS`) with `selection="token"`.
      impl: "auto" | "xla" | "triton"; interpret: run the kernels in interpret mode.
      config: the Triton kernel's tiles (`TritonConfig`, importable from here); the reference takes none.
      explain: print which backend runs and why the others were skipped.
    Returns:
      `(o_cmp, o_slc, o_win [B, T, H, D] in q's dtype, block_indices [B, T, Hkv, min(n, Ns)]
      int32)`, `Ns = ceil(S / l')`, -1 for unused entries; padded queries give zeros.
    """
    missing = [name for name in CFG_FIELDS if not hasattr(cfg, name)]
    if missing:
        raise ValueError(f"cfg must carry NSA's hyperparameters (an NSAConfig), got "
                         f"{type(cfg).__name__} without {missing}")
    if cfg.selection != "token":
        raise ValueError(f"nsa_decode covers selection='token' only, got cfg.selection={cfg.selection!r}")
    if q.ndim != 4 or not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q must be float [batch, queries, heads, head_dim], got {q.dtype}{list(q.shape)}")
    b, t, h, d = q.shape
    if not 1 <= t <= MAX_QUERIES:
        raise ValueError(f"nsa_decode takes 1 to {MAX_QUERIES} queries, got T={t}")
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
    fn = common.resolve("nsa_decode", impl, BACKENDS, IMPLEMENTATIONS, dict(cfg=cfg),
                        interpret=interpret, config=config, explain=explain)
    return fn(q, q_positions, k_cmp=k_cmp, v_cmp=v_cmp, cmp_positions=cmp_positions, k_slc=k_slc,
              v_slc=v_slc, slc_positions=slc_positions, k_win=k_win, v_win=v_win,
              win_positions=win_positions, cfg=cfg, scale=1.0 / math.sqrt(d))
