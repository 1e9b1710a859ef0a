"""The synthetic oracle as a curation teacher: the same jobs, cache and parsers as the API teacher."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from egm.curation.cache import ReplyCache
from egm.curation.client import Teacher, TeacherConfig, TeacherError
from egm.curation.failures import parse_failure_analysis, run_failure_analysis
from egm.curation.jobs import curate, make_teacher, vanilla_request, verify_descriptions
from egm.curation.oracle import OracleTeacher, synthetic_description
from egm.data.manifest import Sample, read_manifest, write_manifest
from egm.data.synthetic import (
    DIFFICULTIES, VANILLA_DIFFICULTIES, make_synthetic, parse_expression, resolve, sentence_of, synthetic_trace,
)
from egm.scoring import Prediction

ORACLE = "egm.curation.oracle:OracleTeacher"


def _world(tmp_path, name, difficulties, n=8):
    """A tiny synthetic val split (difficulties cycled) as a manifest without reasoning."""
    paths = make_synthetic(str(tmp_path / name), n_train=0, n_val=n, n_test=0, image_size=48,
                           difficulties=list(difficulties))
    samples = read_manifest(paths["val"])
    bare = tmp_path / f"{name}_in.jsonl"
    write_manifest(bare, [replace(s, reasoning=None) for s in samples])
    return samples, str(bare)


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    return _world(tmp_path_factory.mktemp("oracle"), "all", DIFFICULTIES, n=10)[0]


def test_make_teacher_builds_the_oracle():
    t = make_teacher(TeacherConfig(), ORACLE)
    assert isinstance(t, OracleTeacher) and isinstance(t, Teacher) and t.model == "oracle"


def test_vanilla_job_writes_the_synthetic_traces_and_reruns_from_cache(tmp_path):
    ref, manifest = _world(tmp_path, "van", VANILLA_DIFFICULTIES)
    out = tmp_path / "cur" / "vanilla.jsonl"
    stats = curate(manifest, str(out), job="vanilla", teacher_class=ORACLE, concurrency=2, progress=False)
    assert (stats["input"], stats["kept"], stats["requests"], stats["cache_hits"]) == (8, 8, 8, 0)
    got = read_manifest(out)
    assert [s.id for s in got] == [s.id for s in ref]
    assert [s.reasoning for s in got] == [synthetic_trace(s) for s in ref] == [s.reasoning for s in ref]
    assert all(s.meta["curation"]["vanilla_reasoning"]["teacher"] == "oracle" for s in got)
    again = curate(manifest, str(out), job="vanilla", teacher_class=ORACLE, concurrency=2, progress=False)
    assert (again["requests"], again["cache_hits"], again["kept"]) == (0, 8, 8)


def test_amodal_jobs_describe_verify_and_reason_then_rerun_from_cache(tmp_path):
    ref, manifest = _world(tmp_path, "amo", ["amodal"])
    out = tmp_path / "cur" / "amodal.jsonl"
    stats = curate(manifest, str(out), job="amodal", teacher_class=ORACLE, concurrency=2, progress=False)
    assert [(st["job"], st["kept"], st["requests"]) for st in stats["steps"]] == [
        ("amodal_description", 8, 8), ("amodal_verification", 8, 8), ("amodal_reasoning", 8, 8)]
    got = read_manifest(out)
    assert len(got) == stats["kept"] == 8
    for s, r in zip(got, ref):
        assert s.reasoning == synthetic_trace(r) == r.reasoning
        assert s.sentence == synthetic_description(r) and s.meta["orig_sentence"] == r.sentence
        assert resolve(parse_expression(s.sentence), r.meta["objects"]) == [r.meta["target"]]
        assert any(w in s.reasoning for w in ("slightly", "a bit", "moderately", "considerably", "significantly"))
    again = curate(manifest, str(out), job="amodal", teacher_class=ORACLE, concurrency=2, progress=False)
    assert [st["requests"] for st in again["steps"]] == [0, 0, 0]
    assert [st["cache_hits"] for st in again["steps"]] == [8, 8, 8]
    # one step alone, on the described manifest: the same traces
    one = curate(str(out), str(tmp_path / "cur" / "reason.jsonl"), job="amodal_reasoning", teacher_class=ORACLE,
                 progress=False)
    assert one["kept"] == 8
    assert [s.reasoning for s in read_manifest(tmp_path / "cur" / "reason.jsonl")] == [r.reasoning for r in ref]


def test_expressions_parse_back_and_descriptions_single_out_the_target(val):
    for s in val:
        e = s.meta["expression"]
        assert parse_expression(sentence_of(e)) == e
        assert parse_expression(sentence_of(e).upper() + ".") == e
        d = synthetic_description(s)
        assert resolve(parse_expression(d), s.meta["objects"]) == [s.meta["target"]]
        assert len(d.split()) <= len(s.sentence.split())
    assert parse_expression("the purple circle") is None
    assert parse_expression("the circle left of the second square from the left") is None


def test_verification_says_no_to_ambiguous_or_wrong_descriptions(val, tmp_path):
    ordinal = [s for s in val if s.meta["difficulty"] == "ordinal"]
    e = ordinal[0].meta["expression"]
    shape, other_rank = e["shape"], 2 if e["ordinal"] == 1 else 1
    cases = [
        (ordinal[0], True),
        (replace(ordinal[0], id="ambiguous", sentence=f"the {shape}"), False),    # several identical shapes
        (replace(val[0], id="unparsable", sentence="the thing over there"), False),
        (replace(ordinal[0], id="other", sentence=sentence_of({**e, "ordinal": other_rank})), False),  # its neighbour
    ]
    with ReplyCache(tmp_path / "c.jsonl") as cache:
        res = verify_descriptions([s for s, _ in cases], OracleTeacher(), cache, concurrency=1)
    assert [s.id for s in res.samples] == [s.id for s, ok in cases if ok]
    assert res.stats["rejected"] == 3 and res.stats["malformed"] == 0
    # a non-synthetic sample is confirmed by its own annotated sentence only
    real = Sample("r", "x.png", 64, 64, "the cup on the left", "amodal", [0, 0, 20, 20], "val", "cocoa")
    assert OracleTeacher.confirms(real, "The cup on the left.") and not OracleTeacher.confirms(real, "the cup")


def test_vanilla_reasoning_needs_a_synthetic_scene():
    real = Sample("r", "x.png", 64, 64, "the cup", "vanilla", [0, 0, 20, 20], "val", "refcoco")
    with pytest.raises(TeacherError, match="synthetic scene"):
        OracleTeacher().complete(vanilla_request(real))


def test_failure_analysis_categories_follow_the_difficulty(val, tmp_path):
    preds = {s.id: Prediction(id=s.id, iou=0.1, success=False, pred_box=[0, 0, 4, 4], gt_box=s.box,
                              sentence=s.sentence) for s in val}
    real = Sample("r", "x.png", 640, 480, "the second cup from the left", "vanilla", [100, 100, 300, 300], "val", "refcoco")
    tiny = Sample("t", "x.png", 640, 480, "the cup", "vanilla", [10, 10, 30, 30], "val", "refcoco")
    preds |= {x.id: Prediction(id=x.id, iou=0.0, success=False, gt_box=x.box, sentence=x.sentence) for x in (real, tiny)}
    samples = {s.id: s for s in [*val, real, tiny]}
    with ReplyCache(tmp_path / "c.jsonl") as cache:
        res = run_failure_analysis(preds, samples, OracleTeacher(), cache, tag="m", concurrency=1)
    assert res.stats["malformed"] == 0 and len(res.verdicts) == len(preds)
    expected = {"plain": "OTHER", "attribute": "AMBIGUOUS_IMAGE", "ordinal": "COMPLEX_PROMPT",
                "relation": "COMPLEX_PROMPT", "amodal": "OTHER"}
    for s in val:
        v = res.verdicts[s.id]
        assert (v.category, v.confidence) == (expected[s.meta["difficulty"]], "high") and v.reasoning
    assert (res.verdicts["r"].category, res.verdicts["r"].confidence) == ("COMPLEX_PROMPT", "medium")
    assert res.verdicts["t"].category == "SMALL_OBJECT"
    cached = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert all(parse_failure_analysis(c["text"]) for c in cached)
