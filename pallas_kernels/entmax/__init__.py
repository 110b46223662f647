"""alpha-entmax attention (sparse, exact zeros): `entmax_attention` (see `api.py`)."""

from pallas_kernels.entmax.api import entmax_attention

__all__ = ["entmax_attention"]
