"""`compressed`: NSA's compressed branch (arXiv 2502.11089) with a fused score output.

`compressed_attention(q, k, v, ...)` is causal attention of `q [B, T, H, D]` over the
compressed keys `k, v [B, N, Hkv, D]` (key n carries the position of its block's last
token, so "the whole block is at or before t" is `kv_pos <= q_pos`), and returns beside
the output the attention probabilities summed over the `G = H / Hkv` heads of each GQA
group, `p_group [B, Hkv, T, N]` float32, the input of NSA's selection scores
(`sparse_jax.ops.nsa.selection_scores`). The per-head `[B, H, T, N]` probability matrix
is never written: the kernel path recomputes `exp(q k^T * scale - lse)` tile by tile
from the forward's log-sum-exp and sums the group in registers (G times less HBM).

The output is differentiable (the `flash` kernel's backward); `p_group` carries no
gradient (the selection it feeds is discrete).

`impl`: "auto" (Triton on GPU, Mosaic TPU on TPU, the XLA reference on CPU) | "xla" |
"triton" | "mosaic_tpu" (`tpu.py`; checked in interpret mode only); `interpret=True` runs
the kernels in interpret mode.
"""

from __future__ import annotations

from pallas_kernels import common
from pallas_kernels.compressed import reference, tpu, triton
from pallas_kernels.compressed.reference import compressed_reference
from pallas_kernels.compressed.tpu import TpuConfig, compressed_tpu
from pallas_kernels.compressed.triton import TritonConfig, compressed_triton

BACKENDS = {"triton": triton, "mosaic_tpu": tpu, "xla": reference}   # impl="auto" order
IMPLEMENTATIONS = {"xla": compressed_reference, "triton": compressed_triton,
                   "mosaic_tpu": compressed_tpu}


def compressed_attention(q, k, v, *, q_positions=None, kv_positions=None, scale=None, impl="auto",
                         interpret=False, config=None, explain=False):
    """Attention over compressed keys and the group-summed probabilities.

    Args:
      q: `[B, T, H, D]`; k: `[B, N, Hkv, D]`; v: `[B, N, Hkv, Dv]`; `Hkv` divides `H`.
      q_positions: int `[B, T]`, default `arange(T)`; negative = padding query.
      kv_positions: int `[B, N]`, each compressed key's last-token position, default
        `arange(N)`; negative = empty slot.
      scale: default `1/sqrt(D)` (> 0).
      impl: "auto" | "xla" | "triton" | "mosaic_tpu" (`common.resolve`); interpret: run a
        Pallas kernel in interpret mode (CPU tests).
      config: the chosen kernel's tiles (`TritonConfig`, `TpuConfig`, importable from here); None: its defaults.
      explain: print which backend runs and why the others were skipped.
    Returns:
      `(out [B, T, H, Dv] in q's dtype, p_group [B, Hkv, T, N] float32)`; rows that see
      nothing give zeros in both.
    """
    args = common.check_attention_args(
        q, k, v, mask_fn=None, q_positions=q_positions, kv_positions=kv_positions,
        q_segment_ids=None, kv_segment_ids=None, sink_logits=None, softcap=None, scale=scale)
    call = dict(q=q, k=k, v=v, **args)
    fn = common.resolve("compressed", impl, BACKENDS, IMPLEMENTATIONS, call, interpret=interpret,
                        config=config, explain=explain)
    return fn(q, k, v, q_positions=args["q_positions"], kv_positions=args["kv_positions"],
              scale=args["scale"])
