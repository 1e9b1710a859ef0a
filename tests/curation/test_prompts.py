"""Prompt templates: verbatim (the paper's words), versioned (pinned hashes), rendered field by field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from egm.curation.prompts import (
    AMODAL_DESCRIPTION,
    AMODAL_REASONING,
    AMODAL_VERIFICATION,
    FAILURE_ANALYSIS,
    TEMPLATES,
    VANILLA_REASONING,
    format_box,
)

PAPER = Path(__file__).resolve().parents[1] / "fixtures" / "paper_prompt_figures.md"  # the figures, verbatim

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


def test_format_box():
    assert format_box([1, 22, 333, 999]) == "[1, 22, 333, 999]"
