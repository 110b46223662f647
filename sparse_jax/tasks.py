"""RULER-style synthetic long-context tasks (arXiv 2404.06654), generated in-process and seeded.

Six tasks share one vocabulary (`Vocab`), so one model trains on their mix:

* `single_needle`: one fact `k = v` in a haystack of noise words; asked `k`, answer `v`.
* `multikey_needle`: several facts with distinct keys (the others are distractors); asked
  one key, answer its value.
* `multivalue`: one key bound to several distinct values (plus distractor facts of other
  keys); answer all its values, in order of appearance.
* `multiquery`: several facts; asked several keys, answer their values in the order asked.
* `variable_tracking`: chains of assignments `x1 = v ; x2 = x1 ; x3 = x2` (several chains,
  interleaved); asked the value `v`, answer the names of its chain in chain order
  (`x1 x2 x3`): every name that holds `v`.
* `common_words`: the context is a list of words; `num_common` words each occur more often
  than any other word; answer them in order of first appearance.

Sequence layout (length `seq_len`, answers at the end, teacher-forced):

    context[n] | QUERY q_1 .. q_Q ANS a_1 .. a_{m-1}

`targets` hold `a_1 .. a_m` at the positions of `ANS, a_1 .. a_{m-1}` (next-token
prediction of the answer), `loss_mask` is 1 exactly there. A sequence counts as solved when
all its `m` answer positions are predicted correctly (`exact_match`).

`min_distance`: every fact (or, for `common_words`, every occurrence of a common word) the
answer needs ends at least `min_distance` tokens before the `ANS` token, so a model whose
receptive field is shorter cannot solve it. Distractor facts sit in the same region.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Token ids: 0 PAD, 1 QUERY, 2 ANS, 3 EQ (the `=` of a fact), 4 SEP (unused filler id),
    then `num_keys` keys (also the variable names), `num_values` values, `num_words` words
    (the haystack and the `common_words` lists)."""

    num_keys: int = 32
    num_values: int = 32
    num_words: int = 64

    PAD = 0
    QUERY = 1
    ANS = 2
    EQ = 3
    SEP = 4
    NUM_SPECIAL = 5

    def __post_init__(self):
        for name in ("num_keys", "num_values", "num_words"):
            if getattr(self, name) < 8:
                raise ValueError(f"{name} must be >= 8, got {getattr(self, name)}")

    @property
    def size(self) -> int:
        return self.NUM_SPECIAL + self.num_keys + self.num_values + self.num_words

    @property
    def keys(self) -> np.ndarray:
        return self.NUM_SPECIAL + np.arange(self.num_keys)

    @property
    def values(self) -> np.ndarray:
        return self.NUM_SPECIAL + self.num_keys + np.arange(self.num_values)

    @property
    def words(self) -> np.ndarray:
        return self.NUM_SPECIAL + self.num_keys + self.num_values + np.arange(self.num_words)


def _fact_starts(rng: np.random.Generator, limit: int, count: int) -> np.ndarray:
    """Sorted starts of `count` non-overlapping 3-token facts inside `[0, limit)`, uniform."""
    if 3 * count > limit:
        raise ValueError(f"{count} facts of 3 tokens do not fit in {limit} context tokens; "
                         "use a longer seq_len or a smaller min_distance")
    s = np.sort(rng.choice(limit - 2 * count, size=count, replace=False))
    return s + 2 * np.arange(count)


