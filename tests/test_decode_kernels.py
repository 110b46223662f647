"""`decode` kernels against `decode_reference`: the Triton kernel in `interpret=True`, the
Mosaic TPU kernel in `pltpu.InterpretParams()`, on tiny ragged shapes of all three cache
forms (contiguous by lengths or by slot positions, paged, selected blocks per kv head):
lengths 0 and not multiples of the tile/page/block, GQA 1/4/8, multi-token queries, sink
logits, soft-cap, a window predicate, non-power-of-two page/block/head sizes. Plus bf16
through the public entry point, argument errors, and a `gpu`-marked compiled test.
Forward only: decode defines no gradient.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode import api
from pallas_kernels.decode.reference import decode_reference
from pallas_kernels.decode.tpu import DecodeTpuConfig, decode_tpu
from pallas_kernels.decode.triton import DecodeTritonConfig, decode_triton
from sparse_jax import patterns as P
from gpu_testing import has_gpu
from kernel_testing import rel_err


@dataclasses.dataclass(frozen=True)
class DecodeCase:
    name: str
    form: str = "lengths"           # lengths | positions | paged | selected
    b: int = 2
    s: int = 100                    # cache slots (contiguous / selected); pages * page (paged)
    h: int = 4
    hkv: int = 2
    d: int = 16
    dv: int | None = None
    tq: int = 1
    lengths: tuple = (37, 100)
    page: int = 16
    max_pages: int = 8
    block_size: int = 16
    max_sel: int = 4
    counts: tuple | None = None     # [B][Hkv]
    sinks: bool = False
    softcap: float | None = None
    mask_fn: object = None
    num_splits: int = 2
    seed: int = 0


CASES = [
    DecodeCase("lengths_gqa1_zero_len", b=3, h=2, hkv=2, d=32, lengths=(0, 37, 100), num_splits=3, seed=1),
    DecodeCase("positions_gqa4_tq3_window_sinks_softcap", form="positions", s=77, h=8, hkv=2, tq=3,
         mask_fn=P.causal_window(20, num_sinks=2), sinks=True, softcap=5.0, lengths=(37, 60),
         seed=2),
    DecodeCase("paged_gqa8_tq2", form="paged", b=3, s=12 * 16, h=8, hkv=1, d=32, tq=2,
         lengths=(0, 23, 70), max_pages=5, softcap=3.0, num_splits=2, seed=3),
    DecodeCase("paged_page24_d24_dv8", form="paged", s=10 * 24, page=24, max_pages=4, d=24, dv=8,
         lengths=(5, 90), sinks=True, seed=4),
    DecodeCase("selected_gqa4_ragged_tail", form="selected", h=8, hkv=2, block_size=16, max_sel=4,
         counts=((0, 3), (4, 2)), lengths=(100, 61), sinks=True, num_splits=3, seed=5),
    DecodeCase("selected_positions_block20_tq2", form="selected", s=90, h=4, hkv=1, tq=2,
         block_size=20, max_sel=3, counts=((3,), (1,)), lengths=(90, 41), seed=6),
    DecodeCase("lengths_gqa16_window", b=2, s=70, h=16, hkv=1, tq=2, mask_fn=P.causal_window(30),
         lengths=(70, 33), sinks=True, seed=7),
]
TPU_CASES = [c for c in CASES if c.name != "paged_page24_d24_dv8"]   # TPU tiles: multiples of 8

SMALL_TRITON = DecodeTritonConfig(block_k=16, num_warps=4, num_stages=2)
SMALL_TPU = DecodeTpuConfig(block_k=16)


def make_inputs(c: DecodeCase, dtype=jnp.float32):
    rng = np.random.default_rng(2000 + c.seed)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)  # noqa: E731
    dv = c.dv or c.d
    lengths = np.asarray(c.lengths, np.int32)
    kw = dict(lengths=None, kv_positions=None, q_positions=None, page_table=None,
              block_indices=None, block_counts=None, block_size=None, softcap=c.softcap,
              mask_fn=c.mask_fn, return_lse=True, num_splits=c.num_splits)
    q = normal(c.b, c.tq, c.h, c.d)
    if c.form == "paged":
        pool = c.s // c.page
        k, v = normal(pool, c.page, c.hkv, c.d), normal(pool, c.page, c.hkv, dv)
        table = np.full((c.b, c.max_pages), -1, np.int32)              # unused pages: garbage
        for row in range(c.b):
            used = -(-int(lengths[row]) // c.page)
            table[row, :used] = rng.permutation(pool)[:used]
        kw.update(lengths=jnp.asarray(lengths), page_table=jnp.asarray(table))
    else:
        k, v = normal(c.b, c.s, c.hkv, c.d), normal(c.b, c.s, c.hkv, dv)
        if "positions" in c.name:
            # A rolling-buffer-like cache: slot -> position scrambled, some slots empty (-1).
            pos = np.full((c.b, c.s), -1, np.int32)
            for row in range(c.b):
                n = int(lengths[row])
                pos[row, rng.permutation(c.s)[:n]] = np.arange(n)
            kw["kv_positions"] = jnp.asarray(pos)
        else:
            kw["lengths"] = jnp.asarray(lengths)
        if c.form == "selected":
            nblk = -(-c.s // c.block_size)
            idx = np.full((c.b, c.hkv, c.max_sel), -1, np.int32)
            for row in range(c.b):
                for hk in range(c.hkv):
                    n = c.counts[row][hk]
                    idx[row, hk, :n] = rng.permutation(nblk)[:n]
            kw.update(block_indices=jnp.asarray(idx), block_counts=jnp.asarray(c.counts, np.int32),
                      block_size=c.block_size)
    last = lengths if kw["kv_positions"] is None else np.asarray(kw["kv_positions"]).max(1) + 1
    q_pos = last[:, None] - c.tq + np.arange(c.tq)[None]
    kw["q_positions"] = jnp.asarray(q_pos, jnp.int32)
    kw["sink_logits"] = normal(c.h).astype(jnp.float32) if c.sinks else None
    kw["scale"] = c.d ** -0.5
    return q, k, v, kw


def check(kernel, c: DecodeCase, tol=1e-5):
    q, k, v, kw = make_inputs(c)
    got = kernel(q, k, v, **kw)
    ref = decode_reference(q, k, v, **kw)
    np.testing.assert_allclose(got.out, ref.out, rtol=tol, atol=tol)
    assert np.array_equal(np.isinf(got.lse), np.isinf(ref.lse)), "empty rows must get lse = -inf"
    fin = np.isfinite(ref.lse)
    np.testing.assert_allclose(np.asarray(got.lse)[fin], np.asarray(ref.lse)[fin], rtol=tol, atol=tol)
    if not c.sinks:
        empty = ~np.asarray(fin).transpose(0, 2, 1)                   # [B, Tq, H]
        assert np.all(np.asarray(got.out)[empty] == 0), "rows that see nothing must be zeros"
    return got, ref


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_triton_interpret_matches_reference(case):
    check(lambda *a, **kw: decode_triton(*a, **kw, interpret=True, config=SMALL_TRITON), case)


@pytest.mark.parametrize("case", TPU_CASES, ids=lambda c: c.name)
def test_tpu_interpret_matches_reference(case):
    check(lambda *a, **kw: decode_tpu(*a, **kw, interpret=True, config=SMALL_TPU), case)


# Several selected blocks per tile (`DecodeTritonConfig.blocks_per_tile`): ragged counts
# (0, not multiples of P), the partial last block of the cache selected, GQA 4 and 1, Tq 1
# and 2, block sizes 16 and 20, head dim 24 (masked gathered columns), 2 and 3 splits.
PAGES_CASES = [
    DecodeCase("selected_pages_gqa4_tail", form="selected", h=8, hkv=2, block_size=16, max_sel=7,
               counts=((0, 7), (5, 3)), lengths=(100, 61), sinks=True, num_splits=2, seed=8),
    DecodeCase("selected_pages_positions_block20_gqa1_tq2", form="selected", s=90, h=2, hkv=2, d=24,
               tq=2, block_size=20, max_sel=5, counts=((5, 2), (1, 4)), lengths=(90, 57),
               num_splits=3, seed=9),
]


@pytest.mark.parametrize("per_tile", [2, 4, 3])
@pytest.mark.parametrize("case", PAGES_CASES, ids=lambda c: c.name)
def test_triton_interpret_blocks_per_tile(case, per_tile):
    cfg = dataclasses.replace(SMALL_TRITON, blocks_per_tile=per_tile)
    check(lambda *a, **kw: decode_triton(*a, **kw, interpret=True, config=cfg), case)


@pytest.mark.parametrize("per_tile", [3, 0])
def test_triton_interpret_blocks_per_tile_bf16(per_tile):
    """bf16 cache, 3 blocks per tile and the automatic choice (block_k 64 / 16 = 4)."""
    case = PAGES_CASES[0]
    q, k, v, kw = make_inputs(case, jnp.bfloat16)
    cfg = DecodeTritonConfig(blocks_per_tile=per_tile)
    got = decode_triton(q, k, v, **kw, interpret=True, config=cfg)
    ref = decode_reference(q, k, v, **kw)
    assert got.out.dtype == jnp.bfloat16
    assert rel_err(got.out, ref.out) < 1e-2
    fin = np.isfinite(ref.lse)
    assert np.array_equal(np.isfinite(got.lse), fin)
    assert rel_err(np.asarray(got.lse)[fin], np.asarray(ref.lse)[fin]) < 1e-2


def test_blocks_per_tile_config_and_splits():
    """Automatic blocks per tile; the split heuristic counts tiles of the tile's rows."""
    from pallas_kernels.decode import layout
    assert DecodeTritonConfig().blocks_per_tile == 0          # automatic
    auto = DecodeTritonConfig(blocks_per_tile=0)
    assert auto.selected_blocks_per_tile(16, 512) == 4
    assert auto.selected_blocks_per_tile(16, 2) == 2
    assert auto.selected_blocks_per_tile(128, 512) == 1
    with pytest.raises(ValueError, match="blocks_per_tile"):
        DecodeTritonConfig(blocks_per_tile=-1)
    k = jnp.zeros((1, 8192 * 16, 8, 1), jnp.bfloat16)
    idx = jnp.zeros((1, 8, 512), jnp.int32)
    forms = [layout.form_of(k, page_table=None, block_indices=idx, block_size=16, kv_positions=None,
                            block_k=64, blocks_per_tile=n) for n in (1, 4, 3)]
    assert [f.max_tiles for f in forms] == [512, 128, 171]
    # Quest B1: 128 programs wanted per kv head; 128 tokens a split at least = 8 tiles of one
    # block, 2 of 4 (64 rows), 3 of 3 (48 rows): 512 / 8, 128 / 2, 171 / 3 splits.
    assert [layout.default_num_splits(1, 8, f) for f in forms] == [64, 64, 57]
    with pytest.raises(ValueError, match="blocks_per_tile"):
        layout.form_of(k, page_table=None, block_indices=idx, block_size=16, kv_positions=None,
                       block_k=64, blocks_per_tile=0)


