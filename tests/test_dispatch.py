"""One backend resolver (`pallas_kernels.common.resolve`) for every op, checked without a GPU.

The platform query `common.current_device` is faked (a Hopper H100, an Ampere GPU, a TPU,
the CPU) and each op's kernels are replaced by recorders that note which backend ran and
return the XLA reference's result, so `impl="auto"` is followed through the real `api.py`
of every op. Also: `config=` reaches the kernel and must match it, `explain=True` says
which backend ran and why the others were skipped, an explicit impl that cannot run says
why, and the argument checks of issue 17 item 13 (mask_fn, scale, indexer dtypes).
"""

from __future__ import annotations

import ast
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import common
from pallas_kernels.block_sparse import api as block_sparse_api
from pallas_kernels.block_sparse.metadata import BlockSparseMetadata
from pallas_kernels.compressed import api as compressed_api
from pallas_kernels.decode import api as decode_api
from pallas_kernels.entmax import api as entmax_api
from pallas_kernels.flash import api as flash_api
from pallas_kernels.flash.mosaic_gpu import MosaicGPUConfig
from pallas_kernels.flash.tpu import TpuConfig
from pallas_kernels.flash.triton import TritonConfig
from pallas_kernels.indexer import api as indexer_api
from pallas_kernels.mla_decode import api as mla_decode_api
from pallas_kernels.nsa_decode import api as nsa_decode_api
from pallas_kernels.nsa_select import api as nsa_select_api
from pallas_kernels.page_scores import api as page_scores_api
from pallas_kernels.token_sparse import api as token_sparse_api
from sparse_jax import patterns as P

HOPPER = common.Device("gpu", "9.0")
AMPERE = common.Device("gpu", "8.0")
TPU = common.Device("tpu")
CPU = common.Device("cpu")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def fake_device(monkeypatch, device):
    monkeypatch.setattr(common, "current_device", lambda: device)


def record(monkeypatch, api):
    """Replace every backend of `api` by a recorder: notes `(name, config)`, returns the
    XLA reference's result (nothing is compiled)."""
    calls = []
    ref = api.IMPLEMENTATIONS["xla"]
    for name in api.IMPLEMENTATIONS:
        def fn(*a, _name=name, **kw):
            calls.append((_name, kw.pop("config", None)))
            kw.pop("interpret", None)
            return ref(*a, **kw)
        monkeypatch.setitem(api.IMPLEMENTATIONS, name, fn)
    return calls


def qkv(t=256, h=4, hkv=2, d=128, dtype=jnp.bfloat16, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (1, t, h, d), dtype), jax.random.normal(ks[1], (1, t, hkv, d), dtype),
            jax.random.normal(ks[2], (1, t, hkv, d), dtype))


# ---------------------------------------------------------------- flash: the Hopper choice

def test_flash_auto_on_faked_hopper_prefers_mosaic_gpu_where_it_applies(monkeypatch):
    """As the `-m gpu` test on an H100: Mosaic GPU for bf16 causal, full, a causal window
    and learned sinks (also under jit with default positions), Triton for what it does not
    cover (float32, window + sink tokens, shifted positions, a soft-cap)."""
    fake_device(monkeypatch, HOPPER)
    calls = record(monkeypatch, flash_api)
    q, k, v = qkv()
    jax.jit(lambda q, k, v: flash_api.flash_attention(q, k, v, mask_fn=P.Causal()))(q, k, v)
    flash_api.flash_attention(q, k, v)                                           # full attention
    flash_api.flash_attention(q, k, v, mask_fn=P.Causal(), sink_logits=jnp.zeros((4,), jnp.float32))
    flash_api.flash_attention(q, k, v, mask_fn=P.causal_window(64))
    flash_api.flash_attention(*(x.astype(jnp.float32) for x in (q, k, v)), mask_fn=P.Causal())
    flash_api.flash_attention(q, k, v, mask_fn=P.causal_window(64, num_sinks=4))
    flash_api.flash_attention(q, k, v, mask_fn=P.Causal(), q_positions=jnp.arange(256)[None] + 3,
                              kv_positions=jnp.arange(256)[None] + 3)
    flash_api.flash_attention(q, k, v, mask_fn=P.Causal(), softcap=30.0)
    assert [c[0] for c in calls] == ["mosaic_gpu"] * 4 + ["triton"] * 4


