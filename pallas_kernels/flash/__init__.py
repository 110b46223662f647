from pallas_kernels.flash.api import flash_attention

__all__ = ["flash_attention"]
