"""Flax NNX attention layers of the static family, all with one interface:

    y, cache = layer(x, positions, cache=None, shared=None)

`x [B, T, d_model]`, `positions [B, T]` int (negative = padding), `cache` from
`layer.init_cache(batch, max_len, dtype)` (None in training), `shared` unused by these
layers (HySparse's full layer hands its KV to the sparse layers through it).

* `FullAttention`: causal MHA / GQA / MQA with RoPE, optional learned per-head sink
  logits (gpt-oss), sigmoid output gate (gated attention, arXiv 2505.06708) and logit
  soft-cap (Gemma 2).
* `SlidingWindowAttention`: the same with a causal window (Mistral, Gemma local layers),
  rolling-buffer cache of `window` slots.
* `StreamingLLMAttention`: sinks + window (arXiv 2309.17453), cache of `num_sinks + window`
  slots; RoPE at text positions or at positions inside the cache (`rope_mode`).
* `PatternAttention`: any static pattern (Longformer, BigBird, Sparse Transformer) through
  block-sparse attention, full cache.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_jax import patterns as P
from sparse_jax.cache.base import Queries, Selection, weighted_attention
from sparse_jax.cache.kv import FullKVCache, RollingKVCache
from sparse_jax.cache.pooled import pooled_attention
from sparse_jax.cache.quest import page_attention
from sparse_jax.layers.base import AttentionLayer
from sparse_jax.ops import attention as ops
from sparse_jax.ops.masking import guard_kv
from sparse_jax.ops.rope import RopeScaling, apply_rope
from sparse_jax.sharding import param


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Hyperparameters shared by every attention layer.

    d_model: model width. num_heads / num_kv_heads: query / KV heads (GQA when
    num_kv_heads < num_heads; default num_heads). head_dim: default d_model // num_heads.
    rope_theta: RoPE base (None: no RoPE). learned_sinks: per-head sink logit in the
    softmax denominator. output_gate: `o * sigmoid(x W_g)` per head and channel before the
    output projection. softcap: logit soft-cap. impl: kernel choice ("auto" | "xla" | ...).
    dtype: compute dtype of activations; param_dtype: dtype of the weights. qkv_bias: biases
    on the q/k/v projections (Qwen2). rope_scaling: RoPE frequency scaling (`ops.rope.RopeScaling`;
    imported long-context checkpoints), applied by the layers built on `AttentionBase`'s
    RoPE at text positions (F, W, S, P, M of `SparseLM`).
    """

    d_model: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    rope_theta: float | None = 10000.0
    learned_sinks: bool = False
    output_gate: bool = False
    softcap: float | None = None
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    qkv_bias: bool = False
    rope_scaling: RopeScaling | None = None

    def __post_init__(self):
        for name in ("d_model", "num_heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            if self.d_model % self.num_heads:
                raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads "
                                 f"({self.num_heads}) or head_dim given")
            object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        if self.rope_theta is not None and self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None and (self.rope_theta is None
                                              or not isinstance(self.rope_scaling, RopeScaling)):
            raise ValueError(f"rope_scaling must be a RopeScaling with rope_theta set, got "
                             f"{self.rope_scaling!r} (rope_theta {self.rope_theta})")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"softcap must be > 0 or None, got {self.softcap}")


fan_in_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
out_proj_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2)


def output_params(rngs: nnx.Rngs, config: AttentionConfig, *, value_dim: int | None = None,
                  learned_sinks: bool = False):
    """The output side of an attention layer: `(wo, sink_logits, wg)`, drawn from `rngs` in
    that order (so the layers keep their initial values).

    wo `[H, Dv, d_model]`: output projection, fan-in over heads and value dims. sink_logits
    `[H]` (zeros) when `learned_sinks`, else None. wg `[d_model, H, Dv]`: the sigmoid
    output gate `o * sigmoid(x W_g)` when `config.output_gate`, else None. Dv: `value_dim`
    (default `config.head_dim`).
    """
    h, d, pd = config.num_heads, config.d_model, config.param_dtype
    dv = config.head_dim if value_dim is None else value_dim
    wo = param(rngs, out_proj_init, (h, dv, d), ("heads", "head_dim", "embed"), pd)
    sinks = param(rngs, nnx.initializers.zeros_init(), (h,), ("heads",), pd) if learned_sinks else None
    wg = param(rngs, fan_in_init, (d, h, dv), ("embed", "heads", "head_dim"), pd) if config.output_gate else None
    return wo, sinks, wg


