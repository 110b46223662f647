from pallas_kernels.nsa_decode.api import nsa_decode, resolved_impl, supports

__all__ = ["nsa_decode", "resolved_impl", "supports"]
