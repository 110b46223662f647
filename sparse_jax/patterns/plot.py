"""Pictures of attention patterns (matplotlib PNG) for notebooks and docs."""

from __future__ import annotations

import numpy as np

from sparse_jax.patterns.masks import Pattern, mask_array
from sparse_jax.patterns.metadata import static_block_metadata


def plot_pattern(pattern: Pattern, seq_len: int, block_size: int | None = None,
                 path: str | None = None, title: str | None = None, ax=None):
    """Draw the `[seq_len, seq_len]` mask; with `block_size`, shade full/partial blocks.

    Returns the matplotlib Figure (saved as PNG when `path` is given). Rows are queries,
    columns keys. Dark cells are visible; with blocks, full blocks are tinted green and
    partial blocks orange.
    """
    import matplotlib
    if ax is None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    mask = mask_array(pattern, seq_len)
    if ax is None:
        fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    else:
        fig = ax.figure
    image = np.ones((seq_len, seq_len, 3))
    if block_size is not None:
        meta = static_block_metadata(pattern, seq_len, seq_len, block_size, block_size)
        idx, cnt, full = (np.asarray(a)[0, 0] for a in
                          (meta.kv_block_indices, meta.kv_block_counts, meta.kv_block_full))
        for qb in range(idx.shape[0]):
            for slot in range(cnt[qb]):
                kb = idx[qb, slot]
                tint = (0.80, 0.95, 0.80) if full[qb, slot] else (1.0, 0.88, 0.70)
                image[qb * block_size:(qb + 1) * block_size, kb * block_size:(kb + 1) * block_size] = tint
    image[mask] = (0.15, 0.25, 0.55)
    ax.imshow(image, interpolation="nearest")
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    ax.set_title(title or type(pattern).__name__, fontsize=9)
    if path is not None:
        fig.savefig(path, bbox_inches="tight")
    return fig
