"""Double-P (arXiv 2602.05191) as a training-free decode policy for any model's
full-attention layers (`policy_caches(model, DoubleP(0.9), ...)`).

The prompt is attended densely and its keys are clustered per layer, row and kv head
(k-means, `cluster_size` tokens per cluster on average, `iters` Lloyd iterations); each
decode step attends exactly to the tokens of the clusters carrying the top `top_p` of the
estimated attention mass and to one weighted centroid for each other cluster
(`sparse_jax.cache.doublep`). `dense_layers`: the first managed layers stay dense.
"""

from __future__ import annotations

import dataclasses

from sparse_jax.cache.doublep import DoublePPrefill


@dataclasses.dataclass(frozen=True)
class DoubleP:
    """top_p in (0, 1]: the clusters carrying the top `top_p` of the estimated mass are
    read token by token (1: every cluster, the dense result); keep_p in [top_p, 1]: the
    clusters past the top `keep_p` are dropped, the others approximated by their
    centroid (1: none dropped); cluster_size >= 1 (prompt tokens per cluster on average:
    `C = ceil(T / cluster_size)`); iters >= 0 Lloyd iterations; dense_layers >= 0."""

    top_p: float = 0.9
    keep_p: float = 1.0
    cluster_size: int = 16
    iters: int = 4
    dense_layers: int = 0

    def __post_init__(self):
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if (isinstance(self.keep_p, bool) or not isinstance(self.keep_p, (int, float))
                or not self.top_p <= self.keep_p <= 1.0):
            raise ValueError(f"keep_p must lie in [top_p, 1] = [{self.top_p}, 1], got {self.keep_p!r}")
        for name in ("cluster_size", "iters", "dense_layers"):
            lo = 1 if name == "cluster_size" else 0
            x = getattr(self, name)
            if isinstance(x, bool) or not isinstance(x, int) or x < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {x!r}")

    def make_cache(self, attn, layer: int, num_layers: int, batch: int, max_len: int, dtype=None):
        """The layer's cache: its own dense one for the first `dense_layers`, else a
        `DoublePPrefill` (the prompt call clusters)."""
        del num_layers
        if layer < self.dense_layers:
            return attn.init_cache(batch, max_len, dtype)
        return DoublePPrefill(self, max_len, dtype)
