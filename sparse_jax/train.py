"""Optax training step for `SparseLM` (NNX: `nnx.Optimizer` + `nnx.jit`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def masked_cross_entropy(logits, targets, mask):
    """Mean token cross-entropy over `mask`; logits `[B, T, V]`, targets/mask `[B, T]`."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def make_optimizer(model, learning_rate: float = 3e-3, warmup: int = 50, total_steps: int = 1000,
                   weight_decay: float = 0.01, clip: float = 1.0) -> nnx.Optimizer:
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(total_steps, warmup + 1))
    tx = optax.chain(optax.clip_by_global_norm(clip), optax.adamw(schedule, weight_decay=weight_decay))
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def train_step(model, optimizer, tokens, targets, mask):
    """One AdamW step; returns the loss and the accuracy on masked positions."""
    def loss_fn(model):
        logits, _ = model(tokens)
        return masked_cross_entropy(logits, targets, mask), logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, masked_accuracy(logits, targets, mask)


def masked_accuracy(logits, targets, mask):
    hit = (logits.argmax(-1) == targets).astype(jnp.float32)
    return (hit * mask).sum() / jnp.maximum(mask.sum(), 1.0)


@nnx.jit
def eval_step(model, tokens, targets, mask):
    logits, _ = model(tokens)
    return masked_accuracy(logits, targets, mask)


def count_params(model) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
