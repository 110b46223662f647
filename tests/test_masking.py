"""`sparse_jax.ops.masking.guard_kv` and the kernels' masking of non-finite entries (issue 17
item 11): a NaN or inf in a padded token or in a real token at position p reaches no output
that cannot see it, through the XLA references and the Triton kernels (interpret mode)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse import block_sparse_attention
from pallas_kernels.compressed import compressed_attention
from pallas_kernels.decode import decode_attention
from pallas_kernels.flash import flash_attention
from pallas_kernels.token_sparse import token_sparse_attention
from sparse_jax import patterns as P
from sparse_jax.ops.masking import guard_kv, guard_shared_kv

B, T, H, HKV, D = 2, 24, 4, 2, 16
PAD, BAD_AT = 3, 13               # row 0: left padding, then a non-finite value at position BAD_AT
IMPLS = [("xla", False), ("triton", True)]


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(B, T, n, D)).astype(np.float32) for n in (H, HKV, HKV))
    pos = np.full((B, T), -1, np.int32)
    pos[0, PAD:] = np.arange(T - PAD)
    pos[1, :17] = np.arange(17)
    return q, k, v, pos


def poisoned(k, v, pos, *, in_key=False):
    """Copies with NaN in every padded token and in row 0's real token `BAD_AT` (its value,
    or its key with `in_key`)."""
    k, v = k.copy(), v.copy()
    k[pos < 0] = np.nan
    v[pos < 0] = np.inf
    (k if in_key else v)[0, pos[0] == BAD_AT, 1, 3] = np.nan
    return k, v


def earlier_mask(pos):
    """Valid outputs that cannot see row 0's position BAD_AT under a causal mask."""
    keep = pos >= 0
    keep[0, pos[0] >= BAD_AT] = False
    return keep


def assert_isolated(got, want, pos):
    keep = earlier_mask(pos)
    got, want = np.asarray(got), np.asarray(want)
    assert np.isfinite(got[keep]).all()
    np.testing.assert_allclose(got[keep], want[keep], atol=1e-6, rtol=1e-6)
    assert (got[pos < 0] == 0).all(), "padded queries give zeros"


# ----------------------------------------------------------------------------- guard_kv itself


def test_guard_zeroes_padding_and_marks_bad_tokens():
    _, k, v, pos = inputs()
    bk, bv = poisoned(k, v, pos)
    gk, gv = (np.asarray(a) for a in guard_kv(jnp.asarray(bk), jnp.asarray(bv), jnp.asarray(pos)))
    bad = np.zeros(pos.shape, bool)
    bad[0, pos[0] == BAD_AT] = True
    assert (gk[pos < 0] == 0).all() and (gv[pos < 0] == 0).all()
    assert np.isnan(gk[bad]).all() and (gv[bad] == 0).all()
    good = (pos >= 0) & ~bad
    assert (gk[good] == k[good]).all() and (gv[good] == v[good]).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_guard_keeps_shapes_dtypes_and_mla_layouts(dtype):
    """Keys and values of different trailing shapes (MLA: RoPE key `[B,T,Dr]`, latent `[B,T,Dc]`)."""
    pos = jnp.asarray([[-1, 0, 1, 2]], jnp.int32)
    k = jnp.ones((1, 4, 8), dtype).at[0, 2, 0].set(jnp.inf)
    c = jnp.ones((1, 4, 16), dtype)
    gk, gc = guard_kv(k, c, pos)
    assert gk.shape == k.shape and gc.shape == c.shape and gk.dtype == gc.dtype == dtype
    np.testing.assert_array_equal(np.asarray(gc[0, :, 0], np.float32), [0, 1, 0, 1])
    assert np.isnan(np.asarray(gk[0, 2], np.float32)).all() and (np.asarray(gk[0, 0], np.float32) == 0).all()
    sk, sv = guard_shared_kv(k, pos)
    assert np.isnan(np.asarray(sk[0, 2], np.float32)).all() and (np.asarray(sv[0, 2], np.float32) == 0).all()


def test_guard_gradient_is_identity_on_clean_tokens():
    _, k, v, pos = inputs()
    f = lambda k, v: sum(jnp.sum(a * a) for a in guard_kv(k, v, jnp.asarray(pos)))
    gk, gv = jax.grad(f, argnums=(0, 1))(jnp.asarray(k), jnp.asarray(v))
    valid = pos >= 0
    np.testing.assert_allclose(np.asarray(gk)[valid], 2 * k[valid])
    assert (np.asarray(gk)[~valid] == 0).all() and (np.asarray(gv)[~valid] == 0).all()


@pytest.mark.parametrize("bad", ["k", "v", "positions"])
def test_guard_rejects_mismatched_shapes(bad):
    k, v, pos = jnp.zeros((2, 5, 1, 4)), jnp.zeros((2, 5, 1, 4)), jnp.zeros((2, 5), jnp.int32)
    args = dict(k=k, v=v, positions=pos)
    args[bad] = args[bad][:, :4]
    with pytest.raises(ValueError, match="k|v"):
        guard_kv(**args)


# ----------------------------------------------------------------------------- every kernel op


