"""Box geometry of the teacher prompts: the 0-999 scale (Figs. 8, 13) and the Fig. 11 expansion rule."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egm.geometry import AMOUNT_TERMS, amount_term, expansion, to_rel999


def test_rel999():
    assert to_rel999([0, 0, 640, 480], 640, 480) == [0, 0, 999, 999]
    assert to_rel999([320, 240, 640, 480], 640, 480) == [500, 500, 999, 999]  # 499.5 rounds up
    assert to_rel999([-5, -5, 700, 500], 640, 480) == [0, 0, 999, 999]
    assert to_rel999([103.93, 299.99, 238.15, 477.41], 427, 640) == [243, 468, 557, 745]


@given(st.floats(0, 1), st.floats(0, 1), st.integers(1, 4000), st.integers(1, 4000))
def test_rel999_range_and_error(fx, fy, w, h):
    b = to_rel999([fx * w, fy * h, fx * w, fy * h], w, h)
    assert all(0 <= v <= 999 for v in b)
    assert abs(b[0] / 999 * w - fx * w) <= 0.5 * w / 999 + 1e-9


def test_amount_terms():
    """Fig. 11's five words, in order, with the upper bounds of the rule (a bound starts the next word)."""
    assert [w for _, w in AMOUNT_TERMS] == ["slightly", "a bit", "moderately", "considerably", "significantly"]
    ratios = (0.05, 0.1, 0.2, 0.25, 0.3, 0.4, 0.6, 0.7, 1.0, 3.0, math.inf)
    assert [amount_term(r) for r in ratios] == [
        "slightly", "a bit", "a bit", "moderately", "moderately", "moderately", "considerably", "considerably",
        "significantly", "significantly", "significantly"]


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
