"""Shared by the tests of the training-free cache policies: a small `SparseLM` whose layers
use learned sinks and a soft-cap, a ragged prompt + decode batch, and the prompt-then-decode
loop through a model's caches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_jax.models.lm import LMConfig, SparseLM


def policy_model():
    """'FWF' LM (vocab 32, d_model 32, 4 heads / 2 kv heads, window 4, soft-cap 30) with
    non-zero learned sinks, so the sink path is exercised."""
    cfg = LMConfig(vocab_size=32, layer_spec="FWF", d_model=32, num_heads=4, num_kv_heads=2, window=4,
                   softcap=30.0, learned_sinks=True)
    m = SparseLM(cfg, rngs=nnx.Rngs(0))
    for block in m.blocks:
        block.attn.sink_logits[...] = jnp.linspace(-1.0, 1.0, 4)
    return m


def ragged_batch(prompt_len: int, new: int, lengths):
    """Tokens `[B, prompt_len + new]` (key 1) and positions: row r's prompt is its first
    `lengths[r]` tokens (the rest of the prompt is padding, -1), its `new` decode tokens
    continue at position `lengths[r]`."""
    b = len(lengths)
    tokens = jax.random.randint(jax.random.key(1), (b, prompt_len + new), 0, 32)
    positions = np.full((b, prompt_len + new), -1, np.int32)
    for row, n in enumerate(lengths):
        positions[row, :n] = np.arange(n)
        positions[row, prompt_len:] = n + np.arange(new)
    return tokens, jnp.asarray(positions)


def generate(forward, model, caches, tokens, positions, prompt_len: int):
    """`forward(model, tokens, positions, caches)` on the prompt, then one call per decode
    token -> `(logits [B, T, V]` of every call concatenated, the last caches)."""
    logits, caches = forward(model, tokens[:, :prompt_len], positions[:, :prompt_len], caches)
    outs = [logits]
    for i in range(prompt_len, tokens.shape[1]):
        logits, caches = forward(model, tokens[:, i:i + 1], positions[:, i:i + 1], caches)
        outs.append(logits)
    return jnp.concatenate(outs, axis=1), caches
