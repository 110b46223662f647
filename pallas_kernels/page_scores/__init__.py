from pallas_kernels.page_scores.triton import PageScoresConfig, page_scores_triton

__all__ = ["PageScoresConfig", "page_scores_triton"]
