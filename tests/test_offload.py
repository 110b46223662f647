"""InfLLM over host-offloaded KV (`sparse_jax.ops.infllm`, `sparse_jax.cache.offload`,
`kv_policies.InfLLM`): the ops against loop references; retrieving every block is dense
attention (ragged rows, GQA, bf16, jitted chunked decode); the cache after prefill + decode
equals the cache of one prefill of the whole text; a partial retrieval attends exactly the
sinks, the chosen blocks and the unfinished blocks; the bytes a decode call moves between
host and device memory are those `transfer_bytes()` reports; bad input raises ValueError.
(The model-level check, prompt + decode under the policy equal to the dense model, is
`test_kv_policies.test_budget_covering_prompt_is_dense[infllm]`.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import masked_attention
from sparse_jax.cache.base import Queries, nbytes_of
from sparse_jax.cache.kv import FullKVCache
from sparse_jax.cache.offload import OffloadKVCache, host_memory_kind
from sparse_jax.kv_policies import InfLLM
from sparse_jax.ops import infllm


def _rand(seed, b, t, h, hkv, d, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    mk = lambda *s: jnp.asarray(r.normal(size=s), dtype)
    return mk(b, t, h, d), mk(b, t, hkv, d), mk(b, t, hkv, d)


@jax.jit
def _attend(q, k, v, qp, kp):
    mask = (kp[:, None, :] <= qp[:, :, None]) & (kp[:, None, :] >= 0) & (qp[:, :, None] >= 0)
    return masked_attention(q, k, v, mask, scale=1.0 / np.sqrt(q.shape[-1]))[0]


def _cache(b, max_len, hkv, d, h, **kw):
    kw = dict(window=5, block_size=3, num_sinks=2, num_repr=2, top_blocks=64) | kw
    return OffloadKVCache.init(b, max_len, hkv, d, num_heads=h, **kw)


_step = jax.jit(lambda c, q, k, v, p: c.update(k, v, p, queries=Queries(q)), donate_argnums=0)
_prefill = jax.jit(lambda c, q, k, v, p: c.update(k, v, p, queries=Queries(q))[-1])


# ---- ops against loop references ----

def test_local_window_scores_match_a_loop():
    b, t, h, hkv, d, w, s0 = 2, 13, 4, 2, 4, 4, 2
    q, k, _ = _rand(0, b, t, h, hkv, d)
    pos = np.tile(np.arange(t), (b, 1)).astype(np.int32)
    pos[1, 10:] = -1                                                  # ragged row
    got = infllm.local_window_scores(q, k, jnp.asarray(pos), jnp.asarray(pos), window=w, num_sinks=s0, chunk=5)
    qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
    want = np.zeros((b, t, h))
    for row in range(b):
        for ti in range(t):
            if pos[row, ti] < 0:
                continue
            keys = [s for s in range(t) if pos[row, s] >= s0 and pos[row, ti] - w < pos[row, s] <= pos[row, ti]]
            for hh in range(h):
                logit = np.array([qn[row, ti, hh] @ kn[row, s, hh // (h // hkv)] for s in keys]) / np.sqrt(d)
                p = np.exp(logit - logit.max()) if keys else logit
                for s, ps in zip(keys, p / p.sum() if keys else p):
                    want[row, s, hh] += ps
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_representative_keys_and_block_scores_match_a_loop():
    b, n, bs, hkv, h, d, r = 1, 3, 4, 2, 4, 3, 2
    rng = np.random.default_rng(1)
    kb = rng.normal(size=(b, n, bs, hkv, d)).astype(np.float32)
    sc = rng.normal(size=(b, n, bs, h)).astype(np.float32)
    valid = np.ones((b, n, bs), bool)
    valid[0, 2, 1:] = False                                           # one slot: the mean of one key
    rep = infllm.representative_keys(jnp.asarray(kb), jnp.asarray(sc), jnp.asarray(valid), num_repr=r, num_heads=h)
    for j in range(n):
        for hh in range(h):
            ok = np.flatnonzero(valid[0, j])
            best = ok[np.argsort(-sc[0, j, ok, hh], kind="stable")[:r]]
            np.testing.assert_allclose(rep[0, j, hh], kb[0, j, best, hh // 2].mean(0), atol=1e-6)
    q = jnp.asarray(rng.normal(size=(b, 2, h, d)), jnp.float32)
    vb = jnp.asarray([[True, False, True]])
    s = infllm.block_scores(q, rep, vb)
    want = np.einsum("hd,nhd->n", np.asarray(q[0]).mean(0), np.asarray(rep[0]))
    np.testing.assert_allclose(s[0, [0, 2]], want[[0, 2]], rtol=1e-5)
    assert s[0, 1] == -np.inf
    assert infllm.top_blocks(s, vb, 3).tolist() == [sorted([0, 2], key=lambda j: -want[j]) + [-1]]


# ---- the cache ----

@pytest.mark.parametrize("h,hkv,dtype", [(4, 4, jnp.float32), (8, 2, jnp.bfloat16)],
                         ids=["G1-fp32", "G4-bf16"])
def test_every_block_retrieved_is_dense_attention(h, hkv, dtype):
    """Prefill 10 tokens (row 1: 7, padding after), then jitted decode calls of 1-3 tokens:
    with top_blocks >= the blocks, each call's attention equals dense causal attention."""
    b, n, d = 2, 37, 8
    q, k, v = _rand(2, b, n, h, hkv, d, dtype)
    lengths = (n, n - 3)
    pos = np.full((b, n), -1, np.int32)
    pos[0] = np.arange(n)
    pos[1, :7], pos[1, 10:] = np.arange(7), 7 + np.arange(n - 10)
    pos = jnp.asarray(pos)
    c = _cache(b, n, hkv, d, h, dtype=dtype)
    c = _prefill(c, q[:, :10], k[:, :10], v[:, :10], pos[:, :10])
    t = 10
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    while t < n:
        m = min(1 if t % 2 else 3, n - t)
        keys, values, kp, c = _step(c, q[:, t:t + m], k[:, t:t + m], v[:, t:t + m], pos[:, t:t + m])
        got = _attend(q[:, t:t + m], keys, values, pos[:, t:t + m], kp)
        want = _attend(q[:, t:t + m], k, v, pos[:, t:t + m], pos)
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)
        t += m
    assert c.host_k.sharding.memory_kind == host_memory_kind()
    assert c.num_final().tolist() == [(lengths[0] - 1 + 1 - 2 - 5) // 3, (lengths[1] - 1 + 1 - 2 - 5) // 3]


def test_decode_continues_a_prefill_exactly():
    """Prefill 9 tokens + jitted decode to 29 leaves the same memory (host blocks,
    representative keys, ring scores) as one prefill of all 29 tokens."""
    b, n, h, hkv, d = 2, 29, 4, 2, 8
    q, k, v = _rand(3, b, n, h, hkv, d)
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    c = _cache(b, n, hkv, d, h, top_blocks=2)
    c = _prefill(c, q[:, :9], k[:, :9], v[:, :9], pos[:, :9])
    for t in range(9, n):
        *_, c = _step(c, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], pos[:, t:t + 1])
    whole = _prefill(_cache(b, n, hkv, d, h, top_blocks=2), q, k, v, pos)
    nf = int(whole.num_final()[0])
    assert nf == int(c.num_final()[0]) == (n - 2 - 5) // 3
    np.testing.assert_array_equal(c.host_k[:, :nf], whole.host_k[:, :nf])
    np.testing.assert_array_equal(c.host_v[:, :nf], whole.host_v[:, :nf])
    np.testing.assert_allclose(c.rep_k[:, :nf], whole.rep_k[:, :nf], atol=1e-6)
    order = lambda x: np.take_along_axis(np.asarray(x.ring_score), np.argsort(np.asarray(x.ring_pos))[..., None], 1)
    np.testing.assert_allclose(order(c), order(whole), atol=1e-5)


