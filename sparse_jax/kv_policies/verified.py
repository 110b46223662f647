"""vAttention (verified sparse attention, arXiv 2510.05688) as a training-free decode policy.

Nothing is evicted: the cache is a `sparse_jax.cache.verified.VerifiedKVCache` (a full KV
cache plus a PRNG key). The prompt is attended densely; each decode call reads, per kv head,
the sinks, the local window and the top-k keys exactly, plus a uniform sample of the other
keys weighted by `n_rest / n_sample`, with the sample size chosen from `(epsilon, delta)`
(`sparse_jax.ops.verified`, whose docstring states the bound). What a step reads shrinks,
not what is held (`nbytes()` is the full cache).

    caches = policy_caches(model, VAttention(epsilon=0.05, delta=0.05), batch=B, prompt_len=T,
                           max_new=16)

Works on any `SparseLM` full-attention layer and imported checkpoints (`kv_policies.apply`).
"""

from __future__ import annotations

import dataclasses

from sparse_jax.cache.verified import VerifiedKVCache
from sparse_jax.ops.verified import check_config, check_tolerance


@dataclasses.dataclass(frozen=True, kw_only=True)
class VAttention:
    """vAttention's hyperparameters (names of the paper's code: sink / local / heavy sizes,
    `base_rate_sampling`, `epsilon`, `delta`).

    epsilon in [0, 1), delta in (0, 1): the stated bound (`mode` "output": relative L2 error
    of each head's attention output <= epsilon with probability >= 1 - delta; "denominator":
    the paper's relaxation, the softmax denominator only). num_sinks, window (>= 1), top_k:
    the deterministic keys. base_samples (>= 2), base_rate: the base sample that estimates
    the variance (`estimate="sample"`); `estimate="exact"` uses every residual key (oracle).
    seed: the PRNG seed (layer l samples from `fold_in(key(seed), l)`). dense_layers: the
    first managed layers stay dense.
    """

    epsilon: float = 0.05
    delta: float = 0.05
    num_sinks: int = 4
    window: int = 16
    top_k: int = 16
    base_samples: int = 2
    base_rate: float = 0.05
    mode: str = "output"
    estimate: str = "sample"
    seed: int = 0
    dense_layers: int = 0

    def __post_init__(self):
        check_tolerance(self.epsilon, self.delta, self.mode)
        check_config(self.num_sinks, self.window, self.top_k, self.base_samples, self.base_rate, self.estimate)
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if not isinstance(self.dense_layers, int) or self.dense_layers < 0:
            raise ValueError(f"dense_layers must be an int >= 0, got {self.dense_layers!r}")

    def selection_kwargs(self) -> dict:
        """Keyword arguments of `sparse_jax.ops.verified.verified_selection`."""
        return dict(epsilon=self.epsilon, delta=self.delta, num_sinks=self.num_sinks, window=self.window,
                    top_k=self.top_k, base_samples=self.base_samples, base_rate=self.base_rate, mode=self.mode,
                    estimate=self.estimate)

    def make_cache(self, attn, layer: int, num_layers: int, batch: int, max_len: int, dtype=None):
        del num_layers
        c = attn.config
        dtype = c.dtype if dtype is None else dtype
        return VerifiedKVCache.init(batch, max_len, c.num_kv_heads, c.head_dim, self, seed=self.seed, layer=layer,
                                    dtype=dtype, dense=layer < self.dense_layers)
