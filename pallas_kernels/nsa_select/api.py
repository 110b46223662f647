"""`nsa_select`: NSA's block selection (arXiv 2502.11089) from the compressed branch's
queries, keys and log-sum-exp, without the `[B, Hkv, T, N]` group probabilities in HBM.

`nsa_select(q, k_cmp, lse, q_positions, cmp_positions, ...)` returns the selected blocks
`block_indices [B, T, Hkv, min(n, Ns)]` int32 that
`top_blocks(overlap_scores(p_group))` gives (`reference.py`; `sparse_jax.ops.nsa`'s
`select_blocks(selection_scores(p_cmp))`), where `p_group = sum_g exp(q_g k^T * scale -
lse_g)` over the visible compressed keys (the cmp branch's attention probabilities summed
over each GQA group) and `lse [B, H, T]` is the cmp branch's log-sum-exp
(`flash_attention(..., return_lse=True)`). Per query and KV head: the forced blocks
(`j < num_initial`, `j > t // l' - num_local`) first, ascending, then the best causal
blocks (`j*l' <= t`) by descending importance, ties to the lower block; -1 for unused
entries (few candidates, padded query). The kernels give the same order up to rounding
of near-equal importances; consumers (`token_sparse`, `selection.union_metadata`) only need the
set.

Discrete output: no gradient (the inputs are `stop_gradient`-ed).

`impl`: "auto" (GPU: "triton" where `l'/d` is a power of two, else "xla"; TPU and CPU:
"xla", the composite) | "xla" | "triton", resolved by `common.resolve` from the backends'
declarations (`which_backend` tells the outcome without running); `interpret=True` runs the
kernels in interpret mode on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.nsa_select import reference, triton
from pallas_kernels.nsa_select.reference import nsa_select_reference
from pallas_kernels.nsa_select.triton import TritonConfig

BACKENDS = {"triton": triton, "xla": reference}   # impl="auto" order
IMPLEMENTATIONS = {"xla": nsa_select_reference, "triton": triton.nsa_select_triton}


def which_backend(impl: str, interpret=False, *, cmp_block: int, cmp_stride: int, sel_block: int,
                  config=None) -> str | None:
    """The backend `nsa_select(impl=...)` runs for this geometry here ("triton" or "xla"),
    or None where `impl` is not one of this op's or cannot run it (`common.choose`)."""
    if impl not in ("auto", *BACKENDS):
        return None
    call = dict(cmp_block=cmp_block, cmp_stride=cmp_stride, sel_block=sel_block)
    return common.choose("nsa_select", impl, BACKENDS, call, interpret=interpret, config=config)[0]


def _check(q, k_cmp, lse, q_positions, cmp_positions, ints):
    for name, x in (("q", q), ("k_cmp", k_cmp)):
        if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be float [batch, seq, heads, head_dim], got "
                             f"{x.dtype}{list(x.shape)}")
    b, t, h, d = q.shape
    if k_cmp.shape[0] != b or k_cmp.shape[3] != d or h % k_cmp.shape[2]:
        raise ValueError(f"k_cmp must be [{b}, N, Hkv, {d}] with Hkv dividing {h}, got {k_cmp.shape}")
    if lse.shape != (b, h, t) or not jnp.issubdtype(lse.dtype, jnp.floating):
        raise ValueError(f"lse must be float [{b}, {h}, {t}], got {lse.dtype}{list(lse.shape)}")
    for name, pos, n in (("q_positions", q_positions, t), ("cmp_positions", cmp_positions, k_cmp.shape[1])):
        if pos is None:
            raise ValueError(f"{name} is required (int [{b}, {n}])")
        common.check_positions(name, pos, b, n)
    for name, val in ints.items():
        low = 0 if name in ("num_initial", "num_local") else 1
        if not isinstance(val, int) or isinstance(val, bool) or val < low:
            raise ValueError(f"{name} must be an int >= {low}, got {val!r}")
    for name in ("cmp_block", "sel_block"):
        if ints[name] % ints["cmp_stride"]:
            raise ValueError(f"{name} ({ints[name]}) must be a multiple of cmp_stride "
                             f"({ints['cmp_stride']})")


