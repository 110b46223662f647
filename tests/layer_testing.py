"""Helpers shared by the layer tests of the DeepSeek line (MLA, DSA, CSA/HCA)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

fwd = nnx.jit(lambda layer, x, pos: layer(x, pos)[0])
step = nnx.jit(lambda layer, x, pos, cache: layer(x, pos, cache))


def call(layer, x, pos):
    return layer(x, pos)[0]


def output_and_grads(fn, layer, x, pos, r):
    """`fn(layer, x, pos)` and the gradient of `sum(fn(...) * r)` w.r.t. the layer's parameters
    (one compile)."""
    graphdef, params = nnx.split(layer, nnx.Param)

    @jax.jit
    def run(params):
        y, pullback = jax.vjp(lambda p: fn(nnx.merge(graphdef, p), x, pos), params)
        return y, pullback(r)[0]

    return run(params)


def assert_grads_close(g, g_ref):
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree_util.tree_leaves_with_path(g_ref)):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4, err_msg=str(path))


def ragged_positions(t, pads):
    """`[len(pads), t]` int32: row i left-padded with `pads[i]` entries of -1, then 0, 1, ..."""
    return jnp.asarray(np.stack([np.concatenate([-np.ones(p), np.arange(t - p)]) for p in pads]), jnp.int32)