class AttentionBase(AttentionLayer):
    """Projections, RoPE, sinks, gate; subclasses supply `attend` and `init_cache`, and may
    rescale the rotated queries per position (`scale_queries`).

    With a cache, `attend_cached` writes the call's keys and values through the cache's
    `update(k, v, positions, queries=...)` and attends over what it returns (the contract
    of `sparse_jax.cache.base.Cache`), so the full and rolling caches, Quest / top-p pages
    and the eviction policies' caches (`sparse_jax.kv_policies`) all go one way.
    """

    def __init__(self, config: AttentionConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        h, hkv, hd, d = c.num_heads, c.num_kv_heads, c.head_dim, c.d_model
        pd = c.param_dtype
        self.wq = param(rngs, fan_in_init, (d, h, hd), ("embed", "heads", "head_dim"), pd)
        self.wk = param(rngs, fan_in_init, (d, hkv, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.wv = param(rngs, fan_in_init, (d, hkv, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.wo, self.sink_logits, self.wg = output_params(rngs, c, learned_sinks=c.learned_sinks)
        zeros = nnx.initializers.zeros_init()
        self.bq, self.bk, self.bv = (
            (param(rngs, zeros, (h, hd), ("heads", "head_dim"), pd),
             param(rngs, zeros, (hkv, hd), ("kv_heads", "head_dim"), pd),
             param(rngs, zeros, (hkv, hd), ("kv_heads", "head_dim"), pd))
            if c.qkv_bias else (None, None, None))

    def __call__(self, x, positions, cache=None, shared=None):
        """x: `[B, T, d_model]`, positions: int `[B, T]` -> (`[B, T, d_model]`, new cache)."""
        del shared
        c = self.config
        if x.ndim != 3 or x.shape[-1] != c.d_model:
            raise ValueError(f"x must be [batch, seq, d_model={c.d_model}], got {x.shape}")
        positions = jnp.asarray(positions)
        if positions.shape != x.shape[:2] or not jnp.issubdtype(positions.dtype, jnp.integer):
            raise ValueError(f"positions must be int [B, T] = {list(x.shape[:2])}, got "
                             f"{positions.dtype}{list(positions.shape)}")
        x = x.astype(c.dtype)
        q_raw = jnp.einsum("btd,dhk->bthk", x, self.wq[...].astype(c.dtype))
        k = jnp.einsum("btd,dhk->bthk", x, self.wk[...].astype(c.dtype))
        v = jnp.einsum("btd,dhk->bthk", x, self.wv[...].astype(c.dtype))
        if c.qkv_bias:
            q_raw, k, v = (t + b[...].astype(c.dtype) for t, b in ((q_raw, self.bq), (k, self.bk), (v, self.bv)))
        if c.rope_theta is not None:
            q = apply_rope(q_raw, positions, c.rope_theta, c.rope_scaling)
            k = apply_rope(k, positions, c.rope_theta, c.rope_scaling)
        else:
            q = q_raw
        q = self.scale_queries(q, positions)
        k, v = guard_kv(k, v, positions)      # padding and non-finite tokens cannot reach masked outputs
        sinks = None if self.sink_logits is None else self.sink_logits[...]
        o, cache = self.attend_cached(q, k, v, positions, cache, sink_logits=sinks, q_raw=q_raw)
        if self.wg is not None:
            o = o * jax.nn.sigmoid(jnp.einsum("btd,dhk->bthk", x, self.wg[...].astype(c.dtype)))
        y = jnp.einsum("bthk,hkd->btd", o.astype(c.dtype), self.wo[...].astype(c.dtype))
        return y, cache

    def scale_queries(self, q, positions):
        """Rotated queries `q [B, T, H, D]` at `positions [B, T]` -> the queries the layer
        attends with (same shape and dtype). Here unchanged; ASEntmax's length-scaled
        temperature overrides it (`sparse_jax.layers.entmax.ASEntmaxAttention`)."""
        del positions
        return q

    def attend_cached(self, q, k, v, positions, cache=None, *, sink_logits=None, q_raw=None):
        """Write this call's rotated `k, v [B, T, Hkv, D]` into `cache` and attend the rotated
        `q [B, T, H, D]` (`q_raw`: before RoPE; default `q`) over what its `update` returns
        -> `(o [B, T, H, D], new cache)`. Without a cache: over `k, v` themselves."""
        q_raw = q if q_raw is None else q_raw
        if cache is None:
            return self.attend(q, k, v, positions, positions, sink_logits=sink_logits, q_raw=q_raw,
                               decoding=False), None
        queries = Queries(q, sink_logits, self.config.softcap)
        keys, values, kv_positions, *selection, cache = cache.update(k, v, positions, queries=queries)
        sel = selection[0] if selection else Selection()
        c = self.config
        if sel.slot_heads is not None:
            o = pooled_attention(q, keys, values, kv_positions, sel.slot_heads, positions,
                                 num_kv_heads=c.num_kv_heads, scale=queries.scale, sink_logits=sink_logits,
                                 softcap=c.softcap)
        elif sel.log_weights is not None:
            o = weighted_attention(q, keys, values, kv_positions, positions, sel.log_weights,
                                   scale=queries.scale, sink_logits=sink_logits, softcap=c.softcap)
        elif sel.block_indices is not None:
            o = page_attention(q, keys, values, kv_positions, positions, sel, sink_logits=sink_logits,
                               softcap=c.softcap, impl=c.impl)
        else:
            o = self.attend(q, keys, values, positions, kv_positions, sink_logits=sink_logits, q_raw=q_raw,
                            decoding=not sel.prefill)
        return o, cache

    def attend(self, q, k, v, q_positions, kv_positions, *, sink_logits, q_raw, decoding):
        """Attention of rotated `q [B, Tq, H, D]` over `k, v` (cache contents when
        `decoding`); `q_raw` is the query before RoPE."""
        raise NotImplementedError

    def init_cache(self, batch: int, max_len: int, dtype=None):
        raise NotImplementedError


class LocalAttention(AttentionBase):
    """Causal attention with an optional window and sinks; the layer behind the three below.

    window: keys per query including itself (None: unlimited). num_sinks: first positions
    always visible. rope_mode: "text" (RoPE at text positions) or "cache" (StreamingLLM:
    RoPE distances to sinks as inside the compact cache; needs window and sinks).
    """

    def __init__(self, config: AttentionConfig, *, window: int | None = None, num_sinks: int = 0,
                 rope_mode: str = "text", rngs: nnx.Rngs):
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be an int >= 1 or None, got {window!r}")
        if not isinstance(num_sinks, int) or num_sinks < 0:
            raise ValueError(f"num_sinks must be an int >= 0, got {num_sinks!r}")
        if num_sinks and window is None:
            raise ValueError("num_sinks needs a window (without one every key is visible anyway)")
        if rope_mode not in ("text", "cache"):
            raise ValueError(f"rope_mode must be 'text' or 'cache', got {rope_mode!r}")
        if rope_mode == "cache" and config.rope_scaling is not None:
            raise ValueError("rope_mode='cache' does not support rope_scaling")
        if rope_mode == "cache" and (not num_sinks or config.rope_theta is None):
            raise ValueError("rope_mode='cache' needs num_sinks >= 1 and RoPE (rope_theta set)")
        super().__init__(config, rngs=rngs)
        self.window, self.num_sinks, self.rope_mode = window, num_sinks, rope_mode

    def attend(self, q, k, v, q_positions, kv_positions, *, sink_logits, q_raw, decoding):
        c = self.config
        if self.rope_mode == "cache":
            return ops.streaming_attention_cache_rope(
                q_raw, k, v, q_positions, kv_positions, window=self.window, num_sinks=self.num_sinks,
                rope_theta=c.rope_theta, decoding=decoding, sink_logits=sink_logits,
                softcap=c.softcap, impl=c.impl)
        return ops.local_attention(q, k, v, q_positions, kv_positions, window=self.window,
                                   num_sinks=self.num_sinks, decoding=decoding,
                                   sink_logits=sink_logits, softcap=c.softcap, impl=c.impl)

    def init_cache(self, batch: int, max_len: int, dtype=None):
        """Full cache of `max_len` slots, or a rolling one of `num_sinks + window` slots
        (never more than `max_len`)."""
        c = self.config
        dtype = c.dtype if dtype is None else dtype
        if self.window is None or self.window + self.num_sinks >= max_len:
            return FullKVCache.init(batch, max_len, c.num_kv_heads, c.head_dim, dtype=dtype)
        return RollingKVCache.init(batch, self.window, c.num_kv_heads, c.head_dim,
                                   num_sinks=self.num_sinks, dtype=dtype)


class FullAttention(LocalAttention):
    """Causal full attention (MHA/GQA/MQA) with the AttentionConfig options."""

    def __init__(self, config: AttentionConfig, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)


class SlidingWindowAttention(LocalAttention):
    """Causal sliding-window attention: query t sees `t - window < s <= t`."""

    def __init__(self, config: AttentionConfig, *, window: int, rngs: nnx.Rngs):
        super().__init__(config, window=window, rngs=rngs)


class StreamingLLMAttention(LocalAttention):
    """StreamingLLM: the first `num_sinks` tokens plus a window of recent ones (default 4 sinks)."""

    def __init__(self, config: AttentionConfig, *, window: int, num_sinks: int = 4,
                 rope_mode: str = "text", rngs: nnx.Rngs):
        super().__init__(config, window=window, num_sinks=num_sinks, rope_mode=rope_mode, rngs=rngs)


class PatternAttention(AttentionBase):
    """Attention under a static `sparse_jax.patterns` predicate via block-sparse attention.

    pattern: e.g. `patterns.longformer(256, num_global=1)`, `patterns.bigbird(64)`,
    `patterns.sparse_transformer_strided(128)`. block_size: block of the metadata.
    """

    def __init__(self, config: AttentionConfig, *, pattern: P.Pattern, block_size: int = 64,
                 rngs: nnx.Rngs):
        if not isinstance(pattern, P.Pattern):
            raise ValueError(f"pattern must be a sparse_jax.patterns.Pattern, got {type(pattern).__name__}")
        if pattern.needs_segments:
            raise ValueError("pattern reads segment ids, which this layer does not take")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        super().__init__(config, rngs=rngs)
        self.pattern, self.block_size = pattern, block_size

    def attend(self, q, k, v, q_positions, kv_positions, *, sink_logits, q_raw, decoding):
        c = self.config
        return ops.pattern_attention(q, k, v, q_positions, kv_positions, pattern=self.pattern,
                                     block_size=self.block_size, decoding=decoding,
                                     sink_logits=sink_logits, softcap=c.softcap, impl=c.impl)

    def init_cache(self, batch: int, max_len: int, dtype=None):
        c = self.config
        dtype = c.dtype if dtype is None else dtype
        return FullKVCache.init(batch, max_len, c.num_kv_heads, c.head_dim, dtype=dtype)
