import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

from egm import boxes as B

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_worked_example_refcoco_ann_1719310():
    xyxy = B.xywh_to_xyxy([103.93, 299.99, 134.22, 177.42])
    assert xyxy == pytest.approx((103.93, 299.99, 238.15, 477.41))
    assert B.to_rel1000(xyxy, 427, 640) == (243, 469, 558, 746)


def test_worked_example_matches_fixtures():
    refs = json.loads((FIXTURES / "refer_refs_unc_sample.json").read_text())
    facts = refs["derived_facts_for_ref0"]
    w, h = facts["image_581857_width_height"]
    xyxy = B.xywh_to_xyxy(facts["ann_1719310_bbox_xywh"])
    assert list(xyxy) == pytest.approx(facts["bbox_xyxy_abs"])
    assert list(B.to_rel1000(xyxy, w, h)) == facts["bbox_0_1000_round_internvl_doc"]
    conv = json.loads((FIXTURES / "qwen_box_conventions.json").read_text())["qwen2vl_and_qwen3vl_relative_0_1000"]
    ih, iw = conv["image_h_w"]
    assert list(B.to_rel1000(conv["example_input_abs_xyxy"], iw, ih)) == conv["qwen2vl_format_output"]


def test_round_half_up_and_clipping():
    # 0.5 relative units round up (Python's round(0.5) would give 0).
    assert B.to_rel1000([1, 5, 3, 7], 2000, 2000) == (1, 3, 2, 4)  # exact halves 0.5, 2.5, ...
    assert round(0.5) == 0 and round(2.5) == 2  # what banker's rounding would give
    assert B.to_rel1000([-10, -1, 120, 101], 100, 100) == (0, 0, 1000, 1000)
    with pytest.raises(ValueError):
        B.to_rel1000([0, 0, 1, 1], 0, 10)


def test_from_rel1000_round_trip_error_bound():
    w, h = 427, 640
    box = (103.93, 299.99, 238.15, 477.41)
    back = B.from_rel1000(B.to_rel1000(box, w, h), w, h)
    ex, ey = B.rel1000_max_error(w, h)
    for a, b, e in zip(back, box, (ex, ey, ex, ey)):
        assert abs(a - b) <= e + 1e-9
    assert B.from_rel1000([243, 469, 558, 746], 427, 640) == pytest.approx((103.761, 300.16, 238.266, 477.44))


def test_formats_clip_normalize():
    assert B.xyxy_to_xywh([1, 2, 4, 8]) == (1, 2, 3, 6)
    assert B.normalize_xyxy([5, 8, 1, 2]) == (1, 2, 5, 8)
    assert B.clip_xyxy([-5, -1, 700, 30], 640, 480) == (0, 0, 640, 30)
    assert B.area([0, 0, 2, 3]) == 6
    assert B.area([2, 0, 0, 3]) == 0  # inverted
    assert B.is_degenerate([1, 1, 1, 5])
    with pytest.raises(ValueError):
        B.iou([0, 0, 1], [0, 0, 1, 1])
    with pytest.raises(ValueError):
        B.iou([0, 0, float("nan"), 1], [0, 0, 1, 1])


def test_iou_hand_computed():
    # overlap 1x1 of two 2x2 boxes: 1 / (4 + 4 - 1)
    assert B.iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert B.iou([0, 0, 2, 2], [0, 0, 2, 2]) == 1.0
    assert B.iou([0, 0, 1, 1], [1, 0, 2, 1]) == 0.0  # touching edges
    assert B.iou([0, 0, 0, 5], [0, 0, 0, 5]) == 0.0  # degenerate, not NaN
    assert B.iou([2, 2, 0, 0], [0, 0, 2, 2]) == 0.0  # inverted counts as empty


def test_success_is_strict():
    # IoU exactly 0.5: [0,0,2,1] vs [0,0,1,1] -> 1/2
    v = B.iou([0, 0, 2, 1], [0, 0, 1, 1])
    assert v == 0.5
    assert not B.success(v)
    assert B.success(0.5000001)


box_st = st.tuples(
    st.floats(0, 500), st.floats(0, 500), st.floats(0.01, 300), st.floats(0.01, 300)
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(box_st, box_st), min_size=1, max_size=8))
def test_iou_matches_pycocotools(pairs):
    """Independent reference: pycocotools' mask.iou on xywh boxes (float64 C code)."""
    for a, b in pairs:
        ref = mask_utils.iou([list(a)], [list(b)], [0])[0][0]
        assert B.iou(B.xywh_to_xyxy(a), B.xywh_to_xyxy(b)) == pytest.approx(ref, abs=1e-9)
    A = np.array([B.xywh_to_xyxy(a) for a, _ in pairs])
    Bb = np.array([B.xywh_to_xyxy(b) for _, b in pairs])
    ref = np.array([mask_utils.iou([list(a)], [list(b)], [0])[0][0] for a, b in pairs])
    np.testing.assert_allclose(B.iou_batch(A, Bb), ref, atol=1e-9)


def test_iou_batch_nan_rows_are_zero():
    a = np.array([[0, 0, 2, 2], [np.nan] * 4, [0, 0, 0, 0]], dtype=float)
    b = np.array([[1, 1, 3, 3], [0, 0, 1, 1], [0, 0, 0, 0]], dtype=float)
    out = B.iou_batch(a, b)
    assert out.tolist() == pytest.approx([1 / 7, 0.0, 0.0])
    assert not math.isnan(out.sum())
