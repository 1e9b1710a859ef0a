"""The synthetic grounding world: seeded scenes that let EGM run and *learn* on a CPU.

Scenes are a plain background with 2-5 similar objects (shape circle/square/triangle, colour
red/green/blue/yellow, size small/large) and one referring expression per image, in the
``COMPLEX_PROMPT`` families of the paper's Figure 2, each a named difficulty:

============  ===========================================  =====================================
difficulty    example                                      what singles the target out
============  ===========================================  =====================================
plain         "the circle"                                 its shape is unique in the scene
attribute     "the red circle", "the large square"         one attribute among same-shape objects
ordinal       "the second circle from the left"            its rank among identical objects
relation      "the square left of the red circle"          its position relative to an anchor
amodal        "the red circle" (partly hidden)             amodal task: another object covers it
============  ===========================================  =====================================

Boxes are *exact*: every object is rasterised into its own mask (PIL, no anti-aliasing) and its
box is the pixel extent of that mask in continuous ``xyxy`` coordinates (pixel ``i`` covers
``[i, i + 1)``). Objects of vanilla scenes never overlap, so box = visible box. In amodal scenes
one occluder is drawn on top of the target: ``box`` is the full target mask, ``visible_box`` the
part of it left visible. Each sample's ``meta`` holds the scene (objects in drawing order with
their boxes) and the structured expression, which :func:`resolve` evaluates independently of
the generator; the oracle teacher (:mod:`egm.data.teacher`) writes the reasoning trace from it.

Determinism: sample ``i`` of split ``s`` depends only on ``(seed, s, i, image_size,
difficulty)``; PNGs and manifests are byte-identical across runs.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from egm.data.manifest import Sample, write_manifest

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "yellow": (235, 200, 30),
}
SIZES: dict[str, float] = {"small": 0.20, "large": 0.34}  # side of the shape / image side
BACKGROUND = (235, 235, 235)
VANILLA_DIFFICULTIES = ("plain", "attribute", "ordinal", "relation")
DIFFICULTIES = VANILLA_DIFFICULTIES + ("amodal",)
DIRECTIONS = ("left", "right", "top", "bottom")  # ordinal counting directions
RELATIONS = ("left of", "right of", "above", "below")
ORDINALS = ("first", "second", "third", "fourth")
GENERATOR_VERSION = 1
_GAP = 3  # min pixels between the squares of non-overlapping objects
_PAD = 2  # min pixels between an object and the image border


@dataclass
class Obj:
    """One object: drawn inside the square ``[x0, x0 + side) x [y0, y0 + side)``."""

    shape: str
    colour: str
    size: str
    x0: int = 0
    y0: int = 0
    side: int = 0

    @property
    def square(self) -> tuple[int, int, int, int]:
        return self.x0, self.y0, self.x0 + self.side, self.y0 + self.side


def object_mask(obj: Obj | dict[str, Any], image_size: int) -> np.ndarray:
    """Boolean ``(H, W)`` mask of one object rasterised alone (the reference for exact boxes)."""
    o = obj if isinstance(obj, Obj) else Obj(**{k: obj[k] for k in ("shape", "colour", "size", "x0", "y0", "side")})
    im = Image.new("L", (image_size, image_size), 0)
    d = ImageDraw.Draw(im)
    x0, y0, x1, y1 = o.x0, o.y0, o.x0 + o.side - 1, o.y0 + o.side - 1
    if o.shape == "circle":
        d.ellipse([x0, y0, x1, y1], fill=255)
    elif o.shape == "square":
        d.rectangle([x0, y0, x1, y1], fill=255)
    elif o.shape == "triangle":
        d.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=255)
    else:
        raise ValueError(f"unknown shape {o.shape!r}")
    return np.asarray(im) > 0


def mask_box(mask: np.ndarray) -> list[float]:
    """Continuous ``xyxy`` extent of a boolean mask; ``[0, 0, 0, 0]`` when empty."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if len(cols) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def render(objects: list[Obj], image_size: int) -> tuple[Image.Image, list[np.ndarray], list[np.ndarray]]:
    """Draw objects in order on the background -> (RGB image, full masks, visible masks)."""
    img = np.empty((image_size, image_size, 3), np.uint8)
    img[:] = BACKGROUND
    full = [object_mask(o, image_size) for o in objects]
    for o, m in zip(objects, full):
        img[m] = COLOURS[o.colour]
    visible = []
    for i, m in enumerate(full):
        v = m.copy()
        for later in full[i + 1:]:
            v &= ~later
        visible.append(v)
    return Image.fromarray(img, "RGB"), full, visible