def nsa_select(q, k_cmp, lse, q_positions, cmp_positions, *, num_sel_blocks: int, cmp_block: int,
               cmp_stride: int, sel_block: int, num_selected: int, num_initial: int = 1,
               num_local: int = 2, scale=None, impl: str = "auto", interpret=False, config=None,
               explain=False):
    """Selected blocks per query and KV head.

    Args:
      q: `[B, T, H, D]` cmp-branch queries; k_cmp: `[B, N, Hkv, D]` compressed keys, slot
        i = compressed block i (tokens `i*d .. i*d + l - 1`); lse: `[B, H, T]` float, the
        cmp branch's log-sum-exp (-inf on rows that see nothing).
      q_positions: int `[B, T]` (-1 = padding query); cmp_positions: int `[B, N]`, each
        compressed key's last-token position (-1 = empty slot).
      num_sel_blocks: Ns, selection blocks of `sel_block` (l') tokens (the slc keys').
      cmp_block, cmp_stride: l, d. num_selected, num_initial, num_local: n and the forced
        first / most recent blocks.
      scale: logit scale (> 0), default `1/sqrt(D)`.
      impl: "auto" | "xla" | "triton"; interpret: run the kernels in interpret mode.
      config: the Triton kernels' tiles (`TritonConfig`, importable from here); the reference takes none.
      explain: print which backend runs and why the others were skipped.
    Returns:
      `block_indices [B, T, Hkv, min(num_selected, num_sel_blocks)]` int32 (-1 unused).
    """
    ints = dict(num_sel_blocks=num_sel_blocks, cmp_block=cmp_block, cmp_stride=cmp_stride,
                sel_block=sel_block, num_selected=num_selected, num_initial=num_initial,
                num_local=num_local)
    _check(q, k_cmp, lse, q_positions, cmp_positions, ints)
    scale = common.check_scale(scale, q.shape[-1])
    fn = common.resolve("nsa_select", impl, BACKENDS, IMPLEMENTATIONS, ints, interpret=interpret,
                        config=config, explain=explain)
    sg = jax.lax.stop_gradient
    return fn(sg(q), sg(k_cmp), sg(lse), jnp.asarray(q_positions, jnp.int32),
              jnp.asarray(cmp_positions, jnp.int32), scale=scale, **ints)


def select_from_importance(imp, q_positions, *, num_sel_blocks: int, sel_block: int,
                           num_selected: int, num_initial: int = 1, num_local: int = 2,
                           interpret=False, config=None):
    """`nsa_select`'s second stage on an importance computed elsewhere (the pooled flash
    kernel, `flash.mosaic_gpu_pooled`, which writes it with the compressed branch).

    imp: `[B, Hkv, T_p, Ns_p]` float32 (`T_p >= T`, `Ns_p` a power of two `>= Ns`; entries
    of non-candidate blocks, `j * l' > t`, may be anything); q_positions int `[B, T]`.
    On a GPU (or `interpret=True`) the `top_n` kernel (`triton.select_top_n`), else XLA
    `top_k` (`reference.top_blocks`). Returns `block_indices [B, T, Hkv, min(n, Ns)]`
    int32, `nsa_select`'s order. No gradient.
    """
    b, t = q_positions.shape
    if imp.ndim != 4 or imp.shape[0] != b or imp.shape[2] < t or imp.shape[3] < num_sel_blocks:
        raise ValueError(f"imp must be [{b}, Hkv, >= {t}, >= {num_sel_blocks}], got {list(imp.shape)}")
    pick = dict(sel_block=sel_block, num_selected=num_selected, num_initial=num_initial,
                num_local=num_local)
    imp = jax.lax.stop_gradient(imp)
    q_positions = jnp.asarray(q_positions, jnp.int32)
    if interpret is True or common.current_device().platform == "gpu":
        return triton.select_top_n(imp, q_positions, num_sel_blocks=num_sel_blocks, interpret=interpret,
                                   config=config, **pick)
    return reference.top_blocks(imp[:, :, :t, :num_sel_blocks], q_positions, **pick)
