"""Synthetic world: determinism, exact boxes against rendered pixels, expressions, idempotence."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from egm.data.manifest import read_manifest
from egm.data.synthetic import (
    COLOURS, DIFFICULTIES, MIN_OBJECTS, SIZES, Layout, make_scene, make_synthetic, object_mask, resolve, sample_rng,
)

N_TRAIN, N_VAL, N_TEST = 30, 50, 10


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    return out, make_synthetic(str(out), n_train=N_TRAIN, n_val=N_VAL, n_test=N_TEST, seed=3)


def _bbox(mask):  # independent of egm.data.synthetic.mask_box
    rows, cols = np.where(mask.any(1))[0], np.where(mask.any(0))[0]
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_splits_and_sizes(world):
    out, paths = world
    assert set(paths) == {"train", "val", "test"} | {f"{s}_{d}" for s in ("train", "val", "test") for d in DIFFICULTIES}
    val = read_manifest(paths["val"])
    assert len(read_manifest(paths["train"])) == N_TRAIN and len(val) == N_VAL
    for d in DIFFICULTIES:
        sub = read_manifest(paths[f"val_{d}"])
        assert len(sub) == N_VAL // len(DIFFICULTIES)
        assert {s.meta["difficulty"] for s in sub} == {d} and {s.split for s in sub} == {f"val_{d}"}
        assert {s.task for s in sub} == {"amodal" if d == "amodal" else "vanilla"}
    line = (out / "val.jsonl").read_text().splitlines()[0]
    assert json.loads(line)["image"].startswith("images/val/")  # manifests move with their images


def test_boxes_exact_against_pixels(world):
    _, paths = world
    samples = read_manifest(paths["val"]) + read_manifest(paths["train"])
    for s in samples:
        img = np.asarray(Image.open(s.image).convert("RGB"))
        assert img.shape == (s.height, s.width, 3)
        objs = s.meta["objects"]
        assert 2 <= len(objs) <= 5
        for o in objs:  # each object's mask rendered alone gives its box
            m = object_mask(o, s.width)
            assert _bbox(m) == o["box"]
            assert min(o["box"][2] - o["box"][0], o["box"][3] - o["box"][1]) >= 0.15 * s.width
        t = objs[s.meta["target"]]
        full = object_mask(t, s.width)
        assert s.box == _bbox(full)
        # pixels of the target's colour around its box = exactly what is visible of it
        x1, y1, x2, y2 = (int(v) for v in s.box)
        win = np.zeros(full.shape, bool)
        win[max(0, y1 - 2):y2 + 2, max(0, x1 - 2):x2 + 2] = True
        coloured = (img == COLOURS[t["colour"]]).all(-1) & win
        assert (coloured <= full).all()  # no stray pixel of that colour next to it
        if s.task == "vanilla":
            assert (coloured == full).all() and s.visible_box is None
        else:
            assert s.visible_box == _bbox(coloured)
            occ = object_mask(objs[s.meta["occluder"]], s.width)
            assert (coloured == (full & ~occ)).all()
            hidden = 1 - coloured.sum() / full.sum()
            assert 0.15 <= hidden <= 0.6
            v = s.visible_box
            assert max(v[0] - s.box[0], v[1] - s.box[1], s.box[2] - v[2], s.box[3] - v[3]) >= 2


def test_expressions_resolve_to_the_target(world):
    _, paths = world
    patterns = {
        "plain": r"the (circle|square|triangle)",
        "attribute": r"the (red|green|blue|yellow|small|large) (circle|square|triangle)",
        "ordinal": r"the (first|second|third|fourth) (circle|square|triangle) from the (left|right|top|bottom)",
        "relation": r"the (circle|square|triangle) (left of|right of|above|below) the (red|green|blue|yellow) (circle|square|triangle)",
        "amodal": r"the (red|green|blue|yellow) (circle|square|triangle)",
    }
    for s in read_manifest(paths["val"]) + read_manifest(paths["train"]):
        d = s.meta["difficulty"]
        assert re.fullmatch(patterns[d], s.sentence), (d, s.sentence)
        assert resolve(s.meta["expression"], s.meta["objects"]) == [s.meta["target"]]
        assert s.category == s.meta["objects"][s.meta["target"]]["shape"]
        if d in ("attribute", "ordinal", "relation"):  # several similar candidates (COMPLEX_PROMPT)
            assert sum(o["shape"] == s.category for o in s.meta["objects"]) >= 2
        if d == "ordinal":  # the candidates are identical: only their rank tells them apart
            cands = {(o["colour"], o["size"]) for o in s.meta["objects"] if o["shape"] == s.category}
            assert len(cands) == 1
        assert s.reasoning and 10 <= len(s.reasoning.split()) <= 60


def test_deterministic_bytes(tmp_path):
    a = make_synthetic(str(tmp_path / "a"), n_train=8, n_val=5, n_test=5, seed=7)
    b = make_synthetic(str(tmp_path / "b"), n_train=8, n_val=5, n_test=5, seed=7)
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    c = make_synthetic(str(tmp_path / "c"), n_train=8, n_val=5, n_test=5, seed=8)
    assert Path(a["train"]).read_bytes() == Path(b["train"]).read_bytes() != Path(c["train"]).read_bytes()
    # a sample depends on (seed, split, index) only, not on the split sizes
    d = make_synthetic(str(tmp_path / "d"), n_train=3, n_val=5, n_test=5, seed=7)
    assert Path(d["train"]).read_text().splitlines() == Path(a["train"]).read_text().splitlines()[:3]


def test_idempotent_and_config_change(tmp_path):
    p = make_synthetic(str(tmp_path), n_train=4, n_val=5, n_test=5)
    before = {f: f.stat().st_mtime_ns for f in tmp_path.rglob("*") if f.is_file()}
    assert make_synthetic(str(tmp_path), n_train=4, n_val=5, n_test=5) == p
    assert {f: f.stat().st_mtime_ns for f in tmp_path.rglob("*") if f.is_file()} == before
    make_synthetic(str(tmp_path), n_train=2, n_val=5, n_test=5, image_size=96)
    assert len(list((tmp_path / "images" / "train").iterdir())) == 2  # stale images removed
    s = read_manifest(p["train"])[0]
    assert (s.width, s.height) == (96, 96) and Image.open(s.image).size == (96, 96)
    assert json.loads((tmp_path / "synthetic_config.json").read_text())["image_size"] == 96


def test_options_and_errors(tmp_path):
    p = make_synthetic(str(tmp_path), n_train=20, n_val=4, n_test=2, difficulties=["ordinal", "amodal"],
                       amodal_fraction=1.0)
    assert {s.meta["difficulty"] for s in read_manifest(p["train"])} == {"amodal"}
    assert set(p) == {"train", "val", "test", "train_ordinal", "train_amodal", "val_ordinal", "val_amodal",
                      "test_ordinal", "test_amodal"}
    train = read_manifest(p["train"])
    for d in ("ordinal", "amodal"):  # per-difficulty training manifests: the train samples of d, still "train"
        assert [s.id for s in read_manifest(p[f"train_{d}"])] == [s.id for s in train if s.meta["difficulty"] == d]
        assert {s.split for s in read_manifest(p[f"train_{d}"])} <= {"train"}  # (train_ordinal is empty here)
    assert len(read_manifest(p["train_amodal"])) == 20
    with pytest.raises(ValueError, match="unknown difficulties"):
        make_synthetic(str(tmp_path / "x"), difficulties=["hard"])
    with pytest.raises(ValueError, match="amodal_fraction"):
        make_synthetic(str(tmp_path / "x"), amodal_fraction=1.5)


@pytest.mark.parametrize("size", [64, 128, 224])
def test_scenes_at_other_sizes(size):
    for d in DIFFICULTIES:
        for i in range(5):
            sc = make_scene(sample_rng(0, "x", i), d, size)
            assert resolve(sc.expression, sc.objects) == [sc.target]
            assert all(o.side == max(4, round(SIZES[o.size] * size)) for o in sc.objects)


def test_grid_layout_centres_objects_in_cells(tmp_path):
    """``grid=4``: every non-occluding object sits centred in one 32-px cell; boxes stay exact."""
    paths = make_synthetic(str(tmp_path), n_train=20, n_val=10, n_test=5, seed=1, grid=4)
    assert json.loads((tmp_path / "synthetic_config.json").read_text())["grid"] == 4
    for s in read_manifest(paths["train"]) + read_manifest(paths["val"]):
        img = np.asarray(Image.open(s.image).convert("RGB"))
        for i, o in enumerate(s.meta["objects"]):
            assert _bbox(object_mask(o, s.width)) == o["box"]
            if i == s.meta.get("occluder"):
                continue  # the occluder is placed freely over part of the target
            assert o["side"] in (19, 29)  # 0.6 / 0.9 of a 32-px cell
            for lo in (o["x0"], o["y0"]):
                assert lo % 32 == (32 - o["side"]) // 2
        t = s.meta["objects"][s.meta["target"]]
        assert s.box == _bbox(object_mask(t, s.width))
        assert img.shape == (128, 128, 3)


def test_layout_scales_objects_and_caps_their_number(tmp_path):
    """``object_scale`` / ``max_objects`` (the CPU demo's world): sides scaled, at most
    ``max(max_objects, MIN_OBJECTS[difficulty])`` objects, every expression still unique."""
    paths = make_synthetic(str(tmp_path), n_train=40, n_val=10, n_test=5, seed=2, object_scale=1.6, max_objects=1)
    cfg = json.loads((tmp_path / "synthetic_config.json").read_text())
    assert cfg["object_scale"] == 1.6 and cfg["max_objects"] == 1 and "grid" not in cfg
    seen = set()
    for s in read_manifest(paths["train"]):
        d = s.meta["difficulty"]
        objs = s.meta["objects"]
        assert len(objs) <= MIN_OBJECTS[d]
        seen.add((d, len(objs)))
        for o in objs:  # 0.20 * 1.6 * 128 = 41 px, 0.34 * 1.6 * 128 = 70 px
            assert o["side"] == {"small": 41, "large": 70}[o["size"]]
            assert _bbox(object_mask(o, s.width)) == o["box"]
        assert resolve(s.meta["expression"], objs) == [s.meta["target"]]
    assert ("plain", 1) in seen and ("relation", 3) in seen
    # the default world is unchanged by the new knobs: no layout keys in its config
    make_synthetic(str(tmp_path / "std"), n_train=4, n_val=5, n_test=5)
    assert not {"object_scale", "max_objects", "grid"} & set(json.loads((tmp_path / "std" / "synthetic_config.json").read_text()))


@pytest.mark.parametrize("kw, match", [({"object_scale": 3.0}, "object_scale"), ({"max_objects": 0}, "max_objects"),
                                       ({"grid": -1}, "grid")])
def test_layout_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        Layout(**kw)
