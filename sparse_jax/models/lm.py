"""A small decoder-only LM whose layers' attention comes from a per-layer spec string.

`LMConfig.layer_spec` has one letter per layer:

* `F` full causal attention, `W` sliding window, `S` StreamingLLM (sinks + window),
* `P` static pattern (`LMConfig.pattern`, block-sparse),
* `N` Native Sparse Attention (`LMConfig.nsa`, arXiv 2502.11089).
* `H` HySparse full layer, `Y` HySparse sparse layer (`LMConfig.hysparse`): each `Y` reads
  the KV and top-k blocks of the nearest `H` before it (e.g. `"HYYY" * 2 + "H"`).
* `M` MoBA (`LMConfig.moba_block`, `LMConfig.moba_top_k`).
* `L` MLA (`LMConfig.mla`, arXiv 2405.04434), `D` DSA (`LMConfig.mla` + `LMConfig.dsa`,
  DeepSeek-V3.2 lightning indexer + top-k).
* `C` CSA, `R` HCA (DeepSeek-V4; `LMConfig.csa`, `LMConfig.hca`): compressed records
  (top-k / dense) plus an SWA branch; V4 interleaves them after two pure SWA layers,
  e.g. `"WW" + "CR" * 3`.
* `E` alpha-entmax attention (`LMConfig.entmax_alpha`; arXiv 1905.05702), `A` ASEntmax:
  entmax with a learnable length-scaled query temperature (`LMConfig.entmax_alpha`,
  `asentmax_delta`, `asentmax_learn_gamma`; arXiv 2506.16640).

e.g. `"WWWF"` is "global every 4th layer, local otherwise" (Gemma 3 is 5:1, gpt-oss 1:1).
`LAYER_KINDS` maps each letter to its layer class and the options it takes from the
`LMConfig` (a new variant is one entry). Every layer is called through its `forward`
(`sparse_jax.layers.base.AttentionLayer`), which hands the latest `shared` on.
Pre-norm blocks: RMSNorm -> attention -> residual -> RMSNorm -> SwiGLU -> residual.
The model's cache is the list of its layers' caches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_jax import patterns as P
from sparse_jax.layers import (AttentionConfig, FullAttention, PatternAttention,
                               SlidingWindowAttention, StreamingLLMAttention)
from sparse_jax.layers.hysparse import HySparseConfig, HySparseFullAttention, HySparseSparseAttention
from sparse_jax.layers.csa import CompressedAttention
from sparse_jax.layers.dsa import DSAAttention
from sparse_jax.layers.entmax import ASEntmaxAttention, EntmaxAttention
from sparse_jax.layers.mla import MLAAttention
from sparse_jax.layers.moba import MoBAAttention
from sparse_jax.layers.nsa import NSAAttention
from sparse_jax.ops.csa import CSAConfig
from sparse_jax.ops.dsa import DSAConfig
from sparse_jax.ops.entmax import check_alpha
from sparse_jax.ops.mla import MLAConfig
from sparse_jax.ops.nsa import NSAConfig
from sparse_jax.ops.rope import RopeScaling
from sparse_jax.sharding import param

@dataclasses.dataclass(frozen=True)
class LayerKind:
    """One letter of `LMConfig.layer_spec`: a readable `name`, the layer class,
    `options(config) -> dict`, the keyword arguments (besides `config.attention` and
    `rngs`) the class is built with from an `LMConfig`, and `needs`: the `(field, type)`
    pairs of `LMConfig` those options read, checked when a layer spec holds the letter."""

    name: str
    layer: type
    options: Callable[["LMConfig"], dict] = lambda config: {}
    needs: tuple = ()


# The registry: a new variant is one entry here (plus its config field on LMConfig).
LAYER_KINDS: dict[str, LayerKind] = {
    "F": LayerKind("full", FullAttention),
    "W": LayerKind("sliding window", SlidingWindowAttention, lambda c: dict(window=c.window)),
    "S": LayerKind("StreamingLLM", StreamingLLMAttention, lambda c: dict(window=c.window, num_sinks=c.num_sinks)),
    "P": LayerKind("static pattern", PatternAttention,
                   lambda c: dict(pattern=c.pattern, block_size=c.pattern_block), (("pattern", P.Pattern),)),
    "N": LayerKind("native sparse attention", NSAAttention, lambda c: dict(nsa=c.nsa), (("nsa", NSAConfig),)),
    "H": LayerKind("HySparse full", HySparseFullAttention, lambda c: dict(hysparse=c.hysparse),
                   (("hysparse", HySparseConfig),)),
    "Y": LayerKind("HySparse sparse", HySparseSparseAttention, lambda c: dict(hysparse=c.hysparse),
                   (("hysparse", HySparseConfig),)),
    "M": LayerKind("MoBA", MoBAAttention, lambda c: dict(block_size=c.moba_block, top_k=c.moba_top_k,
                                                         query_block=c.moba_query_block)),
    "L": LayerKind("MLA", MLAAttention, lambda c: dict(mla=c.mla), (("mla", MLAConfig),)),
    "D": LayerKind("DSA", DSAAttention, lambda c: dict(mla=c.mla, dsa=c.dsa), (("mla", MLAConfig), ("dsa", DSAConfig))),
    "C": LayerKind("CSA", CompressedAttention, lambda c: dict(csa=c.csa), (("csa", CSAConfig),)),
    "R": LayerKind("HCA", CompressedAttention, lambda c: dict(csa=c.hca), (("hca", CSAConfig),)),
    "E": LayerKind("alpha-entmax", EntmaxAttention, lambda c: dict(alpha=c.entmax_alpha)),
    "A": LayerKind("ASEntmax", ASEntmaxAttention,
                   lambda c: dict(alpha=c.entmax_alpha, delta=c.asentmax_delta, learn_gamma=c.asentmax_learn_gamma)),
}
LAYER_TYPES = {letter: kind.name for letter, kind in LAYER_KINDS.items()}


def hybrid_spec(num_layers: int, global_every: int) -> str:
    """Local layers with a full one every `global_every` layers, e.g. (8, 4) -> "WWWFWWWF"."""
    if num_layers < 1 or global_every < 1:
        raise ValueError(f"num_layers and global_every must be >= 1, got {num_layers}, {global_every}")
    return "".join("F" if (i + 1) % global_every == 0 else "W" for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class LMConfig:
    vocab_size: int
    layer_spec: str
    d_model: int = 64
    num_heads: int = 4
    num_kv_heads: int | None = None
    mlp_dim: int | None = None
    window: int = 64
    num_sinks: int = 4
    pattern: P.Pattern | None = None
    pattern_block: int = 64
    # NSA layers ('N'): small blocks for the demo sizes (the paper: l=32, d=16, l'=64, n=16, w=512)
    nsa: NSAConfig | None = NSAConfig(cmp_block=16, cmp_stride=8, sel_block=16, num_selected=8,
                                      window=64, query_block=16)
    # HySparse ('H', 'Y') and MoBA ('M'): small blocks for the demo sizes (paper: 64 / 1024 / 128)
    hysparse: HySparseConfig = HySparseConfig(block_size=16, top_k_tokens=64, window=64)
    moba_block: int = 16
    moba_top_k: int = 3
    moba_query_block: int = 1
    # MLA ('L', 'D') and DSA ('D'): demo sizes (paper: d_c 512, q latent 1536, 128+64 / 128;
    # indexer 64 heads x 128, top-2048)
    mla: MLAConfig = MLAConfig(kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16,
                               qk_rope_head_dim=8, v_head_dim=16)
    dsa: DSAConfig = DSAConfig(index_heads=4, index_head_dim=16, top_k=32)
    # CSA ('C') / HCA ('R'): demo sizes (V4: m=4 / 128, head 512, rope 64, indexer 64 x 128,
    # top-512, window 128; sparse_jax.ops.csa.CSAConfig() / HCA_V4)
    csa: CSAConfig = CSAConfig(ratio=4, head_dim=32, rope_dim=8, top_k=16, index_heads=4,
                               index_head_dim=16, window=16)
    hca: CSAConfig = CSAConfig(ratio=16, overlap=False, head_dim=32, rope_dim=8, top_k=None, window=16)
    # alpha-entmax ('E') and ASEntmax ('A'): alpha in [1, 2] (1 softmax, 2 sparsemax); ASEntmax's
    # query temperature delta + beta_h log(t+2)^gamma_h (learn_gamma=False: beta_h log(t+2))
    entmax_alpha: float = 1.5
    asentmax_delta: float = 1.0
    asentmax_learn_gamma: bool = True
    rope_theta: float = 10000.0
    learned_sinks: bool = False
    output_gate: bool = False
    softcap: float | None = None
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32
    # imported checkpoints (sparse_jax.models.hf): per-head width (None: d_model // num_heads),
    # q/k/v biases (Qwen2; layers F, W, S, P, M, E, A only), RMSNorm epsilon, RoPE frequency scaling
    # (Llama 3.x, YaRN, ...; layers F, W, S, P, M, E, A only)
    head_dim: int | None = None
    qkv_bias: bool = False
    norm_eps: float = 1e-6
    rope_scaling: RopeScaling | None = None

    def __post_init__(self):
        if not self.layer_spec or set(self.layer_spec) - set(LAYER_TYPES):
            raise ValueError(f"layer_spec must be letters from {sorted(LAYER_TYPES)}, got {self.layer_spec!r}")
        for letter in sorted(set(self.layer_spec)):
            for name, kind in LAYER_KINDS[letter].needs:
                if not isinstance(getattr(self, name), kind):
                    raise ValueError(f"layer_spec has {letter!r} layers but {name} is {getattr(self, name)!r}, "
                                     f"not a {kind.__name__}")
        if "Y" in self.layer_spec and "H" not in self.layer_spec[:self.layer_spec.index("Y")]:
            raise ValueError(f"layer_spec {self.layer_spec!r}: every 'Y' (HySparse sparse) layer needs an "
                             "'H' (HySparse full) layer before it")
        if set(self.layer_spec) & set("EA"):
            try:
                check_alpha(self.entmax_alpha)
            except ValueError as e:
                raise ValueError(f"layer_spec {self.layer_spec!r} has entmax layers: entmax_alpha: {e}") from None
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.qkv_bias and set(self.layer_spec) - set("FWSPMEA"):
            raise ValueError(f"qkv_bias is supported by layers F, W, S, P, M, E, A only, layer_spec is {self.layer_spec!r}")
        if self.rope_scaling is not None and set(self.layer_spec) - set("FWSPMEA"):
            raise ValueError(f"rope_scaling is supported by layers F, W, S, P, M, E, A only, layer_spec is {self.layer_spec!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        _ = self.attention  # validates heads, head_dim and the other attention settings now

    @property
    def attention(self) -> AttentionConfig:
        return AttentionConfig(d_model=self.d_model, num_heads=self.num_heads,
                               num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                               qkv_bias=self.qkv_bias, rope_theta=self.rope_theta,
                               rope_scaling=self.rope_scaling,
                               learned_sinks=self.learned_sinks, output_gate=self.output_gate,
                               softcap=self.softcap, impl=self.impl, dtype=self.dtype)


def make_attention(kind: str, config: LMConfig, rngs: nnx.Rngs):
    """The attention layer of layer-spec letter `kind` (see `LAYER_KINDS`)."""
    if kind not in LAYER_KINDS:
        raise ValueError(f"unknown layer type {kind!r}; known: {sorted(LAYER_KINDS)}")
    entry = LAYER_KINDS[kind]
    return entry.layer(config.attention, **entry.options(config), rngs=rngs)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, rngs: nnx.Rngs, eps: float = 1e-6):
        self.scale = param(rngs, nnx.initializers.ones_init(), (dim,), ("norm",))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


class SwiGLU(nnx.Module):
    def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.w_gate = param(rngs, init, (d_model, hidden), ("embed", "mlp"))
        self.w_up = param(rngs, init, (d_model, hidden), ("embed", "mlp"))
        self.w_down = param(rngs, init, (hidden, d_model), ("mlp", "embed"))

    def __call__(self, x):
        dt = x.dtype
        h = jax.nn.silu(x @ self.w_gate[...].astype(dt)) * (x @ self.w_up[...].astype(dt))
        return h @ self.w_down[...].astype(dt)


class Block(nnx.Module):
    def __init__(self, kind: str, config: LMConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config.d_model, rngs=rngs, eps=config.norm_eps)
        self.attn = make_attention(kind, config, rngs)
        self.mlp_norm = RMSNorm(config.d_model, rngs=rngs, eps=config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.mlp_dim or 4 * config.d_model, rngs=rngs)

    def __call__(self, x, positions, cache=None, shared=None):
        h, cache = self.attn(self.attn_norm(x), positions, cache, shared)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), cache

    def forward(self, x, positions, cache=None, shared=None):
        """Like `__call__`, also returning the `shared` for later layers (the attention's
        `forward`: a producer's new one, e.g. the HySparse full layer's, else the one given)."""
        h, cache, shared = self.attn.forward(self.attn_norm(x), positions, cache, shared)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), cache, shared


class SparseLM(nnx.Module):
    """Decoder-only LM: `logits, caches = model(tokens [B, T], positions [B, T], caches)`."""

    def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = param(rngs, nnx.initializers.normal(1.0), (config.vocab_size, config.d_model),
                           ("vocab", "embed"))
        self.blocks = nnx.List([Block(kind, config, rngs=rngs) for kind in config.layer_spec])
        self.final_norm = RMSNorm(config.d_model, rngs=rngs, eps=config.norm_eps)
        self.head = param(rngs, nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
                          (config.d_model, config.vocab_size), ("embed", "vocab"))

    def __call__(self, tokens, positions=None, caches=None):
        """tokens: int `[B, T]`; positions: int `[B, T]` (default arange; -1 = padding);
        caches: list per layer from `init_cache` or None. Returns logits `[B, T, V]` (f32)."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got {tokens.shape}")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(f"caches must hold one cache per layer ({len(self.blocks)}), got {len(caches)}")
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.config.dtype)
        new_caches, shared = [], None
        for i, block in enumerate(self.blocks):
            x, cache, shared = block.forward(x, positions, None if caches is None else caches[i], shared)
            new_caches.append(cache)
        logits = self.final_norm(x).astype(jnp.float32) @ self.head[...]
        return logits, (None if caches is None else new_caches)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> list:
        return [block.attn.init_cache(batch, max_len, dtype) for block in self.blocks]

    def kv_bytes_per_token(self, context_len: int, dtype=None) -> float:
        """KV-cache bytes per token of one sequence holding `context_len` tokens."""
        return sum(c.nbytes() for c in self.init_cache(1, context_len, dtype)) / context_len
