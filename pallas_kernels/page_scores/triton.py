"""Quest page scores on GPU in one pass over the page bounds: Pallas with the Triton lowering.

Compiled on an H200 (2026-12-06): error 2.6e-7 against the XLA scores, 343 us at B=16, 128K,
pages of 16, no faster than XLA's 346 us (docs/BENCHMARKS.md), hence not the default.

(That run read the bounds page-major, `[B, P, Hkv, D]`; they are head-major now.)

`page_scores_triton(q, kmin, kmax, valid, bound_scale)` computes what the XLA reference
(`reference.page_scores_reference`) computes (`[B, Hkv, P]` float32: per page and kv
head the max over the group's query rows of `sum_d max(q_d kmax_d, q_d kmin_d)`, times the
logit scale and the page's `bound_scale`; pages not `valid` -inf), reading the bounds once in
their stored layout `[B, Hkv, P, D]` (bfloat16 / float32, or the float8 codes of
`quest.bound_codes`, widened to float32 in registers): each program's tiles are contiguous.

One program per (batch, kv head, `block_pages` pages): the `[bp, D]` tiles of kmin and kmax,
the group's `R = Tq * H / Hkv` query rows (padded to a power of two by repeating row 0, which
leaves the max unchanged), `R` broadcast multiply-adds of `[bp, D]` on the CUDA cores (`R`
is 4 at H 32 / Hkv 8: under the 16 rows a tensor-core dot needs) and a row sum each; the
`valid` flags of its pages pick -inf for the others (NaN from an empty page's +-inf bounds).
`PageScoresConfig(dot=True)` instead pads the rows to 16 (repeating row 0) and runs two
tensor-core dots `[bp, D] x [D, 16]` in q's 16-bit dtype (float8 codes widened to
bfloat16, exact), float32 accumulation: no widened tiles, no row sums (not yet timed).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.tiles_common import NT


@dataclasses.dataclass(frozen=True)
class PageScoresConfig:
    """block_pages: pages per program (a power of two; the largest power of two <= it that
    divides P is used); num_warps, num_stages: Triton launch parameters; dot: the tensor-core
    form (16-bit q, >= 16 pages per program). Not tuned."""

    block_pages: int = 32
    num_warps: int = 4
    num_stages: int = 2
    dot: bool = False

    def __post_init__(self):
        if not (isinstance(self.block_pages, int) and self.block_pages >= 1
                and self.block_pages & (self.block_pages - 1) == 0):
            raise ValueError(f"block_pages must be a power of two, got {self.block_pages!r}")
        if self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"num_warps and num_stages must be >= 1, got {self.num_warps}, {self.num_stages}")


def _widen(x):
    """float32; float8 through bfloat16 (exact both ways; the fp8 -> bf16 conversion is the
    one the indexer's widened FP8 kernel already ran on an H100)."""
    if x.dtype.itemsize == 1:
        x = x.astype(jnp.bfloat16)
    return x.astype(jnp.float32)


def _kernel(q_ref, lo_ref, hi_ref, valid_ref, *rest, rows, scale, dot):
    sc_ref, o_ref = rest if len(rest) == 2 else (None, rest[0])
    if dot:                                                                 # tensor cores, q's dtype
        q = q_ref[...]                                                      # [rows >= 16, D]
        lo, hi = (x[...].astype(q.dtype) for x in (lo_ref, hi_ref))         # [bp, D]
        s = (lax.dot_general(hi, jnp.maximum(q, 0), NT, preferred_element_type=jnp.float32)
             + lax.dot_general(lo, jnp.minimum(q, 0), NT, preferred_element_type=jnp.float32)).max(axis=1)
    else:
        lo = _widen(lo_ref[...])                                            # [bp, D]
        hi = _widen(hi_ref[...])
        s = None
        for r in range(rows):
            qr = q_ref[r].astype(jnp.float32)                               # [D]
            sr = jnp.sum(jnp.maximum(qr, 0.0)[None, :] * hi + jnp.minimum(qr, 0.0)[None, :] * lo, axis=1)
            s = sr if s is None else jnp.maximum(s, sr)
    s = s * scale
    if sc_ref is not None:
        s = s * sc_ref[...].astype(jnp.float32)
    o_ref[...] = jnp.where(valid_ref[...] != 0, s, -jnp.inf)


MAX_ROWS = 64          # query rows per kv head (Tq * H / Hkv): unrolled multiply-adds past that


def supports(q, kmin, kmax, valid, bound_scale, *, interpret=False, config=None):
    """None where the kernel covers the call, else why not."""
    del kmax, valid, bound_scale, interpret
    d = q.shape[-1]
    if d & (d - 1):
        return f"head_dim {d} is not a power of two"
    rows = q.shape[1] * (q.shape[2] // kmin.shape[1])
    if rows > MAX_ROWS:
        return f"{rows} query rows per kv head > {MAX_ROWS}"
    if config is not None and config.dot:
        if q.dtype.itemsize != 2 or kmin.dtype.itemsize > 2:
            return f"dot=True needs 16-bit q and 16-bit or float8 bounds, got q {q.dtype}, bounds {kmin.dtype}"
        if math.gcd(config.block_pages, kmin.shape[2] & -kmin.shape[2]) < 16:
            return f"dot=True needs >= 16 pages per program: block_pages {config.block_pages}, P {kmin.shape[2]}"
    return None


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "config"))
def page_scores_triton(q, kmin, kmax, valid, bound_scale=None, *, scale: float, interpret=False,
                       config: PageScoresConfig | None = None):
    """Quest page scores, `[B, Hkv, P]` float32 (`api.page_scores`' contract; `supports`).

    Args:
      q: `[B, Tq, H, D]`; kmin, kmax: `[B, Hkv, P, D]`; valid: bool `[B, P]`; bound_scale:
      `[B, Hkv, P, 1]` or None; scale: the logit scale.
    """
    cfg = config or PageScoresConfig()
    b, tq, h, d = q.shape
    _, hkv, p, _ = kmin.shape
    r = tq * (h // hkv)
    rp = max(16, pl.next_power_of_2(r)) if cfg.dot else pl.next_power_of_2(r)
    qg = jnp.moveaxis(q.reshape(b, tq, hkv, h // hkv, d), 1, 2).reshape(b, hkv, r, d)
    qg = jnp.concatenate([qg, jnp.broadcast_to(qg[:, :, :1], (b, hkv, rp - r, d))], axis=2)  # repeat row 0
    bp = math.gcd(cfg.block_pages, p & -p)                  # largest power of two <= block_pages dividing P
    bounds_spec = pl.BlockSpec((None, None, bp, d), lambda b_, k_, j: (b_, k_, j, 0))
    in_specs = [pl.BlockSpec((None, None, rp, d), lambda b_, k_, j: (b_, k_, 0, 0)), bounds_spec, bounds_spec,
                pl.BlockSpec((None, bp), lambda b_, k_, j: (b_, j))]
    args = [qg, kmin, kmax, valid.astype(jnp.int32)]
    if bound_scale is not None:
        in_specs.append(pl.BlockSpec((None, None, bp), lambda b_, k_, j: (b_, k_, j)))
        args.append(bound_scale.reshape(b, hkv, p))
    return pl.pallas_call(
        functools.partial(_kernel, rows=rp, scale=scale, dot=cfg.dot),
        grid=(b, hkv, p // bp),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, bp), lambda b_, k_, j: (b_, k_, j)),
        out_shape=jax.ShapeDtypeStruct((b, hkv, p), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="quest_page_scores",
    )(*args)


CONFIG = PageScoresConfig
