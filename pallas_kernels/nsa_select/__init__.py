from pallas_kernels.nsa_select.api import nsa_select, select_from_importance, which_backend

__all__ = ["nsa_select", "select_from_importance", "which_backend"]
