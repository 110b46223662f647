"""KV-cache policies (sparse_jax.kv_policies): dense at full budget, hand-built kept sets,
SnapKV / H2O scores against the paper's steps and kvpress's goldens, budgets honoured,
pooled decode against a masked reference, DuoAttention calibration."""

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels.common import masked_attention
from sparse_jax.cache.kv import FullKVCache
from sparse_jax.kv_policies import (H2O, AdaKV, DuoAttention, InfLLM, Observation, PolicyPrefill, PyramidKV,
                                    Quest, SnapKV, StreamingLLM, TopP, policy_caches, select)
from sparse_jax.cache.pooled import compress
from sparse_jax.kv_policies.duo import calibrate, gates_from_losses, streaming_loss
from sparse_jax.layers import AttentionConfig, FullAttention
from sparse_jax.models.lm import LMConfig, SparseLM

from policy_testing import generate, policy_model, ragged_batch

T, NEW = 11, 2
ALL_POLICIES = {
    "streaming": StreamingLLM(16, num_sinks=2),
    "h2o": H2O(16),
    "snapkv": SnapKV(16, window=4, kernel=3),
    "pyramidkv": PyramidKV(16, window=4),
    "ada_snapkv": AdaKV(SnapKV(16, window=4)),
    "duo": DuoAttention(16, retrieval=((True, False), (False, False)), num_sinks=2),
    "quest": Quest(16, page_size=4),
    "quest_fp8_bounds": Quest(16, page_size=4, bounds_dtype="float8_e4m3fn"),
    "top_p": TopP(1.0, page_size=4),
    "infllm": InfLLM(window=3, block_size=4, num_sinks=2, num_repr=2, top_blocks=8),
}


@pytest.fixture(scope="module")
def model():
    return policy_model()


@pytest.mark.parametrize("name", sorted(ALL_POLICIES))
def test_budget_covering_prompt_is_dense(model, name):
    """Prefill + decode under each policy with budget >= T equals the dense model, on a
    ragged batch (row 1's prompt is 3 tokens shorter: padding at -1, decode continues)."""
    lengths = (T, T - 3)
    tokens, positions = ragged_batch(T, NEW, lengths)
    caches = policy_caches(model, ALL_POLICIES[name], batch=2, prompt_len=T, max_new=NEW)
    got, _ = generate(lambda m, *a: m(*a), model, caches, tokens, positions, T)   # eager
    for row, n in enumerate(lengths):
        keep = np.concatenate([np.arange(n), np.arange(T, T + NEW)])
        want, _ = model(tokens[row:row + 1, keep])
        np.testing.assert_allclose(got[row, keep], want[0], atol=2e-5, rtol=2e-5)


# ---- hand-built cases: craft q/k so that known positions get the attention mass ----

S, D = 12, 4


def _obs(heavy, queries="all", num_kv_heads=2):
    """Keys zero but `10 * e0` at `heavy[h]` positions of kv head h; queries `e0` (all of
    them, or only the last two: earlier ones zero). One query head per kv head."""
    k = np.zeros((1, S, num_kv_heads, D), np.float32)
    for h, ps in enumerate(heavy):
        k[0, list(ps), h, 0] = 10.0 * 2.0          # logit 10 after the 1/sqrt(D) scale
    q = np.zeros((1, S, num_kv_heads, D), np.float32)
    q[0, (slice(None) if queries == "all" else slice(S - 2, S)), :, 0] = 1.0
    pos = jnp.arange(S, dtype=jnp.int32)[None]
    return Observation(jnp.asarray(q), jnp.asarray(k), pos, pos)


def _kept(policy, obs, layer=0, num_layers=1):
    slot, head = (np.asarray(x)[0] for x in select(policy, obs, layer, num_layers))
    return [set(slot[head == h].tolist()) for h in range(obs.k.shape[2])]


def test_streaming_llm_keeps_sinks_and_recent():
    assert _kept(StreamingLLM(5, num_sinks=2), _obs([[4], [6]])) == [{0, 1, 9, 10, 11}] * 2


