"""RULER-style tasks: a plain-Python solver recovers every answer from the prompt alone."""

import hashlib
from collections import Counter

import numpy as np
import pytest

from sparse_jax.tasks import (TASKS, VOCAB_SIZE, CommonWords, MultiKeyNeedle, MultiQuery, MultiValue,
                              VariableTracking, Vocab, exact_match, mixed_batch)


def facts(context):
    """(lhs, rhs) of every `lhs EQ rhs` in the context, in order."""
    return [(context[i - 1], context[i + 1]) for i in range(1, len(context) - 1) if context[i] == Vocab.EQ]


def solve(name, prompt, answer_len):
    """Answer from the prompt (ends `QUERY q.. ANS`) by the task's definition."""
    q = prompt.index(Vocab.QUERY)
    context, queries = prompt[:q], prompt[q + 1:-1]
    if name == "common_words":
        counts = Counter(context)
        top = sorted(counts.values(), reverse=True)
        assert top[answer_len - 1] > top[answer_len], "common words not strictly more frequent"
        common = {w for w, c in counts.items() if c >= top[answer_len - 1]}
        return [w for w in dict.fromkeys(context) if w in common]
    if name == "variable_tracking":
        bound, names = {queries[0]}, []
        for lhs, rhs in facts(context):
            if rhs in bound:
                bound.add(lhs)
                names.append(lhs)
        return names
    table = {}
    for lhs, rhs in facts(context):
        table.setdefault(lhs, []).append(rhs)
    if name == "multivalue":
        return table[queries[0]]
    for k in queries:
        assert len(table[k]) == 1, "an asked key must have one value"
    return [table[k][0] for k in queries]


def fact_ends(name, prompt):
    """Positions of the last token of every fact the answer needs (common words: occurrences)."""
    q = prompt.index(Vocab.QUERY)
    context, queries = prompt[:q], prompt[q + 1:-1]
    if name == "common_words":
        answer = solve(name, prompt, TASKS[name].answer_len)
        return [i for i, w in enumerate(context) if w in answer]
    needed = set(queries) | set(solve(name, prompt, TASKS[name].answer_len))
    return [i + 1 for i in range(1, len(context) - 1)
            if context[i] == Vocab.EQ and (context[i - 1] in needed or context[i + 1] in needed)]


@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("seq_len,min_distance", [(64, 0), (97, 40)])
def test_solver_recovers_answers(name, seq_len, min_distance):
    task = TASKS[name]
    tokens, targets, mask = task.batch(np.random.default_rng(1), 16, seq_len, min_distance)
    assert tokens.shape == targets.shape == mask.shape == (16, seq_len)
    assert tokens.dtype == targets.dtype == np.int32 and mask.dtype == np.float32
    assert tokens.min() >= 0 and tokens.max() < task.vocab_size == VOCAB_SIZE
    m = task.answer_len
    assert (mask.sum(1) == m).all() and (mask[:, -m:] == 1).all()
    for row, tgt in zip(tokens.tolist(), targets.tolist()):
        ans_pos = seq_len - m
        assert row[ans_pos] == Vocab.ANS
        prompt = row[:ans_pos + 1]
        answer = tgt[ans_pos:]
        assert solve(name, prompt, m) == answer
        assert row[ans_pos + 1:] == answer[:-1]                   # teacher forcing
        ends = fact_ends(name, prompt)
        assert ends and ans_pos - max(ends) >= min_distance


def test_answers_vary_and_multi_answers_distinct():
    rng = np.random.default_rng(0)
    for name, task in TASKS.items():
        _, targets, mask = task.batch(rng, 64, 80)
        answers = {tuple(t[m > 0]) for t, m in zip(targets, mask)}
        assert len(answers) > 20, name
    _, targets, mask = MultiValue().batch(rng, 8, 80)
    assert all(len(set(t[m > 0])) == 4 for t, m in zip(targets, mask))


def test_deterministic_by_seed():
    for name in TASKS:
        a = TASKS[name].batch(np.random.default_rng(7), 4, 70, 10)
        b = TASKS[name].batch(np.random.default_rng(7), 4, 70, 10)
        c = TASKS[name].batch(np.random.default_rng(8), 4, 70, 10)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
        assert not np.array_equal(a[0], c[0])


def test_mixed_batch_rows_follow_names():
    names = ["multivalue", "single_needle", "common_words"]
    tokens, targets, mask = mixed_batch(np.random.default_rng(3), names, 7, 64)
    assert tokens.shape == (7, 64)
    lens = [TASKS[names[i % 3]].answer_len for i in range(7)]
    np.testing.assert_array_equal(mask.sum(1), lens)
    for i in range(7):
        row = tokens[i].tolist()
        prompt = row[:64 - lens[i] + 1]
        assert solve(names[i % 3], prompt, lens[i]) == targets[i, 64 - lens[i]:].tolist()


def test_exact_match():
    targets = np.array([[0, 5, 6], [0, 5, 6]])
    mask = np.array([[0, 1, 1], [0, 1, 1]], np.float32)
    preds = np.array([[9, 5, 6], [0, 5, 7]])
    np.testing.assert_array_equal(exact_match(preds, targets, mask), [True, False])
    with pytest.raises(ValueError, match="shapes"):
        exact_match(preds[:1], targets, mask)


def test_bad_arguments_raise():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="seq_len"):
        TASKS["multiquery"].batch(rng, 2, 12)
    with pytest.raises(ValueError, match="do not fit"):
        TASKS["multikey_needle"].batch(rng, 2, 64, min_distance=60)
    with pytest.raises(ValueError, match="no room"):
        TASKS["common_words"].batch(rng, 2, 64, min_distance=50)
    with pytest.raises(ValueError, match="min_distance"):
        TASKS["single_needle"].batch(rng, 2, 64, min_distance=-1)
    with pytest.raises(ValueError, match="batch"):
        TASKS["single_needle"].batch(rng, 0, 64)
    with pytest.raises(ValueError, match="names"):
        mixed_batch(rng, ["nope"], 4, 64)
    with pytest.raises(ValueError, match="num_keys"):
        Vocab(num_keys=2)
    with pytest.raises(ValueError, match="num_needles"):
        MultiKeyNeedle(num_needles=1)
    with pytest.raises(ValueError, match="num_values"):
        MultiValue(num_values=1)
    with pytest.raises(ValueError, match="num_queries_asked"):
        MultiQuery(num_needles=2, num_queries_asked=3)
    with pytest.raises(ValueError, match="num_hops"):
        VariableTracking(num_hops=0)
    with pytest.raises(ValueError, match="common_share"):
        CommonWords(common_share=1.5)


def test_data_is_byte_identical_to_the_recorded_stream():
    """Seeded data never changes by accident (refactors keep the rng calls and their order):
    the digest of every task's batch and a mixed batch, recorded from the code before
    `_Task._place_needles` was shared. A numpy that changes `Generator`'s streams also moves it."""
    digest = hashlib.sha256()
    for name in sorted(TASKS):
        for a in TASKS[name].batch(np.random.default_rng(11), 3, 90, 20):
            digest.update(np.ascontiguousarray(a).tobytes())
    for a in mixed_batch(np.random.default_rng(12), sorted(TASKS), 7, 70):
        digest.update(np.ascontiguousarray(a).tobytes())
    assert digest.hexdigest() == "e5aa94f8e0f410da8a280d1435c981773b6cf1a2ecc2578c45c56adac0ee3558"
