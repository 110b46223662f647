"""`mla_decode`: absorbed MLA decode (DeepSeek-V2, arXiv 2405.04434) over the latent cache as
stored, dense or over per-query selected tokens (DSA, DeepSeek-V3.2, arXiv 2512.02556).

`mla_decode(q_abs, c_kv, k_rope, indices=..., scale=...)`: the `H` absorbed query heads
`q_abs [B, T, H, Dc + Dr]` of a few new tokens (decode: T = 1; multi-token prediction /
speculative steps: a few) attend, MQA-style, over one latent "KV head": the keys are
`[c_kv | k_rope]` (`Dc + Dr` = 576 at the paper's sizes) and the values are `c_kv` itself.
The cache is read as stored, `c_kv [B, S, Dc]` and `k_rope [B, S, Dr]` (never
concatenated), and the kernels read each visited token's `Dc + Dr` values once, using the
same loaded `c_kv` rows as keys and values.

* sparse (`indices [B, T, K]`, -1 padding): query t attends the listed slots (DSA's top-k);
* dense (`indices=None`): every slot (absorbed MLA decode).

Both are causal on positions: a slot is visible iff its position is >= 0 and <= the query's
(and the query's position is >= 0). Kernels (`triton`, `mosaic_tpu`, `mosaic_gpu`) are
split-K flash-decoding: partial softmaxes over shares of the tokens, merged by
`pallas_kernels.decode.layout.combine`. Forward kernels only; a gradient (never needed at
decode) is the reference's, by a custom VJP that recomputes it.

`impl`: "auto" | "xla" | "triton" | "mosaic_tpu" | "mosaic_gpu"; `interpret=True` runs a
Triton / Mosaic TPU kernel in interpret mode on CPU, `interpret=plgpu.InterpretGPUParams()`
the Mosaic GPU one (GPU interpret mode). `mosaic_gpu` (Hopper wgmma + TMA, FlashMLA's
layout; bf16 / fp16, H a multiple of 64; sparse calls over rows gathered by XLA first) is
`impl="auto"`'s first choice on Hopper (H200, B=16, 128K cache: sparse k=2048 85 us vs
Triton's 146, dense 1350 us = 0.85 of copy bandwidth vs 2022; `experiments/bench_dsa.py
--parts decode --mla_impls triton,mosaic_gpu`); Triton serves what it does not cover.

`mla_sparse_attention(q_abs, c_kv, k_rope, indices, ...)`: the sparse mode for prefill and
training (any T, with gradients): `impl="mosaic_gpu"` (`auto`'s choice on Hopper) runs the Mosaic GPU kernel
over every query token and takes its gradients from `token_sparse`'s Triton backward
(`token_sparse_backward` with `value_is_key_prefix=True`: the values c_kv are the keys'
first Dc columns, so the kernel adds dv into dk there and scatters one 576-wide float32 row
per (query, slot) and row program instead of 576 + 512; `dc_kv = dk[..., :Dc]`). Why: on an
H100 at 64K tokens, 64 heads, k = 2048, the forward took 86 ms and forward + backward
2575 ms with the two scatters (2 x 1088 atomic adds per pair, 2.9e11); the folded backward
(2 x 576 per pair) is not yet timed on a GPU. Other impls are `token_sparse_attention` over
the concatenated latent (keys `[c_kv | k_rope]`, values `c_kv`). Where it runs on Triton
(`impl="triton"`, or `auto` off Hopper) with the atomic dk/dv path, its forward `(out, lse)`
feeds the same folded backward (one custom VJP, `_latent_prefill`, in the caller's dtype);
elsewhere (XLA, Mosaic TPU, `TritonConfig(dkdv="inverted")`, widths whose value pieces are
not the keys' first) its own custom VJP takes dk and dv apart and autodiff adds them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.mla_decode import mosaic_gpu, reference, tpu, triton
from pallas_kernels.mla_decode.mosaic_gpu import MlaDecodeMosaicGpuConfig, mla_decode_mosaic_gpu
from pallas_kernels.mla_decode.reference import mla_decode_reference
from pallas_kernels.mla_decode.tpu import MlaDecodeTpuConfig, mla_decode_tpu
from pallas_kernels.mla_decode.triton import MlaDecodeTritonConfig, mla_decode_triton
from pallas_kernels.token_sparse.api import (folds_value_into_key, token_sparse_attention, token_sparse_backend,
                                             token_sparse_backward, token_sparse_triton)

# impl="auto" order: Mosaic GPU on Hopper (1.5-1.7x Triton there), then Triton on any GPU
BACKENDS = {"mosaic_gpu": mosaic_gpu, "triton": triton, "mosaic_tpu": tpu, "xla": reference}
IMPLEMENTATIONS = {"xla": mla_decode_reference, "triton": mla_decode_triton,
                   "mosaic_tpu": mla_decode_tpu, "mosaic_gpu": mla_decode_mosaic_gpu}


def _check_int(name, x, shape):
    x = jnp.asarray(x)
    if x.shape != tuple(shape) or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be int {list(shape)}, got {x.dtype}{list(x.shape)}")
    return x.astype(jnp.int32)


def check_args(q_abs, c_kv, k_rope, indices, q_positions, kv_positions, scale, num_splits):
    """The argument checks; returns `(indices, q_positions, kv_positions, scale)` normalised."""
    for name, x, nd in (("q_abs", q_abs, 4), ("c_kv", c_kv, 3), ("k_rope", k_rope, 3)):
        if jnp.ndim(x) != nd:
            raise ValueError(f"{name} must be {nd}-D, got shape {jnp.shape(x)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if not q_abs.dtype == c_kv.dtype == k_rope.dtype:
        raise ValueError(f"q_abs, c_kv, k_rope must share a dtype, got {q_abs.dtype}, {c_kv.dtype}, "
                         f"{k_rope.dtype}")
    b, t, _, width = q_abs.shape
    s, dc = c_kv.shape[1:]
    if c_kv.shape[0] != b or k_rope.shape[:2] != (b, s):
        raise ValueError(f"c_kv [B, S, Dc] and k_rope [B, S, Dr] must match q_abs's batch {b} and "
                         f"each other, got {c_kv.shape}, {k_rope.shape}")
    if width != dc + k_rope.shape[2]:
        raise ValueError(f"q_abs's last dim ({width}) must be Dc + Dr = {dc} + {k_rope.shape[2]}")
    if s < 1:
        raise ValueError(f"the cache must have at least one slot, got S={s}")
    if indices is not None:
        if jnp.ndim(indices) != 3 or jnp.shape(indices)[:2] != (b, t) or jnp.shape(indices)[2] < 1:
            raise ValueError(f"indices must be int [{b}, {t}, K >= 1] (batch, query, slots), got shape "
                             f"{list(jnp.shape(indices))}")
        indices = _check_int("indices", indices, jnp.shape(indices))
        if not isinstance(indices, jax.core.Tracer):
            with jax.ensure_compile_time_eval():
                top = int(jnp.max(indices))
            if top >= s:
                raise ValueError(f"indices must be < S = {s} (cache slots), got {top}")
    if kv_positions is None:
        kv_positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    kv_positions = _check_int("kv_positions", kv_positions, (b, s))
    if q_positions is None:
        last = jnp.max(kv_positions, axis=1) + 1
        q_positions = last[:, None] - t + jnp.arange(t, dtype=jnp.int32)[None]
    q_positions = _check_int("q_positions", q_positions, (b, t))
    if scale is None:
        raise ValueError("scale is required (MLA: 1/sqrt(d_nope + d_rope)), got None")
    scale = common.check_scale(scale, width)
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be an int >= 1 or None, got {num_splits!r}")
    return indices, q_positions, kv_positions, float(scale)


def mla_decode(q_abs, c_kv, k_rope, *, indices=None, q_positions=None, kv_positions=None, scale,
               return_lse=False, num_splits=None, impl="auto", interpret=False, config=None,
               explain=False):
    """Absorbed MLA attention of a few new tokens over the latent cache.

    Args:
      q_abs: `[B, T, H, Dc + Dr]` absorbed queries `[q_nope W_uk^T, q_rope]`, float, the
        cache's dtype. T small (decode / MTP); each query token is its own kernel program.
      c_kv: `[B, S, Dc]` KV latents (keys' first Dc dims, and the values).
      k_rope: `[B, S, Dr]` RoPE keys (the keys' last Dr dims).
      indices: optional int `[B, T, K]` slots per query (-1 = padding; the listed entries of
        a row must be distinct). None: dense over all slots.
      q_positions: int `[B, T]`, negative = padding query (zeros out). Default: the last T
        positions, `max(kv_positions) + 1 - T + arange(T)` (new tokens already written).
      kv_positions: int `[B, S]`, each slot's position, negative = empty. Default `arange(S)`.
      scale: logit scale (MLA: `1/sqrt(qk_nope_head_dim + qk_rope_head_dim)`), required.
      return_lse: also return the log-sum-exp `[B, H, T]` (float32, -inf on empty rows).
      num_splits: token shares per query row for the kernels (split-K); None: from the shape.
      impl: "auto" | "xla" | "triton" | "mosaic_tpu" | "mosaic_gpu" (`common.resolve`);
        interpret: run a Pallas kernel in interpret mode (CPU tests; Mosaic GPU:
        `plgpu.InterpretGPUParams()`).
      config: the chosen kernel's tiles (`MlaDecodeTritonConfig`, `MlaDecodeTpuConfig`,
        `MlaDecodeMosaicGpuConfig`, importable from here); None: its defaults.
      explain: print which backend runs and why the others were skipped.
    Returns:
      the latent output `[B, T, H, Dc]` in q's dtype (apply `W_uv` after), or
      `AttentionOutput(out, lse)` with `return_lse`. Rows that see nothing are zeros.
    """
    indices, q_positions, kv_positions, scale = check_args(
        q_abs, c_kv, k_rope, indices, q_positions, kv_positions, scale, num_splits)
    call = dict(q_abs=q_abs, c_kv=c_kv, k_rope=k_rope, indices=indices)
    fn = common.resolve("mla_decode", impl, BACKENDS, IMPLEMENTATIONS, call, interpret=interpret,
                        config=config, explain=explain)
    kw = dict(scale=scale, return_lse=return_lse, num_splits=num_splits)
    if fn is IMPLEMENTATIONS["xla"]:
        return fn(q_abs, c_kv, k_rope, indices=indices, q_positions=q_positions,
                  kv_positions=kv_positions, **kw)
    return _with_reference_vjp(fn, tuple(sorted(kw.items())), q_abs, c_kv, k_rope, indices,
                               q_positions, kv_positions)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _with_reference_vjp(fn, kw, q_abs, c_kv, k_rope, indices, q_positions, kv_positions):
    """The kernel `fn` forward; its VJP is the reference's (recomputed)."""
    return fn(q_abs, c_kv, k_rope, indices=indices, q_positions=q_positions,
              kv_positions=kv_positions, **dict(kw))


def _fwd(fn, kw, q_abs, c_kv, k_rope, indices, q_positions, kv_positions):
    out = _with_reference_vjp(fn, kw, q_abs, c_kv, k_rope, indices, q_positions, kv_positions)
    return out, (q_abs, c_kv, k_rope, indices, q_positions, kv_positions)


def _bwd(fn, kw, res, cot):
    del fn
    q_abs, c_kv, k_rope, indices, q_positions, kv_positions = res
    ref = lambda q, c, r: mla_decode_reference(q, c, r, indices=indices, q_positions=q_positions,  # noqa: E731
                                               kv_positions=kv_positions, **dict(kw))
    _, pull = jax.vjp(ref, q_abs, c_kv, k_rope)
    return (*pull(cot), None, None, None)


_with_reference_vjp.defvjp(_fwd, _bwd)


def mla_sparse_attention(q_abs, c_kv, k_rope, indices, *, q_positions=None, kv_positions=None, scale,
                         return_lse=False, impl="auto", interpret=False, config=None):
    """Sparse MLA attention for prefill and training, with gradients: DSA's main attention
    (DeepSeek-V3.2), each query token over its own listed slots of the latent cache.

    Args as `mla_decode` (`indices [B, T, K]` required, -1 padding, causal on positions;
    T any length: every query token is its own row), plus:
      impl: "auto": "mosaic_gpu" on Hopper for the bf16 / fp16 calls it covers (H100, 64K,
        forward: 85.9 ms vs Triton's 129.0; 16K: 24.1 vs 26.0), else `token_sparse`'s choice.
        "mosaic_gpu": the forward is this
        op's Mosaic GPU kernel, `mla_decode_mosaic_gpu` (Hopper; FlashMLA's layout: a query
        token's 64 heads are one wgmma tile, so no rows are wasted on other tokens' lists;
        the listed rows gathered in the kernel, more splits where a slot list would not fit
        SMEM; `config` a `MlaDecodeMosaicGpuConfig`, `gather_in_kernel` forced on); its
        gradients are `token_sparse`'s Triton backward on the kernel's `(out, lse)`
        (`token_sparse_backward`; under GPU interpret mode, Triton's interpreter). bf16 /
        fp16 run as given; float32 inputs run both kernels in bfloat16 (wgmma's inputs;
        the backward's float32 q / dO tiles would overflow SMEM at 64 heads x 576) with
        float32 accumulation, results cast back to float32. H a multiple of 64,
        Dc a multiple of 128 up to 512, Dr of 64 (else ValueError). Any other impl:
        `token_sparse_attention` over the concatenated latent (keys `[c_kv | k_rope]`,
        values `c_kv`), `config` its tiles. Where that runs on Triton (its own choice:
        `impl="triton"`, or "auto" on a non-Hopper GPU or with `interpret=True`) with the
        atomic dk/dv (`config` None or `TritonConfig(dkdv="auto" | "atomic")`) and the
        value widths' pieces the keys' first (`folds_value_into_key`; DeepSeek's 512 + 64
        yes), its forward `(out, lse)` (the caller's dtype, no bf16 cast) takes the same
        folded backward as "mosaic_gpu" (`token_sparse_backward(value_is_key_prefix=True,
        config=config)`); otherwise (XLA, Mosaic TPU, `dkdv="inverted"`, other widths) its
        forward and its own backward, dk and dv scattered apart.
    Returns:
      the latent output `[B, T, H, Dc]` in q's dtype, or `AttentionOutput(out, lse [B, H, T])`.
    """
    if indices is None:
        raise ValueError("mla_sparse_attention needs indices [B, T, K] (the dense path is mla_decode's)")
    indices, q_positions, kv_positions, scale = check_args(
        q_abs, c_kv, k_rope, indices, q_positions, kv_positions, scale, None)
    if impl == "auto":      # Mosaic GPU first on Hopper (H100, 64K: 85.9 ms vs Triton's 129.0)
        call = dict(q_abs=q_abs, c_kv=c_kv, k_rope=k_rope, indices=indices)
        name, _ = common.choose("mla_sparse_attention", "auto", {"mosaic_gpu": mosaic_gpu}, call,
                                interpret=interpret, config=config)
        impl = "mosaic_gpu" if name else "auto"
    if impl == "mosaic_gpu":
        config = dataclasses.replace(config or MlaDecodeMosaicGpuConfig(), gather_in_kernel=True)
        mosaic_gpu.check_supported(_bf16_if_f32(q_abs), c_kv, k_rope, indices, interpret, config)
    else:           # token_sparse over the concatenated latent: one MQA head, token lists
        latent = (q_abs, jnp.concatenate([c_kv, k_rope], axis=-1)[:, :, None], c_kv[:, :, None],
                  indices[:, :, None])
        kw = dict(q_positions=q_positions, kv_positions=kv_positions, scale=scale, impl=impl,
                  interpret=interpret, config=config)
        if not _folds_on_triton(*latent, **kw):
            return token_sparse_attention(*latent, **kw, return_lse=return_lse)
        impl = "triton"
    out, lse = _latent_prefill(_Prefill(impl, scale, interpret, config), q_abs, c_kv, k_rope, indices,
                               q_positions, kv_positions)
    return common.AttentionOutput(out, lse) if return_lse else out


def _folds_on_triton(q_abs, keys, values, slots, *, config, **kw) -> bool:
    """Whether `token_sparse_attention(q_abs, keys, values, slots, **kw)` would run on Triton
    (its own backend choice, `token_sparse_backend`) and its backward can fold dv into dk
    (`folds_value_into_key`: the atomic dk/dv path, not `dkdv="inverted"`; Dc + Dr = 512 +
    64 yes, 64 + 64 no): then `_latent_prefill` runs it, dv folded into dk."""
    return (token_sparse_backend(q_abs, keys, values, slots, config=config, **kw) == "triton"
            and folds_value_into_key(keys, values, config))


@dataclasses.dataclass(frozen=True)
class _Prefill:
    """`_latent_prefill`'s static part. forward: "mosaic_gpu" (`mla_decode_mosaic_gpu`,
    float32 cast to bf16, `config` its `MlaDecodeMosaicGpuConfig`; the backward on Triton's
    default tiles) or "triton" (`token_sparse_triton` over the concatenated latent, the
    caller's dtype, `config` a `TritonConfig` or None for the forward and the backward)."""

    forward: str
    scale: float
    interpret: object
    config: object

    def cast(self, x):
        return _bf16_if_f32(x) if self.forward == "mosaic_gpu" else x


def _bf16_if_f32(x):
    """The Mosaic GPU prefill's operand dtype: float32 runs in bfloat16 (wgmma's inputs; in
    the backward, float32 q / dO tiles at 64 heads x 576 would overflow SMEM), bf16 / fp16
    as given."""
    return x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _latent_prefill(st, q_abs, c_kv, k_rope, indices, q_positions, kv_positions):
    """`mla_sparse_attention`'s forward `(out, lse)` on `st.forward`'s kernel (`_Prefill`).
    Its VJP: `token_sparse_backward` on the residuals, dv folded into dk."""
    cast, pos = st.cast, dict(q_positions=q_positions, kv_positions=kv_positions, scale=st.scale)
    if st.forward == "mosaic_gpu":
        res = mla_decode_mosaic_gpu(cast(q_abs), cast(c_kv), cast(k_rope), indices=indices, **pos,
                                    return_lse=True, num_splits=None, interpret=st.interpret,
                                    config=st.config)
    else:           # the kernel itself: `mla_sparse_attention` checked the call (`token_sparse_backend`)
        keys = jnp.concatenate([c_kv, k_rope], axis=-1)[:, :, None]
        res = token_sparse_triton(q_abs, keys, c_kv[:, :, None], indices[:, :, None], **pos, block_size=1,
                                  causal=True, sink_logits=None, softcap=None, return_lse=True,
                                  interpret=st.interpret, config=st.config)
    return res.out.astype(q_abs.dtype), res.lse


def _latent_prefill_fwd(st, q_abs, c_kv, k_rope, indices, q_positions, kv_positions):
    out, lse = _latent_prefill(st, q_abs, c_kv, k_rope, indices, q_positions, kv_positions)
    return (out, lse), (q_abs, c_kv, k_rope, indices, q_positions, kv_positions, out, lse)


def _latent_prefill_bwd(st, res, cts):
    q_abs, c_kv, k_rope, indices, q_positions, kv_positions, out, lse = res
    dout, dlse = cts
    dc = c_kv.shape[-1]
    cast = st.cast             # Mosaic, float32: 344 KB of SMEM asked on an H100 at Dc 512 (of 227 KB)
    config = st.config if st.forward == "triton" else None
    keys = jnp.concatenate([cast(c_kv), cast(k_rope)], axis=-1)[:, :, None]
    # the values are the keys' first Dc columns: the kernel adds dv into dk there (one
    # 576-wide atomic row per (query, slot), not 576 + 512), so dk[..., :Dc] is dc_kv whole
    dq, dk, _ = token_sparse_backward(cast(q_abs), keys, cast(c_kv)[:, :, None], indices[:, :, None], cast(out),
                                      lse, cast(dout), dlse, q_positions=q_positions,
                                      kv_positions=kv_positions, scale=st.scale, interpret=bool(st.interpret),
                                      config=config, value_is_key_prefix=True)
    dk = dk[:, :, 0]
    return (dq.astype(q_abs.dtype), dk[..., :dc].astype(c_kv.dtype), dk[..., dc:].astype(k_rope.dtype),
            None, None, None)


_latent_prefill.defvjp(_latent_prefill_fwd, _latent_prefill_bwd)


def triton_launch_plan(q_abs, c_kv, k_rope, indices=None, *, config=None, num_splits=None):
    """The Triton backend's launch plan for a call (row tiles, KV block, splits: its
    `Geometry`), what the benchmarks report beside their timings. Shapes as `mla_decode`."""
    return triton.geometry(q_abs, c_kv, k_rope, indices, config or MlaDecodeTritonConfig(), num_splits)
