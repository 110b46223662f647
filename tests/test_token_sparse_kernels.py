"""`token_sparse` kernels against `token_sparse_reference`, and the reference against an
independent dense-mask `jax.nn.dot_product_attention` (mask built in numpy loops): forward,
lse and gradients (dq, dk, dv, d sink_logits) in float32 on fresh random inputs. Triton in
`interpret=True`, Mosaic TPU in `pltpu.InterpretParams()` (its backward is XLA). Token
indices (block_size 1) and blocks (16, and 6: not a power of two), lengths not multiples of
the tiles, ragged keys (positions -1), a padded query, a query with an empty list, GQA
1/4/16 and MQA, sinks and soft-cap; both dk/dv paths of the Triton backward (inverted
index, atomics) and the inverted index itself; the inverted dk/dv split into chunks (a
block every query lists); the backward with the values the keys' first columns (MLA's
latent, `value_is_key_prefix`: dv added into dk, one scatter) against the reference and the
two-scatter path, its misuse, and its atomic adds counted in the Triton IR lowered at DSA's
shape; bf16 forward; argument errors; the Triton lowering at NSA's 64K shape. A `gpu`-marked test compiles the Triton kernels (DSA and NSA head configurations,
small T).
"""

from __future__ import annotations

import dataclasses
import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.token_sparse import api, token_sparse_attention
from pallas_kernels.token_sparse.reference import token_sparse_reference
from pallas_kernels.token_sparse.tpu import TpuConfig, token_sparse_tpu
from pallas_kernels.token_sparse.triton import TritonConfig, geometry, token_sparse_triton
from pallas_kernels.token_sparse.layout import inverted_index
from pallas_kernels.token_sparse.triton_vjp import dkdv_chunks
from gpu_testing import has_gpu, lower_for_cuda, triton_atomic_shapes
from kernel_testing import max_rel_err


@dataclasses.dataclass(frozen=True)
class TokenSparseCase:
    name: str
    b: int = 1
    t: int = 8
    s: int = 20
    h: int = 4
    hkv: int = 1
    d: int = 16
    dv: int = 16
    k: int = 4                  # listed entries per row
    block_size: int = 1
    causal: bool = True
    sinks: bool = False
    softcap: float | None = None
    pad_k: int = 0              # trailing keys of the last batch row are padding
    pad_q: bool = False         # query 1 of batch row 0 is padding
    seed: int = 0


CASES = [
    TokenSparseCase("tokens_gqa4_mqa_ragged_sinks", t=13, s=29, h=4, hkv=1, d=48, dv=16, k=20, sinks=True,
         pad_k=4, pad_q=True, seed=1),                          # 20 tokens: two tiles of 16
    TokenSparseCase("blocks16_gqa1_softcap_batch2", b=2, t=11, s=45, h=2, hkv=2, d=16, dv=32, k=2,
         block_size=16, softcap=4.0, pad_k=5, seed=2),
    TokenSparseCase("blocks6_gqa16_noncausal", t=7, s=40, h=16, hkv=1, d=16, dv=16, k=3, block_size=6,
         causal=False, seed=3),
]
TPU_CASES = [
    TokenSparseCase("tpu_tokens_gqa4_ragged_sinks", t=6, s=19, h=4, hkv=1, d=16, dv=8, k=3, sinks=True,
         pad_k=3, pad_q=True, seed=4),
    TokenSparseCase("tpu_blocks8_gqa1_softcap", b=1, t=5, s=30, h=2, hkv=2, d=8, dv=16, k=2, block_size=8,
         softcap=3.0, seed=5),
]

# several grid steps per row (2 tokens / 1 block per step), backward chunks of 4 and 1 queries
TPU_SMALL_CHUNKS = functools.partial(token_sparse_tpu,
                                     config=TpuConfig(block_k=2, backward_budget=336))