def test_nsa_compressed_branch_on_faked_hopper_runs_mosaic_gpu(monkeypatch):
    """NSA's compressed branch (`compressed_branch_lse`: flash over keys at `d * j + l - 1`)
    takes Mosaic GPU on Hopper with concrete positions (also with ragged lengths and padded
    key slots), Triton when the positions are traced (jit arguments: the kernels never read
    positions, so they are never assumed)."""
    from sparse_jax.ops import nsa as ops

    fake_device(monkeypatch, HOPPER)
    calls = record(monkeypatch, flash_api)
    cfg = ops.NSAConfig()
    t = 1000
    n = ops.num_cmp_blocks(t, cfg)
    q, k, v = qkv(t=t, h=16, hkv=1)
    k, v = k[:, :n + 3], v[:, :n + 3]
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, t))
    cmp_pos = ops.cmp_block_end(jnp.arange(n + 3, dtype=jnp.int32), cfg)
    cmp_pos = jnp.where(jnp.arange(n + 3) < n, cmp_pos, -1)[None]
    jax.jit(lambda q, k, v: ops.compressed_branch_lse(q, k, v, pos, cmp_pos))(q, k, v)
    jax.jit(lambda q, k, v, p, c: ops.compressed_branch_lse(q, k, v, p, c))(q, k, v, pos, cmp_pos)
    assert [c[0] for c in calls] == ["mosaic_gpu", "triton"]


def test_flash_auto_on_other_devices(monkeypatch):
    calls = record(monkeypatch, flash_api)
    q, k, v = qkv()
    for device in (AMPERE, TPU, CPU):
        fake_device(monkeypatch, device)
        flash_api.flash_attention(q, k, v, mask_fn=P.Causal())
    fake_device(monkeypatch, CPU)
    flash_api.flash_attention(q, k, v, mask_fn=P.Causal(), interpret=True)     # CPU tests: Triton
    fake_device(monkeypatch, HOPPER)
    flash_api.flash_attention(q, k, v, mask_fn=P.Causal(), interpret=True)     # no Mosaic GPU interpret
    assert [c[0] for c in calls] == ["triton", "mosaic_tpu", "xla", "triton", "triton"]


