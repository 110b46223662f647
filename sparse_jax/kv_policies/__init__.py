"""Training-free KV-cache policies for any model with full-attention layers (issue 8).

Eviction after prefill (`policies`): StreamingLLM, H2O, SnapKV, PyramidKV, Ada-KV,
DuoAttention; query-aware decode over the full cache (`decode`): Quest, top-p; InfLLM's
block retrieval over host-offloaded KV (`decode.InfLLM`, `sparse_jax.cache.offload`);
Double-P's clusters (`doublep`); verified sparse attention (`verified`): vAttention.
Given to a
model through `policy_caches`; see `apply`.
"""

from sparse_jax.cache.pooled import DenseOracleCache, PolicyPrefill, PooledKVCache
from sparse_jax.cache.quest import PageSelectCache
from sparse_jax.kv_policies.apply import managed_layers, oracle_caches, policy_caches
from sparse_jax.kv_policies.decode import InfLLM, Quest, TopP
from sparse_jax.kv_policies.doublep import DoubleP
from sparse_jax.kv_policies.verified import VAttention
from sparse_jax.kv_policies.policies import (H2O, AdaKV, DuoAttention, KVPolicy, Observation,
                                             PyramidKV, SnapKV, StreamingLLM, select)

__all__ = ["H2O", "AdaKV", "InfLLM", "DenseOracleCache", "DoubleP", "DuoAttention", "KVPolicy", "Observation",
           "PageSelectCache", "PolicyPrefill", "PooledKVCache", "PyramidKV", "Quest", "SnapKV", "StreamingLLM", "TopP",
           "VAttention", "managed_layers", "oracle_caches", "policy_caches", "select"]
