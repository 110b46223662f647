"""The radix top-k select kernel (`pallas_kernels.indexer.select`) in interpret mode against
`lax.top_k`, and the `indexer` op's triton impl (which uses it) against its xla impl."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import common
from pallas_kernels.indexer import indexer_topk, top_k_set
from pallas_kernels.indexer.api import TOPK_BACKENDS
from pallas_kernels.indexer.select import (TWO_STAGE_CHUNK, TopkSelectConfig, default_config, float_keys,
                                           keys_to_floats, packed_row_sums, sorted_top_k, topk_select,
                                           two_stage_top_k, whole_row_config)
from gpu_testing import has_gpu, lower_for_cuda, triton_reductions


def rows_of_every_kind(seed, r, s):
    """`[r, s]` float32 rows cycling through: normal; 80% -inf; all -inf; few values (ties
    across every tile); signed zeros and negatives; extremes (+-inf, +-1e38, denormals);
    all equal; +-1.0 a few ulps apart (the last key bits decide)."""
    rng = np.random.default_rng(seed)
    kinds = [
        lambda: rng.normal(size=s),
        lambda: np.where(rng.random(s) < 0.8, -np.inf, rng.normal(size=s)),
        lambda: np.full(s, -np.inf),
        lambda: rng.choice([-1.5, 0.0, 2.0, 2.5], size=s, p=[0.3, 0.3, 0.3, 0.1]),
        lambda: rng.choice([-0.0, 0.0, -1.0, -2.0, -np.inf], size=s),
        lambda: rng.choice([np.inf, -np.inf, 1e38, -1e38, 1e-45, -1e-45, 0.0, -0.0], size=s),
        lambda: np.full(s, 0.75),
        lambda: (np.float32(1.0).view(np.int32) + rng.integers(0, 40, s)).astype(np.int32).view(np.float32)
        * rng.choice([-1, 1], size=s),
    ]
    return np.stack([kinds[i % len(kinds)]() for i in range(r)]).astype(np.float32)


def expected(x, k):
    """`lax.top_k`'s set, -1 / -inf where not finite, sorted ascending by slot."""
    vals, idx = jax.lax.top_k(jnp.asarray(x), min(k, x.shape[1]))
    idx = np.where(np.asarray(vals) > -np.inf, np.asarray(idx), np.iinfo(np.int32).max)
    idx = np.sort(idx, -1)
    found = idx < np.iinfo(np.int32).max
    slots = np.where(found, idx, -1)
    vals = np.where(found, np.take_along_axis(x, np.where(found, idx, 0), -1), -np.inf)
    return vals.astype(np.float32), slots.astype(np.int32)


def assert_same(got, want):
    (vals, slots), (want_vals, want_slots) = got, want
    assert slots.dtype == jnp.int32 and vals.dtype == jnp.float32
    np.testing.assert_array_equal(slots, want_slots)
    # bitwise, so that -0.0 and +0.0 are told apart
    np.testing.assert_array_equal(np.asarray(vals).view(np.int32), want_vals.view(np.int32))


@pytest.mark.parametrize("r,s,k,cfg", [
    (9, 200, 40, TopkSelectConfig(block_r=4, block_s=64, full_passes=1)),   # S, R not multiples of the tile
    (8, 150, 300, TopkSelectConfig(block_r=2, block_s=32, bits_per_pass=2)),   # k >= S
    (14, 77, 6, TopkSelectConfig()),                               # default config, small k
    (8, 40, 9, TopkSelectConfig(block_s=16, bits_per_pass=1, full_passes=32)),   # never narrowed
])
def test_matches_lax_top_k(r, s, k, cfg):
    x = rows_of_every_kind(r + s, r, s)
    got = topk_select(jnp.asarray(x), k, interpret=True, config=cfg)
    want = expected(x, k)
    assert got[1].shape == (r, min(k, s))
    assert_same(got, want)
    assert (want[1] == -1).any() and (want[1] >= 0).any()
    np.testing.assert_array_equal(sorted_top_k(jnp.asarray(x), k)[1], want[1])