def test_flash_auto_in_gpu_interpret_mode(monkeypatch):
    """`interpret=plgpu.InterpretGPUParams()` (Mosaic GPU's interpret mode): impl='auto' takes
    Mosaic GPU on any device where it covers the call, else the XLA reference (never Triton
    with the GPU interpreter's params); an explicit mosaic_gpu refuses interpret=True, an explicit
    triton / mosaic_tpu refuses the GPU interpreter's params."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    calls = record(monkeypatch, flash_api)
    q, k, v = qkv()
    gpu_interpret = plgpu.InterpretGPUParams()
    for device in (CPU, HOPPER):
        fake_device(monkeypatch, device)
        flash_api.flash_attention(q, k, v, mask_fn=P.Causal(), interpret=gpu_interpret)
    flash_api.flash_attention(q, k, v, mask_fn=P.Causal(), softcap=30.0, interpret=gpu_interpret)
    assert [c[0] for c in calls] == ["mosaic_gpu", "mosaic_gpu", "xla"]
    with pytest.raises(ValueError, match="interpret=True.*InterpretGPUParams"):
        flash_api.flash_attention(q, k, v, mask_fn=P.Causal(), impl="mosaic_gpu", interpret=True)
    for impl in ("triton", "mosaic_tpu"):     # and the other kernels refuse the GPU interpreter's params
        with pytest.raises(ValueError, match=f"impl='{impl}'.*InterpretGPUParams is Mosaic GPU's"):
            flash_api.flash_attention(q, k, v, mask_fn=P.Causal(), impl=impl, interpret=gpu_interpret)


# ---------------------------------------------------------------- every other op

def block_sparse_call(api, **kw):
    q, k, v = qkv(t=32, d=16, dtype=jnp.float32)
    idx = jnp.broadcast_to(jnp.arange(2, dtype=jnp.int32), (1, 2, 2, 2))
    meta = BlockSparseMetadata(idx, jnp.full((1, 2, 2), 2, jnp.int32), jnp.ones((1, 2, 2, 2), bool), 16, 16)
    return api.block_sparse_attention(q, k, v, meta, mask_fn=P.Causal(), **kw)


def compressed_call(api, **kw):
    q, k, v = qkv(t=16, d=16, dtype=jnp.float32)
    return api.compressed_attention(q, k[:, :4], v[:, :4], kv_positions=jnp.arange(4)[None] * 4 + 3, **kw)


def token_sparse_call(api, **kw):
    q, k, v = qkv(t=16, d=16, dtype=jnp.float32)
    idx = jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (1, 16, 2, 3))
    return api.token_sparse_attention(q, k, v, idx, **kw)


def decode_call(api, **kw):
    q, k, v = qkv(t=24, d=16, dtype=jnp.float32)
    return api.decode_attention(q[:, :1], k, v, lengths=jnp.array([20]), **kw)


def mla_decode_call(api, scale=0.2, **kw):
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (1, 1, 4, 24))
    c_kv, k_rope = jax.random.normal(ks[1], (1, 12, 16)), jax.random.normal(ks[2], (1, 12, 8))
    return api.mla_decode(q, c_kv, k_rope, scale=scale, **kw)


def indexer_call(api, **kw):
    ks = jax.random.split(jax.random.key(2), 3)
    q, w, k = (jax.random.normal(ks[0], (1, 8, 2, 16)), jax.random.normal(ks[1], (1, 8, 2)),
               jax.random.normal(ks[2], (1, 8, 16)))
    return api.indexer_topk(q, w, k, k=4, **kw)


OPS = {"block_sparse": (block_sparse_api, block_sparse_call),
       "compressed": (compressed_api, compressed_call),
       "token_sparse": (token_sparse_api, token_sparse_call),
       "decode": (decode_api, decode_call),
       "mla_decode": (mla_decode_api, mla_decode_call),
       "indexer": (indexer_api, indexer_call)}


@pytest.mark.parametrize("op", sorted(OPS))
def test_auto_per_device(op, monkeypatch):
    """GPU (Hopper or not): Triton; TPU: Mosaic TPU; CPU: the XLA reference, or Triton in
    interpret mode; an explicit impl runs whatever the platform (lowering for another)."""
    api, call = OPS[op]
    calls = record(monkeypatch, api)
    for device in (HOPPER, AMPERE, TPU, CPU):
        fake_device(monkeypatch, device)
        call(api)
    call(api, interpret=True)
    call(api, impl="mosaic_tpu", interpret=True)
    call(api, impl="triton")
    assert [c[0] for c in calls] == ["triton", "triton", "mosaic_tpu", "xla", "triton", "mosaic_tpu",
                                     "triton"]


def test_entmax_auto_per_device(monkeypatch):
    """`entmax` has Triton and the XLA reference only: Triton on any GPU, the reference on
    TPU and CPU, Triton in interpret mode when asked; mosaic_tpu is refused by name."""
    q, k, v = qkv(t=32, d=16, dtype=jnp.float32)
    calls = record(monkeypatch, entmax_api)
    for device in (HOPPER, AMPERE, TPU, CPU):
        fake_device(monkeypatch, device)
        entmax_api.entmax_attention(q, k, v, alpha=1.5)
    entmax_api.entmax_attention(q, k, v, alpha=2.0, interpret=True)
    entmax_api.entmax_attention(q, k, v, impl="triton", config=entmax_api.EntmaxTritonConfig())
    assert [c[0] for c in calls] == ["triton", "triton", "xla", "xla", "triton", "triton"]
    with pytest.raises(ValueError, match="not implemented"):
        entmax_api.entmax_attention(q, k, v, impl="mosaic_tpu")
    with pytest.raises(ValueError, match="takes config=EntmaxTritonConfig"):
        entmax_api.entmax_attention(q, k, v, impl="triton", config=TritonConfig())


def test_page_scores_auto_per_device(monkeypatch):
    """`page_scores` (Quest): Triton on any GPU where the kernel covers the call (a
    power-of-two head_dim), the reference elsewhere; the reason when it does not."""
    q = jax.random.normal(jax.random.key(0), (1, 1, 4, 16))
    kmin = jax.random.normal(jax.random.key(1), (1, 2, 8, 16))                # [B, Hkv, P, D]
    valid = jnp.ones((1, 8), bool)
    calls = record(monkeypatch, page_scores_api)
    for device in (HOPPER, AMPERE, TPU, CPU):
        fake_device(monkeypatch, device)
        page_scores_api.page_scores(q, kmin, kmin + 1, valid)
    fake_device(monkeypatch, HOPPER)
    page_scores_api.page_scores(q[..., :12], kmin[..., :12], kmin[..., :12] + 1, valid)
    assert [c[0] for c in calls] == ["triton", "triton", "xla", "xla", "xla"]
    with pytest.raises(ValueError, match="head_dim 12 is not a power of two"):
        page_scores_api.page_scores(q[..., :12], kmin[..., :12], kmin[..., :12] + 1, valid, impl="triton")


def test_nsa_ops_choose_triton_where_their_kernels_cover_the_geometry(monkeypatch):
    """`nsa_select` and `nsa_decode`: Triton on GPU where `l'/d` is a power of two (and,
    for decode, token selection), else the XLA composite; XLA on TPU and CPU."""
    from sparse_jax.ops.nsa import NSAConfig

    good = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=4, window=16)
    odd = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=12, num_selected=4, window=16)
    blocks = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=4, window=16,
                       selection="query_block")

    def geo(cfg):
        return dict(cmp_block=cfg.cmp_block, cmp_stride=cfg.cmp_stride, sel_block=cfg.sel_block)

    for device, kernel in ((HOPPER, "triton"), (AMPERE, "triton"), (TPU, "xla"), (CPU, "xla")):
        fake_device(monkeypatch, device)
        assert nsa_select_api.which_backend("auto", False, **geo(good)) == kernel
        assert nsa_select_api.which_backend("auto", False, **geo(odd)) == "xla"
        assert nsa_decode_api.which_backend("auto", False, good) == kernel
        assert nsa_decode_api.which_backend("auto", False, odd) == "xla"
        assert nsa_decode_api.which_backend("auto", False, blocks) == "xla"
        assert nsa_select_api.which_backend("triton", False, **geo(odd)) is None    # cannot run it
        assert nsa_select_api.which_backend("mosaic_tpu", False, **geo(good)) is None   # no such backend
    fake_device(monkeypatch, CPU)
    assert nsa_select_api.which_backend("auto", True, **geo(good)) == "triton"


def test_nsa_branches_pass_impl_through(monkeypatch):
    """`sparse_jax.ops.nsa` picks no backend: what it passes down is the caller's impl."""
    from sparse_jax.ops import nsa as ops

    seen = []
    real = nsa_select_api.nsa_select
    monkeypatch.setattr(ops, "nsa_select", lambda *a, impl, **kw: (seen.append(impl), real(*a, impl=impl, **kw))[1])
    fake_device(monkeypatch, CPU)
    cfg = ops.NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=3, window=8)
    t, h, hkv, d = 32, 4, 2, 16
    ks = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(ks[0], (1, t, h, d))
    k_cmp = jax.random.normal(ks[1], (1, 7, hkv, d))
    pos = jnp.arange(t)[None]
    cmp_pos = jnp.arange(7)[None] * 4 + 7
    lse = flash_api.flash_attention(q, k_cmp, k_cmp, mask_fn=P.Causal(), q_positions=pos,
                                    kv_positions=cmp_pos, return_lse=True).lse
    ops.select_from_lse(q, k_cmp, lse, pos, cmp_pos, 2, cfg, impl="auto")
    assert seen == ["auto"]