# ---------------------------------------------------------------- expressions


def _sq(o: Obj | dict) -> tuple[int, int, int, int]:
    """The drawing square of an object or of its ``meta["objects"]`` record."""
    return o.square if isinstance(o, Obj) else (o["x0"], o["y0"], o["x0"] + o["side"], o["y0"] + o["side"])


def _centre(o: Obj | dict) -> tuple[float, float]:
    x1, y1, x2, y2 = _sq(o)
    return (x1 + x2) / 2, (y1 + y2) / 2


def _matches(o: dict | Obj, shape=None, colour=None, size=None) -> bool:
    g = o.__getitem__ if isinstance(o, dict) else lambda k: getattr(o, k)
    return (shape is None or g("shape") == shape) and (colour is None or g("colour") == colour) and (
        size is None or g("size") == size
    )


def _relation_holds(o, anchor, rel: str) -> bool:
    ox1, oy1, ox2, oy2 = _sq(o)
    ax1, ay1, ax2, ay2 = _sq(anchor)
    return {"left of": ox2 <= ax1, "right of": ox1 >= ax2, "above": oy2 <= ay1, "below": oy1 >= ay2}[rel]


def _relation_clearly_fails(o, anchor, rel: str) -> bool:
    (cx, cy), (ax, ay) = _centre(o), _centre(anchor)
    return {"left of": cx > ax, "right of": cx < ax, "above": cy > ay, "below": cy < ay}[rel]


def resolve(expr: dict[str, Any], objects: list[dict[str, Any]] | list[Obj]) -> list[int]:
    """Indices of the objects an expression refers to (exactly one for a valid sample).

    ``expr`` is ``meta["expression"]``: ``{"shape", "colour"?, "size"?}`` plus ``"ordinal"`` and
    ``"direction"`` (1-based rank from that side) or ``"relation"`` and ``"anchor"``.
    """
    cand = [i for i, o in enumerate(objects) if _matches(o, expr["shape"], expr.get("colour"), expr.get("size"))]
    if "ordinal" in expr:
        axis, rev = {"left": (0, False), "right": (0, True), "top": (1, False), "bottom": (1, True)}[expr["direction"]]
        ranked = sorted(cand, key=lambda i: _centre(objects[i])[axis], reverse=rev)
        k = expr["ordinal"] - 1
        return [ranked[k]] if k < len(ranked) else []
    if "relation" in expr:
        a = resolve(expr["anchor"], objects)
        if len(a) != 1:
            return []
        return [i for i in cand if i != a[0] and _relation_holds(objects[i], objects[a[0]], expr["relation"])]
    return cand


def sentence_of(expr: dict[str, Any]) -> str:
    """English referring expression of a structured one."""
    words = [w for w in (expr.get("size"), expr.get("colour"), expr["shape"]) if w]
    if "ordinal" in expr:
        return f"the {ORDINALS[expr['ordinal'] - 1]} {expr['shape']} from the {expr['direction']}"
    if "relation" in expr:
        return f"the {' '.join(words)} {expr['relation']} {sentence_of(expr['anchor'])}"
    return "the " + " ".join(words)


# ---------------------------------------------------------------- scenes


@dataclass
class Scene:
    objects: list[Obj]  # drawing order
    target: int
    expression: dict[str, Any]
    difficulty: str
    occluder: int | None = None


GRID_SIZES: dict[str, float] = {"small": 0.6, "large": 0.9}  # side / grid cell, ``grid`` layout