@dataclasses.dataclass(frozen=True)
class _Task:
    """Shared layout; subclasses define `num_queries`, `answer_len` and `_row`."""

    vocab: Vocab = Vocab()

    @property
    def vocab_size(self) -> int:
        return self.vocab.size

    @property
    def num_queries(self) -> int:
        return 1

    @property
    def answer_len(self) -> int:
        return 1

    @property
    def suffix_len(self) -> int:
        """Tokens after the context: QUERY, the queries, ANS and the answer but its last token."""
        return 1 + self.num_queries + self.answer_len

    def context_len(self, seq_len: int) -> int:
        return seq_len - self.suffix_len

    def fact_limit(self, seq_len: int, min_distance: int) -> int:
        """Facts the answer needs lie in context positions `[0, fact_limit)`: their last
        token is then at least `min_distance` before the ANS token."""
        n = self.context_len(seq_len)
        ans_pos = n + 1 + self.num_queries
        return min(n, ans_pos - min_distance + 1)

    def _haystack(self, rng, n):
        return rng.choice(self.vocab.words, size=n)

    def _place_needles(self, rng, seq_len, min_distance, count):
        """A haystack context `[n]` holding `count` facts `k EQ v` of distinct keys, all in
        `[0, fact_limit)`; returns `(context, keys [count], values [count])`: the i-th fact in
        the context is `keys[i] EQ values[i]`."""
        context = self._haystack(rng, self.context_len(seq_len))
        keys = rng.choice(self.vocab.keys, size=count, replace=False)
        values = rng.choice(self.vocab.values, size=count)
        starts = _fact_starts(rng, self.fact_limit(seq_len, min_distance), count)
        _place_facts(context, starts, zip(keys, values))
        return context, keys, values

    def _row(self, rng, seq_len, min_distance):
        raise NotImplementedError

    def batch(self, rng: np.random.Generator, batch: int, seq_len: int, min_distance: int = 0):
        """tokens `[B, T]` int32, targets `[B, T]` int32, loss_mask `[B, T]` float32.

        `min_distance`: facts the answer needs end >= this many tokens before ANS."""
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if min_distance < 0:
            raise ValueError(f"min_distance must be >= 0, got {min_distance}")
        if self.context_len(seq_len) < 8:
            raise ValueError(f"seq_len={seq_len} too short: the query and answer take "
                             f"{self.suffix_len} tokens, the context needs >= 8")
        tokens = np.zeros((batch, seq_len), np.int32)
        targets = np.zeros((batch, seq_len), np.int32)
        mask = np.zeros((batch, seq_len), np.float32)
        n, m = self.context_len(seq_len), self.answer_len
        ans_pos = n + 1 + self.num_queries
        for b in range(batch):
            context, queries, answer = self._row(rng, seq_len, min_distance)
            assert len(context) == n and len(queries) == self.num_queries and len(answer) == m
            tokens[b] = np.concatenate([context, [Vocab.QUERY], queries, [Vocab.ANS], answer[:-1]])
            targets[b, ans_pos:] = answer
            mask[b, ans_pos:] = 1.0
        return tokens, targets, mask


def _place_facts(context, starts, facts):
    """Write `lhs EQ rhs` at each start."""
    for s, (lhs, rhs) in zip(starts, facts):
        context[s:s + 3] = (lhs, Vocab.EQ, rhs)


@dataclasses.dataclass(frozen=True)
class SingleNeedle(_Task):
    def _row(self, rng, seq_len, min_distance):
        n = self.context_len(seq_len)
        context = self._haystack(rng, n)
        key, value = rng.choice(self.vocab.keys), rng.choice(self.vocab.values)
        _place_facts(context, _fact_starts(rng, self.fact_limit(seq_len, min_distance), 1),
                     [(key, value)])
        return context, [key], [value]


@dataclasses.dataclass(frozen=True)
class MultiKeyNeedle(_Task):
    """`num_needles` facts with distinct keys; one of them is asked."""

    num_needles: int = 4

    def __post_init__(self):
        if not 2 <= self.num_needles <= self.vocab.num_keys:
            raise ValueError(f"num_needles must be in [2, num_keys], got {self.num_needles}")

    def _row(self, rng, seq_len, min_distance):
        context, keys, values = self._place_needles(rng, seq_len, min_distance, self.num_needles)
        asked = rng.integers(self.num_needles)
        return context, [keys[asked]], [values[asked]]