# ---------------------------------------------------------------- config, explain, errors

def test_config_reaches_the_kernel_and_must_match_it(monkeypatch):
    fake_device(monkeypatch, HOPPER)
    calls = record(monkeypatch, flash_api)
    q, k, v = qkv()
    tiles = TritonConfig(block_q=32, block_k=32)
    flash_api.flash_attention(q, k, v, mask_fn=P.Causal(), config=tiles)          # auto: the config's backend
    flash_api.flash_attention(q, k, v, mask_fn=P.Causal(), impl="triton", config=tiles)
    flash_api.flash_attention(q, k, v, mask_fn=P.Causal(), config=MosaicGPUConfig())
    assert calls == [("triton", tiles), ("triton", tiles), ("mosaic_gpu", MosaicGPUConfig())]
    with pytest.raises(ValueError, match="config=TritonConfig"):
        flash_api.flash_attention(q, k, v, impl="mosaic_tpu", config=tiles)
    with pytest.raises(ValueError, match="no tile config"):
        flash_api.flash_attention(q, k, v, impl="xla", config=TpuConfig())
    fake_device(monkeypatch, CPU)
    with pytest.raises(ValueError, match="no backend"):                          # CPU runs the reference
        flash_api.flash_attention(q, k, v, config=tiles)


def test_config_for_gives_the_tiles_of_the_backend_that_runs(monkeypatch):
    """`common.config_for`: a kernel's tiles where `auto` picks that kernel (Hopper), None where
    it picks the reference (CPU, or few rows too wide for the radix top-k's whole-row form)."""
    tiles = indexer_api.TopkSelectConfig(block_s=256)
    rows = lambda r, s=512: dict(scores=jax.ShapeDtypeStruct((r, s), jnp.float32), k=8)  # noqa: E731
    pick = lambda *a: common.config_for("top_k_set", "auto", indexer_api.TOPK_BACKENDS, rows(*a),  # noqa: E731
                                        {"triton": tiles})
    fake_device(monkeypatch, HOPPER)
    assert pick(64) is tiles and pick(8) is tiles and pick(8, indexer_api.WHOLE_ROW_MAX_COLUMNS + 1) is None
    fake_device(monkeypatch, CPU)
    assert pick(64) is None


