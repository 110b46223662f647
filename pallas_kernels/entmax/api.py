"""`entmax`: alpha-entmax attention, forward and backward (sparse: exact zeros).

`entmax_attention(q, k, v, alpha=1.5)` replaces softmax by alpha-entmax (Peters, Niculae &
Martins 2019, arXiv 1905.05702; AdaSplash, Goncalves et al. 2025, arXiv 2502.12082):
`p_j = [(alpha - 1) s_j - tau]_+^(1/(alpha-1))` with `s = scale * q . k` and `tau` the
per-row threshold making `p` sum to 1. `alpha` in (1, 2]; 2 is sparsemax. alpha = 1
(softmax) is the `flash` op's, not this one's (the op layer maps it there).

`impl`: "auto" (Triton on a GPU, the XLA reference elsewhere), "xla", "triton",
resolved by `common.resolve` from what each backend module declares (`CONFIG`,
`supports`). `interpret=True` runs the Pallas kernel in interpret mode on CPU.
"""

from __future__ import annotations

import math

from pallas_kernels import common
from pallas_kernels.entmax import reference, triton
from pallas_kernels.entmax.reference import entmax_reference
from pallas_kernels.entmax.triton import EntmaxTritonConfig, entmax_triton

# Order of preference for impl="auto": Triton (GPU), the XLA reference (CPU, TPU).
BACKENDS = {"triton": triton, "xla": reference}
IMPLEMENTATIONS = {"xla": entmax_reference, "triton": entmax_triton}

__all__ = ["BACKENDS", "EntmaxTritonConfig", "IMPLEMENTATIONS", "check_alpha", "entmax_attention"]


def check_alpha(alpha) -> float:
    """alpha must be a concrete number in (1, 2]; 1 (softmax) belongs to `flash`."""
    try:
        value = None if isinstance(alpha, (bool, str)) else float(alpha)
    except TypeError:                  # traced or not a number
        value = None
    if value is None or not math.isfinite(value):
        raise ValueError(f"alpha must be a concrete (static) number in (1, 2], got {alpha!r}")
    if value == 1.0:
        raise ValueError("alpha=1 is softmax: use pallas_kernels.flash.flash_attention "
                         "(the entmax op takes alpha in (1, 2])")
    if not 1.0 < value <= 2.0:
        raise ValueError(f"alpha must be in (1, 2] (2 = sparsemax), got {alpha!r}")
    return value


def entmax_attention(q, k, v, *, alpha=1.5, q_positions=None, kv_positions=None, causal=True,
                     scale=None, impl="auto", return_tau=False, interpret=None, config=None,
                     explain=False):
    """alpha-entmax attention.

    Args:
      q: `[B, Tq, H, D]`; k: `[B, Tk, Hkv, D]`; v: `[B, Tk, Hkv, Dv]`, one float dtype
        (GQA: `Hkv` divides `H`; KV is never repeated in memory).
      alpha: static float in (1, 2] (1.5 the usual choice, 2 = sparsemax).
      q_positions, kv_positions: int `[B, Tq]`, `[B, Tk]` (default `arange`); negative
        marks padding (never visible; a padded query returns zeros).
      causal: key visible iff `kv_pos <= q_pos` (both >= 0); False: every non-padding key.
      scale: logit scale (> 0), default `1/sqrt(D)`.
      impl: "auto" | "xla" | "triton" (`common.resolve`).
      return_tau: also return the threshold `tau [B, H, Tq]` float32, in units of
        `(alpha - 1) * s` (`+inf` on rows that see no key); not differentiated.
      interpret: run the Pallas kernel in interpret mode (CPU tests); None = False.
      config: the Triton kernel's tiles (`EntmaxTritonConfig`); None: its defaults.
      explain: print which backend runs and why the others were skipped.
    Returns:
      `o [B, Tq, H, Dv]` in q's dtype, or `(o, tau)` with `return_tau`. Rows that see
      nothing are zeros, never NaN.
    """
    alpha = check_alpha(alpha)
    b, tq, tk, h, hkv, d = common.check_qkv(q, k, v)
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    args = dict(alpha=alpha,
                q_positions=common.check_positions("q_positions", q_positions, b, tq),
                kv_positions=common.check_positions("kv_positions", kv_positions, b, tk),
                causal=causal, scale=common.check_scale(scale, d))
    interpret = bool(interpret)
    call = dict(q=q, k=k, v=v, **args)
    fn = common.resolve("entmax", impl, BACKENDS, IMPLEMENTATIONS, call, interpret=interpret,
                        config=config, explain=explain)
    return fn(q, k, v, **args, return_tau=return_tau)
