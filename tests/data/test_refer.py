"""REFER importer: small refs(unc).p + instances.json in the exact release format."""

import json
import pickle
from pathlib import Path

import pytest

from egm.boxes import to_rel1000
from egm.data.manifest import ManifestError, read_manifest
from egm.data.refer import (
    STANDARD_EVAL_SPLITS, TRAIN_SPLIT_SIZES, check_split_sizes, import_refer, load_refer, split_counts,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

# Real record: refcoco refs(unc).p data[0] (MarkHershey/refer README), copied verbatim.
REF0 = {
    "sent_ids": [0, 1, 2],
    "file_name": "COCO_train2014_000000581857_16.jpg",
    "ann_id": 1719310,
    "ref_id": 0,
    "image_id": 581857,
    "split": "train",
    "sentences": [
        {"tokens": ["the", "lady", "with", "the", "blue", "shirt"], "raw": "THE LADY WITH THE BLUE SHIRT", "sent_id": 0, "sent": "the lady with the blue shirt"},
        {"tokens": ["lady", "with", "back", "to", "us"], "raw": "lady w back to us", "sent_id": 1, "sent": "lady with back to us"},
        {"tokens": ["blue", "shirt"], "raw": "blue shirt", "sent_id": 2, "sent": "blue shirt"},
    ],
    "category_id": 1,
}
# Real records: refcoco instances.json images[0] and annotations[0].
IMAGE_98304 = {"license": 1, "file_name": "COCO_train2014_000000098304.jpg", "coco_url": "http://mscoco.org/images/98304", "height": 424, "width": 640, "date_captured": "2013-11-21 23:06:41", "flickr_url": "http://farm6.staticflickr.com/5062/5896644212_a326e96ea9_z.jpg", "id": 98304}
ANN_3007 = {"segmentation": [[267.52, 229.75, 265.6, 226.68, 265.79, 223.6, 263.87, 220.15, 263.87, 216.88, 266.94, 217.07, 268.48, 221.3, 272.32, 219.95, 276.35, 220.15, 279.62, 218.03, 283.46, 218.42, 285.0, 220.92, 285.0, 223.22, 284.42, 224.95, 280.96, 225.14, 279.81, 226.48, 281.73, 228.41, 279.43, 229.37, 275.78, 229.17, 273.86, 229.56, 274.24, 232.05, 269.82, 231.67, 267.14, 231.48, 266.75, 228.6]], "area": 197.29899999999986, "iscrowd": 0, "image_id": 98304, "bbox": [263.87, 216.88, 21.13, 15.17], "category_id": 18, "id": 3007}
# Derived facts for ref 0 (fixture refer_refs_unc_sample.json).
IMAGE_581857 = {"license": 1, "file_name": "COCO_train2014_000000581857.jpg", "height": 640, "width": 427, "id": 581857}
ANN_1719310 = {"segmentation": [[103.93, 299.99, 238.15, 299.99, 238.15, 477.41, 103.93, 477.41]], "area": 23813.0, "iscrowd": 0, "image_id": 581857, "bbox": [103.93, 299.99, 134.22, 177.42], "category_id": 1, "id": 1719310}
# A made-up ref in the same format, on the real image 98304, in split testA.
REF1 = {"sent_ids": [7, 8], "file_name": "COCO_train2014_000000098304_3007.jpg", "ann_id": 3007, "ref_id": 5,
        "image_id": 98304, "split": "testA", "category_id": 18,
        "sentences": [{"tokens": ["small", "dog"], "raw": "Small dog", "sent_id": 7, "sent": "small dog"},
                      {"tokens": ["dog"], "raw": "dog", "sent_id": 8, "sent": "dog"}]}


def write_refer(root: Path, dataset="refcoco", split_by="unc", refs=(REF0, REF1)):
    d = root / dataset
    d.mkdir(parents=True)
    with open(d / f"refs({split_by}).p", "wb") as fh:
        pickle.dump(list(refs), fh, protocol=2)  # the release was written by Python 2
    instances = {"info": {}, "licenses": [], "images": [IMAGE_98304, IMAGE_581857],
                 "annotations": [ANN_3007, ANN_1719310],
                 "categories": [{"supercategory": "person", "id": 1, "name": "person"},
                                {"supercategory": "animal", "id": 18, "name": "dog"}]}
    (d / "instances.json").write_text(json.dumps(instances))


def test_ref0_every_field(tmp_path):
    write_refer(tmp_path)
    samples = load_refer(tmp_path, "refcoco", "unc", image_dir="/coco/train2014")
    assert [s.id for s in samples] == ["refcoco_unc_0", "refcoco_unc_1", "refcoco_unc_2", "refcoco_unc_7", "refcoco_unc_8"]
    s = samples[0]
    assert s.sentence == "the lady with the blue shirt"
    assert s.image == "/coco/train2014/COCO_train2014_000000581857.jpg"  # not the ref's file_name
    assert (s.width, s.height) == (427, 640)
    assert s.box == pytest.approx([103.93, 299.99, 238.15, 477.41], abs=1e-9)
    assert to_rel1000(s.box, s.width, s.height) == (243, 469, 558, 746)  # InternVL doc value
    assert s.task == "vanilla" and s.visible_box is None and s.reasoning is None
    assert s.split == "refcoco_unc_train" and s.source == "refcoco" and s.category == "person"
    assert s.meta == {"ref_id": 0, "ann_id": 1719310, "image_id": 581857, "sent_id": 0}
    assert [x.sentence for x in samples[1:3]] == ["lady with back to us", "blue shirt"]
    assert all(x.box == s.box and x.meta["ref_id"] == 0 for x in samples[:3])
    d = samples[3]
    assert d.image.endswith("COCO_train2014_000000098304.jpg") and (d.width, d.height) == (640, 424)
    assert d.box == pytest.approx([263.87, 216.88, 285.0, 232.05])
    assert d.split == "refcoco_unc_testA" and d.category == "dog"
    assert d.meta == {"ref_id": 5, "ann_id": 3007, "image_id": 98304, "sent_id": 7}


def test_import_writes_split_manifests_and_default_image_dir(tmp_path):
    write_refer(tmp_path / "data")
    write_refer(tmp_path / "data", dataset="refcocog", split_by="umd", refs=[{**REF1, "split": "test"}])
    out = import_refer(str(tmp_path / "data"), str(tmp_path / "out"))
    assert set(out) == {"refcoco_unc_train", "refcoco_unc_testA", "refcocog_umd_test"}
    train = read_manifest(out["refcoco_unc_train"])
    assert len(train) == 3
    assert train[0].image == str(tmp_path / "data/images/mscoco/images/train2014/COCO_train2014_000000581857.jpg")
    g = read_manifest(out["refcocog_umd_test"])
    assert [s.id for s in g] == ["refcocog_umd_7", "refcocog_umd_8"] and g[0].source == "refcocog"


def test_split_filter_and_missing_annotation_names_the_ref(tmp_path):
    write_refer(tmp_path)
    assert [s.id for s in load_refer(tmp_path, splits=["testA"])] == ["refcoco_unc_7", "refcoco_unc_8"]
    bad = tmp_path / "bad"
    write_refer(bad, refs=[REF0, {**REF1, "ann_id": 999}])
    with pytest.raises(ManifestError, match=r"refs\(unc\)\.p.*ref_id 5.*annotation 999"):
        load_refer(bad)
    with pytest.raises(FileNotFoundError, match="refs"):
        load_refer(tmp_path / "nowhere")


def test_split_sizes_check():
    good = {k: dict(v) for k, v in STANDARD_EVAL_SPLITS.items()}
    assert check_split_sizes(good) == []
    good["refcoco_unc_testB"]["expressions"] = 5094
    del good["refcocog_umd_test"]
    problems = check_split_sizes(good)
    assert problems == ["refcoco_unc_testB: expressions = 5094, expected 5095",
                        "refcocog_umd_test: missing (expected 9602)"]


def test_split_counts(tmp_path):
    write_refer(tmp_path)
    c = split_counts(load_refer(tmp_path))
    assert c == {"refcoco_unc_train": {"refs": 1, "images": 1, "expressions": 3},
                 "refcoco_unc_testA": {"refs": 1, "images": 1, "expressions": 2}}


def test_embedded_sizes_match_fixture():
    fx = json.loads((FIXTURES / "refcoco_split_sizes.json").read_text())
    table = {f"{e['dataset']}_{e['splitBy']}_{e['split']}": {k: e[k] for k in ("refs", "images", "expressions")}
             for e in fx["eval_splits"]}
    assert table == STANDARD_EVAL_SPLITS
    assert {f"{k}_train": v for k, v in fx["train"].items()} == TRAIN_SPLIT_SIZES
    ref = json.loads((FIXTURES / "refer_refs_unc_sample.json").read_text())
    assert ref["refs"][0] == REF0
    inst = json.loads((FIXTURES / "refer_instances_sample.json").read_text())
    assert inst["images"][0] == IMAGE_98304 and inst["annotations"][0] == ANN_3007


def _write_instances(tmp_path, mutate):
    write_refer(tmp_path)
    path = tmp_path / "refcoco" / "instances.json"
    inst = json.loads(path.read_text())
    mutate(inst)
    path.write_text(json.dumps(inst))
    return path


@pytest.mark.parametrize(
    "mutate, where, field, msg",
    [
        (lambda d: d["annotations"][1].__setitem__("bbox", [float("nan"), 299.99, 134.22, 177.42]),
         "instances.json: field 'bbox': annotation 1719310 \\(of ref_id 0\\)", "bbox", "4 finite numbers"),
        (lambda d: d["annotations"][1].__setitem__("bbox", [103.93, 299.99, 1e6, 177.42]),
         r"refs\(unc\).p: field 'box': ref #0 \(ref_id 0\) sentence 0", "box", "lies outside the 427x640 image"),
        (lambda d: d["images"][1].__setitem__("height", -640),
         r"instances.json: field 'height': image #1 \(id 581857\)", "height", "must be an integer"),
    ],
)
def test_bad_instances_name_file_record_and_field(tmp_path, mutate, where, field, msg):
    _write_instances(tmp_path, mutate)
    with pytest.raises(ManifestError, match=rf"{where}: .*{msg}") as e:
        load_refer(tmp_path, "refcoco", "unc")
    assert e.value.field == field


def test_empty_sentence_names_the_ref(tmp_path):
    bad = {**REF0, "sentences": [{**REF0["sentences"][0], "sent": ""}]}
    write_refer(tmp_path, refs=(bad,))
    with pytest.raises(ManifestError, match=r"field 'sentence': ref #0 \(ref_id 0\) sentence 0: must be a non-empty"):
        load_refer(tmp_path, "refcoco", "unc")


def test_instances_with_bad_bytes_name_file_and_line(tmp_path):
    write_refer(tmp_path)
    path = tmp_path / "refcoco" / "instances.json"
    path.write_bytes(b'{"images": [\n\n\x80]}')
    with pytest.raises(ManifestError, match=r"instances.json:3: not UTF-8: byte 0x80 at column 1"):
        load_refer(tmp_path, "refcoco", "unc")


def test_relative_image_dir_resolves_from_the_manifest(tmp_path, monkeypatch):
    """A relative --image_dir is relative to the working directory; the manifest reader resolves a
    relative path against the manifest's folder, so the importer writes it absolute."""
    write_refer(tmp_path / "data" / "refer")
    monkeypatch.chdir(tmp_path)
    out = import_refer("data/refer", "data/refcoco", image_dir="data/coco/train2014")
    s = read_manifest(out["refcoco_unc_train"])[0]
    assert s.image == str(tmp_path / "data/coco/train2014/COCO_train2014_000000581857.jpg")
