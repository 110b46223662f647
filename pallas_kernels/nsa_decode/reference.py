"""XLA reference of `nsa_decode`: NSA's decode branches (arXiv 2502.11089) step by step.

Plain jnp through the kernel ops' own references, arrays in, arrays out; nothing here
knows of `sparse_jax` (`sparse_jax.ops.nsa.nsa_decode_branches` in "token" mode on
`impl="xla"` computes the same, and may call this). One decode step of `T` queries:

1. cmp: the `compressed` op's reference: attention over the compressed keys (key i
   visible iff its position, its block's last token, is `<=` the query's), and the
   probabilities summed over each GQA group `p_cmp [B, Hkv, T, N]`;
2. selection: `overlap_scores(p_cmp)` -> `top_blocks` (`nsa_select.reference`, the one
   home of that math): `block_indices [B, T, Hkv, min(n, Ns)]`;
3. slc: per query, one selected-block `decode` over the position-indexed raw keys;
4. win: one `decode` over the window cache, keys `t - window < s <= t`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels.compressed import compressed_attention
from pallas_kernels.decode import decode_attention
from pallas_kernels.nsa_select.reference import overlap_scores, top_blocks


@dataclasses.dataclass(frozen=True)
class RecentWindow:
    """Decode predicate of the win branch: key s visible to query t iff `t - window < s`
    (`decode` adds `s <= t` and valid positions). Hashable, so `decode` can specialise."""

    window: int

    def __call__(self, q_pos, kv_pos, q_seg=None, kv_seg=None):
        del q_seg, kv_seg
        return q_pos - kv_pos < self.window


def selected_block_list(block_indices):
    """One query's selection `[B, Hkv, n]` (valid entries first, -1 after: `top_blocks`'
    order) -> the `decode` op's selected-block form `(indices [B, Hkv, n], counts [B, Hkv])`."""
    counts = (block_indices >= 0).sum(-1).astype(jnp.int32)
    return jnp.maximum(block_indices, 0), counts


def nsa_decode_reference(q, q_positions, *, k_cmp, v_cmp, cmp_positions, k_slc, v_slc, slc_positions,
                         k_win, v_win, win_positions, cfg):
    """NSA's three branches and token-mode selection for `q [B, T, H, D]` at `q_positions [B, T]`.

    Keys as `nsa_decode` takes them (`[B, N|S|W, Hkv, D]` with int positions `[B, N|S|W]`);
    `cfg`: any object with NSA's hyperparameters as attributes (`cmp_block`, `cmp_stride`,
    `sel_block`, `num_selected`, `num_initial`, `num_local`, `window`), e.g.
    `sparse_jax.ops.nsa.NSAConfig`. Softmax scale `1/sqrt(D)`.
    Returns `(o_cmp, o_slc, o_win [B, T, H, D], block_indices [B, T, Hkv, min(n, Ns)])`,
    `Ns = ceil(S / l')`.
    """
    o_cmp, p_cmp = compressed_attention(q, k_cmp, v_cmp, q_positions=q_positions,
                                        kv_positions=cmp_positions, impl="xla")
    ns = -(-k_slc.shape[1] // cfg.sel_block)
    scores = overlap_scores(p_cmp, ns, cmp_block=cfg.cmp_block, cmp_stride=cfg.cmp_stride,
                            sel_block=cfg.sel_block)
    block_indices = top_blocks(scores, q_positions, sel_block=cfg.sel_block,
                               num_selected=cfg.num_selected, num_initial=cfg.num_initial,
                               num_local=cfg.num_local)
    o_slc = []
    for i in range(q.shape[1]):
        idx, counts = selected_block_list(block_indices[:, i])
        o_slc.append(decode_attention(q[:, i:i + 1], k_slc, v_slc, kv_positions=slc_positions,
                                      q_positions=q_positions[:, i:i + 1], block_indices=idx,
                                      block_counts=counts, block_size=cfg.sel_block, impl="xla"))
    o_win = decode_attention(q, k_win, v_win, kv_positions=win_positions, q_positions=q_positions,
                             mask_fn=RecentWindow(cfg.window), impl="xla")
    return o_cmp, jnp.concatenate(o_slc, axis=1), o_win, block_indices


# Backend declaration for `pallas_kernels.common.resolve`: the XLA reference runs every call
# the api accepts, on any platform, and takes no tile config.
CONFIG = None
