"""NSA (arXiv 2502.11089): ops and layer against a brute-force reference written here.

The reference shares no code with the library: its own RoPE, compression MLP, masks built
by python loops from the paper's definitions (compressed block i = tokens i*d..i*d+l-1,
visible when its last token is at or before t; selection scores as the summed cmp
probability of every compressed block overlapping a selection block, 1/d per shared
token; top-n with the forced first and local blocks; window of w), its own softmax, gates
and output projection. Forward in numpy (float64), gradients from the same function on
`jax.numpy` with the selection fixed (it has no gradient).

Rows are ragged: row 0 full, row 1 stops early (positions -1 after), row 2 all padding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_jax.cache.nsa import NSACache
from sparse_jax.layers.attention import AttentionConfig
from sparse_jax.layers.nsa import NSAAttention
from sparse_jax.ops import nsa as ops
from sparse_jax.ops import selection
from sparse_jax.ops.nsa import NSAConfig
from gpu_testing import has_gpu

D_MODEL, HEADS, HEAD_DIM, THETA = 32, 16, 8, 10000.0
L, D, LS, N, NI, NL, W = 8, 4, 8, 5, 1, 2, 16      # cmp_block, stride, sel_block, n, forced, window
T = 53
LENGTHS = (T, 30, 0)


def nsa_cfg(**kw):
    base = dict(cmp_block=L, cmp_stride=D, sel_block=LS, num_selected=N, num_initial=NI,
                num_local=NL, window=W, query_block=4)
    base.update(kw)
    return NSAConfig(**base)


def make_layer(kv=4, gate=False, rope=True, seed=0, impl="auto", interpret=False, **kw):
    cfg = AttentionConfig(d_model=D_MODEL, num_heads=HEADS, num_kv_heads=kv, head_dim=HEAD_DIM,
                          rope_theta=THETA if rope else None, output_gate=gate, impl=impl)
    layer = NSAAttention(cfg, nsa_cfg(**kw), interpret=interpret, rngs=nnx.Rngs(seed))
    # Zero-initialised biases would hide them from the checks: make every parameter matter.
    rng = np.random.default_rng(seed + 5)
    for mod in (layer.phi_k, layer.phi_v):
        for name in ("b1", "b2", "pos_emb"):
            p = getattr(mod, name)
            p[...] = jnp.asarray(0.3 * rng.normal(size=p.shape).astype(np.float32))
    layer.b_gate[...] = jnp.asarray(rng.normal(size=layer.b_gate.shape).astype(np.float32))
    return layer


def params_of(layer):
    return jax.tree.map(np.asarray, nnx.state(layer, nnx.Param).to_pure_dict())


def ragged_inputs(seed=0, lengths=LENGTHS, length=T):
    rng = np.random.default_rng(seed)
    x = (1.5 * rng.normal(size=(len(lengths), length, D_MODEL))).astype(np.float32)
    pos = np.full((len(lengths), length), -1, np.int32)
    for b, n in enumerate(lengths):
        pos[b, :n] = np.arange(n)
    return x, pos


# ----------------------------------------------------------------------------- reference


def ref_rope(xp, x, pos):
    half = x.shape[-1] // 2
    freqs = THETA ** (-np.arange(half) / half)
    ang = np.asarray(pos, np.float64)[:, None, None] * freqs
    x1, x2 = x[..., :half], x[..., half:]
    return xp.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def ref_phi(xp, blk, p):
    """blk [l, Hkv, hd] -> [Hkv, hd]."""
    x = blk + p["pos_emb"]
    pre = xp.einsum("lhd,ldm->hm", x, p["w1"]) + p["b1"]
    h = pre / (1 + xp.exp(-pre))
    return x.mean(0) + h @ p["w2"] + p["b2"]


def ref_attend(xp, q, k, v, mask):
    """q [n, H, hd], k/v [m, Hkv, hd], mask [Hkv, n, m] -> out [n, H, hd], probs [H, n, m]."""
    g = q.shape[1] // k.shape[1]
    outs, probs = [], []
    for h in range(q.shape[1]):
        s = q[:, h] @ k[:, h // g].T / np.sqrt(q.shape[-1])
        mk = mask[h // g]
        s = xp.where(mk, s, -1e30)
        e = xp.exp(s - s.max(-1, keepdims=True)) * mk
        den = e.sum(-1, keepdims=True)
        p = e / xp.where(den > 0, den, 1.0)
        outs.append(p @ v[:, h // g])
        probs.append(p)
    return xp.stack(outs, 1), xp.stack(probs, 0)


def overlap(i, j, cfg):
    return len(set(range(i * cfg.cmp_stride, i * cfg.cmp_stride + cfg.cmp_block))
               & set(range(j * cfg.sel_block, (j + 1) * cfg.sel_block)))


def ref_scores(p_cmp, hkv, cfg, ns):
    """p_cmp [H, n, nb] -> [Hkv, n, ns]: summed cmp mass of overlapping blocks, 1/d per token."""
    h, n, nb = p_cmp.shape
    g = h // hkv
    out = np.zeros((hkv, n, ns))
    for j in range(ns):
        for i in range(nb):
            w = overlap(i, j, cfg) / cfg.cmp_stride
            if w:
                for kh in range(hkv):
                    out[kh, :, j] += w * p_cmp[kh * g:(kh + 1) * g, :, i].sum(0)
    return out


def ref_select(scores_t, t, cfg):
    """Selected blocks of one query at position t from its scores [ns] (a python set)."""
    cand = [j for j in range(len(scores_t)) if j * cfg.sel_block <= t]
    cur = t // cfg.sel_block
    forced = [j for j in cand if j < cfg.num_initial or j > cur - cfg.num_local]
    rest = sorted((j for j in cand if j not in forced), key=lambda j: (-scores_t[j], j))
    return set(forced) | set(rest[:cfg.num_selected - len(forced)])


def ref_forward(xp, prm, x, cfg, hkv, rope=True, masks=None):
    """One unpadded row x [n, d_model] (positions 0..n-1) -> (y, parts); parts holds the
    branch outputs, cmp probs, selections and masks (pass them back for the jnp pass)."""
    n = x.shape[0]
    pos = np.arange(n)
    rot = (lambda a, p: ref_rope(xp, a, p)) if rope else (lambda a, p: a)
    proj = lambda w: xp.einsum("td,dhk->thk", x, w)
    q = rot(proj(prm["wq"]), pos)
    kc, vc = proj(prm["wk_cmp"]), proj(prm["wv_cmp"])
    ks, vs = rot(proj(prm["wk_slc"]), pos), proj(prm["wv_slc"])
    kw, vw = rot(proj(prm["wk_win"]), pos), proj(prm["wv_win"])
    l, d = cfg.cmp_block, cfg.cmp_stride
    ends = [i * d + l - 1 for i in range(n) if i * d + l - 1 < n]          # blocks inside the row
    h = q.shape[1]
    if ends:
        ck = xp.stack([rot(ref_phi(xp, kc[e - l + 1:e + 1], prm["phi_k"])[None], np.array([e]))[0]
                       for e in ends])
        cv = xp.stack([ref_phi(xp, vc[e - l + 1:e + 1], prm["phi_v"]) for e in ends])
        cmask = np.array([[e <= t for e in ends] for t in range(n)])[None].repeat(hkv, 0)
        o_cmp, p_cmp = ref_attend(xp, q, ck, cv, cmask)
    else:
        o_cmp, p_cmp = xp.zeros_like(q), np.zeros((h, n, 0))
    if masks is None:
        ns = -(-n // cfg.sel_block)
        scores = ref_scores(np.asarray(p_cmp, np.float64), hkv, cfg, ns)
        sel = [[ref_select(scores[kh, t], t, cfg) for t in range(n)] for kh in range(hkv)]
        if cfg.selection == "query_block":
            qb = cfg.query_block
            sel = [[set().union(*row[t // qb * qb:(t // qb + 1) * qb]) for t in range(n)] for row in sel]
        smask = np.array([[[s <= t and s // cfg.sel_block in sel[kh][t] for s in range(n)]
                           for t in range(n)] for kh in range(hkv)])
        wmask = np.array([[t - cfg.window < s <= t for s in range(n)] for t in range(n)])[None].repeat(hkv, 0)
        masks = dict(slc=smask, win=wmask, sel=sel, scores=scores)
    o_slc, _ = ref_attend(xp, q, ks, vs, masks["slc"])
    o_win, _ = ref_attend(xp, q, kw, vw, masks["win"])
    pre = xp.einsum("td,dhc->thc", x, prm["w_gate"]) + prm["b_gate"]
    g = 1 / (1 + xp.exp(-pre))
    o = g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win
    if "wg" in prm and prm["wg"] is not None:
        o = o / (1 + xp.exp(-xp.einsum("td,dhk->thk", x, prm["wg"])))
    y = xp.einsum("thk,hkd->td", o, prm["wo"])
    return y, dict(cmp=o_cmp, slc=o_slc, win=o_win, p_cmp=p_cmp, masks=masks)


def as64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# ----------------------------------------------------------------------------- layer calls


@functools.partial(jax.jit, static_argnums=0)
def _call_impl(graphdef, state, x, pos, cache):
    return nnx.merge(graphdef, state)(x, pos, cache)


def call(layer, x, pos, cache=None):
    graphdef, state = nnx.split(layer)
    return _call_impl(graphdef, state, jnp.asarray(x), jnp.asarray(pos), cache)


@functools.partial(jax.jit, static_argnums=0)
def _branches_impl(graphdef, state, x, pos):
    out, gates, _ = nnx.merge(graphdef, state).branches(x, pos)
    return out, gates


def branches(layer, x, pos):
    graphdef, state = nnx.split(layer)
    return _branches_impl(graphdef, state, jnp.asarray(x), jnp.asarray(pos))


def assert_close(got, want, tol=2e-5, what=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want).max() if got.size else 0.0
    scale = max(1.0, np.abs(want).max() if want.size else 0.0)
    assert err <= tol * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


def check_against_reference(layer, x, pos, kv, rope=True):
    y = np.asarray(call(layer, x, pos)[0])
    prm = as64(params_of(layer))
    for b, n in enumerate(LENGTHS if x.shape[1] == T else [int((p >= 0).sum()) for p in pos]):
        if n:
            want, _ = ref_forward(np, prm, np.asarray(x[b, :n], np.float64), layer.nsa, kv, rope)
            assert_close(y[b, :n], want, what=f"row {b}")
        assert (y[b, n:] == 0).all(), "padded queries must give exact zeros"


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("kw, match", [
    (dict(cmp_block=10, cmp_stride=4), "cmp_block"),
    (dict(sel_block=6, cmp_stride=4), "sel_block"),
    (dict(num_selected=2, num_initial=1, num_local=2), "num_selected"),
    (dict(cmp_stride=0), "cmp_stride"),
    (dict(window=0), "window"),
    (dict(num_local=-1), "num_local"),
    (dict(selection="dense"), "selection"),
    (dict(query_block=0), "query_block"),
    (dict(cmp_mlp_dim=0), "cmp_mlp_dim"),
])
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        nsa_cfg(**kw)


def test_unsupported_layer_options_raise():
    for kw in (dict(learned_sinks=True), dict(softcap=2.0)):
        cfg = AttentionConfig(d_model=D_MODEL, num_heads=4, **kw)
        with pytest.raises(ValueError, match=next(iter(kw))):
            NSAAttention(cfg, nsa_cfg(), rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- ops pieces


@pytest.mark.parametrize("l, d, ls", [(8, 4, 8), (32, 16, 64), (4, 4, 4), (12, 4, 8), (8, 2, 4), (4, 2, 16)])
def test_selection_scores_are_token_overlap_mass(l, d, ls):
    cfg = NSAConfig(cmp_block=l, cmp_stride=d, sel_block=ls, num_selected=3)
    p = np.random.default_rng(l + d + ls).random((2, 3, 11))
    ns = 7
    got = np.asarray(ops.selection_scores(jnp.asarray(p, jnp.float32), ns, cfg))
    want = np.zeros((2, 3, ns))
    for j in range(ns):
        for i in range(11):
            want[..., j] += p[..., i] * overlap(i, j, cfg) / d
    assert_close(got, want, 1e-6, "scores")
    if l == ls == d:
        assert_close(got[..., :11 if ns > 11 else ns], p[..., :ns], 1e-6, "l = l' = d gives p_cmp")


def test_cmp_blocks_visibility():
    """Blocks exist iff all l tokens are there; query t sees block i iff i*d + l - 1 <= t."""
    layer = make_layer()
    x, pos = ragged_inputs()
    cfg = layer.nsa
    k = jnp.asarray(np.random.default_rng(1).normal(size=(3, T, 4, HEAD_DIM)).astype(np.float32))
    _, _, ids = ops.gather_cmp_blocks(k, k, jnp.asarray(pos), jnp.asarray(pos), cfg)
    for b, n in enumerate(LENGTHS):
        want = {i for i in range(n) if i * D + L - 1 < n}
        assert set(np.asarray(ids[b]).tolist()) - {-1} == want
    out, _ = branches(layer, x, pos)
    p = np.asarray(out.p_cmp)                                               # [B, Hkv, T, N]
    visible = np.array([[[t < n and i * D + L - 1 <= t for i in range(p.shape[-1])] for t in range(T)]
                        for n in LENGTHS])
    assert ((p > 0) == visible[:, None]).all()          # and exact zeros elsewhere (p >= 0)


def test_select_blocks_forced_causal_topn():
    cfg = nsa_cfg()
    rng = np.random.default_rng(3)
    ns = 7
    scores = rng.random((2, 3, T, ns)).astype(np.float32)
    pos = np.stack([np.arange(T), np.where(np.arange(T) < 20, np.arange(T), -1)]).astype(np.int32)
    idx = np.asarray(ops.select_blocks(jnp.asarray(scores), jnp.asarray(pos), cfg))   # [B, T, Hkv, n]
    assert idx.shape == (2, T, 3, N)
    for b in range(2):
        for t in range(T):
            for h in range(3):
                got = set(idx[b, t, h].tolist()) - {-1}
                want = ref_select(scores[b, h, t], pos[b, t], cfg) if pos[b, t] >= 0 else set()
                assert got == want, (b, t, h)
                if pos[b, t] >= 0:
                    assert 0 in got and pos[b, t] // LS in got


def random_selection_inputs(seed, b, t, h, hkv, cfg):
    """Random q/k/v (position-indexed keys), ragged positions (row 1 shorter, rest -1) and
    a selection from `select_blocks` on random scores."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, HEAD_DIM)).astype(np.float32))
               for n in (h, hkv, hkv))
    pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    if b > 1:
        pos[1, max(1, t - 7):] = -1
    ns = -(-t // cfg.sel_block)
    scores = jnp.asarray(rng.random((b, hkv, t, ns)).astype(np.float32))
    idx = ops.select_blocks(scores, jnp.asarray(pos), cfg)
    return q, k, v, jnp.asarray(pos), idx


@pytest.mark.parametrize("t, hkv", [(29, 4), (5, 1)])     # (16 is in test_kernel_layer_*)
def test_selected_attention_on_token_sparse_kernel(t, hkv):
    """Exact selection through `token_sparse` (Triton, interpret) vs the dense-mask path,
    forward and gradients; t=5 is shorter than one selection block."""
    cfg = nsa_cfg(num_selected=3)
    q, k, v, pos, idx = random_selection_inputs(t + hkv, 2, t, HEADS, hkv, cfg)
    cot = jnp.asarray(np.random.default_rng(1).normal(size=q.shape).astype(np.float32))
    kernel = functools.partial(ops.selected_attention_sparse, impl="triton", interpret=True)

    @jax.jit
    def out_and_grads(q, k, v):
        outs = [jax.vjp(lambda q, k, v: fn(q, k, v, pos, pos, idx, cfg), q, k, v)
                for fn in (kernel, ops.selected_attention)]
        return [(o, pull(cot)) for o, pull in outs]

    (out, grads), (want, grads_ref) = out_and_grads(q, k, v)
    assert_close(out, want, 1e-5, "slc out")
    assert (np.asarray(out)[np.asarray(pos) < 0] == 0).all()
    for name, g, w in zip("qkv", grads, grads_ref):
        assert_close(g, w, 1e-5, f"d{name}")
        assert np.abs(np.asarray(w)).max() > 0


# ----------------------------------------------------------------------------- branches and layer


@pytest.mark.parametrize("mode", ["token", "query_block"])
def test_each_branch_matches_reference(mode):
    layer = make_layer(kv=4, selection=mode)
    x, pos = ragged_inputs()
    out, _ = branches(layer, x, pos)
    prm = as64(params_of(layer))
    for b, n in enumerate(LENGTHS[:2]):
        _, parts = ref_forward(np, prm, np.asarray(x[b, :n], np.float64), layer.nsa, 4)
        for name in ("cmp", "slc", "win"):
            assert_close(np.asarray(getattr(out, name))[b, :n], parts[name], what=f"{mode} {name} row {b}")
        nb = parts["p_cmp"].shape[-1]
        p = np.asarray(out.p_cmp)[b]                                        # group sums
        want_p = parts["p_cmp"].reshape(4, HEADS // 4, n, nb).sum(1)
        assert_close(p[:, :n, :nb], want_p, what="p_cmp")
        if mode == "token":
            idx = np.asarray(out.block_indices)[b]
            for t in range(n):
                for h in range(4):
                    assert set(idx[t, h].tolist()) - {-1} == parts["masks"]["sel"][h][t]


@pytest.mark.parametrize("kv", [16, 4, 1])                # GQA groups of 1, 4 and 16 heads
def test_layer_prefill_matches_reference(kv):
    layer = make_layer(kv=kv, gate=kv == 4)
    x, pos = ragged_inputs(seed=kv)
    check_against_reference(layer, x, pos, kv)


def test_layer_without_rope_matches_reference():
    layer = make_layer(kv=2, rope=False)
    x, pos = ragged_inputs(seed=5)
    check_against_reference(layer, x, pos, 2, rope=False)


def test_sequence_shorter_than_one_block():
    """T < l: no compressed block, the cmp branch gives zeros (not NaN), the rest is exact."""
    layer = make_layer(kv=2)
    x, pos = ragged_inputs(seed=2, lengths=(6, 3), length=6)
    out, _ = branches(layer, x, pos)
    assert (np.asarray(out.cmp) == 0).all() and np.isfinite(np.asarray(out.slc)).all()
    check_against_reference(layer, x, pos, 2)


def test_gradients_finite_and_match_reference():
    layer = make_layer(kv=4, gate=True)
    x, pos = ragged_inputs(seed=7)
    cot = np.random.default_rng(11).normal(size=x.shape).astype(np.float32)
    cot[pos < 0] = 0
    graphdef, state = nnx.split(layer)

    def f(state, x):
        return nnx.merge(graphdef, state)(x, jnp.asarray(pos))[0]

    _, pull = jax.vjp(jax.jit(f), state, jnp.asarray(x))
    g_state, g_x = pull(jnp.asarray(cot))
    g_state = jax.tree.map(np.asarray, g_state.to_pure_dict())
    assert all(np.isfinite(v).all() for v in jax.tree.leaves(g_state)) and np.isfinite(np.asarray(g_x)).all()
    prm = params_of(layer)
    rows = [(b, n) for b, n in enumerate(LENGTHS) if n]
    masks = {b: ref_forward(np, as64(prm), np.asarray(x[b, :n], np.float64), layer.nsa, 4)[1]["masks"]
             for b, n in rows}

    def loss(prm, x):
        total = 0.0
        for b, n in rows:
            y, _ = ref_forward(jnp, prm, x[b, :n], layer.nsa, 4, masks=masks[b])
            total = total + (y * cot[b, :n]).sum()
        return total

    want_p, want_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(jax.tree.map(jnp.asarray, prm), jnp.asarray(x))
    assert_close(g_x, want_x, 1e-4, "dx")
    for path, want in jax.tree_util.tree_leaves_with_path(want_p):
        got = functools.reduce(lambda t, k: t[k.key], path, g_state)
        assert_close(got, want, 1e-4, f"d{jax.tree_util.keystr(path)}")


def test_modes_agree_when_query_block_is_one():
    x, pos = ragged_inputs(seed=4)
    y_tok = call(make_layer(kv=4, selection="token"), x, pos)[0]
    y_blk = call(make_layer(kv=4, selection="query_block", query_block=1), x, pos)[0]
    assert_close(y_blk, y_tok, 1e-5, "query_block=1 vs token")


@pytest.mark.parametrize("mode", ["token", "query_block"])
def test_selecting_every_block_is_full_causal_attention(mode):
    layer = make_layer(kv=4, selection=mode, num_selected=-(-T // LS), window=T)
    x, pos = ragged_inputs(seed=6)
    out, _ = branches(layer, x, pos)
    prm = as64(params_of(layer))
    for b, n in enumerate(LENGTHS[:2]):
        causal = np.tril(np.ones((n, n), bool))[None].repeat(4, 0)
        _, parts = ref_forward(np, prm, np.asarray(x[b, :n], np.float64), layer.nsa, 4,
                               masks=dict(slc=causal, win=causal))
        assert_close(np.asarray(out.slc)[b, :n], parts["slc"], what=f"slc vs full causal, row {b}")
        assert_close(np.asarray(out.win)[b, :n], parts["win"], what=f"win vs full causal, row {b}")


# ----------------------------------------------------------------------------- decode


def test_cache_nbytes_by_hand():
    layer = make_layer(kv=4)
    cache = layer.init_cache(2, 40)
    assert isinstance(cache, NSACache)
    per_tok = 2 * 4 * HEAD_DIM * 4                     # k + v, 4 kv heads, float32
    n_cmp = (40 - L) // D + 1
    want = (40 * per_tok + 40 * 4) + (W * per_tok + W * 4) + (L * per_tok + L * 4) + (n_cmp * per_tok + n_cmp * 4)
    assert cache.nbytes() == 2 * want


@pytest.mark.parametrize("kv", [4, 1])
def test_token_by_token_decode_matches_prefill(kv):
    layer = make_layer(kv=kv, gate=True)
    x, pos = ragged_inputs(seed=8)
    y = np.asarray(call(layer, x, pos)[0])
    cache = layer.init_cache(x.shape[0], T + 3)
    got = np.zeros_like(y)
    for t in range(T):
        out, cache = call(layer, x[:, t:t + 1], pos[:, t:t + 1], cache)
        got[:, t] = np.asarray(out)[:, 0]
    valid = pos >= 0
    assert_close(got[valid], y[valid], 3e-5, "decode vs prefill")
    assert (got[~valid] == 0).all()


def test_union_blocks():
    idx = jnp.asarray([[[[3, 0, -1]], [[0, 5, 2]]]])                      # [B=1, T=2, Hkv=1, n=3]
    sel, counts = selection.block_lists(idx, 7)
    assert sel.shape == (1, 1, 6) and counts.tolist() == [[4]]
    assert np.asarray(sel)[0, 0, :4].tolist() == [0, 2, 3, 5]


def test_kernel_decode_matches_prefill():
    """The decode path on the kernels (Triton compressed and decode ops, interpret mode),
    GQA 16: calls of 3 queries (one decode call per query in token mode) against the XLA
    prefill of the same parameters. (query_block mode's shared decode selection:
    test_query_block_chunks_aligned_with_blocks_*; one-query calls: the XLA decode tests.)"""
    length = 18
    layer = make_layer(kv=1, seed=3, impl="triton", interpret=True)
    x, pos = ragged_inputs(seed=12, lengths=(length, 10, 0), length=length)
    y = np.asarray(call(make_layer(kv=1, seed=3), x, pos)[0])
    cache = layer.init_cache(3, length)
    got = []
    for start in range(0, length, 3):
        stop = start + 3
        out, cache = call(layer, x[:, start:stop], pos[:, start:stop], cache)
        got.append(np.asarray(out))
    got = np.concatenate(got, 1)
    assert_close(got[pos >= 0], y[pos >= 0], 3e-5, "kernel decode vs prefill")
    assert (got[pos < 0] == 0).all()


SCHEDULE = ((5, 11, 17), (9, 0, 3), (0, 0, 0))     # tokens per call per row, then 1-token decode


@pytest.mark.parametrize("mode", ["token", "query_block"])
def test_chunked_prefill_then_decode_matches_prefill(mode):
    """Ragged chunks (a chunk longer than the window and than the tail); in query_block mode
    decode shares blocks only within a call, so there the chunks are single query blocks
    of the prefill (query_block = 1 keeps the comparison exact)."""
    layer = make_layer(kv=2, selection=mode, query_block=1)
    x, pos = ragged_inputs(seed=9)
    y = np.asarray(call(layer, x, pos)[0])
    chunk = 20
    cache = layer.init_cache(x.shape[0], T)
    got = np.full_like(y, np.nan)
    done = [0] * 3
    for step in range(len(SCHEDULE[0])):
        xc = np.random.default_rng(step).normal(size=(3, chunk, D_MODEL)).astype(np.float32)
        pc = np.full((3, chunk), -1, np.int32)
        for b, sched in enumerate(SCHEDULE):
            n = sched[step]
            xc[b, :n], pc[b, :n] = x[b, done[b]:done[b] + n], np.arange(done[b], done[b] + n)
        out, cache = call(layer, xc, pc, cache)
        out = np.asarray(out)
        assert (out[pc < 0] == 0).all()
        for b, sched in enumerate(SCHEDULE):
            got[b, done[b]:done[b] + sched[step]] = out[b, :sched[step]]
            done[b] += sched[step]
    while any(d_ < n for d_, n in zip(done, LENGTHS)):
        xs, ps = np.zeros((3, 1, D_MODEL), np.float32), np.full((3, 1), -1, np.int32)
        for b, n in enumerate(LENGTHS):
            if done[b] < n:
                xs[b, 0], ps[b, 0] = x[b, done[b]], done[b]
        out, cache = call(layer, xs, ps, cache)
        for b, n in enumerate(LENGTHS):
            if done[b] < n:
                got[b, done[b]] = np.asarray(out)[b, 0]
                done[b] += 1
    valid = pos >= 0
    assert not np.isnan(got[valid]).any()
    assert_close(got[valid], y[valid], 3e-5, f"{mode}: chunked + decode vs prefill")


def test_query_block_chunks_aligned_with_blocks_match_prefill():
    """query_block mode: calls that cover whole query blocks reproduce the prefill (the
    4-query call takes the decode path with one shared selection)."""
    layer = make_layer(kv=2, selection="query_block", query_block=4)
    x, pos = ragged_inputs(seed=10, lengths=(T - 1, T - 1), length=T - 1)      # 52 = 13 blocks of 4
    y = np.asarray(call(layer, x, pos)[0])
    cache = layer.init_cache(2, T)
    got = []
    for start, stop in ((0, 12), (12, 16), (16, 20), (20, 52)):
        out, cache = call(layer, x[:, start:stop], pos[:, start:stop], cache)
        got.append(np.asarray(out))
    assert_close(np.concatenate(got, 1), y, 3e-5, "aligned chunks vs prefill")


# ----------------------------------------------------------------------------- model


def test_lm_with_nsa_layers():
    from sparse_jax.models.lm import LMConfig, SparseLM
    with pytest.raises(ValueError, match="nsa"):
        LMConfig(vocab_size=16, layer_spec="NW", nsa=None)
    cfg = LMConfig(vocab_size=16, layer_spec="NW", d_model=32, num_heads=4, num_kv_heads=2, window=8,
                   nsa=nsa_cfg())
    model = SparseLM(cfg, rngs=nnx.Rngs(0))
    assert isinstance(model.blocks[0].attn, NSAAttention)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 16, size=(2, 20)))
    logits, _ = model(tokens)
    assert logits.shape == (2, 20, 16) and np.isfinite(np.asarray(logits)).all()
    assert isinstance(model.init_cache(2, 20)[0], NSACache)


# ----------------------------------------------------------------------------- compiled (GPU)


def kernel_vs_xla_case(mode, t, dtype, interpret=False):
    """All three branches on the kernels (prefill, then a one-query decode step at the last
    position) vs `impl="xla"`: max relative errors (prefill, decode)."""
    cfg = NSAConfig(num_selected=4, window=128, selection=mode)          # l=32, d=16, l'=64
    rng = np.random.default_rng(t)
    h, hkv, hd = 16, 4, 64
    n = ops.num_cmp_blocks(t, cfg)
    arr = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)      # noqa: E731
    q = arr(2, t, h, hd)
    kv = dict(k_cmp=arr(2, n, hkv, hd), v_cmp=arr(2, n, hkv, hd), k_slc=arr(2, t, hkv, hd),
              v_slc=arr(2, t, hkv, hd), k_win=arr(2, t, hkv, hd), v_win=arr(2, t, hkv, hd))
    pos = np.tile(np.arange(t, dtype=np.int32), (2, 1))
    pos[1, t - 40:] = -1
    pos = jnp.asarray(pos)
    kv.update(cmp_positions=jnp.tile(ops.cmp_block_end(jnp.arange(n), cfg), (2, 1)),
              slc_positions=pos, win_positions=pos)
    err = lambda a, b: float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max()  # noqa: E731
                             / max(np.abs(np.asarray(b, np.float32)).max(), 1e-30))
    res = []
    for fn, qq, qp in ((ops.nsa_branches, q, pos), (ops.nsa_decode_branches, q[:, -1:], pos[:, -1:])):
        run = jax.jit(lambda qq, impl, interp: fn(qq, qp, cfg=cfg, impl=impl, interpret=interp, **kv),
                      static_argnums=(1, 2))
        got = run(qq, "triton", interpret)
        with jax.default_matmul_precision("highest"):
            want = run(qq, "xla", False)
        # Near-tied scores may select differently under TF32 / bf16: compare the slc branch
        # on the queries whose selections agree, and require that to be nearly all of them.
        same = (np.sort(np.asarray(got.block_indices), -1)
                == np.sort(np.asarray(want.block_indices), -1)).all(-1).all(-1)      # [B, T]
        assert same.mean() > 0.97, f"selections differ on {1 - same.mean():.1%} of the queries"
        res.append(max(err(got.cmp, want.cmp), err(got.win, want.win),
                       err(np.asarray(got.slc)[same], np.asarray(want.slc)[same])))
    return tuple(res)


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("mode", ["token", "query_block"])
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 3e-3), (jnp.bfloat16, 2e-2)])
def test_kernels_compiled_on_gpu(mode, dtype, tol):
    with jax.default_device(jax.devices("gpu")[0]):
        errs = kernel_vs_xla_case(mode, 700, dtype)
    assert max(errs) < tol, errs
