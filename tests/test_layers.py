"""The attention layers against a naive reference written here, decode against prefill.

The reference (`reference` below) shares no code with the library: its own einsum
projections from the layer's parameter values, its own RoPE, a dense mask built by python
loops from each paper's definition, repeated KV heads, its own softmax (learned sink
logit in the denominator), gate and output projection, all in float32. The forward pass
runs in numpy; its gradients come from the same function run on `jax.numpy`.

Inputs are ragged on purpose: row 0 is full, row 1 stops early (trailing positions -1,
garbage activations) and row 2 is all padding. Valid outputs must equal the reference run
on the unpadded row alone; padded outputs must be exact zeros (a fully masked row).

Compiles dominate the run time on CPU, so layers run op by op (the per-primitive compiles are
shared by all cases; one whole-function compile per case would cost several times more),
and each case's prefill output and gradients come from one `jax.vjp` call cached per case.
One decode test runs under `jax.jit`, where positions are traced.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_jax import patterns as P
from sparse_jax.cache.kv import FullKVCache, RollingKVCache
from sparse_jax.layers import (AttentionConfig, FullAttention, PatternAttention,
                               SlidingWindowAttention, StreamingLLMAttention)
from sparse_jax.ops import attention as ops

D_MODEL, HEADS, HEAD_DIM = 32, 4, 8
THETA = 10000.0
T = 21                       # not a multiple of the block size: partial blocks on purpose
LENGTHS = (T, 13, 0)         # ragged rows: full, trailing padding, all padding
WINDOW, SINKS = 5, 3         # SWA / StreamingLLM
LF_WINDOW, LF_GLOBAL, LF_DILATION = 3, 2, 2                     # Longformer
BB_BLOCK, BB_WINDOW, BB_GLOBAL, BB_RANDOM, BB_SEED = 4, 3, 1, 2, 3  # BigBird
STRIDE = 4                                                       # Sparse Transformer
BLOCK = 8                                                        # PatternAttention block_size
SOFTCAP = 1.5
KINDS = ("full", "swa", "stream_text", "stream_cache", "longformer", "bigbird", "strided")


# ----------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str
    kv: int = HEADS            # num_kv_heads: 4 = MHA, 2 = GQA, 1 = MQA
    sinks: bool = False        # learned per-head sink logits
    gate: bool = False         # sigmoid output gate
    softcap: float | None = None
    rope: bool = True

    def __str__(self):
        opts = [self.kind, f"kv{self.kv}"] + [n for n in ("sinks", "gate") if getattr(self, n)]
        opts += ["softcap"] if self.softcap else []
        opts += [] if self.rope else ["norope"]
        return "-".join(opts)


# Every layer, and every option on every layer at least once; GQA 1/2/4 on each family.
CASES = [
    Case("full"),
    Case("full", kv=2, sinks=True, gate=True, softcap=SOFTCAP),
    Case("full", kv=1, sinks=True, rope=False),
    Case("swa", kv=2, sinks=True, softcap=SOFTCAP),
    Case("swa", kv=1, gate=True, rope=False),
    Case("stream_text", kv=4, sinks=True, gate=True),
    Case("stream_text", kv=1, softcap=SOFTCAP, rope=False),
    Case("stream_cache"),
    Case("stream_cache", kv=2, sinks=True, gate=True, softcap=SOFTCAP),
    Case("longformer", kv=2, sinks=True, gate=True),
    Case("longformer", kv=4, softcap=SOFTCAP, rope=False),
    Case("bigbird", kv=1, sinks=True, softcap=SOFTCAP),
    Case("bigbird", kv=4, gate=True, rope=False),
    Case("strided", kv=2, gate=True, rope=False),
    Case("strided", kv=4, sinks=True, softcap=SOFTCAP),
]
# Decode / chunked-prefill cases: one per layer, with the most options switched on.
DECODE_CASES = [CASES[i] for i in (1, 3, 5, 8, 9, 11, 14)]
assert sorted({c.kind for c in DECODE_CASES}) == sorted(KINDS)


def make_layer(case: Case, dtype=jnp.float32, seed: int = 0):
    cfg = AttentionConfig(d_model=D_MODEL, num_heads=HEADS, num_kv_heads=case.kv,
                          rope_theta=THETA if case.rope else None, learned_sinks=case.sinks,
                          output_gate=case.gate, softcap=case.softcap, dtype=dtype)
    rngs = nnx.Rngs(seed)
    k = case.kind
    if k == "full":
        layer = FullAttention(cfg, rngs=rngs)
    elif k == "swa":
        layer = SlidingWindowAttention(cfg, window=WINDOW, rngs=rngs)
    elif k in ("stream_text", "stream_cache"):
        layer = StreamingLLMAttention(cfg, window=WINDOW, num_sinks=SINKS,
                                      rope_mode=k.removeprefix("stream_"), rngs=rngs)
    elif k == "longformer":
        layer = PatternAttention(cfg, pattern=P.longformer(LF_WINDOW, num_global=LF_GLOBAL,
                                                           dilation=LF_DILATION),
                                 block_size=BLOCK, rngs=rngs)
    elif k == "bigbird":
        layer = PatternAttention(cfg, pattern=P.bigbird(BB_BLOCK, BB_WINDOW, BB_GLOBAL, BB_RANDOM,
                                                        seed=BB_SEED),
                                 block_size=BLOCK, rngs=rngs)
    elif k == "strided":
        layer = PatternAttention(cfg, pattern=P.sparse_transformer_strided(STRIDE),
                                 block_size=BLOCK, rngs=rngs)
    else:
        raise AssertionError(k)
    if case.sinks:   # zeros at init; make them matter
        layer.sink_logits[...] = jnp.asarray(
            np.random.default_rng(seed + 7).normal(size=HEADS).astype(np.float32))
    return layer


def params_of(layer) -> dict:
    return {name: np.asarray(v) for name, v in nnx.state(layer, nnx.Param).to_pure_dict().items()}


def ragged_inputs(seed: int = 0, lengths=LENGTHS, length=T):
    """x [B, T, D] (garbage at padding) and positions [B, T] with trailing -1."""
    rng = np.random.default_rng(seed)
    x = (1.5 * rng.normal(size=(len(lengths), length, D_MODEL))).astype(np.float32)
    pos = np.full((len(lengths), length), -1, np.int32)
    for b, n in enumerate(lengths):
        pos[b, :n] = np.arange(n)
    return x, pos


# ----------------------------------------------------------------------------- reference


def _lowbias32(x: int) -> int:
    m = 0xFFFFFFFF
    x &= m
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    x ^= x >> 16
    return x


def _bigbird_random_blocks(qb: int) -> set[int]:
    """The seeded random key blocks of query block qb (causal: among blocks 0..qb)."""
    return {_lowbias32(qb * 1000003 + r * 7919 + BB_SEED * 104729) % (qb + 1)
            for r in range(BB_RANDOM)}


def visible(kind: str, t: int, s: int) -> bool:
    """May query position t see key position s? (Both >= 0.) Straight from the papers."""
    if s > t:                                    # every layer here is autoregressive
        return False
    if kind == "full":
        return True
    if kind == "swa":                            # Mistral: the last W tokens, itself included
        return t - s < WINDOW
    if kind in ("stream_text", "stream_cache"):  # StreamingLLM: sinks + recent window
        return s < SINKS or t - s < WINDOW
    if kind == "longformer":                     # dilated window + global tokens
        d = t - s
        in_window = d < LF_WINDOW * LF_DILATION and d % LF_DILATION == 0
        return in_window or s < LF_GLOBAL or t < LF_GLOBAL
    if kind == "bigbird":                        # window blocks + global blocks + random blocks
        tb, sb = t // BB_BLOCK, s // BB_BLOCK
        glob = BB_GLOBAL * BB_BLOCK
        return (abs(tb - sb) <= BB_WINDOW // 2 or s < glob or t < glob
                or sb in _bigbird_random_blocks(tb))
    if kind == "strided":                        # Sparse Transformer: A1 u A2
        return (t - s) < STRIDE or (t - s) % STRIDE == 0
    if kind == "strict_causal":
        return s < t
    raise AssertionError(kind)


def dense_mask(kind: str, q_pos: np.ndarray, kv_pos: np.ndarray) -> np.ndarray:
    b_, tq, tk = q_pos.shape[0], q_pos.shape[1], kv_pos.shape[1]
    mask = np.zeros((b_, tq, tk), bool)
    for b in range(b_):
        for i in range(tq):
            for j in range(tk):
                t, s = int(q_pos[b, i]), int(kv_pos[b, j])
                mask[b, i, j] = t >= 0 and s >= 0 and visible(kind, t, s)
    return mask


def _rope(xp, x, pos):
    half = HEAD_DIM // 2
    freqs = THETA ** (-2.0 * np.arange(half) / HEAD_DIM)
    ang = np.maximum(pos, 0)[..., None, None].astype(np.float64) * freqs     # [B, T, 1, half]
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    x1, x2 = x[..., :half], x[..., half:]
    return xp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def reference(case: Case, params: dict, x, pos: np.ndarray, xp=np, kind: str | None = None):
    """Naive float32 attention layer. `pos` must be concrete (the mask is built by loops)."""
    kind = case.kind if kind is None else kind
    f32 = np.float32
    x = x.astype(f32)
    w = {k: v.astype(f32) for k, v in params.items()}
    b_, t_, _ = x.shape
    q = xp.einsum("btd,dhk->bthk", x, w["wq"])
    k = xp.einsum("btd,dhk->bthk", x, w["wk"])
    v = xp.einsum("btd,dhk->bthk", x, w["wv"])
    qt, kt = (_rope(xp, q, pos), _rope(xp, k, pos)) if case.rope else (q, k)
    group = HEADS // case.kv                      # query head h reads kv head h // group
    kr, vr = xp.repeat(kt, group, axis=2), xp.repeat(v, group, axis=2)
    scale = f32(1.0 / math.sqrt(HEAD_DIM))
    scores = xp.einsum("bthk,bshk->bhts", qt, kr) * scale
    if kind == "stream_cache":
        # Sinks sit right before the window inside the cache: a sink key s is scored with
        # the query rotated at min(t, S + W - 1); window keys at text positions.
        q_cache_pos = np.where(pos >= 0, np.minimum(pos, SINKS + WINDOW - 1), -1)
        qc = _rope(xp, q, q_cache_pos)
        s_cache = xp.einsum("bthk,bshk->bhts", qc, kr) * scale
        sink_key = ((pos >= 0) & (pos < SINKS))[:, None, None, :]
        scores = xp.where(sink_key, s_cache, scores)
    if case.softcap:
        scores = case.softcap * xp.tanh(scores / case.softcap)
    mask = dense_mask(kind, pos, pos)[:, None]                          # [B, 1, Tq, Tk]
    logits = xp.where(mask, scores, f32(-1e30))
    if case.sinks:
        col = xp.broadcast_to(w["sink_logits"][None, :, None, None], (b_, HEADS, t_, 1))
        logits = xp.concatenate([logits, col], axis=-1)
    m = logits.max(axis=-1, keepdims=True)
    if xp is jnp:
        m = jax.lax.stop_gradient(m)
    e = xp.exp(logits - m)
    p = (e / e.sum(axis=-1, keepdims=True))[..., :t_] * mask            # zero rows stay zero
    o = xp.einsum("bhts,bshk->bthk", p, vr)
    if case.gate:
        g = xp.einsum("btd,dhk->bthk", x, w["wg"])
        o = o * (1.0 / (1.0 + xp.exp(-g)))
    return xp.einsum("bthk,hkd->btd", o, w["wo"])


def reference_rowwise(case, params, x, pos, kind=None):
    """Reference run on each row's unpadded prefix alone; zeros at padding."""
    out = np.zeros(x.shape, np.float32)
    for b in range(x.shape[0]):
        n = int((pos[b] >= 0).sum())
        if n:
            out[b, :n] = reference(case, params, x[b:b + 1, :n], pos[b:b + 1, :n], kind=kind)[0]
    return out


