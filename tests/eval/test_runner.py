"""evaluate(): batching, scoring, image failures, resume after a kill, seeded latency pass."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from egm.data.manifest import Sample, write_manifest
from egm.eval.latency import latency_subset
from egm.eval.predictions import read_jsonl
from egm.eval.runner import GenerationOutput, evaluate


def parse(text, w, h):
    """Stand-in for egm.answers.parse_answer: JSON list of 4 pixel numbers, else a failure."""
    try:
        box = json.loads(text)
        assert isinstance(box, list) and len(box) == 4
        return SimpleNamespace(box=box, reasoning="because", failure=None)
    except Exception:
        return SimpleNamespace(box=None, reasoning=None, failure="no_box")


class FakeModel:
    """Answers the GT box, a half box (IoU 0.5) or garbage depending on the id; advances a fake clock."""

    def __init__(self):
        self.now = 0.0
        self.calls = []  # list of lists of ids

    def clock(self):
        return self.now

    def duration(self, sid):
        return 0.1 + 0.01 * int(sid.split("-")[1])

    def __call__(self, examples):
        self.calls.append([e["id"] for e in examples])
        outs = []
        for e in examples:
            assert isinstance(e["image"], Image.Image) and e["image"].mode == "RGB"
            k = int(e["id"].split("-")[1])
            x1, y1, x2, y2 = e["sample"].box
            if k % 5 == 4:
                text = "no idea"
            elif k % 5 == 3:
                text = json.dumps([x1, y1, x2, y1 + (y2 - y1) / 2])  # IoU exactly 0.5
            else:
                text = json.dumps([x1, y1, x2, y2])
            self.now += self.duration(e["id"])
            outs.append(GenerationOutput(text, num_tokens=k))
        return outs


@pytest.fixture
def data(tmp_path):
    img = tmp_path / "img.png"
    Image.new("RGB", (64, 48), (10, 20, 30)).save(img)
    (tmp_path / "corrupt.png").write_bytes(b"not a png")

    def mk(split, i, task="vanilla", image=str(img)):
        return Sample(id=f"{split}-{i}", image=image, width=64, height=48, sentence=f"thing {i}", task=task,
                      box=[4.0, 4.0, 20.0, 24.0], split=split, source="synthetic")

    val = [mk("refcoco_unc_val", i) for i in range(30)]
    val[7].image = str(tmp_path / "missing.png")
    val[8].image = str(tmp_path / "corrupt.png")
    manifest = tmp_path / "cocoa_val.jsonl"
    write_manifest(manifest, [mk("cocoa_val", i, task="amodal") for i in range(10)])
    return {"refcoco_unc_val": val, "cocoa_val": str(manifest)}


def expected_val_acc():
    # ids 0..29: k%5 in {0,1,2} succeed, minus the two image failures (7 -> k%5=2, 8 -> k%5=3)
    ok = [k for k in range(30) if k % 5 in (0, 1, 2) and k not in (7, 8)]
    return len(ok) / 30


def test_evaluate_scores_and_writes_results(tmp_path, data):
    model = FakeModel()
    out = tmp_path / "run"
    res = evaluate(model, data, out, batch_size=4, parse_fn=parse, clock=model.clock, num_gpus=2,
                   model_name="fake", n_params=123, latency_warmup=0)
    val = res["splits"]["refcoco_unc_val"]
    assert val["n"] == 30 and val["accuracy"] == pytest.approx(expected_val_acc())
    assert val["n_image_failures"] == 2
    assert val["n_parse_failures"] == 6          # k%5==4
    assert res["splits"]["cocoa_val"]["task"] == "amodal"
    assert res["summary"]["amodal_acc"] == pytest.approx(6 / 10)
    assert res["summary"]["refcoco_avg"] is None  # only one of eight splits
    assert json.loads((out / "results.json").read_text()) == res
    recs = read_jsonl(out / "predictions" / "refcoco_unc_val.jsonl")
    assert sorted(r["id"] for r in recs) == sorted(s.id for s in data["refcoco_unc_val"])
    bad = {r["id"]: r for r in recs}["refcoco_unc_val-7"]
    assert bad["failure"] == "image_error" and bad["iou"] == 0 and "missing.png" in bad["error"]
    good = {r["id"]: r for r in recs}["refcoco_unc_val-0"]
    assert good["iou"] == pytest.approx(1.0) and good["success"] and good["reasoning"] == "because"
    assert good["answer"] and good["num_tokens"] == 0 and good["gt_box"] == [4.0, 4.0, 20.0, 24.0]
    # main pass batches of <= 4 readable images; latency pass batch size 1 on RefCOCO split only
    # latency: 10% of 30 ids = 3, seeded, only the RefCOCO split, timed by the fake clock
    subset = latency_subset([s.id for s in data["refcoco_unc_val"]], 0.1, 0, key="refcoco_unc_val")
    readable = [i for i in subset if i not in ("refcoco_unc_val-7", "refcoco_unc_val-8")]
    lat = res["latency"]
    assert list(lat["splits"]) == ["refcoco_unc_val"] and lat["n"] == len(readable)
    ms = np.array([1000 * model.duration(i) for i in readable])
    assert lat["mean_ms"] == pytest.approx(ms.mean())
    assert lat["p50_ms"] == pytest.approx(np.percentile(ms, 50))
    assert lat["p90_ms"] == pytest.approx(np.percentile(ms, 90))
    assert lat["gpu_mean_ms"] == pytest.approx(2 * ms.mean())
    assert model.calls[-len(readable):] == [[i] for i in readable]
    main_calls = model.calls[: -len(readable)]
    assert all(1 <= len(c) <= 4 for c in main_calls)
    all_ids = [s.id for s in data["refcoco_unc_val"]] + [f"cocoa_val-{i}" for i in range(10)]
    assert [i for c in main_calls for i in c] == [i for i in all_ids if i not in ("refcoco_unc_val-7", "refcoco_unc_val-8")]


def test_resume_after_kill_skips_finished_ids(tmp_path, data):
    out = tmp_path / "run"
    full = evaluate(FakeModel(), data, tmp_path / "clean", batch_size=4, parse_fn=parse, latency_fraction=0.1)

    class Crash(RuntimeError):
        pass

    model = FakeModel()

    def dying(examples):
        if len(model.calls) == 3:
            raise Crash("killed")
        return model(examples)

    with pytest.raises(Crash):
        evaluate(dying, data, out, batch_size=4, parse_fn=parse)
    pred = out / "predictions" / "refcoco_unc_val.jsonl"
    done = [r["id"] for r in read_jsonl(pred)]
    assert len(done) == 12  # 3 batches of 4
    # simulate a kill in the middle of writing the next record
    with open(pred, "a") as fh:
        fh.write('{"id": "refcoco_unc_val-12", "iou": 0.')

    again = FakeModel()
    res = evaluate(again, data, out, batch_size=4, parse_fn=parse, latency_fraction=0)
    regenerated = [i for c in again.calls for i in c]
    assert regenerated == [f"refcoco_unc_val-{k}" for k in range(12, 30)] + [f"cocoa_val-{k}" for k in range(10)]
    recs = read_jsonl(pred)
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)) == 30
    assert all(line.endswith("}") for line in pred.read_text().splitlines())
    assert res["splits"] == full["splits"]
    # a third run has nothing left to generate
    third = FakeModel()
    res3 = evaluate(third, data, out, batch_size=4, parse_fn=parse, latency_fraction=0.1, latency_warmup=0)
    assert len(third.calls) == 3 and all(len(c) == 1 for c in third.calls)  # only the latency pass
    fourth = FakeModel()
    assert evaluate(fourth, data, out, batch_size=4, parse_fn=parse)["latency"]["n"] == res3["latency"]["n"]
    assert fourth.calls == []  # latency records resume too


def test_rerun_retries_image_errors(tmp_path, data):
    """An image restored after a run is evaluated on the rerun, replacing its image_error record
    (before, the failure stayed in the predictions and the metrics forever)."""
    out = tmp_path / "run"
    first = evaluate(FakeModel(), data, out, batch_size=4, parse_fn=parse, latency_fraction=0)
    assert first["splits"]["refcoco_unc_val"]["n_image_failures"] == 2
    Image.new("RGB", (64, 48)).save(tmp_path / "missing.png")  # restore one of the two images
    again = FakeModel()
    res = evaluate(again, data, out, batch_size=4, parse_fn=parse, latency_fraction=0)
    assert again.calls == [["refcoco_unc_val-7"]]  # only the restored one reaches the model
    val = res["splits"]["refcoco_unc_val"]
    assert val["n"] == 30 and val["n_image_failures"] == 1
    assert val["accuracy"] == pytest.approx(expected_val_acc() + 1 / 30)  # 7 % 5 == 2: a success
    recs = read_jsonl(out / "predictions" / "refcoco_unc_val.jsonl")
    assert sorted(r["id"] for r in recs) == sorted(s.id for s in data["refcoco_unc_val"])  # one record per id
    by_id = {r["id"]: r for r in recs}
    assert by_id["refcoco_unc_val-7"]["failure"] is None and by_id["refcoco_unc_val-7"]["success"]
    assert by_id["refcoco_unc_val-8"]["failure"] == "image_error"
    assert not (out / "predictions" / "refcoco_unc_val.jsonl.tmp").exists()


def test_default_parser_and_raising_parser(tmp_path, data):
    """The default parse_fn is egm.answers.parse_answer (0-1000 relative boxes); a raising parser is a failure."""
    from egm.boxes import to_rel1000

    def qwen(examples):
        outs = []
        for e in examples:
            rel = to_rel1000(e["sample"].box, e["width"], e["height"])
            outs.append(GenerationOutput(f'Look left.\n```json\n[{{"bbox_2d": {list(rel)}, "label": "x"}}]\n```', 9))
        return outs

    res = evaluate(qwen, {"cocoa_val": data["cocoa_val"]}, tmp_path / "q", latency_fraction=0.5)
    assert res["splits"]["cocoa_val"]["accuracy"] == 1.0 and res["latency"]["n"] == 5

    def boom(text, w, h):
        raise RuntimeError("bad parser")

    res = evaluate(qwen, {"cocoa_val": data["cocoa_val"]}, tmp_path / "b", parse_fn=boom, latency_fraction=0.1)
    assert res["splits"]["cocoa_val"]["accuracy"] == 0.0 and res["splits"]["cocoa_val"]["parse_failure_rate"] == 1.0
    assert read_jsonl(tmp_path / "b" / "predictions" / "cocoa_val.jsonl")[0]["failure"] == "parse_error"
