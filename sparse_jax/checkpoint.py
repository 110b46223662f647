"""Training checkpoints over `orbax.checkpoint.CheckpointManager` that survive a killed process.

A checkpoint at step `s` (the number of optimizer updates done) holds three orbax items:

* `model`: the NNX state of the model (`nnx.state(model)`: parameters, and PRNG keys if the
  model holds any, stored as their raw key data),
* `optimizer`: the NNX state of the `nnx.Optimizer` (its step counter and the optax state),
* `meta` (JSON): the step, the data-iterator position (the step: the training stream is
  `sparse_jax.data.step_rng(seed, step)`, a pure function of the step), caller extras, and
  a CRC32 of every array item, written from the same host copies orbax saves.

Saves are asynchronous (training continues while orbax writes), every `save_every` steps,
keeping the newest `keep`. orbax writes a step into a temporary directory and renames it,
with `commit_success.txt` inside, only once complete; a process killed mid-save leaves only
the temporary directory. `Checkpointer.restore_latest` walks the steps newest first and
skips (logging the step and the reason) any step that is unfinished, lacks the commit
marker, fails to restore (truncated or deleted files) or fails its checksum; a skipped step
is renamed to `<step>.bad-<n>` so that a resumed run can save that step again. Nothing is
written into the model or optimizer until a step has passed every check.

    ckpt = Checkpointer(workdir / "checkpoints", CheckpointConfig(save_every=100, keep=3))
    restored = ckpt.restore_latest(model, optimizer)          # start = restored.step or 0
    for step in range(start + 1, total + 1):
        ...train_step(model, optimizer, *task.batch(step_rng(seed, step), batch))...
        ckpt.save(step, model, optimizer, force=step == total)
    ckpt.close()                                              # waits for the last save
"""

from __future__ import annotations

import dataclasses
import os
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

COMMIT_MARKER = "commit_success.txt"     # orbax's finalize marker (atomicity.COMMIT_SUCCESS_FILE)
TMP_MARKER = ".orbax-checkpoint-tmp"     # orbax's unfinished-save directory suffix


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """save_every: steps between saves; keep: newest checkpoints kept (orbax `max_to_keep`);
    async_save: write in a background thread while training continues."""

    save_every: int = 100
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        if self.save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {self.save_every}")
        if self.keep < 1:
            raise ValueError(f"keep must be >= 1, got {self.keep}")


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `restore_latest` found. step: the restored step, or None (nothing usable: start
    from scratch); meta: the step's JSON item; skipped: `(step, reason)` of the newer steps
    that were skipped."""

    step: int | None
    meta: dict
    skipped: tuple[tuple[int, str], ...]


def _savable(tree):
    """Typed PRNG key arrays -> their uint32 key data (orbax stores plain arrays only)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _checksum(tree) -> int | None:
    """CRC32 over the bytes of every leaf, in tree order; None when some leaf is not fully
    addressable from this process (multi-host arrays: orbax's own checks only)."""
    crc = 0
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return None
        crc = zlib.crc32(np.ascontiguousarray(np.asarray(leaf)).tobytes(), crc)
    return crc


