"""TAO-Amodal importer: a small amodal_annotations json in the release schema."""

import json
from collections import Counter

import pytest

from egm.data.manifest import ManifestError, read_manifest
from egm.data.tao_amodal import import_tao_amodal, tao_amodal_samples

W, H = 1280, 720


def tao_json():
    ann = dict(image_id=10, video_id=3, category_id=805, area=1.0, amodal_is_uncertain=False)
    return {
        "info": {}, "licenses": [], "videos": [{"id": 3}], "tracks": [],
        "images": [{"id": 10, "video_id": 3, "file_name": "train/ArgoVerse/seq/ring_front_center_1.jpg", "license": 0,
                    "width": W, "height": H, "frame_index": 0}],
        "categories": [{"id": 805, "name": "person"}, {"id": 95, "name": "baseball_bat"}],
        "annotations": [
            # partly out of frame on the left: amodal box clipped, unclipped kept in meta
            {**ann, "id": 1, "track_id": 11, "bbox": [0, 100, 50, 200], "amodal_bbox": [-30, 100, 80, 200],
             "visibility": 0.625, "out_of_frame": True},
            # occluded inside the frame, LVIS name with an underscore
            {**ann, "id": 2, "track_id": 12, "category_id": 95, "bbox": [600, 300, 40, 20],
             "amodal_bbox": [600, 300, 100, 20], "visibility": 0.4},
            # fully invisible: no modal bbox
            {**ann, "id": 3, "track_id": 13, "amodal_bbox": [900, 400, 100, 100], "visibility": 0.0},
            # entirely outside the frame
            {**ann, "id": 4, "track_id": 14, "amodal_bbox": [1300, 10, 50, 50], "visibility": 0.0, "out_of_frame": True},
            # fully visible, no visibility field: computed as IoU(modal, amodal) = 1
            {**ann, "id": 5, "track_id": 15, "bbox": [10, 10, 100, 100], "amodal_bbox": [10, 10, 100, 100]},
        ],
    }


def test_every_field():
    counts = Counter()
    ss = tao_amodal_samples(tao_json(), image_dir="/tao/frames", split="tao_amodal_train", counts=counts,
                            descriptions={"tao_2": "the bat held by the batter"})
    assert counts == {"kept": 3, "skipped_invisible": 1, "skipped_outside": 1}
    a, b, c = ss
    assert a.id == "tao_1" and a.image == "/tao/frames/train/ArgoVerse/seq/ring_front_center_1.jpg"
    assert (a.width, a.height) == (W, H) and a.task == "amodal" and a.source == "tao_amodal"
    assert a.split == "tao_amodal_train" and a.sentence == "person" and a.category == "person"
    assert a.box == [0, 100, 50, 300]  # clipped to the frame
    assert a.visible_box == [0, 100, 50, 300]
    assert a.meta == {"ann_id": 1, "image_id": 10, "track_id": 11, "video_id": 3, "visibility": 0.625,
                      "amodal_box_unclipped": [-30, 100, 50, 300], "out_of_frame": True,
                      "amodal_is_uncertain": False, "described": False}
    assert b.sentence == "the bat held by the batter" and b.category == "baseball bat"
    assert b.box == [600, 300, 700, 320] and b.visible_box == [600, 300, 640, 320]
    assert b.meta["out_of_frame"] is False and b.meta["described"]
    assert c.id == "tao_5" and c.meta["visibility"] == 1.0


def test_keep_invisible_and_visibility_filter():
    ss = tao_amodal_samples(tao_json(), image_dir="", split="s", keep_invisible=True)
    inv = [s for s in ss if s.id == "tao_3"][0]
    assert inv.visible_box == [0, 0, 0, 0] and inv.box == [900, 400, 1000, 500] and inv.meta["visibility"] == 0.0
    counts = Counter()
    ss = tao_amodal_samples(tao_json(), image_dir="", split="s", max_visibility=0.8, counts=counts)
    assert [s.id for s in ss] == ["tao_1", "tao_2"] and counts["skipped_visible"] == 1


