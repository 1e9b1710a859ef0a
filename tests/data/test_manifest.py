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
    with pytest.raises(ManifestError, match=r"m.jsonl:3: field 'id': duplicate id 'a' \(first on line 1\)"):
        read_manifest(_write(tmp_path / "m.jsonl", [_line(), _line(id="b"), _line()]))


BIG = "9" * 400


@pytest.mark.parametrize(
    "raw, msg",
    [
        (b'{"id": "\xff"}', r"not UTF-8: byte 0xff at column 9"),
        (b"[" * 100_000, r"invalid JSON: nested too deeply"),
        (b'{"id": ' + b"7" * 5000 + b"}", r"invalid JSON: Exceeds the limit"),
    ],
    ids=["not_utf8", "deep_nesting", "5000_digits"],
)
def test_unreadable_line_names_file_and_line(tmp_path, raw, msg):
    p = tmp_path / "m.jsonl"
    p.write_bytes(json.dumps(_line(id="ok")).encode() + b"\n" + raw + b"\n")
    with pytest.raises(ManifestError, match=rf"m.jsonl:2: {msg}") as e:
        read_manifest(p)
    assert e.value.line == 2 and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "obj, field, msg",
    [
        (_line(width=int(BIG)), "width", r"must be an integer in \[1, 65536\], got 9999"),
        (_line(height=-80), "height", "must be an integer"),
        (_line(box=[0, 0, int(BIG), 40]), "box", r"coordinate 2 must be a finite number, got 9999.*\.\.\."),
        (_line(box=[0, 0, 1e400, 40]), "box", "coordinate 2 must be a finite number, got inf"),
        (_line(box=[0, 0, True, 40]), "box", "coordinate 2 must be a finite number, got True"),
        (_line(task="amodal", box=[-5000, -5000, 90000, 50]), "box",
         r"leaves the 100x80 image by more than 1x its size .* \[-100, 200\] x \[-80, 160\]"),
        (_line(task="amodal", box=[-101, 0, 50, 50]), "box", "leaves the 100x80 image"),
        (_line(task="amodal", box=[10, 10, 50, 50], visible_box=[200, 200, 300, 300]), "visible_box",
         "lies outside the 100x80 image"),
        (_line(task="amodal", box=[10, 10, 50, 50], visible_box=[60, 60, 90, 70]), "visible_box",
         r"does not overlap box \[10.0, 10.0, 50.0, 50.0\]"),
        (_line(meta=[]), "meta", "must be a JSON object, got list"),
        (_line(meta=0), "meta", "must be a JSON object, got int"),
    ],
)
def test_numbers_bounds_and_meta_are_checked(tmp_path, obj, field, msg):
    p = _write(tmp_path / "bad.jsonl", [_line(id="ok"), obj])
    with pytest.raises(ManifestError, match=rf"bad.jsonl:2: field '{field}': (.* )?{msg}") as e:
        read_manifest(p)
    assert e.value.line == 2 and e.value.field == field and len(str(e.value)) < 400


def test_amodal_box_may_leave_the_frame_within_the_stated_bound(tmp_path):
    ok = _line(task="amodal", box=[-100, -80, 200, 160], visible_box=[0, 0, 100, 80])
    hidden = _line(id="h", task="amodal", box=[-50, 0, 10, 80], visible_box=[0, 0, 0, 0], meta=None)
    got = read_manifest(_write(tmp_path / "m.jsonl", [ok, hidden]))
    assert got[0].box == [-100.0, -80.0, 200.0, 160.0] and got[1].meta == {}


@pytest.mark.parametrize("content", ["", "\n\n", "  \t\n \n"])
def test_empty_manifest_warns(tmp_path, content):
    from egm.data.manifest import EmptyManifestWarning

    p = tmp_path / "empty.jsonl"
    p.write_text(content)
    with pytest.warns(EmptyManifestWarning, match=r"empty.jsonl: no samples"):
        assert read_manifest(p) == []


def test_read_json_names_the_line_of_a_bad_byte_or_token(tmp_path):
    from egm.data.manifest import read_json

    p = tmp_path / "ann.json"
    p.write_bytes(b'{\n "images": [],\n "x": "\xfe"\n}')
    with pytest.raises(ManifestError, match=r"ann.json:3: not UTF-8: byte 0xfe at column 8"):
        read_json(p)
    p.write_text('{\n "images": [\n  1,,\n]}')
    with pytest.raises(ManifestError, match=r"ann.json:3: invalid JSON"):
        read_json(p)
    p.write_text("[" * 100_000)
    with pytest.raises(ManifestError, match=r"ann.json: invalid JSON: nested too deeply"):
        read_json(p)
