"""Reasoning traces in the paper's style, computed from ground truth (the oracle's words).

Paper Sec. 4.1 has GPT-4 write, for vanilla grounding, *which feature singles the target out
among similar candidates* (appendix B Fig. 8: "1-2 sentences") and, for amodal grounding, also
1) what occludes the target, 2) its complete shape, 3) in which direction(s) and how much to
extend the visible part, using the words of Fig. 11 ("slightly", "a bit", "moderately",
"considerably", "significantly"). For the synthetic world the scene is known exactly, so the
trace is a deterministic function of ``Sample.meta`` (no API calls); traces are kept to one or
two sentences (~15-40 words) so that a few-M-parameter model can learn them.

:func:`amodal_guidance` works on any pair of boxes (the Fig. 11 rule of
:func:`egm.geometry.expansion`), so :func:`amodal_trace` also serves COCO-Amodal / TAO-Amodal
samples. The curation oracle (:class:`egm.curation.oracle.OracleTeacher`) answers with these.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from egm.data.manifest import Sample
from egm.data.synthetic.expressions import centre, counting_order, relation_holds, resolve
from egm.data.synthetic.world import ORDINALS
from egm.geometry import MIN_PIXELS, MIN_RATIO, amount_term, expansion

DIRECTION_WORDS = {"left": "to the left", "right": "to the right", "up": "upward", "down": "downward"}
_NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
_LOCATIONS = {
    ("top", "left"): "at the top left", ("top", "center"): "at the top", ("top", "right"): "at the top right",
    ("middle", "left"): "on the left", ("middle", "center"): "in the center", ("middle", "right"): "on the right",
    ("bottom", "left"): "at the bottom left", ("bottom", "center"): "at the bottom",
    ("bottom", "right"): "at the bottom right",
}


def amodal_guidance(
    visible_box: Sequence[float],
    amodal_box: Sequence[float],
    min_ratio: float = MIN_RATIO,
    min_pixels: float = MIN_PIXELS,
) -> list[tuple[str, str, float]]:
    """Directions in which the visible box must grow to reach the amodal box.

    Returns ``[(direction, word, ratio), ...]`` in the order left, right, up, down, where
    ``ratio`` is the extension on that side divided by the visible width (left/right) or height
    (up/down); an empty visible extent gives ``inf`` ("significantly"). The same directions and
    words as Fig. 11's ``{guidance_str}`` (:func:`egm.geometry.expansion`).
    """
    e = expansion(visible_box, amodal_box, min_ratio=min_ratio, min_pixels=min_pixels)
    return [(d, amount_term(e.ratios[d]), e.ratios[d]) for d in e.directions]


def guidance_text(guidance: list[tuple[str, str, float]]) -> str:
    """``"moderately to the right and slightly downward"``, largest extension first."""
    parts = [f"{word} {DIRECTION_WORDS[d]}" for d, word, _ in sorted(guidance, key=lambda g: -g[2])]
    if not parts:
        return "only slightly, if at all"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def location_phrase(box: Sequence[float], width: float, height: float) -> str:
    """Coarse 3x3 location of a box centre: ``"at the top left"``, ``"in the center"``, ..."""
    cx, cy = (box[0] + box[2]) / 2 / width, (box[1] + box[3]) / 2 / height
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "center"
    row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    return _LOCATIONS[(row, col)]


_LOCATION_RE = re.compile("|".join(re.escape(p) for p in sorted(_LOCATIONS.values(), key=len, reverse=True)))


def named_region(reasoning: str | None) -> str | None:
    """The region a trace names for its target: the last :func:`location_phrase` in it.

    Every synthetic trace names the target's location last (a relation trace names its anchor's
    first), so this reads back what a model trained on them says about *where* the target is;
    ``None`` when no location phrase appears.
    """
    found = _LOCATION_RE.findall(reasoning or "")
    return found[-1] if found else None


def _n(k: int) -> str:
    return _NUMBERS.get(k, str(k))


def _desc(o: dict) -> str:
    return f"{o['colour']} {o['shape']}"


def _listing(parts: list[str]) -> str:
    """``"a, b and c"``."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _side(of: Sequence[float], ref: Sequence[float]) -> str:
    """Which side of box ``ref`` box ``of`` lies on, by centres: ``"right"``, ``"lower left"``, ...

    A component counts when the centres differ by more than a quarter of ``ref``'s extent on that
    axis, so that an occluder straight above reads ``"upper"``, not ``"upper left"``.
    """
    dx = (of[0] + of[2] - ref[0] - ref[2]) / 2
    dy = (of[1] + of[3] - ref[1] - ref[3]) / 2
    w, h = max(ref[2] - ref[0], 1e-9), max(ref[3] - ref[1], 1e-9)
    v = "upper" if dy < -h / 4 else "lower" if dy > h / 4 else ""
    u = "left" if dx < -w / 4 else "right" if dx > w / 4 else ""
    if v and u:
        return f"{v} {u}"
    return {"upper": "top", "lower": "bottom"}.get(v, v) or u or "middle"


