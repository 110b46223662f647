"""Double-P (sparse_jax.ops.doublep, sparse_jax.cache.doublep, kv_policies.DoubleP):
k-means against a numpy Lloyd, cluster summaries, top_p = 1 equals dense attention, exact
centroids when clusters hold copies of one key, fewer tokens read on peaked heads, the cache
against the reference, decode through a jitted SparseLM on ragged rows, nbytes, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels.common import masked_attention
from sparse_jax.cache.base import Queries, weighted_attention
from sparse_jax.cache.doublep import DoublePCache, DoublePPrefill
from sparse_jax.kv_policies import DoubleP, policy_caches
from policy_testing import generate, policy_model, ragged_batch
from sparse_jax.ops import doublep as dp


cluster_prompt = jax.jit(dp.cluster_prompt, static_argnames=("num_clusters", "iters"))
doublep_attention = jax.jit(dp.doublep_attention, static_argnames=("top_p", "keep_p"))
prefill = jax.jit(lambda cache, k, v, pos: cache.update(k, v, pos, queries=None))


def _np_kmeans(x, valid, c, iters):
    """Lloyd's k-means in numpy, one set: same deterministic init as the op."""
    xs = x[valid].astype(np.float64)
    n = len(xs)
    if n == 0:
        return None, np.full(len(x), -1)
    cent = xs[(np.arange(c) * n) // c].copy()

    def nearest(cent):
        return ((xs[:, None] - cent[None]) ** 2).sum(-1).argmin(-1)
    for _ in range(iters):
        a = nearest(cent)
        for i in range(c):
            if (a == i).any():
                cent[i] = xs[a == i].mean(0)
    out = np.full(len(x), -1)
    out[valid] = nearest(cent)
    return cent, out


def test_kmeans_matches_numpy_lloyd_on_ragged_rows():
    """Centroids and assignments equal a numpy Lloyd from the same init; each valid token
    is assigned its nearest centroid, padding -1; rows with fewer valid tokens than
    clusters and with none."""
    rng = np.random.default_rng(0)
    s, d, c = 37, 4, 6
    x = rng.normal(size=(4, s, d)).astype(np.float32)
    valid = np.zeros((4, s), bool)
    valid[0] = True
    valid[1, 5:29] = True                       # ragged, not starting at 0
    valid[2, [3, 8, 30]] = True                 # fewer than C valid tokens
    cent, assign = dp.kmeans(jnp.asarray(x), jnp.asarray(valid), c, iters=3)
    cent, assign = np.asarray(cent), np.asarray(assign)
    for row in range(4):
        ref_c, ref_a = _np_kmeans(x[row], valid[row], c, 3)
        np.testing.assert_array_equal(assign[row], ref_a)
        if ref_c is not None:
            np.testing.assert_allclose(cent[row][np.unique(ref_a[ref_a >= 0])],
                                       ref_c[np.unique(ref_a[ref_a >= 0])], atol=1e-5)
        dist = ((x[row][:, None] - cent[row][None]) ** 2).sum(-1)
        ok = valid[row]
        np.testing.assert_array_less(dist[ok, assign[row][ok]] - 1e-5, dist[ok].min(-1) + 1e-9)
    assert (assign[3] == -1).all() and (assign[~valid] == -1).all()
    assert len(np.unique(assign[2][valid[2]])) == 3        # three distinct tokens, three clusters


def test_kmeans_recovers_separated_blobs():
    """Four far-apart blobs of ragged sizes -> four pure clusters."""
    rng = np.random.default_rng(1)
    centers = 20.0 * np.eye(4, 8)
    label = np.repeat(np.arange(4), [3, 9, 5, 14])
    perm = rng.permutation(len(label))
    label = label[perm]
    x = (centers[label] + 0.1 * rng.normal(size=(len(label), 8))).astype(np.float32)
    _, assign = dp.kmeans(jnp.asarray(x)[None], jnp.ones((1, len(label)), bool), 4, iters=5)
    assign = np.asarray(assign)[0]
    for i in range(4):
        assert len(np.unique(assign[label == i])) == 1
    assert len(np.unique(assign)) == 4


def test_cluster_summaries_and_sizes():
    """Centroids / mean values are the members' means, sizes count the valid tokens."""
    rng = np.random.default_rng(2)
    b, s, hkv, d, c = 2, 13, 2, 4, 3
    k = rng.normal(size=(b, s, hkv, d)).astype(np.float32)
    v = rng.normal(size=(b, s, hkv, 5)).astype(np.float32)
    pos = np.tile(np.arange(s, dtype=np.int32), (b, 1))
    pos[1, 9:] = -1
    assign, cent, log_sizes, mean_v = (np.asarray(a) for a in cluster_prompt(
        jnp.asarray(k), jnp.asarray(v), jnp.asarray(pos), num_clusters=c))
    assert assign.shape == (b, s, hkv) and (assign[1, 9:] == -1).all() and (assign[pos >= 0] >= 0).all()
    sizes = np.where(np.isfinite(log_sizes), np.exp(log_sizes), 0)
    np.testing.assert_allclose(sizes.sum(-1), [[13, 13], [9, 9]], atol=1e-4)
    for bi in range(b):
        for h in range(hkv):
            for i in range(c):
                members = assign[bi, :, h] == i
                if members.any():
                    np.testing.assert_allclose(cent[bi, i, h], k[bi, members, h].mean(0), atol=1e-5)
                    np.testing.assert_allclose(mean_v[bi, i, h], v[bi, members, h].mean(0), atol=1e-5)
                    np.testing.assert_allclose(log_sizes[bi, h, i], np.log(members.sum()), atol=1e-5)
                else:
                    assert log_sizes[bi, h, i] == -np.inf


def _setup(seed, b=2, s=29, hkv=2, group=2, d=8, dtype=jnp.float32, tq=1):
    ks = jax.random.split(jax.random.key(seed), 4)
    k = jax.random.normal(ks[0], (b, s, hkv, d), dtype)
    v = jax.random.normal(ks[1], (b, s, hkv, d), dtype)
    q = jax.random.normal(ks[2], (b, tq, hkv * group, d), dtype) * 2
    pos = np.tile(np.arange(s, dtype=np.int32), (b, 1))
    pos[-1, s - 7:] = -1                         # a ragged row
    qpos = np.asarray(pos.max(1, keepdims=True) + 1 + np.arange(tq), np.int32)
    return q, k, v, jnp.asarray(pos), jnp.asarray(qpos)


def _dense(q, k, v, pos, qpos, softcap=None, sinks=None):
    vis = (pos[:, None, :] <= qpos[:, :, None]) & (pos[:, None, :] >= 0)
    return masked_attention(q, k, v, vis, scale=q.shape[-1] ** -0.5, softcap=softcap, sink_logits=sinks)[0]


@pytest.mark.parametrize("group,dtype", [(1, jnp.float32), (4, jnp.float32), (16, jnp.bfloat16)])
def test_top_p_one_equals_dense(group, dtype):
    """top_p = 1: every cluster exact -> the dense attention (GQA 1/4/16, fp32 / bf16,
    ragged rows, soft-cap and sinks)."""
    q, k, v, pos, qpos = _setup(3, group=group, dtype=dtype, tq=2)
    sinks = jnp.linspace(-1.0, 1.0, q.shape[2])
    assign, cent, log_sizes, mean_v = cluster_prompt(k, v, pos, num_clusters=5)
    cpos = jnp.broadcast_to(pos.max(1, keepdims=True), (2, 5))
    out, exact = doublep_attention(q, k, v, pos, qpos, assign, cent, log_sizes, mean_v, cpos, top_p=1.0,
                                      softcap=20.0, sink_logits=sinks)
    want = _dense(q, k, v, pos, qpos, softcap=20.0, sinks=sinks)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)
    np.testing.assert_array_equal(np.asarray(exact), np.broadcast_to(np.asarray(pos >= 0)[:, None], exact.shape))


