from pallas_kernels.compressed.api import compressed_attention

__all__ = ["compressed_attention"]
