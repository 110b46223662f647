"""`token_sparse`: each query token attends its own list of KV tokens or KV blocks.

`token_sparse_attention(q, k, v, indices, block_size=...)`: query token t of kv head h
(and so all `G = H / Hkv` query heads of that group) attends the union of the KV blocks
listed in `indices[b, t, h, :]` (block i = key slots `[i * block_size, (i + 1) *
block_size)`; `block_size=1`: the entries are token indices), further masked by padding
(negative positions) and, with `causal`, by `kv_pos <= q_pos`. Users:

* DSA (DeepSeek-V3.2, lightning-indexer top-k): top-2048 tokens per query, MQA (Hkv=1)
  over the MLA latent (D = 512 + 64, Dv = 512);
* NSA (arXiv 2502.11089) selection branch, exact per token: top-16 blocks of 64 tokens
  shared by each GQA group ("group-centric": one load of a block serves the group);
* HySparse's per-token selection.

`impl`: "auto" | "xla" | "triton" | "mosaic_tpu" | "mosaic_gpu" (Hopper, the forward only:
bf16 / fp16, D in {64, 128}, G in 4..64, blocks of 64 / 128; its gradients are the Triton
backward's; not yet in "auto", not timed on a GPU; see `mosaic_gpu.py`); `interpret=True`
runs a Pallas kernel in interpret mode on CPU (Triton, Mosaic TPU),
`interpret=plgpu.InterpretGPUParams()` the Mosaic GPU kernel in GPU interpret mode. Kernels need the listed entries of a row to be distinct (the
reference takes the union; a kernel would count a repeated block twice).

`token_sparse_backward`: the Triton backward alone, on the `(out, lse)` of a forward computed
by another op's kernel (`mla_decode.mla_sparse_attention`'s Mosaic GPU prefill) or by this
op's Triton forward (its Triton path, values folded into the keys' gradient);
`token_sparse_backend`: the backend `token_sparse_attention` would pick for a call.
"""

from __future__ import annotations

import jax
from jax.experimental import checkify
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.flash import autodiff
from pallas_kernels.token_sparse import mosaic_gpu, reference, tpu, triton
from pallas_kernels.token_sparse.mosaic_gpu import MosaicGPUConfig, token_sparse_mosaic_gpu
from pallas_kernels.token_sparse.reference import token_sparse_reference
from pallas_kernels.token_sparse.tpu import TpuConfig, token_sparse_tpu
from pallas_kernels.token_sparse.triton import TritonConfig, token_sparse_triton, value_pieces_lead

# impl="auto" order; Mosaic GPU last but XLA: only an explicit impl (or GPU interpret mode,
# which no other kernel takes) picks it until it has been timed against Triton on Hopper.
BACKENDS = {"triton": triton, "mosaic_tpu": tpu, "mosaic_gpu": mosaic_gpu, "xla": reference}
IMPLEMENTATIONS = {"xla": token_sparse_reference, "triton": token_sparse_triton,
                   "mosaic_tpu": token_sparse_tpu, "mosaic_gpu": token_sparse_mosaic_gpu}


def check_indices(indices, b: int, t: int, hkv: int, num_blocks: int):
    """`indices` must be int `[B, T, Hkv, K >= 1]` with entries < num_blocks: checked here
    when concrete (ValueError); under `jit` an out-of-range entry attends nothing (as -1
    padding) and a `checkify.debug_check` fails, reported to callers that wrap the function
    with `jax.experimental.checkify.checkify`."""
    shape = jnp.shape(indices)
    if len(shape) != 4 or shape[:3] != (b, t, hkv) or shape[3] < 1:
        raise ValueError(f"indices must be int [{b}, {t}, {hkv}, K >= 1] (batch, query, kv head, "
                         f"entries), got shape {list(shape)}")
    indices = jnp.asarray(indices)
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"indices must be integer, got {indices.dtype}")
    if isinstance(indices, jax.core.Tracer):
        checkify.debug_check(jnp.all(indices < num_blocks),
                             f"token_sparse: indices must be < {num_blocks} (the number of KV "
                             "blocks: ceil(S / block_size))")
    else:
        with jax.ensure_compile_time_eval():        # a device-side max: one scalar to host
            top = int(jnp.max(indices))
        if top >= num_blocks:
            raise ValueError(f"indices must be < {num_blocks} (the number of KV blocks: "
                             f"ceil(S / block_size)), got {top}")
    return indices.astype(jnp.int32)


