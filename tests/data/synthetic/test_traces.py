"""The synthetic world's reasoning traces: Fig. 11 guidance from boxes, short grounded synthetic traces."""

import pytest

from egm.data.manifest import Sample
from egm.data.synthetic import DIFFICULTIES, make_scene, sample_rng, scene_sample
from egm.data.synthetic.traces import amodal_guidance, amodal_trace, guidance_text, location_phrase, synthetic_trace
from egm.geometry import AMOUNT_TERMS, expansion


def test_guidance_from_boxes():
    # visible 40x40 part of an 50x80 object: 10 px hidden on the left (1/4 of the visible
    # width), 40 px below (the whole visible height again)
    g = amodal_guidance([10, 10, 50, 50], [0, 10, 50, 90])
    assert [(d, w) for d, w, _ in g] == [("left", "moderately"), ("down", "significantly")]
    assert g[0][2] == pytest.approx(0.25) and g[1][2] == pytest.approx(1.0)
    assert guidance_text(g) == "significantly downward and moderately to the left"
    assert amodal_guidance([0, 0, 10, 10], [0, 0, 10, 10]) == []
    assert amodal_guidance([0.5, 0, 10, 10], [0, 0, 10, 10]) == []  # <= 1 px: jitter, not occlusion
    assert amodal_guidance([0, 0, 0, 0], [0, 0, 10, 10])[0][1:] == ("significantly", float("inf"))
    three = amodal_guidance([5, 5, 10, 10], [0, 0, 12, 10])
    assert guidance_text(three) == "significantly to the left, significantly upward and moderately to the right"


def test_location_phrase():
    assert location_phrase([0, 0, 10, 10], 128, 128) == "at the top left"
    assert location_phrase([54, 54, 74, 74], 128, 128) == "in the center"
    assert location_phrase([100, 50, 128, 70], 128, 128) == "on the right"
    assert location_phrase([50, 110, 70, 128], 128, 128) == "at the bottom"


def test_synthetic_traces_are_short_and_grounded():
    for d in DIFFICULTIES:
        for i in range(20):
            sc = make_scene(sample_rng(1, "t", i), d, 128)
            s, _ = scene_sample(sc, "x.png", f"s{i}", "t", 128)
            words = s.reasoning.split()
            assert 12 <= len(words) <= 60 and s.reasoning.count(". ") <= 2, s.reasoning  # 1-3 sentences
            box = s.visible_box if d == "amodal" else s.box
            assert location_phrase(box, 128, 128) in s.reasoning
            assert synthetic_trace(s) == s.reasoning
            if d == "amodal":
                occ = s.meta["objects"][s.meta["occluder"]]
                assert f"the {occ['colour']} {occ['shape']} on top of it hides the rest" in s.reasoning
                (vx1, vy1, vx2, vy2), (ax1, ay1, ax2, ay2) = s.visible_box, s.box
                hidden = {"to the left": (vx1 - ax1, vx2 - vx1), "to the right": (ax2 - vx2, vx2 - vx1),
                          "upward": (vy1 - ay1, vy2 - vy1), "downward": (ay2 - vy2, vy2 - vy1)}
                for phrase, (px, extent) in hidden.items():  # from the pixels, not from the rule's code
                    if px >= 3 and px >= 0.05 * extent:
                        assert phrase in s.reasoning, (phrase, s.reasoning)
                    if px == 0:
                        assert phrase not in s.reasoning, (phrase, s.reasoning)
                assert any(w in s.reasoning for _, w in AMOUNT_TERMS)
            if d == "ordinal":
                assert f"s from the {s.meta['expression']['direction']}, the first is " in s.reasoning
            if d == "relation":
                a = s.meta["expression"]["anchor"]
                assert s.reasoning.startswith(f"The {a['colour']} {a['shape']} is ")


def test_amodal_trace_for_real_samples():
    s = Sample(id="c", image="i.jpg", width=640, height=480, sentence="the pink paper", task="amodal",
               box=[100, 100, 300, 200], visible_box=[200, 150, 300, 200], split="x", source="cocoa",
               category="paper")
    t = amodal_trace(s, occluder="cellphone")
    assert t == ("The paper is partly hidden by the cellphone. To recover the complete paper, extend the visible "
                 "part significantly to the left and significantly upward.")
    s.visible_box = [0, 0, 0, 0]
    assert "hidden" in amodal_trace(s)


def test_guidance_is_the_curation_prompts_rule():
    """One Fig. 11 rule: the oracle's words are those of the teacher prompt's ``{guidance_str}``."""
    for vis, am in [([10, 10, 50, 50], [0, 4, 50, 90]), ([5, 5, 10, 10], [0, 0, 12, 10]), ([0, 0, 40, 40], [0, 0, 41, 60])]:
        e, g = expansion(vis, am), amodal_guidance(vis, am)
        assert [(d, r) for d, _, r in g] == [(d, e.ratios[d]) for d in e.directions]
        assert all(f"{d} ({w}, " in e.guidance_str for d, w, _ in g)


