"""Give a policy to a model: the list of per-layer caches that applies it.

    caches = policy_caches(model, SnapKV(budget=64), batch=B, prompt_len=T, max_new=16)
    logits, caches = model(prompt, positions, caches)      # dense prefill, then compression
    logits, caches = model(next_token, next_position, caches)   # decode over the kept KV

Policies manage the full-attention layers (`LocalAttention` without a window, RoPE at text
positions: `SparseLM`'s 'F' layers and the layers of imported checkpoints); every other
layer gets its own `init_cache`. The model code is untouched: the caches follow the one
cache contract (`sparse_jax.cache.base.Cache`; `AttentionBase.attend_cached` attends).
"""

from __future__ import annotations

from sparse_jax.cache.pooled import DenseOracleCache, PolicyPrefill
from sparse_jax.kv_policies.policies import KVPolicy
from sparse_jax.layers.attention import LocalAttention


def managed_layers(model) -> list[int]:
    """Indices of the blocks whose attention a policy manages (full causal attention)."""
    return [i for i, block in enumerate(model.blocks)
            if isinstance(block.attn, LocalAttention) and block.attn.window is None
            and block.attn.rope_mode == "text"]


def policy_caches(model, policy, *, batch: int, prompt_len: int, max_new: int, dtype=None) -> list:
    """Caches of `model` (a `SparseLM`-like module with `.blocks[i].attn`) under `policy`:
    a `KVPolicy` (eviction after prefill) or a decode-time policy (`Quest`, `TopP`, `DoubleP`:
    anything with `make_cache`). `max_new`: tokens decoded after the prompt."""
    if not isinstance(prompt_len, int) or prompt_len < 1 or not isinstance(max_new, int) or max_new < 0:
        raise ValueError(f"prompt_len must be an int >= 1 and max_new an int >= 0, got {prompt_len}, {max_new}")
    managed = managed_layers(model)
    if not managed:
        raise ValueError("policy: the model has no full-attention layer to manage")
    caches = [block.attn.init_cache(batch, prompt_len + max_new, dtype) for block in model.blocks]
    for rank, i in enumerate(managed):
        if isinstance(policy, KVPolicy):
            caches[i] = PolicyPrefill(policy, rank, len(managed), max_new)
        elif hasattr(policy, "make_cache"):
            caches[i] = policy.make_cache(model.blocks[i].attn, rank, len(managed), batch,
                                          prompt_len + max_new, dtype)
        else:
            raise ValueError(f"policy must be a KVPolicy or define make_cache, got {type(policy).__name__}")
    return caches


def oracle_caches(model, *, batch: int, max_len: int, dtype=None) -> list:
    """Dense caches recording the last query's attention in every managed layer."""
    caches = [block.attn.init_cache(batch, max_len, dtype) for block in model.blocks]
    for i in managed_layers(model):
        c = model.blocks[i].attn.config
        caches[i] = DenseOracleCache.init(batch, max_len, c.num_kv_heads, c.num_heads, c.head_dim,
                                          dtype=c.dtype if dtype is None else dtype)
    return caches
