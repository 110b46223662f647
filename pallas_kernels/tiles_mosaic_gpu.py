"""Helpers shared by the Pallas Mosaic GPU kernels of several ops (`*/mosaic_gpu*.py`).

wgmma accumulation that also runs under JAX 0.11.2's GPU interpret mode (`accumulate`,
`mma`), the barrier waits that interpreter requires and compiled kernels skip
(`observe_last_phases`), the SMEM layout of wgmma operand tiles (`smem_transforms`), and
the online-softmax step of the attention forwards (`softmax_step`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.ref import AbstractRef

SMEM_BYTES = 232448      # the most dynamic SMEM a CTA may use on Hopper (H100 / H200: 227 KiB)


class _ValueAcc:
    """A wgmma accumulator held as a value: `accumulate`'s stand-in for an accumulator ref
    under GPU interpret mode."""

    def __init__(self, value):
        self.value = value


def accumulate(body, init, *, interpret):
    """Runs `body(acc_refs)` on wgmma accumulators (a float32 `[M, N]` array, or a tuple of
    them) initialised to `init`, and returns their final values; `body` issues its matmuls
    with `mma`. Compiled: `pl.run_state(body)(plgpu.ACC.init(init))`. Under GPU interpret
    mode (`interpret` an `InterpretGPUParams`) the accumulators are plain values and `mma`
    a float32 `jnp.dot`: JAX 0.11.2's interpreter runs neither `run_state` nor a `wgmma`
    whose left operand is a register array."""
    import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415 - GPU-only import

    if not interpret:
        return pl.run_state(body)(jax.tree.map(plgpu.ACC.init, init))
    accs = jax.tree.map(_ValueAcc, init)
    body(accs)
    return jax.tree.map(lambda a: a.value, accs, is_leaf=lambda x: isinstance(x, _ValueAcc))


def mma(acc_ref, a, b):
    """`acc_ref += a @ b` inside an `accumulate` body: `plgpu.wgmma` (a: SMEM ref or
    register array `[M, K]`, b: SMEM ref `[K, N]`), or its interpret-mode value."""
    import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415 - GPU-only import

    if not isinstance(acc_ref, _ValueAcc):
        plgpu.wgmma(acc_ref, a, b)
        return
    if not isinstance(a, jax.Array) or isinstance(jax.typeof(a), AbstractRef):
        a = a[...]
    acc_ref.value = acc_ref.value + jnp.dot(a, b[...], preferred_element_type=jnp.float32)


def observe_last_phases(barriers, n, stages: int):
    """For GPU interpret mode only (the kernels call it there alone): wait on `barriers`
    (each `[stages]`, one per ring slot) for the phases of a ring's last `min(n, stages)`
    steps (`n` steps in all, step `s` in slot `s % stages`), which the producer never waits
    for. JAX's GPU interpreter requires a thread that waits on a barrier to observe every
    phase it completes (Mosaic GPU tracks phase parity per thread: a skipped phase derails
    the next wait); compiled kernels skip these waits, as no wait follows them."""
    import jax.experimental.pallas.mosaic_gpu as plgpu  # noqa: PLC0415 - GPU-only import

    for slot in range(stages):
        @pl.when(slot < n)
        def _(slot=slot):
            for bar in barriers:
                plgpu.barrier_wait(bar.at[slot])


def smem_transforms(plgpu, d, dtype):
    """The SMEM tiling and swizzle for `[rows, d]` tiles of `dtype` that wgmma / TMA read."""
    swizzle = 128 if d * jnp.dtype(dtype).itemsize >= 128 else 64
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
            plgpu.SwizzleTransform(swizzle))


def softmax_step(s, m, l, acc, *, scale2: float, dtype):
    """One online-softmax step in base 2 on a consumer's score tile, as the Mosaic GPU
    attention forwards run it between their `Q K^T` and `P V` wgmmas.

    Args:
      s: float32 scores `[M, N]` (masked entries -inf); m, l: the running max (of `s *
        scale2`) and sum, `[M]`; acc: float32 `[M, Dv]`; scale2: the logit scale times
        log2(e); dtype: the dtype of `P` for the `P V` wgmma.
    Returns:
      `(acc, l, m_new, p)`: `acc` and `l` rescaled to the new max `m_new` (l with this tile's
      row sums added), `p [M, N]` in `dtype`, behind an optimization barrier (the
      rescale is done before the schedule barrier hands the tensor cores over).
    """
    m_new = jnp.maximum(m, s.max(axis=1) * scale2)
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s * scale2 - lax.broadcast_in_dim(m_new, s.shape, [0]))
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    l = l * alpha + p.sum(axis=1)
    return lax.optimization_barrier((acc, l, m_new, p.astype(dtype)))