# ----------------------------------------------------------------------------- layer calls


def _vjp(layer, x, pos, cot):
    """Output and the gradients of <y, cot> w.r.t. the parameters (nnx.split/merge) and x."""
    graphdef, state = nnx.split(layer)
    pos = jnp.asarray(pos)

    def f(state, x):
        return nnx.merge(graphdef, state)(x, pos)[0]

    y, pull = jax.vjp(f, state, jnp.asarray(x))
    g_state, g_x = pull(jnp.asarray(cot))
    return y, g_state, g_x


# Eager on purpose: op-by-op execution shares its per-primitive compiles across all cases, which
# on CPU is several times faster than one whole-function compile per case. `_jit_step` keeps one
# decode under jit (traced positions take other branches in the caches).
def _step(layer, x, pos, cache):
    return layer(jnp.asarray(x), jnp.asarray(pos), cache)


@functools.partial(jax.jit, static_argnums=0)
def _jit_step_impl(graphdef, state, x, pos, cache):
    return nnx.merge(graphdef, state)(x, pos, cache)


def _jit_step(layer, x, pos, cache):
    graphdef, state = nnx.split(layer)
    return _jit_step_impl(graphdef, state, x, pos, cache)


def _cotangent(shape, seed=11):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@functools.lru_cache(maxsize=None)
def layer_results(case: Case):
    """(params, x, pos, y, grads of <y, cot> w.r.t. params and x) for the layer."""
    layer = make_layer(case)
    x, pos = ragged_inputs()
    y, g_state, g_x = _vjp(layer, x, pos, _cotangent(x.shape))
    grads = {k: np.asarray(v) for k, v in g_state.to_pure_dict().items()}
    return params_of(layer), x, pos, np.asarray(y), grads, np.asarray(g_x)