@dataclass(frozen=True)
class Layout:
    """How scenes are laid out (the defaults are the standard world).

    ``object_scale`` multiplies the object sides of :data:`SIZES`; ``max_objects`` caps the
    objects per scene, but never below what a difficulty needs (:data:`MIN_OBJECTS`); ``grid > 0``
    centres objects in the cells of a ``grid x grid`` layout. Why the CPU demo uses large
    objects and no spare distractors (``object_scale=1.6, max_objects=1``): a from-scratch ViT
    reads an object's colour off the average of its tokens at once, but its *position* only
    through how the object changes its own tokens, a signal that scales with the object's area,
    and picking one object among look-alikes needs content-selective attention on top. Measured
    with the 1 M-parameter tiny Qwen3-VL (lr 1e-3, batch 16): one object per image at standard
    sizes, the 3x3 location word stays at chance after 600 steps; sides x1.6, 90 % acc@0.5 after
    400 steps; standard multi-object world (lr 2e-3), chance after 1125 steps.
    """

    object_scale: float = 1.0
    max_objects: int = 5
    grid: int = 0

    def __post_init__(self):
        if not 0.2 <= self.object_scale <= 2.0:
            raise ValueError(f"object_scale must be in [0.2, 2], got {self.object_scale}")
        if not 1 <= self.max_objects <= 5:
            raise ValueError(f"max_objects must be in [1, 5], got {self.max_objects}")
        if self.grid < 0:
            raise ValueError(f"grid must be >= 0, got {self.grid}")

    def side(self, size: str, image_size: int) -> int:
        if self.grid:
            return max(4, round(GRID_SIZES[size] * (image_size // self.grid)))
        return max(4, round(SIZES[size] * self.object_scale * image_size))


def _separate(a, b, gap=_GAP) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _place(rng: random.Random, objs: list[Obj], S: int, fixed: list[Obj] = (), tries: int = 60,
           layout: Layout = Layout()) -> bool:
    """Place objects one by one at random, with no overlap (incl. ``fixed`` ones).

    ``layout.grid > 0`` centres each object in a random cell of a ``grid x grid`` layout (boxes
    then take few distinct values).
    """
    placed = list(fixed)
    grid = layout.grid
    cell = S // grid if grid else 0
    for o in objs:
        o.side = layout.side(o.size, S)
        for _ in range(tries):
            if grid:
                o.x0 = rng.randrange(grid) * cell + (cell - o.side) // 2
                o.y0 = rng.randrange(grid) * cell + (cell - o.side) // 2
            else:
                o.x0 = rng.randint(_PAD, S - o.side - _PAD)
                o.y0 = rng.randint(_PAD, S - o.side - _PAD)
            if all(_separate(o.square, p.square) for p in placed):
                placed.append(o)
                break
        else:
            return False
    return True


def _others(rng, n: int, forbid_shape: set[str]) -> list[Obj]:
    shapes = [s for s in SHAPES if s not in forbid_shape]
    return [Obj(rng.choice(shapes), rng.choice(list(COLOURS)), rng.choice(list(SIZES))) for _ in range(n)]


def _scene_plain(rng, S):
    n = rng.randint(2, 5)
    t = Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES)))
    objs = [t] + _others(rng, n - 1, {t.shape})
    return objs, {"shape": t.shape}, None


def _scene_attribute(rng, S):
    shape = rng.choice(SHAPES)
    if rng.random() < 0.5:  # colour singles it out
        k = rng.randint(2, 3)
        cols = rng.sample(list(COLOURS), k)
        group = [Obj(shape, c, rng.choice(list(SIZES))) for c in cols]
        expr = {"shape": shape, "colour": cols[0]}
    else:  # size singles it out: target size differs from all other same-shape objects
        k = rng.randint(2, 3)
        ts = rng.choice(list(SIZES))
        os_ = "small" if ts == "large" else "large"
        group = [Obj(shape, rng.choice(list(COLOURS)), ts)] + [Obj(shape, rng.choice(list(COLOURS)), os_) for _ in range(k - 1)]
        expr = {"shape": shape, "size": ts}
    objs = group + _others(rng, rng.randint(0, 5 - k), {shape})
    return objs, expr, None