@pytest.mark.parametrize("s,k,chunk", [(5000, 7, 1024), (4096, 512, TWO_STAGE_CHUNK), (300, 40, 64), (130, 70, 64)])
def test_two_stage_top_k_is_lax_top_k(s, k, chunk):
    """The two-stage top-k (and `sorted_top_k`, which takes it on long rows) returns
    `lax.top_k`'s values and slots, ties included (rows of every kind: few values, all
    equal, +-inf); S not a multiple of the chunk, k above the chunk (130, 70, 64)."""
    x = jnp.asarray(rows_of_every_kind(11, 16, s))
    want_v, want_i = jax.lax.top_k(x, k)
    got_v, got_i = two_stage_top_k(x, k, chunk)
    np.testing.assert_array_equal(got_v, want_v)
    np.testing.assert_array_equal(got_i, want_i)
    assert_same(sorted_top_k(x, k), expected(np.asarray(x), k))


def test_lengths_read_only_the_row_prefix():
    """`lengths`: columns past a row's length are not candidates (NaN and +inf there, never
    read); lengths 0, ragged, past the block and past S (clipped)."""
    r, s, k = 6, 100, 10
    x = rows_of_every_kind(5, r, s)
    lengths = np.array([0, 7, 33, 64, 100, 150], np.int32)
    junk = np.where(np.arange(s)[None, :] < lengths[:, None], x, np.where(np.arange(s) % 2, np.nan, np.inf))
    got = topk_select(jnp.asarray(junk.astype(np.float32)), k, lengths=jnp.asarray(lengths), interpret=True,
                      config=TopkSelectConfig(block_r=2, block_s=32))
    assert_same(got, expected(np.where(np.arange(s)[None, :] < lengths[:, None], x, -np.inf).astype(np.float32), k))
    with pytest.raises(ValueError, match="lengths"):
        topk_select(jnp.asarray(x), k, lengths=jnp.zeros((r + 1,), jnp.int32), interpret=True)


def test_ties_lower_slots_win_and_signed_zeros():
    """Threshold values repeated in every tile: the lowest slots among them are taken.
    -0.0 ranks below +0.0 (the IEEE total order of `lax.top_k`)."""
    s = 100
    ties = np.where(np.arange(s) % 10 == 3, 1.0, 0.5)            # 10 ones, 90 halves
    zeros = np.where(np.arange(s) % 2 == 0, -0.0, 0.0)            # 50 -0.0 (even slots), 50 +0.0
    x = np.stack([ties, zeros]).astype(np.float32)
    vals, slots = topk_select(jnp.asarray(x), 25, interpret=True, config=TopkSelectConfig(block_s=32))
    halves = [i for i in range(s) if i % 10 != 3][:15]
    np.testing.assert_array_equal(slots[0], sorted(list(range(3, s, 10)) + halves))
    np.testing.assert_array_equal(slots[1], np.arange(1, 50, 2))  # the +0.0 slots, lowest first
    assert not np.signbit(np.asarray(vals[1])).any()
    assert_same((vals, slots), expected(x, 25))


def test_float_keys_order():
    x = np.array([-np.inf, -1e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, 1e38, np.inf], np.float32)
    keys = float_keys(jnp.asarray(x))
    assert (np.diff(np.asarray(keys)) > 0).all()
    np.testing.assert_array_equal(np.asarray(keys_to_floats(keys)).view(np.int32), x.view(np.int32))


WHOLE_ROW_CASES = [
    (8, 1000, 37),          # S not a power of two (tile 1024), rows of every kind: padding, ties, +-inf
    (1, 333, 333),          # R = 1, k = S (all finite taken, -1 padded past them)
    (8, 300, 1),            # k = 1
    (5, 50, 80),            # k > S: k' = S columns
    (3, 7, 4),              # S below the smallest tile (16)
]


def whole_row_inputs(r, s, k):
    """`[3 r, s]` fresh rows: rows of every kind (all -inf, 80% -inf, few values, signed zeros,
    +-inf and extremes, all equal, ulp-close), normal rows, rounded normal rows (many ties at
    the threshold)."""
    rng = np.random.default_rng(1000 * r + s + k)
    return np.concatenate([rows_of_every_kind(s + k, r, s), rng.normal(size=(r, s)).astype(np.float32),
                           np.round(rng.normal(size=(r, s)), 1).astype(np.float32)])


