"""Learnability selection (Sec. 4.2) on hand-built prediction files with exact expected sets."""

from __future__ import annotations

import json

import pytest

from egm.curation.selection import select_by_learnability, select_rl_data
from egm.data.manifest import ManifestError, Sample, read_manifest, write_manifest
from egm.eval.predictions import read_predictions


def _s(i, task="vanilla"):
    extra = {"visible_box": [0, 0, 5, 5]} if task == "amodal" else {}
    return Sample(i, "im.png", 100, 100, f"obj {i}", task, [0, 0, 10, 10], "train", "refcoco", **extra)


# id: (S_ref, S_theta); None = absent from that file
TABLE = {
    "n1": (1, 0), "n2": (1, 0), "n3": (1, 0),            # l = 1 -> D_neg
    "p1": (1, 1), "p2": (0, 1), "p3": (1, 1), "p4": (1, 1), "p5": (0, 1),  # S_theta = 1 -> pool
    "z1": (0, 0), "z2": (0, 0),                          # l = 0, S_theta = 0 -> never
    "mr": (None, 1), "ml": (1, None),                    # missing from one file
}


def _write(tmp_path, table, amodal=("am1", "am2")):
    samples = [_s(i) for i in table] + [_s(i, "amodal") for i in amodal]
    write_manifest(tmp_path / "m.jsonl", samples)
    for col, name in ((0, "ref"), (1, "learner")):
        lines = []
        for i, v in table.items():
            if v[col] is None:
                continue
            iou = 0.8 if v[col] else 0.3
            lines.append({"id": i, "iou": iou, "success": bool(v[col]), "pred_box": [0, 0, 9, 9], "gt_box": [0, 0, 10, 10],
                          "sentence": f"obj {i}"})
        lines.append({"id": "not-in-manifest", "iou": 0.9, "success": True, "pred_box": None, "gt_box": None, "sentence": "?"})
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return samples


def test_exact_sets(tmp_path):
    samples = _write(tmp_path, TABLE)
    res = select_by_learnability(samples, read_predictions(tmp_path / "ref.jsonl"), read_predictions(tmp_path / "learner.jsonl"), seed=3)
    assert res.negatives == ["n1", "n2", "n3"]
    assert len(res.positives) == 3 and set(res.positives) <= {"p1", "p2", "p3", "p4", "p5"}
    assert res.amodal == ["am1", "am2"]
    assert (res.missing_reference, res.missing_learner) == (["mr"], ["ml"])
    assert [s.id for s in res.samples] == [i for i in [*TABLE, "am1", "am2"] if i in {*res.negatives, *res.positives, "am1", "am2"}]
    st = res.stats
    assert (st["negatives"], st["positive_pool"], st["positives"], st["positive_shortfall"], st["selected"]) == (3, 5, 3, 0, 8)
    assert st["learnability_counts"] == {"-1": 2, "0": 5, "1": 3}
    assert (st["missing_reference"], st["missing_learner"], st["unknown_reference_ids"], st["unknown_learner_ids"]) == (1, 1, 1, 1)
    meta = {s.id: s.meta for s in res.samples}
    assert meta["n1"] == {"rl_selection": "neg", "learnability": 1} and meta["am1"] == {"rl_selection": "amodal"}
    assert all(meta[i]["rl_selection"] == "pos" and meta[i]["learnability"] in (0, -1) for i in res.positives)


def test_seeded_uniform_draw(tmp_path):
    samples = _write(tmp_path, TABLE)
    ref, learn = read_predictions(tmp_path / "ref.jsonl"), read_predictions(tmp_path / "learner.jsonl")
    draws = [tuple(select_by_learnability(samples, ref, learn, seed=s).positives) for s in range(200)]
    assert draws[7] == tuple(select_by_learnability(samples, ref, learn, seed=7).positives)  # reproducible
    counts = {i: sum(i in d for d in draws) for i in ("p1", "p2", "p3", "p4", "p5")}
    assert all(80 <= c <= 160 for c in counts.values()), counts  # each kept with p = 3/5


def test_fewer_positives_takes_all_and_reports(tmp_path):
    table = {"n1": (1, 0), "n2": (1, 0), "n3": (1, 0), "p1": (0, 1)}
    samples = _write(tmp_path, table, amodal=())
    res = select_by_learnability(samples, read_predictions(tmp_path / "ref.jsonl"), read_predictions(tmp_path / "learner.jsonl"))
    assert res.positives == ["p1"] and res.stats["positive_shortfall"] == 2
    assert [s.id for s in res.samples] == ["n1", "n2", "n3", "p1"]


def test_command_writes_manifest_and_stats(tmp_path):
    _write(tmp_path, TABLE)
    out = tmp_path / "rl" / "train.jsonl"
    stats = select_rl_data(str(tmp_path / "m.jsonl"), str(tmp_path / "ref.jsonl"), str(tmp_path / "learner.jsonl"), str(out), seed=1)
    assert stats["selected"] == 8 and len(read_manifest(out)) == 8
    full = json.loads((tmp_path / "rl" / "train.jsonl.stats.json").read_text())
    assert (full["missing_reference_ids"], full["missing_learner_ids"]) == (["mr"], ["ml"])
    with pytest.raises(ValueError, match="lack a prediction"):
        select_rl_data(str(tmp_path / "m.jsonl"), str(tmp_path / "ref.jsonl"), str(tmp_path / "learner.jsonl"), str(out), strict=True)


def test_read_predictions_edges(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "a", "iou": 0.51}\n\n{"id": "b", "iou": 0.5, "pred_box": null, "model": "x"}\n'
                 '{"id": "c", "iou": null, "pred_box": null}\n{"id": "d", "io')  # torn last line: ignored
    preds = read_predictions(p)
    assert list(preds) == ["a", "b", "c"] and preds["c"].iou == 0.0 and preds["c"].success is False
    assert preds["a"].success is True and preds["b"].success is False  # success derived from IoU > 0.5
    assert preds["b"].extra == {"model": "x"} and preds["a"].sentence is None
    for bad, field in (('{"id": "a"}', "iou"), ('{"id": "a", "iou": 1, "success": "yes"}', "success"),
                       ('{"id": "a", "iou": 1, "pred_box": [1, 2]}', "pred_box"), ('{"id": "a", "iou": 1}\n{"id": "a", "iou": 0}', "id"), ('{"id": "a", "io\n{"id": "b", "iou": 0}', "JSON")):
        p.write_text(bad + "\n")
        with pytest.raises(ManifestError, match=field):
            read_predictions(p)
