"""Continual-learning metrics of examples/protocol.py on hand-computed accuracy matrices."""

import math

import numpy as np
import pytest

from examples.protocol import average_accuracy, forgetting, last_accuracy

NAN = math.nan

# acc[t][j]: accuracy on task j after training task t. Task 0 first improves (90 -> 92), then drops to 60.
ACC = [
    [90.0, NAN, NAN],
    [92.0, 70.0, NAN],
    [60.0, 65.0, 50.0],
]
SEEN_ACC = [90.0, 81.0, 58.5]


def test_last_accuracy_is_the_final_seen_accuracy():
    assert last_accuracy(SEEN_ACC) == 58.5


def test_average_accuracy_is_the_mean_over_tasks():
    assert average_accuracy(SEEN_ACC) == pytest.approx((90.0 + 81.0 + 58.5) / 3)


def test_forgetting_uses_the_best_earlier_accuracy():
    # Task 0: best of 90, 92 is 92, final 60 -> 32. Task 1: best 70, final 65 -> 5. Mean 18.5.
    assert forgetting(ACC) == pytest.approx(18.5)


def test_forgetting_ignores_the_upper_triangle():
    filled = np.array(ACC)
    filled[np.triu_indices(3, k=1)] = 1000.0
    assert forgetting(filled) == pytest.approx(forgetting(ACC))


def test_forgetting_can_be_negative_with_backward_transfer():
    assert forgetting([[50.0, NAN], [60.0, 70.0]]) == pytest.approx(-10.0)


def test_single_task_has_no_forgetting():
    assert forgetting([[73.0]]) == 0.0
    assert last_accuracy([73.0]) == average_accuracy([73.0]) == 73.0


@pytest.mark.parametrize("bad", [[], [[1.0, 2.0]], [1.0, 2.0]])
def test_forgetting_rejects_non_square_input(bad):
    with pytest.raises(ValueError, match="square"):
        forgetting(bad)


def test_seen_accuracy_must_be_a_non_empty_vector():
    with pytest.raises(ValueError, match="non-empty"):
        last_accuracy([])
    with pytest.raises(ValueError, match="1-D"):
        average_accuracy([[1.0]])
