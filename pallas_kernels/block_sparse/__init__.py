from pallas_kernels.block_sparse.api import block_sparse_attention
from pallas_kernels.block_sparse.metadata import BlockSparseMetadata

__all__ = ["BlockSparseMetadata", "block_sparse_attention"]
