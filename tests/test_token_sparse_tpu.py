"""The Mosaic TPU backward of `token_sparse` (the dq kernel and the inverted dk/dv kernel,
`pallas_kernels/token_sparse/tpu_vjp.py`) in `pltpu.InterpretParams()` mode against the
float32 reference: dq, dk, dv and d sink_logits on fresh random inputs (the helpers of
`test_token_sparse_kernels.py`: rows with fewer listed entries than K, a query with an empty
list, a padded query, ragged keys). Token indices (block_size 1, GQA 4 over 2 kv heads,
two batch rows, soft-cap, not causal) and blocks of 5 (33 keys, MQA H = Hkv = 1, causal,
sinks; GQA 1 is in `test_token_sparse_kernels.py`), several grid steps per row, several and
partly filled chunks per KV block; KV
blocks no query lists get exact zeros; the chunked inverted index against numpy loops; the
"xla" backward option; config errors; and forward + backward lowered through Pallas' TPU
lowering (bf16, NSA / DSA head shapes) on CPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash import autodiff
from pallas_kernels.token_sparse.reference import token_sparse_reference
from pallas_kernels.token_sparse.tpu import TpuConfig, geometry, static, token_sparse_tpu
from pallas_kernels.token_sparse.tpu_vjp import chunk_tables
from kernel_testing import max_rel_err
from test_token_sparse_kernels import TokenSparseCase, make_inputs

# (case, config): several dq steps per row in the second; one listing token per dk/dv chunk
# in the first (a key row's tokens span several chunks), four in the second (partly filled
# chunks: the kernel zeroes its gather buffers first, else NaN from interpret mode's
# uninitialised memory would reach dk/dv)
CASES = [
    (TokenSparseCase("tokens_gqa4_batch2_ragged_softcap_noncausal", b=2, t=4, s=9, h=8, hkv=2, d=16,
          dv=8, k=3, softcap=2.0, causal=False, pad_k=3, pad_q=True, seed=21),
     TpuConfig(block_k=4, block_q_dkv=4, backward="mosaic")),
    (TokenSparseCase("blocks5_mqa1_causal_sinks", t=10, s=33, h=1, hkv=1, d=8, dv=16, k=2, block_size=5,
          sinks=True, pad_k=4, pad_q=True, seed=22), TpuConfig(block_k=5, block_q_dkv=4)),
]


def unlisted_blocks(case: TokenSparseCase, idx):
    """bool `[B, nblk, Hkv]`: KV blocks that no (non-padding) query lists."""
    nblk = -(-case.s // case.block_size)
    listed = np.zeros((case.b, nblk, case.hkv), bool)
    for b, t, h, e in np.ndindex(*idx.shape):
        if idx[b, t, h, e] >= 0 and not (case.pad_q and b == 0 and t == 1):
            listed[b, idx[b, t, h, e], h] = True
    return ~listed


def backward_vs_reference(case: TokenSparseCase, cfg: TpuConfig):
    """`(kernel grads, reference grads)` of `<out, dO> + <lse, dlse>` w.r.t. (q, k, v,
    sinks): the reference's own VJP, and the TPU backward (`autodiff.backward`, as the
    custom_vjp runs it) fed the reference's out and lse (the forward kernel is tested in
    `test_token_sparse_kernels.py`)."""
    (q, k, v, sinks), idx, kw, (dout, dlse) = make_inputs(case)
    scale = case.d ** -0.5

    def reference(q, k, v, sinks):
        res = token_sparse_reference(q, k, v, idx, sink_logits=sinks, scale=scale,
                                     return_lse=True, **kw)
        return res.out, res.lse

    @jax.jit
    def want(q, k, v, sinks):
        (out, lse), vjp = jax.vjp(reference, q, k, v, sinks)
        cot = (dout, jnp.where(jnp.isfinite(lse), dlse, 0.0))
        return out, lse, cot, vjp(cot)

    out, lse, cot, grads = want(q, k, v, sinks)
    st = static(q, k, v, idx, block_size=case.block_size, causal=case.causal,
                has_sinks=sinks is not None, softcap=case.softcap, scale=scale, interpret=True,
                config=cfg)
    got = jax.jit(lambda q, k, v, sinks: autodiff.backward(
        st, q, k, v, sinks, kw["q_positions"], kw["kv_positions"], None, None, (idx,), out,
        lse, *cot))(q, k, v, sinks)
    return got, grads, np.asarray(idx)


def assert_grads_match(got, want, tol=2e-4):
    for name, g, r in zip(("dq", "dk", "dv", "dsinks"), got, want):
        assert (g is None) == (r is None), name
        if r is not None:
            assert g.dtype == r.dtype and np.all(np.isfinite(g)), name
            assert max_rel_err(g, r, floor=1e-6) < tol, (name, max_rel_err(g, r, floor=1e-6))


@pytest.mark.parametrize("case,cfg", CASES, ids=lambda x: getattr(x, "name", ""))
def test_mosaic_backward_matches_reference(case, cfg):
    got, want, idx = backward_vs_reference(case, cfg)
    assert_grads_match(got, want)
    dq, dk, dv = (np.asarray(g) for g in got[:3])
    assert np.all(dq[0, case.t // 2] == 0.0) and np.all(dq[0, 1] == 0.0) == case.pad_q
    # keys of blocks nobody lists: exact zeros (the segment's one empty chunk writes them)
    rows = np.repeat(unlisted_blocks(case, idx), case.block_size, axis=1)[:, :case.s]
    assert rows.any()
    assert np.all(dk[rows] == 0.0) and np.all(dv[rows] == 0.0)
    assert np.abs(dk[~rows]).max() > 0


def test_xla_backward_option_matches_reference():
    case, cfg = CASES[0]
    got, want, _ = backward_vs_reference(case, dataclasses.replace(cfg, backward="xla",
                                                                   backward_budget=500))
    assert_grads_match(got, want)


def test_chunk_tables_cover_each_listing_once():
    """Chunks against numpy loops: per segment its tokens in order, `pairs` per chunk, one
    empty chunk for a segment nobody lists, first/last flags; padding queries and entries
    left out; the trailing chunks idle."""
    rng = np.random.default_rng(24)
    b, t, hkv, k, nblk, pairs = 2, 6, 2, 3, 4, 2
    idx = rng.integers(-1, nblk + 1, size=(b, t, hkv, k)).astype(np.int32)  # nblk: padding
    q_pos = (np.arange(t, dtype=np.int32)[None] + 3).repeat(b, 0)
    q_pos[1, 2] = -1
    meta, tok, qpos = (np.asarray(x) for x in jax.jit(chunk_tables, static_argnums=(2, 3))(
        jnp.asarray(idx), jnp.asarray(q_pos), nblk, pairs))
    assert meta.shape == (-(-idx.size // pairs) + b * hkv * nblk, 4)
    live = meta[:, 2].cumsum() > 0
    last_live = np.nonzero(meta[:, 3])[0].max()
    assert not np.any(meta[last_live + 1:, 1:])                     # idle trailing chunks
    for bb, h, j in np.ndindex(b, hkv, nblk):
        seg = (bb * hkv + h) * nblk + j
        want = [tt for tt in range(t) for e in range(k)
                if idx[bb, tt, h, e] == j and q_pos[bb, tt] >= 0]
        rows = np.nonzero((meta[:, 0] == seg) & live & (np.arange(len(meta)) <= last_live))[0]
        assert len(rows) == max(1, -(-len(want) // pairs))
        assert meta[rows[0], 2] == 1 and meta[rows[-1], 3] == 1 and meta[rows, 2].sum() == 1
        got = [tok[r, i] for r in rows for i in range(meta[r, 1])]
        assert got == want
        assert all(qpos[r, i] == q_pos[bb, tok[r, i]] for r in rows for i in range(meta[r, 1]))
        assert all(qpos[r, i] == -1 for r in rows for i in range(meta[r, 1], pairs))


def test_auto_backward_is_xla_for_token_indices_only():
    (q, k, v, _), idx, _, _ = make_inputs(CASES[0][0])
    geo = lambda block_size, backward="auto": geometry(  # noqa: E731
        q, k, v, idx, block_size, True, TpuConfig(backward=backward))
    assert geo(1).backward == "xla" and geo(2).backward == "mosaic"
    assert geo(1, "mosaic").backward == "mosaic" and geo(2, "xla").backward == "xla"


def test_bad_tpu_configs_raise():
    with pytest.raises(ValueError, match="backward must be one of"):
        TpuConfig(backward="jnp")
    with pytest.raises(ValueError, match="block_q_dkv"):
        TpuConfig(block_q_dkv=0)


@pytest.mark.parametrize("name,h,hkv,d,dv,k,block_size", [
    ("nsa_blocks64_gqa16_sinks", 32, 2, 128, 128, 4, 64),
    ("dsa_tokens_mqa_latent", 16, 1, 576, 512, 64, 1),
])
def test_lowers_to_mosaic_for_tpu(name, h, hkv, d, dv, k, block_size):
    """Forward and Mosaic backward (bf16, DSA / NSA head shapes) lower through Pallas' TPU
    lowering for a TPU v5e on CPU (the block-shape rules, the unit-dimension matmuls of
    block_size 1); the Mosaic compiler itself only runs on a TPU (not here)."""
    b, t, s = 1, 32, 256
    shape = lambda *x, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(x, dtype)  # noqa: E731

    def loss(q, k_, v, idx, sinks):
        out = token_sparse_tpu(q, k_, v, idx, block_size=block_size,
                               q_positions=jnp.arange(t)[None], kv_positions=jnp.arange(s)[None],
                               causal=True, sink_logits=sinks, softcap=20.0, scale=d ** -0.5,
                               return_lse=False, config=TpuConfig(backward="mosaic"))
        return out.astype(jnp.float32).sum()

    dev = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev)
    with jax.sharding.use_abstract_mesh(mesh):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 4))).trace(
            shape(b, t, h, d), shape(b, s, hkv, d), shape(b, s, hkv, dv),
            shape(b, t, hkv, k, dtype=jnp.int32), shape(h, dtype=jnp.float32),
        ).lower(lowering_platforms=("tpu",))
    assert lowered.as_text().count("tpu_custom_call") == 3            # forward, dq, dk/dv
