from pallas_kernels.nsa_decode.api import nsa_decode

__all__ = ["nsa_decode"]