@dataclasses.dataclass(frozen=True)
class MultiValue(_Task):
    """One key bound to `num_values` distinct values, plus `num_distractors` other facts."""

    num_values: int = 4
    num_distractors: int = 2

    def __post_init__(self):
        if not 2 <= self.num_values <= self.vocab.num_values:
            raise ValueError(f"num_values must be in [2, vocab.num_values], got {self.num_values}")
        if not 0 <= self.num_distractors < self.vocab.num_keys:
            raise ValueError(f"num_distractors must be in [0, num_keys), got {self.num_distractors}")

    @property
    def answer_len(self) -> int:
        return self.num_values

    def _row(self, rng, seq_len, min_distance):
        n = self.context_len(seq_len)
        context = self._haystack(rng, n)
        keys = rng.choice(self.vocab.keys, size=1 + self.num_distractors, replace=False)
        values = rng.choice(self.vocab.values, size=self.num_values, replace=False)
        facts = [(keys[0], v) for v in values]
        facts += [(k, rng.choice(self.vocab.values)) for k in keys[1:]]
        order = rng.permutation(len(facts))
        facts = [facts[i] for i in order]
        starts = _fact_starts(rng, self.fact_limit(seq_len, min_distance), len(facts))
        _place_facts(context, starts, facts)
        answer = [v for k, v in facts if k == keys[0]]        # order of appearance
        return context, [keys[0]], answer


@dataclasses.dataclass(frozen=True)
class MultiQuery(_Task):
    """`num_needles` facts with distinct keys; `num_queries` of them asked, in random order."""

    num_needles: int = 4
    num_queries_asked: int = 4

    def __post_init__(self):
        if not 1 <= self.num_queries_asked <= self.num_needles <= self.vocab.num_keys:
            raise ValueError("need 1 <= num_queries_asked <= num_needles <= num_keys, got "
                             f"{self.num_queries_asked}, {self.num_needles}")

    @property
    def num_queries(self) -> int:
        return self.num_queries_asked

    @property
    def answer_len(self) -> int:
        return self.num_queries_asked

    def _row(self, rng, seq_len, min_distance):
        context, keys, values = self._place_needles(rng, seq_len, min_distance, self.num_needles)
        asked = rng.choice(self.num_needles, size=self.num_queries_asked, replace=False)
        return context, list(keys[asked]), list(values[asked])


@dataclasses.dataclass(frozen=True)
class VariableTracking(_Task):
    """`num_chains` chains `x1 = v ; x2 = x1 ; ... ; x_h = x_{h-1}` (h = `num_hops`), their
    statements interleaved (each chain in order); asked `v`, answer `x1 .. x_h`."""

    num_chains: int = 2
    num_hops: int = 3

    def __post_init__(self):
        if self.num_chains < 1 or self.num_hops < 1:
            raise ValueError(f"num_chains and num_hops must be >= 1, got {self.num_chains}, {self.num_hops}")
        if self.num_chains * self.num_hops > self.vocab.num_keys or self.num_chains > self.vocab.num_values:
            raise ValueError("num_chains * num_hops names (keys) or num_chains values do not fit the vocabulary")

    @property
    def answer_len(self) -> int:
        return self.num_hops

    def _row(self, rng, seq_len, min_distance):
        n = self.context_len(seq_len)
        context = self._haystack(rng, n)
        names = rng.choice(self.vocab.keys, size=(self.num_chains, self.num_hops), replace=False)
        values = rng.choice(self.vocab.values, size=self.num_chains, replace=False)
        chain_of_slot = rng.permutation(np.repeat(np.arange(self.num_chains), self.num_hops))
        hop = np.zeros(self.num_chains, int)
        facts = []
        for c in chain_of_slot:
            h = hop[c]
            facts.append((names[c, h], values[c] if h == 0 else names[c, h - 1]))
            hop[c] += 1
        starts = _fact_starts(rng, self.fact_limit(seq_len, min_distance), len(facts))
        _place_facts(context, starts, facts)
        asked = rng.integers(self.num_chains)
        return context, [values[asked]], list(names[asked])