def test_reference_matches_flash_reference_on_dense_view():
    """Contiguous decode with lengths == dense causal attention of the last Tq rows."""
    from pallas_kernels.flash.api import flash_attention
    c = DecodeCase("dense", b=1, s=40, h=4, hkv=1, tq=3, lengths=(40,))
    q, k, v, kw = make_inputs(c)
    out = decode_reference(q, k, v, **kw).out
    ref = flash_attention(q, k, v, mask_fn=P.Causal(), q_positions=kw["q_positions"], impl="xla")
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["triton", "mosaic_tpu"])
def test_api_bf16_default_splits(impl):
    """The public entry point, default tiles and split count, bf16, GQA 4, ragged lengths."""
    c = DecodeCase("bf16", b=2, s=300, h=8, hkv=2, d=32, lengths=(300, 129), seed=7)
    q, k, v, _ = make_inputs(c, jnp.bfloat16)
    lengths = jnp.asarray(c.lengths, jnp.int32)
    out = api.decode_attention(q, k, v, lengths=lengths, impl=impl, interpret=True)
    ref = api.decode_attention(q, k, v, lengths=lengths, impl="xla")
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, ref) < 1e-2


def test_sink_only_rows_and_splits_invariance():
    """Length-0 rows with a sink: zeros and lse = sink; the split count changes nothing."""
    c = DecodeCase("sinks", b=2, s=64, h=4, hkv=2, lengths=(0, 64), sinks=True)
    q, k, v, kw = make_inputs(c)
    outs = [decode_triton(q, k, v, **{**kw, "num_splits": n}, interpret=True, config=SMALL_TRITON)
            for n in (1, 4)]
    np.testing.assert_allclose(outs[0].out, outs[1].out, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(outs[0].out)[0] == 0)
    np.testing.assert_allclose(outs[0].lse[0, :, 0], kw["sink_logits"], rtol=1e-6)


