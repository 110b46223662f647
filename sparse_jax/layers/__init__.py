"""Flax NNX attention layers sharing `y, cache = layer(x, positions, cache=None, shared=None)`."""

from sparse_jax.layers.attention import (
    AttentionBase, AttentionConfig, FullAttention, LocalAttention, PatternAttention,
    SlidingWindowAttention, StreamingLLMAttention)

__all__ = ["AttentionBase", "AttentionConfig", "FullAttention", "LocalAttention",
           "PatternAttention", "SlidingWindowAttention", "StreamingLLMAttention"]
