"""egm/scoring.py directly: parse -> IoU -> success against hand-computed boxes, and the one
prediction record's JSON round trip."""

from __future__ import annotations

import json

import pytest

from egm.answers import parse_answer
from egm.data.manifest import Sample
from egm.scoring import PREDICTION_FIELDS, Prediction, score_answer, score_texts

SAMPLE = Sample(id="s1", image="a.png", width=100, height=200, sentence="the cup", task="vanilla",
                box=[10.0, 20.0, 50.0, 120.0], split="val", source="synthetic")


def qwen(box_1000: list[int]) -> str:
    return f'```json\n[{{"bbox_2d": {box_1000}, "label": "the cup"}}]\n```'


def test_hand_computed_iou_and_the_strict_threshold():
    # [100, 100, 500, 600] on 100x200 is the pixel box [10, 20, 50, 120]: the ground truth itself
    s = score_answer(parse_answer(qwen([100, 100, 500, 600]), 100, 200, family="qwen3_vl"), SAMPLE.box)
    assert s.parse_ok and s.success and s.iou == pytest.approx(1.0) and s.failure is None
    # [10, 20, 30, 120]: half the ground truth's width -> IoU = 2000 / 4000 = 0.5, not a success (Eq. 1: > 0.5)
    s = score_answer(parse_answer(qwen([100, 100, 300, 600]), 100, 200, family="qwen3_vl"), SAMPLE.box)
    assert s.iou == pytest.approx(0.5) and not s.success
    # [30, 70, 70, 170] overlaps [30, 70, 50, 120]: 1000 / (4000 + 4000 - 1000) = 1/7
    s = score_answer(parse_answer(qwen([300, 350, 700, 850]), 100, 200, family="qwen3_vl"), SAMPLE.box)
    assert s.iou == pytest.approx(1 / 7) and not s.success


def test_unparsed_answers_score_zero_and_say_why():
    (s,) = score_texts(["I cannot see a cup."], [SAMPLE], lambda t, w, h: parse_answer(t, w, h, family="qwen3_vl"))
    assert (s.iou, s.success, s.parse_ok, s.pred_box) == (0.0, False, False, None)
    assert s.failure  # a parse-failure kind of egm.answers, never None for a missing box
    with pytest.raises(ValueError, match="2 texts for 1 samples"):
        score_texts(["a", "b"], [SAMPLE], lambda t, w, h: parse_answer(t, w, h))


def test_prediction_record_round_trips_through_json_in_field_order():
    scored = score_answer(parse_answer(qwen([100, 100, 300, 600]), 100, 200, family="qwen3_vl"), SAMPLE.box)
    rec = Prediction.of(SAMPLE, "val", qwen([100, 100, 300, 600]), scored, num_tokens=12)
    obj = rec.to_json()
    assert list(obj) == list(PREDICTION_FIELDS)
    assert obj["pred_box"] == [10.0, 20.0, 30.0, 120.0] and obj["gt_box"] == [10.0, 20.0, 50.0, 120.0]
    assert obj["parse_failure"] is False and obj["num_tokens"] == 12
    back = Prediction.from_json(json.loads(json.dumps({**obj, "model": "tiny"})))
    assert back == Prediction(**{**obj}, extra={"model": "tiny"})
    with pytest.raises(TypeError):
        Prediction(id="x")  # iou and success are required