def test_h2o_keeps_heavy_hitters_and_recent():
    assert _kept(H2O(3, recent_ratio=0.5), _obs([[3], [5]])) == [{3, 10, 11}, {5, 10, 11}]


def test_snapkv_keeps_what_the_window_attends():
    # the last two queries look at 4 / 6 only; earlier queries (zero) spread evenly
    obs = _obs([[4], [6]], queries="last2")
    assert _kept(SnapKV(3, window=2, kernel=1), obs) == [{4, 10, 11}, {6, 10, 11}]
    assert _kept(SnapKV(3, window=2, kernel=3, pooling="max"), obs)[0] & {3, 4, 5}


def test_snapkv_pools_only_the_keys_before_the_window():
    """The window's own mass must not reach the prefix scores (the paper's code crops
    `attn[..., -w:, :-w]` before pooling). Window key 10 takes nearly all the window's
    attention, key 1 a little: keeping one prefix key, the cropped scores pick key 1's
    neighbourhood (1); pooling the window in would pick key 9, next to key 10."""
    k = np.zeros((1, S, 1, D), np.float32)
    k[0, 1, 0, 0], k[0, 10, 0, 0] = 2.0 * 4.0, 2.0 * 10.0          # logits 4 and 10
    q = np.zeros((1, S, 1, D), np.float32)
    q[0, S - 2:, 0, 0] = 1.0
    pos = jnp.arange(S, dtype=jnp.int32)[None]
    obs = Observation(jnp.asarray(q), jnp.asarray(k), pos, pos)
    assert _kept(SnapKV(3, window=2, kernel=3), obs) == [{1, 10, 11}]
    assert _kept(SnapKV(3, window=2, kernel=3, pooling="max"), obs)[0] & {0, 1, 2}


