"""alpha-entmax attention layers (Flax NNX), with the one interface

    y, cache = layer(x, positions, cache=None, shared=None)

* `EntmaxAttention`: causal MHA / GQA whose probabilities are alpha-entmax of the scores
  (Peters, Niculae & Martins 2019, arXiv 1905.05702; Correia et al. 2019, arXiv
  1909.00015): irrelevant keys get exactly zero weight. `alpha=1` is softmax (the same
  layer as `FullAttention`, through `flash`), 1.5 the common choice, 2 sparsemax.
* `ASEntmaxAttention`: the same with ASEntmax's learnable, length-scaled query temperature
  `delta + beta_h * log(t + 2) ** gamma_h` per head (Vasylenko et al., "Long-Context
  Generalization with Sparse Attention", arXiv 2506.16640; see `sparse_jax.ops.entmax`).

Both keep a full KV cache (slot = position); decode equals prefill. The math is in
`sparse_jax.ops.entmax`; the kernels in `pallas_kernels.entmax`.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from sparse_jax.cache.kv import FullKVCache
from sparse_jax.layers.attention import AttentionBase, AttentionConfig
from sparse_jax.ops import entmax as ops
from sparse_jax.sharding import param


class EntmaxAttention(AttentionBase):
    """Causal alpha-entmax attention with the `AttentionConfig` options (RoPE, GQA, output
    gate; learned sinks and soft-cap only with `alpha=1`).

    alpha: in [1, 2]; 1 = softmax, 1.5 = entmax15 (default), 2 = sparsemax.
    """

    def __init__(self, config: AttentionConfig, *, alpha: float = 1.5, rngs: nnx.Rngs):
        alpha = ops.check_alpha(alpha)
        if alpha != 1.0 and (config.learned_sinks or config.softcap is not None):
            raise ValueError(f"alpha={alpha}: learned_sinks and softcap are softmax options; "
                             "entmax attention takes neither")
        super().__init__(config, rngs=rngs)
        self.alpha = alpha

    def attend(self, q, k, v, q_positions, kv_positions, *, sink_logits, q_raw, decoding):
        c = self.config
        return ops.entmax_attention(q, k, v, q_positions, kv_positions, alpha=self.alpha,
                                    decoding=decoding, sink_logits=sink_logits, softcap=c.softcap,
                                    impl=c.impl)

    def init_cache(self, batch: int, max_len: int, dtype=None):
        c = self.config
        return FullKVCache.init(batch, max_len, c.num_kv_heads, c.head_dim,
                                dtype=c.dtype if dtype is None else dtype)


class ASEntmaxAttention(EntmaxAttention):
    """`EntmaxAttention` whose queries are scaled by `delta + beta_h * log(t + 2) ** gamma_h`
    (t: the query's position) before the scores: ASEntmax (arXiv 2506.16640).

    alpha: as `EntmaxAttention` (the paper: 1.5). delta: fixed offset (the authors' code: 1).
    learn_gamma: False drops `gamma` and `delta`: `beta_h * log(t + 2)`, the Scalable-Softmax
    form (arXiv 2501.19399). Parameters `beta [H]` (init uniform(0.1, 1)) and `gamma [H]`
    (init normal(0, 0.1)) as in the authors' code; with `learn_gamma=False` `beta` starts
    at normal(1, 0.01).
    """

    def __init__(self, config: AttentionConfig, *, alpha: float = 1.5, delta: float = 1.0,
                 learn_gamma: bool = True, rngs: nnx.Rngs):
        if isinstance(delta, bool) or not isinstance(delta, (int, float)):
            raise ValueError(f"delta must be a number, got {delta!r}")
        super().__init__(config, alpha=alpha, rngs=rngs)
        h, pd = config.num_heads, config.param_dtype
        if learn_gamma:
            beta_init = lambda key, shape, dtype: jnp.asarray(
                nnx.initializers.uniform(0.9)(key, shape, dtype) + 0.1, dtype)
            self.beta = param(rngs, beta_init, (h,), ("heads",), pd)
            self.gamma = param(rngs, nnx.initializers.normal(0.1), (h,), ("heads",), pd)
        else:
            beta_init = lambda key, shape, dtype: jnp.asarray(
                1.0 + nnx.initializers.normal(0.01)(key, shape, dtype), dtype)
            self.beta = param(rngs, beta_init, (h,), ("heads",), pd)
            self.gamma = None
        self.delta = float(delta)

    def scale_queries(self, q, positions):
        gamma = None if self.gamma is None else self.gamma[...]
        scale = ops.asentmax_scale(positions, self.beta[...], gamma, self.delta)      # [B, T, H]
        return (q.astype(jnp.float32) * scale[..., None]).astype(q.dtype)