def test_data_layer_imports_without_openai():
    import subprocess
    import sys

    code = ("import sys; sys.modules['openai'] = None; import egm.data.synthetic; "
            "from egm.curation.oracle import OracleTeacher; from egm.curation.jobs import vanilla_request")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plain_trace_of_a_lone_target_names_no_empty_list():
    """The demo layout's plain scenes hold the target alone: the trace must not read
    "The other objects are , and there is only one square"."""
    from egm.data.synthetic.scenes import Layout

    for i in range(10):
        sc = make_scene(sample_rng(0, "t", i), "plain", 128, layout=Layout(object_scale=1.6, max_objects=1))
        s, _ = scene_sample(sc, "x.png", f"s{i}", "t", 128)
        assert len(s.meta["objects"]) == 1
        shape = s.meta["objects"][0]["shape"]
        assert s.reasoning == f"The {shape} {location_phrase(s.box, 128, 128)} is the only object, so it is the target."
        assert "are ," not in s.reasoning
    crowded = scene_sample(make_scene(sample_rng(0, "t", 0), "plain", 128), "x.png", "c", "t", 128)[0]
    assert crowded.reasoning.startswith("The other objects are ")


def test_named_region_reads_back_the_target_location_of_every_trace():
    from egm.data.synthetic.traces import named_region

    for d in DIFFICULTIES:
        for i in range(20):
            sc = make_scene(sample_rng(2, "t", i), d, 128)
            s, _ = scene_sample(sc, "x.png", f"s{i}", "t", 128)
            box = s.visible_box if d == "amodal" else s.box
            assert named_region(s.reasoning) == location_phrase(box, 128, 128), s.reasoning
    assert named_region("The red circle is at the top. Of the two squares, only the one at the top left is") == "at the top left"
    assert named_region("no place named") is None and named_region(None) is None


def _pixel_objects(s, image_size=128):
    """Each object's box and centre re-rasterised from its drawing square: facts from pixels."""
    from egm.data.synthetic.world import mask_box, object_mask

    out = []
    for o in s.meta["objects"]:
        b = mask_box(object_mask(o, image_size))
        out.append({**o, "pbox": b, "cx": (b[0] + b[2]) / 2, "cy": (b[1] + b[3]) / 2})
    return out


def test_traces_work_the_choice_out_step_by_step():
    """Issue 25: ordinal lists the candidates in counting order with their locations, then picks
    the n-th; relation locates the anchor, then each candidate against it; attribute gives each
    candidate's value; amodal the visible part, the occluder's side, then the extension. Every
    location is checked against the objects re-rasterised from the scene (not the trace's code)."""
    import re

    from egm.data.synthetic.scenes import Layout
    from egm.data.synthetic.world import ORDINALS

    for layout in (Layout(object_scale=1.6, max_objects=1), Layout()):
        for d in ("ordinal", "relation", "attribute", "amodal"):
            for i in range(15):
                s, _ = scene_sample(make_scene(sample_rng(3, "t", i), d, 128, layout=layout), "x.png", f"s{i}", "t", 128)
                objs, expr, r = _pixel_objects(s), s.meta["expression"], s.reasoning
                cands = [o for o in objs if o["shape"] == expr["shape"]]
                if d == "ordinal":
                    key = {"left": lambda o: o["cx"], "right": lambda o: -o["cx"],
                           "top": lambda o: o["cy"], "bottom": lambda o: -o["cy"]}[expr["direction"]]
                    ranked = sorted(cands, key=key)
                    said = re.findall(r"the (first|second|third|fourth) is ((?:at|on|in) the [a-z ]+?)(?= and|,|\.)", r)
                    assert [w for w, _ in said] == list(ORDINALS[:len(ranked)]), r
                    assert [p for _, p in said] == [location_phrase(o["pbox"], 128, 128) for o in ranked], r
                    n = expr["ordinal"]
                    assert r.endswith(f"The {ORDINALS[n - 1]} one, {location_phrase(ranked[n - 1]['pbox'], 128, 128)}, is the target."), r
                if d == "relation":
                    from egm.data.synthetic.expressions import resolve

                    a = objs[resolve(expr["anchor"], s.meta["objects"])[0]]
                    assert r.startswith(f"The {a['colour']} {a['shape']} is {location_phrase(a['pbox'], 128, 128)}. "), r
                    ax1, ay1, ax2, ay2 = a["pbox"]
                    for o in cands:
                        if o is a:
                            continue
                        x1, y1, x2, y2 = o["pbox"]
                        holds = {"left of": x2 <= ax1, "right of": x1 >= ax2, "above": y2 <= ay1, "below": y1 >= ay2}[expr["relation"]]
                        phrase = f"the one {location_phrase(o['pbox'], 128, 128)} is {'' if holds else 'not '}{expr['relation']} it"
                        assert phrase in r, (phrase, r)
                if d == "attribute":
                    k = "colour" if "colour" in expr else "size"
                    for o in cands:
                        assert f"the {o[k]} one is {location_phrase(o['pbox'], 128, 128)}" in r, r
                    assert r.endswith(f"so the target is the {expr[k]} one, {location_phrase(s.box, 128, 128)}."), r
                if d == "amodal":
                    occ = objs[s.meta["occluder"]]
                    vx = (s.visible_box[0] + s.visible_box[2]) / 2
                    side = re.search(r"at its ([a-z ]+) side", r)
                    if occ["cx"] - vx > (s.visible_box[2] - s.visible_box[0]) / 4:
                        assert side and side[1].endswith("right"), r
                    if vx - occ["cx"] > (s.visible_box[2] - s.visible_box[0]) / 4:
                        assert side and side[1].endswith("left"), r
                    assert r.index("visible part") < r.index("on top of it") < r.index("extends"), r