def _bad(**over):
    q = jnp.zeros((2, 1, 4, 16), jnp.float32)
    kv = jnp.zeros((2, 32, 2, 16), jnp.float32)
    kw = dict(lengths=jnp.array([3, 32]))
    args = dict(q=q, k_cache=kv, v_cache=kv)
    for key in ("q", "k_cache", "v_cache"):
        if key in over:
            args[key] = over.pop(key)
    kw.update({"impl": "xla", **over})
    return lambda: api.decode_attention(args["q"], args["k_cache"], args["v_cache"], **kw)


@pytest.mark.parametrize("over, match", [
    (dict(q=jnp.zeros((2, 4, 16))), "q must be 4-D"),
    (dict(q=jnp.zeros((2, 1, 4, 16), jnp.bfloat16)), "share a dtype"),
    (dict(q=jnp.zeros((2, 1, 4, 8))), "head_dim mismatch"),
    (dict(q=jnp.zeros((2, 1, 3, 16))), "multiple of num_kv_heads"),
    (dict(k_cache=jnp.zeros((2, 32, 2, 16), jnp.int32)), "floating point"),
    (dict(kv_positions=jnp.zeros((2, 32), jnp.int32)), "exactly one of lengths"),
    (dict(lengths=None), "exactly one of lengths"),
    (dict(lengths=jnp.array([3, 33])), "lengths must lie in"),
    (dict(lengths=jnp.array([3.0, 4.0])), "lengths must be int"),
    (dict(q_positions=jnp.zeros((2, 2), jnp.int32)), "q_positions must be int"),
    (dict(page_table=jnp.zeros((2,), jnp.int32)), "page_table must be int"),
    (dict(page_table=jnp.array([[0, 1], [2, 2]]), lengths=jnp.array([40, 3])), "outside the pool"),
    (dict(page_table=jnp.zeros((2, 2), jnp.int32), kv_positions=jnp.zeros((2, 32), jnp.int32),
          lengths=None), "needs lengths"),
    (dict(block_indices=jnp.zeros((2, 2, 3), jnp.int32)), "go together"),
    (dict(block_indices=jnp.zeros((2, 2, 3), jnp.int32), block_counts=jnp.full((2, 2), 4),
          block_size=16), "block_counts must lie"),
    (dict(block_indices=jnp.full((2, 2, 3), 2), block_counts=jnp.ones((2, 2), jnp.int32),
          block_size=16), "block_indices must lie"),
    (dict(block_indices=jnp.zeros((2, 2, 3), jnp.int32), block_counts=jnp.ones((2, 2), jnp.int32),
          block_size=0), "block_size must be"),
    (dict(block_indices=jnp.zeros((2, 1, 3), jnp.int32), block_counts=jnp.ones((2, 1), jnp.int32),
          block_size=16), "block_indices must be int"),
    (dict(page_table=jnp.zeros((2, 2), jnp.int32), block_indices=jnp.zeros((2, 2, 3), jnp.int32),
          block_counts=jnp.ones((2, 2), jnp.int32), block_size=16), "cannot be combined"),
    (dict(sink_logits=jnp.zeros((3,))), "sink_logits"),
    (dict(softcap=0.0), "softcap"),
    (dict(num_splits=0), "num_splits"),
    (dict(mask_fn=P.SameSegment()), "segment ids"),
])
def test_bad_arguments_raise(over, match):
    with pytest.raises(ValueError, match=match):
        _bad(**over)()


