"""Write `tests/golden/kvpress/scores.npz`, kvpress's SnapKV and ObservedAttention scores
that `tests/test_kv_policies.py` compares the policies with.

From fixed random `q [B, T, H, D]` (RoPE already applied, as the policies see it) and
`k [B, T, Hkv, D]` it computes the causal attention probabilities in PyTorch (eager,
float32, GQA by `repeat_kv`) and hands them to the presses' `score` as `attentions` (the
path kvpress takes with eager attention), so the scoring code is kvpress's own:

* `snapkv [B, Hkv, T]`: `SnapKVPress(window_size=WINDOW, kernel_size=KERNEL).score`
  (window queries' mean attention to the keys before the window, avg-pooled, averaged over
  each GQA group; the window's slots get `max + 1`),
* `snapkv_kept [B, Hkv, BUDGET]`: the slots kvpress keeps at that budget (top-k of them),
* `observed [B, Hkv, T]`: `ObservedAttentionPress().score` (each key's attention summed
  over the queries, divided by the number of queries that see it, averaged over groups).

Rerun (needs torch + kvpress, which sparse_jax itself does not; Python 3.11 here):

    python3.11 -m venv /tmp/kvp311
    /tmp/kvp311/bin/pip install torch==2.13.0 kvpress
    cd <repo root> && /tmp/kvp311/bin/python tests/golden/make_kvpress_golden.py

Written with kvpress 0.5.5 and torch 2.13.0+cpu (versions are stored in the npz).
"""

import math
import pathlib
import types

import numpy as np
import torch
from importlib.metadata import version
from kvpress import ObservedAttentionPress, SnapKVPress

B, T, H, HKV, D = 2, 20, 4, 2, 8
WINDOW, KERNEL, BUDGET = 4, 5, 9


def main():
    rng = np.random.default_rng(0)
    q = (rng.standard_normal((B, T, H, D)) * 1.5).astype(np.float32)
    k = (rng.standard_normal((B, T, HKV, D)) * 1.5).astype(np.float32)
    qt = torch.from_numpy(q).transpose(1, 2)                                    # [B, H, T, D]
    kt = torch.from_numpy(k).transpose(1, 2).repeat_interleave(H // HKV, dim=1)  # repeat_kv
    logits = qt @ kt.transpose(2, 3) / math.sqrt(D)
    logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    attentions = torch.softmax(logits, dim=-1, dtype=torch.float32)            # [B, H, T, T]

    module = types.SimpleNamespace(config=types.SimpleNamespace(num_attention_heads=H))
    keys = torch.from_numpy(k).transpose(1, 2)                                  # [B, Hkv, T, D]
    hidden = torch.zeros(B, T, 1)
    snap = SnapKVPress(window_size=WINDOW, kernel_size=KERNEL).score(module, hidden, keys, keys, attentions, {})
    observed = ObservedAttentionPress().score(module, hidden, keys, keys, attentions, {})
    kept = snap.topk(BUDGET, dim=-1).indices.sort(dim=-1).values

    out = pathlib.Path(__file__).parent / "kvpress" / "scores.npz"
    out.parent.mkdir(exist_ok=True)
    np.savez(out, q=q, k=k, snapkv=snap.numpy(), snapkv_kept=kept.numpy().astype(np.int32),
             observed=observed.numpy(), window=WINDOW, kernel=KERNEL, budget=BUDGET,
             versions=f"kvpress {version('kvpress')}, torch {torch.__version__}")
    print("wrote", out)


if __name__ == "__main__":
    main()
