"""Eq. 8 reward ``alpha * IoU + (1 - alpha) * [IoU > 0.5]`` against hand-computed values."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egm.boxes import iou
from egm.reward import RewardOutput, eq8, grounding_reward, reward_from_texts

GT = [0.0, 0.0, 10.0, 10.0]


def _eq8(iou_value: float, alpha: float = 0.5) -> float:
    return alpha * iou_value + (1 - alpha) * (1.0 if iou_value > 0.5 else 0.0)


def test_hand_computed_cases():
    preds = [
        [0, 0, 10, 10],  # IoU 1
        [5, 0, 15, 10],  # inter 50, union 150 -> 1/3
        [0, 0, 10, 5],  # inter 50, union 100 -> exactly 0.5: S = 0 (strict, Eq. 1)
        [0, 0, 10, 6],  # 60 / 100 = 0.6 -> S = 1
        [20, 20, 30, 30],  # disjoint
    ]
    out = grounding_reward(preds, [GT] * 5)
    ious = [1.0, 1 / 3, 0.5, 0.6, 0.0]
    np.testing.assert_allclose(out.iou, ious, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(out.success, [True, False, False, True, False])
    np.testing.assert_allclose(out.rewards, [_eq8(v) for v in ious], rtol=0, atol=1e-15)
    assert out.rewards[2] == 0.25  # IoU exactly 0.5 earns only the IoU half
    assert out.parse_ok.all() and out.rewards.dtype == np.float64 and len(out) == 5


def test_unparseable_gets_zero_and_is_counted():
    out = grounding_reward([None, [0, 0, 10, 10], None], [GT, GT, GT])
    np.testing.assert_array_equal(out.rewards, [0.0, 1.0, 0.0])
    np.testing.assert_array_equal(out.parse_ok, [False, True, False])
    np.testing.assert_array_equal(out.success, [False, True, False])
    m = out.metrics()
    assert m["reward/parse_failure_rate"] == pytest.approx(2 / 3)
    assert m["reward/success_rate"] == pytest.approx(1 / 3)
    assert m["reward/mean"] == pytest.approx(1 / 3)
    assert m["reward/std"] == pytest.approx(math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 3))
    assert m["reward/iou"] == pytest.approx(1 / 3)


def test_array_input_with_nan_rows_and_non_finite():
    preds = np.array([[0, 0, 10, 10], [np.nan] * 4, [0, 0, np.inf, 10]], dtype=np.float64)
    out = grounding_reward(preds, np.array([GT] * 3))
    np.testing.assert_array_equal(out.rewards, [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(out.parse_ok, [True, False, False])


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_alpha(alpha):
    out = grounding_reward([[5, 0, 15, 10], [0, 0, 10, 6]], [GT, GT], alpha=alpha)
    np.testing.assert_allclose(out.rewards, [_eq8(1 / 3, alpha), _eq8(0.6, alpha)], atol=1e-15)


def test_errors_and_empty():
    with pytest.raises(ValueError, match="alpha"):
        grounding_reward([GT], [GT], alpha=1.5)
    with pytest.raises(ValueError, match="ground-truth"):
        grounding_reward([GT, GT], [GT])
    out = grounding_reward([], np.zeros((0, 4)))
    assert len(out) == 0 and out.metrics()["reward/mean"] == 0.0


box = st.tuples(*[st.floats(0, 100, allow_nan=False)] * 4).map(
    lambda b: (min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3]))
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.none(), box), box), min_size=1, max_size=8))
def test_matches_scalar_formula(pairs):
    preds, gts = zip(*pairs)
    out = grounding_reward(list(preds), list(gts))
    for k, (p, g) in enumerate(pairs):
        want = 0.0 if p is None else _eq8(iou(p, g))
        assert out.rewards[k] == pytest.approx(want, abs=1e-12)
        assert 0.0 <= out.rewards[k] <= 1.0


@dataclass
class _Parsed:
    box: tuple | None
    failure: str | None

    @property
    def ok(self) -> bool:
        return self.box is not None


def test_reward_from_texts_uses_the_parser_it_is_given():
    """The wrapper only parses (with the given parser: GRPO passes the adapter's) then delegates."""

    def parse(text, width, height):
        if text == "bad":
            return _Parsed(None, "no_box")
        x1, y1, x2, y2 = (float(v) / 1000 * s for v, s in zip(text.split(), (width, height) * 2))
        return _Parsed((x1, y1, x2, y2), None)

    out = reward_from_texts(["0 0 500 500", "bad", "bad"], [GT] * 3, [(20, 20)] * 3, parse=parse)
    assert isinstance(out, RewardOutput)
    np.testing.assert_allclose(out.rewards, [1.0, 0.0, 0.0])
    assert out.failures == Counter({"no_box": 2})
    with pytest.raises(ValueError):
        reward_from_texts(["x"], [GT, GT], [(1, 1)], parse=parse)


def test_eq8_by_hand():
    """Eq. 8 with hand-computed values: 0.3 * 0.6 + 0.7 * 1 and 0.3 * 0.5 + 0.7 * 0 (IoU 0.5 fails)."""
    np.testing.assert_allclose(eq8(np.array([0.6, 0.5]), np.array([True, False]), alpha=0.3), [0.88, 0.15])


def test_reward_from_texts_with_real_parser():
    texts = ['<think>left one</think> {"bbox_2d": [0, 0, 500, 500]}', "no box here"]
    out = reward_from_texts(texts, [[0, 0, 50, 50], [0, 0, 1, 1]], [(100, 100), (100, 100)])
    np.testing.assert_allclose(out.rewards, [1.0, 0.0])
    assert out.parse_ok.tolist() == [True, False] and sum(out.failures.values()) == 1
