"""Optax training step for `SparseLM` (NNX: `nnx.Optimizer` + `nnx.jit`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sparse_jax.layers.dsa import total_indexer_loss


def masked_cross_entropy(logits, targets, mask):
    """Mean token cross-entropy over `mask`; logits `[B, T, V]`, targets/mask `[B, T]`."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def make_optimizer(model, learning_rate: float = 3e-3, warmup: int = 50, total_steps: int = 1000,
                   weight_decay: float = 0.01, clip: float = 1.0) -> nnx.Optimizer:
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(total_steps, warmup + 1))
    tx = optax.chain(optax.clip_by_global_norm(clip), optax.adamw(schedule, weight_decay=weight_decay))
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


class StepMetrics(tuple):
    """`(loss, accuracy)` of a train step (unpacks as before), plus `.indexer_loss`.

    `loss` is the LM cross-entropy (comparable across models); `indexer_loss` the sum of
    the auxiliary `indexer_loss` values sown by DSA layers (0.0 for models without any).
    """

    def __new__(cls, loss, accuracy, indexer_loss):
        self = super().__new__(cls, (loss, accuracy))
        self.loss, self.accuracy, self.indexer_loss = loss, accuracy, indexer_loss
        return self


def model_losses(model, tokens, targets, mask):
    """Forward under `nnx.capture` -> (LM cross-entropy, summed sown `indexer_loss`, logits).

    DSA layers with `DSAConfig.indexer_loss` sow their indexer KL (its gradient reaches only
    the indexer, whose input is detached); other models give an indexer loss of 0.0.
    """
    (logits, _), intermediates = nnx.capture(lambda m: m(tokens), nnx.Intermediate)(model)
    return masked_cross_entropy(logits, targets, mask), total_indexer_loss(intermediates), logits


def train_step_fn(model, optimizer, tokens, targets, mask, indexer_loss_weight=1.0):
    """One AdamW step on `LM + indexer_loss_weight * indexer KL` w.r.t. `optimizer.wrt` (not
    jitted: `train_step` and `make_sharded_train_step` wrap it). Returns (LM loss, accuracy,
    indexer loss). Weight 1.0 as DeepSeek-V3.2 (the KL only trains the detached indexer, so
    the weight acts as the indexer's learning-rate factor); stages live in `DSAConfig.stage`
    and in the optimizer's `wrt` (e.g. `layers.dsa.indexer_filter()` for the warm-up).
    """
    def loss_fn(model):
        lm, aux, logits = model_losses(model, tokens, targets, mask)
        return lm + indexer_loss_weight * aux, (lm, aux, logits)

    grads, (lm, aux, logits) = nnx.grad(loss_fn, argnums=nnx.DiffState(0, optimizer.wrt), has_aux=True)(model)
    optimizer.update(model, grads)
    return lm, masked_accuracy(logits, targets, mask), aux


_train_step_jit = nnx.jit(train_step_fn)


def train_step(model, optimizer, tokens, targets, mask, indexer_loss_weight: float = 1.0) -> StepMetrics:
    """One AdamW step (`nnx.jit` of `train_step_fn`); returns `StepMetrics`: unpacks as
    (LM loss, accuracy on masked positions), `.indexer_loss` the DSA indexer KL (0.0 without)."""
    return StepMetrics(*_train_step_jit(model, optimizer, tokens, targets, mask, indexer_loss_weight))


def make_sharded_train_step(model, optimizer, mesh, rules=None, donate: bool = False):
    """`train_step` jitted with in/out shardings on `mesh` (`jax.jit` over `nnx.split` state).

    Parameters and optimizer state follow the logical axis rules (`sparse_jax.sharding`),
    tokens/targets/mask `[B, T]` are sharded by `batch_sharding` (batch over data x fsdp,
    sequence over context). Returns `step(model, optimizer, tokens, targets, mask) -> StepMetrics` ((loss,
    accuracy), `.indexer_loss`), which updates `model` and `optimizer` in place like `train_step`; inputs are
    `device_put` to their shardings (a no-op when already there, e.g. after `shard_model`).
    `donate=True` donates the old state buffers (do not reuse arrays read from it before).
    The step is traced under `jax.set_mesh(mesh)` and `rules`, so with a sequence axis > 1
    the attention ops run `sparse_jax.context_parallel` (explicit KV exchange per variant).
    """
    from sparse_jax import sharding as S
    rules = S.LOGICAL_AXIS_RULES if rules is None else rules
    graphdef, state = nnx.split((model, optimizer))
    state_sh = S.param_shardings(state, mesh, rules)
    batch_sh = S.batch_sharding(mesh, rules=rules)
    scalar_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def step(state, tokens, targets, mask, indexer_loss_weight):
        model, optimizer = nnx.merge(graphdef, state)
        metrics = train_step_fn(model, optimizer, tokens, targets, mask, indexer_loss_weight)
        return (nnx.state((model, optimizer)),) + metrics

    jitted = jax.jit(step, in_shardings=(state_sh, batch_sh, batch_sh, batch_sh, scalar_sh),
                     out_shardings=(state_sh, scalar_sh, scalar_sh, scalar_sh),
                     donate_argnums=(0,) if donate else ())

    def run(model, optimizer, tokens, targets, mask, indexer_loss_weight: float = 1.0):
        state = jax.device_put(nnx.state((model, optimizer)), state_sh)
        tokens, targets, mask = (jax.device_put(x, batch_sh) for x in (tokens, targets, mask))
        weight = jnp.asarray(indexer_loss_weight, jnp.float32)
        with jax.set_mesh(mesh), S.use_axis_rules(rules):   # context > 1: attention exchanges KV via shard_map
            new_state, loss, acc, aux = jitted(state, tokens, targets, mask, weight)
        nnx.update((model, optimizer), new_state)
        return StepMetrics(loss, acc, aux)

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