@functools.lru_cache(maxsize=None)
def reference_grads(case: Case):
    params, x, pos, *_ = layer_results(case)
    cot = jnp.asarray(_cotangent(x.shape))

    def loss(p, xx):
        return jnp.sum(reference(case, p, xx, pos, xp=jnp) * cot)

    g_p, g_x = jax.grad(loss, argnums=(0, 1))(
        {k: jnp.asarray(v) for k, v in params.items()}, jnp.asarray(x))
    return {k: np.asarray(v) for k, v in g_p.items()}, np.asarray(g_x)


def assert_close(actual, expected, atol=2e-5, rtol=2e-5, what=""):
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                               atol=atol, rtol=rtol, err_msg=what)


# ----------------------------------------------------------------------------- sanity of the reference


def test_reference_masks_are_what_the_papers_say():
    """Spot checks of the loop-built masks, so a wrong reference cannot pass silently."""
    ar = np.arange(12)[None]
    full = dense_mask("full", ar, ar)[0]
    assert (full == np.tril(np.ones((12, 12), bool))).all()
    swa = dense_mask("swa", ar, ar)[0]
    assert swa.sum(1).tolist() == [min(t + 1, WINDOW) for t in range(12)]
    stream = dense_mask("stream_text", ar, ar)[0]
    assert stream[11].nonzero()[0].tolist() == [0, 1, 2, 7, 8, 9, 10, 11]
    lf = dense_mask("longformer", ar, ar)[0]
    assert lf[11].nonzero()[0].tolist() == [0, 1, 7, 9, 11]          # globals 0,1; dilated 11,9,7
    assert lf[1].nonzero()[0].tolist() == [0, 1]
    st = dense_mask("strided", ar, ar)[0]
    assert st[11].nonzero()[0].tolist() == [3, 7, 8, 9, 10, 11]
    bb = dense_mask("bigbird", ar, ar)[0]
    assert bb[11, 4:12].all() and bb[11, :BB_BLOCK].all()            # own + previous block, global
    pad = dense_mask("full", np.array([[0, 1, -1]]), np.array([[0, -1, 1]]))[0]
    assert pad.tolist() == [[True, False, False], [True, False, True], [False, False, False]]


