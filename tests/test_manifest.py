import json

import pytest

from egm.data.manifest import ManifestError, Sample, read_manifest, write_manifest


def _line(**over):
    d = {"id": "a", "image": "img/a.png", "width": 100, "height": 80, "sentence": "the red circle",
         "task": "vanilla", "box": [10, 20, 30, 40], "split": "train", "source": "synthetic"}
    d.update(over)
    return d


def _write(path, objs):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


def test_round_trip_resolves_relative_images(tmp_path):
    samples = [
        Sample(**_line(image=str(tmp_path / "img" / "a.png"), reasoning="because", category="circle")),
        Sample(**_line(id="b", task="amodal", box=[-5, 0, 120, 80], visible_box=[0, 0, 50, 80], meta={"k": 1})),
    ]
    p = tmp_path / "m.jsonl"
    assert write_manifest(p, samples) == 2
    raw = [json.loads(x) for x in p.read_text().splitlines()]
    assert raw[0]["image"] == "img/a.png"  # stored relative to the manifest folder
    assert "visible_box" not in raw[0] and "meta" not in raw[0]
    back = read_manifest(p)
    assert back[0].image == str(tmp_path / "img" / "a.png")
    assert back[0].reasoning == "because" and back[0].category == "circle"
    assert back[1].box == [-5.0, 0.0, 120.0, 80.0] and back[1].visible_box == [0, 0, 50, 80]
    assert back[1].meta == {"k": 1}
    assert not (tmp_path / "m.jsonl.tmp").exists()


@pytest.mark.parametrize(
    "obj, field",
    [
        (_line(width=0), "width"),
        (_line(width=True), "width"),
        (_line(task="segment"), "task"),
        (_line(box=[10, 20, 5, 40]), "box"),  # inverted
        (_line(box=[10, 20, 30]), "box"),
        (_line(box=[0, 0, 130, 40]), "box"),  # vanilla box outside the image
        (_line(box=[0, 0, "1", 40]), "box"),
        (_line(visible_box=[0, 0, 1, 1]), "visible_box"),  # vanilla sample with a visible box
        (_line(sentence=""), "sentence"),
        (_line(reasoning=3), "reasoning"),
        (_line(colour="red"), "colour"),
    ],
)
def test_validation_names_file_line_and_field(tmp_path, obj, field):
    p = _write(tmp_path / "bad.jsonl", [_line(id="ok"), "", obj])
    with pytest.raises(ManifestError) as e:
        read_manifest(p)
    assert e.value.line == 3 and e.value.field == field
    assert f"bad.jsonl:3: field '{field}'" in str(e.value)


def test_missing_field_and_bad_json(tmp_path):
    d = _line()
    del d["split"]
    with pytest.raises(ManifestError, match="field 'split': missing"):
        read_manifest(_write(tmp_path / "m.jsonl", [d]))
    with pytest.raises(ManifestError, match=r"m2.jsonl:2: invalid JSON"):
        read_manifest(_write(tmp_path / "m2.jsonl", [_line(), '{"id": "x",']))


def test_duplicate_ids_rejected(tmp_path):
    with pytest.raises(ManifestError, match="duplicate id 'a'"):
        read_manifest(_write(tmp_path / "m.jsonl", [_line(), _line()]))
