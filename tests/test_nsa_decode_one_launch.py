"""`nsa_decode`'s one-launch plan (`TritonConfig(one_launch=True)`, pallas_kernels/nsa_decode/
triton.py `_one_launch_kernel`): cmp programs, the last of a (b, hkv, query) selecting, slc
programs behind a completion flag, in one pallas_call; Triton interpret mode against the XLA
reference (`nsa_decode(impl="xla")`), float32 and bf16, ragged rows, GQA 1 / 4 / 16.

Interpret mode runs the grid in order, so it checks the arithmetic, the counters' arrival
logic and the state layout, not the GPU's ordering of programs (`-m gpu` in
test_nsa_decode_kernel.py compiles it)."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from pallas_kernels.nsa_decode.triton import TritonConfig, nsa_decode_triton
from sparse_jax.ops.nsa import NSAConfig
from test_nsa_decode_kernel import SMALL, check, check_case, lowered_triton_modules, make_case, run_both


@pytest.mark.parametrize("case", [
    # GQA 4, T=2, 5 cmp tiles on 4 splits (spills across splits), 2 slc parts, rows shorter
    # than n blocks, a padded first query, an empty row.
    dict(cfg=SMALL, lengths=(300, 151, 6, 1, 0), max_len=300, h=8, hkv=2, d=8, t=2, splits=(4, None)),
    # GQA 1, one cmp split and one slc part (each counter's only arrival is the last).
    dict(cfg=dict(cmp_block=16, cmp_stride=8, sel_block=32, num_selected=6, window=24),
         lengths=(260, 97, 33), max_len=260, h=2, hkv=2, d=16, t=1, splits=(1, 1)),
    # GQA 16, D=12 and l'=6, l > l' with 2 initial + 1 local forced blocks, 4 slc parts, T=2.
    dict(cfg=dict(cmp_block=12, cmp_stride=3, sel_block=6, num_selected=5, num_initial=2, num_local=1,
                  window=10), lengths=(130, 23), max_len=131, h=16, hkv=1, d=12, t=2, splits=(2, 4)),
])
def test_one_launch_matches_reference(case):
    check_case(case, one_launch=True)


def test_one_launch_bf16_short_contexts():
    """bf16, contexts shorter than one selection block and than one cmp block (no cmp key),
    default splits: the reference's selection sets, outputs within bf16 rounding."""
    cfg = NSAConfig(**SMALL)
    q, q_pos, kw = make_case(cfg, lengths=(200, 11, 5, 3), max_len=200, h=8, hkv=2, d=8, t=1, seed=3,
                             dtype=jnp.bfloat16)
    got, want = run_both(cfg, q, q_pos, kw, TritonConfig(block_cmp=16, block_win=8, one_launch=True))
    check(got, want, q_pos, 2e-2)


def test_one_launch_bad_config():
    cfg = NSAConfig(**SMALL)
    q, q_pos, kw = make_case(cfg, lengths=(40,), max_len=40, h=4, hkv=2, d=8, t=1, seed=0)
    with pytest.raises(ValueError, match="pick one"):
        TritonConfig(select_kernel=True, one_launch=True)
    with pytest.raises(ValueError, match="one_launch must be a bool"):
        TritonConfig(one_launch=1)
    with pytest.raises(ValueError, match="several launches"):
        nsa_decode_triton(q, q_pos, cfg=cfg, scale=1.0, interpret=True, stop_after=1,
                          config=TritonConfig(one_launch=True), **kw)


def test_one_launch_ir_keeps_the_wait(monkeypatch):
    """Lowered for an H200 (B=16, 64K, paper cfg): the slc programs' spin is an scf.while on
    a volatile load (JAX drops a while loop whose result is unused: it once vanished), the
    three arrivals and the acquire are acq_rel GPU-scope atomics, each arrival after a CTA
    barrier."""
    ir = lowered_triton_modules(TritonConfig(one_launch=True), 65536, monkeypatch)["nsa_decode_one_launch"]
    assert ir.count("scf.while") == 1 and "tt.load" in ir and "isVolatile = true" in ir
    atomics = [line for line in ir.splitlines() if "tt.atomic_rmw" in line]
    assert len(atomics) == 4 and all("add, acq_rel, gpu" in a for a in atomics), atomics
    assert ir.count("gpu.barrier") >= 4
