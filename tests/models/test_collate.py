"""Collation on the tiny checkpoints: label masking token by token, padding, image tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from egm.models import IGNORE_INDEX, InternVLAdapter, Qwen3VLAdapter
from egm.models.tiny import FAMILIES

ADAPTERS = {"qwen3_vl": Qwen3VLAdapter, "internvl": InternVLAdapter}


def _image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def examples():
    return [
        dict(image=_image(128, 96, 0), sentence="the red circle", task="vanilla", box=[10, 20, 60, 90],
             width=128, height=96, reasoning="The red circle is on the left."),
        dict(image=_image(64, 64, 1), sentence="the small blue square behind the triangle", task="amodal",
             box=[0, 5, 30, 64], width=64, height=64, reasoning=None),
        dict(image=_image(128, 128, 2), sentence="the third shape", task="vanilla", box=[64, 64, 128, 128],
             width=128, height=128, reasoning="Counting from the left, the third shape is green and it "
                                              "extends slightly beyond the border of the image frame."),
    ]


def _assistant_span(ids: list[int], header: list[int], eot: int) -> tuple[int, int]:
    """Independent reference: after the last assistant header up to and including <|im_end|>."""
    starts = [i for i in range(len(ids) - len(header) + 1) if ids[i:i + len(header)] == header]
    begin = starts[-1] + len(header)
    return begin, ids.index(eot, begin) + 1


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_are_exactly_the_assistant_tokens(tiny_dirs, family):
    ad = ADAPTERS[family](str(tiny_dirs[family]))
    tok = ad.tokenizer
    exs = examples()
    batch = ad.collate_train(exs)
    ids, labels, att = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == att.shape and ids.shape[0] == 3
    header = tok("<|im_start|>assistant\n" + ("<think>\n" if family == "qwen3_vl" else ""),
                 add_special_tokens=False)["input_ids"]
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    image_ids = {tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<IMG_CONTEXT>", "<img>", "</img>")} - {None}
    n_real = att.sum(1).tolist()
    assert max(n_real) == ids.shape[1]
    for i, ex in enumerate(exs):
        row_ids, row_lab = ids[i].tolist(), labels[i].tolist()
        assert att[i, :n_real[i]].all() and not att[i, n_real[i]:].any()  # right padding
        assert all(t == tok.pad_token_id for t in row_ids[n_real[i]:])
        begin, end = _assistant_span(row_ids[:n_real[i]], header, eot)
        assert end == n_real[i]  # the sequence ends with the end-of-turn token
        for j, (t, lab) in enumerate(zip(row_ids, row_lab)):
            assert lab == (t if begin <= j < end else IGNORE_INDEX), (i, j)
            if t in image_ids:
                assert lab == IGNORE_INDEX
        assert sum(t in image_ids for t in row_ids) > 0
        # the supervised text is the target (minus what the generation prompt already says)
        target = ad.format_target(ex["box"], ex["width"], ex["height"], ex["sentence"], ex["reasoning"])
        sup = tok.decode([t for t in row_lab if t != IGNORE_INDEX], skip_special_tokens=False)
        assert ad.response_prefix + sup == target + "<|im_end|>"


def test_qwen_mm_token_type_ids_mark_image_tokens(tiny_dirs):
    ad = Qwen3VLAdapter(str(tiny_dirs["qwen3_vl"]))
    for batch in (ad.collate_train(examples()), ad.collate_generate(examples())):
        pad = ad.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == pad).long())
        # tiny processor: one token per 32x32 pixels after the 2x2 merge (128x96 -> 12, 64x64 -> 4)
        assert (batch["input_ids"] == pad).sum(1).tolist() == [12, 4, 16]
        assert batch["image_grid_thw"].tolist() == [[1, 6, 8], [1, 4, 4], [1, 8, 8]]


def test_qwen_max_pixels_bounds_visual_tokens(tiny_dirs):
    ad = Qwen3VLAdapter(str(tiny_dirs["qwen3_vl"]), max_pixels=64 * 64)
    batch = ad.collate_generate(examples()[2:])  # 128x128 shrinks to 64x64 -> 4 tokens
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_batch_is_left_padded_prompts(tiny_dirs, family):
    ad = ADAPTERS[family](str(tiny_dirs[family]))
    exs = examples()
    batch = ad.collate_generate(exs)
    assert "labels" not in batch
    for i, ex in enumerate(exs):
        single = ad.collate_generate([ex])
        n = single["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][i, -n:], single["input_ids"][0])
        assert batch["attention_mask"][i, -n:].all() and not batch["attention_mask"][i, :-n].any()
        assert (batch["input_ids"][i, :-n] == ad.pad_token_id).all()
        text = ad.tokenizer.decode(single["input_ids"][0], skip_special_tokens=False)
        assert text.endswith("<|im_start|>assistant\n" + ad.response_prefix)
    pix = torch.cat([ad.collate_generate([ex])["pixel_values"] for ex in exs])
    assert torch.equal(batch["pixel_values"], pix)


def test_sample_wrapper_and_target_override(tiny_dirs):
    from egm.data.manifest import Sample

    ad = InternVLAdapter(str(tiny_dirs["internvl"]))
    ex = examples()[0]
    s = Sample(id="a", image="x.png", width=128, height=96, sentence=ex["sentence"], task="vanilla",
               box=ex["box"], split="train", source="synthetic", reasoning=ex["reasoning"])
    assert torch.equal(ad.collate_train([{"sample": s, "image": ex["image"]}])["labels"],
                       ad.collate_train([ex])["labels"])
    b = ad.collate_train([{**ex, "target": "hello"}])
    sup = [t for t in b["labels"][0].tolist() if t != IGNORE_INDEX]
    assert ad.tokenizer.decode(sup) == "hello<|im_end|>"


def test_long_target_is_cut_and_counted(tiny_dirs):
    ad = InternVLAdapter(str(tiny_dirs["internvl"]), max_length=90)
    ex = {**examples()[2], "reasoning": "left " * 200}
    b = ad.collate_train([ex])
    assert b["input_ids"].shape[1] == 90 and ad.n_truncated == 1
    assert (b["labels"] != IGNORE_INDEX).any()


def test_missing_image_is_a_clear_error(tiny_dirs):
    ad = InternVLAdapter(str(tiny_dirs["internvl"]))
    with pytest.raises(ValueError, match="PIL image"):
        ad.collate_train([{k: v for k, v in examples()[0].items() if k != "image"}])