def test_library_patterns_agree_with_loop_masks():
    """The library's predicates give the same dense masks as the loops above."""
    x, pos = ragged_inputs(length=40, lengths=(40, 29))
    library = {
        "full": P.causal_window(None), "swa": P.causal_window(WINDOW),
        "stream_text": P.causal_window(WINDOW, SINKS),
        "longformer": P.longformer(LF_WINDOW, num_global=LF_GLOBAL, dilation=LF_DILATION),
        "bigbird": P.bigbird(BB_BLOCK, BB_WINDOW, BB_GLOBAL, BB_RANDOM, seed=BB_SEED),
        "strided": P.sparse_transformer_strided(STRIDE),
    }
    for kind, pattern in library.items():
        np.testing.assert_array_equal(np.asarray(P.dense_mask(pattern, pos, pos)),
                                      dense_mask(kind, pos, pos), err_msg=kind)


# ----------------------------------------------------------------------------- prefill


@pytest.mark.parametrize("case", CASES, ids=str)
def test_prefill_matches_reference(case):
    params, x, pos, y, _, _ = layer_results(case)
    assert np.isfinite(y).all()
    expected = reference_rowwise(case, params, x, pos)
    assert_close(y, expected, what=f"{case}: prefill vs reference on unpadded rows")
    # The batched reference agrees with the row-wise one (padding leaks nowhere).
    assert_close(reference(case, params, x, pos), expected, atol=1e-6, rtol=1e-6)
    # Padded queries see nothing: exact zeros, not NaN.
    assert (y[pos < 0] == 0).all(), f"{case}: padded queries must give zeros"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradients_match_reference(case):
    params, x, pos, _, grads, g_x = layer_results(case)
    ref_grads, ref_gx = reference_grads(case)
    assert sorted(grads) == sorted(ref_grads) == sorted(params)
    for name in grads:
        assert np.isfinite(grads[name]).all(), name
        scale = np.abs(ref_grads[name]).max()
        assert scale > 0, f"{case}: reference gradient of {name} vanishes; the test would be vacuous"
        assert_close(grads[name], ref_grads[name], atol=1e-4 * scale, rtol=1e-3, what=f"{case}: d/d{name}")
    assert np.isfinite(g_x).all()
    assert_close(g_x, ref_gx, atol=1e-4 * np.abs(ref_gx).max(), rtol=1e-3, what=f"{case}: d/dx")
    assert (g_x[pos < 0] == 0).all(), f"{case}: padding must not receive gradient"


