"""Double-P: hierarchical top-p sparse attention over k-means clusters of the prompt keys
(Ni et al., "Double-P: Hierarchical Top-P Sparse Attention for Long-Context LLMs",
arXiv 2602.05191). Plain jnp, float32 inside, written for clarity.

At prefill each (batch row, kv head)'s prompt keys are clustered by k-means (`kmeans`: a
few Lloyd iterations from a deterministic init) and summarised (`cluster_summaries`): per
cluster i its centroid `c_i` (mean member key), size `s_i` and mean value `v_i`. At
decode:

1. estimated mass (`cluster_mass`): cluster i's logit is `q . c_i * scale + log s_i` (a
   cluster of s_i keys near c_i weighs about s_i times one key at c_i); the softmax over
   clusters is the estimated share of the attention that falls in each cluster, per
   query head and query;
2. top-p (`select_clusters`): for each query head and query, the fewest clusters whose
   estimated mass reaches `top_p`; their union over the query heads of a kv head (GQA)
   and the queries of the call is *exact*: the member tokens are attended one by one
   (every query head keeps at least `top_p` of its estimated mass exact);
3. every other cluster is *approximated*: one slot with key `c_i`, value `v_i` and
   log-weight `log s_i` (it counts as s_i keys, `Selection.log_weights`); optionally
   (`keep_p < 1`) only those among the top `keep_p` clusters of estimated mass, the
   tail beyond being dropped.

The number of exact tokens follows the attention's spread, per kv head and per step (a
peaked head reads one cluster, a flat head many). `doublep_slots` lays the tokens and
the centroids side by side with their log-weights; `doublep_attention` is the reference
(`sparse_jax.cache.base.weighted_attention`, the dense masked softmax, over those
slots). The paper's two thresholds map onto `keep_p` (clusters attended at all, exactly or
through their centroid) and `top_p` (clusters refined to token level); see
docs/methods/doublep.md for what is and is not the paper's.

Shapes: keys `k [B, S, Hkv, D]`, values `v [B, S, Hkv, Dv]`, queries `q [B, Tq, H, D]`
(query head h reads kv head `h // (H / Hkv)`), `C` clusters per (row, kv head).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_jax.cache.base import weighted_attention
from sparse_jax.ops.quest import select_top_p


def _check(name, cond, msg):
    if not cond:
        raise ValueError(f"{name}: {msg}")


def initial_centroids(x, valid, num_clusters: int):
    """Deterministic k-means init: the valid tokens of ranks `floor(i * n / C)`, `i < C`
    (n valid tokens per row; spread evenly along the sequence).

    Args: x `[N, S, D]`, valid bool `[N, S]`, num_clusters C.
    Returns: `[N, C, D]` float32 (rows with n < C repeat tokens; a row with n = 0 gives
    token 0's vector, whose clusters stay empty).
    """
    n = valid.sum(-1)                                                          # [N]
    target = (jnp.arange(num_clusters)[None] * n[:, None]) // num_clusters     # [N, C] ranks
    counts = jnp.cumsum(valid, -1)                                             # [N, S]
    idx = jax.vmap(lambda c, t: jnp.searchsorted(c, t + 1, side="left"))(counts, target)
    idx = jnp.minimum(idx, x.shape[1] - 1)
    return jnp.take_along_axis(x, idx[..., None], axis=1).astype(jnp.float32)


def nearest_centroid(x, centroids, valid, *, chunk: int = 2048):
    """Index of the nearest centroid (squared Euclidean distance; ties to the lower index)
    of each valid token, -1 for the others.

    Args: x `[N, S, D]`, centroids `[N, C, D]`, valid bool `[N, S]`; chunk: tokens per
      step of the scan over S (the distance table is `[N, chunk, C]`).
    Returns: int32 `[N, S]`.
    """
    c = centroids.astype(jnp.float32)
    half_norm = 0.5 * (c * c).sum(-1)                                          # [N, C]

    def nearest(xs):                                                           # xs [N, D]
        # argmin ||x - c||^2 = argmax (x . c - |c|^2 / 2)
        return jnp.argmax(jnp.einsum("nd,ncd->nc", xs.astype(jnp.float32), c) - half_norm, -1)

    assign = jax.lax.map(nearest, jnp.moveaxis(x, 1, 0), batch_size=min(chunk, x.shape[1]))   # [S, N]
    return jnp.where(valid, jnp.moveaxis(assign, 0, 1), -1).astype(jnp.int32)


def _segment_sum(x, assign, num_clusters: int):
    """Sum of `x [N, S, F]` over the tokens of each cluster -> `[N, C, F]` (assign -1: none)."""
    rows = jnp.broadcast_to(jnp.arange(x.shape[0])[:, None], assign.shape)
    seg = jnp.where(assign >= 0, assign, num_clusters)                          # -> dropped
    return jnp.zeros((x.shape[0], num_clusters, x.shape[-1]), jnp.float32).at[rows, seg].add(
        x.astype(jnp.float32), mode="drop")


def kmeans(x, valid, num_clusters: int, iters: int = 4, *, chunk: int = 2048):
    """Lloyd's k-means of the valid rows of each set, from `initial_centroids`.

    Each iteration assigns every valid token to its nearest centroid and moves each
    centroid to the mean of its members (a centroid without members stays).

    Args:
      x: `[N, S, D]` (N independent sets: batch rows x kv heads); valid: bool `[N, S]`.
      num_clusters: C >= 1; iters: Lloyd iterations >= 0.
    Returns:
      centroids `[N, C, D]` float32 after `iters` updates, and `assign [N, S]` int32:
      the nearest of those centroids for each valid token, -1 for the others.
    """
    _check("kmeans", x.ndim == 3 and valid.shape == x.shape[:2], f"x must be [N, S, D] with valid [N, S], got "
           f"{x.shape}, {valid.shape}")
    _check("kmeans", isinstance(num_clusters, int) and num_clusters >= 1,
           f"num_clusters must be an int >= 1, got {num_clusters!r}")
    _check("kmeans", isinstance(iters, int) and iters >= 0, f"iters must be an int >= 0, got {iters!r}")
    ones = jnp.ones(x.shape[:2] + (1,), jnp.float32)

    def step(_, c):
        assign = nearest_centroid(x, c, valid, chunk=chunk)
        sums = _segment_sum(x, assign, num_clusters)
        sizes = _segment_sum(ones, assign, num_clusters)
        return jnp.where(sizes > 0, sums / jnp.maximum(sizes, 1.0), c)

    c = jax.lax.fori_loop(0, iters, step, initial_centroids(x, valid, num_clusters))
    return c, nearest_centroid(x, c, valid, chunk=chunk)


def cluster_summaries(k, v, assign, num_clusters: int):
    """Per cluster of each (row, kv head): mean member key, size, mean member value.

    Args: k `[B, S, Hkv, D]`, v `[B, S, Hkv, Dv]`, assign int32 `[B, S, Hkv]` (-1: in no
      cluster), num_clusters C.
    Returns: centroids `[B, C, Hkv, D]`, log_sizes `[B, Hkv, C]` float32 (-inf: empty
      cluster), mean values `[B, C, Hkv, Dv]`, all float32 (empty clusters: zero vectors).
    """
    b, s, hkv, d = k.shape
    flat = lambda x: jnp.moveaxis(x, 2, 1).reshape(b * hkv, s, x.shape[-1])
    a = jnp.moveaxis(assign, 2, 1).reshape(b * hkv, s)
    sizes = _segment_sum(jnp.ones((b * hkv, s, 1)), a, num_clusters)[..., 0]   # [N, C]
    denom = jnp.maximum(sizes, 1.0)[..., None]
    unflat = lambda x: jnp.moveaxis(x.reshape(b, hkv, num_clusters, x.shape[-1]), 1, 2)
    keys = unflat(_segment_sum(flat(k), a, num_clusters) / denom)
    values = unflat(_segment_sum(flat(v), a, num_clusters) / denom)
    log_sizes = jnp.where(sizes > 0, jnp.log(jnp.maximum(sizes, 1.0)), -jnp.inf).reshape(b, hkv, num_clusters)
    return keys, log_sizes, values


def cluster_prompt(k, v, positions, *, num_clusters: int, iters: int = 4):
    """k-means of each (row, kv head)'s prompt keys and the clusters' summaries.

    Args: k `[B, S, Hkv, D]`, v `[B, S, Hkv, Dv]`, positions `[B, S]` (< 0: padding, in
      no cluster); num_clusters C; iters Lloyd iterations.
    Returns: `(assign [B, S, Hkv] int32 (-1 on padding), centroids [B, C, Hkv, D],
      log_sizes [B, Hkv, C], mean_values [B, C, Hkv, Dv])` (float32 but `assign`).
    """
    _check("cluster_prompt", k.ndim == 4 and v.shape[:3] == k.shape[:3] and positions.shape == k.shape[:2],
           f"k [B, S, Hkv, D], v [B, S, Hkv, Dv], positions [B, S] expected, got {k.shape}, {v.shape}, "
           f"{positions.shape}")
    b, s, hkv, d = k.shape
    x = jnp.moveaxis(k, 2, 1).reshape(b * hkv, s, d)
    valid = jnp.broadcast_to((positions >= 0)[:, None], (b, hkv, s)).reshape(b * hkv, s)
    _, a = kmeans(x, valid, num_clusters, iters)
    assign = jnp.moveaxis(a.reshape(b, hkv, s), 1, 2)
    return (assign,) + cluster_summaries(k, v, assign, num_clusters)


def cluster_mass(q, centroids, log_sizes, *, q_valid=None, scale=None, softcap=None):
    """Estimated attention mass of each cluster for each query head and query: softmax
    over clusters of `softcap(q . c_i * scale) + log s_i`.

    Args: q `[B, Tq, H, D]`, centroids `[B, C, Hkv, D]`, log_sizes `[B, Hkv, C]` (-inf:
      empty), q_valid bool `[B, Tq]` (default all), scale (default 1/sqrt(D)), softcap.
    Returns: `[B, Hkv, G * Tq, C]` float32 (G = H / Hkv query heads of each kv head, g
      major), each row summing to 1 (all 0 for an invalid query or when every cluster is
      empty).
    """
    b, tq, h, d = q.shape
    hkv = centroids.shape[2]
    scale = d ** -0.5 if scale is None else scale
    s = jnp.einsum("bqhgd,bchd->bhgqc", q.reshape(b, tq, hkv, h // hkv, d).astype(jnp.float32),
                   centroids.astype(jnp.float32)) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    s = s + log_sizes[:, :, None, None, :]
    top = jnp.max(s, -1, keepdims=True)
    w = jnp.where(jnp.isfinite(s), jnp.exp(s - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    p = w / jnp.maximum(w.sum(-1, keepdims=True), 1e-30)                      # [B, Hkv, G, Tq, C]
    if q_valid is not None:
        p = jnp.where(q_valid[:, None, None, :, None], p, 0.0)
    return p.reshape(b, hkv, (h // hkv) * tq, -1)


def select_clusters(mass, top_p: float):
    """Per row r of `mass [B, Hkv, R, C]` (`cluster_mass`), the fewest clusters whose
    estimated mass reaches `top_p` (`sparse_jax.ops.quest.select_top_p` on log-mass: at
    least one cluster of positive mass; `top_p >= 1`: every cluster of positive mass);
    their union over r -> bool `[B, Hkv, C]`."""
    _check("select_clusters", 0.0 < top_p <= 1.0, f"top_p must lie in (0, 1], got {top_p!r}")
    _check("select_clusters", mass.ndim == 4, f"mass must be [B, Hkv, R, C], got {mass.shape}")
    if top_p >= 1.0:
        return (mass > 0).any(axis=2)
    b, hkv, r, c = mass.shape
    idx, cnt = select_top_p(jnp.log(mass.reshape(b, hkv * r, c)), top_p,     # log 0 = -inf: never taken
                            jnp.ones((b, c), bool))
    chosen = jnp.arange(idx.shape[-1]) < cnt[..., None]                     # [B, Hkv * R, C]
    picked = jax.nn.one_hot(jnp.where(chosen, idx, c), c + 1, dtype=bool).any(axis=2)[..., :c]
    return picked.reshape(b, hkv, r, c).any(axis=2)


def choose_clusters(mass, top_p: float, keep_p: float = 1.0):
    """Double-P's two thresholds on `mass [B, Hkv, R, C]` -> `(selected, kept)`, bool
    `[B, Hkv, C]` each: `selected`, the clusters read token by token (`select_clusters`
    at `top_p`); `kept`, those attended at all (at `keep_p >= top_p`, union `selected`;
    None when `keep_p = 1`: every cluster)."""
    _check("choose_clusters", 0.0 < keep_p <= 1.0 and keep_p >= top_p,
           f"keep_p must lie in [top_p, 1] = [{top_p}, 1], got {keep_p!r}")
    selected = select_clusters(mass, top_p)
    return selected, (None if keep_p >= 1.0 else select_clusters(mass, keep_p) | selected)


def exact_tokens(assign, selected):
    """bool `[B, Hkv, S]`: the slots read one by one: members of a `selected [B, Hkv, C]`
    cluster, and every slot in no cluster (`assign [B, S, Hkv]` = -1: decoded tokens)."""
    a = jnp.moveaxis(assign, 2, 1)                                              # [B, Hkv, S]
    member = jnp.take_along_axis(selected, jnp.maximum(a, 0), axis=-1)
    return (a < 0) | member


def doublep_slots(k, v, kv_positions, assign, centroids, log_sizes, mean_values, selected, centroid_positions,
                  kept=None):
    """Tokens and cluster slots side by side, with the log-weights that make the
    attention over them Double-P's.

    Args: k `[B, S, Hkv, D]`, v `[B, S, Hkv, Dv]`, kv_positions `[B, S]`, assign
      `[B, S, Hkv]` (-1: exact always), centroids `[B, C, Hkv, D]`, log_sizes `[B, Hkv, C]`,
      mean_values `[B, C, Hkv, Dv]`, selected bool `[B, Hkv, C]` (exact clusters),
      centroid_positions `[B, C]` (a position every decode query may see), kept bool
      `[B, Hkv, C]` or None (all): the clusters attended at all (exactly or not).
    Returns: keys `[B, S + C, Hkv, D]`, values `[B, S + C, Hkv, Dv]` (k's dtype),
      positions `[B, S + C]`, log_weights `[B, Hkv, S + C]` float32: 0 on the exact
      tokens, `log s_i` on the centroids of the kept approximated clusters, -inf
      elsewhere.
    """
    exact = exact_tokens(assign, selected)
    lw_tokens = jnp.where(exact, 0.0, -jnp.inf)
    lw_clusters = jnp.where(selected | (False if kept is None else ~kept), -jnp.inf, log_sizes)
    keys = jnp.concatenate([k, centroids.astype(k.dtype)], axis=1)
    values = jnp.concatenate([v, mean_values.astype(v.dtype)], axis=1)
    positions = jnp.concatenate([kv_positions, centroid_positions.astype(kv_positions.dtype)], axis=1)
    return keys, values, positions, jnp.concatenate([lw_tokens, lw_clusters], axis=-1).astype(jnp.float32)


def doublep_attention(q, k, v, kv_positions, q_positions, assign, centroids, log_sizes, mean_values,
                      centroid_positions, *, top_p: float, keep_p: float = 1.0, sink_logits=None, softcap=None):
    """Reference Double-P decode: estimate, select, attend (`weighted_attention` over
    `doublep_slots`).

    Args: q `[B, Tq, H, D]`, q_positions `[B, Tq]`, the rest as `doublep_slots`; top_p in
      (0, 1], keep_p in [top_p, 1] (`choose_clusters`); sink_logits `[H]` or None;
      softcap or None.
    Returns: out `[B, Tq, H, Dv]` (q's dtype), exact bool `[B, Hkv, S]` (the tokens read).
    """
    scale = q.shape[-1] ** -0.5
    mass = cluster_mass(q, centroids, log_sizes, q_valid=q_positions >= 0, scale=scale, softcap=softcap)
    selected, kept = choose_clusters(mass, top_p, keep_p)
    keys, values, pos, lw = doublep_slots(k, v, kv_positions, assign, centroids, log_sizes, mean_values,
                                          selected, centroid_positions, kept)
    out = weighted_attention(q, keys, values, pos, q_positions, lw, scale=scale, sink_logits=sink_logits,
                             softcap=softcap)
    return out, exact_tokens(assign, selected) & (kv_positions >= 0)[:, None]
