"""Training-free KV-cache eviction policies: which prompt entries each KV head keeps.

A policy looks at one layer's prefill (`Observation`: rotated queries and keys with their
positions) and returns, per (batch, kv head, key slot), a non-negative `score` and a
`forced` flag (kept whatever the score: sinks, the recent window). `select` turns that into
kept slots under the policy's budgets; the layer math is unchanged. Policies compose the
way kvpress's presses do: `AdaKV(SnapKV(...))` is Ada-SnapKV, `AdaKV(PyramidKV(...))` works
too.

* `StreamingLLM` (arXiv 2309.17453): `num_sinks` first tokens + the most recent ones.
* `H2O` (arXiv 2306.14048): heavy hitters by attention accumulated (summed, or with
  `normalize=True` averaged) over all prompt queries + recent tokens (`recent_ratio`).
* `SnapKV` (arXiv 2404.14469): the last `window` prompt queries' attention to the keys
  before the window, summed and pooled along keys (`kernel`), picks the top keys per
  head; the window is kept.
* `PyramidKV` (arXiv 2406.02069): SnapKV with budgets decreasing linearly from the first
  to the last layer (mean = `budget`), the window kept in every layer.
* `AdaKV` (arXiv 2407.11550): one top-(sum of head budgets) over all heads of a layer, so
  heads get different budgets; each head keeps at least `floor` of its uniform share.
* `DuoAttention` (arXiv 2410.10819): retrieval heads (`retrieval [layers][kv heads]` bools,
  from `sparse_jax.kv_policies.duo.calibrate`) keep everything, streaming heads keep sinks
  + recent tokens.

`budget` is in tokens per kv head per layer (at the prompt's end; decode appends to it).
A budget >= the prompt length keeps every entry in every layer and head: dense attention,
exactly (up to the order of float sums).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import masked_attention


@dataclasses.dataclass(frozen=True)
class Observation:
    """One layer's prefill: `q [B, T, H, D]` (RoPE applied), `k [B, S, Hkv, D]`,
    `q_positions [B, T]`, `kv_positions [B, S]` (-1 = padding), the layer's `softcap`
    and `sink_logits [H]` (or None)."""

    q: jax.Array
    k: jax.Array
    q_positions: jax.Array
    kv_positions: jax.Array
    softcap: float | None = None
    sink_logits: jax.Array | None = None

    @property
    def newest(self):
        """`[B, 1]` the last prompt position of each row."""
        return self.kv_positions.max(axis=1, keepdims=True)

    def recent(self, n: int):
        """bool `[B, 1, S]`: the `n` most recent valid key positions of each row."""
        return ((self.kv_positions > self.newest - n) & (self.kv_positions >= 0))[:, None]

    def attention_mass(self, last_queries: int | None = None, per_query: bool = False):
        """`[B, Hkv, S]`: causal softmax attention summed over the query heads of each kv
        head and over the `last_queries` most recent queries (None: all queries).

        `per_query=True` divides each key's sum by the number of those queries that see it
        (kvpress's ObservedAttentionPress): a mean over the queries instead of a sum, so
        early keys are not favoured just for being seen by more queries."""
        qp, kp = self.q_positions, self.kv_positions
        visible = (qp[:, :, None] >= kp[:, None, :]) & (kp[:, None, :] >= 0) & (qp[:, :, None] >= 0)
        scale = 1.0 / np.sqrt(self.q.shape[-1])
        _, probs, _ = masked_attention(self.q, self.k, self.k, visible, scale=scale,
                                       sink_logits=self.sink_logits, softcap=self.softcap)
        rows = qp >= 0
        if last_queries is not None:
            rows &= qp > qp.max(axis=1, keepdims=True) - last_queries
        probs = probs * rows[:, None, None, :, None]                  # [B, Hkv, G, T, S]
        mass = probs.sum(axis=(2, 3))
        if per_query:
            seen_by = (visible & rows[:, :, None]).sum(axis=1)            # [B, S]
            mass = mass / jnp.maximum(seen_by, 1)[:, None, :]
        return mass


class KVPolicy:
    """Base of the eviction policies (frozen dataclasses holding `budget`: tokens per kv
    head per layer); subclasses define `scores` and may override `head_budgets`."""

    budget: int
    head_adaptive = False      # AdaKV: one selection over all heads of a layer
    floor = 0.0                # AdaKV: least share of a head's uniform budget

    def __post_init__(self):
        if not isinstance(self.budget, int) or self.budget < 1:
            raise ValueError(f"budget must be an int >= 1, got {self.budget!r}")

    def scores(self, obs: Observation, layer: int, num_layers: int):
        """-> (`score [B, Hkv, S]` >= 0, `forced` bool broadcastable to it)."""
        raise NotImplementedError

    def head_budgets(self, layer: int, num_layers: int, num_kv_heads: int) -> np.ndarray:
        """int `[Hkv]`: tokens kept per kv head in `layer` (before clipping to the prompt)."""
        return np.full(num_kv_heads, self.budget, np.int64)


@dataclasses.dataclass(frozen=True)
class StreamingLLM(KVPolicy):
    """Sinks (the first `num_sinks` positions) + the most recent `budget - num_sinks`."""

    budget: int
    num_sinks: int = 4

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.num_sinks <= self.budget:
            raise ValueError(f"num_sinks must lie in [0, budget={self.budget}], got {self.num_sinks}")

    def scores(self, obs, layer, num_layers):
        sinks = ((obs.kv_positions < self.num_sinks) & (obs.kv_positions >= 0))[:, None]
        return jnp.zeros(obs.k.shape[:1] + obs.k.shape[2:3] + obs.k.shape[1:2]), \
            sinks | obs.recent(self.budget - self.num_sinks)


@dataclasses.dataclass(frozen=True)
class H2O(KVPolicy):
    """Heavy hitters (accumulated attention of all prompt queries) + `recent_ratio` of the
    budget as recent tokens (the paper: 50/50).

    `normalize=False` (default) is what H2O (arXiv 2306.14048) and its code do: a key's
    score is the attention it received *summed* over the queries (the code's division by
    the count is commented out). `normalize=True` divides each key's sum by the number of
    prompt queries that see it (causally `newest - position + 1`), as kvpress's
    ObservedAttentionPress does; this removes the sum's bias toward early keys.
    """

    budget: int
    recent_ratio: float = 0.5
    normalize: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"recent_ratio must lie in [0, 1], got {self.recent_ratio}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be a bool, got {self.normalize!r}")

    def scores(self, obs, layer, num_layers):
        return (obs.attention_mass(per_query=self.normalize),
                obs.recent(int(round(self.budget * self.recent_ratio))))


def _pool(x, kernel: int, pooling: str):
    """Pool `x [B, Hkv, S]` along S with a centred window of `kernel` (same length)."""
    if kernel == 1:
        return x
    pad = ((0, 0), (0, 0), (kernel // 2, (kernel - 1) // 2))
    if pooling == "max":
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, kernel), (1, 1, 1), pad)
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 1, kernel), (1, 1, 1), pad) / kernel


@dataclasses.dataclass(frozen=True)
class SnapKV(KVPolicy):
    """Observation `window` of the last prompt queries; their attention summed over the
    window (and the query heads of a kv head), pooled with `kernel` ("avg" | "max"), picks
    the kept keys; the window itself is kept (`min(window, budget)` of it).

    As in the paper's code (arXiv 2404.14469, and kvpress): the softmax runs over all keys,
    then only the columns of the keys *before* the window (`attn[..., -w:, :-w]`) are
    pooled, so the window keys' own mass never leaks into the scores of the keys next to
    them (pooling sees zeros past the prefix, as torch's zero-padded `avg_pool1d`). The
    window keys are forced and score 0, so AdaKV's `floor` is spent on prefix keys.
    """

    budget: int
    window: int = 32
    kernel: int = 7
    pooling: str = "avg"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an int >= 1, got {self.window!r}")
        if not isinstance(self.kernel, int) or self.kernel < 1:
            raise ValueError(f"kernel must be an int >= 1, got {self.kernel!r}")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be 'avg' or 'max', got {self.pooling!r}")

    def scores(self, obs, layer, num_layers):
        window = min(self.window, int(self.head_budgets(layer, num_layers, 1).min()))
        in_window = obs.recent(window)                                  # [B, 1, S]
        prefix_mass = jnp.where(in_window, 0.0, obs.attention_mass(last_queries=window))
        return jnp.where(in_window, 0.0, _pool(prefix_mass, self.kernel, self.pooling)), in_window


@dataclasses.dataclass(frozen=True)
class PyramidKV(SnapKV):
    """SnapKV with per-layer budgets: beyond the window, `budget - window` on average,
    falling linearly from `2 e - e / beta` (first layer) to `e / beta` (last layer),
    `e = budget - window`; the budgets of all layers sum to `num_layers * budget`."""

    beta: int = 20

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.beta, int) or self.beta < 1:
            raise ValueError(f"beta must be an int >= 1, got {self.beta!r}")

    def layer_budgets(self, num_layers: int) -> np.ndarray:
        """int `[num_layers]`, summing to `num_layers * budget`."""
        window = min(self.window, self.budget)
        extra = self.budget - window
        lo = extra / self.beta
        hi = 2 * extra - lo
        ideal = np.linspace(hi, lo, num_layers) if num_layers > 1 else np.array([float(extra)])
        out = np.floor(ideal).astype(np.int64)
        short = num_layers * extra - out.sum()
        out[np.argsort(-(ideal - out), kind="stable")[:short]] += 1   # largest remainders first
        return out + window

    def head_budgets(self, layer, num_layers, num_kv_heads):
        return np.full(num_kv_heads, self.layer_budgets(num_layers)[layer], np.int64)


@dataclasses.dataclass(frozen=True)
class AdaKV(KVPolicy):
    """Head-adaptive budgets over `inner`'s scores and budgets: one top-(sum of the head
    budgets) over all kv heads of a layer, each head keeping at least `floor` of its
    uniform share. `AdaKV(SnapKV(...))` is Ada-SnapKV."""

    inner: KVPolicy
    floor: float = 0.2
    head_adaptive = True

    def __post_init__(self):
        if not isinstance(self.inner, KVPolicy) or isinstance(self.inner, AdaKV):
            raise ValueError(f"inner must be a (non-Ada) KVPolicy, got {self.inner!r}")
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"floor must lie in [0, 1], got {self.floor}")

    @property
    def budget(self) -> int:
        return self.inner.budget

    def scores(self, obs, layer, num_layers):
        return self.inner.scores(obs, layer, num_layers)

    def head_budgets(self, layer, num_layers, num_kv_heads):
        return self.inner.head_budgets(layer, num_layers, num_kv_heads)


@dataclasses.dataclass(frozen=True)
class DuoAttention(KVPolicy):
    """Retrieval heads keep the full prompt; streaming heads keep `num_sinks` sinks + the
    most recent `budget - num_sinks` tokens. `retrieval`: tuple per layer of tuples of
    bools per kv head (from `duo.calibrate`)."""

    budget: int
    retrieval: tuple = ()
    num_sinks: int = 4

    def __post_init__(self):
        super().__post_init__()
        if not self.retrieval or not all(isinstance(r, tuple) and r for r in self.retrieval):
            raise ValueError(f"retrieval must be a non-empty tuple (per layer) of tuples of bools "
                             f"(per kv head), got {self.retrieval!r}")
        if not 0 <= self.num_sinks <= self.budget:
            raise ValueError(f"num_sinks must lie in [0, budget={self.budget}], got {self.num_sinks}")

    FULL = 2 ** 31 - 1          # budget of a retrieval head: everything

    def _gates(self, layer, num_layers, num_kv_heads):
        if len(self.retrieval) != num_layers or len(self.retrieval[layer]) != num_kv_heads:
            raise ValueError(f"retrieval has {len(self.retrieval)} layers x {len(self.retrieval[0])} "
                             f"kv heads, the model {num_layers} x {num_kv_heads}")
        return np.asarray(self.retrieval[layer], bool)

    def scores(self, obs, layer, num_layers):
        gates = jnp.asarray(self._gates(layer, num_layers, obs.k.shape[2]))
        score, forced = StreamingLLM(self.budget, self.num_sinks).scores(obs, layer, num_layers)
        return score, forced | gates[None, :, None]

    def head_budgets(self, layer, num_layers, num_kv_heads):
        return np.where(self._gates(layer, num_layers, num_kv_heads), self.FULL, self.budget)


def select(policy: KVPolicy, obs: Observation, layer: int, num_layers: int):
    """Kept slots of one layer: `(slot [B, N], head [B, N])` int32, N static.

    Per head the top `min(budget_h, S)` entries by (forced first, then score); with
    `policy.head_adaptive` the top `sum_h budget_h` over all heads (each head's top
    `floor * budget_h` forced). Padding keys rank last; if a row has fewer valid keys
    than the budget, padding slots fill it (their position is -1, never attended).
    """
    b, s, hkv, _ = obs.k.shape
    score, forced = policy.scores(obs, layer, num_layers)
    score = jnp.broadcast_to(score.astype(jnp.float32), (b, hkv, s))
    forced = jnp.broadcast_to(forced, (b, hkv, s))
    valid = (obs.kv_positions >= 0)[:, None, :]
    budgets = np.minimum(policy.head_budgets(layer, num_layers, hkv), s)
    if policy.budget >= s:                    # (PyramidKV: whatever its per-layer split)
        budgets = np.full(hkv, s)
    top = jnp.max(jnp.where(valid, score, 0.0), axis=(1, 2), keepdims=True)
    norm = jnp.where(top > 0, score / jnp.where(top > 0, top, 1.0), 0.0)          # [0, 1]
    recency = obs.kv_positions[:, None, :] / (obs.newest[:, None] + 1.0)           # [0, 1)
    if policy.head_adaptive and policy.floor > 0:
        k_floor = int(np.floor(policy.floor * budgets.min()))
        if k_floor:
            _, idx = jax.lax.top_k(jnp.where(valid, norm, -1.0), k_floor)
            forced |= jnp.zeros((b, hkv, s), bool).at[
                jnp.arange(b)[:, None, None], jnp.arange(hkv)[None, :, None], idx].set(True)
    rank = jnp.where(forced, 2.0 + recency, norm)
    rank = jnp.where(valid, rank, -1.0)
    if policy.head_adaptive:
        _, idx = jax.lax.top_k(rank.reshape(b, hkv * s), int(budgets.sum()))
        return (idx % s).astype(jnp.int32), (idx // s).astype(jnp.int32)
    _, idx = jax.lax.top_k(rank, int(budgets.max()))                               # [B, Hkv, kmax]
    heads = np.concatenate([np.full(n, h) for h, n in enumerate(budgets)])
    cols = np.concatenate([np.arange(n) for n in budgets])
    return idx[:, heads, cols].astype(jnp.int32), jnp.broadcast_to(jnp.asarray(heads, jnp.int32), (b, heads.size))
