from pallas_kernels.nsa_decode.api import nsa_decode, which_backend

__all__ = ["nsa_decode", "which_backend"]
