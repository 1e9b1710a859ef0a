"""Figure-7 prompts, target formats and the answer round trip of both adapters."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egm.boxes import rel1000_max_error, xywh_to_xyxy
from egm.models import InternVLAdapter, Qwen3VLAdapter, task_prompt

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

# Typed from the paper (appendix A.2, Figure 7), not copied from egm/.
PAPER = {
    ("qwen3_vl", "vanilla"): "Locate the red cup, output its bbox coordinates using JSON format.",
    ("qwen3_vl", "amodal"): "Locate the red cup amodally, output its amodal bbox coordinates using JSON format",
    ("internvl", "vanilla"): "Please provide the bounding box coordinate of the region this sentence describes: "
                             "<ref>the red cup</ref>",
    ("internvl", "amodal"): "Please provide the amodal bounding box coordinate of the region this sentence "
                            "describes: <ref>the red cup</ref>",
}

# Adapters whose text methods need no checkpoint (the processor is loaded lazily).
QWEN, QWEN_INSTRUCT, INTERN = Qwen3VLAdapter("unused/unused"), Qwen3VLAdapter("unused/unused", thinking=False), InternVLAdapter("unused/unused")


@pytest.mark.parametrize("family,task", sorted(PAPER))
def test_prompts_are_figure7_verbatim(family, task):
    adapter = QWEN if family == "qwen3_vl" else INTERN
    assert adapter.prompt("the red cup", task) == PAPER[(family, task)]
    assert task_prompt(family, task, "the red cup") == PAPER[(family, task)]


def test_prompt_keeps_braces_and_rejects_unknown_task():
    assert QWEN.prompt("the {odd} one", "vanilla").startswith("Locate the {odd} one,")
    with pytest.raises(ValueError, match="task"):
        QWEN.prompt("x", "modal")


def test_internvl_target_matches_official_refcoco_sft_data():
    path = FIXTURES / "internvl_refcoco_sft_sample.jsonl"
    rec = json.loads(path.read_text().splitlines()[0])
    # RefCOCO ann of "the lady with the blue shirt" (COCO xywh), image 427x640.
    box = xywh_to_xyxy([103.93, 299.99, 134.22, 177.42])
    target = INTERN.format_target(box, rec["width"], rec["height"], "the lady with the blue shirt")
    assert target == rec["conversations"][1]["value"]
    assert INTERN.prompt("the lady with the blue shirt") == rec["conversations"][0]["value"].removeprefix("<image>\n")
    with_trace = INTERN.format_target(box, 427, 640, "the lady with the blue shirt", reasoning="  She is left. ")
    assert with_trace == "She is left.\n" + target


def test_qwen_target_matches_cookbook_and_qwen_scale():
    path = FIXTURES / "qwen_box_conventions.json"
    conv = json.loads(path.read_text())["qwen2vl_and_qwen3vl_relative_0_1000"]
    h, w = conv["image_h_w"]
    target = QWEN.format_target(conv["example_input_abs_xyxy"], w, h, 'the "big" cake', reasoning="It is big.")
    think, answer = target.split("\n</think>\n\n")
    assert think == "<think>\nIt is big."
    m = re.fullmatch(r"```json\n\[\n\t(.*)\n\]\n```", answer)
    assert m, answer
    assert json.loads(m.group(1)) == {"bbox_2d": conv["qwen2vl_format_output"], "label": 'the "big" cake'}
    # no trace: Qwen3's empty think block; Instruct checkpoints: the answer only
    assert QWEN.format_target([0, 0, 1, 1], 2, 2, "a").startswith("<think>\n\n</think>\n\n```json")
    assert QWEN_INSTRUCT.format_target([0, 0, 1, 1], 2, 2, "a").startswith("```json")


coords = st.floats(0, 1, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([QWEN, QWEN_INSTRUCT, INTERN]), st.integers(8, 4000), st.integers(8, 4000),
       coords, coords, coords, coords, st.one_of(st.none(), st.text(max_size=40)))
def test_target_parses_back_to_the_pixel_box(adapter, w, h, a, b, c, d, reasoning):
    x1, x2 = sorted((a * w, c * w))
    y1, y2 = sorted((b * h, d * h))
    ex, ey = rel1000_max_error(w, h)
    if x2 - x1 <= 2 * ex or y2 - y1 <= 2 * ey:  # may round to a zero-area box
        return
    text = adapter.format_target([x1, y1, x2, y2], w, h, "the second red circle", reasoning)
    parsed = adapter.parse(text, w, h)
    assert parsed.ok, (text, parsed.failure)
    for got, want, tol in zip(parsed.box, (x1, y1, x2, y2), (ex, ey, ex, ey)):
        assert abs(got - want) <= tol + 1e-9


def test_adapters_instantiate_from_a_lightning_cli_style_config():
    from jsonargparse import ArgumentParser

    from egm.models import GroundingAdapter, LoraSettings

    parser = ArgumentParser()
    parser.add_argument("--adapter", type=GroundingAdapter)
    cfg = parser.parse_object({"adapter": {
        "class_path": "egm.models.Qwen3VLAdapter",
        "init_args": {"pretrained_model_name_or_path": "Qwen/Qwen3-VL-2B-Thinking", "torch_dtype": "bfloat16",
                      "lora": {"rank": 8, "alpha": 16}, "max_pixels": 401408}}})
    ad = parser.instantiate_classes(cfg).adapter
    assert isinstance(ad, Qwen3VLAdapter) and ad.torch_dtype == "bfloat16" and ad.max_pixels == 401408
    assert ad.lora == LoraSettings(rank=8, alpha=16)
    cfg = parser.parse_object({"adapter": {"class_path": "egm.models.InternVLAdapter",
                                           "init_args": {"pretrained_model_name_or_path": "OpenGVLab/InternVL3-1B-hf"}}})
    assert isinstance(parser.instantiate_classes(cfg).adapter, InternVLAdapter)
