"""FP8 (e4m3) lightning-indexer scores, as DeepSeek-V3.2 computes them (arXiv 2512.02556).

`score_dtype="float8_e4m3fn"` in `indexer_topk` replaces the scores
`I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s])` by

    I8[t, s] = sk[s] * sum_j (w[t, j] * sq[t, j]) * ReLU(q8[t, j] . k8[s])

1. Rotation: `q`, `k` are multiplied along `D_I` by the orthonormal Walsh-Hadamard matrix
   (`hadamard`: `D_I` zero-padded to the next power of two, a fast transform of `log2 D`
   butterfly steps in jnp, scaled by `1 / sqrt(D)`). An orthonormal rotation leaves every
   `q . k` unchanged and spreads an outlier coordinate over all of them, so the per-row scale
   below wastes less of e4m3's range on one large entry (DeepSeek's `rotate_activation`
   before its FP8 indexer; QuaRot, arXiv 2404.00456).
2. Per-row (per-token) scales: each query row `q[t, j]` (one per token and head) and each
   key row `k[s]` is scaled by `amax(|row|) / 448` (448 = e4m3's largest finite value) and
   rounded to e4m3 (`quantize_rows`); an all-zero row gets scale 1.
3. Dot and epilogue: the `[bq, D] x [D, bk]` dot of e4m3 operands accumulates in float32;
   ReLU (commutes with the positive scales), the head weights times the query scales
   `w[t, j] * sq[t, j]` (folded once per token and head, as DeepSeek's kernel folds them),
   the head sum, then the key scale `sk[s]` once per score, after the dot.

The XLA path (`chunk_scores_fp8`) widens the e4m3 operands to float32 (every e4m3 value and
every product of two is exact in float32, so it is the e4m3 dot with a float32 accumulate,
up to summation order); the Triton kernel (`triton.py`) feeds the e4m3 tiles to `tt.dot`
(Hopper: FP8 wgmma, float32 accumulate). The exact `lax.top_k` set of the float32 scores
(`reference.chunk_scores_reference`) stays the reference the FP8 selection is measured against
(`experiments/dsa_warmup.py --fp8_overlap`).

`quantized_scores` computes the variants that report compares (per-block scales along `D`,
as DeepGEMM's 1 x 128 / 1 x 32 groups; queries left in bf16; no rotation).
"""

from __future__ import annotations

import jax.numpy as jnp

SCORE_DTYPES = ("bfloat16", "float8_e4m3fn")
E4M3_MAX = 448.0


def check_score_dtype(score_dtype) -> str:
    """`score_dtype` as a string of `SCORE_DTYPES`, else ValueError."""
    if not isinstance(score_dtype, str) or score_dtype not in SCORE_DTYPES:
        raise ValueError(f"score_dtype must be one of {SCORE_DTYPES}, got {score_dtype!r}")
    return score_dtype


