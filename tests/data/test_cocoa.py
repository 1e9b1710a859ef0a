"""COCO-Amodal importer: a small COCO_amodal json in the release format (flat polygons, RLE)."""

import json
import re
from collections import Counter

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from egm.data.cocoa import cocoa_samples, import_cocoa, polygon_box, rle_box
from egm.data.manifest import ManifestError, read_manifest

H, W = 480, 640


def rle_of(x1, y1, x2, y2, compressed=True):
    m = np.zeros((H, W), np.uint8, order="F")
    m[y1:y2, x1:x2] = 1
    r = mask_utils.encode(m)
    if compressed:
        return {"size": r["size"], "counts": r["counts"].decode("ascii")}  # as stored in json
    flat = m.flatten(order="F")  # uncompressed RLE: run lengths, starting with zeros
    runs, cur, n = [], 0, 0
    for v in flat:
        if v == cur:
            n += 1
        else:
            runs.append(n)
            cur, n = v, 1
    runs.append(n)
    return {"size": [H, W], "counts": runs}


def rect(x1, y1, x2, y2):
    return [x1, y1, x2, y1, x2, y2, x1, y2]  # ONE flat list, as in COCO-Amodal


def cocoa_json():
    regions = [
        {"segmentation": rect(100, 50, 300, 200), "name": "sandwich", "area": 30000.0, "isStuff": 0, "order": 1,
         "occlude_rate": 0.0},
        {"segmentation": rect(250, 100, 500, 400), "name": "container", "area": 75000.0, "isStuff": 0, "order": 2,
         "occlude_rate": 0.2, "visible_mask": rle_of(300, 100, 500, 400), "invisible_mask": rle_of(250, 100, 300, 200)},
        {"segmentation": rect(120, 60, 180, 120), "name": "hot dog", "area": 3600.0, "isStuff": 0, "order": 3,
         "occlude_rate": 1.0, "visible_mask": rle_of(0, 0, 0, 0), "invisible_mask": rle_of(120, 60, 180, 120)},
        {"segmentation": rect(0, 300, 640, 480), "name": "table", "area": 115200.0, "isStuff": 1, "order": 4,
         "occlude_rate": 0.5, "visible_mask": rle_of(0, 400, 640, 480, compressed=False)},
    ]
    return {
        "images": [{"id": 321, "file_name": "COCO_train2014_000000000321.jpg", "height": H, "width": W, "license": 1,
                    "coco_url": "", "flickr_url": "", "date_captured": ""}],
        "annotations": [{"id": 7, "image_id": 321, "author": "ash2", "url": "", "size": len(regions),
                         "depth_constraint": "1-2,1-3,2-4", "regions": regions}],
    }


def test_boxes_from_polygon_and_rle():
    assert polygon_box(rect(100, 50, 300, 200), H, W) == [100, 50, 300, 200]
    assert rle_box(rle_of(300, 100, 500, 400), H, W) == [300, 100, 500, 400]
    assert rle_box(rle_of(0, 400, 640, 480, compressed=False), H, W) == [0, 400, 640, 480]
    assert rle_box(rle_of(0, 0, 0, 0), H, W) == [0, 0, 0, 0]


def test_every_field():
    counts = Counter()
    ss = cocoa_samples(cocoa_json(), image_dir="/cocoa/train2014", split="cocoa_train",
                       descriptions={"cocoa_321_1": "the container behind the sandwich"}, counts=counts)
    assert [s.id for s in ss] == ["cocoa_321_0", "cocoa_321_1", "cocoa_321_3"]
    assert counts == {"kept": 3, "skipped_invisible": 1}
    a, b, t = ss
    assert a.image == "/cocoa/train2014/COCO_train2014_000000000321.jpg" and (a.width, a.height) == (W, H)
    assert a.task == "amodal" and a.source == "cocoa" and a.split == "cocoa_train"
    assert a.sentence == "sandwich" and a.category == "sandwich"
    assert a.box == [100, 50, 300, 200] and a.visible_box == a.box  # not occluded: visible = amodal
    assert a.meta == {"image_id": 321, "ann_id": 7, "region_index": 0, "order": 1, "occlude_rate": 0.0,
                      "is_stuff": False, "described": False}
    assert b.sentence == "the container behind the sandwich" and b.category == "container"
    assert b.box == [250, 100, 500, 400] and b.visible_box == [300, 100, 500, 400]
    assert b.meta["described"] and b.meta["occlude_rate"] == 0.2
    assert t.box == [0, 300, 640, 480] and t.visible_box == [0, 400, 640, 480] and t.meta["is_stuff"]


