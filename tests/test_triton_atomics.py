"""`pallas_kernels.triton_atomics.relaxed_add`: the sums in interpret mode (Pallas' discharge
of `atomic_rmw_p`, reused) and a relaxed `tt.atomic_rmw` in the Triton IR lowered for CUDA."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels.triton_atomics import relaxed_add
from gpu_testing import lower_for_cuda, triton_atomic_shapes


def scatter_rows(rows, vals, n_out, interpret):
    """`out[rows[i]] += vals[i]` over `rows [P, R]` (distinct within a program), one program
    per leading index, float32."""
    p, r = rows.shape
    w = vals.shape[-1]

    def kernel(rows_ref, vals_ref, out_in, out_ref):
        del out_in                                     # aliased with out_ref
        i = pl.program_id(0)
        rr = rows_ref[i]
        c = jnp.arange(w, dtype=jnp.int32)
        relaxed_add(out_ref, (jnp.broadcast_to(rr[:, None], (r, w)), jnp.broadcast_to(c[None, :], (r, w))),
                    vals_ref[i])

    return pl.pallas_call(kernel, grid=(p,), out_shape=jax.ShapeDtypeStruct((n_out, w), jnp.float32),
                          input_output_aliases={2: 0}, interpret=interpret)(
        rows, vals, jnp.zeros((n_out, w), jnp.float32))


def test_relaxed_add_accumulates_like_add_at():
    rng = np.random.default_rng(0)
    p, r, w, n = 5, 8, 16, 12
    rows = np.stack([rng.choice(n, r, replace=False) for _ in range(p)]).astype(np.int32)
    vals = rng.standard_normal((p, r, w)).astype(np.float32)
    want = np.zeros((n, w), np.float32)
    np.add.at(want, rows.reshape(-1), vals.reshape(-1, w))
    got = jax.jit(lambda a, b: scatter_rows(a, b, n, True))(rows, vals)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


def test_relaxed_add_lowers_to_a_relaxed_atomic():
    spec = jax.ShapeDtypeStruct
    found = triton_atomic_shapes(lower_for_cuda(lambda a, b: scatter_rows(a, b, 12, False),
                                                spec((5, 8), jnp.int32), spec((5, 8, 16), jnp.float32)),
                                 with_semantics=True)
    assert found == [((8, 16), "RELAXED")]