# ----------------------------------------------------------------------------- decode vs prefill


def _check_decoded(case, got, y, pos, how):
    valid = pos >= 0
    assert np.isfinite(got).all(), how
    assert_close(got[valid], y[valid], atol=3e-5, rtol=3e-5, what=f"{case}: {how} vs prefill")


def _cache_len(cache):
    return cache.k.shape[1]


@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_token_by_token_decode_matches_prefill(case):
    """Ragged rows: row 1 stops at 13 (then positions -1), row 2 is padding throughout."""
    params, x, pos, y, _, _ = layer_results(case)
    layer = make_layer(case)
    cache = layer.init_cache(x.shape[0], T)
    if case.kind in ("swa", "stream_text", "stream_cache"):
        assert isinstance(cache, RollingKVCache) and _cache_len(cache) < T
    got = np.zeros_like(y)
    for t in range(T):
        out, cache = _step(layer, x[:, t:t + 1], pos[:, t:t + 1], cache)
        got[:, t] = np.asarray(out)[:, 0]
    _check_decoded(case, got, y, pos, "token-by-token decode")
    assert (got[pos < 0] == 0).all()


@pytest.mark.parametrize("kind", ["stream_cache", "bigbird"])
def test_decode_under_jit_matches_prefill(kind):
    """Traced positions: the caches and the block metadata take their traced branches."""
    case = next(c for c in DECODE_CASES if c.kind == kind)
    params, x, pos, y, _, _ = layer_results(case)
    layer = make_layer(case)
    cache = layer.init_cache(x.shape[0], T)
    got = np.zeros_like(y)
    for t in range(T):
        out, cache = _jit_step(layer, x[:, t:t + 1], pos[:, t:t + 1], cache)
        got[:, t] = np.asarray(out)[:, 0]
    _check_decoded(case, got, y, pos, "jitted decode")
    assert (got[pos < 0] == 0).all()