def test_switches():
    ss = cocoa_samples(cocoa_json(), image_dir="i", split="s", keep_invisible=True, include_stuff=False)
    assert [s.id for s in ss] == ["cocoa_321_0", "cocoa_321_1", "cocoa_321_2"]
    assert ss[2].visible_box == [0, 0, 0, 0] and ss[2].box == [120, 60, 180, 120]
    ss = cocoa_samples(cocoa_json(), image_dir="i", split="s", descriptions={"cocoa_321_3": "the wooden table"},
                       only_described=True)
    assert [(s.id, s.sentence) for s in ss] == [("cocoa_321_3", "the wooden table")]


def test_bad_polygon_names_the_region():
    data = cocoa_json()
    data["annotations"][0]["regions"][1]["segmentation"] = [rect(1, 1, 5, 5)]  # list of lists: wrong format
    with pytest.raises(ManifestError, match=r"a\.json: field 'segmentation': annotation #0 region #1 \(cocoa_321_1\)"):
        cocoa_samples(data, image_dir="i", split="s", path="a.json")


def test_import_roundtrip(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(cocoa_json()))
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "cocoa_321_0", "sentence": "the sandwich in front"}) + "\n")
    counts = import_cocoa(str(tmp_path / "a.json"), "/img", str(tmp_path / "m.jsonl"), split="cocoa_val",
                          descriptions=str(tmp_path / "d.jsonl"))
    assert counts == {"kept": 3, "skipped_invisible": 1}
    ss = read_manifest(tmp_path / "m.jsonl")
    assert ss[0].sentence == "the sandwich in front" and ss[1].visible_box == [300, 100, 500, 400]
    (tmp_path / "d.json").write_text(json.dumps({"cocoa_321_1": "the box"}))
    import_cocoa(str(tmp_path / "a.json"), "/img", str(tmp_path / "m2.jsonl"), descriptions=str(tmp_path / "d.json"))
    assert read_manifest(tmp_path / "m2.jsonl")[1].sentence == "the box"


# --- bad input: every number checked before pycocotools, errors name file, annotation, field ---


def _bad(mutate):
    data = cocoa_json()
    mutate(data, data["annotations"][0]["regions"])
    return data


@pytest.mark.parametrize(
    "mutate, field, msg",
    [
        (lambda d, r: r[0].__setitem__("segmentation", [1, 2, float("nan"), 4, 5, 6, 7, 8]), "segmentation",
         "coordinate 2 must be a finite number, got nan"),
        (lambda d, r: r[0].__setitem__("segmentation", [1, 2, 3, float("inf"), 5, 6]), "segmentation",
         "coordinate 3 must be a finite number, got inf"),
        (lambda d, r: r[0].__setitem__("segmentation", [1, 2, "3", 4, 5, 6]), "segmentation",
         "coordinate 2 must be a finite number, got '3'"),
        (lambda d, r: r[0].__setitem__("segmentation", [1, 2, 3, 4, 5, 6, 7]), "segmentation", "even number"),
        (lambda d, r: r[0].__setitem__("segmentation", [1, 2, 1e9, 4, 5, 6]), "segmentation",
         "coordinate 2 = 1e\\+09 is more than 1x the image size outside the 640x480 image"),
        (lambda d, r: r[0].pop("name"), "name", "must be a non-empty string, got None"),
        (lambda d, r: r[0].__setitem__("occlude_rate", float("nan")), "occlude_rate", "must be a number in"),
        (lambda d, r: r[1].__setitem__("visible_mask", {"size": [H, W], "counts": "zzz"}), "visible_mask",
         "malformed RLE: character 'z' at 0 is not in the RLE alphabet"),
        (lambda d, r: r[1].__setitem__("visible_mask", {"size": [H, W], "counts": "123"}), "visible_mask",
         f"malformed RLE: run lengths sum to 6, not 480x640 = {H * W} pixels"),
        (lambda d, r: r[1].__setitem__("visible_mask", {"size": [H, W], "counts": "0P"}), "visible_mask",
         "ends inside a run length"),
        (lambda d, r: r[1].__setitem__("visible_mask", rle_of(1, 1, 5, 5) | {"size": [W, H]}), "visible_mask",
         "size \\[640, 480\\] is not the image's \\[480, 640\\]"),
        (lambda d, r: r[1].__setitem__("visible_mask", {"size": [H, W], "counts": [H * W - 5, 10]}), "visible_mask",
         "run lengths sum to"),
        (lambda d, r: r[1].__setitem__("visible_mask", {"size": [H, W], "counts": [-5, H * W + 5]}), "visible_mask",
         "negative run length"),
        (lambda d, r: r[1].__setitem__("visible_mask", rle_of(600, 420, 640, 480)), "visible_box",
         "does not overlap box"),
    ],
)
def test_bad_region_names_file_annotation_id_and_field(mutate, field, msg):
    with pytest.raises(ManifestError) as e:
        cocoa_samples(_bad(mutate), image_dir="i", split="s", path="a.json")
    assert e.value.field == field
    assert "\n" not in str(e.value)
    assert re.search(rf"^a\.json: field '{field}': annotation #0 region #\d \(cocoa_321_\d\), annotation id 7: .*{msg}",
                     str(e.value)), str(e.value)


