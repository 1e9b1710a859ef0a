"""Oracle teacher: short reasoning traces in the paper's style, computed from ground truth.

Paper Sec. 4.1 has GPT-4 write, for vanilla grounding, *which feature singles the target out
among similar candidates* (appendix B Fig. 8: "1-2 sentences") and, for amodal grounding, also
1) what occludes the target, 2) its complete shape, 3) in which direction(s) and how much to
extend the visible part, using the words of Fig. 11 ("slightly", "a bit", "moderately",
"considerably", "significantly"). For the synthetic world the scene is known exactly, so the
teacher is a deterministic function of ``Sample.meta`` (no API calls); traces are kept to one or
two sentences (~15-40 words) so that a few-M-parameter model can learn them.

:class:`OracleTeacher` puts these functions behind the curation jobs' ``Teacher`` protocol
(``egm curate --teacher_class egm.data.teacher:OracleTeacher``), so the CPU demo runs the same
jobs, cache and parsers as an API teacher. :func:`amodal_guidance` works on any pair of boxes
(the Fig. 11 rule of :func:`egm.curation.prompts.expansion`), so :func:`amodal_trace` also serves
COCO-Amodal / TAO-Amodal samples.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from egm.curation.prompts import (
    AMODAL_DESCRIPTION,
    AMODAL_REASONING,
    AMODAL_VERIFICATION,
    AMOUNT_TERMS,
    FAILURE_ANALYSIS,
    MIN_PIXELS,
    MIN_RATIO,
    VANILLA_REASONING,
    amount_term,
    expansion,
)
from egm.data.manifest import Sample

if TYPE_CHECKING:
    from egm.curation.client import Reply, TeacherRequest

# Extension of one side / visible extent on that axis -> Fig. 11 word: one rule, defined with the
# prompts (egm.curation.prompts.AMOUNT_TERMS); these names are kept for the data layer.
GUIDANCE_TERMS = AMOUNT_TERMS
GUIDANCE_MIN_RATIO = MIN_RATIO  # and more than GUIDANCE_MIN_PIXELS: annotation jitter is no occlusion
GUIDANCE_MIN_PIXELS = MIN_PIXELS
DIRECTION_WORDS = {"left": "to the left", "right": "to the right", "up": "upward", "down": "downward"}
_NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
_LOCATIONS = {
    ("top", "left"): "at the top left", ("top", "center"): "at the top", ("top", "right"): "at the top right",
    ("middle", "left"): "on the left", ("middle", "center"): "in the center", ("middle", "right"): "on the right",
    ("bottom", "left"): "at the bottom left", ("bottom", "center"): "at the bottom",
    ("bottom", "right"): "at the bottom right",
}


def extent_word(ratio: float) -> str:
    """Fig. 11 vocabulary for an extension of ``ratio`` times the visible extent."""
    return amount_term(ratio)


def amodal_guidance(
    visible_box: Sequence[float],
    amodal_box: Sequence[float],
    min_ratio: float = GUIDANCE_MIN_RATIO,
    min_pixels: float = GUIDANCE_MIN_PIXELS,
) -> list[tuple[str, str, float]]:
    """Directions in which the visible box must grow to reach the amodal box.

    Returns ``[(direction, word, ratio), ...]`` in the order left, right, up, down, where
    ``ratio`` is the extension on that side divided by the visible width (left/right) or height
    (up/down); an empty visible extent gives ``inf`` ("significantly"). The same directions and
    words as Fig. 11's ``{guidance_str}`` (:func:`egm.curation.prompts.expansion`).
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


def _n(k: int) -> str:
    return _NUMBERS.get(k, str(k))


def _desc(o: dict) -> str:
    return f"{o['colour']} {o['shape']}"


