"""trainer.learning_rate: linear warm-up to the peak, then cosine decay to min_lr at the last step."""
import math

import pytest

from trainer import learning_rate

LR, MIN_LR = 1e-3, 1e-5


@pytest.mark.parametrize("total, warmup", [(1000, 50), (391 * 200, 391 * 5), (10, 3), (7, 1)])
def test_warmup_then_cosine(total, warmup):
    schedule = [learning_rate(step, total, warmup, LR, MIN_LR) for step in range(total)]
    assert schedule[0] == pytest.approx(LR / warmup, rel=1e-12)
    assert schedule[warmup - 1] == pytest.approx(LR, rel=1e-12)  # the warm-up ends at the peak
    assert schedule[warmup] == pytest.approx(LR, rel=1e-12)  # the cosine starts from the peak
    assert schedule[-1] == pytest.approx(MIN_LR, rel=1e-12)  # and reaches min_lr at the last step
    for step in range(warmup - 1):  # linear warm-up
        assert schedule[step + 1] - schedule[step] == pytest.approx(LR / warmup, rel=1e-9)
    decay = schedule[warmup:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert all(MIN_LR * (1 - 1e-12) <= lr <= LR * (1 + 1e-12) for lr in decay)  # up to rounding
    assert all(0 < lr <= LR * (1 + 1e-12) for lr in schedule[:warmup])
    if total - warmup > 4:
        middle = warmup + (total - warmup - 1) / 2  # half way through the decay: half way between peak and floor
        if middle.is_integer():
            assert schedule[int(middle)] == pytest.approx((LR + MIN_LR) / 2, rel=1e-9)


def test_cosine_shape_in_the_middle_of_the_decay():
    total, warmup = 1001, 0  # 1000 decay intervals
    quarter = learning_rate(250, total, warmup, LR, MIN_LR)
    assert quarter == pytest.approx(MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-12)
    assert learning_rate(500, total, warmup, LR, MIN_LR) == pytest.approx((LR + MIN_LR) / 2, rel=1e-12)


def test_no_warmup_starts_at_the_peak():
    assert learning_rate(0, 100, 0, LR, MIN_LR) == pytest.approx(LR, rel=1e-12)
    assert learning_rate(99, 100, 0, LR, MIN_LR) == pytest.approx(MIN_LR, rel=1e-12)


def test_single_step_and_all_warmup_edge_cases_stay_finite():
    assert learning_rate(0, 1, 0, LR, MIN_LR) == pytest.approx(LR)  # one step: nothing to decay over
    assert learning_rate(0, 1, 1, LR, MIN_LR) == pytest.approx(LR)
    assert learning_rate(9, 10, 10, LR, MIN_LR) == pytest.approx(LR)  # warm-up as long as the run
    assert learning_rate(9, 10, 9, LR, MIN_LR) == pytest.approx(LR)  # one step after it: the cosine's first
