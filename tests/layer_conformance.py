"""The checks every attention layer meets, whatever its letter of the layer spec.

`LayerConformance` is subclassed once per layer type (`tests/test_layer_conformance.py`);
a subclass names its `spec` (one letter of `sparse_jax.models.lm.LAYER_TYPES`, or "HY"
for the HySparse sparse layer after its full layer) and, where its math needs it, a looser
bound with the reason. The layers are built by `make_attention` from a tiny `LMConfig` and
called through the one interface `y, cache = layer(x, positions, cache, shared)`.

Inputs: a batch of two ragged rows, row 0 left-padded (`PAD` entries of -1, then
`0..T-PAD-1`), row 1 right-padded (`0..LEN1-1`, then -1). Checks:

* decode: token by token with a cache equals prefill at every valid position;
* ragged rows: each row's outputs do not depend on its padding side;
* chunked prefill: calls of a few tokens each (a different count per row, some 0) then
  equal prefill;
* gradients of the parameters and the input are finite;
* bf16 activations are close to float32 (relative error);
* `cache.nbytes()` equals the bytes of the cache's arrays, empty and after a call;
* NaN isolation (issue 17): NaN in a padded token's input leaves every valid output
  unchanged; NaN in row 0 at position p leaves row 0's outputs at positions < p and all of
  row 1 unchanged (outputs that attend to p may be NaN); the same through the caches of a
  chunked prefill whose padded entries are NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_jax import patterns as P
from sparse_jax.layers.hysparse import HySparseConfig
from sparse_jax.models.lm import LMConfig, make_attention
from sparse_jax.ops.csa import CSAConfig
from sparse_jax.ops.dsa import DSAConfig
from sparse_jax.ops.mla import MLAConfig
from sparse_jax.ops.nsa import NSAConfig

T, PAD, LEN1, D_MODEL = 24, 3, 17, 32
NAN_AT = 13                       # row 0's position that gets a NaN input
CHUNK = 9                         # tokens per call of the chunked prefill (padded with -1)
SCHEDULE = ((7, 1, 9, 7), (3, 9, 0, 5))      # tokens per call, per row: 24 and 17


def tiny_config(spec: str, dtype=jnp.float32) -> LMConfig:
    """Every layer type at test sizes: blocks of 8, selections smaller than the context."""
    return LMConfig(
        vocab_size=16, layer_spec=spec, d_model=D_MODEL, num_heads=4, num_kv_heads=2, window=6,
        num_sinks=2, pattern=P.longformer(5, num_global=1), pattern_block=8,
        nsa=NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, num_selected=3, window=6, query_block=8),
        hysparse=HySparseConfig(block_size=4, top_k_tokens=8, window=6),
        moba_block=4, moba_top_k=2,
        mla=MLAConfig(kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8),
        dsa=DSAConfig(index_heads=2, index_head_dim=8, top_k=8),
        csa=CSAConfig(ratio=2, head_dim=16, rope_dim=8, top_k=4, index_heads=2, index_head_dim=8, window=6),
        hca=CSAConfig(ratio=4, overlap=False, head_dim=16, rope_dim=8, top_k=None, window=6),
        dtype=dtype)


class Stack(nnx.Module):
    """The layers of a spec, each called on the same input; returns the last one's output.
    Every layer is called through `forward`, which hands `shared` on (HySparse's full layer
    returns its own: `sparse_jax.layers.base.AttentionLayer`)."""

    def __init__(self, spec: str, dtype, seed: int = 0):
        config, rngs = tiny_config(spec, dtype), nnx.Rngs(seed)
        self.layers = nnx.List([make_attention(letter, config, rngs) for letter in spec])

    def init_cache(self, batch: int, max_len: int):
        return [layer.init_cache(batch, max_len) for layer in self.layers]

    def __call__(self, x, positions, caches=None):
        shared, new = None, []
        for i, layer in enumerate(self.layers):
            cache = None if caches is None else caches[i]
            y, cache, shared = layer.forward(x, positions, cache, shared)
            new.append(cache)
        return y, (None if caches is None else new)


_call = nnx.jit(lambda stack, x, pos, caches: stack(x, pos, caches))


def ragged_inputs(seed: int = 0):
    """x `[2, T, D]` float32, positions `[2, T]`: row 0 left-padded, row 1 right-padded."""
    x = np.random.default_rng(seed).normal(size=(2, T, D_MODEL)).astype(np.float32)
    pos = np.full((2, T), -1, np.int32)
    pos[0, PAD:] = np.arange(T - PAD)
    pos[1, :LEN1] = np.arange(LEN1)
    return x, pos


@functools.cache
def _prefill(spec: str):
    x, pos = ragged_inputs()
    y, _ = _call(Stack(spec, jnp.float32), jnp.asarray(x), jnp.asarray(pos), None)
    return x, pos, np.asarray(y)


def cache_bytes(cache) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(cache))


class LayerConformance:
    spec: str = ""
    atol = 3e-5                   # decode / chunked / ragged against prefill
    bf16_rel = 3e-2               # relative L2 error of bf16 against float32

    def build(self, dtype=jnp.float32) -> Stack:
        return Stack(self.spec, dtype)

    @property
    def prefill(self):
        """(x, positions, y) of the float32 stack on the ragged inputs (computed once per spec)."""
        return _prefill(self.spec)

    def assert_valid_close(self, got, want, pos, what, atol=None):
        valid = pos >= 0
        assert np.isfinite(got[valid]).all(), f"{self.spec}: {what} has non-finite outputs"
        np.testing.assert_allclose(got[valid], want[valid], atol=atol or self.atol, rtol=self.atol,
                                   err_msg=f"{self.spec}: {what}")

    # ---------------------------------------------------------------- the checks

    def test_decode_equals_prefill(self):
        x, pos, y = self.prefill
        stack = self.build()
        caches = stack.init_cache(2, T)
        got = np.zeros_like(y)
        for t in range(T):
            out, caches = _call(stack, jnp.asarray(x[:, t:t + 1]), jnp.asarray(pos[:, t:t + 1]), caches)
            got[:, t] = np.asarray(out)[:, 0]
        self.assert_valid_close(got, y, pos, "token-by-token decode vs prefill")

    def test_ragged_rows_pad_either_side(self):
        """Each row's tokens padded on the other side (row 0 right, row 1 left) give the same
        outputs: padding side and length are per row (same shape, so no new compile)."""
        x, pos, y = self.prefill
        swapped_x, swapped_pos = np.zeros_like(x), np.full_like(pos, -1)
        for row, right in ((0, True), (1, False)):
            valid = pos[row] >= 0
            n = int(valid.sum())
            sl = slice(0, n) if right else slice(T - n, T)
            swapped_x[row, sl], swapped_pos[row, sl] = x[row, valid], pos[row, valid]
        got, _ = _call(self.build(), jnp.asarray(swapped_x), jnp.asarray(swapped_pos), None)
        for row in range(2):
            np.testing.assert_allclose(np.asarray(got)[row, swapped_pos[row] >= 0], y[row, pos[row] >= 0],
                                       atol=self.atol, rtol=self.atol,
                                       err_msg=f"{self.spec}: row {row} padded on the other side")

    def chunked(self, stack, x, fill=0.0):
        """Outputs `[2, T, D]` of the chunked prefill of `x` per SCHEDULE (each call padded
        to CHUNK entries whose inputs are `fill`), and the positions `[2, T]` it covers."""
        pos = np.full((2, T), -1, np.int32)
        for b, sched in enumerate(SCHEDULE):
            pos[b, :sum(sched)] = np.arange(sum(sched))
        caches = stack.init_cache(2, T)
        got, done = np.full((2, T, D_MODEL), np.nan, np.float32), [0, 0]
        for step in range(len(SCHEDULE[0])):
            xc = np.full((2, CHUNK, D_MODEL), fill, np.float32)
            pc = np.full((2, CHUNK), -1, np.int32)
            for b, sched in enumerate(SCHEDULE):
                n = sched[step]
                xc[b, :n], pc[b, :n] = x[b, done[b]:done[b] + n], np.arange(done[b], done[b] + n)
            out, caches = _call(stack, jnp.asarray(xc), jnp.asarray(pc), caches)
            for b, sched in enumerate(SCHEDULE):
                got[b, done[b]:done[b] + sched[step]] = np.asarray(out)[b, :sched[step]]
                done[b] += sched[step]
        return got, pos

    def test_chunked_prefill_equals_prefill(self):
        x, _, _ = self.prefill
        stack = self.build()
        got, pos = self.chunked(stack, x)
        y, _ = _call(stack, jnp.asarray(x), jnp.asarray(pos), None)
        self.assert_valid_close(got, np.asarray(y), pos, "chunked prefill vs prefill")

    def test_nan_in_chunks_reaches_only_later_positions(self):
        """Through the caches: NaN in every padded entry of every call and at row 0's NAN_AT
        (inside a call, after positions of the same call)."""
        x, _, _ = self.prefill
        stack = self.build()
        clean, pos = self.chunked(stack, x)
        bad = x.copy()
        bad[0, NAN_AT] = np.nan                      # row 0 has no padding here: slot = position
        got, _ = self.chunked(stack, bad, fill=np.nan)
        earlier = pos.copy()
        earlier[0, pos[0] >= NAN_AT] = -1
        self.assert_valid_close(got, clean, earlier, f"NaN in chunks and at position {NAN_AT}", atol=1e-6)

    def test_gradients_finite(self):
        x, pos, _ = self.prefill
        stack = self.build()
        r = jnp.asarray(np.random.default_rng(1).normal(size=x.shape).astype(np.float32))
        graphdef, params, rest = nnx.split(stack, nnx.Param, ...)

        @jax.jit
        def grads(params, x):
            loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p, rest)(x, jnp.asarray(pos))[0] * r)
            return jax.grad(loss, argnums=(0, 1))(params, x)

        g_params, g_x = grads(params, jnp.asarray(x))
        for path, g in jax.tree_util.tree_leaves_with_path(g_params):
            assert np.isfinite(np.asarray(g)).all(), f"{self.spec}: gradient of {jax.tree_util.keystr(path)}"
        assert np.isfinite(np.asarray(g_x)).all(), f"{self.spec}: gradient of x"
        assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(g_params))

    def test_bf16_close_to_float32(self):
        x, pos, y = self.prefill
        y16, _ = _call(self.build(jnp.bfloat16), jnp.asarray(x), jnp.asarray(pos), None)
        assert y16.dtype == jnp.bfloat16
        y16 = np.asarray(y16.astype(jnp.float32))
        valid = pos >= 0
        assert np.isfinite(y16[valid]).all()
        err = np.linalg.norm(y16[valid] - y[valid]) / np.linalg.norm(y[valid])
        assert err < self.bf16_rel, f"{self.spec}: bf16 relative error {err:.3g}"

    def test_cache_nbytes_is_its_arrays(self):
        x, pos, _ = self.prefill
        stack = self.build()
        caches = stack.init_cache(2, T)
        for layer_cache in caches:
            assert layer_cache.nbytes() == cache_bytes(layer_cache), f"{self.spec}: empty cache"
        _, caches = _call(stack, jnp.asarray(x[:, :CHUNK]), jnp.asarray(pos[:, :CHUNK]), caches)
        for layer_cache in caches:
            assert layer_cache.nbytes() == cache_bytes(layer_cache), f"{self.spec}: cache after a call"

    def test_nan_in_padding_changes_nothing(self):
        x, pos, y = self.prefill
        bad = x.copy()
        bad[pos < 0] = np.nan                      # every padded token of both rows
        got, _ = _call(self.build(), jnp.asarray(bad), jnp.asarray(pos), None)
        self.assert_valid_close(np.asarray(got), y, pos, "NaN in padded tokens", atol=1e-6)

    def test_nan_at_a_position_reaches_only_later_ones(self):
        x, pos, y = self.prefill
        bad = x.copy()
        bad[0, pos[0] == NAN_AT] = np.nan
        got, _ = _call(self.build(), jnp.asarray(bad), jnp.asarray(pos), None)
        earlier = pos.copy()
        earlier[0, pos[0] >= NAN_AT] = -1           # row 0 before NAN_AT, all of row 1
        self.assert_valid_close(np.asarray(got), y, earlier, f"NaN at position {NAN_AT}", atol=1e-6)
