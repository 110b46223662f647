"""Synthetic long-context retrieval tasks, generated in-process and seeded (nothing downloaded).

`needle_batch`: a haystack of noise tokens hides one key-value needle `KEY v`; the
sequence ends with `KEY` and the model must emit `v`. Finding the needle needs attention
that reaches back `distance` tokens: a sliding window shorter than that cannot do it,
whatever the training (the point of Mistral-style hybrids keeping some global layers).

Vocabulary: 0 = padding, 1 = KEY, 2 .. 2+num_values-1 = values, the rest noise.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class NeedleTask:
    seq_len: int = 128
    num_values: int = 16
    num_noise: int = 48

    def __post_init__(self):
        if self.seq_len < 4:
            raise ValueError(f"seq_len must be >= 4, got {self.seq_len}")
        if self.num_values < 2 or self.num_noise < 1:
            raise ValueError("num_values must be >= 2 and num_noise >= 1")

    @property
    def vocab_size(self) -> int:
        return 2 + self.num_values + self.num_noise

    KEY = 1

    def batch(self, rng: np.random.Generator, batch: int, min_distance: int = 2,
              max_distance: int | None = None):
        """tokens `[B, T]` int32, targets `[B, T]` int32, loss mask `[B, T]` float32, distances `[B]`.

        The needle `KEY v` sits so that the final `KEY` (position T-1) is `distance` tokens
        after the value `v`; the loss is on the last position only.
        """
        t = self.seq_len
        max_distance = t - 2 if max_distance is None else max_distance
        if not 2 <= min_distance <= max_distance <= t - 2:
            raise ValueError(f"need 2 <= min_distance <= max_distance <= seq_len-2={t - 2}, got "
                             f"{min_distance}, {max_distance}")
        tokens = rng.integers(2 + self.num_values, self.vocab_size, size=(batch, t))
        distance = rng.integers(min_distance, max_distance + 1, size=batch)
        values = rng.integers(2, 2 + self.num_values, size=batch)
        rows = np.arange(batch)
        value_pos = t - 1 - distance
        tokens[rows, value_pos - 1] = self.KEY
        tokens[rows, value_pos] = values
        tokens[:, t - 1] = self.KEY
        targets = np.zeros_like(tokens)
        targets[:, t - 1] = values
        mask = np.zeros((batch, t), np.float32)
        mask[:, t - 1] = 1.0
        return tokens.astype(np.int32), targets.astype(np.int32), mask, distance


def step_rng(seed: int, step: int) -> np.random.Generator:
    """The generator that draws training step `step`'s batch: a pure function of (seed, step).

    A data stream built this way has no iterator state beyond the step, so a run resumed
    from a checkpoint at step `s` draws exactly the batches an uninterrupted run draws.
    """
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be >= 0, got {seed}, {step}")
    return np.random.default_rng((seed, step))
