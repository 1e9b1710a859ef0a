"""Box geometry of the teacher prompts: the 0-999 scale (Figs. 8, 13) and the Fig. 11 rule.

The base layer, so that the data layer (the synthetic oracle's traces) and curation (the teacher
prompts) use one definition: :func:`to_rel999` puts a pixel box on the scale the figures name,
and :func:`expansion` / :func:`amount_term` say in which directions, and by which of Fig. 11's
words, an amodal box extends past the visible one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

REL999_SCALE = 999


def to_rel999(box: Sequence[float], width: float, height: float) -> list[int]:
    """Pixel ``xyxy`` -> the "normalized 0-999 coordinates" of Figs. 8 and 13.

    ``round_half_up(v / size * 999)`` clipped to ``[0, 999]``: the image's far edge maps to 999,
    so every coordinate the teacher sees lies in the range the prompt announces. (The models'
    own 0-1000 scale, :func:`egm.boxes.to_rel1000`, is used for training targets, never here.)
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    x1, y1, x2, y2 = (float(v) for v in box)
    sizes = (width, height, width, height)
    return [min(max(int(math.floor(v / s * REL999_SCALE + 0.5)), 0), REL999_SCALE) for v, s in zip((x1, y1, x2, y2), sizes)]


# Fig. 11 asks for the extension "using terms: slightly, a bit, moderately, considerably, or
# significantly". The term is chosen from the extension relative to the visible extent on the same
# axis (extension / visible width for left/right, / visible height for up/down): upper bounds. For
# a one-sided occlusion a ratio r hides r / (1 + r) of the object: "slightly" < 9 %, "a bit" < 20 %,
# "moderately" < 33 %, "considerably" < 50 %, "significantly" beyond. This is the one definition
# of the rule: the teacher prompts (egm.curation.prompts) and the synthetic oracle's traces
# (egm.data.synthetic.traces) both use it, so oracle-written and teacher-written traces use the
# words alike.
AMOUNT_TERMS: tuple[tuple[float, str], ...] = (
    (0.10, "slightly"),
    (0.25, "a bit"),
    (0.50, "moderately"),
    (1.00, "considerably"),
    (math.inf, "significantly"),
)
EXPANSION_DIRECTIONS = ("left", "right", "up", "down")  # Fig. 11's {directions_str}, in this order
MIN_RATIO = 0.02   # an extension counts above this fraction of the visible extent ...
MIN_PIXELS = 1.0   # ... and above this many pixels: annotation jitter is no occlusion


@dataclass(frozen=True)
class Expansion:
    """How the amodal box extends the visible one, as Fig. 11's ``{directions_str}``/``{guidance_str}``."""

    ratios: dict[str, float]  # direction -> extension / visible extent on that axis (only extended ones)

    @property
    def directions(self) -> tuple[str, ...]:
        return tuple(d for d in EXPANSION_DIRECTIONS if d in self.ratios)

    @property
    def directions_str(self) -> str:
        return ", ".join(self.directions) if self.ratios else "none"

    @property
    def guidance_str(self) -> str:
        if not self.ratios:
            return "none (the visible part already shows the complete object)"
        parts = []
        for d in self.directions:
            r = self.ratios[d]
            axis = "width" if d in ("left", "right") else "height"
            size = "more than the whole" if math.isinf(r) else f"about {r:.0%} of the"
            parts.append(f"{d} ({amount_term(r)}, by {size} visible {axis})")
        return "; ".join(parts)


def amount_term(ratio: float) -> str:
    """The Fig. 11 amount word for an extension of ``ratio`` times the visible extent."""
    for bound, term in AMOUNT_TERMS:
        if ratio < bound:
            return term
    return AMOUNT_TERMS[-1][1]


def expansion(
    visible: Sequence[float], amodal: Sequence[float], *, min_ratio: float = MIN_RATIO, min_pixels: float = MIN_PIXELS
) -> Expansion:
    """Directions in which the amodal box extends past the visible (modal) box, and by how much.

    An extension counts when it exceeds both ``min_pixels`` and ``min_ratio`` of the visible
    extent (annotation jitter of a pixel is not an occlusion). Sides where the amodal box is
    *inside* the visible one (annotation noise) are ignored. A visible box of zero width/height
    gives an infinite ratio ("significantly").
    """
    vx1, vy1, vx2, vy2 = (float(v) for v in visible)
    ax1, ay1, ax2, ay2 = (float(v) for v in amodal)
    vw, vh = max(vx2 - vx1, 0.0), max(vy2 - vy1, 0.0)
    ext = {"left": (vx1 - ax1, vw), "right": (ax2 - vx2, vw), "up": (vy1 - ay1, vh), "down": (ay2 - vy2, vh)}
    ratios = {}
    for d, (px, size) in ext.items():
        if px <= min_pixels:
            continue
        r = px / size if size > 0 else math.inf
        if r > min_ratio:
            ratios[d] = r
    return Expansion(ratios)