def _scene_ordinal(rng, S):
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    size = rng.choice(list(SIZES))
    k = rng.randint(2, 4 if size == "small" else 3)
    group = [Obj(shape, colour, size) for _ in range(k)]
    expr = {"shape": shape, "ordinal": rng.randint(1, k), "direction": rng.choice(DIRECTIONS)}
    objs = group + _others(rng, rng.randint(0, 5 - k), {shape})
    return objs, expr, None


def _scene_relation(rng, S):
    shape, colour, size = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES))
    k = rng.randint(2, 3)
    group = [Obj(shape, colour, size) for _ in range(k)]
    anchor = Obj(rng.choice([s for s in SHAPES if s != shape]), rng.choice(list(COLOURS)), rng.choice(list(SIZES)))
    expr = {"shape": shape, "relation": rng.choice(RELATIONS), "anchor": {"shape": anchor.shape, "colour": anchor.colour}}
    extra = [o for o in _others(rng, rng.randint(0, 4 - k), {shape})
             if not _matches(o, anchor.shape, anchor.colour)]
    return group[:2] + [anchor] + group[2:] + extra, expr, None  # anchor within the first 3 (Layout.max_objects)


def _scene_amodal(rng, S):
    t = Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES)))
    occ = Obj(rng.choice(SHAPES), rng.choice([c for c in COLOURS if c != t.colour]), rng.choice(list(SIZES)))
    extra = [o for o in _others(rng, rng.randint(0, 3), set()) if not _matches(o, t.shape, t.colour)]
    return [t] + extra + [occ], {"shape": t.shape, "colour": t.colour}, occ


_BUILDERS = {"plain": _scene_plain, "attribute": _scene_attribute, "ordinal": _scene_ordinal,
             "relation": _scene_relation, "amodal": _scene_amodal}


def _place_occluder(rng, target: Obj, occ: Obj, S: int, tries: int = 60, layout: Layout = Layout()) -> bool:
    """Put the occluder over part of the target: 15-60 % of it hidden, visible box shrunk >= 2 px."""
    occ.side = layout.side(occ.size, S)
    tm = object_mask(target, S)
    t_area = tm.sum()
    tbox = mask_box(tm)
    for _ in range(tries):
        occ.x0 = rng.randint(max(_PAD, target.x0 - occ.side + 3), min(S - occ.side - _PAD, target.x0 + target.side - 3))
        occ.y0 = rng.randint(max(_PAD, target.y0 - occ.side + 3), min(S - occ.side - _PAD, target.y0 + target.side - 3))
        om = object_mask(occ, S)
        hidden = (tm & om).sum() / t_area
        if not 0.15 <= hidden <= 0.6:
            continue
        vbox = mask_box(tm & ~om)
        if max(vbox[0] - tbox[0], vbox[1] - tbox[1], tbox[2] - vbox[2], tbox[3] - vbox[3]) >= 2:
            return True
    return False


def make_scene(rng: random.Random, difficulty: str, image_size: int = 128, max_attempts: int = 500,
               layout: Layout = Layout()) -> Scene:
    """Draw one valid scene of a difficulty (rejection sampling on placement and uniqueness)."""
    if difficulty not in _BUILDERS:
        raise ValueError(f"unknown difficulty {difficulty!r}; expected one of {DIFFICULTIES}")
    S = image_size
    for _ in range(max_attempts):
        objs, expr, occ = _BUILDERS[difficulty](rng, S)
        objs = _cap(objs, occ, max(layout.max_objects, MIN_OBJECTS[difficulty]))
        target = objs[0]
        body = [o for o in objs if o is not occ]
        rng.shuffle(body)
        if occ is not None:
            if not _place(rng, [target], S, layout=layout) or not _place_occluder(rng, target, occ, S, layout=layout):
                continue
            others = [o for o in body if o is not target]
            if not _place(rng, others, S, fixed=[target, occ], layout=layout):
                continue
            objects = body + [occ]  # occluder drawn last, on top
        else:
            if not _place(rng, body, S, layout=layout):
                continue
            objects = body
        if difficulty in ("ordinal", "relation"):
            # the candidates are identical, so the target is whichever one the expression picks
            picked = resolve(expr, objects)
            if len(picked) != 1:
                continue
            target = objects[picked[0]]
        ti = objects.index(target)
        if not _valid(objects, ti, expr, S):
            continue
        return Scene(objects, ti, expr, difficulty, objects.index(occ) if occ is not None else None)
    raise RuntimeError(f"could not build a {difficulty} scene in {max_attempts} attempts (image_size={S})")