def synthetic_trace(sample: Sample) -> str:
    """Reasoning trace of a synthetic-world sample (needs ``meta`` written by :mod:`egm.data.synthetic`)."""
    from egm.data.synthetic import ORDINALS, resolve

    m = sample.meta
    objs, t, expr = m["objects"], m["target"], m["expression"]
    W, H = sample.width, sample.height
    target = objs[t]
    loc = location_phrase(sample.visible_box if sample.task == "amodal" else sample.box, W, H)
    same_shape = [o for o in objs if o["shape"] == expr["shape"]]
    k, shape = len(same_shape), expr["shape"]
    d = m["difficulty"]
    if d == "plain":
        others = sorted({o["shape"] + "s" for o in objs if o["shape"] != shape})
        return (f"The other objects are {' and '.join(others)}, and there is only one {shape}, "
                f"{loc}, so it is the target.")
    if d == "attribute":
        attr = expr.get("colour") or expr.get("size")
        return f"There are {_n(k)} {shape}s; only one of them is {attr}, the one {loc}, so it is the target."
    if d == "ordinal":
        return (f"There are {_n(k)} identical {shape}s; counting from the {expr['direction']}, the "
                f"{ORDINALS[expr['ordinal'] - 1]} one is {loc}, so it is the target.")
    if d == "relation":
        a = resolve(expr["anchor"], objs)[0]
        aloc = location_phrase(objs[a]["box"], W, H)
        return (f"The {_desc(objs[a])} is {aloc}. Of the {_n(k)} {shape}s, only the one {loc} is "
                f"{expr['relation']} it, so it is the target.")
    if d == "amodal":
        occ = objs[m["occluder"]]
        g = guidance_text(amodal_guidance(sample.visible_box, sample.box))
        return (f"The {_desc(target)} {loc} is partly hidden by the {_desc(occ)} on top of it. "
                f"Its full shape is a whole {shape}, so extend the visible part {g}.")
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


# ---------------------------------------------------------------------------------------------
# The oracle behind the curation jobs' Teacher protocol


def _expression_patterns() -> tuple[re.Pattern, re.Pattern, re.Pattern]:
    from egm.data.synthetic import COLOURS, DIRECTIONS, ORDINALS, RELATIONS, SHAPES, SIZES

    alt = "|".join
    np_ = rf"(?:({alt(SIZES)}) )?(?:({alt(COLOURS)}) )?({alt(SHAPES)})"
    ordinal = re.compile(rf"the ({alt(ORDINALS)}) ({alt(SHAPES)}) from the ({alt(DIRECTIONS)})")
    relation = re.compile(rf"the {np_} ({alt(RELATIONS)}) (the .+)")
    plain = re.compile(rf"the {np_}")
    return ordinal, relation, plain


def parse_expression(text: str) -> dict[str, Any] | None:
    """A referring expression in the synthetic grammar -> ``meta["expression"]`` form, else None.

    The inverse of :func:`egm.data.synthetic.sentence_of` (case, spaces and a final period
    ignored), so that a description can be checked with :func:`egm.data.synthetic.resolve`.
    """
    from egm.data.synthetic import ORDINALS

    ordinal, relation, plain = _expression_patterns()
    t = _normal(text)
    if m := ordinal.fullmatch(t):
        return {"shape": m[2], "ordinal": ORDINALS.index(m[1]) + 1, "direction": m[3]}
    if m := relation.fullmatch(t):
        anchor = parse_expression(m[5])
        if anchor is None or "ordinal" in anchor or "relation" in anchor:
            return None
        return {**_attrs(m[1], m[2], m[3]), "relation": m[4], "anchor": anchor}
    if m := plain.fullmatch(t):
        return _attrs(m[1], m[2], m[3])
    return None