def test_explain_says_which_ran_and_why_others_were_skipped(monkeypatch, capsys, caplog):
    fake_device(monkeypatch, HOPPER)
    record(monkeypatch, flash_api)
    q, k, v = qkv()
    with caplog.at_level(logging.DEBUG, logger="pallas_kernels"):
        flash_api.flash_attention(q, k, v, mask_fn=P.Causal(), softcap=20.0, explain=True)
    line = capsys.readouterr().out.strip()
    assert line.startswith("flash impl='auto': runs 'triton'")
    assert "mosaic_gpu" in line and "softcap" in line
    assert line in caplog.text                                                    # the debug log line
    fake_device(monkeypatch, CPU)
    flash_api.flash_attention(q, k, v, explain=True)
    line = capsys.readouterr().out
    assert "runs 'xla'" in line and "mosaic_gpu: needs a Hopper GPU" in line and "triton: needs a GPU" in line


def test_explicit_impl_that_cannot_run_says_why():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="impl='mosaic_gpu' cannot run this call.*softcap"):
        flash_api.flash_attention(q, k, v, softcap=30.0, impl="mosaic_gpu")
    with pytest.raises(ValueError, match="impl must be one of"):
        flash_api.flash_attention(q, k, v, impl="cuda")
    with pytest.raises(ValueError, match="not implemented.*available"):
        nsa_select_api.nsa_select(q, q[:, :4, :2], jnp.zeros((1, 4, 256)), jnp.arange(256)[None],
                                  jnp.arange(4)[None], num_sel_blocks=16, cmp_block=16, cmp_stride=16,
                                  sel_block=16, num_selected=2, impl="mosaic_tpu")


# ---------------------------------------------------------------- issue 17 item 13

@pytest.mark.parametrize("op", ["flash", "block_sparse", "decode"])
def test_mask_fn_string_is_refused_naming_it(op):
    """Before: `'str' object is not callable` from inside the kernel's trace."""
    q, k, v = qkv(t=32, d=16, dtype=jnp.float32)
    with pytest.raises(ValueError, match="mask_fn must be None or a callable.*'causal'"):
        if op == "flash":
            flash_api.flash_attention(q, k, v, mask_fn="causal")
        elif op == "block_sparse":
            block_sparse_api.block_sparse_attention(q, k, v, None, mask_fn="causal")
        else:
            decode_api.decode_attention(q[:, :1], k, v, lengths=jnp.array([20]), mask_fn="causal")


@pytest.mark.parametrize("scale", [-0.5, 0.0, float("nan"), "0.5"])
@pytest.mark.parametrize("op", ["flash", "block_sparse", "compressed", "token_sparse", "decode",
                                "mla_decode", "nsa_select"])
def test_scale_must_be_positive_everywhere(op, scale):
    """One rule for every op: scale is None (1/sqrt(D)) or a finite number > 0; 0 (uniform
    rows) and negative scales (reversed ranking) are refused, as mla_decode already did."""
    q, k, v = qkv(t=32, d=16, dtype=jnp.float32)
    with pytest.raises(ValueError, match="scale must be a concrete finite number > 0"):
        if op == "flash":
            flash_api.flash_attention(q, k, v, scale=scale)
        elif op == "nsa_select":
            nsa_select_api.nsa_select(q, k[:, :4], jnp.zeros((1, 4, 32)), jnp.arange(32)[None],
                                      jnp.arange(4)[None] * 4 + 7, num_sel_blocks=2, cmp_block=8,
                                      cmp_stride=4, sel_block=16, num_selected=2, scale=scale)
        else:
            OPS[op][1](OPS[op][0], scale=scale)


def test_scale_positive_still_runs():
    q, k, v = qkv(t=16, d=16, dtype=jnp.float32)
    a = flash_api.flash_attention(q, k, v, scale=0.25)
    b = flash_api.flash_attention(q, k, v, scale=np.float32(0.25))
    np.testing.assert_array_equal(a, b)


