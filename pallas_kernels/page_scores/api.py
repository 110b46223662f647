"""`page_scores`: Quest's upper bound of the logits of each KV page (arXiv 2406.10774).

`page_scores(q, kmin, kmax, valid, bound_scale)` -> `[B, Hkv, P]` float32: per page and kv
head the max over the group's query rows (`Tq * H / Hkv`) of `scale * sum_d max(q_d kmax_d,
q_d kmin_d)`, times the page's `bound_scale` where the bounds are float8 codes; pages not
`valid` score -inf. The bounds are head-major, `[B, Hkv, P, D]`, one contiguous `[P, D]`
matrix per (batch, kv head), read once. `sparse_jax.ops.quest.quest_page_scores` checks the
arguments and calls it.

`impl`: "auto" (Triton on a GPU, the XLA reference elsewhere), "xla", "triton", resolved by
`common.resolve`. The Triton kernel compiles and matches on an H200 but is no faster than
XLA's dots there, so `quest_page_scores` asks for "xla" unless told otherwise.
"""

from __future__ import annotations

import math

from pallas_kernels import common
from pallas_kernels.page_scores import reference, triton
from pallas_kernels.page_scores.reference import page_scores_reference
from pallas_kernels.page_scores.triton import PageScoresConfig, page_scores_triton

BACKENDS = {"triton": triton, "xla": reference}                 # impl="auto" order
IMPLEMENTATIONS = {"xla": page_scores_reference, "triton": page_scores_triton}

__all__ = ["BACKENDS", "IMPLEMENTATIONS", "PageScoresConfig", "page_scores"]


def page_scores(q, kmin, kmax, valid, bound_scale=None, *, scale=None, impl="auto", interpret=False, config=None,
                explain=False):
    """Quest page scores.

    Args:
      q: `[B, Tq, H, D]`; kmin, kmax: `[B, Hkv, P, D]` (bounds, or float8 codes);
      valid: bool `[B, P]`, the pages that hold keys (the others score -inf, their bounds
        unread for it); bound_scale: `[B, Hkv, P, 1]` (the codes' scale) or None (plain bounds);
      scale: logit scale, default `1/sqrt(D)`; impl, interpret, config (`PageScoresConfig`
        for "triton"), explain: as every op (`common.resolve`).
    Returns:
      `[B, Hkv, P]` float32.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    call = dict(q=q, kmin=kmin, kmax=kmax, valid=valid, bound_scale=bound_scale)
    fn = common.resolve("page_scores", impl, BACKENDS, IMPLEMENTATIONS, call, interpret=interpret,
                        config=config, explain=explain)
    return fn(q, kmin, kmax, valid, bound_scale, scale=scale)