@pytest.mark.parametrize("r,s,k,bits", [case + (bits,) for case, bits in zip(WHOLE_ROW_CASES, (2, 1, 4, 2, 2))])
def test_whole_row_matches_lax_top_k(r, s, k, bits):
    """The whole-row form (one tile, keys held in registers, no narrowed buffer) against
    `lax.top_k`'s set on fresh rows (`whole_row_inputs`)."""
    x = whole_row_inputs(r, s, k)
    cfg = whole_row_config(s, bits)
    assert cfg.block_s >= s
    assert_same(topk_select(jnp.asarray(x), k, interpret=True, config=cfg), expected(x, k))


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("r,s,k", WHOLE_ROW_CASES)
def test_whole_row_packed_counts_matches_lax_top_k(r, s, k, bits):
    """The whole-row form with a pass's counts packed into int64 words (`packed_counts`: 3
    counts in one word at 2 bits, 15 in four at 4 bits) against `lax.top_k`'s set on the
    same fresh rows as the unpacked form."""
    x = whole_row_inputs(r, s, k)
    cfg = whole_row_config(s, bits, packed_counts=True)
    assert cfg.packed_counts and cfg.block_s >= s
    assert_same(topk_select(jnp.asarray(x), k, interpret=True, config=cfg), expected(x, k))


def test_packed_row_sums_fields():
    """`packed_row_sums` against plain row sums: 1 to 9 flag arrays (partial words), fields
    near their limit (a row all True: sums = bs = 2**16 - 1 in every field, no carry into the
    next), rows all False."""
    rng = np.random.default_rng(0)
    bs = 2**16 - 1
    for n in (1, 3, 4, 5, 9):
        flags = rng.random((n, 3, bs)) < rng.random((n, 3, 1))
        flags[:, 0], flags[:, 1] = True, False
        got = packed_row_sums([jnp.asarray(f) for f in flags])
        assert len(got) == n and all(g.dtype == jnp.int32 for g in got)
        np.testing.assert_array_equal(np.stack(got), flags.sum(axis=2))


@pytest.mark.parametrize("packed", [False, True])
def test_whole_row_with_lengths(packed):
    """`lengths` in the whole-row form: columns past a row's length never read (NaN there)."""
    r, s, k = 4, 90, 12
    x = rows_of_every_kind(3, r, s)
    lengths = np.array([0, 11, 64, 90], np.int32)
    inside = np.arange(s)[None, :] < lengths[:, None]
    cfg = whole_row_config(s, 2, packed_counts=True) if packed else whole_row_config(s)
    got = topk_select(jnp.asarray(np.where(inside, x, np.nan).astype(np.float32)), k, lengths=jnp.asarray(lengths),
                      interpret=True, config=cfg)
    assert_same(got, expected(np.where(inside, x, -np.inf).astype(np.float32), k))


def quest_rows(seed, r=8, s=8192):
    """Quest-like page rows `[r, s]`: bound scores (rounded: ties), the first and last pages
    forced (+inf), a ragged tail of empty pages (-inf), one row of every other kind."""
    rng = np.random.default_rng(seed)
    x = np.round(rng.normal(size=(r, s)) * 8, 0) + 0.5 * rng.random((r, s))
    x[:, 0] = x[:, -1 - seed % 100] = np.inf
    x[:, s - seed % 100:] = -np.inf
    x[1] = rows_of_every_kind(seed, 2, s)[1]                          # 80% -inf: few candidates
    x[2] = np.round(x[2] / 8) * 8                                      # few distinct values
    return x.astype(np.float32)


