"""Scenes of the synthetic world: 2-5 similar objects and one referring expression that singles
the target out, one builder per difficulty, placed by rejection sampling.

============  ===========================================  =====================================
difficulty    example                                      what singles the target out
============  ===========================================  =====================================
plain         "the circle"                                 its shape is unique in the scene
attribute     "the red circle", "the large square"         one attribute among same-shape objects
ordinal       "the second circle from the left"            its rank among identical objects
relation      "the square left of the red circle"          its position relative to an anchor
amodal        "the red circle" (partly hidden)             amodal task: another object covers it
============  ===========================================  =====================================

Objects of vanilla scenes never overlap, so box = visible box. In amodal scenes one occluder is
drawn on top of the target, hiding 15-60 % of it. Every draw comes from the ``rng`` passed in,
in a fixed order: a scene is a function of that generator's state.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from egm.data.synthetic.expressions import centre, matches, relation_clearly_fails, resolve
from egm.data.synthetic.world import (
    COLOURS,
    COUNTING_DIRECTIONS,
    DIFFICULTIES,
    RELATIONS,
    SHAPES,
    SIZES,
    Obj,
    mask_box,
    object_mask,
)
from egm.errors import InputError

_GAP = 3  # min pixels between the squares of non-overlapping objects
_PAD = 2  # min pixels between an object and the image border


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
            raise InputError(f"object_scale must be in [0.2, 2], got {self.object_scale}")
        if not 1 <= self.max_objects <= 5:
            raise InputError(f"max_objects must be in [1, 5], got {self.max_objects}")
        if self.grid < 0:
            raise InputError(f"grid must be >= 0, got {self.grid}")

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
    expr = {"shape": shape, "ordinal": rng.randint(1, k), "direction": rng.choice(COUNTING_DIRECTIONS)}
    objs = group + _others(rng, rng.randint(0, 5 - k), {shape})
    return objs, expr, None


def _scene_relation(rng, S):
    shape, colour, size = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES))
    k = rng.randint(2, 3)
    group = [Obj(shape, colour, size) for _ in range(k)]
    anchor = Obj(rng.choice([s for s in SHAPES if s != shape]), rng.choice(list(COLOURS)), rng.choice(list(SIZES)))
    expr = {"shape": shape, "relation": rng.choice(RELATIONS), "anchor": {"shape": anchor.shape, "colour": anchor.colour}}
    extra = [o for o in _others(rng, rng.randint(0, 4 - k), {shape})
             if not matches(o, anchor.shape, anchor.colour)]
    return group[:2] + [anchor] + group[2:] + extra, expr, None  # anchor within the first 3 (Layout.max_objects)


def _scene_amodal(rng, S):
    t = Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES)))
    occ = Obj(rng.choice(SHAPES), rng.choice([c for c in COLOURS if c != t.colour]), rng.choice(list(SIZES)))
    extra = [o for o in _others(rng, rng.randint(0, 3), set()) if not matches(o, t.shape, t.colour)]
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
        c = sorted(centre(o)[axis] for o in objects if matches(o, expr["shape"]))
        if any(b - a < 0.1 * S for a, b in zip(c, c[1:])):
            return False
    if "relation" in expr:  # the other candidates must clearly fail the relation
        ai = resolve(expr["anchor"], objects)[0]
        for i, o in enumerate(objects):
            if i not in (ti, ai) and matches(o, expr["shape"]) and not relation_clearly_fails(o, objects[ai], expr["relation"]):
                return False
    return True