def test_partial_retrieval_reads_sinks_best_blocks_and_unfinished_tokens():
    """top_blocks=2 of 5 memory blocks: the call reads the sinks, the 2 blocks of highest
    `block_scores`, and every token after the last memory block; its attention equals the
    masked reference over exactly those positions."""
    b, n, h, hkv, d = 1, 25, 4, 2, 8
    q, k, v = _rand(4, b, n, h, hkv, d)
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    c = _cache(b, n, hkv, d, h, top_blocks=2)
    c = _prefill(c, q[:, :24], k[:, :24], v[:, :24], pos[:, :24])
    nf = int(c.num_final()[0])
    assert nf == 5
    scores = infllm.block_scores(q[:, 24:], c.rep_k, jnp.arange(c.num_blocks)[None] < nf)
    best = set(np.argsort(-np.asarray(scores[0]))[:2].tolist())
    keys, values, kp, _ = _step(c, q[:, 24:], k[:, 24:], v[:, 24:], pos[:, 24:])
    seen = sorted(int(p) for p in np.asarray(kp[0]) if p >= 0)
    want_pos = [0, 1] + [2 + 3 * j + i for j in sorted(best) for i in range(3)] + list(range(2 + 3 * nf, 25))
    assert seen == want_pos
    got = _attend(q[:, 24:], keys, values, pos[:, 24:], kp)
    mask_pos = jnp.where(jnp.isin(pos, jnp.asarray(want_pos)), pos, -1)
    np.testing.assert_allclose(got, _attend(q[:, 24:], k, v, pos[:, 24:], mask_pos), atol=1e-5)