def synthetic_trace(sample: Sample) -> str:
    """Reasoning trace of a synthetic-world sample (needs the ``meta`` the generator writes).

    Each trace works the choice out in the order a model can say it one token at a time, and
    names the target's coarse location last (:func:`named_region`):

    * ordinal: the candidates of the target's shape in the order the expression counts, each
      with its location, then the n-th (paper Fig. 6: "count ... from the rightmost ... The
      third person in this sequence is the target");
    * relation: the anchor's location first, then each candidate and whether the relation holds;
    * attribute: each candidate with its value of the attribute asked for, then the one that has it;
    * amodal: the visible part's location, the occluder and the side it covers, then the
      extension (paper Fig. 12: "The seated man is causing the occlusion ... extend moderately
      to the right and considerably downward").
    """
    m = sample.meta
    objs, t, expr = m["objects"], m["target"], m["expression"]
    W, H = sample.width, sample.height
    target = objs[t]
    loc = location_phrase(sample.visible_box if sample.task == "amodal" else sample.box, W, H)
    shape = expr["shape"]
    cands = [i for i, o in enumerate(objs) if o["shape"] == shape]
    k = len(cands)
    d = m["difficulty"]

    def where(i: int) -> str:
        return location_phrase(objs[i]["box"], W, H)

    def reading_order(ids: list[int]) -> list[int]:
        return sorted(ids, key=lambda i: (centre(objs[i])[0], centre(objs[i])[1]))

    if d == "plain":
        others = sorted({o["shape"] + "s" for o in objs if o["shape"] != shape})
        if not others:  # the demo layout's plain scenes hold the target alone
            return f"The {shape} {loc} is the only object, so it is the target."
        return (f"The other objects are {' and '.join(others)}, and there is only one {shape}, "
                f"{loc}, so it is the target.")
    if d == "attribute":
        key = "colour" if expr.get("colour") else "size"
        listed = [f"the {objs[i][key]} one is {where(i)}" for i in reading_order(cands)]
        return (f"Of the {_n(k)} {shape}s, {_listing(listed)}, so the target is the {expr[key]} one, {loc}.")
    if d == "ordinal":
        ranked = counting_order(cands, objs, expr["direction"])
        listed = [f"the {ORDINALS[r]} is {where(i)}" for r, i in enumerate(ranked[:len(ORDINALS)])]
        return (f"Counting the {_n(k)} {shape}s from the {expr['direction']}, {_listing(listed)}. "
                f"The {ORDINALS[expr['ordinal'] - 1]} one, {loc}, is the target.")
    if d == "relation":
        a = resolve(expr["anchor"], objs)[0]
        rel = expr["relation"]
        listed = [f"the one {where(i)} is {'' if relation_holds(objs[i], objs[a], rel) else 'not '}{rel} it"
                  for i in reading_order([i for i in cands if i != a])]
        return (f"The {_desc(objs[a])} is {location_phrase(objs[a]['box'], W, H)}. Of the {_n(len(listed))} "
                f"{shape}s, {_listing(listed)}, so the target is the one {loc}.")
    if d == "amodal":
        occ = objs[m["occluder"]]
        g = guidance_text(amodal_guidance(sample.visible_box, sample.box))
        side = _side(occ["box"], sample.visible_box)
        cover = "" if side == "middle" else f", at its {side} side"
        return (f"The visible part of the {_desc(target)} is {loc}, and the {_desc(occ)} on top of it hides "
                f"the rest{cover}. The whole {shape} extends {g}.")
    raise ValueError(f"sample {sample.id}: unknown difficulty {d!r}")


def amodal_trace(sample: Sample, occluder: str | None = None) -> str:
    """Template trace for a real amodal sample (COCO-Amodal / TAO-Amodal) without a VLM teacher.

    Only the extension part is known from the boxes; ``occluder`` names the occluding object if
    known. A fully invisible target (empty visible box) gets no extension advice.
    """
    if sample.visible_box is None or sample.visible_box[2] <= sample.visible_box[0]:
        return f"The {sample.category or 'object'} is hidden; its full extent must be inferred from the scene."
    name = sample.category or "object"
    by = f" by the {occluder}" if occluder else ""
    g = guidance_text(amodal_guidance(sample.visible_box, sample.box))
    return f"The {name} is partly hidden{by}. To recover the complete {name}, extend the visible part {g}."