def _ops(pos):
    """name -> fn(q, k, v, impl, interpret) -> out, each causal over `pos`."""
    meta = P.block_metadata(P.Causal(), pos, pos, 16, 16, num_kv_heads=HKV)    # Triton: blocks >= 16
    # token_sparse: every earlier block of 4 listed (a superset; the causal predicate masks)
    nblk = T // 4
    idx = np.broadcast_to(np.arange(nblk, dtype=np.int32), (B, T, HKV, nblk))
    return {
        "flash": lambda q, k, v, impl, it: flash_attention(
            q, k, v, mask_fn=P.Causal(), q_positions=pos, kv_positions=pos, impl=impl, interpret=it),
        "block_sparse": lambda q, k, v, impl, it: block_sparse_attention(
            q, k, v, meta, mask_fn=P.Causal(), q_positions=pos, kv_positions=pos, impl=impl, interpret=it),
        "token_sparse": lambda q, k, v, impl, it: token_sparse_attention(
            q, k, v, jnp.asarray(idx), block_size=4, q_positions=pos, kv_positions=pos, impl=impl,
            interpret=it),
        "compressed": lambda q, k, v, impl, it: compressed_attention(
            q, k, v, q_positions=pos, kv_positions=pos, impl=impl, interpret=it)[0],
        "decode": lambda q, k, v, impl, it: decode_attention(
            q, k, v, kv_positions=pos, q_positions=pos, impl=impl, interpret=it),
    }


OPS = ["flash", "block_sparse", "token_sparse", "compressed", "decode"]


@pytest.mark.parametrize("impl,interpret", IMPLS, ids=["xla", "triton-interpret"])
@pytest.mark.parametrize("op", OPS)
def test_guarded_values_reach_only_queries_that_see_them(op, impl, interpret):
    q, k, v, pos = inputs()
    fn = _ops(jnp.asarray(pos))[op]
    clean = fn(jnp.asarray(q), *guard_kv(jnp.asarray(k), jnp.asarray(v), jnp.asarray(pos)), impl, interpret)
    bk, bv = poisoned(k, v, pos)
    got = fn(jnp.asarray(q), *guard_kv(jnp.asarray(bk), jnp.asarray(bv), jnp.asarray(pos)), impl, interpret)
    assert_isolated(got, clean, pos)
    seen = (pos[0] >= BAD_AT)
    assert np.isnan(np.asarray(got)[0, seen]).all(), "a query that sees the bad token stays NaN"


@pytest.mark.parametrize("impl,interpret", IMPLS, ids=["xla", "triton-interpret"])
@pytest.mark.parametrize("op", OPS)
def test_kernels_mask_scores_by_where(op, impl, interpret):
    """A non-finite key (finite values, no guard) reaches no query that cannot see it: the
    kernels replace masked scores, they do not add a bias to them."""
    q, k, v, pos = inputs()
    fn = _ops(jnp.asarray(pos))[op]
    clean = fn(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl, interpret)
    bk = k.copy()
    bk[pos < 0] = np.nan
    bk[0, pos[0] == BAD_AT] = np.inf
    got = fn(jnp.asarray(q), jnp.asarray(bk), jnp.asarray(v), impl, interpret)
    assert_isolated(got, clean, pos)


# ----------------------------------------------------------------------------- a layer on the kernels


@pytest.mark.slow
def test_nsa_layer_on_triton_kernels_isolates_nan():
    """NSA's compressed, selection and window branches on the Triton kernels (interpret):
    NaN in padded tokens and at one real position stays away from earlier outputs."""
    import dataclasses

    from flax import nnx

    from layer_conformance import NAN_AT, ragged_inputs, tiny_config
    from sparse_jax.layers.nsa import NSAAttention

    cfg = tiny_config("N")
    layer = NSAAttention(dataclasses.replace(cfg.attention, impl="triton"),
                         dataclasses.replace(cfg.nsa, query_block=16), interpret=True, rngs=nnx.Rngs(0))
    x, pos = ragged_inputs()
    clean = np.asarray(layer(jnp.asarray(x), jnp.asarray(pos))[0])
    bad = x.copy()
    bad[pos < 0] = np.nan
    bad[0, pos[0] == NAN_AT] = np.nan
    got = np.asarray(layer(jnp.asarray(bad), jnp.asarray(pos))[0])
    keep = pos >= 0
    keep[0, pos[0] >= NAN_AT] = False
    assert np.isfinite(got[keep]).all()
    np.testing.assert_allclose(got[keep], clean[keep], atol=1e-6, rtol=1e-6)


def test_dsa_indexer_loss_ignores_padding_and_keeps_a_real_nan():
    """The indexer KL (warm-up stage): NaN in padded inputs changes nothing; NaN at a real
    position makes it NaN (it used to drop non-finite scores as if invisible: a silent value)."""
    import dataclasses

    from flax import nnx

    from layer_conformance import NAN_AT, ragged_inputs, tiny_config
    from sparse_jax.layers.dsa import total_indexer_loss
    from sparse_jax.models.lm import make_attention

    cfg = tiny_config("D")
    cfg = dataclasses.replace(cfg, dsa=dataclasses.replace(cfg.dsa, stage="warmup", indexer_loss=True))
    layer = make_attention("D", cfg, nnx.Rngs(0))
    x, pos = ragged_inputs()

    def loss(x):
        _, inter = nnx.capture(lambda l: l(jnp.asarray(x), jnp.asarray(pos)), nnx.Intermediate)(layer)
        return float(total_indexer_loss(inter))

    clean = loss(x)
    padded, real = x.copy(), x.copy()
    padded[pos < 0] = np.nan
    real[0, pos[0] == NAN_AT] = np.nan
    assert np.isfinite(clean) and clean > 0
    assert loss(padded) == clean
    assert np.isnan(loss(real))