@pytest.mark.parametrize("field, value", [("height", -480), ("width", 0), ("height", 10**400), ("width", 640.5)])
def test_bad_image_size_names_the_image(field, value):
    data = cocoa_json()
    data["images"][0][field] = value
    with pytest.raises(ManifestError, match=rf"a\.json: field '{field}': image #0 \(id 321\): must be an integer"):
        cocoa_samples(data, image_dir="i", split="s", path="a.json")


def test_nan_polygon_fails_in_one_line_under_1gb(tmp_path):
    """``egm import-cocoa`` on a NaN polygon: exit 1 and one stderr line naming file and annotation
    id, inside a 1 GiB address-space limit (before: 24 GB, killed; under 3 GB: a segfault)."""
    import os
    import resource
    import subprocess
    import sys

    data = cocoa_json()
    data["annotations"][0]["regions"][2]["segmentation"] = [120, 60, float("nan"), 60, 180, 120, 120, 120]
    ann = tmp_path / "COCO_amodal_val2014.json"
    ann.write_text(json.dumps(data))  # json writes the NaN as the literal NaN, as Python's json.dump does

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "egm.cli", "import-cocoa", "--annotation_json", str(ann), "--image_dir", "/img",
         "--out", str(tmp_path / "m.jsonl")],
        capture_output=True, text=True, preexec_fn=limit, env=env, timeout=120,
    )
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(ann) in lines[0] and "annotation id 7" in lines[0] and "field 'segmentation'" in lines[0]
    assert "coordinate 2 must be a finite number, got nan" in lines[0]
    assert not (tmp_path / "m.jsonl").exists()


def test_import_reads_bad_bytes_with_file_and_line(tmp_path):
    ann = tmp_path / "a.json"
    ann.write_bytes(b'{"images": [],\n "annotations": [\xff]}')
    with pytest.raises(ManifestError, match=r"a\.json:2: not UTF-8: byte 0xff"):
        import_cocoa(str(ann), "/img", str(tmp_path / "m.jsonl"))


def test_check_rle_accepts_what_pycocotools_encodes():
    """Random masks (several runs, long counts) encoded by pycocotools pass the checks unchanged."""
    from egm.data.cocoa import check_rle

    rng = np.random.default_rng(0)
    for _ in range(20):
        m = np.asfortranarray((rng.random((H, W)) < rng.uniform(0.001, 0.9)).astype(np.uint8))
        r = mask_utils.encode(m)
        stored = {"size": r["size"], "counts": r["counts"].decode("ascii")}
        checked = check_rle(stored, H, W)
        assert checked["counts"] == r["counts"]
        assert mask_utils.area(checked) == m.sum()
