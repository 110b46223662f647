"""Flax NNX attention layers sharing `y, cache = layer(x, positions, cache=None, shared=None)`."""

from sparse_jax.layers.attention import (
    AttentionBase, AttentionConfig, FullAttention, LocalAttention, PatternAttention,
    SlidingWindowAttention, StreamingLLMAttention)
from sparse_jax.layers.csa import CompressedAttention
from sparse_jax.layers.dsa import DSAAttention
from sparse_jax.layers.entmax import ASEntmaxAttention, EntmaxAttention
from sparse_jax.layers.hysparse import HySparseFullAttention, HySparseSparseAttention
from sparse_jax.layers.mla import MLAAttention
from sparse_jax.layers.moba import MoBAAttention
from sparse_jax.layers.nsa import NSAAttention

__all__ = ["ASEntmaxAttention", "AttentionBase", "AttentionConfig", "CompressedAttention", "DSAAttention",
           "EntmaxAttention", "FullAttention",
           "HySparseFullAttention", "HySparseSparseAttention", "LocalAttention", "MLAAttention",
           "MoBAAttention", "NSAAttention",
           "PatternAttention", "SlidingWindowAttention", "StreamingLLMAttention"]