def test_top_k_set_few_rows_quest_shape():
    """Quest's page top-k at batch 1 (8 rows x 8192 pages, k 512) through `top_k_set`'s
    triton impl with no config: the whole-row form (`default_config`), `lax.top_k`'s set;
    R = 1 too."""
    assert default_config(8, 8192).block_s >= 8192 and default_config(128, 8192).block_s >= 8192
    assert default_config(256, 8192).block_s < 8192 and default_config(8, 16385).block_s < 16385
    x = quest_rows(17)
    assert_same(top_k_set(jnp.asarray(x), 512, impl="triton", interpret=True), expected(x, 512))
    assert_same(top_k_set(jnp.asarray(x[:1]), 512, impl="triton", interpret=True), expected(x[:1], 512))
    packed = whole_row_config(8192, 2, packed_counts=True)
    assert_same(top_k_set(jnp.asarray(x), 512, impl="triton", interpret=True, config=packed), expected(x, 512))


def test_top_k_set_bad_inputs_raise():
    x = jnp.zeros((8, 64), jnp.float32)
    for bad, match in ((x[0], "scores"), (x.astype(jnp.bfloat16), "float32")):
        with pytest.raises(ValueError, match=match):
            top_k_set(bad, 2, impl="triton", interpret=True)
    for k in (0, True, 2.0):
        with pytest.raises(ValueError, match="k must"):
            top_k_set(x, k, impl="triton", interpret=True)


