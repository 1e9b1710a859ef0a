"""Failure analysis (Fig. 13): robust reply parsing, the Table 1 summary, the command's files."""

from __future__ import annotations

import json

import pytest
from PIL import Image

import egm.curation.failures as failures_mod
from egm.curation.client import Reply, TeacherRequest
from egm.curation.failures import (
    FailureVerdict,
    analyze_failures,
    failure_summary,
    parse_failure_analysis,
    summary_markdown,
)
from egm.scoring import Prediction
from egm.data.manifest import Sample, read_manifest, write_manifest

GOOD = [
    ("<category> [COMPLEX_PROMPT] </category>\n<reasoning> [The prompt uses an ordinal.] </reasoning>\n<confidence> [high] </confidence>",
     FailureVerdict("COMPLEX_PROMPT", "The prompt uses an ordinal.", "high")),
    ("<category>GT_ERROR</category><reasoning>Box is on the wrong dog.</reasoning><confidence>Medium</confidence>",
     FailureVerdict("GT_ERROR", "Box is on the wrong dog.", "medium")),
    ("```\n<category> **2. Ambiguous image** </category>\n<reasoning>Two identical cups.\nBoth centred.</reasoning>\n```",
     FailureVerdict("AMBIGUOUS_IMAGE", "Two identical cups.\nBoth centred.", None)),
    ("<CATEGORY> small-object\n<reasoning> tiny </reasoning> <confidence> low confidence </confidence>",
     FailureVerdict("SMALL_OBJECT", "tiny", "low")),
    ("Category: Other\nReasoning: the model output nothing.", FailureVerdict("OTHER", "the model output nothing.", None)),
]
BAD = [
    "",
    "The model confused the two dogs.",
    "<category> [One of: COMPLEX_PROMPT, AMBIGUOUS_IMAGE, SMALL_OBJECT, GT_ERROR, OTHER] </category>",
    "<category> ANOTHER_THING </category>",
    "<category></category><reasoning>x</reasoning>",
]


@pytest.mark.parametrize("text,expected", GOOD)
def test_parse_good(text, expected):
    assert parse_failure_analysis(text) == expected


@pytest.mark.parametrize("text", BAD)
def test_parse_malformed(text):
    with pytest.raises(ValueError):
        parse_failure_analysis(text)


def _p(i, ok, iou=None):
    return Prediction(id=i, iou=iou if iou is not None else (0.9 if ok else 0.1), success=ok)


def test_summary_table1():
    verdicts = {
        "a": FailureVerdict("COMPLEX_PROMPT", "", "high"),
        "b": FailureVerdict("COMPLEX_PROMPT", "", None),
        "c": FailureVerdict("COMPLEX_PROMPT", "", None),
        "d": FailureVerdict("SMALL_OBJECT", "", None),
        "e": FailureVerdict("GT_ERROR", "", None),
    }
    base = {i: _p(i, False) for i in "abcde"}
    big = {"a": _p("a", True), "b": _p("b", False), "c": _p("c", True), "d": _p("d", True)}
    partial = {"a": _p("a", True)}
    s = failure_summary(verdicts, {"8B": base, "78B": big, "partial": partial})
    assert s["analysed"] == 5 and s["subset_size"] == 3
    assert s["counts"] == {"COMPLEX_PROMPT": 3, "AMBIGUOUS_IMAGE": 0, "SMALL_OBJECT": 1, "GT_ERROR": 1, "OTHER": 0}
    assert s["share"]["COMPLEX_PROMPT"] == pytest.approx(0.6)
    assert s["accuracy"]["8B"] == {"acc": 0.0, "n": 3, "missing": 0}
    assert s["accuracy"]["78B"] == {"acc": pytest.approx(2 / 3), "n": 3, "missing": 0}
    assert s["accuracy"]["partial"] == {"acc": 1.0, "n": 1, "missing": 2}
    md = summary_markdown(s)
    assert "| COMPLEX_PROMPT | 3 | 60.0% |" in md and "| 78B | 66.7% | 3 | 0 |" in md
    assert failure_summary({}, {"x": base})["accuracy"]["x"]["acc"] is None