class Checkpointer:
    """Saves and restores (model, optimizer, step, data position) under `directory`.

    directory: a folder of its own (created if missing; unfinished saves found there are
    reported and removed). read_only: only restore, and change nothing on disk (no cleanup,
    bad steps are skipped but not set aside): for readers such as an evaluation next to a
    run that is still training. Use as a context manager or call `close()` at the end.
    Single-host: every process would rename and remove files.
    """

    def __init__(self, directory: str | os.PathLike, config: CheckpointConfig = CheckpointConfig(),
                 *, read_only: bool = False):
        if not isinstance(config, CheckpointConfig):
            raise ValueError(f"config must be a CheckpointConfig, got {config!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.config, self.read_only = config, read_only
        if read_only and not os.path.isdir(self.directory):
            raise ValueError(f"directory {self.directory} does not exist (read_only=True)")
        os.makedirs(self.directory, exist_ok=True)
        for name in [] if read_only else sorted(os.listdir(self.directory)):
            if TMP_MARKER in name:
                logging.warning("checkpoint step %s in %s skipped: unfinished save (temporary "
                                "directory %s, the process stopped while writing it); removing it",
                                name.split(".")[0], self.directory, name)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=config.save_every, max_to_keep=config.keep, read_only=read_only,
            enable_async_checkpointing=config.async_save, cleanup_tmp_directories=not read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    # -- saving -------------------------------------------------------------------------------

    def save(self, step: int, model, optimizer=None, *, extra: dict | None = None,
             force: bool = False) -> bool:
        """Starts saving the state after `step` updates when `step` is a multiple of
        `save_every` (or `force`); returns whether a save started. extra: JSON-able values
        stored in the meta item. optimizer None saves the model only. The arrays are copied
        to the host before this returns (orbax's copy, and the CRC32 of the meta item)."""
        if self.read_only:
            raise ValueError(f"save: {self.directory} was opened read_only")
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if not (force or step % self.config.save_every == 0):
            return False
        items = {"model": _savable(nnx.to_pure_dict(nnx.state(model)))}
        if optimizer is not None:
            items["optimizer"] = _savable(nnx.to_pure_dict(nnx.state(optimizer)))
        meta = {"step": int(step), "data_position": int(step), "extra": dict(extra or {}),
                "crc32": {name: _checksum(tree) for name, tree in items.items()}}
        args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        return self.manager.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **args),
                                 force=True)

    def wait(self):
        """Blocks until the in-flight asynchronous save, if any, is on disk."""
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    # -- restoring ----------------------------------------------------------------------------

    def restore_latest(self, model, optimizer=None) -> Restored:
        """Loads the newest good checkpoint into `model` (and `optimizer`, if given) in place.

        Steps are tried newest first; a step is skipped, with a warning naming it and the
        reason, when it lacks orbax's commit marker, fails to restore or fails its checksum.
        Returns `Restored(step=None, ...)` when no step is usable (model/optimizer untouched).
        """
        self.manager.reload()
        skipped = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta, states = self._restore_step(step, model, optimizer)
            except _BadCheckpoint as bad:
                reason = str(bad)
            except Exception as e:  # orbax / tensorstore raise many types for damaged files
                reason = f"restore failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            else:
                for target, state in states:
                    nnx.update(target, state)
                if skipped:
                    logging.warning("resuming from checkpoint step %d in %s", step, self.directory)
                return Restored(step, meta, tuple(skipped))
            logging.warning("checkpoint step %d in %s skipped: %s", step, self.directory, reason)
            skipped.append((step, reason))
            if not self.read_only:
                self._set_aside(step)
        return Restored(None, {}, tuple(skipped))

    def _restore_step(self, step, model, optimizer):
        step_dir = os.path.join(self.directory, str(step))
        if not os.path.exists(os.path.join(step_dir, COMMIT_MARKER)):
            raise _BadCheckpoint(f"no commit marker {COMMIT_MARKER} (the save never finished)")
        targets = {"model": model} if optimizer is None else {"model": model, "optimizer": optimizer}
        states = {name: nnx.state(t) for name, t in targets.items()}
        abstract = {name: jax.tree.map(ocp.utils.to_shape_dtype_struct, _savable(nnx.to_pure_dict(s)))
                    for name, s in states.items()}
        args = {name: ocp.args.StandardRestore(a) for name, a in abstract.items()}
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **args))
        meta = dict(restored["meta"])
        if meta.get("step") != step:
            raise _BadCheckpoint(f"meta item names step {meta.get('step')!r}, not {step}")
        for name in states:
            expected, got = meta.get("crc32", {}).get(name), _checksum(restored[name])
            if expected is not None and got is not None and expected != got:
                raise _BadCheckpoint(f"checksum mismatch in item {name!r} (stored {expected}, read {got})")
        out = []
        for name, state in states.items():
            tree, pure = restored[name], nnx.to_pure_dict(state)
            tree = jax.tree.map(lambda old, new: jax.random.wrap_key_data(
                new, impl=jax.random.key_impl(old)) if _is_key(old) else new, pure, tree)
            nnx.replace_by_pure_dict(state, tree)
            out.append((targets[name], state))
        return meta, out

    def _set_aside(self, step: int):
        """Renames a bad step directory to `<step>.bad-<n>` (kept for inspection, invisible
        to orbax) so the step can be saved again."""
        src = os.path.join(self.directory, str(step))
        if os.path.exists(src):
            n = 0
            while os.path.exists(f"{src}.bad-{n}"):
                n += 1
            os.rename(src, f"{src}.bad-{n}")
        self.manager.reload()


class _BadCheckpoint(Exception):
    """A step that restored but must not be used (its reason is the message)."""
