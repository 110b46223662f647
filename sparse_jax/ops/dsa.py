"""DeepSeek Sparse Attention (DeepSeek-V3.2, arXiv 2512.02556) as pure functions.

* Lightning indexer: `I[t, s] = sum_{j < H_I} w[t, j] * ReLU(q_I[t, j] . k_I[s])`, with
  `q_I [B, T, H_I, D_I]`, `w [B, T, H_I]` from the query token and one key
  `k_I [B, S, D_I]` per token (`indexer_scores`); keys invisible to a query (later
  position, empty slot, padding) score -inf.
* Top-k token selection per query (`indexer_topk`, k=2048 in the paper), causal; ties go
  to the lower slot; `-1` pads when fewer keys are visible: the `pallas_kernels.indexer`
  op for every `impl` (its XLA reference on "xla" and on CPU), chunked over queries so the
  `T x S` score matrix is never built whole; the selected set comes in ascending slot
  order, -1 padding last (consumers treat it as a set).
* Main attention over the selected tokens only (`selected_attention`), MLA in MQA form
  (`sparse_jax.ops.mla`: absorbed queries against the latent cache) through
  `mla_sparse_attention` (on Hopper `mla_decode`'s Mosaic GPU kernel over every query token,
  elsewhere the `token_sparse` op), or at decode the `mla_decode` op over the cache as
  stored (their XLA references on CPU).
* Training (`indexer_target`, `dsa_indexer_loss`): KL from the main attention
  distribution (summed over heads, L1-normalised, no gradient) to `softmax(I_t)`; in the
  dense warm-up over all visible keys, in the sparse stage over the selected set only.

Indices are *slots* of the key arrays (the cache slot, = position for a `FullKVCache`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import IMPLS, config_for
from pallas_kernels.indexer import api as indexer_op
from pallas_kernels.indexer.fp8 import SCORE_DTYPES
from pallas_kernels.mla_decode import mla_decode, mla_sparse_attention
from sparse_jax.ops.attention import DECODE_MAX_QUERIES
from sparse_jax.ops import selection

STAGES = ("warmup", "sparse")


@dataclasses.dataclass(frozen=True)
class DSAConfig:
    """DSA hyperparameters (V3.2: 64 indexer heads of dim 128, top_k 2048 (check)).

    index_heads (H_I) / index_head_dim (D_I): lightning indexer size. top_k: tokens per
    query. stage: "warmup" (dense main attention, indexer KL over all visible keys: train
    only the indexer) or "sparse" (top-k attention, indexer KL over the selected set).
    indexer_loss: compute the KL (sown as `nnx.Intermediate` `indexer_loss`) in calls
    without a cache; for training, run the model under `nnx.capture` (a sow outside it
    would accumulate in the module). index_dtype: dtype of the indexer keys in the cache (None: compute
    dtype; e.g. bfloat16, or float8_e4m3fn / float8_e5m2 with a per-token power-of-two scale:
    `index_key_codes`); the layer rounds its keys the same way without a cache. query_chunk: queries per
    chunk of the top-k. impl: the `indexer` op's backend (`pallas_kernels.common.IMPLS`;
    "auto": the Triton score kernel and radix select on a GPU, the XLA reference elsewhere;
    the layer's attention keeps `AttentionConfig.impl`). score_dtype: the selection's scores,
    "bfloat16" (as the indexer computes them) or "float8_e4m3fn" (V3.2's FP8 indexer:
    Hadamard-rotated e4m3 q and k with per-token scales, `pallas_kernels/indexer/fp8.py`);
    the indexer loss always uses the unquantised scores. fp8_rerank: None, or m >= 1 with
    FP8 scores: they pick `ceil(m * top_k)` candidates, re-scored in float32 from the
    unquantised operands (the op's `fp8_rerank`). fused_topk: where the Triton indexer runs,
    its fused top-k (`FusedIndexerConfig`: no float32 score rows; a sampled threshold keeps
    candidates, exact over them), elsewhere the backend's usual select; it works best with one
    large query chunk (`query_chunk >= T`): H100, 64K, one chunk: 20.65 ms vs 75.94 for the
    radix select (docs/BENCHMARKS.md).
    """

    index_heads: int = 64
    index_head_dim: int = 128
    top_k: int = 2048
    stage: str = "sparse"
    indexer_loss: bool = False
    index_dtype: jnp.dtype | None = None
    query_chunk: int = 512
    impl: str = "auto"
    score_dtype: str = "bfloat16"
    fp8_rerank: float | None = None
    fused_topk: bool = False

    def __post_init__(self):
        for name in ("index_heads", "index_head_dim", "top_k", "query_chunk"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be an int >= 1, got {val!r}")
        if self.index_head_dim % 2:
            raise ValueError(f"index_head_dim must be even (RoPE), got {self.index_head_dim}")
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if not isinstance(self.score_dtype, str) or self.score_dtype not in SCORE_DTYPES:
            raise ValueError(f"score_dtype must be one of {SCORE_DTYPES}, got {self.score_dtype!r}")
        if not isinstance(self.fused_topk, bool):
            raise ValueError(f"fused_topk must be a bool, got {self.fused_topk!r}")
        if self.fp8_rerank is not None:
            if self.score_dtype != "float8_e4m3fn":
                raise ValueError(f"fp8_rerank needs score_dtype='float8_e4m3fn', got {self.score_dtype!r}")
            if isinstance(self.fp8_rerank, bool) or not isinstance(self.fp8_rerank, (int, float)) \
                    or not self.fp8_rerank >= 1:
                raise ValueError(f"fp8_rerank must be None or a number >= 1, got {self.fp8_rerank!r}")


def visible(q_positions, kv_positions):
    """Causal visibility `[B, T, S]`: valid query, filled slot, `kv_pos <= q_pos`."""
    qp, kp = q_positions[:, :, None], kv_positions[:, None, :]
    return (qp >= 0) & (kp >= 0) & (kp <= qp)


def indexer_scores(q_index, weights, k_index, q_positions, kv_positions):
    """`I [B, T, S]` float32; -inf where the key is not visible."""
    dots = jnp.einsum("btjd,bsd->btjs", q_index.astype(jnp.float32), k_index.astype(jnp.float32))
    scores = jnp.einsum("btj,btjs->bts", weights.astype(jnp.float32), jax.nn.relu(dots))
    return jnp.where(visible(q_positions, kv_positions), scores, -jnp.inf)


def indexer_topk(q_index, weights, k_index, q_positions, kv_positions, *, k: int,
                 query_chunk: int = 512, impl: str = "auto", score_dtype: str = "bfloat16",
                 fp8_rerank: float | None = None, fused_topk: bool = False):
    """Top-k slots per query: `[B, T, min(k, S)]` int32, the selected set in ascending slot
    order, -1 padded last; no gradient. The `pallas_kernels.indexer` op (`impl` is its
    backend, `score_dtype` / `fp8_rerank` its score precision, `DSAConfig`'s), `query_chunk`
    queries at a time, so at most `B x query_chunk x S` scores exist at once. Keys stored at
    lower precision (`DSAConfig.index_dtype`) are cast to the queries' dtype first, as the
    kernels compute. fused_topk: `DSAConfig.fused_topk` (`fused_topk_config`)."""
    k_index = k_index.astype(q_index.dtype)
    config = fused_topk_config(q_index, weights, k_index, k=k, impl=impl, score_dtype=score_dtype) \
        if fused_topk else None
    return indexer_op.indexer_topk(q_index, weights, k_index, k=k,
                                   q_positions=q_positions, kv_positions=kv_positions,
                                   query_chunk=query_chunk, impl=impl, score_dtype=score_dtype,
                                   fp8_rerank=fp8_rerank, config=config)


def fused_topk_config(q_index, weights, k_index, *, k: int, impl: str = "auto",
                      score_dtype: str = "bfloat16"):
    """`FusedIndexerConfig()` when the `indexer` op's backend for this call is the Triton
    kernel (the only one with a fused top-k), else None (the backend's usual select)."""
    call = dict(q_index=q_index, weights=weights, k_index=k_index, k=k, score_dtype=score_dtype)
    return config_for("indexer", impl, indexer_op.BACKENDS, call, {"triton": indexer_op.FusedIndexerConfig()})


def is_float8(dtype) -> bool:
    """Whether `dtype` is one of JAX's 8-bit float types (1 byte, floating)."""
    dtype = jnp.dtype(dtype)
    return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 1


def power_of_two_scale(amax, fmax: float, min_exponent: int, max_exponent: int):
    """float32 `2^e`, `e` the least integer with `amax / 2^e <= fmax` (so `x / 2^e` fits a
    type whose largest finite value is `fmax`), clipped to `[min_exponent, max_exponent]`."""
    e = jnp.ceil(jnp.log2(amax.astype(jnp.float32) / fmax))
    e = jnp.where(amax > fmax * jnp.exp2(e), e + 1, e)            # log2 rounded below a power of two
    return jnp.exp2(jnp.clip(e, min_exponent, max_exponent))


def index_key_codes(k_index, dtype):
    """Indexer keys `[..., D_I]` as the cache stores them in `dtype`: `(codes [..., D_I],
    scale [..., 1])`, both in `dtype`, `codes * scale ~= k_index`.

    float8 dtypes get one power-of-two scale per token (V3.2 keeps its FP8 indexer keys with a
    per-token scale): `2^ceil(log2(amax / fmax))`, its exponent clipped to the powers of two
    the float8 type holds exactly, and the codes saturate at `fmax` (a plain cast would turn
    |k| > 448 into NaN in e4m3fn and flush small keys to 0). Other dtypes: a plain cast and a
    width-0 scale."""
    dtype = jnp.dtype(dtype)
    if not is_float8(dtype):
        return k_index.astype(dtype), jnp.zeros(k_index.shape[:-1] + (0,), dtype)
    info = jnp.finfo(dtype)
    k = k_index.astype(jnp.float32)
    amax = jnp.max(jnp.abs(k), axis=-1, keepdims=True)
    lo, hi = int(np.log2(float(info.smallest_subnormal))), int(np.floor(np.log2(float(info.max))))
    scale = power_of_two_scale(jnp.maximum(amax, float(info.tiny)), float(info.max), lo, hi)
    codes = jnp.clip(k / scale, -float(info.max), float(info.max))
    return codes.astype(dtype), scale.astype(dtype)


def index_keys_from_codes(codes, scale, dtype):
    """`index_key_codes`'s inverse, in `dtype`: `codes * scale` (float8), else `codes`."""
    if scale.shape[-1] == 0:
        return codes.astype(dtype)
    return (codes.astype(jnp.float32) * scale.astype(jnp.float32)).astype(dtype)


def round_index_keys(k_index, dtype):
    """The indexer keys `[..., D_I]` as a cache in `dtype` gives them back, in k's dtype (the
    layer applies it without a cache too, so prefill and decode select the same tokens)."""
    return index_keys_from_codes(*index_key_codes(k_index, dtype), k_index.dtype)


def selected_mask(token_indices, num_slots: int):
    """`[B, T, K]` slots (-1 = none) -> bool `[B, T, S]` (`selection.selected_mask`, one
    shared latent head, blocks of one token)."""
    return selection.selected_mask(token_indices[:, :, None], num_slots)[:, :, 0]


def selected_attention(q_abs, c_kv, k_rope, token_indices, q_positions, kv_positions, *, scale: float,
                       decoding: bool = False, impl: str = "auto"):
    """MQA attention of absorbed queries `[B, T, H, Dc + Dr]` over the selected latent
    entries (keys `[c_kv | k_rope]`, values `c_kv`; `c_kv [B, S, Dc]`, `k_rope [B, S, Dr]`,
    `token_indices [B, T, K]`, causal). Returns the latent output `[B, T, H, Dc]`.

    `decoding` (a cached call of at most `DECODE_MAX_QUERIES` queries): the `mla_decode` op
    over the cache as stored (576 values read per selected token, no copy of the cache);
    else `mla_sparse_attention` (with the backward training needs): the `token_sparse` op
    over the concatenated latent, or (`auto` on Hopper, `impl="mosaic_gpu"`) `mla_decode`'s
    Mosaic GPU kernel over every query token, gradients by token_sparse's Triton backward."""
    k_rope = k_rope.astype(c_kv.dtype)
    if decoding and q_abs.shape[1] <= DECODE_MAX_QUERIES:
        return mla_decode(q_abs, c_kv, k_rope, indices=token_indices, q_positions=q_positions,
                          kv_positions=kv_positions, scale=scale, impl=impl)
    return mla_sparse_attention(q_abs, c_kv, k_rope, token_indices, q_positions=q_positions,
                                kv_positions=kv_positions, scale=scale, impl=impl)


def indexer_target(q_abs, k_lat, q_positions, kv_positions, *, scale: float, token_indices=None):
    """The main attention distribution `p [B, T, S]` float32 (no gradient): softmax
    probabilities summed over heads and L1-normalised per query, over all visible keys, or
    only the selected ones when `token_indices [B, T, K]` is given (sparse stage)."""
    q_abs, k_lat = jax.lax.stop_gradient(q_abs), jax.lax.stop_gradient(k_lat)
    mask = visible(q_positions, kv_positions)
    if token_indices is not None:
        mask = mask & selected_mask(token_indices, k_lat.shape[1])
    s = jnp.einsum("bthc,bsc->bhts", q_abs.astype(jnp.float32), k_lat[:, :, 0].astype(jnp.float32)) * scale
    p = jax.nn.softmax(jnp.where(mask[:, None], s, -jnp.inf), axis=-1)
    p = jnp.where(mask[:, None], p, 0.0).sum(1)
    total = p.sum(-1, keepdims=True)
    return p / jnp.where(total > 0, total, 1.0)


def dsa_indexer_loss(index_scores, target, q_positions, token_indices=None):
    """Mean over valid queries of `KL(target_t || softmax(I_t))` (paper: a sum over t).

    index_scores: `[B, T, S]` from `indexer_scores` (-inf = invisible; carries the
    indexer's gradient); target: `[B, T, S]` from `indexer_target`. With `token_indices`
    (sparse stage) the indexer softmax runs over the selected set only.
    """
    mask = index_scores != -jnp.inf         # invisible; a NaN score stays in (and makes the loss NaN)
    if token_indices is not None:
        mask = mask & selected_mask(token_indices, index_scores.shape[-1])
    logq = jax.nn.log_softmax(jnp.where(mask, index_scores, -1e30), axis=-1)   # finite: no NaN grads
    p = jax.lax.stop_gradient(target)
    kl = jnp.where(mask & (p != 0), p * (jnp.log(jnp.where(p > 0, p, 1.0)) - logq), 0.0).sum(-1)
    valid = (q_positions >= 0) & mask.any(-1)
    return (kl * valid).sum() / jnp.maximum(valid.sum(), 1)
