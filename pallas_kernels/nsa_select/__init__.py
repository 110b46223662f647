from pallas_kernels.nsa_select.api import nsa_select, which_backend

__all__ = ["nsa_select", "which_backend"]