@dataclasses.dataclass(frozen=True)
class CommonWords(_Task):
    """The context (n tokens) is a word list: `num_common` words each occur `count =
    common_share * fact_limit / num_common` times, only in `[0, fact_limit)`; the other
    words fill the rest as evenly as possible, each strictly fewer times. No query tokens
    (`QUERY ANS`). Answer: the common words, in order of first appearance."""

    num_common: int = 3
    common_share: float = 0.25

    def __post_init__(self):
        if not 1 <= self.num_common < self.vocab.num_words // 2:
            raise ValueError(f"num_common must be in [1, num_words/2), got {self.num_common}")
        if not 0.0 < self.common_share < 1.0:
            raise ValueError(f"common_share must be in (0, 1), got {self.common_share}")

    @property
    def num_queries(self) -> int:
        return 0

    @property
    def answer_len(self) -> int:
        return self.num_common

    def _row(self, rng, seq_len, min_distance):
        n = self.context_len(seq_len)
        limit = self.fact_limit(seq_len, min_distance)
        count = int(self.common_share * limit / self.num_common)
        words = rng.permutation(self.vocab.words)
        common, rare = words[:self.num_common], words[self.num_common:]
        rest = n - self.num_common * count
        rare_max = -(-rest // len(rare))
        if count <= rare_max:
            raise ValueError(f"common_words: seq_len={seq_len}, min_distance={min_distance} leave "
                             f"no room for {self.num_common} words of {count} > {rare_max} occurrences")
        pos = rng.choice(limit, size=self.num_common * count, replace=False)
        context = np.zeros(n, np.int64)
        is_common = np.zeros(n, bool)
        is_common[pos] = True
        context[pos] = np.repeat(common, count)
        context[~is_common] = rng.permutation(np.resize(rare, rest))   # counts differ by <= 1
        common = set(common.tolist())
        answer = [w for w in dict.fromkeys(context.tolist()) if w in common]
        return context, [], answer


TASKS: dict[str, _Task] = {
    "single_needle": SingleNeedle(),
    "multikey_needle": MultiKeyNeedle(),
    "multivalue": MultiValue(),
    "multiquery": MultiQuery(),
    "variable_tracking": VariableTracking(),
    "common_words": CommonWords(),
}
VOCAB_SIZE = Vocab().size


def mixed_batch(rng: np.random.Generator, names, batch: int, seq_len: int, min_distance: int = 0):
    """tokens, targets `[B, T]` int32, loss_mask `[B, T]` float32 mixing `TASKS[names]`:
    row `i` is task `names[i % len(names)]` (so `batch` a multiple of `len(names)` is balanced)."""
    names = list(names)
    if not names or set(names) - set(TASKS):
        raise ValueError(f"names must be a non-empty list of {sorted(TASKS)}, got {names}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    parts = [TASKS[name].batch(rng, len(range(i, batch, len(names))), seq_len, min_distance)
             for i, name in enumerate(names) if i < batch]
    out = [np.zeros((batch, seq_len), p.dtype) for p in parts[0]]
    for i, part in enumerate(parts):
        for o, p in zip(out, part):
            o[i::len(names)] = p
    return tuple(out)


def exact_match(predictions, targets, loss_mask) -> np.ndarray:
    """`[B]` bool: every answer position (`loss_mask > 0`) of the row predicted right.
    predictions, targets, loss_mask: `[B, T]`."""
    predictions, targets, loss_mask = (np.asarray(x) for x in (predictions, targets, loss_mask))
    if not predictions.shape == targets.shape == loss_mask.shape:
        raise ValueError(f"shapes differ: {predictions.shape}, {targets.shape}, {loss_mask.shape}")
    return np.all((predictions == targets) | (loss_mask == 0), axis=-1)
