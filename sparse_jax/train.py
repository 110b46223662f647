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


def train_step_fn(model, optimizer, tokens, targets, mask):
    """One AdamW step (not jitted: `train_step` and `make_sharded_train_step` wrap it)."""
    def loss_fn(model):
        logits, _ = model(tokens)
        return masked_cross_entropy(logits, targets, mask), logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, masked_accuracy(logits, targets, mask)


train_step = nnx.jit(train_step_fn)
train_step.__doc__ = "One AdamW step (`nnx.jit`); returns the loss and the accuracy on masked positions."


def make_sharded_train_step(model, optimizer, mesh, rules=None, donate: bool = False):
    """`train_step` jitted with in/out shardings on `mesh` (`jax.jit` over `nnx.split` state).

    Parameters and optimizer state follow the logical axis rules (`sparse_jax.sharding`),
    tokens/targets/mask `[B, T]` are sharded by `batch_sharding` (batch over data x fsdp,
    sequence over context). Returns `step(model, optimizer, tokens, targets, mask) -> (loss,
    accuracy)`, which updates `model` and `optimizer` in place like `train_step`; inputs are
    `device_put` to their shardings (a no-op when already there, e.g. after `shard_model`).
    `donate=True` donates the old state buffers (do not reuse arrays read from it before).
    The step is traced under `jax.set_mesh(mesh)`, so with `context` > 1 the attention
    layers run `sparse_jax.context_parallel` (explicit KV exchange per variant).
    """
    from sparse_jax import sharding as S
    rules = S.LOGICAL_AXIS_RULES if rules is None else rules
    graphdef, state = nnx.split((model, optimizer))
    state_sh = S.param_shardings(state, mesh, rules)
    batch_sh = S.batch_sharding(mesh)
    scalar_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def step(state, tokens, targets, mask):
        model, optimizer = nnx.merge(graphdef, state)
        loss, acc = train_step_fn(model, optimizer, tokens, targets, mask)
        return nnx.state((model, optimizer)), loss, acc

    jitted = jax.jit(step, in_shardings=(state_sh, batch_sh, batch_sh, batch_sh),
                     out_shardings=(state_sh, scalar_sh, scalar_sh),
                     donate_argnums=(0,) if donate else ())

    def run(model, optimizer, tokens, targets, mask):
        state = jax.device_put(nnx.state((model, optimizer)), state_sh)
        tokens, targets, mask = (jax.device_put(x, batch_sh) for x in (tokens, targets, mask))
        with jax.set_mesh(mesh):        # context > 1: attention exchanges KV via shard_map
            new_state, loss, acc = jitted(state, tokens, targets, mask)
        nnx.update((model, optimizer), new_state)
        return loss, acc

    run.jitted, run.state_shardings, run.batch_sharding = jitted, state_sh, batch_sh
    return run


def masked_accuracy(logits, targets, mask):
    hit = (logits.argmax(-1) == targets).astype(jnp.float32)
    return (hit * mask).sum() / jnp.maximum(mask.sum(), 1.0)


@nnx.jit
def eval_step(model, tokens, targets, mask):
    logits, _ = model(tokens)
    return masked_accuracy(logits, targets, mask)


def count_params(model) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
