"""Flax NNX attention layers sharing `y, cache = layer(x, positions, cache=None, shared=None)`."""

from sparse_jax.layers.attention import (
    AttentionBase, AttentionConfig, FullAttention, LocalAttention, PatternAttention,
    SlidingWindowAttention, StreamingLLMAttention)
from sparse_jax.layers.hysparse import HySparseFullAttention, HySparseSparseAttention
from sparse_jax.layers.moba import MoBAAttention
from sparse_jax.layers.nsa import NSAAttention

__all__ = ["AttentionBase", "AttentionConfig", "FullAttention", "HySparseFullAttention",
           "HySparseSparseAttention", "LocalAttention", "MoBAAttention", "NSAAttention",
           "PatternAttention", "SlidingWindowAttention", "StreamingLLMAttention"]
