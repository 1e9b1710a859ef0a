"""COCO-Amodal importer: a small COCO_amodal json in the release format (flat polygons, RLE)."""

import json
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