def token_sparse_attention(q, k, v, indices, *, block_size=1, q_positions=None,
                           kv_positions=None, causal=True, sink_logits=None, softcap=None,
                           scale=None, return_lse=False, impl="auto", interpret=False, config=None,
                           explain=False):
    """Attention over per-query gathered KV tokens (or blocks).

    Args:
      q: `[B, T, H, D]`; k: `[B, S, Hkv, D]`; v: `[B, S, Hkv, Dv]`; `Hkv` divides `H`.
      indices: int `[B, T, Hkv, K]`, KV block numbers per query token and kv head, negative
        = padding; the entries of a row must be distinct.
      block_size: key slots per listed block (1: token indices).
      q_positions: int `[B, T]`, default `arange(T)`; negative = padding query (zeros out).
      kv_positions: int `[B, S]`, default `arange(S)`; negative = padding key (never seen).
      causal: also require `kv_pos <= q_pos`.
      sink_logits: optional float `[H]` learned sink logit (denominator only).
      softcap: optional logit soft-cap `c * tanh(s / c)`; scale: default `1/sqrt(D)`.
      return_lse: also return the log-sum-exp `[B, H, T]` (float32, -inf on empty rows).
      impl: "auto" | "xla" | "triton" | "mosaic_tpu" | "mosaic_gpu" (`common.resolve`);
        interpret: run a Pallas kernel in interpret mode (CPU tests): True (Triton, Mosaic
        TPU) or a `plgpu.InterpretGPUParams` (Mosaic GPU).
      config: the chosen kernel's tiles (`TritonConfig`, `TpuConfig`, `MosaicGPUConfig`,
        importable from here); None: its defaults.
      explain: print which backend runs and why the others were skipped.
    Returns:
      `out [B, T, H, Dv]` in q's dtype, or `AttentionOutput(out, lse)` with `return_lse`.
      A query that sees no key gives zeros (and finite gradients).
    """
    call = _checked_call(q, k, v, indices, block_size=block_size, q_positions=q_positions,
                         kv_positions=kv_positions, causal=causal, sink_logits=sink_logits,
                         softcap=softcap, scale=scale)
    fn = common.resolve("token_sparse", impl, BACKENDS, IMPLEMENTATIONS, call, interpret=interpret,
                        config=config, explain=explain)
    return fn(q, k, v, call["indices"], block_size=block_size, q_positions=call["q_positions"],
              kv_positions=call["kv_positions"], causal=causal, sink_logits=call["sink_logits"],
              softcap=softcap, scale=call["scale"], return_lse=return_lse)


def token_sparse_backend(q, k, v, indices, *, block_size=1, q_positions=None, kv_positions=None,
                         causal=True, sink_logits=None, softcap=None, scale=None, impl="auto",
                         interpret=False, config=None) -> str | None:
    """The backend name ("triton", "xla", ...) `token_sparse_attention` would run this call
    on, by the same checks and choice (`common.choose`); None where no backend can run it
    (`token_sparse_attention` raises ValueError there). For callers that take another
    route on one backend (`mla_decode.mla_sparse_attention`: on Triton, dv folded into dk)."""
    call = _checked_call(q, k, v, indices, block_size=block_size, q_positions=q_positions,
                         kv_positions=kv_positions, causal=causal, sink_logits=sink_logits,
                         softcap=softcap, scale=scale)
    return common.choose("token_sparse", impl, BACKENDS, call, interpret=interpret, config=config)[0]


