"""The global order: mixture, curriculum, sampling without replacement, epoch reshuffles."""

from __future__ import annotations

import numpy as np
import pytest

from platform.config import CurriculumStage
from platform.data.errors import DataError
from platform.data.order import GlobalOrder, MixtureSchedule, SourceOrder, eval_order, largest_remainder

NAMES = ["web", "code", "books"]


def test_realised_mixture_follows_the_curriculum_at_the_declared_steps():
    curriculum = [CurriculumStage(0, {"web": 0.7, "code": 0.2, "books": 0.1}),
                  CurriculumStage(300, {"web": 0.1, "code": 0.3, "books": 0.6}),
                  CurriculumStage(500, {"code": 1.0})]
    s = MixtureSchedule(NAMES, [1, 1, 1], curriculum, global_batch_size=32, seed=3)

    def share(lo, hi):
        counts = sum(np.bincount(s.sources_for_step(t), minlength=3) for t in range(lo, hi))
        return counts / counts.sum()

    np.testing.assert_allclose(share(0, 300), [0.7, 0.2, 0.1], atol=0.01)
    np.testing.assert_allclose(share(300, 500), [0.1, 0.3, 0.6], atol=0.01)
    # The change is exact at the declared step, not blurred across it.
    assert np.bincount(s.sources_for_step(499), minlength=3)[0] <= 10
    assert np.bincount(s.sources_for_step(500), minlength=3).tolist() == [0, 32, 0]
    assert s.weights_at(299) == pytest.approx({"web": 0.7, "code": 0.2, "books": 0.1})
    assert s.weights_at(300)["books"] == pytest.approx(0.6)
    # Within a stage, batches are interleaved, not blocks of one source.
    assert len(set(s.sources_for_step(0).tolist())) == 3


def test_counts_before_matches_replaying_every_step():
    curriculum = [CurriculumStage(100, {"web": 1, "books": 3}), CurriculumStage(250, {})]
    s = MixtureSchedule(NAMES, [0.5, 0.3, 0.2], curriculum, global_batch_size=24, seed=11)
    counts = np.zeros(3, dtype=np.int64)
    for step in range(400):
        assert counts.tolist() == s.counts_before(step).tolist()
        counts += np.bincount(s.sources_for_step(step), minlength=3)
    # Steps before the first declared stage and stages without weights use the sources' weights.
    assert s.weights_at(50) == s.weights_at(300) == pytest.approx({"web": 0.5, "code": 0.3, "books": 0.2})
    assert s.weights_at(150)["code"] == 0


def test_the_order_depends_on_the_seed_only():
    def batches(seed):
        s = MixtureSchedule(NAMES, [0.5, 0.3, 0.2], [], 16, seed)
        g = GlobalOrder(s, {"web": 100, "code": 50, "books": 30}, seed)
        return [np.stack(g.step(t)).tolist() for t in range(20)]

    assert batches(5) == batches(5)
    assert batches(5) != batches(6)


def test_each_source_is_drawn_without_replacement_and_reshuffled_per_epoch():
    order = SourceOrder("code", 37, seed=9)
    first, second = order(np.arange(37)), order(np.arange(37, 74))
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(37))
    assert first.tolist() != second.tolist()
    # Draws cross epoch boundaries in one call.
    assert order(np.arange(30, 45)).tolist() == first[30:].tolist() + second[:8].tolist()


def test_global_order_walks_every_source_epoch_by_epoch():
    sizes = {"web": 40, "code": 25, "books": 10}
    s = MixtureSchedule(NAMES, [0.5, 0.3, 0.2], [], 8, 1)
    g = GlobalOrder(s, sizes, 1)
    drawn = {i: [] for i in range(3)}
    for t in range(100):
        src, seq = g.step(t)
        for i, q in zip(src.tolist(), seq.tolist()):
            drawn[i].append(q)
    for i, name in enumerate(NAMES):
        n = sizes[name]
        seq = drawn[i]
        for e in range(len(seq) // n):  # every complete epoch is a permutation
            assert sorted(seq[e * n:(e + 1) * n]) == list(range(n)), name


def test_largest_remainder_sums_exactly():
    assert largest_remainder(np.array([1 / 3, 1 / 3, 1 / 3]), 4096).tolist() == [1366, 1365, 1365]
    assert largest_remainder(np.array([0.999, 0.001, 0.0]), 10).tolist() == [10, 0, 0]


@pytest.mark.parametrize("base, curriculum, match", [
    ([0, 0, 0], [], "data.sources: the weights sum to 0"),
    ([1, -1, 1], [], "weight of source 'code' must be a finite number >= 0, got -1"),
    ([1, float("nan"), 1], [], "weight of source 'code' must be a finite number"),
    ([1, 1, 1], [CurriculumStage(10, {"web": 0.0, "code": 0.0})],
     r"curriculum stage 0 \(start_step 10\): the weights sum to 0"),
    ([1, 1, 1], [CurriculumStage(10, {"wiki": 1.0})], "no data source named 'wiki'"),
    ([1, 1, 1], [CurriculumStage(5, {"web": 1}), CurriculumStage(5, {"code": 1})], "two stages start at step 5"),
])
def test_bad_weights_are_clear_errors(base, curriculum, match):
    with pytest.raises(DataError, match=match):
        MixtureSchedule(NAMES, base, curriculum, 8, 0)


def test_eval_order_is_a_fixed_shuffle_of_all_held_out_sequences():
    src, seq = eval_order({"web": 3, "code": 0, "books": 2}, NAMES, seed=4)
    assert sorted(zip(src.tolist(), seq.tolist())) == [(0, 0), (0, 1), (0, 2), (2, 0), (2, 1)]
    again = eval_order({"web": 3, "code": 0, "books": 2}, NAMES, seed=4)
    assert src.tolist() == again[0].tolist() and seq.tolist() == again[1].tolist()