def test_unknown_impl_raises():
    with pytest.raises(ValueError, match="impl"):
        _bad(impl="cuda")()


def assert_tf32_close(got, q, k, v, kw):
    """A compiled float32 result (dots as TF32) against the float32-exact reference: out,
    and lse where finite (the same rows infinite)."""
    with jax.default_matmul_precision("highest"):
        ref = decode_reference(q, k, v, **kw)
    assert rel_err(got.out, ref.out) < 3e-3
    fin = np.isfinite(ref.lse)
    assert np.array_equal(np.isfinite(got.lse), fin)
    assert rel_err(np.asarray(got.lse)[fin], np.asarray(ref.lse)[fin]) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_triton_compiled_on_gpu(case):
    """The compiled Triton kernel; float32 dots run as TF32 on the GPU: TF32 tolerances
    against a float32-exact reference. Then the same case in bf16 with default tiles."""
    with jax.default_device(jax.devices("gpu")[0]):
        q, k, v, kw = make_inputs(case)
        assert_tf32_close(decode_triton(q, k, v, **kw, config=SMALL_TRITON), q, k, v, kw)
        q, k, v, kw = make_inputs(case, jnp.bfloat16)
        got = decode_triton(q, k, v, **{**kw, "num_splits": None})
        ref = decode_reference(q, k, v, **kw)
        assert rel_err(got.out, ref.out) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("per_tile", [2, 4, 3])