class Oracle:
    """Answers Fig. 13 from the request fields: a prediction without a box is OTHER."""

    model = "oracle"

    def __init__(self):
        self.requests: list[TeacherRequest] = []

    def complete(self, request: TeacherRequest) -> Reply:
        self.requests.append(request)
        if request.sample.id == "s3":
            return Reply("no idea")
        cat = "OTHER" if request.fields["pred_bbox_norm"].startswith("none") else "COMPLEX_PROMPT"
        return Reply(f"<category>{cat}</category><reasoning>r</reasoning><confidence>low</confidence>")


def test_analyze_failures_command(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "im.png")
    samples = [Sample(f"s{i}", str(tmp_path / "im.png"), 100, 100, f"thing {i}", "vanilla", [10, 10, 50, 50], "val", "synthetic")
               for i in range(5)]
    write_manifest(tmp_path / "m.jsonl", samples)
    base = [
        {"id": "s0", "iou": 0.2, "success": False, "pred_box": [60, 60, 90, 90], "gt_box": [10, 10, 50, 50], "sentence": "thing 0"},
        {"id": "s1", "iou": 0.0, "success": False, "pred_box": None, "gt_box": [10, 10, 50, 50], "sentence": "thing 1"},
        {"id": "s2", "iou": 0.8, "success": True, "pred_box": [10, 10, 45, 50], "gt_box": [10, 10, 50, 50], "sentence": "thing 2"},
        {"id": "s3", "iou": 0.5, "success": False, "pred_box": [30, 30, 70, 70], "gt_box": [10, 10, 50, 50], "sentence": "thing 3"},
        {"id": "ghost", "iou": 0.1, "success": False, "pred_box": None, "gt_box": [1, 1, 2, 2], "sentence": "x"},
    ]
    big = [{"id": "s0", "iou": 0.7, "success": True, "pred_box": None, "gt_box": None, "sentence": "thing 0"}]
    (tmp_path / "internvl8b.jsonl").write_text("".join(json.dumps(x) + "\n" for x in base))
    (tmp_path / "big.jsonl").write_text("".join(json.dumps(x) + "\n" for x in big))
    oracle = Oracle()
    monkeypatch.setattr(failures_mod, "make_teacher", lambda cfg, cls=None: oracle)
    out = tmp_path / "fa" / "failures.jsonl"
    summary = analyze_failures(str(tmp_path / "internvl8b.jsonl"), str(tmp_path / "m.jsonl"), str(out),
                               compare=[f"InternVL-78B={tmp_path / 'big.jsonl'}"], progress=False)
    assert [r.item_id for r in oracle.requests] == ["internvl8b/s0", "internvl8b/s1", "internvl8b/s3"]
    assert summary["counts"]["COMPLEX_PROMPT"] == 1 and summary["counts"]["OTHER"] == 1
    assert summary["accuracy"] == {"internvl8b": {"acc": 0.0, "n": 1, "missing": 0},
                                   "InternVL-78B": {"acc": 1.0, "n": 1, "missing": 0}}
    assert summary["stats"]["malformed"] == 1 and summary["stats"]["skipped"] == 1
    analysed = read_manifest(out)
    assert [(s.id, s.meta["failure"]["category"]) for s in analysed] == [("s0", "COMPLEX_PROMPT"), ("s1", "OTHER")]
    fails = [json.loads(x) for x in (tmp_path / "fa" / "failures.jsonl.failures.jsonl").read_text().splitlines()]
    assert {(f["id"], f["kind"]) for f in fails} == {("ghost", "skipped"), ("s3", "malformed")}
    assert "| InternVL-78B | 100.0% | 1 | 0 |" in (tmp_path / "fa" / "failures.jsonl.summary.md").read_text()
    # rerun: all three replies come from the cache
    oracle.requests.clear()
    analyze_failures(str(tmp_path / "internvl8b.jsonl"), str(tmp_path / "m.jsonl"), str(out), progress=False)
    assert oracle.requests == []