def test_errors_name_the_annotation():
    data = tao_json()
    del data["annotations"][1]["amodal_bbox"]
    with pytest.raises(ManifestError, match=r"t\.json: field 'amodal_bbox': annotation #1 \(id 2\): missing"):
        tao_amodal_samples(data, image_dir="", split="s", path="t.json")
    data = tao_json()
    data["annotations"][0]["image_id"] = 99
    with pytest.raises(ManifestError, match="image 99"):
        tao_amodal_samples(data, image_dir="", split="s")


def test_import_roundtrip(tmp_path):
    (tmp_path / "v.json").write_text(json.dumps(tao_json()))
    counts = import_tao_amodal(str(tmp_path / "v.json"), "/f", str(tmp_path / "m.jsonl"))
    assert counts["kept"] == 3
    ss = read_manifest(tmp_path / "m.jsonl")
    assert ss[0].meta["amodal_box_unclipped"] == [-30, 100, 50, 300] and ss[0].split == "tao_amodal_val"


@pytest.mark.parametrize(
    "key, value, field, msg",
    [
        ("amodal_bbox", [float("nan"), 100, 80, 200], "amodal_bbox", "value 0 must be a finite number, got nan"),
        ("amodal_bbox", [0, 100, 10**400, 200], "amodal_bbox", "value 2 must be a finite number"),
        ("amodal_bbox", [-5000, -5000, 95000, 5050], "amodal_bbox", "leaves the 1280x720 image by more than 1x"),
        ("amodal_bbox", [0, 100, -80, 200], "amodal_bbox", "negative width or height"),
        ("amodal_bbox", None, "amodal_bbox", "missing"),
        ("bbox", [0, "100", 50, 200], "bbox", "value 1 must be a finite number, got '100'"),
        ("visibility", 2.0, "visibility", r"must be a number in \[0, 1\], got 2.0"),
        ("visibility", float("nan"), "visibility", "must be a number in"),
        ("bbox", [1000, 600, 50, 50], "visible_box", "does not overlap box"),
    ],
)
def test_bad_annotation_names_file_id_and_field(key, value, field, msg):
    data = tao_json()
    data["annotations"][0][key] = value
    with pytest.raises(ManifestError, match=rf"^t\.json: field '{field}': annotation #0 \(id 1\): .*{msg}") as e:
        tao_amodal_samples(data, image_dir="i", split="s", path="t.json")
    assert "\n" not in str(e.value)


def test_bad_image_size_names_the_image():
    """The image table check is the shared ``images_by_id`` (its cases: tests/data/test_cocoa.py)."""
    data = tao_json()
    data["images"][0]["width"] = "1280"
    with pytest.raises(ManifestError, match=r"t\.json: field 'width': image #0 \(id 10\): must be an integer"):
        tao_amodal_samples(data, image_dir="i", split="s", path="t.json")


def test_import_reads_a_bad_file_with_its_line(tmp_path):
    p = tmp_path / "t.json"
    p.write_text('{"images": [],\n"annotations": [' + "[" * 100_000)
    with pytest.raises(ManifestError, match=r"t\.json: invalid JSON: nested too deeply"):
        import_tao_amodal(str(p), "/img", str(tmp_path / "m.jsonl"))


def test_relative_image_dir_resolves_from_the_manifest(tmp_path, monkeypatch):
    """As for REFER: a relative image_dir is the working directory's, written absolute."""
    (tmp_path / "tao.json").write_text(json.dumps(tao_json()))
    monkeypatch.chdir(tmp_path)
    import_tao_amodal("tao.json", "frames", "out/tao.jsonl", split="tao_amodal_train")
    s = read_manifest("out/tao.jsonl")[0]
    assert s.image == str(tmp_path / "frames/train/ArgoVerse/seq/ring_front_center_1.jpg")
