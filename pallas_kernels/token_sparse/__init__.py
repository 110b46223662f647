from pallas_kernels.token_sparse.api import token_sparse_attention

__all__ = ["token_sparse_attention"]
