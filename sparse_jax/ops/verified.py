"""Verified sparse attention (vAttention, Desai et al., arXiv 2510.05688), plain jnp.

One decode call attends each kv head over

* a deterministic set `I_f`: the first `num_sinks` positions (sinks), the local window (the
  `window` positions up to the oldest query of the call, and every newer key), and the
  `top_k` other keys of largest logit `q . k` (an *oracle* top-k: the max over the group's
  query heads and the call's queries of the scaled logit, computed from every key), read
  exactly (log-weight 0);
* a uniform sample `I_dyn` of `b` keys drawn without replacement (from a PRNG key) among
  the `n_s` remaining ("residual") keys, each counted as `n_s / b` keys (log-weight
  `log(n_s / b)`, `Selection.log_weights`), so the sampled parts of the softmax numerator
  `N = sum_i e^{s_i} v_i` and denominator `D = sum_i e^{s_i}` are unbiased:

      N_hat = sum_{I_f} e^{s_i} v_i + (n_s / b) sum_{I_dyn} e^{s_j} v_j,   D_hat likewise,
      out = N_hat / D_hat.

The sample size `b` is chosen per (batch row, kv head, decode call) from a user's
`(epsilon, delta)` by the paper's CLT budget (its Theorem on sampling budgets): the
estimate `s_hat` of a residual sum `s` of `n_s` terms (scalars or vectors) from `b`
uniform draws satisfies `P(||s_hat - s||_2 > tau) <= delta` (asymptotically in `b`) when

      b >= ( Phi^{-1}(1 - delta / 2) * n_s * sqrt(Tr Sigma) / tau )^2          (budget)

with `Sigma` the population covariance of the residual terms (`Tr Sigma = sigma^2` for
the denominator's scalars `e^{s_j}`, the summed per-coordinate variance of `e^{s_j} v_j`
for the numerator). `sample_budget` is exactly this formula, `ceil`-ed and clipped to
`[min(1, n_s), n_s]`. Stated bounds (`mode`):

* `"output"` (default): the whole attention output. The paper's combination lemma: if
  `||N_hat - N|| <= eps_N ||N||` and `|D_hat - D| <= eps_D D` then
  `||N_hat/D_hat - N/D|| <= (eps_N + eps_D) / (1 - eps_D) ||N/D||`. With
  `eps_N = eps_D = epsilon / (2 + epsilon)` and `delta / 2` for each (union bound),
  `b = max(b_N, b_D)` gives `P(||out_hat - out||_2 > epsilon ||out||_2) <= delta`
  per query head and query.
* `"denominator"`: the paper's cheaper relaxation, `b = b_D` at `(epsilon, delta)`:
  `P(|D_hat - D| > epsilon D) <= delta`; the output error is then not bounded.

`tau` needs the unknown `N`, `D` and `Sigma`: `estimate="sample"` (the paper's practical
form) estimates them from a base sample of `b0 = max(base_samples, ceil(base_rate * n_s))`
residual keys (the first `b0` of the same random order, so the final sample contains
them; sample variance with ddof=1), `N`, `D` as deterministic part + `n_s` x base mean;
`estimate="exact"` uses the whole residual population (an oracle that reads every key:
the stated bound then holds up to the CLT's approximation only). GQA and decode chunks:
the sample is per kv head, so `b` is the max over the group's query heads and the call's
queries of their own budgets (each query head gets at least its own).

Caveats (see docs/methods/verified.md): the bound is asymptotic (CLT), so small `b` with
heavy-tailed `e^{s_j}` can exceed it; with `estimate="sample"`, `b` depends on the base
sample, so `E[N_hat] = N` holds only approximately; sampling without replacement only
shrinks the variance (finite-population factor `(n_s - b) / (n_s - 1)`), so the budget
(a with-replacement formula) is conservative; the numerator bound for vectors uses
`sqrt(Tr Sigma)`, which bounds the tail for `delta / 2 <= ~0.2` (the one-dimensional case
is then the worst). `b = n_s` (or `epsilon = 0`) reads every key: the output equals dense
attention exactly (log-weights 0).
"""

from __future__ import annotations

import math
import statistics
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sparse_jax.cache.base import weighted_attention
from sparse_jax.ops import selection

MODES = ("output", "denominator")
ESTIMATES = ("sample", "exact")


