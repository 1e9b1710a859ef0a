"""Accuracy, macro average, amodal pooling and parse failures against hand computation."""

import json

import pytest

from egm.boxes import iou
from egm.eval.benchmarks import REFCOCO_SPLIT_NAMES, canonical_split, table3_columns, table4_columns
from egm.eval.metrics import amodal_accuracy, paired_comparison, refcoco_average, split_metrics, summarize
from egm.eval.predictions import read_jsonl

GT = [0.0, 0.0, 10.0, 10.0]
# predicted boxes with known IoU against GT (area 100)
PRED_IOU = {
    "full": ([0.0, 0.0, 10.0, 10.0], 1.0),
    "half": ([0.0, 0.0, 10.0, 5.0], 0.5),          # exactly 0.5 -> NOT a success
    "sixty": ([0.0, 0.0, 10.0, 6.0], 0.6),
    "quarter": ([0.0, 0.0, 5.0, 5.0], 0.25),
    "outside": ([20.0, 20.0, 30.0, 30.0], 0.0),
}


def rec(i, kind, task="vanilla"):
    if kind == "unparseable":
        return {"id": str(i), "task": task, "gt_box": GT, "pred_box": None, "iou": 0.0, "success": False,
                "parse_failure": True, "failure": "no_box", "answer": "I cannot find it", "num_tokens": 7}
    box, v = PRED_IOU[kind]
    return {"id": str(i), "task": task, "gt_box": GT, "pred_box": box, "iou": v, "success": v > 0.5,
            "parse_failure": False, "failure": None, "answer": json.dumps(box), "num_tokens": 10}


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_hand_ious_are_real():
    for box, v in PRED_IOU.values():
        assert iou(box, GT) == pytest.approx(v, abs=1e-12)


def test_split_accuracy_hand_computed(tmp_path):
    kinds = ["full", "half", "sixty", "quarter", "outside", "unparseable"]
    p = write(tmp_path / "s.jsonl", [rec(i, k) for i, k in enumerate(kinds)])
    m = split_metrics(read_jsonl(p), split="refcoco_unc_val")
    assert m.n == 6
    assert m.n_success == 2            # full, sixty; 0.5 exactly fails
    assert m.accuracy == pytest.approx(2 / 6)
    assert m.mean_iou == pytest.approx((1.0 + 0.5 + 0.6 + 0.25 + 0 + 0) / 6)
    assert m.n_parse_failures == 1 and m.parse_failure_rate == pytest.approx(1 / 6)
    assert m.mean_tokens == pytest.approx((10 * 5 + 7) / 6)
    assert m.task == "vanilla"


def test_failed_record_with_stale_iou_scores_zero():
    r = rec(0, "full")
    r.update(parse_failure=True)
    assert split_metrics([r]).accuracy == 0.0
    r = rec(1, "full")
    r.update(failure="image_error", pred_box=None)
    m = split_metrics([r])
    assert m.accuracy == 0.0 and m.n_image_failures == 1


def test_refcoco_macro_average_and_amodal_pooling():
    # split i has i+1 successes out of 10 -> accuracies 0.1 .. 0.8, macro mean 0.45
    splits = {}
    for i, name in enumerate(REFCOCO_SPLIT_NAMES):
        recs = [rec(j, "full" if j <= i else "half") for j in range(10)]
        splits[name] = split_metrics(recs, split=name)
    assert refcoco_average(splits) == pytest.approx(sum((i + 1) / 10 for i in range(8)) / 8)
    assert amodal_accuracy(splits) is None
    # sample-weighted (micro) for amodal: 3/4 and 1/2 -> 4/6, not (0.75 + 0.5)/2
    splits["cocoa_val"] = split_metrics([rec(j, k, "amodal") for j, k in enumerate(["full", "full", "full", "half"])])
    splits["cocoa_test"] = split_metrics([rec(j, k, "amodal") for j, k in enumerate(["full", "unparseable"])])
    assert amodal_accuracy(splits) == pytest.approx(4 / 6)
    s = summarize(splits)
    assert s["n"] == 8 * 10 + 6 and s["amodal_acc"] == pytest.approx(4 / 6)
    assert s["parse_failure_rate"] == pytest.approx(1 / 86)
    # average needs all eight
    del splits["refcocog_umd_test"]
    assert refcoco_average(splits) is None


def test_split_names_and_columns():
    assert canonical_split("refcocoplus_unc_testA") == "refcoco+_unc_testA"
    assert canonical_split("refcoco_unc_val") == "refcoco_unc_val"
    assert table3_columns() == ["Model", "RefCOCO val", "RefCOCO test-A", "RefCOCO test-B", "RefCOCO+ val",
                                "RefCOCO+ test-A", "RefCOCO+ test-B", "RefCOCOg val", "RefCOCOg test", "Avg. Acc"]
    assert table4_columns() == ["Model", "Amodal Acc"]


def test_headline_accuracy_falls_back_to_labelled_macro_average():
    from egm.eval.benchmarks import REFCOCO_SPLIT_NAMES
    from egm.eval.metrics import headline_accuracy

    synthetic = {"val_plain": {"accuracy": 0.9}, "val_relation": {"accuracy": 0.3}}
    acc, label = headline_accuracy(synthetic)
    assert acc == pytest.approx(0.6) and "evaluated splits" in label
    full = {n: {"accuracy": 0.5 + 0.05 * i} for i, n in enumerate(REFCOCO_SPLIT_NAMES)}
    full["extra"] = {"accuracy": 0.0}  # ignored once the eight RefCOCO splits are all present
    acc, label = headline_accuracy(full)
    assert acc == pytest.approx(0.5 + 0.05 * 3.5) and label == "RefCOCO Avg. Acc"
    assert headline_accuracy({}) == (None, "Macro Avg. Acc")


def test_paired_comparison_counts_flips_and_exact_mcnemar_p():
    before = {"a": True, "b": False, "c": False, "d": True, "e": False}
    after = {"a": True, "b": True, "c": True, "d": False, "e": False}
    c = paired_comparison(before, after)
    assert (c.n, c.before, c.after, c.fixed, c.broken) == (5, 2, 3, 2, 1)
    # 3 flips, min 1: 2 * (C(3,0) + C(3,1)) / 2^3 = 2 * 4/8 -> capped at 1
    assert c.p_value == 1.0
    # 9 fixed, 1 broken: 2 * (1 + 10) / 1024
    b = {i: i >= 9 for i in range(20)}  # ids 9..19 right before
    a = {i: i != 9 for i in range(20)}  # 0..8 fixed, 9 broken, 10..19 right on both sides
    c = paired_comparison(b, a)
    assert (c.fixed, c.broken, c.before, c.after) == (9, 1, 11, 19)
    assert c.p_value == pytest.approx(22 / 1024, abs=1e-15)
    # 6 fixed, 0 broken: 2 / 64
    assert paired_comparison({i: False for i in range(6)}, {i: True for i in range(6)}).p_value == 2 / 64
    assert paired_comparison({"x": True}, {"x": True}).p_value == 1.0  # no flips


def test_paired_comparison_needs_the_same_samples():
    with pytest.raises(ValueError, match="unpaired"):
        paired_comparison({"a": True, "b": True}, {"a": True, "c": False})