def test_indexer_refuses_mixed_query_key_dtypes():
    """Before: the kernels cast the keys to the queries' dtype silently."""
    ks = jax.random.split(jax.random.key(2), 3)
    q, w, k = (jax.random.normal(ks[0], (1, 8, 2, 16)), jax.random.normal(ks[1], (1, 8, 2)),
               jax.random.normal(ks[2], (1, 8, 16), jnp.bfloat16))
    with pytest.raises(ValueError, match="q_index and k_index must share a dtype.*bfloat16"):
        indexer_api.indexer_topk(q, w, k, k=4)


def test_dsa_has_one_top_k():
    """`sparse_jax.ops.dsa` selects through the `indexer` op (its contract: ascending slots,
    -1 last) for every impl, and keys stored at lower precision are cast explicitly."""
    from sparse_jax.ops import dsa

    assert not hasattr(dsa, "topk_from_scores") and not hasattr(dsa, "INDEXER_IMPLS")
    ks = jax.random.split(jax.random.key(5), 3)
    q, w, k = (jax.random.normal(ks[0], (1, 9, 2, 8)), jax.random.normal(ks[1], (1, 9, 2)),
               jax.random.normal(ks[2], (1, 9, 8)))
    pos = jnp.arange(9)[None]
    got = dsa.indexer_topk(q, w, k.astype(jnp.bfloat16), pos, pos, k=4, query_chunk=4)
    want = indexer_api.indexer_topk(q, w, k.astype(jnp.bfloat16).astype(jnp.float32), k=4, impl="xla")
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="impl must be one of"):
        dsa.DSAConfig(impl="cuda")


# ---------------------------------------------------------------- one selection site

def test_backends_chosen_only_in_common_resolve():
    """No api calls the platform query or the removed selection helpers; pallas_kernels'
    api files import nothing from sparse_jax; nsa_decode's query limit matches the layers'."""
    from sparse_jax.ops.attention import DECODE_MAX_QUERIES

    for path in sorted((ROOT / "pallas_kernels").glob("*/api.py")):
        text = path.read_text()
        for word in ("default_backend", "compute_capability", "common.dispatch", "resolved_impl",
                     "selection_impl", "_mosaic_gpu_applies"):
            assert word not in text, (path.name, word)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n.startswith("sparse_jax") for n in names), (path, names)
    for path in (ROOT / "sparse_jax" / "ops").glob("*.py"):
        text = path.read_text()
        assert 'impl="triton"' not in text and "default_backend" not in text, path.name
    assert nsa_decode_api.MAX_QUERIES == DECODE_MAX_QUERIES


@pytest.mark.parametrize("device,want", [(HOPPER, "triton"), (AMPERE, "triton"), (TPU, "xla"), (CPU, "xla")])
def test_top_k_set_runs_the_radix_select_on_a_gpu(monkeypatch, device, want):
    """`indexer.top_k_set` (Quest's page selection, the indexer's select): the radix kernel
    on any GPU, `lax.top_k` elsewhere; a bad call names what is wrong."""
    fake_device(monkeypatch, device)
    calls = []
    for name in indexer_api.TOPK_IMPLEMENTATIONS:
        def fn(*a, _name=name, **kw):
            calls.append(_name)
            return indexer_api.sorted_top_k(*a)
        monkeypatch.setitem(indexer_api.TOPK_IMPLEMENTATIONS, name, fn)
    scores = jax.random.normal(jax.random.key(0), (64, 40))
    vals, slots = indexer_api.top_k_set(scores, 5)
    assert calls == [want] and slots.shape == (64, 5)
    indexer_api.top_k_set(scores[:8], 5)                     # few rows: the whole-row form
    assert calls[-1] == want
    wide = jnp.zeros((8, indexer_api.WHOLE_ROW_MAX_COLUMNS + 1), jnp.float32)
    indexer_api.top_k_set(wide, 5)                           # few rows, too wide for the registers
    assert calls[-1] == "xla"
    if want == "triton":                                     # few rows, a tiled config: declined
        with pytest.raises(ValueError, match="streaming tiles"):
            indexer_api.top_k_set(scores[:8], 5, config=indexer_api.TopkSelectConfig(block_s=16))
    with pytest.raises(ValueError, match="float32"):
        indexer_api.top_k_set(scores.astype(jnp.bfloat16), 5)
    with pytest.raises(ValueError, match="k must"):
        indexer_api.top_k_set(scores, 0)