def _normal(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def _attrs(size: str | None, colour: str | None, shape: str) -> dict[str, str]:
    return {"shape": shape, **({"colour": colour} if colour else {}), **({"size": size} if size else {})}


def synthetic_description(sample: Sample) -> str:
    """Fig. 9 for a synthetic sample: the shortest expression (shape, + colour, + size, + both)
    that singles the target out, else the scene's own (ordinal / relation) expression."""
    from egm.data.synthetic import resolve, sentence_of

    m = sample.meta
    objs, t = m["objects"], m["target"]
    o = objs[t]
    for keys in ((), ("colour",), ("size",), ("size", "colour")):
        expr = {"shape": o["shape"], **{k: o[k] for k in keys}}
        if resolve(expr, objs) == [t]:
            return sentence_of(expr)
    return sentence_of(m["expression"])


def _is_synthetic(sample: Sample) -> bool:
    return all(k in sample.meta for k in ("objects", "target", "expression", "difficulty"))


_COMPLEX_WORDS = re.compile(
    r"\b(first|second|third|fourth|fifth|last|left of|right of|above|below|between|behind|in front of|"
    r"next to|closest|nearest|farthest|furthest)\b")
SMALL_FRACTION = 0.01  # a GT box under 1 % of the image is a SMALL_OBJECT failure


def failure_verdict(sample: Sample, question: str) -> tuple[str, str, str]:
    """Fig. 13 category, reasoning and confidence of a failed prediction, from what is known.

    Synthetic samples: ordinal / relation difficulties are COMPLEX_PROMPT (the paper's family),
    attribute ones AMBIGUOUS_IMAGE (similar objects, simple prompt), a target under
    ``SMALL_FRACTION`` of the image SMALL_OBJECT, the rest OTHER, all with high confidence. Other
    samples: the same rules on the question's words and the box, with medium confidence.
    """
    x1, y1, x2, y2 = sample.box
    small = max(x2 - x1, 0) * max(y2 - y1, 0) < SMALL_FRACTION * sample.width * sample.height
    if _is_synthetic(sample):
        d, conf = sample.meta["difficulty"], "high"
        cue = {"ordinal": "counting", "relation": "a spatial relation"}.get(d)
        similar = d == "attribute"
    else:
        m, conf = _COMPLEX_WORDS.search(question.lower()), "medium"
        cue, similar = (f'the word "{m[1]}"' if m else None), False
    if cue:
        why = (f'The prompt "{question}" needs {cue} to tell apart similar objects. '
               "The prediction picked one of the look-alikes.")
        return "COMPLEX_PROMPT", why, conf
    if small:
        return "SMALL_OBJECT", "The target covers a tiny part of the image. The prediction missed it.", conf
    if similar:
        return "AMBIGUOUS_IMAGE", ("Several objects share the target's shape, and only one attribute in the "
                                   "simple prompt tells them apart."), conf
    if sample.task == "amodal":
        return "OTHER", "The prompt is simple; the target is partly hidden and the prediction missed its full extent.", conf
    return "OTHER", "The prompt is simple and the target is clearly visible, yet the prediction missed it.", conf


class OracleTeacher:
    """The synthetic world's oracle as a curation :class:`~egm.curation.client.Teacher`.

    Answers every job from ``request.job``, ``request.sample`` and ``request.fields``, never from
    pixels, in the formats the jobs' parsers read:

    * Fig. 8 vanilla reasoning: :func:`synthetic_trace` (synthetic samples only);
    * Fig. 9 amodal description: :func:`synthetic_description`, else the sample's sentence;
    * Fig. 10 verification: ``YES`` when the description resolves to the target alone
      (:func:`egm.data.synthetic.resolve`); for a non-synthetic sample, when it is the sentence;
    * Fig. 11 amodal reasoning: :func:`synthetic_trace` (occluder + Fig. 11 guidance), else
      :func:`amodal_trace` from the boxes;
    * Fig. 13 failure analysis: :func:`failure_verdict` in the ``<category>`` format.

    A request it cannot answer (vanilla reasoning without a synthetic scene) raises
    ``TeacherError``: the job records the sample as failed. Deterministic and thread-safe.
    """

    model = "oracle"

    def complete(self, request: TeacherRequest) -> Reply:
        from egm.curation.client import Reply, TeacherError

        s, f = request.sample, request.fields
        if request.job == VANILLA_REASONING.name:
            if not _is_synthetic(s):
                raise TeacherError(f"oracle: sample {s.id} has no synthetic scene (meta.objects) to explain")
            text = synthetic_trace(s)
        elif request.job == AMODAL_DESCRIPTION.name:
            text = synthetic_description(s) if _is_synthetic(s) else s.sentence
        elif request.job == AMODAL_VERIFICATION.name:
            text = "YES" if self.confirms(s, str(f.get("description", s.sentence))) else "NO"
        elif request.job == AMODAL_REASONING.name:
            text = synthetic_trace(s) if _is_synthetic(s) and s.meta["difficulty"] == "amodal" else amodal_trace(s)
        elif request.job == FAILURE_ANALYSIS.name:
            cat, why, conf = failure_verdict(s, str(f.get("question", s.sentence)))
            text = f"<category> {cat} </category>\n<reasoning> {why} </reasoning>\n<confidence> {conf} </confidence>"
        else:
            raise ValueError(f"OracleTeacher: no answer for job {request.job!r}")
        return Reply(text)

    @staticmethod
    def confirms(sample: Sample, description: str) -> bool:
        """Fig. 10: does ``description`` single out the sample's target?"""
        if not _is_synthetic(sample):
            return _normal(description) == _normal(sample.sentence)
        from egm.data.synthetic import resolve

        expr = parse_expression(description)
        return expr is not None and resolve(expr, sample.meta["objects"]) == [sample.meta["target"]]