# Chunk schedules per row (tokens per call); each call is padded to CHUNK positions with -1, so
# rows are ragged inside a call, some calls carry more tokens than the window (WINDOW = 5) and
# even than the whole rolling cache (SINKS + WINDOW = 8), some none for a row. Then one-token
# decode steps (T = 1) finish each row, rows that are done feeding -1.
CHUNK = T
SCHEDULE = ((2, 11, 4), (6, 0, 3), (0, 0, 0))


@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_chunked_prefill_then_decode_matches_prefill(case):
    params, x, pos, y, _, _ = layer_results(case)
    layer = make_layer(case)
    cache = layer.init_cache(x.shape[0], T)
    got = np.full_like(y, np.nan)
    done = [0] * x.shape[0]
    for step in range(len(SCHEDULE[0])):
        xc = np.random.default_rng(step).normal(size=(x.shape[0], CHUNK, D_MODEL)).astype(np.float32)
        pc = np.full((x.shape[0], CHUNK), -1, np.int32)
        for b, sched in enumerate(SCHEDULE):
            n = sched[step]
            xc[b, :n] = x[b, done[b]:done[b] + n]
            pc[b, :n] = np.arange(done[b], done[b] + n)
        out, cache = _step(layer, xc, pc, cache)
        out = np.asarray(out)
        assert (out[pc < 0] == 0).all(), "padded chunk entries must give zeros"
        for b, sched in enumerate(SCHEDULE):
            got[b, done[b]:done[b] + sched[step]] = out[b, :sched[step]]
            done[b] += sched[step]
    assert done[0] > SINKS + WINDOW and done[1] < LENGTHS[1]
    while any(d < n for d, n in zip(done, LENGTHS)):
        xs = np.random.default_rng(100 + done[0]).normal(size=(x.shape[0], 1, D_MODEL)).astype(np.float32)
        ps = np.full((x.shape[0], 1), -1, np.int32)
        for b, n in enumerate(LENGTHS):
            if done[b] < n:
                xs[b, 0], ps[b, 0] = x[b, done[b]], done[b]
        out, cache = _step(layer, xs, ps, cache)
        out = np.asarray(out)
        assert (out[ps < 0] == 0).all()
        for b, n in enumerate(LENGTHS):
            if done[b] < n:
                got[b, done[b]] = out[b, 0]
                done[b] += 1
    valid = pos >= 0
    assert not np.isnan(got[valid]).any()
    assert_close(got[valid], y[valid], atol=3e-5, rtol=3e-5, what=f"{case}: chunked vs prefill")


# ----------------------------------------------------------------------------- fully masked rows


