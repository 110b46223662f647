from pallas_kernels.nsa_select.api import nsa_select, selection_impl
from pallas_kernels.nsa_select.triton import supports

__all__ = ["nsa_select", "selection_impl", "supports"]
