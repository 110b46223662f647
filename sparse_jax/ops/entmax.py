"""alpha-entmax attention and ASEntmax's length-scaled query temperature, as pure functions.

* `entmax_attention`: causal attention whose probabilities are
  `alpha-entmax(q.k / sqrt(D))` (Peters, Niculae & Martins 2019, arXiv 1905.05702;
  attention: Correia, Niculae & Martins 2019, arXiv 1909.00015): `p_j = [(alpha - 1) s_j -
  tau]_+^(1 / (alpha - 1))` with `tau` the threshold making them sum to 1, so keys below it
  get exactly zero. `alpha = 1` is softmax and goes through the `flash` op
  (`sparse_jax.ops.attention.local_attention`); `1 < alpha <= 2` goes through the
  `pallas_kernels.entmax` op (AdaSplash-style kernels, Goncalves et al., ICML 2025,
  arXiv 2502.12082). `alpha = 2` is sparsemax.
* `asentmax_scale`: ASEntmax ("Long-Context Generalization with Sparse Attention",
  Vasylenko et al., arXiv 2506.16640) multiplies each query by a per-head,
  per-position temperature `delta + beta_h * log(t + 2) ** gamma_h` (t = the query's
  0-based position, so `t + 1` keys are visible and the logarithm starts at log 2 > 0),
  with learnable `beta_h`, `gamma_h` and a fixed `delta` (default 1). This follows the
  authors' code (github.com/deep-spin/asentmax, `synthetic/src/models/architectures/
  sparse_gemma.py`, `_apply_length_scaling`, `attn_scale_type="learn"`). `gamma = None`
  gives the Scalable-Softmax form `beta_h * log(t + 2)` (Nakanishi, arXiv 2501.19399; the
  repo's `"nakanishi"`), with no `delta`.

Shapes: `q [B, Tq, H, D]`, `k [B, Tk, Hkv, D]`, `v [B, Tk, Hkv, Dv]`, positions `[B, Tq]` /
`[B, Tk]` (negative = padding). Outputs `[B, Tq, H, Dv]`.

`decoding=True` (a layer called with a cache) sends calls of at most
`sparse_jax.ops.attention.DECODE_MAX_QUERIES` queries to the op's XLA reference (`impl="xla"`
unless another impl is asked for): one query against a long cache needs no tiled kernel.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.entmax import entmax_attention as entmax_op
from sparse_jax.ops.attention import DECODE_MAX_QUERIES, local_attention


def check_alpha(alpha) -> float:
    """`alpha` as a float in [1, 2], else ValueError (1 = softmax, 2 = sparsemax)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 1.0 <= float(alpha) <= 2.0:
        raise ValueError(f"alpha must be a number in [1, 2] (1 = softmax, 1.5 = entmax15, 2 = sparsemax), "
                         f"got {alpha!r}")
    return float(alpha)


def entmax_attention(q, k, v, q_positions, kv_positions, *, alpha: float, decoding: bool = False,
                     sink_logits=None, softcap=None, impl: str = "auto"):
    """Causal alpha-entmax attention of `q [B, Tq, H, D]` over `k, v [B, Tk, Hkv, D]`
    (GQA by `H % Hkv == 0`), scale `1 / sqrt(D)`; query i sees key j when
    `0 <= kv_positions[j] <= q_positions[i]`. -> `[B, Tq, H, Dv]`, zeros for padded queries.

    alpha: in [1, 2] (static). 1 is softmax through `flash` / `decode` (the only case that
    takes `sink_logits` and `softcap`); `1 < alpha <= 2` through `pallas_kernels.entmax`.
    decoding: a call of at most `DECODE_MAX_QUERIES` queries against a cache; then the
    op's XLA reference runs (`impl="auto"` -> "xla").
    """
    alpha = check_alpha(alpha)
    if alpha == 1.0:
        return local_attention(q, k, v, q_positions, kv_positions, decoding=decoding,
                               sink_logits=sink_logits, softcap=softcap, impl=impl)
    if sink_logits is not None or softcap is not None:
        raise ValueError(f"entmax attention (alpha={alpha}) takes no sink_logits or softcap; "
                         "they are options of softmax attention (alpha=1)")
    if decoding and q.shape[1] <= DECODE_MAX_QUERIES and impl == "auto":
        impl = "xla"
    return entmax_op(q, k, v, alpha=alpha, q_positions=q_positions, kv_positions=kv_positions,
                     causal=True, impl=impl)


def asentmax_scale(positions, beta, gamma=None, delta: float = 1.0):
    """ASEntmax's query temperature `[B, T, H]` float32 (multiply `q [B, T, H, D]` by it).

    positions: int `[B, T]` (negative = padding, treated as 0). beta: `[H]`. gamma: `[H]`
    -> `delta + beta * log(t + 2) ** gamma`; None -> `beta * log(t + 2)` (SSMax).
    """
    if beta.ndim != 1 or (gamma is not None and gamma.shape != beta.shape):
        raise ValueError(f"beta and gamma must be [H] of one shape, got {beta.shape}, "
                         f"{None if gamma is None else gamma.shape}")
    log_n = jnp.log(jnp.maximum(positions, 0).astype(jnp.float32) + 2.0)[..., None]     # [B, T, 1]
    beta = beta.astype(jnp.float32)
    if gamma is None:
        return beta * log_n
    return delta + beta * log_n ** gamma.astype(jnp.float32)
