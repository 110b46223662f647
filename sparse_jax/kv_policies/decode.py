"""Query-aware decode policies over a full cache: Quest (top-k pages) and top-p pages.

Nothing is evicted: the cache is a `sparse_jax.cache.quest.PageSelectCache` (a
`QuestKVCache`: full KV plus per-page key bounds). The prompt is attended densely; each decode call (at most
`DECODE_MAX_QUERIES` queries) scores the pages by Quest's bound
(`sparse_jax.ops.quest.quest_page_scores`), selects pages, and attends to exactly those
through the `decode` op's selected-block path. What a decode step reads shrinks, not
what is held (`nbytes()` is the full cache plus the bounds).

* `Quest(budget, page_size)` (arXiv 2406.10774): `ceil(budget / page_size)` pages per kv
  head, the first and last valid pages always among them.
* `TopP(p, page_size)` (Twilight, arXiv 2502.02770): the smallest set of pages whose
  estimated mass (softmax of the bounds) reaches `p`.

`dense_layers`: the first managed layers stay dense (the paper skips two). `bounds_dtype`:
the page bounds' dtype (`QuestKVCache.init`; None: the cache's, "float8_e4m3fn": half the
bytes the scoring reads, scores still upper bounds).

* `InfLLM(...)` (arXiv 2402.04617): not a full cache but a `sparse_jax.cache.offload.
  OffloadKVCache`: sinks + local window on the device, older blocks in host memory with
  representative keys on the device; each decode call retrieves the `top_blocks` best
  blocks. What is *held on the device* shrinks; the prompt is attended densely.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from sparse_jax.cache.offload import OffloadKVCache
from sparse_jax.cache.quest import PageSelectCache, QuestKVCache
from sparse_jax.ops.quest import BOUND_CODE_DTYPES, num_pages, select_top_p, select_top_pages


@dataclasses.dataclass(frozen=True, kw_only=True)
class _PagePolicy:
    page_size: int = 16
    dense_layers: int = 0
    bounds_dtype: str | None = None

    def __post_init__(self):
        if not isinstance(self.page_size, int) or self.page_size < 1:
            raise ValueError(f"page_size must be an int >= 1, got {self.page_size!r}")
        if not isinstance(self.dense_layers, int) or self.dense_layers < 0:
            raise ValueError(f"dense_layers must be an int >= 0, got {self.dense_layers!r}")
        if self.bounds_dtype is not None and self.bounds_dtype not in BOUND_CODE_DTYPES:
            raise ValueError(f"bounds_dtype must be None or one of {BOUND_CODE_DTYPES}, got {self.bounds_dtype!r}")

    def make_cache(self, attn, layer: int, num_layers: int, batch: int, max_len: int, dtype=None):
        c = attn.config
        dtype = c.dtype if dtype is None else dtype
        quest = QuestKVCache.init(batch, max_len, c.num_kv_heads, c.head_dim, page_size=self.page_size, dtype=dtype,
                                  bounds_dtype=self.bounds_dtype)
        selected = jnp.zeros((batch, c.num_kv_heads, num_pages(max_len, self.page_size)), bool)
        return PageSelectCache(quest, selected, self, layer < self.dense_layers)


@dataclasses.dataclass(frozen=True)
class Quest(_PagePolicy):
    """Top `ceil(budget / page_size)` pages per kv head by Quest's bound."""

    budget: int

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.budget, int) or self.budget < 1:
            raise ValueError(f"budget must be an int >= 1, got {self.budget!r}")

    def select(self, scores, valid):
        return select_top_pages(scores, -(-self.budget // self.page_size), valid)


@dataclasses.dataclass(frozen=True)
class TopP(_PagePolicy):
    """The fewest pages whose estimated attention mass reaches `p`."""

    p: float

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.p <= 1.0:
            raise ValueError(f"p must lie in (0, 1], got {self.p!r}")

    def select(self, scores, valid):
        return select_top_p(scores, self.p, valid)


@dataclasses.dataclass(frozen=True, kw_only=True)
class InfLLM:
    """InfLLM's context memory over host-offloaded KV (`OffloadKVCache`; defaults: the
    paper's Mistral setting, check): `num_sinks` initial tokens, a local `window`, memory
    blocks of `block_size` tokens each represented by the mean of its `num_repr` most
    attended keys, `top_blocks` blocks retrieved per decode call. `memory_kind`:
    "pinned_host", "device" (no offload), None: host memory where the device has it."""

    window: int = 4096
    block_size: int = 128
    num_sinks: int = 128
    num_repr: int = 4
    top_blocks: int = 16
    memory_kind: str | None = None

    def __post_init__(self):
        for name in ("window", "block_size", "num_repr", "top_blocks"):
            x = getattr(self, name)
            if not isinstance(x, int) or isinstance(x, bool) or x < 1:
                raise ValueError(f"{name} must be an int >= 1, got {x!r}")
        if not isinstance(self.num_sinks, int) or self.num_sinks < 0:
            raise ValueError(f"num_sinks must be an int >= 0, got {self.num_sinks!r}")
        if self.memory_kind not in (None, "pinned_host", "device"):
            raise ValueError(f"memory_kind must be None, 'pinned_host' or 'device', got {self.memory_kind!r}")

    def make_cache(self, attn, layer: int, num_layers: int, batch: int, max_len: int, dtype=None):
        c = attn.config
        return OffloadKVCache.init(batch, max_len, c.num_kv_heads, c.head_dim, num_heads=c.num_heads,
                                   window=self.window, block_size=self.block_size, num_sinks=self.num_sinks,
                                   num_repr=self.num_repr, top_blocks=self.top_blocks,
                                   dtype=c.dtype if dtype is None else dtype, memory_kind=self.memory_kind)