class VerifiedSelection(NamedTuple):
    """What `verified_selection` chose for one call.

    log_weights `[B, Hkv, S]` float32 (`Selection.log_weights`: 0 deterministic, `log(n_s/b)`
    sampled, -inf not read); budget `[B, Hkv]` int32 (`b`, sampled keys); head_budget
    `[B, Tq, H]` int32 (each query head's own formula budget before the group max, 0 for
    padded queries); n_rest `[B, Hkv]` int32 (`n_s`); deterministic, sampled `[B, Hkv, S]`
    bool.
    """

    log_weights: jax.Array
    budget: jax.Array
    head_budget: jax.Array
    n_rest: jax.Array
    deterministic: jax.Array
    sampled: jax.Array

    def tokens_read(self):
        """`[B, Hkv]` int32: keys read (deterministic + sampled) per kv head."""
        return (self.deterministic | self.sampled).sum(-1).astype(jnp.int32)


def check_tolerance(epsilon, delta, mode="output"):
    """ValueError unless `epsilon` in [0, 1), `delta` in (0, 1), `mode` in `MODES`."""
    if not isinstance(epsilon, (int, float)) or not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon must be a float in [0, 1), got {epsilon!r}")
    if not isinstance(delta, (int, float)) or not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be a float in (0, 1), got {delta!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def split_tolerance(epsilon: float, delta: float, mode: str = "output"):
    """`(eps_N, eps_D, delta_each)` of the stated bound (module docstring); `eps_N` is None
    in "denominator" mode."""
    check_tolerance(epsilon, delta, mode)
    if mode == "denominator":
        return None, float(epsilon), float(delta)
    e = float(epsilon) / (2.0 + float(epsilon))
    return e, e, float(delta) / 2.0


def z_value(delta: float) -> float:
    """`Phi^{-1}(1 - delta / 2)`, the two-sided normal quantile."""
    return statistics.NormalDist().inv_cdf(1.0 - float(delta) / 2.0)


def sample_budget(n_rest, sigma, tau, delta: float):
    """The paper's CLT budget `ceil((Phi^{-1}(1 - delta/2) * n_rest * sigma / tau)^2)`,
    clipped to `[min(1, n_rest), n_rest]` (`tau <= 0` -> `n_rest`).

    Args: n_rest: int array (residual keys); sigma: float array (population std, or
    `sqrt(Tr Sigma)` for vectors); tau: float array (allowed absolute error); all
    broadcastable. Returns int32 of the broadcast shape.
    """
    n = jnp.asarray(n_rest, jnp.float32)
    sigma, tau = jnp.asarray(sigma, jnp.float32), jnp.asarray(tau, jnp.float32)
    ratio = z_value(delta) * n * sigma / jnp.where(tau > 0, tau, 1.0)
    raw = jnp.where(tau > 0, jnp.ceil(jnp.minimum(ratio * ratio, n)), n)
    return jnp.clip(raw, jnp.minimum(n, 1.0), n).astype(jnp.int32)


def _check_inputs(q, k, v, kv_positions, q_positions):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, Tq, H, D], [B, S, Hkv, D], [B, S, Hkv, Dv]; got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    b, tq, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or v.shape[:3] != k.shape[:3] or h % k.shape[2]:
        raise ValueError(f"k {k.shape} / v {v.shape} do not fit q {q.shape} (batch, head_dim, "
                         f"num_heads a multiple of num_kv_heads)")
    if jnp.shape(kv_positions) != k.shape[:2]:
        raise ValueError(f"kv_positions must be int [B, S] = {list(k.shape[:2])}, got {jnp.shape(kv_positions)}")
    if jnp.shape(q_positions) != (b, tq):
        raise ValueError(f"q_positions must be int [B, Tq] = {[b, tq]}, got {jnp.shape(q_positions)}")


def check_config(num_sinks, window, top_k, base_samples, base_rate, estimate):
    """ValueError naming the first bad hyperparameter."""
    for name, val, lo in (("num_sinks", num_sinks, 0), ("window", window, 1), ("top_k", top_k, 0),
                          ("base_samples", base_samples, 2)):
        if not isinstance(val, int) or isinstance(val, bool) or val < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {val!r}")
    if not isinstance(base_rate, (int, float)) or not 0.0 <= base_rate <= 1.0:
        raise ValueError(f"base_rate must be a float in [0, 1], got {base_rate!r}")
    if estimate not in ESTIMATES:
        raise ValueError(f"estimate must be one of {ESTIMATES}, got {estimate!r}")


def _logits(q, k, scale, softcap):
    """`[B, Hkv, G, Tq, S]` float32 (scaled, soft-capped) logits."""
    b, tq, h, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, tq, hkv, h // hkv, d).astype(jnp.float32)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32)) * scale
    return s if softcap is None else softcap * jnp.tanh(s / softcap)


