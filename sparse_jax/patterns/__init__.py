"""Mask algebra: composable predicates -> dense masks, block-sparse metadata, pictures."""

from pallas_kernels.block_sparse.metadata import BlockSparseMetadata
from sparse_jax.patterns.masks import (
    BlockBand, Causal, Chunked, DilatedWindow, Fixed, Full, GlobalTokens, Intersection, Not, Pattern,
    RandomBlocks, SameSegment, Sinks, SlidingWindow, Strided, Union, bigbird, causal_window,
    dense_mask, longformer, mask_array, sparse_transformer_fixed, sparse_transformer_strided)
from sparse_jax.patterns.metadata import block_metadata, static_block_metadata
from sparse_jax.patterns.plot import plot_pattern

__all__ = [
    "BlockBand", "BlockSparseMetadata", "Causal", "Chunked", "DilatedWindow", "Fixed", "Full",
    "GlobalTokens", "Intersection", "Not", "Pattern", "RandomBlocks", "SameSegment", "Sinks",
    "SlidingWindow", "Strided", "Union", "bigbird", "block_metadata", "causal_window",
    "dense_mask", "longformer", "mask_array", "plot_pattern", "sparse_transformer_fixed",
    "sparse_transformer_strided", "static_block_metadata",
]
