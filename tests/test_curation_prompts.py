"""Prompt templates (verbatim, versioned), the 0-999 scale and the Fig. 11 expansion guidance."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egm.curation.prompts import (
    AMODAL_DESCRIPTION,
    AMODAL_REASONING,
    AMODAL_VERIFICATION,
    FAILURE_ANALYSIS,
    TEMPLATES,
    VANILLA_REASONING,
    amount_term,
    expansion,
    format_box,
    to_rel999,
)

PAPER = Path("/work/shared/paper/EGM-paper.md")

# Changing a template's text must come with a new version (the cache key): bump both together.
PINNED = {
    "vanilla_reasoning@paper-v1": "80dfcef6c51fc662",
    "amodal_description@paper-v1": "07fb8bdb089a1ee5",
    "amodal_verification@paper-v1": "75829c1dbb0bcf6d",
    "amodal_reasoning@paper-v1": "4c09682556bcf265",
    "failure_analysis@paper-v1": "91d3308b2329bb4e",
}

FIGURES = [  # template, first words of the figure, where it ends
    (VANILLA_REASONING, "You are looking at an image with a visual grounding task", "Figure 8."),
    (AMODAL_DESCRIPTION, "You are helping with a visual grounding task", "Figure 9."),
    (AMODAL_VERIFICATION, "Look at this image. There is a region", "Figure 10."),
    (AMODAL_REASONING, "You are analyzing an amodal object detection task", "Figure 11."),
    (FAILURE_ANALYSIS, "Analyze this visual grounding failure case", "Figure 13."),
]


def _words(text: str) -> list[str]:
    text = text.replace("\\_", "_").replace("\\*", "").replace("*", "")  # bold markup is not wording
    return re.findall(r"[\w.:]+", text.replace("_", "UNDERSCORE"))


def test_versions_pinned():
    assert {t.key: t.sha256[:16] for t in TEMPLATES.values()} == PINNED


@pytest.mark.skipif(not PAPER.exists(), reason="paper not available")
@pytest.mark.parametrize("template,start,end", FIGURES, ids=[f[0].name for f in FIGURES])
def test_templates_are_the_papers_words(template, start, end):
    """Same word sequence as the figure (markup, line breaks and list bullets aside)."""
    paper = PAPER.read_text(encoding="utf-8")
    i = paper.index(start)
    j = paper.index(end, i) if end else len(paper)
    assert _words(template.text) == _words(paper[i:j])


def test_render_fields():
    p = VANILLA_REASONING.render(question="left dog", gt_bbox="[1, 2, 3, 4]")
    assert 'Question: "left dog"' in p
    assert "Ground Truth bbox (normalized 0-999 coordinates): [1, 2, 3, 4], which is highlighted" in p
    assert "IoU: 0.123\n" in FAILURE_ANALYSIS.render(question="q", pred_bbox_norm="[]", gt_bbox_norm="[]", iou=0.12345)
    with pytest.raises(KeyError):
        VANILLA_REASONING.render(question="x")
    with pytest.raises(KeyError):
        AMODAL_VERIFICATION.render(description="x", extra=1)
    assert AMODAL_REASONING.fields == {"question", "width", "height", "guidance_str", "directions_str"}
    assert "**IMPORTANT: Your ENTIRE response must be NO MORE THAN 5 SENTENCES TOTAL.**" in AMODAL_REASONING.text
    assert "{" not in AMODAL_DESCRIPTION.render(object_category="cat")


def test_rel999():
    assert to_rel999([0, 0, 640, 480], 640, 480) == [0, 0, 999, 999]
    assert to_rel999([320, 240, 640, 480], 640, 480) == [500, 500, 999, 999]  # 499.5 rounds up
    assert to_rel999([-5, -5, 700, 500], 640, 480) == [0, 0, 999, 999]
    assert to_rel999([103.93, 299.99, 238.15, 477.41], 427, 640) == [243, 468, 557, 745]
    assert format_box([1, 22, 333, 999]) == "[1, 22, 333, 999]"


@given(st.floats(0, 1), st.floats(0, 1), st.integers(1, 4000), st.integers(1, 4000))
def test_rel999_range_and_error(fx, fy, w, h):
    b = to_rel999([fx * w, fy * h, fx * w, fy * h], w, h)
    assert all(0 <= v <= 999 for v in b)
    assert abs(b[0] / 999 * w - fx * w) <= 0.5 * w / 999 + 1e-9


def test_amount_terms():
    assert [amount_term(r) for r in (0.05, 0.1, 0.2, 0.3, 0.7, 1.0, 3.0, math.inf)] == [
        "slightly", "a bit", "a bit", "moderately", "considerably", "significantly", "significantly", "significantly"]


def test_expansion_directions():
    vis = [100, 100, 200, 150]  # 100 wide, 50 high
    e = expansion(vis, [100, 100, 200, 150])
    assert e.directions == () and e.directions_str == "none" and e.guidance_str.startswith("none")
    e = expansion(vis, [70, 90, 200.5, 250])  # left 30%, up 20%, right 0.5 px (jitter), down 200%
    assert e.directions == ("left", "up", "down")
    assert e.directions_str == "left, up, down"
    assert e.ratios == pytest.approx({"left": 0.3, "up": 0.2, "down": 2.0})
    assert e.guidance_str == ("left (moderately, by about 30% of the visible width); "
                              "up (a bit, by about 20% of the visible height); "
                              "down (significantly, by about 200% of the visible height)")
    # an amodal box smaller than the visible one on a side (annotation noise) is no direction
    assert expansion(vis, [110, 100, 260, 150]).directions == ("right",)
    # tiny relative extension of a large object is ignored (min_ratio)
    assert expansion([0, 0, 1000, 1000], [0, 0, 1010, 1000]).directions == ()
    # a visible box without area: infinite ratio, not a crash
    z = expansion([10, 10, 10, 40], [0, 10, 10, 40])
    assert z.directions == ("left",) and "more than the whole visible width" in z.guidance_str


@given(st.lists(st.floats(-500, 500), min_size=8, max_size=8))
def test_expansion_directions_match_box_sides(v):
    vis = [min(v[0], v[2]), min(v[1], v[3]), max(v[0], v[2]), max(v[1], v[3])]
    am = [min(v[4], v[6]), min(v[5], v[7]), max(v[4], v[6]), max(v[5], v[7])]
    e = expansion(vis, am, min_ratio=0.0, min_pixels=0.0)
    assert ("left" in e.directions) == (am[0] < vis[0])
    assert ("right" in e.directions) == (am[2] > vis[2])
    assert ("up" in e.directions) == (am[1] < vis[1])
    assert ("down" in e.directions) == (am[3] > vis[3])
