"""Helpers the kernel test files share (tests/test_*_kernels.py).

`Case`: one attention call over a sequence (`q [b, tq, h, d]`, `k, v [b, tk, hkv, d]`)
and what makes it hard (padding rows, sinks, soft-cap, segment ids); an op's test file
subclasses it with the op's own fields. `qkv_and_positions` / `sinks_and_cotangent` draw
its random inputs, `run_vjp` runs a kernel forward and backward under one jit,
`assert_matches_reference` compares a kernel's `(out, lse, grads)` with its reference's,
and `rel_err` / `max_rel_err` are the two relative errors the tests bound.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax import patterns as P


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    b: int = 1
    tq: int = 64
    tk: int = 64
    h: int = 2
    hkv: int = 2
    d: int = 16
    mask_fn: object = P.Causal()       # the element predicate
    pad_q: int = 0                     # leading query rows marked padding (-1) in batch 0
    pad_k: int = 0                     # trailing keys marked padding in the last batch
    segments: bool = False             # random sorted segment ids (packed sequences)
    sinks: bool = False
    softcap: float | None = None
    seed: int = 0


def qkv_and_positions(c: Case, rng, dtype, q_offset: int):
    """`(normal, (q, k, v), q_pos, kv_pos)`: `normal(*shape)` draws standard normals from
    `rng` in `dtype`; q, k, v drawn in that order; positions int numpy, queries at
    `q_offset + arange(tq)`, keys at `arange(tk)`, with `c.pad_q` / `c.pad_k` padding (-1)."""
    normal = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)  # noqa: E731
    q, k, v = normal(c.b, c.tq, c.h, c.d), normal(c.b, c.tk, c.hkv, c.d), normal(c.b, c.tk, c.hkv, c.d)
    q_pos = np.broadcast_to(np.arange(c.tq) + q_offset, (c.b, c.tq)).copy()
    kv_pos = np.broadcast_to(np.arange(c.tk), (c.b, c.tk)).copy()
    q_pos[0, :c.pad_q] = -1
    if c.pad_k:
        kv_pos[-1, -c.pad_k:] = -1
    return normal, (q, k, v), q_pos, kv_pos


def sinks_and_cotangent(c: Case, normal, rng):
    """Sink logits `[h]` float32 (None without `c.sinks`) and the cotangent
    `(dO [b, tq, h, d], dlse [b, h, tq] float32)`, drawn in that order."""
    sinks = normal(c.h).astype(jnp.float32) if c.sinks else None
    cot = (normal(c.b, c.tq, c.h, c.d), jnp.asarray(rng.standard_normal((c.b, c.h, c.tq)), jnp.float32))
    return sinks, cot


def run_vjp(fn, args, kw, cot, *operands):
    """`(out, lse, (dq, dk, dv, dsinks))` of `fn(q, k, v, *operands, **kw, sink_logits=sinks)`
    (`args = (q, k, v, sinks)`, `fn` returns `AttentionOutput`), the gradients those of
    `<out, cot[0]> + <lse, cot[1]>`; one jit (interpret mode compiles once)."""
    def f(q, k, v, sinks, operands):
        res = fn(q, k, v, *operands, **{**kw, "sink_logits": sinks})
        return res.out, res.lse

    def both(q, k, v, sinks, operands, cot):
        (out, lse), vjp = jax.vjp(lambda *a: f(*a, operands), q, k, v, sinks)
        return out, lse, vjp(cot)

    return jax.jit(both)(*args, operands, cot)


def rel_err(a, b):
    """`||a - b|| / ||b||` (Frobenius, float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def max_rel_err(a, b, floor: float = 1e-30):
    """`max |a - b| / max(max |b|, floor)` (float32)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), floor))


def assert_matches_reference(got, want):
    """A kernel's `(out, lse, grads)` against the reference's (`run_vjp`'s results): out and
    lse to 1e-5, lse -inf and output zero on rows that see nothing, gradients finite and
    within 2e-5 (relative) and 1e-4 elementwise. Returns the finite-lse mask `[B, H, Tq]`."""
    out, lse, grads = got
    r_out, r_lse, r_grads = want
    np.testing.assert_allclose(out, r_out, rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.isinf(lse), np.isinf(r_lse)), "empty rows must get lse = -inf"
    fin = np.isfinite(r_lse)
    np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(r_lse)[fin], rtol=1e-5, atol=1e-5)
    empty = ~np.asarray(fin).transpose(0, 2, 1)                  # [B, Tq, H]
    assert np.all(np.asarray(out)[empty] == 0), "rows that see nothing must be zeros"
    for name, g, r in zip(("dq", "dk", "dv", "dsinks"), grads, r_grads):
        if r is None:
            assert g is None
            continue
        assert np.all(np.isfinite(g)), f"{name} not finite"
        assert rel_err(g, r) < 2e-5, f"{name}: rel err {rel_err(g, r):.2e}"
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(np.abs(r).max()), err_msg=name)
    return fin


def assert_close_tf32(got, want):
    """A compiled GPU kernel's `(out, lse, grads)` against a float32-exact reference's, with
    TF32 tolerances: out 3e-3, lse 1e-3 (same finite rows), gradients finite and 5e-3."""
    out, lse, grads = got
    r_out, r_lse, r_grads = want
    assert rel_err(out, r_out) < 3e-3
    fin = np.isfinite(r_lse)
    assert np.array_equal(np.isfinite(lse), fin)
    assert rel_err(np.asarray(lse)[fin], np.asarray(r_lse)[fin]) < 1e-3
    for g, r in zip(grads, r_grads):
        assert (g is None) == (r is None)
        if r is not None:
            assert np.all(np.isfinite(g)) and rel_err(g, r) < 5e-3