def _snapkv_reference(q, k, window, kernel, pooling):
    """SnapKV's scoring step by step as the paper's code does it, in numpy, one batch row,
    no padding: softmax of the last `window` queries over all (causal) keys, crop to the
    keys before the window, sum over the window queries, pool with zero (avg) / -inf (max)
    padding of kernel // 2, sum the query heads of each kv head. -> `[Hkv, S - window]`."""
    s, h, d = q.shape
    hkv = k.shape[1]
    logits = np.einsum("thd,shd->hts", q[-window:], np.repeat(k, h // hkv, axis=1)) / np.sqrt(d)
    causal = np.arange(s)[None, :] <= np.arange(s - window, s)[:, None]
    logits = np.where(causal[None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    summed = probs[:, :, :-window].sum(1)                                       # [H, S - w]
    pad = kernel // 2
    padded = np.pad(summed, ((0, 0), (pad, pad)), constant_values=0.0 if pooling == "avg" else -np.inf)
    windows = np.stack([padded[:, i:i + s - window] for i in range(kernel)])
    pooled = windows.mean(0) if pooling == "avg" else windows.max(0)
    return pooled.reshape(hkv, h // hkv, s - window).sum(1)


@pytest.mark.parametrize("pooling,group", [("avg", 2), ("max", 1)])
def test_snapkv_scores_follow_the_papers_code(pooling, group):
    rng = np.random.default_rng(3)
    q = rng.normal(size=(1, S, 2 * group, D)).astype(np.float32) * 2
    k = rng.normal(size=(1, S, 2, D)).astype(np.float32) * 2
    pos = jnp.arange(S, dtype=jnp.int32)[None]
    window, kernel = 3, 5
    score, forced = SnapKV(8, window=window, kernel=kernel, pooling=pooling).scores(
        Observation(jnp.asarray(q), jnp.asarray(k), pos, pos), 0, 1)
    want = _snapkv_reference(q[0], k[0], window, kernel, pooling)
    np.testing.assert_allclose(np.asarray(score)[0, :, :S - window], want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(forced)[0, 0] == (np.arange(S) >= S - window))


def test_h2o_normalize_divides_by_the_queries_that_see_each_key():
    """Key 0 (logit 3) is seen by all 12 queries, key 8 (logit 6) by the last 4. Summed
    mass (the H2O paper) favours key 0, mass per observing query (kvpress's
    ObservedAttention) key 8; with one heavy-hitter slot they keep different keys."""
    k = np.zeros((1, S, 1, D), np.float32)
    k[0, 0, 0, 0], k[0, 8, 0, 0] = 2.0 * 3.0, 2.0 * 6.0
    q = np.ones((1, S, 1, D), np.float32) * np.array([1.0, 0, 0, 0], np.float32)
    pos = jnp.arange(S, dtype=jnp.int32)[None]
    obs = Observation(jnp.asarray(q), jnp.asarray(k), pos, pos)
    assert H2O(3).normalize is False
    assert _kept(H2O(3), obs) == [{0, 10, 11}]
    assert _kept(H2O(3, normalize=True), obs) == [{8, 10, 11}]
    summed, _ = H2O(3).scores(obs, 0, 1)
    mean, _ = H2O(3, normalize=True).scores(obs, 0, 1)
    np.testing.assert_allclose(np.asarray(mean)[0, 0], np.asarray(summed)[0, 0] / (S - np.arange(S)), rtol=1e-6)


def test_scores_match_kvpress_golden():
    """SnapKV and H2O score as kvpress's SnapKVPress and ObservedAttentionPress do on the
    golden inputs (tests/golden/make_kvpress_golden.py, kvpress 0.5.5): equal up to the
    constant factors of averaging (kvpress: mean over the window queries and the GQA group;
    the policies sum), SnapKV keeps kvpress's slots, `H2O(normalize=True)` is
    ObservedAttention, and the default (summed) H2O is that times the observing queries."""
    g = np.load(pathlib.Path(__file__).parent / "golden" / "kvpress" / "scores.npz")
    q, k = jnp.asarray(g["q"]), jnp.asarray(g["k"])
    b, t, h, _ = q.shape
    hkv, window, budget = k.shape[2], int(g["window"]), int(g["budget"])
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    obs = Observation(q, k, pos, pos)
    snap = SnapKV(budget, window=window, kernel=int(g["kernel"]))
    score, _ = snap.scores(obs, 0, 1)
    np.testing.assert_allclose(np.asarray(score)[..., :t - window],
                               g["snapkv"][..., :t - window] * window * (h // hkv), rtol=1e-5, atol=1e-7)
    slot, head = (np.asarray(x) for x in select(snap, obs, 0, 1))
    kept = [[np.sort(slot[r][head[r] == hh]) for hh in range(hkv)] for r in range(b)]
    np.testing.assert_array_equal(np.asarray(kept), g["snapkv_kept"])
    mean, _ = H2O(budget, normalize=True).scores(obs, 0, 1)
    np.testing.assert_allclose(mean, g["observed"] * (h // hkv), rtol=1e-5, atol=1e-7)
    summed, _ = H2O(budget).scores(obs, 0, 1)
    np.testing.assert_allclose(summed, g["observed"] * (h // hkv) * (t - np.arange(t)), rtol=1e-5, atol=1e-7)


def test_ada_kv_moves_budget_to_the_head_that_needs_it():
    # head 0 puts its mass on one key, head 1 spreads it over three: uniform SnapKV keeps
    # two of head 1's three, Ada-SnapKV all three, taking the slot from head 0
    obs = _obs([[2], [5, 6, 7]], queries="last2")
    uniform = _kept(SnapKV(3, window=1, kernel=1), obs)
    ada = _kept(AdaKV(SnapKV(3, window=1, kernel=1), floor=0.0), obs)
    assert uniform[0] >= {2, 11} and len(uniform[1] & {5, 6, 7}) == 2
    assert ada == [{2, 11}, {5, 6, 7, 11}]
    assert sum(map(len, ada)) == 2 * 3                               # head budgets sum to the total
    floored = _kept(AdaKV(SnapKV(4, window=1, kernel=1), floor=0.5), _obs([[2], [5, 6, 7, 8]], "last2"))
    assert min(map(len, floored)) >= 2 and sum(map(len, floored)) == 8


def test_duo_attention_retrieval_heads_keep_everything():
    kept = _kept(DuoAttention(3, retrieval=((True, False),), num_sinks=1), _obs([[4], [6]]))
    assert kept == [set(range(S)), {0, 10, 11}]


def test_pyramidkv_budgets_fall_and_sum_to_the_total():
    p = PyramidKV(20, window=4, beta=4)
    b = p.layer_budgets(5)
    assert b.sum() == 5 * 20 and np.all(np.diff(b) <= 0) and b[0] > b[-1] >= 4
    obs = _obs([[4], [6]], queries="last2")
    assert [len(_kept(PyramidKV(6, window=2, beta=2), obs, layer, 3)[0]) for layer in range(3)] == \
        list(PyramidKV(6, window=2, beta=2).layer_budgets(3))


def _layer(num_heads=2, num_kv_heads=2):
    cfg = AttentionConfig(d_model=8, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=D)
    return FullAttention(cfg, rngs=nnx.Rngs(0))


def test_quest_and_top_p_pick_the_page_holding_the_needle():
    """Pages of 4 over 16 positions; the decode query's bound peaks on page 1 (head 0) and
    page 2 (head 1). Quest (3 pages: first + last forced + the best) and top-p (one page
    holds ~all estimated mass) choose them, and attend exactly over them."""
    layer, n = _layer(), 16
    rng = np.random.default_rng(0)
    k = rng.normal(size=(1, n, 2, D)).astype(np.float32) * 0.1
    k[0, 5, 0, 0] = k[0, 9, 1, 0] = 20.0
    v = rng.normal(size=(1, n, 2, D)).astype(np.float32)
    q = np.zeros((1, n, 2, D), np.float32)
    q[..., 0] = 1.0
    pos = jnp.arange(n, dtype=jnp.int32)[None]
    for policy, pages in ((Quest(12, page_size=4), [{0, 1, 3}, {0, 2, 3}]),
                          (Quest(12, page_size=4, bounds_dtype="float8_e4m3fn"), [{0, 1, 3}, {0, 2, 3}]),
                          (TopP(0.9, page_size=4), [{1}, {2}])):
        cache = policy.make_cache(layer, 0, 1, 1, n, None)
        _, cache = layer.attend_cached(jnp.asarray(q[:, :-1]), jnp.asarray(k[:, :-1]), jnp.asarray(v[:, :-1]),
                                       pos[:, :-1], cache, sink_logits=None)
        out, cache = layer.attend_cached(jnp.asarray(q[:, -1:]), jnp.asarray(k[:, -1:]), jnp.asarray(v[:, -1:]),
                                         pos[:, -1:], cache, sink_logits=None)
        assert [set(np.flatnonzero(s).tolist()) for s in np.asarray(cache.selected)[0]] == pages
        mask = np.asarray(cache.kept_mask(n))[:, :, None]                        # [1, Hkv, 1, n]
        want, _, _ = masked_attention(jnp.asarray(q[:, -1:]), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask),
                                      scale=1 / np.sqrt(D))
        np.testing.assert_allclose(out, want, atol=1e-5)


def test_pooled_decode_matches_masked_reference():
    """After compression, a decode step over the pooled cache equals attention over the
    full keys masked to each head's kept set (+ the new token), GQA, ragged batch."""
    layer = _layer(num_heads=4, num_kv_heads=2)
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(2, S + 1, h, D)).astype(np.float32)) for h in (4, 2, 2))
    pos = np.tile(np.arange(S + 1, dtype=np.int32), (2, 1))
    pos[1, S - 3:S] = -1                                                         # row 1: 9-token prompt
    pos[1, S] = S - 3
    pos = jnp.asarray(pos)
    obs = Observation(q[:, :S], k[:, :S], pos[:, :S], pos[:, :S])
    for policy in (H2O(5), AdaKV(SnapKV(5, window=2, kernel=1), floor=0.0)):
        cache = compress(policy, obs, v[:, :S], layer=0, num_layers=1, max_new=1)
        out, cache = layer.attend_cached(q[:, S:], k[:, S:], v[:, S:], pos[:, S:], cache, sink_logits=None)
        held = np.asarray(cache.kept_mask(S + 1))                                # [B, Hkv, S+1] by position
        by_slot = np.take_along_axis(held, np.maximum(np.asarray(pos), 0)[:, None], axis=2) & (np.asarray(pos) >= 0)[:, None]
        assert np.all(held.sum(-1)[0] <= 6) and held.sum() == 2 * (2 * 5 + 2)   # budget + new token per head
        want, _, _ = masked_attention(q[:, S:], k, v, jnp.asarray(by_slot)[:, :, None], scale=1 / np.sqrt(D))
        np.testing.assert_allclose(out, want, atol=1e-5)


def test_nbytes_shrinks_by_the_budget_ratio():
    b, n, hkv, d = 2, 16, 2, 32
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.normal(size=(b, n, h, d)).astype(np.float32)) for h in (4, 2, 2))
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    full = FullKVCache.init(b, n, hkv, d)
    for policy in (SnapKV(4, window=2), AdaKV(H2O(8)), DuoAttention(4, retrieval=((True, False),), num_sinks=1)):
        c = compress(policy, Observation(q, k, pos, pos), v, layer=0, num_layers=1, max_new=0)
        kept = int(policy.head_budgets(0, 1, hkv).clip(max=n).sum())        # Duo: 16 + 4
        assert c.k.nbytes + c.v.nbytes == (full.k.nbytes + full.v.nbytes) * kept // (hkv * n)
        # + 8 bytes (position, head) per kept slot instead of 4 (position) per token
        assert c.nbytes() == c.k.nbytes + c.v.nbytes + b * kept * 8 + b * 4
        assert abs(c.nbytes() / full.nbytes() - kept / (hkv * n)) < 0.05 * kept / (hkv * n)


def test_duo_calibration(model):
    probs = np.zeros((1, 4, 12), np.float32)              # 4 query heads, 2 kv heads
    probs[0, 0, 5] = probs[0, 1, 5] = 1.0                 # kv head 0 looks at the middle
    probs[0, 2, 11] = probs[0, 3, 0] = 1.0                # kv head 1 at the recent token / sink
    loss = streaming_loss(jnp.asarray(probs), jnp.arange(12)[None], num_kv_heads=2, num_sinks=1, recent=2)
    np.testing.assert_allclose(loss, [1.0, 0.0])
    assert gates_from_losses([[0.1, 0.9], [0.5, 0.2]], 0.5) == ((False, True), (True, False))
    gates = calibrate(model, jnp.ones((2, T), jnp.int32), fraction=0.5, num_sinks=1, recent=2)
    assert len(gates) == 2 and all(len(g) == 2 for g in gates) and sum(map(sum, gates)) == 2


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="budget"):
        SnapKV(0)
    with pytest.raises(ValueError, match="inner"):
        AdaKV(AdaKV(SnapKV(4)))
    with pytest.raises(ValueError, match="num_sinks"):
        StreamingLLM(2, num_sinks=3)
    with pytest.raises(ValueError, match="normalize"):
        H2O(4, normalize="mean")
    with pytest.raises(ValueError, match="retrieval"):
        DuoAttention(4, retrieval=())
    with pytest.raises(ValueError, match="p must"):
        TopP(0.0)
    with pytest.raises(ValueError, match="bounds_dtype"):
        Quest(16, bounds_dtype="int8")
    with pytest.raises(ValueError, match="policy"):
        policy_caches(SparseLM(LMConfig(vocab_size=8, layer_spec="F", d_model=8, num_heads=2),
                               rngs=nnx.Rngs(0)), "snapkv", batch=1, prompt_len=4, max_new=1)
    assert isinstance(policy_caches(SparseLM(LMConfig(vocab_size=8, layer_spec="F", d_model=8, num_heads=2),
                                             rngs=nnx.Rngs(0)), SnapKV(4), batch=1, prompt_len=4,
                                    max_new=1)[0], PolicyPrefill)
