from pallas_kernels.indexer.api import indexer_topk, top_k_set

__all__ = ["indexer_topk", "top_k_set"]
