"""`nsa_select` (NSA block selection, arXiv 2502.11089): the Triton kernels (interpret mode)
against the XLA composite (group probabilities -> `overlap_scores` -> `top_blocks`, the
code `sparse_jax.ops.nsa.select_blocks(selection_scores(p_cmp))` runs), and
`nsa_branches` on the fused path against `impl="xla"`.

Inputs: compressed keys at NSA block ends (`i*d + l - 1`, one slot empty), query rows
ragged (row 1 stops early, -1 after), lse from the plain-jnp softmax. Compared: the
selected sets (the kernels keep `lax.top_k`'s order too, checked where no near-ties), and
the kernel's importance on every candidate entry.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import masked_attention
from pallas_kernels.compressed.reference import compressed_mask
from pallas_kernels.nsa_select import nsa_select
from pallas_kernels.nsa_select import triton as kernels
from pallas_kernels.nsa_select.reference import group_probabilities, overlap_scores
from sparse_jax.ops import nsa as ops
from gpu_testing import has_gpu

HEAD_DIM = 8


@dataclasses.dataclass(frozen=True)
class SelectCase:
    t: int
    h: int
    hkv: int
    l: int        # cmp_block
    d: int        # cmp_stride
    ls: int       # sel_block
    n: int        # num_selected

    @property
    def ns(self):
        return -(-self.t // self.ls)

    def kw(self):
        return dict(num_sel_blocks=self.ns, cmp_block=self.l, cmp_stride=self.d, sel_block=self.ls,
                    num_selected=self.n, num_initial=1, num_local=2)


def inputs(case: SelectCase, seed: int, b: int = 2, constant_keys=False, dtype=jnp.float32, d_head=HEAD_DIM):
    rng = np.random.default_rng(seed)
    nb = max(1, (case.t - case.l) // case.d + 1)
    q = jnp.asarray(rng.normal(size=(b, case.t, case.h, d_head)), dtype)
    k = rng.normal(size=(b, nb, case.hkv, d_head))
    if constant_keys:
        k[:] = k[:, :1]
    k = jnp.asarray(k, dtype)
    qpos = np.tile(np.arange(case.t, dtype=np.int32), (b, 1))
    qpos[-1, max(1, case.t - 7):] = -1
    ends = np.arange(nb) * case.d + case.l - 1
    kpos = np.tile(np.where(ends < case.t, ends, -1).astype(np.int32), (b, 1))
    if nb > 3 and not constant_keys:
        kpos[-1, 2] = -1                                                   # an empty slot
    qpos, kpos = jnp.asarray(qpos), jnp.asarray(kpos)
    _, _, lse = masked_attention(q, k, k, compressed_mask(qpos, kpos), scale=d_head ** -0.5)
    return q, k, lse, qpos, kpos


def candidates(case: SelectCase, qpos):
    """bool `[B, 1, T, Ns]`: block j is a candidate of query t (`j*l' <= t`)."""
    t = np.asarray(qpos)[:, None, :, None]
    return (t >= 0) & (np.arange(case.ns) * case.ls <= t)


def run_both(case: SelectCase, q, k, lse, qpos, kpos, config=None):
    """(kernel indices, reference indices, kernel importance, reference importance): the two
    kernels as `nsa_select_triton` chains them (one interpret compile each)."""
    kw = case.kw()
    geo = dict(cmp_block=case.l, cmp_stride=case.d, sel_block=case.ls)

    @jax.jit
    def f(q, k, lse, qpos, kpos):
        imp = kernels.importance(q, k, lse, qpos, kpos, num_sel_blocks=case.ns, scale=HEAD_DIM ** -0.5,
                                 interpret=True, config=config, **geo)
        qpos_p = jnp.pad(qpos, [(0, 0), (0, imp.shape[2] - case.t)], constant_values=-1)
        got = kernels.top_n(imp, qpos_p, interpret=True, **{n: kw[n] for n in (
            "num_sel_blocks", "sel_block", "num_selected", "num_initial", "num_local")})
        want = nsa_select(q, k, lse, qpos, kpos, impl="xla", **kw)
        ref = overlap_scores(group_probabilities(q, k, lse, qpos, kpos, scale=HEAD_DIM ** -0.5),
                             case.ns, **geo)
        return got[:, :case.t, :, :min(case.n, case.ns)], want, imp[:, :, :case.t, :case.ns], ref
    return [np.asarray(x) for x in f(q, k, lse, qpos, kpos)]


def assert_same_sets(got, want):
    assert got.shape == want.shape and got.dtype == np.int32
    np.testing.assert_array_equal(np.sort(got, -1), np.sort(want, -1))


TWO_TILES = kernels.TritonConfig(block_q=16, block_k=64)    # 64 keys: 64 / (l'/d) blocks per tile


@pytest.mark.parametrize("case,config", [
    (SelectCase(t=37, h=8, hkv=2, l=8, d=4, ls=16, n=3), None),       # paper-shaped (l=2d, l'=4d), GQA 4
    (SelectCase(t=45, h=16, hkv=1, l=4, d=4, ls=4, n=5), None),       # l = l' = d (no halo), GQA 16
    (SelectCase(t=5, h=2, hkv=2, l=8, d=4, ls=16, n=3), None),        # T < l < l': no block; n > candidates
    (SelectCase(t=300, h=4, hkv=1, l=8, d=4, ls=16, n=5), TWO_TILES),  # 19 selection blocks: two tiles
    (SelectCase(t=300, h=4, hkv=2, l=16, d=4, ls=8, n=4), TWO_TILES),  # l > l': halo 2 blocks deep, two tiles
], ids=lambda c: f"t{c.t}-g{c.h // c.hkv}-l{c.l}d{c.d}s{c.ls}" if isinstance(c, SelectCase) else str(bool(c)))
def test_kernels_match_composite(case, config):
    q, k, lse, qpos, kpos = inputs(case, seed=case.t + case.hkv)
    got, want, imp, ref = run_both(case, q, k, lse, qpos, kpos, config)
    assert_same_sets(got, want)
    np.testing.assert_array_equal(got, want)              # and top_k's order (no near-ties here)
    cand = np.broadcast_to(candidates(case, qpos), ref.shape)
    np.testing.assert_allclose(imp[cand], ref[cand], rtol=1e-5, atol=1e-6)
    assert (got[np.asarray(qpos) < 0] == -1).all()
    n_cand = cand.sum(-1)
    if case.t >= 2 * case.ls * case.n:                     # the top-n actually chooses
        assert (n_cand > case.n).any() and np.abs(ref[cand]).max() > 0
    # Each valid query has min(n, its candidates) distinct blocks, the rest -1.
    n_valid = (got >= 0).sum(-1)                                            # [B, T, Hkv]
    np.testing.assert_array_equal(n_valid, np.minimum(case.n, n_cand[:, 0]).transpose(0, 1)[..., None]
                                  .repeat(case.hkv, -1))


def test_ties_go_to_the_lower_block_across_key_tiles():
    """Constant keys: every fully visible block has the same importance, bit for bit, in
    both key tiles (the kernel adds in the reference's order), so the free picks are the
    lowest candidate blocks, as `top_k` gives them."""
    case = SelectCase(t=300, h=1, hkv=1, l=8, d=4, ls=16, n=5)
    q, k, lse, qpos, kpos = inputs(case, seed=1, b=1, constant_keys=True)
    got, want, imp, _ = run_both(case, q, k, lse, qpos, kpos, TWO_TILES)
    assert_same_sets(got, want)
    t = int(qpos[0].max())                              # 292: 16 blocks fully visible, in both tiles
    inner = imp[0, 0, t, 1:t // case.ls - 1]            # (the first lacks the halo of block -1)
    assert inner.size >= 16 and (inner == inner[0]).all() and inner[0] > 0
    assert sorted(got[0, t, 0].tolist()) == [0, 1, 2, t // case.ls - 1, t // case.ls]


@pytest.mark.parametrize("case", [SelectCase(t=300, h=4, hkv=1, l=8, d=4, ls=16, n=5),
                                  SelectCase(t=300, h=4, hkv=2, l=16, d=4, ls=8, n=4)],
                         ids=["l<l'", "l>l'"])
def test_importance_does_not_depend_on_the_tiling(case):
    """The default tiles (64 queries, one key tile here) and `TWO_TILES` (16 queries, two key
    tiles) give the same importance on every candidate entry, bit for bit (the same
    additions in the same order whatever the tiling), except the second tile's first
    blocks: their terms before the tile come from the halo dot, whose `P` may round
    differently from the main dot's for the same key (XLA CPU's small-N dot does)."""
    q, k, lse, qpos, kpos = inputs(case, seed=5)
    geo = dict(num_sel_blocks=case.ns, cmp_block=case.l, cmp_stride=case.d, sel_block=case.ls,
               scale=HEAD_DIM ** -0.5, interpret=True)
    tiles = lambda cfg: kernels._tiles(cfg, case.t, case.ns, cmp_block=case.l, cmp_stride=case.d,  # noqa: E731
                                       sel_block=case.ls)
    assert tiles(TWO_TILES).ns_p // tiles(TWO_TILES).bs == 2
    assert tiles(kernels.TritonConfig()).ns_p // tiles(kernels.TritonConfig()).bs == 1
    f = jax.jit(lambda cfg, *a: kernels.importance(*a, config=cfg, **geo), static_argnums=0)
    a = np.asarray(f(None, q, k, lse, qpos, kpos))[:, :, :case.t, :case.ns]
    b = np.asarray(f(TWO_TILES, q, k, lse, qpos, kpos))[:, :, :case.t, :case.ns]
    cand = np.broadcast_to(candidates(case, qpos), a.shape)
    assert np.abs(a[cand]).max() > 0
    first = np.zeros(case.ns, bool)                          # blocks whose halo crosses tiles
    bs, deep = tiles(TWO_TILES).bs, -(-(case.l // case.d - 1) // (case.ls // case.d))
    first[bs:bs + deep] = True
    np.testing.assert_array_equal(a[cand & ~first], b[cand & ~first])
    np.testing.assert_allclose(a[cand & first], b[cand & first], rtol=1e-6, atol=0)


def test_nsa_select_triton_above_the_register_cap_uses_xla_top_k():
    case = SelectCase(t=300, h=1, hkv=1, l=8, d=4, ls=16, n=5)
    q, k, lse, qpos, kpos = inputs(case, seed=3)
    cfg = kernels.TritonConfig(max_sel_blocks=16)                 # Ns_p = 32 > 16

    @jax.jit
    def f(*args):
        return (kernels.nsa_select_triton(*args, scale=HEAD_DIM ** -0.5, interpret=True, config=cfg,
                                          **case.kw()),
                nsa_select(*args, impl="xla", **case.kw()))

    got, want = f(q, k, lse, qpos, kpos)
    assert_same_sets(np.asarray(got), np.asarray(want))


def test_bad_input_raises():
    case = SelectCase(t=20, h=4, hkv=2, l=8, d=4, ls=16, n=3)
    q, k, lse, qpos, kpos = inputs(case, seed=0)
    kw = case.kw()
    with pytest.raises(ValueError, match="lse"):
        nsa_select(q, k, lse[:, :, :-1], qpos, kpos, **kw)
    with pytest.raises(ValueError, match="cmp_positions"):
        nsa_select(q, k, lse, qpos, None, **kw)
    with pytest.raises(ValueError, match="k_cmp"):
        nsa_select(q, k[..., :4], lse, qpos, kpos, **kw)
    with pytest.raises(ValueError, match="sel_block"):
        nsa_select(q, k, lse, qpos, kpos, **{**kw, "sel_block": 10})
    with pytest.raises(ValueError, match="num_selected"):
        nsa_select(q, k, lse, qpos, kpos, **{**kw, "num_selected": 0})
    with pytest.raises(ValueError, match="power of two"):        # l'/d = 3
        nsa_select(q, k, lse, qpos, kpos, **{**kw, "sel_block": 12}, impl="triton", interpret=True)
    with pytest.raises(ValueError, match="block_k"):
        kernels.TritonConfig(block_k=48)
    assert ops.selects_on_kernels("triton", True, ops.NSAConfig(sel_block=48)) is False
    assert ops.selects_on_kernels("auto", True, ops.NSAConfig()) is True
    assert ops.selects_on_kernels("xla", True, ops.NSAConfig()) is False


# ----------------------------------------------------------------------------- nsa_branches


def branch_inputs(seed, b, t, h, hkv, cfg: ops.NSAConfig):
    rng = np.random.default_rng(seed)
    nb = max(1, ops.num_cmp_blocks(t, cfg))
    arr = lambda *shape: jnp.asarray(rng.normal(size=shape).astype(np.float32))  # noqa: E731
    pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    pos[1, t - 9:] = -1
    cpos = np.asarray(ops.cmp_block_end(jnp.arange(nb), cfg))
    cpos = np.tile(np.where(cpos < t, cpos, -1), (b, 1)).astype(np.int32)
    cpos[1, cpos[1] > pos[1].max()] = -1
    kv = dict(k_cmp=arr(b, nb, hkv, HEAD_DIM), v_cmp=arr(b, nb, hkv, HEAD_DIM),
              k_slc=arr(b, t, hkv, HEAD_DIM), v_slc=arr(b, t, hkv, HEAD_DIM),
              k_win=arr(b, t, hkv, HEAD_DIM), v_win=arr(b, t, hkv, HEAD_DIM))
    pos = jnp.asarray(pos)
    return arr(b, t, h, HEAD_DIM), pos, jnp.asarray(cpos), kv


@pytest.mark.parametrize("mode", ["token", "query_block"])
def test_nsa_branches_fused_selection_matches_xla(mode):
    """Forward (the branches, the selection) and, in token mode, gradients of q and every
    branch's k / v: impl="triton" (flash + lse, `nsa_select`, token_sparse / block_sparse,
    interpret) == impl="xla" (`compressed` op's p_group, `select_blocks(selection_scores(.))`).
    query_block mode: forward only (its selection code is token mode's; the time goes to
    the block_sparse backward, tested in its own file)."""
    cfg = ops.NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=3, window=16,
                        selection=mode, query_block=16)
    q, pos, cpos, kv = branch_inputs(7, 2, 70, 4, 2, cfg)
    names = list(kv)
    cot = jnp.asarray(np.random.default_rng(2).normal(size=q.shape).astype(np.float32))

    @jax.jit
    def both(q, kvals):
        res = []
        for impl in ("triton", "xla"):
            def f(q, *arrays, impl=impl):
                out = ops.nsa_branches(q, pos, cmp_positions=cpos, slc_positions=pos,
                                       win_positions=pos, cfg=cfg, impl=impl,
                                       interpret=impl == "triton", **dict(zip(names, arrays)))
                return out.cmp + out.slc + out.win, (out.cmp, out.slc, out.block_indices, out.p_cmp)
            if mode == "token":
                y, pull, aux = jax.vjp(f, q, *kvals, has_aux=True)
                res.append((y, aux, pull(cot)))
            else:
                res.append(f(q, *kvals) + (None,))
        return res

    (y, aux, grads), (y_ref, aux_ref, grads_ref) = both(q, tuple(kv.values()))
    assert aux[3] is None and aux_ref[3] is not None           # p_cmp never materialised
    assert_same_sets(np.asarray(aux[2]), np.asarray(aux_ref[2]))
    assert (np.asarray(aux_ref[2]) >= 0).sum(-1).max() == cfg.num_selected
    for got, want, what in ((y, y_ref, "sum"), (aux[0], aux_ref[0], "cmp"), (aux[1], aux_ref[1], "slc")):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5, err_msg=what)
    for name, g, w in zip(["q"] + names, grads or (), grads_ref or ()):
        np.testing.assert_allclose(g, w, atol=5e-5, rtol=5e-5, err_msg=f"d{name}")
        assert np.abs(np.asarray(w)).max() > 0, name


# ----------------------------------------------------------------------------- GPU


def test_kernels_lower_to_triton_at_paper_shape():
    """Both kernels lower to Triton IR for an H200 at T=64K (bf16, HQ=64, HKV=4, D=128,
    l=32, d=16, l'=64, n=16), without a GPU (abstract device; compiles nothing)."""
    mesh_lib = pytest.importorskip("jax._src.mesh")
    t, h, hkv, d = 65536, 64, 4, 128
    nb = (t - 32) // 16 + 1
    spec = jax.ShapeDtypeStruct
    args = (spec((1, t, h, d), jnp.bfloat16), spec((1, nb, hkv, d), jnp.bfloat16),
            spec((1, h, t), jnp.float32), spec((1, t), jnp.int32), spec((1, nb), jnp.int32))
    f = jax.jit(lambda *a: nsa_select(*a, num_sel_blocks=t // 64, cmp_block=32, cmp_stride=16, sel_block=64,
                                      num_selected=16, impl="triton"))
    dev = mesh_lib.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
    with jax.sharding.use_abstract_mesh(mesh_lib.AbstractMesh((1,), ("x",), abstract_device=dev)):
        text = f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("nsa_select_importance") >= 1 and text.count("nsa_select_top_n") >= 1


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
def test_nsa_select_compiled_on_gpu():
    """T=2048, HQ=16, HKV=4, D=128, bf16, paper l/d/l'/n: compiled kernels vs the XLA
    composite at highest matmul precision. Sets equal except where the reference's own
    importances of the swapped blocks lie within 1e-4 (relative) of each other."""
    case = SelectCase(t=2048, h=16, hkv=4, l=32, d=16, ls=64, n=16)
    with jax.default_device(jax.devices("gpu")[0]):
        q, k, lse, qpos, kpos = inputs(case, seed=0, dtype=jnp.bfloat16, d_head=128)
        scale = 128 ** -0.5
        got = np.asarray(jax.jit(lambda *a: nsa_select(*a, scale=scale, impl="triton", **case.kw()))(
            q, k, lse, qpos, kpos))
        with jax.default_matmul_precision("highest"):
            want = np.asarray(nsa_select(q, k, lse, qpos, kpos, scale=scale, impl="xla", **case.kw()))
            ref = np.asarray(overlap_scores(group_probabilities(q, k, lse, qpos, kpos, scale=scale), case.ns,
                                            cmp_block=32, cmp_stride=16, sel_block=64))
    assert got.shape == want.shape
    bad = np.argwhere((np.sort(got, -1) != np.sort(want, -1)).any(-1))       # [row, (b, t, h)]
    for b, t, h in bad:
        extra = set(got[b, t, h].tolist()) ^ set(want[b, t, h].tolist())
        vals = ref[b, h, t, sorted(extra - {-1})]
        assert vals.size and np.ptp(vals) <= 1e-4 * vals.max(), (b, t, h, extra, vals)
    assert len(bad) <= 0.001 * got[..., 0].size, len(bad)