# Fewest objects a difficulty needs: the target; two candidates to tell apart; two candidates
# and an anchor; the target and its occluder.
MIN_OBJECTS = {"plain": 1, "attribute": 2, "ordinal": 2, "relation": 3, "amodal": 2}


def _cap(objs: list[Obj], occ: Obj | None, n: int) -> list[Obj]:
    """At most ``n`` objects: builders list the target (and its group) first and extras last; an
    occluder is always kept. A cut that breaks the expression is caught by :func:`_valid`."""
    if len(objs) <= n:
        return objs
    body = [o for o in objs if o is not occ][: n - (occ is not None)]
    return body + ([occ] if occ is not None else [])


def _valid(objects: list[Obj], ti: int, expr: dict, S: int) -> bool:
    if resolve(expr, objects) != [ti]:
        return False
    if "ordinal" in expr:  # ranks must be clearly separated along the counting axis
        axis = 0 if expr["direction"] in ("left", "right") else 1
        c = sorted(_centre(o)[axis] for o in objects if _matches(o, expr["shape"]))
        if any(b - a < 0.1 * S for a, b in zip(c, c[1:])):
            return False
    if "relation" in expr:  # the other candidates must clearly fail the relation
        ai = resolve(expr["anchor"], objects)[0]
        for i, o in enumerate(objects):
            if i not in (ti, ai) and _matches(o, expr["shape"]) and not _relation_clearly_fails(o, objects[ai], expr["relation"]):
                return False
    return True


def scene_sample(scene: Scene, image_path: str, sample_id: str, split: str, image_size: int) -> tuple[Sample, Image.Image]:
    """Render a scene into its image and manifest sample (reasoning filled by the oracle teacher)."""
    from egm.data.teacher import synthetic_trace

    img, full, vis = render(scene.objects, image_size)
    objs = []
    for o, m, v in zip(scene.objects, full, vis):
        d = asdict(o)
        d["box"] = mask_box(m)
        if not np.array_equal(m, v):
            d["visible_box"] = mask_box(v)
        objs.append(d)
    amodal = scene.difficulty == "amodal"
    s = Sample(
        id=sample_id,
        image=image_path,
        width=image_size,
        height=image_size,
        sentence=sentence_of(scene.expression),
        task="amodal" if amodal else "vanilla",
        box=mask_box(full[scene.target]),
        visible_box=mask_box(vis[scene.target]) if amodal else None,
        split=split,
        source="synthetic",
        category=scene.objects[scene.target].shape,
        meta={
            "difficulty": scene.difficulty,
            "expression": scene.expression,
            "target": scene.target,
            **({"occluder": scene.occluder} if scene.occluder is not None else {}),
            "objects": objs,
        },
    )
    s.reasoning = synthetic_trace(s)
    return s, img


def sample_rng(seed: int, split: str, index: int) -> random.Random:
    """Per-sample RNG (string seeding is hashed with SHA-512: stable across runs and platforms)."""
    return random.Random(f"egm-synthetic/{seed}/{split}/{index}")


