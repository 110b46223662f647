from pallas_kernels.mla_decode.api import mla_decode, mla_sparse_attention

__all__ = ["mla_decode", "mla_sparse_attention"]
