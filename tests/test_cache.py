"""KV caches: byte sizes by hand, slot layout, what `update` hands to attention, memory caps.

Keys written into a cache encode their (row, position), so every check reads back exactly
which token sits in which slot. The decode-equals-prefill checks of every layer live in
`test_layers.py`; here the caches are tested on their own and through the layers for
the memory bound (window + sinks, whatever the number of decode steps).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_jax import patterns as P
from sparse_jax.cache.kv import FullKVCache, RollingKVCache
from sparse_jax.layers import (AttentionConfig, FullAttention, PatternAttention,
                               SlidingWindowAttention, StreamingLLMAttention)

HKV, D, DV = 2, 8, 6


def _itemsize(dtype):
    return {jnp.float32: 4, jnp.bfloat16: 2, jnp.float16: 2}[dtype]


def encode(b, p, width, value_offset=0.0):
    """A key / value vector that names its row and position: [b*1000 + p + offset, ...]."""
    base = np.float32(b * 1000 + p + value_offset)
    return np.full((HKV, width), base, np.float32) + np.arange(width, dtype=np.float32) / 100


def new_tokens(positions, dtype=jnp.float32):
    """k [B, T, HKV, D], v [B, T, HKV, DV] encoding positions (garbage at padding)."""
    b_, t_ = positions.shape
    k = np.zeros((b_, t_, HKV, D), np.float32)
    v = np.zeros((b_, t_, HKV, DV), np.float32)
    for b in range(b_):
        for t in range(t_):
            p = int(positions[b, t])
            k[b, t] = encode(b, p, D) if p >= 0 else -7.0
            v[b, t] = encode(b, p, DV, 0.5) if p >= 0 else -9.0
    return jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(positions, jnp.int32)


def decode_slot(vec) -> int:
    return int(round(float(vec[0, 0])))


# ----------------------------------------------------------------------------- byte sizes


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_full_cache_init_and_nbytes_by_hand(dtype):
    cache = FullKVCache.init(3, 17, HKV, D, v_head_dim=DV, dtype=dtype)
    assert cache.k.shape == (3, 17, HKV, D) and cache.v.shape == (3, 17, HKV, DV)
    assert cache.k.dtype == dtype and cache.v.dtype == dtype
    assert cache.positions.shape == (3, 17) and cache.positions.dtype == jnp.int32
    assert (np.asarray(cache.positions) == -1).all()
    assert cache.max_len == 17
    isz = _itemsize(dtype)
    assert cache.nbytes() == 3 * 17 * HKV * D * isz + 3 * 17 * HKV * DV * isz + 3 * 17 * 4
    assert isinstance(cache.nbytes(), int)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("window, sinks", [(1, 0), (5, 0), (5, 3)])
def test_rolling_cache_init_and_nbytes_by_hand(dtype, window, sinks):
    cache = RollingKVCache.init(2, window, HKV, D, num_sinks=sinks, v_head_dim=DV, dtype=dtype)
    slots = window + sinks
    assert cache.k.shape == (2, slots, HKV, D) and cache.v.shape == (2, slots, HKV, DV)
    assert cache.positions.shape == (2, slots) and (np.asarray(cache.positions) == -1).all()
    per_slot = HKV * (D + DV) * _itemsize(dtype) + 4       # k, v and an int32 position
    assert cache.nbytes() == 2 * slots * per_slot


def test_caches_are_pytrees_with_static_window():
    rc = RollingKVCache.init(2, 4, HKV, D, num_sinks=1)
    leaves, treedef = jax.tree.flatten(rc)
    assert len(leaves) == 3
    back = jax.tree.unflatten(treedef, leaves)
    assert (back.window, back.num_sinks) == (4, 1)
    fc = FullKVCache.init(2, 4, HKV, D)
    assert len(jax.tree.leaves(fc)) == 3


# ----------------------------------------------------------------------------- FullKVCache.update


def test_full_cache_update_slot_is_position_and_padding_is_not_written():
    cache = FullKVCache.init(2, 10, HKV, D, v_head_dim=DV)
    pos1 = np.array([[0, 1, 2, 3], [0, 1, -1, -1]])
    k, v, p = new_tokens(pos1)
    keys, values, kv_pos, cache = cache.update(k, v, p)
    # what the queries attend to is the whole (updated) cache
    assert keys.shape == (2, 10, HKV, D) and kv_pos.shape == (2, 10)
    np.testing.assert_array_equal(keys, cache.k)
    np.testing.assert_array_equal(values, cache.v)
    np.testing.assert_array_equal(kv_pos, cache.positions)
    pos2 = np.array([[4, 5], [2, -1]])
    _, _, _, cache = cache.update(*new_tokens(pos2))
    expected = {0: list(range(6)), 1: [0, 1, 2]}
    for b, written in expected.items():
        row = np.asarray(cache.positions[b])
        assert row.tolist() == written + [-1] * (10 - len(written))
        for p_ in written:
            np.testing.assert_array_equal(cache.k[b, p_], encode(b, p_, D))
            np.testing.assert_array_equal(cache.v[b, p_], encode(b, p_, DV, 0.5))
        assert (np.asarray(cache.k[b, len(written):]) == 0).all(), "padding must not be written"


def test_full_cache_padding_never_overwrites_a_full_cache():
    """Every slot used, then updates that are padding (in one row, or entirely)."""
    cache = FullKVCache.init(2, 4, HKV, D, v_head_dim=DV)
    _, _, _, cache = cache.update(*new_tokens(np.array([[0, 1, 2, 3], [0, 1, 2, 3]])))
    before = [np.asarray(a) for a in jax.tree.leaves(cache)]
    for pos in (np.array([[-1], [-1]]), np.array([[-1, -1, -1, -1], [-1, -1, -1, -1]])):
        _, _, kv_pos, cache = cache.update(*new_tokens(pos))
        for a, b in zip(before, jax.tree.leaves(cache)):
            np.testing.assert_array_equal(a, b)
        assert np.asarray(kv_pos).tolist() == [[0, 1, 2, 3]] * 2


def test_full_cache_update_under_jit_drops_out_of_range_positions():
    cache = FullKVCache.init(1, 4, HKV, D, v_head_dim=DV)
    k, v, p = new_tokens(np.array([[3, 4]]))
    _, _, _, new = jax.jit(lambda c, k, v, p: c.update(k, v, p))(cache, k, v, p)
    assert np.asarray(new.positions).tolist() == [[-1, -1, -1, 3]]


def test_full_cache_bad_updates_raise():
    cache = FullKVCache.init(2, 6, HKV, D, v_head_dim=DV)
    k, v, p = new_tokens(np.array([[0, 1, 2], [0, 1, 2]]))
    with pytest.raises(ValueError, match="dtype"):
        cache.update(k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), p)
    with pytest.raises(ValueError, match="keys"):
        cache.update(k[:1], v[:1], p[:1])                         # batch
    with pytest.raises(ValueError, match="keys"):
        cache.update(k[:, :, :1], v[:, :, :1], p)                 # kv heads
    with pytest.raises(ValueError, match="keys"):
        cache.update(k[..., :4], v, p)                            # head dim
    with pytest.raises(ValueError, match="values"):
        cache.update(k, v[:, :2], p)
    with pytest.raises(ValueError, match="positions"):
        cache.update(k, v, p[:, :2])
    with pytest.raises(ValueError, match="positions.*max_len=6"):
        cache.update(*new_tokens(np.array([[4, 5, 6], [0, 1, 2]])))   # position 6 is slot 7
    long_pos = np.tile(np.arange(7), (2, 1))
    with pytest.raises(ValueError, match="max_len"):
        cache.update(*new_tokens(long_pos))                            # 7 new tokens, 6 slots
    with pytest.raises(ValueError, match="max_len"):
        FullKVCache.init(2, 0, HKV, D)


def test_rolling_cache_bad_arguments_raise():
    with pytest.raises(ValueError, match="window"):
        RollingKVCache.init(2, 0, HKV, D)
    with pytest.raises(ValueError, match="num_sinks"):
        RollingKVCache.init(2, 3, HKV, D, num_sinks=-1)
    cache = RollingKVCache.init(2, 3, HKV, D, num_sinks=1, v_head_dim=DV)
    k, v, p = new_tokens(np.array([[0, 1], [0, 1]]))
    with pytest.raises(ValueError, match="dtype"):
        cache.update(k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), p)
    with pytest.raises(ValueError, match="keys"):
        cache.update(k[:, :, :1], v[:, :, :1], p)
    with pytest.raises(ValueError, match="positions"):
        cache.update(k, v, p[:1])


# ----------------------------------------------------------------------------- RollingKVCache.update


def _expected_slot(p, window, sinks):
    return p if p < sinks else sinks + (p - sinks) % window


def _check_rolling_contents(cache, written, window, sinks):
    """Cache holds exactly the sinks and the last `window` written positions, in their slots."""
    for b, ps in enumerate(written):
        last = ps[-1] if ps else -1
        expected = {p for p in ps if p < sinks or p > last - window}
        row = np.asarray(cache.positions[b])
        held = {int(p) for p in row if p >= 0}
        assert held == expected, (b, sorted(held), sorted(expected))
        assert (row >= 0).sum() == len(expected), "a position is held twice"
        for slot, p in enumerate(row.tolist()):
            if p < 0:
                continue
            assert slot == _expected_slot(p, window, sinks), (b, p, slot)
            assert decode_slot(np.asarray(cache.k[b, slot])) == b * 1000 + p
            np.testing.assert_array_equal(cache.v[b, slot], encode(b, p, DV, 0.5))


@settings(max_examples=30, deadline=None)
@given(window=st.integers(1, 5), sinks=st.integers(0, 3),
       chunks=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7)), min_size=1, max_size=8))
def test_rolling_cache_keeps_sinks_and_window_and_never_grows(window, sinks, chunks):
    """Random ragged chunk schedules (chunks longer than the whole cache included)."""
    width = 7
    cache = RollingKVCache.init(2, window, HKV, D, num_sinks=sinks, v_head_dim=DV)
    shape, nbytes = cache.k.shape, cache.nbytes()
    written = [[], []]
    for lens in chunks:
        pos = np.full((2, width), -1, np.int64)
        for b, n in enumerate(lens):
            start = len(written[b])
            pos[b, :n] = np.arange(start, start + n)
        k, v, p = new_tokens(pos)
        old = cache
        keys, values, kv_pos, cache = cache.update(k, v, p)
        # Queries of this call see the old cache followed by the new tokens ...
        np.testing.assert_array_equal(keys, jnp.concatenate([old.k, k], 1))
        np.testing.assert_array_equal(values, jnp.concatenate([old.v, v], 1))
        np.testing.assert_array_equal(kv_pos, jnp.concatenate([old.positions, p], 1))
        # ... which holds every key the sinks + window predicate lets any new query see.
        for b in range(2):
            avail = set(np.asarray(kv_pos[b]).tolist())
            for t in pos[b][pos[b] >= 0]:
                need = {s for s in range(t + 1) if s < sinks or t - s < window}
                assert need <= avail, (b, t, sorted(need - avail))
            written[b] += [int(q) for q in pos[b] if q >= 0]
        assert cache.k.shape == shape and cache.v.shape[:2] == shape[:2]
        assert cache.positions.shape == shape[:2] and cache.nbytes() == nbytes
        assert (cache.window, cache.num_sinks) == (window, sinks)
        _check_rolling_contents(cache, written, window, sinks)


def test_rolling_cache_update_under_jit():
    window, sinks = 3, 2
    cache = RollingKVCache.init(2, window, HKV, D, num_sinks=sinks, v_head_dim=DV)
    step = jax.jit(lambda c, k, v, p: c.update(k, v, p)[3])
    written = [[], []]
    for t in range(12):
        pos = np.array([[t], [t if t < 7 else -1]])
        cache = step(cache, *new_tokens(pos))
        for b in range(2):
            written[b] += [int(pos[b, 0])] if pos[b, 0] >= 0 else []
    _check_rolling_contents(cache, written, window, sinks)
    assert np.asarray(cache.positions[0]).tolist() == [0, 1, 11, 9, 10]


# ----------------------------------------------------------------------------- through the layers

CFG = dict(d_model=32, num_heads=4, num_kv_heads=2)


def _layers():
    cfg = AttentionConfig(**CFG)
    r = nnx.Rngs(0)
    return {
        "swa": SlidingWindowAttention(cfg, window=5, rngs=r),
        "stream_text": StreamingLLMAttention(cfg, window=5, num_sinks=3, rngs=r),
        "stream_cache": StreamingLLMAttention(cfg, window=5, num_sinks=3, rope_mode="cache", rngs=r),
    }


@pytest.fixture(scope="module")
def layers():
    return _layers()


def test_init_cache_picks_the_policy_and_caps_memory(layers):
    hd = 8
    per_slot = 2 * HKV * hd * 4 + 4                        # k + v (fp32) + position, per row
    swa, stream = layers["swa"], layers["stream_text"]
    for max_len in (9, 40, 100_000):
        c = swa.init_cache(3, max_len)
        assert isinstance(c, RollingKVCache) and c.k.shape == (3, 5, HKV, hd)
        assert c.nbytes() == 3 * 5 * per_slot
        c = stream.init_cache(3, max_len)
        assert isinstance(c, RollingKVCache) and c.k.shape == (3, 8, HKV, hd)
        assert (c.window, c.num_sinks) == (5, 3) and c.nbytes() == 3 * 8 * per_slot
    # A window that covers max_len: a full cache of max_len slots is no larger.
    for layer, max_len in ((swa, 5), (swa, 3), (stream, 8), (stream, 2)):
        c = layer.init_cache(3, max_len)
        assert isinstance(c, FullKVCache) and c.max_len == max_len
        assert c.nbytes() == 3 * max_len * per_slot
    cfg = AttentionConfig(**CFG)
    full = FullAttention(cfg, rngs=nnx.Rngs(0))
    pattern = PatternAttention(cfg, pattern=P.longformer(4), block_size=8, rngs=nnx.Rngs(0))
    for layer in (full, pattern):
        c = layer.init_cache(3, 40)
        assert isinstance(c, FullKVCache) and c.k.shape == (3, 40, HKV, hd)
        assert c.nbytes() == 3 * 40 * per_slot
    c = full.init_cache(3, 40, dtype=jnp.bfloat16)
    assert c.k.dtype == jnp.bfloat16 and c.nbytes() == 3 * 40 * (2 * HKV * hd * 2 + 4)
    bf = FullAttention(AttentionConfig(**CFG, dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
    assert bf.init_cache(1, 4).k.dtype == jnp.bfloat16


@pytest.mark.parametrize("kind", ["swa", "stream_text", "stream_cache"])
def test_rolling_cache_never_grows_over_many_decode_steps(kind, layers):
    """40 decode steps, far past the window, with max_len smaller than the steps taken."""
    layer = layers[kind]
    window, sinks = layer.window, layer.num_sinks
    rng = np.random.default_rng(0)
    cache = layer.init_cache(3, 16)
    assert isinstance(cache, RollingKVCache)
    shapes = [a.shape for a in jax.tree.leaves(cache)]
    per_slot = 2 * HKV * 8 * 4 + 4
    assert cache.nbytes() == 3 * (window + sinks) * per_slot
    steps = 40
    for t in range(steps):
        x = jnp.asarray(rng.normal(size=(3, 1, 32)).astype(np.float32))
        pos = jnp.asarray([[t], [t if t < 30 else -1], [-1]], jnp.int32)   # row 1 stops at 30
        y, cache = layer(x, pos, cache)
        assert np.isfinite(np.asarray(y)).all()
        assert [a.shape for a in jax.tree.leaves(cache)] == shapes
        assert cache.nbytes() == 3 * (window + sinks) * per_slot
    for b, last in ((0, steps - 1), (1, 29)):
        held = sorted(int(p) for p in np.asarray(cache.positions[b]) if p >= 0)
        assert held == sorted(set(range(sinks)) | set(range(last - window + 1, last + 1)))
    assert (np.asarray(cache.positions[2]) == -1).all()


# ----------------------------------------------------------------------------- capacity (overflow)


def test_full_cache_overflow_is_an_error_eagerly_and_under_checkify():
    """Eager: ValueError. Under jit: the entry is dropped (as before) and a checkify
    debug_check reports it to a caller that wraps the step with `checkify.checkify`;
    a step that fits reports nothing."""
    from jax.experimental import checkify

    cache = FullKVCache.init(1, 4, HKV, D, v_head_dim=DV)
    with pytest.raises(ValueError, match="beyond the cache"):
        cache.update(*new_tokens(np.array([[3, 4]])))
    step = jax.jit(lambda c, k, v, p: c.update(k, v, p)[3])
    err, new = checkify.checkify(step)(cache, *new_tokens(np.array([[3, 4]])))
    assert "beyond the cache (max_len=4)" in str(err.get())
    assert np.asarray(new.positions).tolist() == [[-1, -1, -1, 3]]
    with pytest.raises(checkify.JaxRuntimeError, match="beyond the cache"):
        err.throw()
    err, _ = checkify.checkify(step)(cache, *new_tokens(np.array([[2, 3]])))
    assert err.get() is None


def test_rolling_cache_never_overflows():
    """A rolling buffer is bounded by design: 12 decode steps into 2 + 3 slots report no error."""
    from jax.experimental import checkify

    cache = RollingKVCache.init(1, 3, HKV, D, num_sinks=2, v_head_dim=DV)
    step = checkify.checkify(jax.jit(lambda c, k, v, p: c.update(k, v, p)[3]))
    for t in range(12):
        err, cache = step(cache, *new_tokens(np.array([[t]])))
        assert err.get() is None


def test_pooled_cache_overflow_is_flagged_in_its_state():
    """A pooled cache made for `max_new=1` decoded token: eagerly a second token raises;
    under jit it is not stored, `overflowed()` turns True and checkify reports it."""
    from jax.experimental import checkify

    from sparse_jax.cache.pooled import PooledKVCache

    b, hkv, kept = 2, HKV, 3
    cache = PooledKVCache(k=jnp.zeros((b, kept + hkv, D)), v=jnp.zeros((b, kept + hkv, DV)),
                          positions=jnp.asarray(np.r_[np.arange(kept), [-1] * hkv][None].repeat(b, 0), jnp.int32),
                          heads=jnp.zeros((b, kept + hkv), jnp.int32), num_decoded=jnp.zeros((b,), jnp.int32),
                          num_kv_heads=hkv, num_kept=kept)
    assert cache.max_new == 1
    k, v, _ = new_tokens(np.array([[3], [3]]))
    one = cache.update(k, v, jnp.asarray([[3], [-1]], jnp.int32))[-1]               # row 1: padding
    assert np.asarray(one.overflowed()).tolist() == [False, False]
    with pytest.raises(ValueError, match="max_new"):
        one.update(k, v, jnp.asarray([[4], [3]], jnp.int32))
    step = jax.jit(lambda c, k, v, p: c.update(k, v, p)[-1])
    err, two = checkify.checkify(step)(one, k, v, jnp.asarray([[4], [3]], jnp.int32))
    assert "max_new=1" in str(err.get())
    assert np.asarray(two.overflowed()).tolist() == [True, False]
    assert np.asarray(two.positions).tolist() == [[0, 1, 2, 3, 3], [0, 1, 2, 3, 3]]


# ----------------------------------------------------------------------------- the one contract


def test_every_cache_lives_in_the_cache_package_and_follows_the_contract():
    """Every cache class is in `sparse_jax.cache`, subclasses `Cache` and has `nbytes`; an
    `update` never takes the layer (no callback), and no `update_and_attend` is left."""
    import importlib
    import inspect
    import pathlib
    import pkgutil

    import sparse_jax
    import sparse_jax.cache as cache_pkg
    from sparse_jax.cache.base import Cache

    classes = []
    for info in pkgutil.iter_modules(cache_pkg.__path__):
        mod = importlib.import_module(f"sparse_jax.cache.{info.name}")
        classes += [c for _, c in inspect.getmembers(mod, inspect.isclass)
                    if c.__module__ == mod.__name__ and c is not Cache and c.__name__.endswith(("Cache", "KV"))]
    names = {c.__name__ for c in classes}
    assert {"FullKVCache", "RollingKVCache", "NSACache", "CompressedKV", "MLACache", "DSACache", "CSACache",
            "SWACache", "QuestKVCache", "PageSelectCache", "PooledKVCache", "DenseOracleCache",
            "HySparseSparseCache", "OffloadKVCache"} <= names
    for c in classes:
        assert issubclass(c, Cache) and c.nbytes is not Cache.nbytes, c.__name__
        if hasattr(c, "update"):
            assert "layer" not in inspect.signature(c.update).parameters, c.__name__
    root = pathlib.Path(sparse_jax.__file__).parent
    assert not list(root.glob("cache_*.py")) and not (root / "kv_policies" / "cache.py").exists()
    for path in root.rglob("*.py"):
        assert "update_and_attend" not in path.read_text(), path


def test_weighted_attention_counts_a_slot_of_log_weight_w_as_e_w_copies():
    """A slot of log-weight log(3) attends as three copies of itself; -inf hides a slot."""
    from pallas_kernels.common import masked_attention
    from sparse_jax.cache.base import weighted_attention

    rng = np.random.default_rng(0)
    b, s, hkv, g, d = 2, 5, 2, 2, 8
    q = jnp.asarray(rng.normal(size=(b, 1, hkv * g, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, s, hkv, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, s, hkv, d)), jnp.float32)
    kv_pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    q_pos = jnp.full((b, 1), s - 1)
    log_w = jnp.zeros((b, hkv, s)).at[:, :, 1].set(jnp.log(3.0)).at[:, 0, 4].set(-jnp.inf)
    got = weighted_attention(q, k, v, kv_pos, q_pos, log_w, scale=d ** -0.5)
    copies = [0, 1, 1, 1, 2, 3, 4]                      # slot 1 three times
    kc, vc = k[:, copies], v[:, copies]
    visible = jnp.ones((b, hkv, 1, len(copies)), bool).at[:, 0, :, -1].set(False)
    want, _, _ = masked_attention(q, kc, vc, visible, scale=d ** -0.5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="log_weights"):
        weighted_attention(q, k, v, kv_pos, q_pos, log_w[:, :1], scale=1.0)