def generate_split(
    out_dir: str | Path, split: str, n: int, *, seed: int, image_size: int,
    difficulties: list[str], amodal_fraction: float | None, layout: Layout = Layout(),
) -> list[Sample]:
    """Generate and save ``n`` samples; difficulties round-robin (eval) or drawn (``amodal_fraction``)."""
    out_dir = Path(out_dir)
    (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
    vanilla = [d for d in difficulties if d != "amodal"] or ["amodal"]
    samples = []
    for i in range(n):
        rng = sample_rng(seed, split, i)
        if amodal_fraction is None:
            diff = difficulties[i % len(difficulties)]
        elif "amodal" in difficulties and rng.random() < amodal_fraction:
            diff = "amodal"
        else:
            diff = rng.choice(vanilla)
        scene = make_scene(rng, diff, image_size, layout=layout)
        sid = f"syn_{split}_{i:06d}"
        path = out_dir / "images" / split / f"{sid}.png"
        s, img = scene_sample(scene, str(path.resolve()), sid, split, image_size)
        img.save(path, format="PNG")
        samples.append(s)
    return samples


def make_synthetic(
    out_dir: str,
    n_train: int = 4000,
    n_val: int = 500,
    n_test: int = 500,
    seed: int = 0,
    image_size: int = 128,
    difficulties: list[str] = list(DIFFICULTIES),
    amodal_fraction: float = 0.2,
    object_scale: float = 1.0,
    max_objects: int = 5,
    grid: int = 0,
    overwrite: bool = False,
) -> dict[str, str]:
    """Write the synthetic world: PNGs + manifests ``train``, ``val``, ``test`` and per difficulty
    ``train_<d>`` / ``val_<d>`` / ``test_<d>``. Returns ``{split: manifest_path}``.

    Train difficulties are drawn per sample (``amodal_fraction`` amodal, the rest uniform over the
    vanilla ones); val/test cycle through ``difficulties`` so each per-difficulty split has
    ``n // len(difficulties)`` samples. Idempotent: when ``<out_dir>/synthetic_config.json``
    matches this call and every manifest exists, nothing is regenerated. ``object_scale``,
    ``max_objects`` and ``grid`` shape the scenes (see :class:`Layout`).
    """
    layout = Layout(object_scale=object_scale, max_objects=max_objects, grid=grid)
    bad = [d for d in difficulties if d not in DIFFICULTIES]
    if bad or not difficulties:
        raise ValueError(f"unknown difficulties {bad}; expected a subset of {DIFFICULTIES}")
    if image_size < 48:
        raise ValueError(f"image_size must be >= 48 to fit several objects, got {image_size}")
    if not 0.0 <= amodal_fraction <= 1.0:
        raise ValueError(f"amodal_fraction must be in [0, 1], got {amodal_fraction}")
    out = Path(out_dir)
    config = {"version": GENERATOR_VERSION, "n_train": n_train, "n_val": n_val, "n_test": n_test, "seed": seed,
              "image_size": image_size, "difficulties": list(difficulties), "amodal_fraction": amodal_fraction,
              **{k: v for k, v in asdict(layout).items() if v != getattr(Layout(), k)}}
    names = ["train", "val", "test"] + [f"{s}_{d}" for s in ("train", "val", "test") for d in difficulties]
    paths = {name: str(out / f"{name}.jsonl") for name in names}
    cfg_path = out / "synthetic_config.json"
    if (not overwrite and cfg_path.is_file() and json.loads(cfg_path.read_text()) == config
            and all(Path(p).is_file() for p in paths.values())):
        return paths
    if cfg_path.is_file():
        cfg_path.unlink()
    if (out / "images").is_dir():
        shutil.rmtree(out / "images")
    t0 = time.perf_counter()
    for split, n, frac in (("train", n_train, amodal_fraction), ("val", n_val, None), ("test", n_test, None)):
        samples = generate_split(out, split, n, seed=seed, image_size=image_size,
                                 difficulties=list(difficulties), amodal_fraction=frac, layout=layout)
        write_manifest(paths[split], samples)
        for d in difficulties:  # train_<d>: e.g. RL prompts of one difficulty; the samples stay "train"
            sub = [s if split == "train" else Sample(**{**asdict(s), "split": f"{split}_{d}"})
                   for s in samples if s.meta["difficulty"] == d]
            write_manifest(paths[f"{split}_{d}"], sub)
    cfg_path.write_text(json.dumps(config, indent=1) + "\n")
    print(f"[make_synthetic] wrote {n_train + n_val + n_test} samples to {out} in {time.perf_counter() - t0:.1f}s")
    return paths
