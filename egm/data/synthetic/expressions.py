"""Referring expressions of the synthetic world: evaluate (:func:`resolve`), write
(:func:`sentence_of`) and read back (:func:`parse_expression`) the structured form of
``meta["expression"]``.

A structured expression is ``{"shape", "colour"?, "size"?}`` plus ``"ordinal"`` and
``"direction"`` (1-based rank counted from that side) or ``"relation"`` and ``"anchor"`` (a
plain expression). Objects are :class:`~egm.data.synthetic.world.Obj` or their
``meta["objects"]`` records.
"""

from __future__ import annotations

import re
from typing import Any

from egm.data.synthetic.world import COLOURS, COUNTING_DIRECTIONS, ORDINALS, RELATIONS, SHAPES, SIZES, Obj


def square_of(o: Obj | dict) -> tuple[int, int, int, int]:
    """The drawing square of an object or of its ``meta["objects"]`` record."""
    return o.square if isinstance(o, Obj) else (o["x0"], o["y0"], o["x0"] + o["side"], o["y0"] + o["side"])


def centre(o: Obj | dict) -> tuple[float, float]:
    x1, y1, x2, y2 = square_of(o)
    return (x1 + x2) / 2, (y1 + y2) / 2


def matches(o: dict | Obj, shape=None, colour=None, size=None) -> bool:
    """Does the object have these attributes (``None``: any)?"""
    g = o.__getitem__ if isinstance(o, dict) else lambda k: getattr(o, k)
    return (shape is None or g("shape") == shape) and (colour is None or g("colour") == colour) and (
        size is None or g("size") == size
    )


def relation_holds(o, anchor, rel: str) -> bool:
    ox1, oy1, ox2, oy2 = square_of(o)
    ax1, ay1, ax2, ay2 = square_of(anchor)
    return {"left of": ox2 <= ax1, "right of": ox1 >= ax2, "above": oy2 <= ay1, "below": oy1 >= ay2}[rel]


def relation_clearly_fails(o, anchor, rel: str) -> bool:
    (cx, cy), (ax, ay) = centre(o), centre(anchor)
    return {"left of": cx > ax, "right of": cx < ax, "above": cy > ay, "below": cy < ay}[rel]


def counting_order(ids: list[int], objects: list[dict[str, Any]] | list[Obj], direction: str) -> list[int]:
    """``ids`` in the order "the n-th ... from the ``direction``" counts them (by centres)."""
    axis, rev = {"left": (0, False), "right": (0, True), "top": (1, False), "bottom": (1, True)}[direction]
    return sorted(ids, key=lambda i: centre(objects[i])[axis], reverse=rev)


def resolve(expr: dict[str, Any], objects: list[dict[str, Any]] | list[Obj]) -> list[int]:
    """Indices of the objects an expression refers to (exactly one for a valid sample)."""
    cand = [i for i, o in enumerate(objects) if matches(o, expr["shape"], expr.get("colour"), expr.get("size"))]
    if "ordinal" in expr:
        ranked = counting_order(cand, objects, expr["direction"])
        k = expr["ordinal"] - 1
        return [ranked[k]] if k < len(ranked) else []
    if "relation" in expr:
        a = resolve(expr["anchor"], objects)
        if len(a) != 1:
            return []
        return [i for i in cand if i != a[0] and relation_holds(objects[i], objects[a[0]], expr["relation"])]
    return cand


def sentence_of(expr: dict[str, Any]) -> str:
    """English referring expression of a structured one."""
    words = [w for w in (expr.get("size"), expr.get("colour"), expr["shape"]) if w]
    if "ordinal" in expr:
        return f"the {ORDINALS[expr['ordinal'] - 1]} {expr['shape']} from the {expr['direction']}"
    if "relation" in expr:
        return f"the {' '.join(words)} {expr['relation']} {sentence_of(expr['anchor'])}"
    return "the " + " ".join(words)


_alt = "|".join
_NP = rf"(?:({_alt(SIZES)}) )?(?:({_alt(COLOURS)}) )?({_alt(SHAPES)})"
_ORDINAL = re.compile(rf"the ({_alt(ORDINALS)}) ({_alt(SHAPES)}) from the ({_alt(COUNTING_DIRECTIONS)})")
_RELATION = re.compile(rf"the {_NP} ({_alt(RELATIONS)}) (the .+)")
_PLAIN = re.compile(rf"the {_NP}")


def parse_expression(text: str) -> dict[str, Any] | None:
    """A referring expression in the synthetic grammar -> ``meta["expression"]`` form, else None.

    The inverse of :func:`sentence_of` (case, spaces and a final period ignored), so that a
    description can be checked with :func:`resolve`.
    """
    t = normalize_text(text)
    if m := _ORDINAL.fullmatch(t):
        return {"shape": m[2], "ordinal": ORDINALS.index(m[1]) + 1, "direction": m[3]}
    if m := _RELATION.fullmatch(t):
        anchor = parse_expression(m[5])
        if anchor is None or "ordinal" in anchor or "relation" in anchor:
            return None
        return {**_attrs(m[1], m[2], m[3]), "relation": m[4], "anchor": anchor}
    if m := _PLAIN.fullmatch(t):
        return _attrs(m[1], m[2], m[3])
    return None


def normalize_text(text: str) -> str:
    """Lower case, single spaces, no final period: how two expressions are compared."""
    return " ".join(text.lower().strip().rstrip(".").split())


def _attrs(size: str | None, colour: str | None, shape: str) -> dict[str, str]:
    return {"shape": shape, **({"colour": colour} if colour else {}), **({"size": size} if size else {})}