def test_bytes_held_and_moved():
    """nbytes splits device from host; the device part grows with max_len by the
    representative keys only; the device_put copies of a traced decode call are the bytes
    `transfer_bytes()` reports, per direction."""
    b, h, hkv, d = 2, 4, 2, 8
    small, big = (_cache(b, m, hkv, d, h, top_blocks=3) for m in (41, 161))
    for c in (small, big):
        assert c.nbytes("host") == nbytes_of(c.host_k, c.host_v)
        assert c.nbytes() == c.nbytes("host") + c.nbytes("device")
    assert big.nbytes("device") - small.nbytes("device") == nbytes_of(big.rep_k) - nbytes_of(small.rep_k)
    assert big.nbytes("host") > 3 * small.nbytes("host")
    q, k, v = (jnp.ones((b, 1, x, d)) for x in (h, hkv, hkv))
    jaxpr = jax.make_jaxpr(lambda c: c.update(k, v, jnp.full((b, 1), 30, jnp.int32), queries=Queries(q)))(small)
    moved = {"Host": 0, "Device": 0}

    def count(jaxpr):                      # device_put copies, inside nested jits too
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "device_put":
                moved[str(eqn.params["devices"][0]).split(".")[-1]] += sum(nbytes_of(o.aval) for o in eqn.outvars)
            for p in eqn.params.values():
                if hasattr(p, "jaxpr") and hasattr(p.jaxpr, "eqns"):
                    count(p.jaxpr)

    count(jaxpr.jaxpr)
    per_block = 3 * hkv * d * 4 * 2                                    # keys + values of one block
    assert small.transfer_bytes() == dict(host_to_device=b * 3 * per_block, device_to_host=b * 2 * per_block)
    if small.memory_kind != "device":
        assert moved == {"Device": small.transfer_bytes()["host_to_device"],
                         "Host": small.transfer_bytes()["device_to_host"]}
    on_device = _cache(b, 41, hkv, d, h, memory_kind="device")
    assert on_device.transfer_bytes() == dict(host_to_device=0, device_to_host=0)


