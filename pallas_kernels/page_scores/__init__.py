from pallas_kernels.page_scores.api import page_scores

__all__ = ["page_scores"]
