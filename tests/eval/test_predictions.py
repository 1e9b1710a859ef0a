"""Predictions JSONL: flushed appends, tolerant reading of a killed file, clean resume."""

import json

import pytest

from egm.eval.predictions import JsonlAppender, read_jsonl, read_predictions
from egm.scoring import Prediction


def test_append_flushes_each_record(tmp_path):
    p = tmp_path / "p.jsonl"
    w = JsonlAppender(p)
    w.append({"id": "a", "iou": 0.7})
    assert read_jsonl(p) == [{"id": "a", "iou": 0.7}]  # visible before close
    w.close()


def test_partial_last_line_ignored_then_overwritten(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "io')
    assert [r["id"] for r in read_jsonl(p)] == ["a", "b"]
    with JsonlAppender(p) as w:
        assert w.done_ids == {"a", "b"}
        w.append({"id": "c", "iou": 1.0})
    lines = p.read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["a", "b", "c"]


def test_complete_last_record_without_newline_is_kept(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "a"}\n{"id": "b"}')
    with JsonlAppender(p) as w:
        assert w.done_ids == {"a", "b"}
        w.append({"id": "c"})
    assert [r["id"] for r in read_jsonl(p)] == ["a", "b", "c"]


def test_corrupt_middle_line_raises_with_location(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "a"}\n{"id": \n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2"):
        read_jsonl(p)


def test_read_predictions_typed_records_duplicates_raise(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "a", "iou": 0.7, "v": 1}\n{"id": "b", "iou": null, "failure": "image_error"}\n')
    preds = read_predictions(p)
    assert preds["a"] == Prediction(id="a", iou=0.7, success=True, extra={"v": 1})  # success: IoU > 0.5
    assert preds["b"].iou == 0.0 and not preds["b"].success and preds["b"].failure == "image_error"
    assert Prediction.from_json(preds["a"].to_json()) == preds["a"]
    p.write_text('{"id": "a", "iou": 0.7}\n{"id": "a", "iou": 0.2}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2.*duplicate id"):
        read_predictions(p)
    assert read_jsonl(tmp_path / "missing.jsonl") == []
