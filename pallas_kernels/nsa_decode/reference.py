"""XLA reference of `nsa_decode`: NSA's decode branches (arXiv 2502.11089) step by step.

Exactly `sparse_jax.ops.nsa.nsa_decode_branches` in "token" mode on `impl="xla"`: the
`compressed` op's reference (output + group-summed probabilities), `selection_scores`,
`select_blocks`, then one selected-block `decode` per query and the windowed `decode`.
It calls those pieces rather than `nsa_decode_branches` itself, so that the latter can
dispatch to `nsa_decode` without a cycle; the imports from `sparse_jax.ops.nsa` happen at
call time for the same reason (that module imports this op).
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.decode import decode_attention


def nsa_decode_reference(q, q_positions, *, k_cmp, v_cmp, cmp_positions, k_slc, v_slc, slc_positions,
                         k_win, v_win, win_positions, cfg):
    """`(o_cmp, o_slc, o_win [B, T, H, D], block_indices [B, T, Hkv, min(n, Ns)])`."""
    from sparse_jax import patterns as P
    from sparse_jax.ops import nsa as ops
    from sparse_jax.ops.selection import block_lists

    o_cmp, p_cmp = ops.compressed_branch(q, k_cmp, v_cmp, q_positions, cmp_positions, impl="xla")
    ns = -(-k_slc.shape[1] // cfg.sel_block)
    block_indices = ops.select_blocks(ops.selection_scores(p_cmp, ns, cfg), q_positions, cfg)
    o_slc = []
    for i in range(q.shape[1]):
        idx, counts = block_lists(block_indices[:, i:i + 1], ns)
        o_slc.append(decode_attention(q[:, i:i + 1], k_slc, v_slc, kv_positions=slc_positions,
                                      q_positions=q_positions[:, i:i + 1], block_indices=idx,
                                      block_counts=counts, block_size=cfg.sel_block, impl="xla"))
    o_win = decode_attention(q, k_win, v_win, kv_positions=win_positions, q_positions=q_positions,
                             mask_fn=P.causal_window(cfg.window), impl="xla")
    return o_cmp, jnp.concatenate(o_slc, axis=1), o_win, block_indices


# Backend declaration for `pallas_kernels.common.resolve`: the XLA reference runs every call
# the api accepts, on any platform, and takes no tile config.
CONFIG = None
