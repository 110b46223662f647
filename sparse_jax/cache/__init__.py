"""KV-cache pytrees, one module per family (the contract: `sparse_jax.cache.base.Cache`).

* `kv`: `FullKVCache` (slot = position), `RollingKVCache` (sinks + rolling window);
* `nsa`: `NSACache`, `CompressedKV` (Native Sparse Attention's per-branch stores);
* `mla`: `MLACache`, `DSACache` (latent KV, plus the lightning indexer's keys);
* `csa`: `CSACache`, `SWACache` (DeepSeek-V4's compressed records, tail and SWA keys);
* `quest`: `QuestKVCache` (full KV + per-page key bounds);
* `pooled`: `PooledKVCache`, `PolicyPrefill`, `DenseOracleCache` (training-free policies);
* `offload`: `OffloadKVCache` (InfLLM: sinks + window on device, blocks in host memory);
* `doublep`: `DoublePCache`, `DoublePPrefill` (full KV + the prompt's k-means clusters);
* `hysparse`: `HySparseSparseCache` (a HySparse sparse layer's own SWA KV);
* `verified`: `VerifiedKVCache` (full KV + a PRNG key: vAttention's weighted samples).
"""

from sparse_jax.cache.base import Cache
from sparse_jax.cache.kv import FullKVCache, RollingKVCache

__all__ = ["Cache", "FullKVCache", "RollingKVCache"]