def verified_selection(q, k, v, kv_positions, q_positions, rng, *, epsilon: float = 0.05, delta: float = 0.05,
                       num_sinks: int = 4, window: int = 16, top_k: int = 16, base_samples: int = 2,
                       base_rate: float = 0.05, mode: str = "output", estimate: str = "sample", scale=None,
                       sink_logits=None, softcap=None) -> VerifiedSelection:
    """Choose vAttention's deterministic set and weighted sample (module docstring).

    Args:
      q: `[B, Tq, H, D]` rotated queries of one call; k: `[B, S, Hkv, D]`, v: `[B, S, Hkv, Dv]`
        the slots (cache contents, this call's written); kv_positions: int `[B, S]` (-1 empty);
      q_positions: int `[B, Tq]` (-1 padding); rng: a PRNG key (typed or raw uint32 `[2]`);
      epsilon in [0, 1) (0: read everything), delta in (0, 1): the stated bound (`mode`);
      num_sinks, window (>= 1), top_k (>= 0): the deterministic set;
      base_samples (>= 2), base_rate: the base sample of `estimate="sample"`;
      scale: logit scale (default `1/sqrt(D)`); sink_logits `[H]` or None (learned sinks:
        exact, in the denominator); softcap: logit soft-cap or None.
    Returns:
      `VerifiedSelection`.
    """
    _check_inputs(q, k, v, kv_positions, q_positions)
    check_config(num_sinks, window, top_k, base_samples, base_rate, estimate)
    eps_n, eps_d, delta_each = split_tolerance(epsilon, delta, mode)
    b, tq, h, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    kv_positions = jnp.asarray(kv_positions, jnp.int32)
    q_positions = jnp.asarray(q_positions, jnp.int32)

    q_ok = q_positions >= 0                                                           # [B, Tq]
    qmax = jnp.max(jnp.where(q_ok, q_positions, -1), axis=1, keepdims=True)            # [B, 1]
    qmin = jnp.min(jnp.where(q_ok, q_positions, jnp.iinfo(jnp.int32).max), axis=1, keepdims=True)
    in_play = (kv_positions >= 0) & (kv_positions <= qmax)                            # [B, S]
    fixed = in_play & ((kv_positions < num_sinks) | (kv_positions > qmin - window))   # sinks + window
    candidates = in_play & ~fixed                                                     # older: all queries see them

    logits = _logits(q, k, scale, softcap)                                            # [B, Hkv, G, Tq, S]
    visible = (kv_positions[:, None, :] <= q_positions[:, :, None]) & (kv_positions[:, None, :] >= 0) \
        & q_ok[:, :, None]                                                            # [B, Tq, S]
    vis = visible[:, None, None]                                                      # [B, 1, 1, Tq, S]
    if top_k > 0:
        score = jnp.where(vis, logits, -jnp.inf).max(axis=(2, 3))                    # [B, Hkv, S]
        top = selection.select_top_k(score[:, :, None], candidates[:, None, None], top_k)   # [B, 1, Hkv, k]
        topk = selection.selected_mask(top, s_len)[:, 0]                              # [B, Hkv, S]
    else:
        topk = jnp.zeros((b, hkv, s_len), bool)
    deterministic = (fixed[:, None] | topk) & in_play[:, None]                       # [B, Hkv, S]
    residual = candidates[:, None] & ~topk                                            # [B, Hkv, S]
    n_rest = residual.sum(-1).astype(jnp.int32)                                       # [B, Hkv]

    # One uniform random order of each kv head's residual keys: rank 0 .. n_rest - 1.
    key = rng if jnp.issubdtype(jnp.asarray(rng).dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(rng)
    u = jnp.where(residual, jax.random.uniform(key, (b, hkv, s_len)), 2.0)
    rank = jnp.argsort(jnp.argsort(u, axis=-1), axis=-1)
    n_f = n_rest.astype(jnp.float32)
    if estimate == "sample":
        b0 = jnp.minimum(jnp.maximum(jnp.ceil(base_rate * n_f).astype(jnp.int32), base_samples), n_rest)
        population, ddof = residual & (rank < b0[..., None]), 1
    else:
        b0 = jnp.zeros_like(n_rest)
        population, ddof = residual, 0
    n_pop = population.sum(-1).astype(jnp.float32)[:, :, None, None]                 # [B, Hkv, 1, 1]

    # e_j = exp(s_j - m): m (the max visible logit, sinks included) is a shift only.
    m = jnp.where(vis, logits, -jnp.inf).max(-1)                                      # [B, Hkv, G, Tq]
    sinks = None
    if sink_logits is not None:
        sinks = jnp.asarray(sink_logits, jnp.float32).reshape(1, hkv, h // hkv, 1)
        m = jnp.maximum(m, sinks)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(vis, jnp.exp(logits - m[..., None]), 0.0)                           # [B, Hkv, G, Tq, S]
    vf = v.astype(jnp.float32)
    det_e = jnp.where(deterministic[:, :, None, None], e, 0.0)
    d_fixed = det_e.sum(-1) + (0.0 if sinks is None else jnp.exp(sinks - m))
    n_fixed = jnp.einsum("bhgqk,bkhd->bhgqd", det_e, vf)                              # [B, Hkv, G, Tq, Dv]
    pop_e = jnp.where(population[:, :, None, None], e, 0.0)
    safe_n = jnp.maximum(n_pop, 1.0)
    mean_e = pop_e.sum(-1) / safe_n                                                   # [B, Hkv, G, Tq]
    mean_x = jnp.einsum("bhgqk,bkhd->bhgqd", pop_e, vf) / safe_n[..., None]           # [B, Hkv, G, Tq, Dv]
    denom = jnp.maximum(n_pop - ddof, 1.0)
    var_e = jnp.where(population[:, :, None, None], (e - mean_e[..., None]) ** 2, 0.0).sum(-1) / denom
    # Tr Sigma of x_j = e_j v_j: sum_j ||e_j v_j - mean_x||^2 = e_j^2 |v_j|^2 - 2 e_j v_j.mean_x + |mean_x|^2.
    v2 = jnp.einsum("bkhd,bkhd->bhk", vf, vf)[:, :, None, None]                      # [B, Hkv, 1, 1, S]
    vm = jnp.einsum("bkhd,bhgqd->bhgqk", vf, mean_x)
    dev = jnp.maximum(e * e * v2 - 2.0 * e * vm + (mean_x * mean_x).sum(-1)[..., None], 0.0)
    tr_var = jnp.where(population[:, :, None, None], dev, 0.0).sum(-1) / denom

    n_s = n_f[:, :, None, None]
    d_hat = d_fixed + n_s * mean_e
    q_live = q_ok[:, None, None, :]                                                   # [B, 1, 1, Tq]
    n_int = n_rest[:, :, None, None]
    if epsilon == 0:
        head = jnp.broadcast_to(n_int, d_hat.shape)
    else:
        head = sample_budget(n_int, jnp.sqrt(var_e), eps_d * d_hat, delta_each)
        if eps_n is not None:
            n_hat = jnp.linalg.norm(n_fixed + n_s[..., None] * mean_x, axis=-1)
            head = jnp.maximum(head, sample_budget(n_int, jnp.sqrt(tr_var), eps_n * n_hat, delta_each))
    head = jnp.where(q_live, head, 0)                                                 # [B, Hkv, G, Tq]
    budget = jnp.minimum(jnp.maximum(head.max(axis=(2, 3)), b0), n_rest)              # [B, Hkv]
    sampled = residual & (rank < budget[..., None])
    weight = jnp.log(n_f / jnp.maximum(budget, 1).astype(jnp.float32))               # [B, Hkv]
    log_weights = jnp.where(deterministic, 0.0, jnp.where(sampled, weight[..., None], -jnp.inf))
    head_budget = head.transpose(0, 3, 1, 2).reshape(b, tq, h)
    return VerifiedSelection(log_weights.astype(jnp.float32), budget.astype(jnp.int32), head_budget.astype(jnp.int32),
                             n_rest, deterministic, sampled)


def verified_attention(q, k, v, kv_positions, q_positions, rng, *, scale=None, sink_logits=None, softcap=None,
                       **kwargs):
    """vAttention: `verified_selection(...)` (its keyword arguments), then causal attention of
    `q [B, Tq, H, D]` over the weighted selection (`weighted_attention`) ->
    `(out [B, Tq, H, Dv], VerifiedSelection)`."""
    sel = verified_selection(q, k, v, kv_positions, q_positions, rng, scale=scale, sink_logits=sink_logits,
                             softcap=softcap, **kwargs)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out = weighted_attention(q, k, v, kv_positions, q_positions, sel.log_weights, scale=scale,
                             sink_logits=sink_logits, softcap=softcap)
    return out, sel


def dense_attention(q, k, v, kv_positions, q_positions, *, scale=None, sink_logits=None, softcap=None):
    """The exact causal attention vAttention estimates (every valid slot at log-weight 0)
    -> `[B, Tq, H, Dv]`."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    b, s, hkv = k.shape[:3]
    zeros = jnp.where(jnp.asarray(kv_positions)[:, None, :] >= 0, 0.0, -jnp.inf) * jnp.ones((b, hkv, s))
    return weighted_attention(q, k, v, kv_positions, q_positions, zeros.astype(jnp.float32), scale=scale,
                              sink_logits=sink_logits, softcap=softcap)