@pytest.mark.parametrize("sinks", [False, True])
def test_query_that_sees_no_key_gives_zeros(sinks):
    """A strictly causal pattern: position 0 is a valid query with no visible key."""
    case = Case("strided", kv=2, sinks=sinks, gate=True)
    layer = make_layer(case)
    layer.pattern = P.Causal() & ~P.SlidingWindow(1)             # s < t
    x, pos = ragged_inputs()
    y, g_state, g_x = _vjp(layer, x, pos, _cotangent(x.shape))
    y = np.asarray(y)
    assert np.isfinite(y).all() and np.isfinite(np.asarray(g_x)).all()
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(g_state))
    assert (y[:, 0] == 0).all() and (y[pos < 0] == 0).all()
    assert_close(y, reference(case, params_of(layer), x, pos, kind="strict_causal"))


@pytest.mark.parametrize("sinks", [False, True])
def test_ops_every_key_padding_gives_zeros(sinks):
    """Valid queries over keys that are all padding (shapes as in the layer tests)."""
    rng = np.random.default_rng(0)
    _, pos = ragged_inputs()
    q = jnp.asarray(rng.normal(size=pos.shape + (HEADS, HEAD_DIM)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=pos.shape + (2, HEAD_DIM)).astype(np.float32))
    v = jnp.asarray(rng.normal(size=pos.shape + (2, HEAD_DIM)).astype(np.float32))
    qp = jnp.asarray(pos)
    kp = jnp.full(pos.shape, -1, jnp.int32)
    sl = jnp.asarray(rng.normal(size=4).astype(np.float32)) if sinks else None
    for fn in (lambda q: ops.local_attention(q, k, v, qp, kp, window=3, num_sinks=1, sink_logits=sl,
                                             softcap=2.0),
               lambda q: ops.streaming_attention_cache_rope(q, k, v, qp, kp, window=3, num_sinks=1,
                                                            rope_theta=THETA, sink_logits=sl),
               lambda q: ops.pattern_attention(q, k, v, qp, kp, pattern=P.longformer(3), block_size=BLOCK,
                                               sink_logits=sl)):
        out, pull = jax.vjp(fn, q)
        assert (np.asarray(out) == 0).all()
        assert np.isfinite(np.asarray(pull(jnp.ones_like(out))[0])).all()


# ----------------------------------------------------------------------------- bf16


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_forward_close_to_fp32(kind):
    case = next(c for c in DECODE_CASES if c.kind == kind)
    _, x, pos, y32, _, _ = layer_results(case)
    layer = make_layer(case, dtype=jnp.bfloat16)
    assert all(np.asarray(a).dtype == np.float32 for a in params_of(layer).values())
    y16 = layer(jnp.asarray(x), jnp.asarray(pos))[0]
    assert y16.dtype == jnp.bfloat16
    y16 = np.asarray(y16.astype(jnp.float32))
    assert np.isfinite(y16).all() and (y16[pos < 0] == 0).all()
    err = np.linalg.norm(y16 - y32) / np.linalg.norm(y32)
    assert err < 3e-2, f"{case}: bf16 relative error {err:.3g}"


def test_bf16_decode_with_bf16_cache():
    case = next(c for c in DECODE_CASES if c.kind == "stream_cache")
    layer = make_layer(case, dtype=jnp.bfloat16)
    x, pos = ragged_inputs()
    y = np.asarray(layer(jnp.asarray(x), jnp.asarray(pos))[0].astype(jnp.float32))
    cache = layer.init_cache(x.shape[0], T)
    assert cache.k.dtype == jnp.bfloat16
    got = []
    for t in range(T):
        out, cache = _step(layer, x[:, t:t + 1], pos[:, t:t + 1], cache)
        got.append(np.asarray(out.astype(jnp.float32)))
    got = np.concatenate(got, 1)
    valid = pos >= 0
    err = np.linalg.norm(got[valid] - y[valid]) / np.linalg.norm(y[valid])
    assert err < 3e-2, err


# ----------------------------------------------------------------------------- bad inputs


def _cfg(**kw):
    return AttentionConfig(**{"d_model": D_MODEL, "num_heads": HEADS, **kw})


