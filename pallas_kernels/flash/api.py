"""`flash`: dense attention, forward and backward, with the mask evaluated element-wise.

`flash_attention(q, k, v, mask_fn=..., ...)` computes softmax attention of `q [B, Tq, H, D]`
over `k [B, Tk, Hkv, D]`, `v [B, Tk, Hkv, Dv]` (GQA without repeating KV) where
`mask_fn(q_pos, kv_pos, q_seg, kv_seg) -> bool` says which keys each query sees
(causal, sliding window, sinks, ... from `sparse_jax.patterns`, or any hashable callable of
integer ops). Learned sink logits (gpt-oss), logit soft-cap, segment ids, the log-sum-exp
and HySparse's block-max scores (arXiv: HySparse, Alg. 1) are options.

`impl`: "auto" (on a Hopper GPU the Mosaic GPU kernel where it applies, else Triton; on
TPU Mosaic; the XLA reference on CPU), "xla", "triton", "mosaic_tpu", "mosaic_gpu"
(Hopper: full, causal or causal-window attention, queries at `arange` and keys at
`stride * arange + offset` (NSA's compressed keys), concrete positions; see
`mosaic_gpu.py`), resolved by
`common.resolve` from what each backend module declares (`CONFIG`, `supports`).
`interpret=True` runs a Pallas kernel in interpret mode on CPU (Triton, Mosaic TPU);
`interpret=jax.experimental.pallas.mosaic_gpu.InterpretGPUParams()` runs the Mosaic GPU
kernels in JAX's GPU interpret mode (`impl="auto"` then takes Mosaic GPU where it covers the
call, else the XLA reference).
"""

from __future__ import annotations

from pallas_kernels import common
from pallas_kernels.flash import mosaic_gpu, reference, tpu, triton
from pallas_kernels.flash.mosaic_gpu import MosaicGPUConfig, flash_mosaic_gpu
from pallas_kernels.flash.mosaic_gpu_vjp import MosaicGPUBackwardConfig
from pallas_kernels.flash.reference import flash_reference
from pallas_kernels.flash.tpu import TpuConfig, flash_tpu
from pallas_kernels.flash.triton import TritonConfig, flash_triton

# Order of preference for impl="auto": Mosaic GPU (Hopper, where it covers the call),
# Triton (GPU), Mosaic TPU (TPU), the XLA reference.
BACKENDS = {"mosaic_gpu": mosaic_gpu, "triton": triton, "mosaic_tpu": tpu, "xla": reference}
IMPLEMENTATIONS = {"xla": flash_reference, "triton": flash_triton, "mosaic_tpu": flash_tpu,
                   "mosaic_gpu": flash_mosaic_gpu}


def flash_attention(q, k, v, *, mask_fn=None, q_positions=None, kv_positions=None,
                    q_segment_ids=None, kv_segment_ids=None, sink_logits=None, softcap=None,
                    scale=None, return_lse=False, block_score_size=None,
                    block_score_reduce_gqa=False, impl="auto", interpret=False, config=None,
                    explain=False):
    """Dense attention with an element predicate.

    Args:
      q: `[B, Tq, H, D]`; k: `[B, Tk, Hkv, D]`; v: `[B, Tk, Hkv, Dv]`, one float dtype.
      mask_fn: hashable predicate on `(q_pos, kv_pos, q_seg, kv_seg)` broadcast arrays, or
        None (every key visible).
      q_positions, kv_positions: int `[B, Tq]`, `[B, Tk]` (default `arange`); negative
        marks padding (never visible; a padded query returns zeros).
      q_segment_ids, kv_segment_ids: optional int `[B, Tq]`, `[B, Tk]`; when given, keys
        of another segment are never visible, whatever `mask_fn`.
      sink_logits: optional float `[H]` per-head sink logit (denominator only).
      softcap: optional logit soft-cap (> 0).
      scale: logit scale (> 0), default `1/sqrt(D)`.
      return_lse: also return the log-sum-exp `[B, H, Tq]` (float32).
      block_score_size: if set, also return `S [B, H, Tq, ceil(Tk/size)]`, the max
        attention probability per KV block (HySparse Alg. 1);
        `block_score_reduce_gqa=True` takes the max over each GQA group: `[B, Hkv, Tq, nK]`.
      impl: "auto" | "xla" | "triton" | "mosaic_tpu" | "mosaic_gpu" (`common.resolve`).
      interpret: run a Pallas kernel in interpret mode (CPU tests): True (Triton, Mosaic
        TPU) or a `plgpu.InterpretGPUParams` (Mosaic GPU).
      config: the chosen kernel's tiles (`TritonConfig`, `TpuConfig`, `MosaicGPUConfig`,
        importable from here); None: its defaults.
      explain: print which backend runs and why the others were skipped.
    Returns:
      `out [B, Tq, H, Dv]` in q's dtype, or `AttentionOutput(out, lse, block_scores)`
      when lse or block scores are requested. Rows that see nothing are zeros.
    """
    args = common.check_attention_args(
        q, k, v, mask_fn=mask_fn, q_positions=q_positions, kv_positions=kv_positions,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, sink_logits=sink_logits,
        softcap=softcap, scale=scale)
    if block_score_size is not None and (not isinstance(block_score_size, int) or block_score_size < 1):
        raise ValueError(f"block_score_size must be an int >= 1 or None, got {block_score_size!r}")
    call = dict(q=q, k=k, v=v, **args, block_score_size=block_score_size)
    fn = common.resolve("flash", impl, BACKENDS, IMPLEMENTATIONS, call, interpret=interpret,
                        config=config, explain=explain)
    return fn(q, k, v, **args, return_lse=return_lse, block_score_size=block_score_size,
              block_score_reduce_gqa=block_score_reduce_gqa)