def hadamard(x):
    """Orthonormal Walsh-Hadamard transform of the last axis, float32.

    x: `[..., D]` -> `[..., D']`, `D'` the next power of two >= D (x zero-padded first), so
    `hadamard(a) . hadamard(b) == a . b` up to float32 rounding. Fast transform: `log2 D'`
    butterfly steps `(a, b) -> (a + b, a - b)` over halves of growing width.
    """
    x = x.astype(jnp.float32)
    d = x.shape[-1]
    n = 1 << max(0, d - 1).bit_length()
    if n != d:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - d)])
    lead = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(lead + (n // (2 * h), 2, h))
        a, b = y[..., 0, :], y[..., 1, :]
        x = jnp.stack([a + b, a - b], axis=-2).reshape(lead + (n,))
        h *= 2
    return x * (1.0 / float(n) ** 0.5)


def quantize_rows(x, block: int | None = None, dtype=jnp.float8_e4m3fn):
    """Round `x [..., D]` to e4m3 with one float32 scale per row (`block=None`) or per group
    of `block` consecutive entries of a row (D a multiple of `block`).

    Returns `(x8 [..., D] e4m3, scale [...] or [..., D / block] float32)` with
    `x ~= x8 * scale` (scale = amax / 448 of the row or group; 1 where it is all zero).
    """
    x = x.astype(jnp.float32)
    d = x.shape[-1]
    g = x.reshape(x.shape[:-1] + ((1, d) if block is None else (d // block, block)))
    amax = jnp.max(jnp.abs(g), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
    x8 = jnp.clip(g / scale, -E4M3_MAX, E4M3_MAX).astype(dtype).reshape(x.shape)
    scale = scale[..., 0]
    return x8, (scale[..., 0] if block is None else scale)


def quantize_indexer(q_index, weights, k_index):
    """The operands of the FP8 scores: rotation, per-row e4m3 rounding, query scales folded
    into the head weights.

    q_index `[B, T, H_I, D_I]`, weights `[B, T, H_I]`, k_index `[B, S, D_I]` ->
    `(q8 [B, T, H_I, D'] e4m3, w_eff [B, T, H_I] float32 = w * sq, k8 [B, S, D'] e4m3,
    k_scale [B, S] float32)`, `D'` the next power of two >= D_I.
    """
    q8, sq = quantize_rows(hadamard(q_index))
    k8, sk = quantize_rows(hadamard(k_index))
    return q8, weights.astype(jnp.float32) * sq, k8, sk


def chunk_scores_fp8(q8, w_eff, k8, k_scale, q_positions, kv_positions):
    """One chunk's FP8 scores `[B, C, S]` float32 (XLA): `k_scale[s] * sum_j w_eff[t, j] *
    ReLU(q8[t, j] . k8[s])`, -inf where the key is invisible (as the reference).

    q8 `[B, C, H_I, D]` e4m3, w_eff `[B, C, H_I]` float32, k8 `[B, S, D]` e4m3, k_scale
    `[B, S]` float32, positions `[B, C]` / `[B, S]` int (negative = padding).
    """
    dots = jnp.einsum("btjd,bsd->btjs", q8.astype(jnp.float32), k8.astype(jnp.float32),
                      precision="highest")
    scores = jnp.einsum("btj,btjs->bts", w_eff, jnp.maximum(dots, 0.0), precision="highest")
    scores = scores * k_scale[:, None, :].astype(jnp.float32)
    qp, kp = q_positions[:, :, None], kv_positions[:, None, :]
    vis = (qp >= 0) & (kp >= 0) & (kp <= qp)
    return jnp.where(vis, scores, -jnp.inf)


def quantized_scores(q_index, weights, k_index, *, block: int | None = None, rotate: bool = True,
                     q_dtype="float8_e4m3fn"):
    """Unmasked `[B, T, S]` float32 scores of a quantisation variant (for the overlap study).

    block: scale group along D (None = one per row); rotate: Hadamard first; q_dtype:
    "float8_e4m3fn" (both operands e4m3) or "bfloat16" (queries rounded to bf16, keys e4m3).
    Per-group scales are applied per group partial dot (`sum_g sq_g sk_g (q8_g . k8_g)`).
    """
    if q_dtype not in SCORE_DTYPES:
        raise ValueError(f"q_dtype must be one of {SCORE_DTYPES}, got {q_dtype!r}")
    q = hadamard(q_index) if rotate else q_index.astype(jnp.float32)
    k = hadamard(k_index) if rotate else k_index.astype(jnp.float32)
    d = q.shape[-1]
    bl = d if block is None else min(block, d)
    k8, sk = quantize_rows(k, bl)                                       # [B, S, D], [B, S, G]
    kd = (k8.astype(jnp.float32).reshape(k.shape[:-1] + (d // bl, bl)) * sk[..., None])
    if q_dtype == "bfloat16":
        qd = q.astype(jnp.bfloat16).astype(jnp.float32).reshape(q.shape[:-1] + (d // bl, bl))
    else:
        q8, sq = quantize_rows(q, bl)
        qd = q8.astype(jnp.float32).reshape(q.shape[:-1] + (d // bl, bl)) * sq[..., None]
    dots = jnp.einsum("btjgd,bsgd->btjs", qd, kd, precision="highest")
    return jnp.einsum("btj,btjs->bts", weights.astype(jnp.float32), jnp.maximum(dots, 0.0),
                      precision="highest")