def test_bad_input_raises():
    b, h, hkv, d = 1, 4, 2, 8
    c = _cache(b, 20, hkv, d, h)
    q, k, v = _rand(5, b, 6, h, hkv, d)
    pos = jnp.arange(6, dtype=jnp.int32)[None]
    with pytest.raises(ValueError, match="queries"):
        c.update(k, v, pos)
    with pytest.raises(ValueError, match="queries.q"):
        c.update(k, v, pos, queries=Queries(q[:, :, :2]))
    with pytest.raises(ValueError, match="beyond the cache"):
        c.update(k[:, :1], v[:, :1], jnp.array([[20]], jnp.int32), queries=Queries(q[:, :1]))
    with pytest.raises(ValueError, match="holds positions 0 .. 5"):
        c.update(k, v, pos + 1, queries=Queries(q))
    full = _prefill(c, q, k, v, pos)
    with pytest.raises(ValueError, match="empty cache"):
        full.update(k, v, pos + 6, queries=Queries(q))
    with pytest.raises(ValueError, match="new keys"):
        c.update(k[..., :4], v, pos, queries=Queries(q))
    for kw, word in ((dict(window=0), "window"), (dict(block_size=0), "block_size"), (dict(num_sinks=-1), "num_sinks"),
                     (dict(num_repr=0), "num_repr"), (dict(top_blocks=0), "top_blocks"),
                     (dict(memory_kind="disk"), "memory_kind"), (dict(num_sinks=20), "num_sinks")):
        with pytest.raises(ValueError, match=word):
            _cache(b, 20, hkv, d, h, **kw)
    with pytest.raises(ValueError, match="num_heads"):
        OffloadKVCache.init(b, 20, hkv, d, num_heads=3)
    for kw, word in ((dict(window=0), "window"), (dict(num_sinks=-1), "num_sinks"), (dict(memory_kind="x"), "memory_kind")):
        with pytest.raises(ValueError, match=word):
            InfLLM(**kw)
    with pytest.raises(ValueError, match="window"):
        infllm.local_window_scores(q, k, pos, pos, window=0)
    with pytest.raises(ValueError, match="num_repr"):
        infllm.representative_keys(jnp.zeros((1, 1, 2, 2, 4)), jnp.zeros((1, 1, 2, 4)), jnp.ones((1, 1, 2), bool),
                                   num_repr=0, num_heads=4)


def test_full_cache_update_under_jit_and_scan():
    """`FullKVCache.update`'s eager capacity check (`int(np.max(positions))`) is skipped for
    traced positions: positions built inside `jit` (constants too) and inside `scan` trace."""
    c = FullKVCache.init(2, 16, 2, 4)
    k = jnp.ones((2, 3, 2, 4))

    def built_inside(c):
        return c.update(k, k, jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (2, 3)))[3]

    assert jax.jit(built_inside)(c).positions[:, :3].tolist() == [[0, 1, 2]] * 2

    def body(c, t):
        return c.update(k[:, :1], k[:, :1], jnp.full((2, 1), t, jnp.int32))[3], None

    out, _ = jax.lax.scan(body, c, jnp.arange(4, dtype=jnp.int32))
    assert out.positions[0, :5].tolist() == [0, 1, 2, 3, -1]


@pytest.mark.slow
def test_model_decode_under_the_policy_jitted_equals_the_dense_model():
    """`policy_caches(model, InfLLM(...))` on a SparseLM (F and W layers): prompt, then
    jitted decode steps with the caches donated, every block retrieved -> the dense
    model's logits; the block store stays in host memory."""
    from flax import nnx

    from sparse_jax.kv_policies import policy_caches
    from sparse_jax.models.lm import LMConfig, SparseLM

    model = SparseLM(LMConfig(vocab_size=32, layer_spec="FW", d_model=32, num_heads=4, num_kv_heads=2, window=4),
                     rngs=nnx.Rngs(0))
    t, new = 12, 5
    tokens = jax.random.randint(jax.random.key(1), (1, t + new), 0, 32)
    pos = jnp.arange(t + new, dtype=jnp.int32)[None]
    caches = policy_caches(model, InfLLM(window=3, block_size=4, num_sinks=2, num_repr=2, top_blocks=8),
                           batch=1, prompt_len=t, max_new=new)
    step = jax.jit(lambda c, x, p: model(x, p, c), donate_argnums=0)
    _, caches = step(caches, tokens[:, :t], pos[:, :t])
    got = []
    for i in range(t, t + new):
        logits, caches = step(caches, tokens[:, i:i + 1], pos[:, i:i + 1])
        got.append(logits)
    want, _ = model(tokens)
    np.testing.assert_allclose(jnp.concatenate(got, 1), want[:, t:], atol=2e-5, rtol=2e-5)
    assert caches[0].host_k.sharding.memory_kind == host_memory_kind()