def make_inputs(c: TokenSparseCase, dtype=jnp.float32):
    rng = np.random.default_rng(c.seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731
    q, k, v = normal(c.b, c.t, c.h, c.d), normal(c.b, c.s, c.hkv, c.d), normal(c.b, c.s, c.hkv, c.dv)
    nblk = -(-c.s // c.block_size)
    idx = np.full((c.b, c.t, c.hkv, c.k), -1, np.int32)
    for row in np.ndindex(c.b, c.t, c.hkv):
        n = rng.integers(1, min(c.k, nblk) + 1)
        idx[row][:n] = rng.choice(nblk, n, replace=False)       # distinct, -1 padding
        rng.shuffle(idx[row])
    idx[0, c.t // 2] = -1                                       # a query with an empty list
    q_pos = np.broadcast_to(np.arange(c.t, dtype=np.int32), (c.b, c.t)).copy()
    q_pos += c.s - c.t                                          # queries are the last tokens
    if c.pad_q:
        q_pos[0, 1] = -1
    kv_pos = np.broadcast_to(np.arange(c.s, dtype=np.int32), (c.b, c.s)).copy()
    if c.pad_k:
        kv_pos[-1, c.s - c.pad_k:] = -1
    sinks = normal(c.h) if c.sinks else None
    cot = (normal(c.b, c.t, c.h, c.dv), jnp.asarray(rng.normal(size=(c.b, c.h, c.t)), jnp.float32))
    kw = dict(block_size=c.block_size, q_positions=jnp.asarray(q_pos),
              kv_positions=jnp.asarray(kv_pos), causal=c.causal, softcap=c.softcap)
    return (q, k, v, sinks), jnp.asarray(idx), kw, cot


def run_vjp(impl, args, idx, kw, cot, interpret=True):
    """out, lse and the gradients of `<out, dO> + <lse, dlse>` (finite lse only);
    `interpret=False` compiles the kernels (GPU tests)."""
    q, k, v, sinks = args

    def f(q, k, v, sinks):
        res = token_sparse_attention(q, k, v, idx, sink_logits=sinks, return_lse=True,
                                     impl=impl, interpret=interpret, **kw)
        return res.out, res.lse

    @jax.jit
    def out_lse_grads(q, k, v, sinks):
        (out, lse), vjp = jax.vjp(f, q, k, v, sinks)
        dlse = jnp.where(jnp.isfinite(lse), cot[1], 0.0)
        return out, lse, vjp((cot[0], dlse))

    return out_lse_grads(q, k, v, sinks)


def assert_matches(got, want, tol=2e-5):
    out, lse, grads = got
    r_out, r_lse, r_grads = want
    assert max_rel_err(out, r_out, floor=1e-6) < tol
    fin = np.isfinite(r_lse)
    assert np.array_equal(np.isfinite(lse), fin)
    assert max_rel_err(np.asarray(lse)[fin], np.asarray(r_lse)[fin], floor=1e-6) < tol
    for g, r in zip(grads, r_grads):
        assert (g is None) == (r is None)
        if r is not None:
            assert np.all(np.isfinite(g)) and max_rel_err(g, r, floor=1e-6) < 10 * tol


@pytest.mark.parametrize("impl,case", [("triton", c) for c in CASES]
                         + [("mosaic_tpu", c) for c in TPU_CASES], ids=lambda x: getattr(x, "name", x))
def test_kernel_matches_reference(impl, case):
    """Mosaic TPU with small steps and backward chunks (TPU_SMALL_CHUNKS)."""
    args, idx, kw, cot = make_inputs(case)
    with mock.patch.dict(api.IMPLEMENTATIONS, {"mosaic_tpu": TPU_SMALL_CHUNKS}):
        got = run_vjp(impl, args, idx, kw, cot)
    want = run_vjp("xla", args, idx, kw, cot)
    assert_matches(got, want)
    out, lse, grads = got
    # the empty list sees nothing: zeros out (lse = sink or -inf), finite gradients
    assert np.all(np.asarray(out)[0, case.t // 2] == 0.0)
    assert all(np.all(np.isfinite(g)) for g in grads if g is not None)


def test_triton_rows_split_over_programs():
    """G = 32 query heads of one kv head on two programs of 16 rows (`max_rows=16`)."""
    c = TokenSparseCase("split", t=5, s=12, h=32, hkv=1, d=16, dv=16, k=3, sinks=True, seed=9)
    args, idx, kw, cot = make_inputs(c)
    cfg = TritonConfig(max_rows=16, block_k=16)
    assert geometry(*args[:3], idx, 1, True, cfg.block_k, cfg.max_rows).split == 2
    triton = functools.partial(token_sparse_triton, config=cfg, interpret=True)
    with mock.patch.dict(api.IMPLEMENTATIONS, {"triton": triton}):
        got = run_vjp("triton", args, idx, kw, cot)
    assert_matches(got, run_vjp("xla", args, idx, kw, cot))


# dk/dv paths of the Triton backward (TritonConfig.dkdv) on tiny cases: the inverted index
# with GQA 4 over two batch rows (ragged keys, a padded query, KV blocks no query lists),
# GQA 16 split over two programs, token indices (block_size 1); atomics on blocks.
DKDV_CASES = [
    ("inverted", TritonConfig(), TokenSparseCase("inv_blocks8_gqa4_batch2", b=2, t=6, s=61, h=8, hkv=2,
                                      d=16, dv=24, k=2, block_size=8, pad_k=3, pad_q=True,
                                      sinks=True, seed=11)),
    ("inverted", TritonConfig(max_rows=16), TokenSparseCase("inv_blocks5_gqa32_split", t=4, s=48, h=32,
                                                 hkv=1, d=16, dv=16, k=2, block_size=5,
                                                 softcap=3.0, seed=12)),
    ("inverted", TritonConfig(block_k=16), TokenSparseCase("inv_tokens_gqa1", t=5, s=17, h=2, hkv=2,
                                                d=16, dv=16, k=3, causal=False, seed=13)),
    ("atomic", TritonConfig(), TokenSparseCase("atomic_blocks8_gqa4", t=3, s=45, h=4, hkv=1, d=16, dv=16,
                                    k=2, block_size=8, pad_k=2, seed=14)),
]


@pytest.mark.parametrize("dkdv,cfg,case", DKDV_CASES, ids=lambda x: getattr(x, "name", None))
def test_triton_dkdv_paths_match_reference(dkdv, cfg, case):
    args, idx, kw, cot = make_inputs(case)
    nblk = -(-case.s // case.block_size)
    listed = np.zeros((case.b, case.hkv, nblk), bool)
    for b, t, h, e in np.ndindex(*idx.shape):
        if idx[b, t, h, e] >= 0:
            listed[b, h, idx[b, t, h, e]] = True
    if case.block_size > 1:
        assert not listed.all()                          # some KV block nobody selected
    cfg = dataclasses.replace(cfg, dkdv=dkdv)
    triton = functools.partial(token_sparse_triton, config=cfg, interpret=True)
    with mock.patch.dict(api.IMPLEMENTATIONS, {"triton": triton}):
        got = run_vjp("triton", args, idx, kw, cot)
    assert_matches(got, run_vjp("xla", args, idx, kw, cot))


def test_triton_dkdv_hot_block_split_into_chunks():
    """Block 0 listed by every query (NSA's forced block) with `dkdv_chunk=4`: its 11-13
    tokens per (batch, kv head) run as 3-4 chunk programs whose partials `_sum_kernel` adds;
    other blocks take one or two chunks. Ragged keys, a padded query, GQA 4, two batch rows."""
    case = TokenSparseCase("hot_block0", b=2, t=13, s=40, h=8, hkv=2, d=16, dv=24, k=3, block_size=4,
                pad_k=3, pad_q=True, sinks=True, seed=16)
    args, idx, kw, cot = make_inputs(case)
    idx = np.asarray(idx).copy()
    for row in np.ndindex(*idx.shape[:3]):
        if (idx[row] >= 0).any():                        # the empty list stays empty
            rest = [x for x in idx[row] if x > 0][:case.k - 1]
            idx[row] = [0] + rest + [-1] * (case.k - 1 - len(rest))
    idx = jnp.asarray(idx)
    cfg = TritonConfig(dkdv="inverted", dkdv_chunk=4)
    nblk = -(-case.s // case.block_size)
    _, start, count = inverted_index(idx, kw["q_positions"], nblk)
    assert int(count.reshape(case.b, case.hkv, nblk)[:, :, 0].min()) > 2 * cfg.dkdv_chunk
    triton = functools.partial(token_sparse_triton, config=cfg, interpret=True)
    with mock.patch.dict(api.IMPLEMENTATIONS, {"triton": triton}):
        got = run_vjp("triton", args, idx, kw, cot)
    assert_matches(got, run_vjp("xla", args, idx, kw, cot))


def test_dkdv_chunks_cover_each_token_list_once():
    """`dkdv_chunks` against the inverted index's (start, count): per (batch, kv head) the
    chunks of each block, in order, tile `[start, start + count)` in pieces of at most cap;
    padding chunks are empty; each block's (chunk0, nch) names its chunks."""
    rng = np.random.default_rng(17)
    b, hkv, nblk, entries, cap = 2, 3, 5, 40, 4
    count = rng.integers(0, 9, size=(b, hkv, nblk))                # sums <= entries
    count[0, 0] = [5, 5, 5, 5, 20]                                  # all entries, 13 chunks
    start = (np.cumsum(count) - count.reshape(-1)).astype(np.int32)
    blk, first, n, chunk0, nch = (np.asarray(x) for x in jax.jit(dkdv_chunks, static_argnums=(2, 3, 4, 5, 6))(
        jnp.asarray(start), jnp.asarray(count.reshape(-1), jnp.int32), b, hkv, nblk, entries, cap))
    nchunk = nblk + entries // cap
    assert blk.shape == (b * hkv * nchunk,)
    for bb, h in np.ndindex(b, hkv):
        rows = slice((bb * hkv + h) * nchunk, (bb * hkv + h + 1) * nchunk)
        seg0 = (bb * hkv + h) * nblk
        want = [(j, start[seg0 + j] + i, min(cap, c - i))
                for j, c in enumerate(count[bb, h]) for i in range(0, c, cap)]
        got = list(zip(blk[rows], first[rows], n[rows]))
        assert got[:len(want)] == want
        assert all(m == 0 for _, _, m in got[len(want):])
        for j in range(nblk):
            mine = [i for i, w in enumerate(want) if w[0] == j]
            assert list(range(chunk0[seg0 + j], chunk0[seg0 + j] + nch[seg0 + j])) == mine


def test_inverted_index_lists_each_selection_once():
    """`inverted_index` against numpy loops: the ascending tokens of each (batch, kv head,
    block), padded queries and entries left out."""
    rng = np.random.default_rng(15)
    b, t, hkv, k, nblk = 2, 7, 3, 4, 5
    idx = rng.integers(-1, nblk + 1, size=(b, t, hkv, k)).astype(np.int32)  # nblk: padding
    q_pos = np.arange(t, dtype=np.int32)[None].repeat(b, 0)
    q_pos[1, 2] = -1
    tokens, start, count = (np.asarray(x) for x in jax.jit(
        inverted_index, static_argnums=2)(jnp.asarray(idx), jnp.asarray(q_pos), nblk))
    for bb, h, j in np.ndindex(b, hkv, nblk):
        seg = (bb * hkv + h) * nblk + j
        want = [tt for tt in range(t) for e in range(k) if idx[bb, tt, h, e] == j and q_pos[bb, tt] >= 0]
        assert list(tokens[start[seg]:start[seg] + count[seg]]) == want


def dense_mask_numpy(c: TokenSparseCase, idx, q_pos, kv_pos):
    """bool `[B, H, T, S]` by plain loops: the semantics, spelled out once more."""
    idx, q_pos, kv_pos = np.asarray(idx), np.asarray(q_pos), np.asarray(kv_pos)
    mask = np.zeros((c.b, c.h, c.t, c.s), bool)
    g = c.h // c.hkv
    for b, t, hh in np.ndindex(c.b, c.t, c.h):
        for blk in idx[b, t, hh // g]:
            if blk < 0:
                continue
            for s in range(blk * c.block_size, min((blk + 1) * c.block_size, c.s)):
                ok = q_pos[b, t] >= 0 and kv_pos[b, s] >= 0
                if c.causal:
                    ok = ok and kv_pos[b, s] <= q_pos[b, t]
                mask[b, hh, t, s] |= ok
    return mask


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_reference_matches_dense_dot_product_attention(case):
    """The reference (no sinks / soft-cap here) against `jax.nn.dot_product_attention` with
    the numpy mask, on the rows that see at least one key; lse from numpy."""
    (q, k, v, _), idx, kw, cot = make_inputs(case)
    kw = dict(kw, softcap=None)
    mask = dense_mask_numpy(case, idx, kw["q_positions"], kw["kv_positions"])
    seen = mask.any(-1)                                                  # [B, H, T]
    rows = jnp.asarray(seen.transpose(0, 2, 1)[..., None])              # [B, T, H, 1]
    scale = case.d ** -0.5

    def ours(q, k, v):
        res = token_sparse_reference(q, k, v, idx, sink_logits=None, scale=scale,
                                     return_lse=True, **kw)
        return (res.out * cot[0]).sum(), res

    def dense(q, k, v):
        g, width = case.h // case.hkv, max(case.d, case.dv)   # it wants one head dim: pad
        pad = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[3])])  # noqa: E731
        kk, vv = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
        out = jax.nn.dot_product_attention(pad(q), pad(kk), pad(vv), mask=jnp.asarray(mask),
                                           scale=scale, implementation="xla")[..., :case.dv]
        return (jnp.where(rows, out, 0.0) * cot[0]).sum(), out

    (_, res), g1 = jax.jit(jax.value_and_grad(ours, (0, 1, 2), has_aux=True))(q, k, v)
    (_, out), g2 = jax.jit(jax.value_and_grad(dense, (0, 1, 2), has_aux=True))(q, k, v)
    np.testing.assert_allclose(np.where(rows, res.out, 0), np.where(rows, out, 0), atol=2e-5)
    assert np.all(np.asarray(res.out)[~np.asarray(rows)[..., 0]] == 0.0)
    qg = np.asarray(q, np.float64).reshape(case.b, case.t, case.hkv, -1, case.d)
    logits = np.einsum("bthgd,bshd->bhgts", qg, np.asarray(k, np.float64)) * scale
    logits = np.where(mask.reshape(logits.shape), logits, -np.inf).reshape(case.b, case.h, case.t, -1)
    with np.errstate(divide="ignore"):
        lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(res.lse, lse, atol=2e-5, rtol=2e-5)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, atol=5e-5)


def test_bf16_forward_triton():
    c = CASES[0]
    (q, k, v, sinks), idx, kw, _ = make_inputs(c, jnp.bfloat16)
    attn = jax.jit(lambda q, k, v, sinks, impl: token_sparse_attention(  # noqa: E731
        q, k, v, idx, sink_logits=sinks, impl=impl, interpret=True, **kw), static_argnums=4)
    out = attn(q, k, v, sinks, "triton")
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref = attn(f32(q), f32(k), f32(v), f32(sinks), "xla")
    assert out.dtype == jnp.bfloat16
    assert max_rel_err(out, ref, floor=1e-6) < 2e-2


def test_bad_arguments_raise():
    (q, k, v, _), idx, kw, _ = make_inputs(CASES[0])
    def attn(indices=idx, impl="xla", **over):
        return token_sparse_attention(q, k, v, indices, impl=impl, **over)

    with pytest.raises(ValueError, match="indices must be int"):
        attn(indices=idx[..., 0])
    with pytest.raises(ValueError, match="indices must be integer"):
        attn(indices=idx.astype(jnp.float32))
    with pytest.raises(ValueError, match="indices must be < 29"):
        attn(indices=idx.at[0, 0, 0, 0].set(29))
    with pytest.raises(ValueError, match="indices must be < 2"):
        attn(block_size=16)
    with pytest.raises(ValueError, match="block_size"):
        attn(block_size=0)
    with pytest.raises(ValueError, match="causal"):
        attn(causal=1)
    with pytest.raises(ValueError, match="q_positions"):
        attn(q_positions=jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(ValueError, match="impl"):
        attn(impl="cuda")


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        TritonConfig(block_k=24)
    with pytest.raises(ValueError, match="max_rows"):
        TritonConfig(max_rows=8)
    with pytest.raises(ValueError, match="dkdv"):
        TritonConfig(dkdv="scatter")
    with pytest.raises(ValueError, match="dkdv_chunk"):
        TritonConfig(dkdv_chunk=0)
    with pytest.raises(ValueError, match="num_warps_bwd"):
        TritonConfig(num_warps_bwd=3)
    with pytest.raises(ValueError, match="backward_budget"):
        TpuConfig(backward_budget=0)


def test_triton_lowers_at_nsa_paper_shape():
    """Forward, dq, chunked dk/dv and chunk-sum kernels lower to Triton for an H200 at
    T=64K (bf16, HQ=64, HKV=4, D=128, 16 blocks of 64), without a GPU (abstract device;
    compiles nothing); the dk/dv partials take C = 1024 + 64K * 16 / 1024 = 2048 chunks per kv head."""
    t, h, hkv, d, k, bs = 65536, 64, 4, 128, 16, 64
    spec = jax.ShapeDtypeStruct
    args = (spec((1, t, h, d), jnp.bfloat16), spec((1, t, hkv, d), jnp.bfloat16),
            spec((1, t, hkv, d), jnp.bfloat16), spec((1, t, hkv, k), jnp.int32), spec((1, t), jnp.int32))

    def loss(q, kk, v, idx, pos):
        out = token_sparse_triton(q, kk, v, idx, block_size=bs, q_positions=pos, kv_positions=pos,
                                  causal=True, sink_logits=None, softcap=None, scale=d ** -0.5,
                                  return_lse=False)
        return out.astype(jnp.float32).sum()

    text = lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), *args, device_kind="NVIDIA H200").as_text()
    assert text.count("custom_call @__gpu$xla.gpu.triton") == 4        # fwd, dq, dk/dv, chunk sum
    assert "tensor<1x4x2048x64x128xf32>" in text                 # the partial dk/dv buffer


def latent_backward(case, cfg, value_is_key_prefix):
    """MLA's layout on `token_sparse_backward` (Triton interpret mode): keys `k = [c | r]`,
    values `v = c = k[..., :Dv]`, at the float32 reference forward's `(out, lse)`. Returns the
    gradients of `(q, c, r)`: `dc = dk[..., :Dv] + dv` (the option's dv is zeros, asserted)."""
    (q, k, _, _), idx, kw, (dout, dlse) = make_inputs(case)
    v, pos = k[..., :case.dv], dict(q_positions=kw["q_positions"], kv_positions=kw["kv_positions"])
    out, lse = token_sparse_reference(q, k, v, idx, block_size=1, causal=True, sink_logits=None,
                                      softcap=None, scale=case.d ** -0.5, return_lse=True, **pos)[:2]
    dlse = jnp.where(jnp.isfinite(lse), dlse, 0.0)
    dq, dk, dv = jax.jit(lambda *a: api.token_sparse_backward(
        *a, **pos, scale=case.d ** -0.5, interpret=True, config=cfg,
        value_is_key_prefix=value_is_key_prefix))(q, k, v, idx, out, lse, dout, dlse)
    if value_is_key_prefix:
        assert not np.asarray(dv).any()
    return dq, dk[..., :case.dv] + dv, dk[..., case.dv:]


# DSA's layout in small: MQA, D 48 = 32 + 16 with the values the first 32, 32 heads on two
# programs (max_rows 16), 20 listed entries in two tiles of 16 (the second ragged), -1 padded
# lists, an empty list, ragged keys, a padded query
LATENT_CASE = TokenSparseCase("latent_prefix", t=13, s=29, h=32, hkv=1, d=48, dv=32, k=20,
                              pad_k=4, pad_q=True, seed=17)
LATENT_CONFIG = TritonConfig(block_k_bwd=16, max_rows=16)


def test_triton_value_is_key_prefix_folds_dv_into_dk():
    """`value_is_key_prefix=True` (dv added into dk's first columns, one scatter per row):
    the gradients of q, c, r equal the float32 reference's (`token_sparse_attention(q, [c | r],
    c)` under `jax.vjp`) and the two-scatter path's."""
    case, cfg = LATENT_CASE, LATENT_CONFIG
    (q, k, _, _), idx, kw, (dout, dlse) = make_inputs(case)
    assert geometry(q, k, k[..., :case.dv], idx, 1, True, cfg.block_k_bwd, cfg.max_rows).split == 2

    def attention(q, c, r):
        res = token_sparse_attention(q, jnp.concatenate([c, r], -1), c, idx, q_positions=kw["q_positions"],
                                     kv_positions=kw["kv_positions"], return_lse=True, impl="xla")
        return res.out, res.lse

    (_, lse), pull = jax.vjp(attention, q, k[..., :case.dv], k[..., case.dv:])
    want = pull((dout, jnp.where(jnp.isfinite(lse), dlse, 0.0)))
    folded = latent_backward(case, cfg, value_is_key_prefix=True)
    two_scatters = latent_backward(case, cfg, value_is_key_prefix=False)
    for got, old, ref in zip(folded, two_scatters, want):
        assert np.all(np.isfinite(got)) and max_rel_err(got, ref, floor=1e-6) < 2e-4
        assert max_rel_err(got, old) < 1e-5          # float32 sums in another order


def test_triton_value_is_key_prefix_misuse_raises():
    """ValueError at trace time: v's pieces not the first of k's (48 = 32 + 16 against Dv 16),
    a v of another dtype, the inverted dk/dv path."""
    case = dataclasses.replace(LATENT_CASE, t=3, h=16, k=4)
    (q, k, _, _), idx, kw, _ = make_inputs(case)
    with pytest.raises(ValueError, match="pieces"):
        geometry(q, k, k[..., :16], idx, 1, True, 32, value_is_key_prefix=True)
    with pytest.raises(ValueError, match="dtype"):
        geometry(q, k, k[..., :32].astype(jnp.bfloat16), idx, 1, True, 32, value_is_key_prefix=True)
    with pytest.raises(ValueError, match="atomic"):
        latent_backward(case, TritonConfig(dkdv="inverted"), value_is_key_prefix=True)


def test_triton_value_is_key_prefix_halves_the_atomics_at_dsa_shape():
    """Lowered for an H100 at DeepSeek's shape (64 heads on two programs of 32 rows, keys
    576 = 512 + 64, values their first 512, 2048 listed slots): the backward's float32 atomic
    adds per (program, listed row) go from 512 (dv) + 512 + 64 (dk) to 576 (dk + dv folded);
    one such row per (query, slot) and program, two programs per token: 2 x 1088 -> 2 x 576."""
    t, h, spec = 64, 64, jax.ShapeDtypeStruct
    bf, f32, i32 = jnp.bfloat16, jnp.float32, jnp.int32
    args = (spec((1, t, h, 576), bf), spec((1, t, 1, 576), bf), spec((1, t, 1, 512), bf),
            spec((1, t, 1, 2048), i32), spec((1, t, h, 512), bf), spec((1, h, t), f32),
            spec((1, t, h, 512), bf), spec((1, h, t), f32), spec((1, t), i32))

    def atomics(fold):
        bwd = lambda q, k, v, idx, out, lse, do, dlse, pos: api.token_sparse_backward(  # noqa: E731
            q, k, v, idx, out, lse, do, dlse, q_positions=pos, kv_positions=pos, scale=576 ** -0.5,
            value_is_key_prefix=fold)
        return triton_atomic_shapes(lower_for_cuda(bwd, *args))

    assert atomics(False) == [(32, 512), (32, 512), (32, 64)]          # dv, then dk's two pieces
    assert atomics(True) == [(32, 512), (32, 64)]                      # dk + dv, dk


def test_triton_scatter_atomics_are_relaxed():
    """The backward's dk/dv scatter-adds are relaxed atomics (`triton_atomics.relaxed_add`),
    not Pallas' acquire-release default (a memory fence per add): the sums are read only
    after the kernel. Lowered for an H100 on a small DSA-like case."""
    t, h, spec = 32, 16, jax.ShapeDtypeStruct
    bf, f32, i32 = jnp.bfloat16, jnp.float32, jnp.int32
    args = (spec((1, t, h, 64), bf), spec((1, t, 1, 64), bf), spec((1, t, 1, 64), bf),
            spec((1, t, 1, 16), i32), spec((1, t, h, 64), bf), spec((1, h, t), f32),
            spec((1, t, h, 64), bf), spec((1, h, t), f32), spec((1, t), i32))
    bwd = lambda q, k, v, idx, out, lse, do, dlse, pos: api.token_sparse_backward(  # noqa: E731
        q, k, v, idx, out, lse, do, dlse, q_positions=pos, kv_positions=pos, scale=0.125)
    found = triton_atomic_shapes(lower_for_cuda(bwd, *args), with_semantics=True)
    assert found and {sem for _, sem in found} == {"RELAXED"}, found


GPU_CASES = [
    TokenSparseCase("dsa_mqa_latent", t=300, s=700, h=16, hkv=1, d=576, dv=512, k=64, seed=6),
    TokenSparseCase("nsa_blocks64_gqa16", b=2, t=200, s=1000, h=32, hkv=2, d=128, dv=128, k=8,
         block_size=64, pad_k=37, pad_q=True, sinks=True, seed=7),
    TokenSparseCase("tokens_gqa1_softcap", t=100, s=333, h=4, hkv=4, d=64, dv=64, k=40, softcap=20.0,
         seed=8),
]


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
def test_triton_compiled_on_gpu(case):
    """The real Triton kernels (TF32 dots, float32 atomics) against the float32 reference."""
    with jax.default_device(jax.devices("gpu")[0]):
        args, idx, kw, cot = make_inputs(case)
        got = run_vjp("triton", args, idx, kw, cot, interpret=False)
        with jax.default_matmul_precision("highest"):
            want = run_vjp("xla", args, idx, kw, cot)
        assert_matches(got, want, tol=3e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
def test_triton_dkdv_chunks_compiled_on_gpu():
    """The NSA case with `dkdv_chunk=16`: KV blocks listed by up to 200 queries take up to
    13 chunk programs each, summed by `_sum_kernel`, against the float32 reference."""
    triton = functools.partial(token_sparse_triton, config=TritonConfig(dkdv_chunk=16))
    with jax.default_device(jax.devices("gpu")[0]), \
            mock.patch.dict(api.IMPLEMENTATIONS, {"triton": triton}):
        args, idx, kw, cot = make_inputs(GPU_CASES[1])
        got = run_vjp("triton", args, idx, kw, cot, interpret=False)
        with jax.default_matmul_precision("highest"):
            want = run_vjp("xla", args, idx, kw, cot)
        assert_matches(got, want, tol=3e-3)


def test_out_of_range_indices_under_jit_are_reported_by_checkify():
    """Issue 17 item 10: concrete out-of-range indices raise; under `jit` an out-of-range entry
    attends nothing (like -1 padding) and `checkify` reports it."""
    from jax.experimental import checkify

    from pallas_kernels.token_sparse.api import token_sparse_attention
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
               for s in ((1, 4, 2, 8), (1, 6, 1, 8), (1, 6, 1, 8)))
    good = jnp.asarray([[[[0, -1]], [[0, 1]], [[2, 1]], [[3, 0]]]], jnp.int32)
    bad = good.at[0, 3, 0, 1].set(6)                 # 6 keys: index 6 is out of range
    with pytest.raises(ValueError, match="indices must be < 6"):
        token_sparse_attention(q, k, v, bad, impl="xla")
    fn = jax.jit(lambda idx: token_sparse_attention(q, k, v, idx, impl="xla"))
    padded = good.at[0, 3, 0, 1].set(-1)
    np.testing.assert_allclose(fn(bad), fn(padded), rtol=0, atol=0)
    err, _ = checkify.checkify(fn)(bad)
    with pytest.raises(checkify.JaxRuntimeError, match="indices must be < 6"):
        err.throw()
    err, _ = checkify.checkify(fn)(good)
    assert err.get() is None
