"""HySparse block-max attention scores out of the `flash` forward kernels (HySparse, Alg. 1).

`S[b, h, t, j] = max_{i in KV block j} softmax(q_t k_i)`: while the forward kernel streams
KV tiles it keeps, per query row and score block, the largest logit seen in the block
(base-2 units, masked keys at `MASK_VALUE`); at the end the maxima are rescaled by the final
row statistics, `exp(block_max - m) / l = exp2(block_max2 - lse2)`, where `l` includes the
learned sink term (the kernel starts `m, l` at the sink). Blocks with no visible key, padded
query rows and rows that see nothing give 0. Semantics: `reference.block_max_scores`.

This is a separate specialisation of each backend's forward (the plain forward traces
exactly as before): the backend supplies `forward_scores(st, spec, q, k, v, sinks, q_pos,
kv_pos, q_seg, kv_seg) -> (out, lse, scores [B, H, Tq, nK] float32)`. The scores are a
non-differentiable side output (`stop_gradient`); the backward is the plain one
(`st.backward`), so dq/dk/dv/d sinks are those of the attention output (and lse).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.common import AttentionOutput
from pallas_kernels.flash import autodiff
from pallas_kernels.tiles_common import LOG2E


@dataclasses.dataclass(frozen=True)
class ScoreSpec:
    """Static description of the score output (hashable; a custom_vjp nondiff argument)."""

    size: int                 # keys per score block
    reduce_gqa: bool          # max over each GQA group -> [B, Hkv, Tq, nK]
    forward: Callable         # the backend's forward-with-scores


def num_blocks(size: int, tk: int) -> int:
    """Number of score blocks, `ceil(Tk / size)`."""
    return -(-tk // size)


def lowbit(x: int) -> int:
    """Largest power of two dividing `x` (> 0)."""
    return x & -x


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _with_scores(st, spec: ScoreSpec, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg):
    return spec.forward(st, spec, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg)


def _with_scores_fwd(st, spec, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg):
    out, lse, scores = spec.forward(st, spec, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg)
    return (out, lse, scores), (q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg, out, lse)


def _with_scores_bwd(st, spec, res, cts):
    """The plain flash backward; the scores' cotangent is ignored (they are wrapped in
    stop_gradient, so it is zero)."""
    del spec
    q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg, out, lse = res
    grads = autodiff.backward(st, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg, (), out, lse,
                              cts[0], cts[1])
    return grads + (None, None, None, None)


_with_scores.defvjp(_with_scores_fwd, _with_scores_bwd)


def attention_with_scores(st, spec: ScoreSpec, q, k, v, *, sink_logits, q_positions, kv_positions,
                          q_segment_ids, kv_segment_ids, return_lse):
    """Run a backend's score forward through the custom_vjp; format like `flash_reference`."""
    out, lse, scores = _with_scores(st, spec, q, k, v, sink_logits, q_positions.astype(jnp.int32),
                                    kv_positions.astype(jnp.int32), q_segment_ids, kv_segment_ids)
    scores = jax.lax.stop_gradient(scores)
    if spec.reduce_gqa:
        b, h, tq, nk = scores.shape
        hkv = k.shape[2]
        scores = scores.reshape(b, hkv, h // hkv, tq, nk).max(2)
    return AttentionOutput(out, lse if return_lse else None, scores)


def rescale(raw2, lse, visited):
    """`exp2(raw2 - lse * log2 e)` where `visited` and the row saw something, else 0.

    raw2 `[B, H, Tq, nK]` block-max logits in base 2; lse `[B, H, Tq]` (natural log, -inf
    on empty rows); visited broadcastable bool (False where the kernel never wrote).
    """
    lse2 = (lse * LOG2E)[..., None]
    keep = visited & jnp.isfinite(lse2)
    return jnp.where(keep, jnp.exp2(jnp.where(keep, raw2 - lse2, 0.0)), 0.0)