@pytest.mark.parametrize("kw, match", [
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(num_kv_heads=0), "num_kv_heads"),
    (dict(num_heads=3), "num_heads"),                     # 32 % 3 and no head_dim
    (dict(head_dim=7), "head_dim"),                       # odd with RoPE
    (dict(softcap=0.0), "softcap"),
    (dict(d_model=0), "d_model"),
])
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**kw)


def test_odd_head_dim_is_fine_without_rope():
    assert _cfg(head_dim=7, rope_theta=None).head_dim == 7


@pytest.mark.parametrize("build, match", [
    (lambda c, r: SlidingWindowAttention(c, window=0, rngs=r), "window"),
    (lambda c, r: SlidingWindowAttention(c, window=-3, rngs=r), "window"),
    (lambda c, r: StreamingLLMAttention(c, window=0, rngs=r), "window"),
    (lambda c, r: StreamingLLMAttention(c, window=4, num_sinks=-1, rngs=r), "num_sinks"),
    (lambda c, r: StreamingLLMAttention(c, window=4, rope_mode="relative", rngs=r), "rope_mode"),
    (lambda c, r: StreamingLLMAttention(c, window=4, num_sinks=0, rope_mode="cache", rngs=r),
     "rope_mode"),
    (lambda c, r: PatternAttention(c, pattern="longformer", rngs=r), "pattern"),
    (lambda c, r: PatternAttention(c, pattern=P.longformer(4), block_size=0, rngs=r), "block_size"),
])
def test_bad_layer_arguments_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build(_cfg(), nnx.Rngs(0))


def test_rope_mode_cache_without_rope_raises():
    with pytest.raises(ValueError, match="rope_mode"):
        StreamingLLMAttention(_cfg(rope_theta=None), window=4, rope_mode="cache", rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def small_layers():
    return {k: make_layer(next(c for c in DECODE_CASES if c.kind == k)) for k in ("full", "swa", "bigbird")}


@pytest.mark.parametrize("kind", ["full", "swa", "bigbird"])
def test_bad_call_inputs_raise(kind, small_layers):
    layer = small_layers[kind]
    x, pos = (jnp.asarray(a) for a in ragged_inputs())
    with pytest.raises(ValueError, match="x must be"):
        layer(jnp.zeros(x.shape[:2] + (D_MODEL + 1,)), pos)
    with pytest.raises(ValueError, match="x must be"):
        layer(x[0], pos[0])
    with pytest.raises(ValueError, match="positions"):
        layer(x, pos[:, :-1])
    with pytest.raises(ValueError, match="positions"):
        layer(x, pos[0])
    with pytest.raises(ValueError, match="positions"):
        layer(x, pos.astype(jnp.float32))


@pytest.mark.parametrize("kind", ["full", "swa", "bigbird"])
def test_bad_cache_inputs_raise(kind, small_layers):
    layer = small_layers[kind]
    x, pos = (jnp.asarray(a) for a in ragged_inputs())
    b = x.shape[0]
    # dtype of the cache differs from the layer's compute dtype
    with pytest.raises(ValueError, match="dtype.*cache"):
        layer(x, pos, layer.init_cache(b, 64, dtype=jnp.bfloat16))
    # cache for another batch size / head count
    with pytest.raises(ValueError, match=r"\[B="):
        layer(x, pos, layer.init_cache(b + 1, 64))
    with pytest.raises(ValueError, match=r"\[B="):
        layer(x, pos, FullKVCache.init(b, 64, HEADS // 2 + 1, HEAD_DIM))
    if kind == "swa":
        return                                        # rolling cache: no max_len to exceed
    # more new tokens than the cache holds
    with pytest.raises(ValueError, match="max_len"):
        layer(x, pos, layer.init_cache(b, T - 1))
    # concrete positions beyond max_len
    with pytest.raises(ValueError, match="max_len"):
        layer(x, pos + 5, layer.init_cache(b, T + 4))
    with pytest.raises(ValueError, match="max_len"):
        layer(x[:, :1], jnp.full((b, 1), 8, jnp.int32), layer.init_cache(b, 8))
