"""`block_sparse`: attention where each (batch, kv-head, query block) visits only listed KV blocks.

The metadata (`BlockSparseMetadata`, built by `sparse_jax.patterns`) lists the KV blocks
per query block and flags full blocks (no element mask) apart from partial ones (the
element predicate `mask_fn` is evaluated). Used by static patterns (Longformer, BigBird,
Sparse Transformer), MoBA, NSA shared selection, HySparse sparse layers, MInference.

`impl`: "auto" | "xla" | "triton" | "mosaic_tpu"; `interpret=True` for CPU kernel tests.
"""

from __future__ import annotations

from pallas_kernels import common
from pallas_kernels.block_sparse import reference, tpu, triton
from pallas_kernels.block_sparse.metadata import BlockSparseMetadata
from pallas_kernels.block_sparse.reference import block_sparse_reference
from pallas_kernels.block_sparse.tpu import block_sparse_tpu
from pallas_kernels.block_sparse.triton import TritonConfig, block_sparse_triton

BACKENDS = {"triton": triton, "mosaic_tpu": tpu, "xla": reference}   # impl="auto" order
IMPLEMENTATIONS = {"xla": block_sparse_reference, "triton": block_sparse_triton,
                   "mosaic_tpu": block_sparse_tpu}


def block_sparse_attention(q, k, v, metadata: BlockSparseMetadata, *, mask_fn=None,
                           q_positions=None, kv_positions=None, q_segment_ids=None,
                           kv_segment_ids=None, sink_logits=None, softcap=None, scale=None,
                           return_lse=False, impl="auto", interpret=False, config=None,
                           explain=False):
    """Block-sparse attention.

    Args:
      q: `[B, Tq, H, D]`; k: `[B, Tk, Hkv, D]`; v: `[B, Tk, Hkv, Dv]`.
      metadata: `BlockSparseMetadata` with `[B or 1, Hkv or 1, ceil(Tq/block_q), max_blocks]`.
      mask_fn: element predicate for partial blocks (None: partial blocks fully visible,
        except padding and, with segment ids, other segments; segment ids always apply).
      Other arguments as `flash_attention`.
      impl: "auto" | "xla" | "triton" | "mosaic_tpu" (`common.resolve`); interpret: run a
        Pallas kernel in interpret mode (CPU tests).
      config: the chosen kernel's tiles (`TritonConfig`, importable from here; the TPU kernel takes
        none); None: its defaults.
      explain: print which backend runs and why the others were skipped.
    Returns:
      `out [B, Tq, H, Dv]`, or `AttentionOutput(out, lse)` with `return_lse`.
    """
    args = common.check_attention_args(
        q, k, v, mask_fn=mask_fn, q_positions=q_positions, kv_positions=kv_positions,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, sink_logits=sink_logits,
        softcap=softcap, scale=scale)
    if not isinstance(metadata, BlockSparseMetadata):
        raise ValueError(f"metadata must be a BlockSparseMetadata, got {type(metadata).__name__}")
    metadata.validate(q.shape[0], k.shape[2], q.shape[1], k.shape[1])
    call = dict(q=q, k=k, v=v, metadata=metadata, **args)
    fn = common.resolve("block_sparse", impl, BACKENDS, IMPLEMENTATIONS, call, interpret=interpret,
                        config=config, explain=explain)
    return fn(q, k, v, metadata, **args, return_lse=return_lse)