@pytest.mark.parametrize("integer", [True, False])
def test_indexer_op_triton_equals_xla(integer):
    """The op's triton impl (score kernel + select kernel) against its xla impl: exact
    scores (integer inputs, many ties) give identical arrays; float inputs the same
    selected scores (near-ties may swap slots)."""
    rng = np.random.default_rng(7)
    b, t, s, h, d = 2, 21, 45, 3, 8
    draw = (lambda *sh: rng.integers(-2, 3, sh)) if integer else (lambda *sh: rng.normal(size=sh))
    q, w, k = (jnp.asarray(draw(*sh), jnp.float32) for sh in ((b, t, h, d), (b, t, h), (b, s, d)))
    qp = jnp.asarray(np.stack([np.arange(t) + s - t, np.where(np.arange(t) < t - 4, 2 * np.arange(t), -1)]))
    kp = jnp.asarray(np.stack([np.arange(s), np.where(np.arange(s) < s - 9, np.arange(s), -1)]))
    args = dict(k=16, q_positions=qp, kv_positions=kp, query_chunk=8, return_scores=True)
    idx, vals = indexer_topk(q, w, k, impl="triton", interpret=True, **args)
    ref_idx, ref_vals = indexer_topk(q, w, k, impl="xla", **args)
    assert idx.shape == (b, t, 16) and (np.asarray(ref_idx) == -1).any()
    if integer:
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_array_equal(vals, ref_vals)
    else:
        np.testing.assert_array_equal(idx == -1, ref_idx == -1)
        np.testing.assert_allclose(np.sort(vals, -1), np.sort(ref_vals, -1), rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise():
    x = jnp.zeros((4, 8), jnp.float32)
    for bad, name in ((x[0], "scores"), (x.astype(jnp.bfloat16), "scores")):
        with pytest.raises(ValueError, match=name):
            topk_select(bad, 2, interpret=True)
    with pytest.raises(ValueError, match="k must"):
        topk_select(x, 0, interpret=True)
    for kw, name in ((dict(block_s=24), "block_s"), (dict(block_r=0), "block_r"),
                     (dict(bits_per_pass=8), "bits_per_pass"),
                     (dict(full_passes=0), "full_passes"), (dict(packed_counts=1), "packed_counts"),
                     (dict(packed_counts=True, bits_per_pass=1), "packed_counts")):
        with pytest.raises(ValueError, match=name):
            TopkSelectConfig(**kw)
    with pytest.raises(ValueError, match="packed_counts is for the whole-row form"):   # tiled: S > block_s
        topk_select(jnp.zeros((4, 64), jnp.float32), 2, interpret=True,
                    config=TopkSelectConfig(block_s=32, packed_counts=True))
    vals, slots = topk_select(jnp.zeros((0, 8), jnp.float32), 3)
    assert vals.shape == slots.shape == (0, 3)


GPU_CONFIGS = [None, TopkSelectConfig(block_r=4, block_s=256, bits_per_pass=2, full_passes=5, num_warps=8)]


@pytest.mark.parametrize("cfg", GPU_CONFIGS)
def test_lowers_to_triton_at_paper_shape(cfg):
    """The kernel lowers to Triton IR for an H200 at R=512, S=64K, k=2048 without a GPU
    (abstract device; compiles nothing)."""
    mesh_lib = pytest.importorskip("jax._src.mesh")
    f = jax.jit(lambda x: topk_select(x, 2048, config=cfg))
    dev = mesh_lib.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
    with jax.sharding.use_abstract_mesh(mesh_lib.AbstractMesh((1,), ("x",), abstract_device=dev)):
        text = f.trace(jax.ShapeDtypeStruct((512, 65536), jnp.float32)).lower(lowering_platforms=("cuda",)).as_text()
    assert "topk_select" in text


def test_whole_row_lowers_to_triton_at_quest_shape():
    """The whole-row form (`default_config(8, 8192)`) lowers to Triton IR for an H100 at
    Quest B1's shape (8 rows x 8192 pages, k 512) without a GPU (compiles nothing)."""
    text = lower_for_cuda(lambda x: topk_select(x, 512), jax.ShapeDtypeStruct((8, 8192), jnp.float32)).as_text()
    assert "topk_select" in text


@pytest.mark.parametrize("bits,words", [(2, 1), (4, 4)])
def test_packed_counts_lower_to_one_int64_reduction_per_word(bits, words):
    """`packed_counts` at Quest B1's shape lowers to Triton IR for an H100 without a GPU, a
    pass's `2**bits - 1` counts as `words` int64 `tt.reduce`s of the row and none of int32
    (the unpacked 1-bit kernel's int32 row reductions less its pass's one)."""
    def reductions(cfg):
        lowered = lower_for_cuda(lambda x: topk_select(x, 512, config=cfg), jax.ShapeDtypeStruct((8, 8192), jnp.float32))
        return triton_reductions(lowered)

    packed, unpacked = reductions(whole_row_config(8192, bits, packed_counts=True)), reductions(whole_row_config(8192))
    assert [r for r in packed if r[1] == "i64"] == [((1, 8192), "i64")] * words
    assert packed.count(((1, 8192), "i32")) == unpacked.count(((1, 8192), "i32")) - 1
    assert not [r for r in unpacked if r[1] == "i64"]


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("bits,packed", [(None, False), (2, True), (4, True)])
def test_compiled_on_gpu_quest_shape(bits, packed):
    """Quest B1's page top-k compiled (8 rows x 8192, k 512; R = 1 and 8 rows of every kind
    too): `top_k_set`'s auto impl takes the whole-row radix kernel on the GPU (bits None: its
    default config; else `whole_row_config(S, bits, packed_counts=packed)`), and its arrays
    are exactly `lax.top_k`'s set on the CPU."""
    cases = [(quest_rows(5), 512), (quest_rows(6)[:1], 512), (rows_of_every_kind(1, 8, 8192), 512),
             (rows_of_every_kind(2, 8, 5000), 4999), (rows_of_every_kind(3, 8, 16384), 1)]
    for x_np, k in cases:
        with jax.default_device(jax.devices("cpu")[0]):
            want = expected(x_np, k)
        cfg = None if bits is None else whole_row_config(x_np.shape[1], bits, packed_counts=packed)
        with jax.default_device(jax.devices("gpu")[0]):
            x = jnp.asarray(x_np)
            name, _ = common.choose("top_k_set", "auto", TOPK_BACKENDS, dict(scores=x, k=k))
            assert name == "triton"
            assert_same(jax.device_get(jax.jit(lambda s, k=k: top_k_set(s, k, config=cfg))(x)), want)


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
@pytest.mark.parametrize("cfg", GPU_CONFIGS)
def test_compiled_on_gpu_paper_shape(cfg):
    """The compiled kernel at R=256, S=65536, k=2048 on rows of every kind: exactly the set
    of `lax.top_k` on the CPU (whose order of -0.0 / +0.0 is defined)."""
    x_np = rows_of_every_kind(0, 256, 65536)
    with jax.default_device(jax.devices("cpu")[0]):
        want = expected(x_np, 2048)
    with jax.default_device(jax.devices("gpu")[0]):
        got = topk_select(jnp.asarray(x_np), 2048, config=cfg)
        assert_same(jax.device_get(got), want)