@pytest.mark.parametrize("case", PAGES_CASES, ids=lambda c: c.name)
def test_triton_compiled_selected_blocks_per_tile(case, per_tile):
    """Several blocks per tile compiled (gathered rows; d 24: clamped gathered columns);
    float32 dots as TF32 against a float32-exact reference."""
    cfg = dataclasses.replace(SMALL_TRITON, blocks_per_tile=per_tile)
    with jax.default_device(jax.devices("gpu")[0]):
        q, k, v, kw = make_inputs(case)
        assert_tf32_close(decode_triton(q, k, v, **kw, config=cfg), q, k, v, kw)


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("per_tile", [1, 4, 0])
def test_triton_compiled_selected_quest_b1(per_tile):
    """Quest's B1 shape compiled, bf16: 128K slots by position, H 32 / Hkv 8, D 128, pages of
    16, 512 of the 8192 pages per kv head (one head 509: a count not a multiple of 4),
    default splits; against the XLA reference."""
    b, t, h, hkv, d, page, kept = 1, 131072, 32, 8, 128, 16, 512
    rng = np.random.default_rng(14)
    with jax.default_device(jax.devices("gpu")[0]):
        q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
                   for s in ((b, 1, h, d), (b, t, hkv, d), (b, t, hkv, d)))
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        idx = np.stack([np.sort(rng.permutation(t // page)[:kept]) for _ in range(hkv)])[None]
        counts = np.full((b, hkv), kept, np.int32)
        counts[0, 3] = kept - 3
        kw = dict(lengths=None, kv_positions=pos, q_positions=jnp.full((b, 1), t - 1, jnp.int32),
                  page_table=None, block_indices=jnp.asarray(idx, jnp.int32),
                  block_counts=jnp.asarray(counts), block_size=page, sink_logits=None, softcap=None,
                  scale=d ** -0.5, mask_fn=None, return_lse=True, num_splits=None)
        got = decode_triton(q, k, v, **kw, config=DecodeTritonConfig(blocks_per_tile=per_tile))
        ref = decode_reference(q, k, v, **kw)
        assert rel_err(got.out, ref.out) < 1e-2
        assert rel_err(got.lse, ref.lse) < 1e-3
