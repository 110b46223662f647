"""Keep what a query cannot see out of its output, even when it is NaN or inf.

Attention masks scores with `where(visible, s, -inf)`, so a non-finite key never reaches a
query that cannot see it. Values are different: a masked probability is 0, but `0 * NaN`
is NaN, so one non-finite value (a padded token's garbage, or a real token at position p)
would poison every output of its row through `p @ v`, and so would any pooled summary
(compressed keys, block means) that mixes it in.

`guard_kv` is applied once to the new keys and values where a layer computes them (before
its cache update, so a decode step pays nothing for the old entries):

* padded tokens (position < 0) get `k = v = 0`: they are never visible, and now they are
  harmless to every pooling too;
* a real token whose key or value has a non-finite entry gets `v = 0` and `k = NaN`: a
  query that can see it still gets NaN through its score (the error stays loud), a query
  that cannot see it drops the score by `where` and multiplies a zero value.

`guard_shared_kv` does the same for MQA entries that are key and value at once (DeepSeek-V4
CSA/HCA records, MLA's latent as value with its RoPE key): it returns the two roles apart.
"""

from __future__ import annotations

import jax.numpy as jnp


def _token_finite(x, ndim_token: int):
    """bool `[B, T]`: every entry of token (b, t) of `x [B, T, ...]` is finite."""
    axes = tuple(range(ndim_token, x.ndim))
    return jnp.isfinite(x).all(axis=axes) if axes else jnp.isfinite(x)


def _check(name, x, positions):
    if x.shape[:2] != positions.shape:
        raise ValueError(f"{name} must be [B, T, ...] with [B, T] = positions' shape {list(positions.shape)}, "
                         f"got {list(x.shape)}")


def _per_token(mask, x):
    return mask.reshape(mask.shape + (1,) * (x.ndim - 2))


def guard_kv(k, v, positions):
    """New keys and values made safe to mask.

    Args:
      k: `[B, T, ...]` keys (any trailing shape, e.g. `[Hkv, D]` or MLA's RoPE key `[Dr]`).
      v: `[B, T, ...]` values (MLA: the latent `c_kv [B, T, Dc]`).
      positions: int `[B, T]`, negative = padding.
    Returns:
      `(k, v)` of the same shapes and dtypes: padded tokens zero; a real token with any
      non-finite entry in k or v gets `v = 0` and `k = NaN` (all of its entries).
    """
    positions = jnp.asarray(positions)
    _check("k", k, positions)
    _check("v", v, positions)
    valid = positions >= 0
    good = valid & _token_finite(k, 2) & _token_finite(v, 2)
    bad_k = jnp.where(_per_token(valid, k), jnp.nan, 0).astype(k.dtype)
    k = jnp.where(_per_token(good, k), k, bad_k)
    v = jnp.where(_per_token(good, v), v, jnp.zeros((), v.dtype))
    return k, v


def guard_shared_kv(kv, positions):
    """`(k, v)` for entries `kv [B, T, ...]` that are key and value at once (MQA records):
    `guard_kv(kv, kv, positions)`, two arrays (the key keeps NaN, the value zeros)."""
    return guard_kv(kv, kv, positions)
