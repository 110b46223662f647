"""InfLLM's block memory (Xiao et al., arXiv 2402.04617): representative keys, block scores,
top-b block retrieval. Plain jnp, float32 math; the cache that uses them is
`sparse_jax.cache.offload.OffloadKVCache`.

InfLLM keeps the first tokens (sinks) and a local window of the most recent `window`
tokens; older tokens are cut into memory blocks of `block_size`. Each block is summarised
by representative keys; each step the query is scored against every block's summary and
the top blocks are attended with the sinks and the window.

Which tokens represent a block (what InfLLM's released code does, which this follows): the
*attention* each key receives from the queries whose local window holds it. Here
`local_window_scores` gives, per key at position m and query head h,

    r_h(m) = sum_{t = m}^{m + window - 1}  softmax_{s in window(t)}(q_t,h . k_s / sqrt(D))[m]

over the queries t of the window after m (itself included), the softmax taken over the
non-sink keys of t's window `t - window < s <= t`. The code's softmax also counts the sinks
and retrieved blocks in its denominator; the window-only denominator here makes a key's
score independent of which blocks were retrieved and of how the text was split into calls,
so prefill and decode give a key the same score. (The paper's equation sums the raw dot
products `q_{m+j} . k_m` instead; a choice, documented.)

Per query head h (kv head `h // G`), the `num_repr` keys of highest `r_h` are averaged
into one vector (the code's `repr_topk` keys, mean-pooled): `rep_k [..., H, D]`. A block's
score against the queries of a call is `sum_h mean_t(q_t,h) . rep_k_h` (the code's inner
product of the head-concatenated query and representative key), one score per block and
batch row: every head of a row reads the same blocks (InfLLM's default; its `perhead` option
is not built).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sparse_jax.ops import selection


def _check_qk(q, k):
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q must be [B, T, H, D] and k [B, S, Hkv, D], got {q.shape}, {k.shape}")
    b, _, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or k.shape[2] < 1 or h % k.shape[2]:
        raise ValueError(f"q {q.shape} does not fit k {k.shape} (batch, head_dim, num_heads a multiple "
                         f"of num_kv_heads)")


def local_window_scores(q, k, q_positions, kv_positions, *, window: int, num_sinks: int = 0,
                        chunk: int | None = None):
    """Attention each key receives from the queries whose local window holds it.

    Args:
      q: `[B, T, H, D]` rotated queries; k: `[B, S, Hkv, D]` keys; q_positions: int
        `[B, T]`, kv_positions: int `[B, S]` (negative = padding / empty);
      window: keys per query including itself (`t - window < s <= t`); num_sinks: keys at
        positions `< num_sinks` are left out (they score 0 and are not in the softmax);
      chunk: queries per pass (bounds the `[B, H, chunk, S]` logits; None: all at once).
        Every key of a query's window must be among `k`, else its softmax is over fewer keys.
    Returns:
      float32 `[B, S, H]`: `r_h(s)` of the module docstring, summed over the given queries.
    """
    _check_qk(q, k)
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    if jnp.shape(q_positions) != (b, t) or jnp.shape(kv_positions) != (b, s):
        raise ValueError(f"q_positions must be [B, T] = {[b, t]} and kv_positions [B, S] = {[b, s]}, got "
                         f"{list(jnp.shape(q_positions))}, {list(jnp.shape(kv_positions))}")
    chunk = t if chunk is None else max(1, min(int(chunk), t))
    n = -(-t // chunk)
    pad = n * chunk - t
    qc = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, chunk, hkv, h // hkv, d)
    pc = jnp.pad(q_positions, ((0, 0), (0, pad)), constant_values=-1).reshape(b, n, chunk)
    kp = kv_positions[:, None, :]
    key_ok = (kv_positions >= num_sinks)[:, None, :]
    kf = k.astype(jnp.float32)

    def one(acc, xs):
        qi, pi = xs                                                          # [B, C, Hkv, G, D], [B, C]
        qp = pi[:, :, None]
        vis = key_ok & (kp <= qp) & (kp > qp - window) & (qp >= 0)            # [B, C, S]
        logits = jnp.einsum("bckgd,bskd->bkgcs", qi.astype(jnp.float32), kf) / math.sqrt(d)
        logits = jnp.where(vis[:, None, None], logits, -jnp.inf)
        top = jnp.max(logits, axis=-1, keepdims=True)
        e = jnp.where(vis[:, None, None], jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
        p = e / jnp.maximum(e.sum(-1, keepdims=True), 1e-30)
        return acc + p.sum(axis=3).reshape(b, h, s), None

    acc, _ = jax.lax.scan(one, jnp.zeros((b, h, s), jnp.float32),
                          (jnp.moveaxis(qc, 1, 0), jnp.moveaxis(pc, 1, 0)))
    return jnp.swapaxes(acc, 1, 2)


def representative_keys(k_blocks, scores, valid, *, num_repr: int, num_heads: int):
    """Each block's representative key per query head: the mean of the `num_repr` keys of
    highest score (InfLLM's `repr_topk` keys, mean-pooled).

    Args:
      k_blocks: `[B, N, block, Hkv, D]`; scores: float `[B, N, block, H]`
        (`local_window_scores` regrouped in blocks); valid: bool `[B, N, block]` (padding
        slots never represent); num_repr: int >= 1 (capped at `block`); num_heads: H.
    Returns:
      `[B, N, H, D]` in k's dtype (zeros for a block with no valid slot).
    """
    if k_blocks.ndim != 5:
        raise ValueError(f"k_blocks must be [B, N, block, Hkv, D], got {k_blocks.shape}")
    b, n, bs, hkv, d = k_blocks.shape
    if scores.shape != (b, n, bs, num_heads) or num_heads % hkv:
        raise ValueError(f"scores must be [B, N, block, H] = {[b, n, bs, num_heads]} with H a multiple of "
                         f"Hkv={hkv}, got {list(scores.shape)}")
    if not isinstance(num_repr, int) or num_repr < 1:
        raise ValueError(f"num_repr must be an int >= 1, got {num_repr!r}")
    r = min(num_repr, bs)
    s = jnp.where(valid[..., None], scores.astype(jnp.float32), -jnp.inf)          # [B, N, bs, H]
    vals, idx = jax.lax.top_k(jnp.moveaxis(s, 2, -1), r)                            # [B, N, H, r]
    kh = jnp.repeat(k_blocks, num_heads // hkv, axis=3)                             # [B, N, bs, H, D]
    picked = jnp.take_along_axis(jnp.moveaxis(kh, 2, 3), idx[..., None], axis=3)    # [B, N, H, r, D]
    ok = (vals > -jnp.inf)[..., None]
    total = jnp.where(ok, picked.astype(jnp.float32), 0.0).sum(3)
    return (total / jnp.maximum(ok.sum(3), 1)).astype(k_blocks.dtype)


def block_scores(q, rep_k, valid_blocks, q_positions=None):
    """Relevance of each memory block to a call's queries: `sum_h mean_t(q_t,h) . rep_k[j, h]`.

    Args:
      q: `[B, T, H, D]` rotated queries; rep_k: `[B, N, H, D]` (`representative_keys`);
      valid_blocks: bool `[B, N]`; q_positions: optional int `[B, T]` (padding queries,
        negative, are left out of the mean).
    Returns:
      float32 `[B, N]`, `-inf` for invalid blocks.
    """
    if q.ndim != 4 or rep_k.ndim != 4 or rep_k.shape[0] != q.shape[0] or rep_k.shape[2:] != q.shape[2:]:
        raise ValueError(f"q must be [B, T, H, D] and rep_k [B, N, H, D], got {q.shape}, {rep_k.shape}")
    if jnp.shape(valid_blocks) != rep_k.shape[:2]:
        raise ValueError(f"valid_blocks must be [B, N] = {list(rep_k.shape[:2])}, got {list(jnp.shape(valid_blocks))}")
    w = jnp.ones(q.shape[:2], jnp.float32) if q_positions is None else (q_positions >= 0).astype(jnp.float32)
    qm = jnp.einsum("bthd,bt->bhd", q.astype(jnp.float32), w) / jnp.maximum(w.sum(1), 1.0)[:, None, None]
    s = jnp.einsum("bhd,bnhd->bn", qm, rep_k.astype(jnp.float32))
    return jnp.where(valid_blocks, s, -jnp.inf)


def top_blocks(scores, valid_blocks, num_blocks: int):
    """The `num_blocks` best valid blocks of each row (`selection.select_top_k`: by
    descending score, ties to the lower index).

    Args:
      scores: float `[B, N]`; valid_blocks: bool `[B, N]`; num_blocks: int >= 1.
    Returns:
      int32 `[B, min(num_blocks, N)]`, -1 after the last chosen block.
    """
    if jnp.ndim(scores) != 2 or jnp.shape(valid_blocks) != jnp.shape(scores):
        raise ValueError(f"scores and valid_blocks must both be [B, N], got {jnp.shape(scores)}, "
                         f"{jnp.shape(valid_blocks)}")
    idx = selection.select_top_k(scores[:, None, None], valid_blocks[:, None, None], num_blocks)
    return idx[:, 0, 0]