def folds_value_into_key(k, v, config=None) -> bool:
    """Whether `token_sparse_backward(..., config=config, value_is_key_prefix=True)` takes
    keys `k [B, S, Hkv, D]` and values `v [B, S, Hkv, Dv]` (token indices): the atomic
    dk/dv path (`config` None or `TritonConfig.dkdv` "auto" / "atomic") and v's padded
    head-dim pieces the first of k's (`triton.value_pieces_lead`: 576 = 512 + 64 with Dv
    512 yes; 128 with Dv 64 no) in k's dtype. The caller still owes `v == k[..., :Dv]`."""
    return ((config is None or config.dkdv in ("auto", "atomic")) and k.dtype == v.dtype
            and value_pieces_lead(k.shape[-1], v.shape[-1]))


def _checked_call(q, k, v, indices, *, block_size, q_positions, kv_positions, causal, sink_logits,
                  softcap, scale) -> dict:
    """`token_sparse_attention`'s argument checks; the normalised call the backends'
    `supports` see (indices int32, positions and scale defaulted)."""
    args = common.check_attention_args(
        q, k, v, mask_fn=None, q_positions=q_positions, kv_positions=kv_positions,
        q_segment_ids=None, kv_segment_ids=None, sink_logits=sink_logits, softcap=softcap,
        scale=scale)
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    b, t, s, hkv = q.shape[0], q.shape[1], k.shape[1], k.shape[2]
    indices = check_indices(indices, b, t, hkv, -(-s // block_size))
    return dict(q=q, k=k, v=v, indices=indices, block_size=block_size, causal=causal, **args)


def token_sparse_backward(q, k, v, indices, out, lse, dout, dlse, *, q_positions, kv_positions, scale,
                          interpret=False, config=None, value_is_key_prefix=False):
    """The gradients of `token_sparse_attention(q, k, v, indices, return_lse=True)` (token
    indices, `block_size=1`, causal; no sinks, no soft-cap) at the cotangents `(dout [B, T,
    H, Dv], dlse [B, H, T])`, from a forward's `out [B, T, H, Dv]` and `lse [B, H, T]`
    computed elsewhere: another op's forward kernel that has no backward of its own
    (`mla_decode.mla_sparse_attention`'s Mosaic GPU prefill). Shapes and positions as
    `token_sparse_attention` (checked by the caller); the Triton backward (`triton_vjp`,
    `config` a `TritonConfig`; `interpret=True`: Triton's interpreter). Returns `(dq, dk,
    dv)` like q, k, v.

    `value_is_key_prefix=True`: the caller promises `v == k[..., :Dv]` (MLA: keys `[c_kv |
    k_rope]`, values `c_kv`); the kernel reads the values from k's rows and scatters `dk +
    dv` into dk's first Dv columns (one float32 atomic row per (query, listed slot) instead
    of a dk row and a dv row), so `dk[..., :Dv]` is the shared array's whole gradient and
    the returned dv is zeros. ValueError where v's head-dim pieces are not the first of k's
    (`triton.geometry`) or `config.dkdv="inverted"`."""
    from pallas_kernels.token_sparse import triton_vjp  # noqa: PLC0415 - as token_sparse_triton

    cfg = config or TritonConfig()
    st = autodiff.Static(
        forward=triton.forward, backward=triton_vjp.backward, mask_fn=None, scale=float(scale),
        softcap=None, has_sinks=False, interpret=bool(interpret),
        config=(cfg, triton.geometry(q, k, v, indices, 1, True, cfg.block_k, cfg.max_rows,
                                     value_is_key_prefix)))
    dq, dk, dv, _ = autodiff.backward(st, q, k, v, None, q_positions, kv_positions, None, None, (indices,),
                                      out, lse, dout, dlse)
    return dq, dk, dv