def test_centroids_are_exact_for_clusters_of_copies():
    """Clusters whose members share one key: the weighted centroid (log size, mean value)
    equals its members' attention, so any top_p gives the dense result."""
    rng = np.random.default_rng(4)
    b, hkv, d, s = 1, 2, 8, 24
    protos = rng.normal(size=(hkv, 4, d)).astype(np.float32) * 2
    label = np.stack([np.repeat(rng.permutation(4), s // 4) for _ in range(hkv)], 1)   # pure clusters
    k = jnp.asarray(np.stack([protos[h][label[:, h]] for h in range(hkv)], 1)[None])     # [1, S, Hkv, D]
    v = jax.random.normal(jax.random.key(5), (b, s, hkv, d))
    q = jax.random.normal(jax.random.key(6), (b, 1, hkv * 2, d)) * 2
    pos = jnp.arange(s, dtype=jnp.int32)[None]
    qpos = jnp.full((1, 1), s, jnp.int32)
    assign, cent, log_sizes, mean_v = cluster_prompt(k, v, pos, num_clusters=4)
    want = _dense(q, k, v, pos, qpos)
    for p in (0.1, 0.6):
        out, exact = doublep_attention(q, k, v, pos, qpos, assign, cent, log_sizes, mean_v,
                                          jnp.full((1, 4), s - 1), top_p=p)
        np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
        assert int(exact.sum()) < hkv * s


def _structured(peaked_heads):
    """Keys in 8 separated groups of 8 (plus noise); per kv head a query aligned with group
    0 (peaked) or zero (flat attention)."""
    rng = np.random.default_rng(7)
    hkv, d, s = len(peaked_heads), 16, 64
    k = np.zeros((1, s, hkv, d), np.float32)
    for g in range(8):
        k[0, 8 * g:8 * g + 8, :, g] = 3.0
    k += 0.05 * rng.normal(size=k.shape).astype(np.float32)
    q = np.zeros((1, 1, hkv, d), np.float32)
    for h, peaked in enumerate(peaked_heads):
        q[0, 0, h, 0] = 6.0 if peaked else 0.0
    v = rng.normal(size=(1, s, hkv, d)).astype(np.float32)
    pos = jnp.arange(s, dtype=jnp.int32)[None]
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), pos, jnp.full((1, 1), s, jnp.int32)


def test_small_p_reads_fewer_tokens_and_stays_close():
    """A peaked head reads its one heavy cluster (8 of 64 tokens) at top_p = 0.7 and stays
    close to dense; a flat head in the same step reads 6 of its 8 equal clusters (the
    budget adapts per head), the other two through their centroids."""
    q, k, v, pos, qpos = _structured([True, False])
    assign, cent, log_sizes, mean_v = cluster_prompt(k, v, pos, num_clusters=8)
    out, exact = doublep_attention(q, k, v, pos, qpos, assign, cent, log_sizes, mean_v,
                                      jnp.full((1, 8), 63), top_p=0.7)
    counts = np.asarray(exact.sum(-1))[0]
    assert counts[0] == 8 and counts[1] == 48, counts
    want = np.asarray(_dense(q, k, v, pos, qpos))
    err = np.abs(np.asarray(out) - want).max() / np.abs(want).max()
    assert err < 0.02, err
    # without the centroids (approximated clusters dropped) the flat head would be far off
    keep = jnp.where(exact, 0.0, -jnp.inf)
    dropped = weighted_attention(q, k, v, pos, qpos, keep, scale=q.shape[-1] ** -0.5)
    assert np.abs(np.asarray(dropped)[..., 1, :] - want[..., 1, :]).max() > 5 * err
    # keep_p = top_p: the approximated clusters are dropped instead (the paper's first-stage cut)
    out_cut, exact_cut = doublep_attention(q, k, v, pos, qpos, assign, cent, log_sizes, mean_v,
                                           jnp.full((1, 8), 63), top_p=0.7, keep_p=0.7)
    np.testing.assert_allclose(out_cut, dropped, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(exact_cut, exact)


def test_gqa_keeps_each_query_heads_top_p():
    """Two query heads of one kv head peaked on different clusters: both clusters are
    exact (the union of the heads' top-p sets, not the top-p of their mean)."""
    _, k, v, pos, qpos = _structured([True])
    q = np.zeros((1, 1, 2, 16), np.float32)
    q[0, 0, 0, 0] = 6.0
    q[0, 0, 1, 3] = 3.0            # 0.58 of head 1's mass on cluster 3; the heads' mean: 0.49 on 0, 0.29 on 3
    assign, cent, log_sizes, mean_v = cluster_prompt(k, v, pos, num_clusters=8)
    out, exact = doublep_attention(jnp.asarray(q), k, v, pos, qpos, assign, cent, log_sizes, mean_v,
                                   jnp.full((1, 8), 63), top_p=0.45)
    read = np.flatnonzero(np.asarray(exact)[0, 0])
    assert set(read // 8) == {0, 3} and len(read) == 16, read          # the mean's top-0.45 is {0} alone
    want = np.asarray(_dense(jnp.asarray(q), k, v, pos, qpos))
    assert np.abs(np.asarray(out) - want).max() / np.abs(want).max() < 0.05


def test_cache_matches_reference_and_appends_decoded_tokens():
    """DoublePPrefill -> DoublePCache: a decode step returns token + centroid slots whose
    weighted attention equals `doublep_attention` over the same cache; the decoded token
    is read exactly; kept_mask and num_centroids count what was read."""
    q, k, v, pos, _ = _setup(8, b=2, s=21, hkv=2, group=2)
    policy = DoubleP(0.5, cluster_size=4)
    max_len = 24
    _, _, _, sel, cache = prefill(DoublePPrefill(policy, max_len), k, v, pos)
    assert sel.prefill and isinstance(cache, DoublePCache) and cache.num_clusters == 6
    nk, nv = jax.random.normal(jax.random.key(9), (2, 2, 1, 2, 8))
    npos = pos.max(1, keepdims=True) + 1
    step = jax.jit(lambda c, k_, v_, p_, q_: c.update(k_, v_, p_, queries=Queries(q_)))
    keys, values, kv_pos, sel, cache2 = step(cache, nk, nv, npos, q)
    got = weighted_attention(q, keys, values, kv_pos, npos, sel.log_weights, scale=8 ** -0.5)
    full_k = cache2.full.k
    assign = np.asarray(cache.assign).copy()
    want, exact = doublep_attention(q, full_k, cache2.full.v, cache2.full.positions, npos, jnp.asarray(assign),
                                       cache.centroids, cache.log_sizes, cache.mean_values,
                                       cache.centroid_positions, top_p=0.5)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    kept = np.asarray(cache2.kept_mask(max_len))
    np.testing.assert_array_equal(kept, np.asarray(exact))
    for row in range(2):
        assert kept[row, :, int(npos[row, 0])].all()                   # the decoded token, exact
    assert (kept.sum(-1) < np.asarray(pos >= 0).sum(-1)[:, None] + 1).any()
    assert (np.asarray(cache2.num_centroids()) > 0).any()


def test_bad_config_and_input_raise():
    for bad in (dict(top_p=0.0), dict(top_p=1.5), dict(top_p=True), dict(top_p=0.9, keep_p=0.5), dict(keep_p=1.5),
                dict(cluster_size=0), dict(iters=-1),
                dict(dense_layers=-1), dict(cluster_size=2.0)):
        with pytest.raises(ValueError):
            DoubleP(**bad)
    x = jnp.zeros((1, 4, 2))
    with pytest.raises(ValueError, match="num_clusters"):
        dp.kmeans(x, jnp.ones((1, 4), bool), 0)
    with pytest.raises(ValueError, match="valid"):
        dp.kmeans(x, jnp.ones((1, 5), bool), 2)
    with pytest.raises(ValueError, match="top_p"):
        dp.select_clusters(jnp.ones((1, 1, 1, 2)), 0.0)
    with pytest.raises(ValueError, match="keep_p"):
        dp.choose_clusters(jnp.ones((1, 1, 1, 2)), 0.9, 0.5)
    q, k, v, pos, _ = _setup(10, b=1, s=6)
    _, _, _, _, cache = prefill(DoublePPrefill(DoubleP(), 8), k, v, pos)
    with pytest.raises(ValueError, match="queries"):
        cache.update(k[:, :1], v[:, :1], jnp.full((1, 1), 6, jnp.int32))
    with pytest.raises(ValueError, match="max_len"):                    # past capacity (concrete)
        cache.update(k[:, :1], v[:, :1], jnp.full((1, 1), 8, jnp.int32), queries=Queries(q))
    with pytest.raises(ValueError, match="max_len"):                    # a prompt longer than the cache
        DoublePPrefill(DoubleP(), 4).update(k, v, pos, queries=None)


T, NEW = 11, 3


@pytest.fixture(scope="module")
def model():
    return policy_model()


def test_sparse_lm_decode_jitted(model):
    """Through a jitted SparseLM ('F' layers managed, 'W' untouched) on ragged rows: top_p
    = 1 equals the dense model; nbytes counts the full KV and the clusters."""
    caches = policy_caches(model, DoubleP(1.0, cluster_size=3), batch=2, prompt_len=T, max_new=NEW)
    assert isinstance(caches[0], DoublePPrefill) and caches[0].nbytes() == 0
    assert not isinstance(caches[1], DoublePPrefill)
    tokens, positions = ragged_batch(T, NEW, (T, T - 3))
    got, end = generate(nnx.jit(lambda m, t, p, c: m(t, p, c)), model, caches, tokens, positions, T)
    for row, n in enumerate((T, T - 3)):
        keep = np.concatenate([np.arange(n), np.arange(T, T + NEW)])
        want, _ = model(tokens[row:row + 1, keep])
        np.testing.assert_allclose(got[row, keep], want[0], atol=2e-5, rtol=2e-5)
    c = end[0]
    b, s, hkv, d, nc = 2, T + NEW, 2, 8, 4
    assert c.nbytes() == 4 * (2 * b * s * hkv * d + b * s + b * s * hkv + 2 * b * nc * hkv * d + b * hkv * nc + b * nc)


def test_imported_checkpoint_decode():
    """An imported transformers checkpoint (the golden tiny Qwen2: q/k/v biases, GQA, row 1
    left-padded): prompt + jitted Double-P decode with top_p = 1 gives transformers'
    logits."""
    import pathlib

    from sparse_jax.models.hf import load_pretrained

    folder = pathlib.Path(__file__).resolve().parent / "golden" / "hf" / "qwen2"
    model = load_pretrained(folder)
    g = np.load(folder / "logits.npz")
    tokens, positions = jnp.asarray(g["tokens"]), jnp.asarray(g["positions"])
    b, t = tokens.shape
    prompt = t - 3
    caches = policy_caches(model, DoubleP(1.0, cluster_size=4), batch=b, prompt_len=prompt, max_new=t - prompt)
    fwd = nnx.jit(lambda m, x, p, c: m(x, p, c))
    logits, caches = fwd(model, tokens[:, :prompt], positions[:, :prompt], caches)
    outs = [logits]
    for i in range(prompt, t):
        logits, caches = fwd(model, tokens[:, i:i + 1], positions[:, i:i + 1], caches)
        outs.append(logits)
    got = np.asarray(jnp.concatenate(outs, axis=1))
    assert isinstance(caches[0], DoublePCache)
    assert np.abs(got - g["logits"])[g["positions"] >= 0].max() < 1e-4
