"""XLA reference of `entmax`: alpha-entmax attention in plain jnp, float32 inside.

alpha-entmax (Peters, Niculae & Martins 2019, arXiv 1905.05702; attention: Correia et al.
2019, arXiv 1909.00015) maps the scores `s = scale * q . k` of a row to

    p_j = [(alpha - 1) s_j - tau]_+ ^ (1 / (alpha - 1)),    tau such that sum_j p_j = 1,

so keys below the threshold get exactly zero probability (alpha -> 1 is softmax, alpha = 2
sparsemax). `tau` is in units of `z = (alpha - 1) s` and lies in
`[max z - 1, max z - (1/n)^(alpha-1)]` for a row of `n` visible keys.

The threshold: sort-based and exact for alpha = 1.5 (Peters et al. 2019, Alg. 2) and
alpha = 2 (sparsemax, Martins & Astudillo 2016, arXiv 1602.02068), over the top 256 values
of longer rows first (exact when the support is smaller; else the full sort); by bisection to float32
precision (then renormalised) for any other alpha (`threshold_bisect`, also usable for 1.5
and 2, which the tests compare).

The backward is entmax's sparse Jacobian (Peters et al. 2019, Prop. 2): with
`g = p^(2 - alpha)` on the support (0 elsewhere), `ds = g * dp - g * sum(g * dp) / sum(g)`.
The threshold returned with `return_tau` is not differentiated (its cotangent is ignored).
Rows that see no key give `p = 0`, output zeros and `tau = +inf`, never NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.flash.reference import element_mask
from pallas_kernels.tiles_common import causal as causal_predicate

NEG = -1e30          # stands for -inf in masked z (finite: no inf - inf)
BISECT_STEPS = 40    # bracket width < 1 halved 40 times: below float32 resolution of z
TOPK_CANDIDATES = 256  # threshold_sort: longer rows search their largest 256 values first


def _support_tau(xs, cum, k, alpha):
    """Candidate thresholds for supports of the top-`k` sorted values (`k = 1..n`)."""
    if alpha == 2.0:
        return (cum - 1.0) / k
    mean = cum / k
    mean_sq = jnp.cumsum(xs * xs, axis=-1) / k
    ss = k * (mean_sq - mean * mean)
    delta = (1.0 - ss) / k
    # double where: differentiable (no 0 * inf) where the candidate's delta clamps to 0
    root = jnp.where(delta > 0, jnp.sqrt(jnp.where(delta > 0, delta, 1.0)), 0.0)
    return mean - root


def _threshold_from_sorted(xs, n, alpha):
    """tau (relative to the row max) and the support size from a row's largest values
    `xs [..., c]`, shifted by the max and sorted descending (masked ones last, any value)."""
    k = jnp.arange(1, xs.shape[-1] + 1, dtype=jnp.float32)
    valid = k <= n[..., None]
    xs = jnp.where(valid, xs, 0.0)
    cum = jnp.cumsum(xs, axis=-1)
    tau_k = _support_tau(xs, cum, k, alpha)
    # Support size: the largest k whose candidate threshold lies below its k-th value (the
    # test holds for k <= size and fails after it, so `c` values decide any size < c).
    ok = valid & (tau_k < xs) if alpha == 2.0 else valid & (tau_k <= xs)
    size = jnp.maximum(ok.sum(-1), 1)
    return jnp.take_along_axis(tau_k, (size - 1)[..., None], axis=-1)[..., 0], size


def threshold_sort(z, mask, alpha: float, candidates: int | None = TOPK_CANDIDATES):
    """Exact tau (z units) for alpha in {1.5, 2} by sorting: `z [..., n]` float32,
    `mask [..., n]` bool. Returns `[...]` float32 (`+inf` where nothing is visible).

    candidates: rows longer than this first sort only their `candidates` largest values
    (`lax.top_k`, ~9x cheaper than a full sort of 4K on CPU): exact whenever the support is
    smaller, as it nearly always is for long rows; the rows whose support may be larger are
    redone with the full sort (only when there are some). None: always the full sort."""
    if alpha not in (1.5, 2.0):
        raise ValueError(f"threshold_sort is exact for alpha in (1.5, 2.0) only, got {alpha}")
    n = mask.sum(-1)
    m = jnp.where(mask, z, NEG).max(-1, keepdims=True)
    x = jnp.where(mask, z - m, NEG)              # shifted; masked entries sort last

    def full_sort():
        return _threshold_from_sorted(-jnp.sort(-x, axis=-1), n, alpha)[0]

    if candidates is None or z.shape[-1] <= candidates:
        tau = full_sort()
    else:
        tau, size = _threshold_from_sorted(lax.top_k(x, candidates)[0], n, alpha)
        redo = (size >= candidates) & (n > candidates)
        tau = lax.cond(redo.any(), lambda: jnp.where(redo, full_sort(), tau), lambda: tau)
    return jnp.where(n > 0, tau + m[..., 0], jnp.inf)


def threshold_bisect(z, mask, alpha: float, steps: int = BISECT_STEPS):
    """tau (z units) by bisection on `f(tau) = sum [z - tau]_+^(1/(alpha-1)) - 1` over
    the bracket `[max z - 1, max z - (1/n)^(alpha-1)]`; any alpha in (1, 2]."""
    n = mask.sum(-1)
    m = jnp.where(mask, z, NEG).max(-1)
    x = jnp.where(mask, z - m[..., None], NEG)
    inv = 1.0 / (alpha - 1.0)
    lo = jnp.full(m.shape, -1.0, jnp.float32)
    hi = -jnp.power(1.0 / jnp.maximum(n, 1).astype(jnp.float32), alpha - 1.0)

    def step(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        f = jnp.power(jnp.maximum(x - mid[..., None], 0.0), inv).sum(-1)
        return jnp.where(f >= 1.0, mid, lo), jnp.where(f >= 1.0, hi, mid)

    lo, hi = lax.fori_loop(0, steps, step, (lo, hi))
    return jnp.where(n > 0, lo + m, jnp.inf)


def threshold(z, mask, alpha: float):
    """Exact (sort) for alpha in {1.5, 2}, bisection otherwise."""
    if alpha in (1.5, 2.0):
        return threshold_sort(z, mask, alpha)
    return threshold_bisect(z, mask, alpha)


def probabilities(z, mask, tau, alpha: float):
    """`p = [z - tau]_+^(1/(alpha-1))` renormalised to sum 1 (a no-op up to rounding for
    the exact threshold; removes bisection's residual), zeros on masked entries/rows."""
    r = jnp.where(mask, jnp.maximum(z - jnp.where(jnp.isfinite(tau), tau, 0.0)[..., None], 0.0), 0.0)
    p = r if alpha == 2.0 else (r * r if alpha == 1.5 else jnp.power(r, 1.0 / (alpha - 1.0)))
    total = p.sum(-1, keepdims=True)
    return p / jnp.where(total > 0, total, 1.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def entmax(s, mask, alpha: float):
    """alpha-entmax over the last axis of scores `s` (float32) where `mask` (bool, same
    shape) is True; returns `(p, tau)` (`tau` in `(alpha-1) s` units, not differentiated)."""
    z = jnp.where(mask, (alpha - 1.0) * s, NEG)
    tau = threshold(z, mask, alpha)
    return probabilities(z, mask, tau, alpha), tau


def _entmax_fwd(s, mask, alpha):
    p, tau = entmax(s, mask, alpha)
    return (p, tau), (p, mask)


def _entmax_bwd(alpha, res, cts):
    p, mask = res
    dp, _ = cts
    if alpha == 2.0:
        g = (p > 0).astype(p.dtype)
    else:
        g = jnp.where(p > 0, jnp.sqrt(p) if alpha == 1.5 else jnp.power(p, 2.0 - alpha), 0.0)
    gsum = g.sum(-1, keepdims=True)
    c = (g * dp).sum(-1, keepdims=True) / jnp.where(gsum > 0, gsum, 1.0)
    return g * (dp - c), None


entmax.defvjp(_entmax_fwd, _entmax_bwd)


def entmax_reference(q, k, v, *, alpha: float, q_positions, kv_positions, causal: bool,
                     scale: float, return_tau: bool):
    """The api's contract in plain jnp (see `pallas_kernels.entmax.api`).

    q `[B, Tq, H, D]`, k `[B, Tk, Hkv, D]`, v `[B, Tk, Hkv, Dv]`, positions int `[B, T]`.
    Returns `o [B, Tq, H, Dv]` in q's dtype, and `tau [B, H, Tq]` float32 with `return_tau`.
    """
    b, tq, h, d = q.shape
    hkv = k.shape[2]
    g = h // hkv
    visible = element_mask(causal_predicate if causal else None, q_positions, kv_positions,
                           None, None)                                     # [B, Tq, Tk]
    qg = q.reshape(b, tq, hkv, g, d).astype(jnp.float32)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32)) * scale
    mask = jnp.broadcast_to(visible[:, None, None], s.shape)
    p, tau = entmax(s, mask, float(alpha))
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32))
    out = out.reshape(b, tq, h, v.shape[-1]).astype(q.dtype)
    if not return_tau:
        return out
    return out, lax.stop_gradient(tau).reshape(b, h, tq)


def entmax_probabilities(q, k, *, alpha: float, q_positions, kv_positions, causal: bool,
                         scale: float):
    """The reference's probabilities `[B, H, Tq, Tk]` float32 (for tests and benchmarks:
    the fraction of exact zeros)."""
    b, tq, h, d = q.shape
    hkv = k.shape[2]
    visible = element_mask(causal_predicate if causal else None, q_positions, kv_positions,
                           None, None)
    qg = q.reshape(b, tq, hkv, h // hkv, d).astype(jnp.float32)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32)) * scale
    p, _ = entmax(s, jnp.broadcast_to(visible[:, None, None], s.shape), float(alpha))
    return p.reshape(b, h, tq, k.shape[1]), visible


# Backend declaration for `pallas_kernels.common.resolve`: every call, any platform.
CONFIG = None
