"""Real-shaped checkpoints (egm.models.real): released token ids, templates, processors and shapes,
checked against independent references (tiktoken's own encoder, hand-computed image grids, the
released ids and parameter counts), and the recipes' stated resolution."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from egm.boxes import to_rel1000
from egm.models import ADAPTERS
from egm.models import real

FAMILIES = ["qwen3_vl", "internvl"]
REFCOCO_WH = (586, 480)  # a RefCOCO (COCO train2014) image size
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


_ADAPTERS: dict = {}


def _ad(real_dirs, family, **kw):
    """One adapter per (family, settings) for this module: loading the 151k-token processor takes seconds."""
    key = (family, tuple(sorted(kw.items())))
    if key not in _ADAPTERS:
        _ADAPTERS[key] = ADAPTERS[family](str(real_dirs[family]), **kw)
    return _ADAPTERS[key]


def _image(wh=REFCOCO_WH, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (wh[1], wh[0], 3), dtype=np.uint8))


def _example(i=0, **kw):
    return {"image": _image(seed=i), "sentence": f"the man in a red shirt {i}", "box": [40.0, 60.0, 300.0, 420.0],
            "id": f"refcoco_{i}", "reasoning": "The man on the left wears a red shirt.", **kw}


def test_bpe_equals_tiktoken_on_mixed_text(real_dirs):
    """The converted BPE encodes like tiktoken itself over the same ranks and regex (no special tokens)."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    enc = tiktoken.Encoding("qwen", pat_str=real.PRETOKENIZE_REGEX, mergeable_ranks=load_tiktoken_bpe(
        str(real.qwen_bpe_file())), special_tokens={})
    tok = _ad(real_dirs, "qwen3_vl").tokenizer
    texts = ["Hello world", " 1000", "\n\n", "Locate the man in a red shirt, output its bbox coordinates using JSON format.",
             '```json\n[\n\t{"bbox_2d": [68, 125, 512, 875], "label": "the man"}\n]\n```',
             "The occluded part of the zebra extends ~40% beyond the visible region.\n\n  tabs\tand   spaces",
             "图片左边的红色汽车 ほかの車 — naïve café 12345678 x² ∑ 🚗🚕",
             "it's they're we'll I'd DON'T 3.14159 -42 1e-5 (x1, y1, x2, y2)"]
    for t in texts:
        assert tok(t, add_special_tokens=False)["input_ids"] == enc.encode_ordinary(t), t
    # the ids transformers' own Qwen2 tokenizer test expects (ENV-NOTES "Real shapes, offline")
    assert tok("Hello world")["input_ids"] == [9707, 1879]
    assert tok(" 1000")["input_ids"] == [220, 16, 15, 15, 15] and tok("\n\n")["input_ids"] == [271]


@pytest.mark.parametrize("family", FAMILIES)
def test_added_tokens_sit_at_their_released_ids(real_dirs, family):
    tok = _ad(real_dirs, family).tokenizer
    added = real.QWEN3_ADDED if family == "qwen3_vl" else real.INTERNVL_ADDED
    for i, (text, special) in enumerate(added):
        tid = 151643 + i
        assert tok.convert_tokens_to_ids(text) == tid and tok(text, add_special_tokens=False)["input_ids"] == [tid]
        assert (tok.decode([tid], skip_special_tokens=True) == "") == special, text
    assert tok.eos_token_id == 151645 and tok.pad_token_id == 151643
    if family == "qwen3_vl":
        assert len(tok) == 151669
        assert tok.convert_tokens_to_ids(["<|image_pad|>", "<think>", "</think>"]) == [151655, 151667, 151668]
    else:  # 151,674 released tokens + <video> (transformers 5's processor needs a video token)
        assert len(tok) == 151675
        assert tok.convert_tokens_to_ids(["<IMG_CONTEXT>", "<ref>", "<box>"]) == [151667, 151670, 151672]


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_trunk_has_the_released_rows_tying_and_rope(real_dirs, family):
    ad = _ad(real_dirs, family)
    model = ad.load_model()
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    text = model.config.text_config
    if family == "qwen3_vl":
        assert emb.shape == (151936, 64) and head.data_ptr() == emb.data_ptr()  # tied, as 2B / 4B
        assert text.rope_parameters["rope_theta"] == 5_000_000.0 and text.rope_parameters["mrope_interleaved"]
        assert model.config.image_token_id == 151655
    else:
        assert emb.shape == head.shape == (151674, 64) and head.data_ptr() != emb.data_ptr()
        assert model.config.image_token_id == 151667 and model.config.vision_config.image_size == [448, 448]
    assert sum(p.numel() for p in model.parameters()) < 2.5e7  # the head dominates a tiny trunk


# hub model-card sizes: Qwen3-VL-{2B,4B,8B}-Thinking 2.13 / 4.44 / 8.77 B; InternVL3-{1B,2B,8B}-hf 0.938 / 2.09 / 7.94 B
@pytest.mark.parametrize("family,size,billions", [
    ("qwen3_vl", "2B", 2.13), ("qwen3_vl", "4B", 4.44), ("qwen3_vl", "8B", 8.77),
    ("internvl", "1B", 0.938), ("internvl", "2B", 2.09), ("internvl", "8B", 7.94)])
def test_released_sizes_have_the_released_parameter_counts(real_dirs, family, size, billions):
    import transformers

    from egm.compat import model_from_config

    tok = _ad(real_dirs, family).tokenizer
    cls = getattr(transformers, "Qwen3VLForConditionalGeneration" if family == "qwen3_vl"
                  else "InternVLForConditionalGeneration")
    with torch.device("meta"):
        model = model_from_config(cls, real.model_config(family, size, tok))
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, rel=5e-3)


def test_qwen3_vl_2b_shape_agrees_with_the_gpu_check_tool():
    """Two transcriptions of Qwen3-VL-2B's config.json (this module, tools/gpu_check_deepspeed.py) agree."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "tools" / "gpu_check_deepspeed.py"
    spec = importlib.util.spec_from_file_location("gpu_check_deepspeed", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    ours = real.ARCHITECTURES["qwen3_vl"]["2B"]
    for k, v in ours["text"].items():
        assert tool.QWEN3_VL_2B["text_config"][k] == v, k
    for k, v in ours["vision"].items():
        assert tool.QWEN3_VL_2B["vision_config"][k] == v, k
    assert tool.QWEN3_VL_2B["tie_word_embeddings"] == ours["tie_word_embeddings"]


def test_released_chat_templates_render_the_released_layout(real_dirs):
    q = _ad(real_dirs, "qwen3_vl")
    assert q.chat_prompt("Locate x") == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Locate x"
                                         "<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert q.response_prefix == "<think>\n"
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}
    two = [user, {"role": "assistant", "content": "<think>\nR1\n</think>\n\nA1"}, {"role": "user", "content": "Q2"},
           {"role": "assistant", "content": "<think>\nR2\n</think>\n\nA2"}]
    # earlier assistant turns lose their reasoning; the last keeps it; a system turn only when given
    assert q.processor.apply_chat_template(two, tokenize=False) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n<think>\nR2\n</think>\n\nA2<|im_end|>\n")
    sys_turn = [{"role": "system", "content": "S"}, user]
    assert q.processor.apply_chat_template(sys_turn, tokenize=False).startswith("<|im_start|>system\nS<|im_end|>\n")
    i = _ad(real_dirs, "internvl")
    assert i.chat_prompt("Locate x") == "<|im_start|>user\n<IMG_CONTEXT>\nLocate x<|im_end|>\n<|im_start|>assistant\n"
    assert i.response_prefix == ""


@pytest.mark.parametrize("family,kwargs,tokens", [
    # Qwen3-VL: 32x32 px per token after the 2x2 merge; 586x480 -> 576x480 (18 x 15) at the released cap
    ("qwen3_vl", {}, 270),
    ("qwen3_vl", {"max_pixels": 65536}, 56),  # scaled by sqrt(281,280 / 65,536), floored to 32: 256x224
    ("qwen3_vl", {"max_pixels": 16384}, 12),  # below the released 65,536 px floor: 128x96
    # InternVL3: 448 px tiles, 256 tokens each; 586/480 = 1.22 -> 4x3 grid (<= 12 tiles) + thumbnail
    ("internvl", {}, 13 * 256),
    ("internvl", {"max_patches": 1}, 256),  # one tile, no thumbnail
])
def test_image_tokens_of_a_refcoco_image(real_dirs, family, kwargs, tokens):
    ad = _ad(real_dirs, family, **kwargs)
    batch = ad.collate_generate([_example()])
    assert ad.image_token_count(batch["input_ids"]) == tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_labels_are_exactly_the_released_templates_assistant_tokens(real_dirs, family):
    """The SFT batch equals the processor's encoding of the whole conversation rendered by the
    released template, and its labels are exactly the assistant turn's tokens (decoded)."""
    kw = {"max_pixels": 65536} if family == "qwen3_vl" else {"max_patches": 1}
    ad = _ad(real_dirs, family, **kw)
    ex = _example()
    batch = ad.collate_train([ex])
    target = ad.format_target(ex["box"], *REFCOCO_WH, ex["sentence"], ex["reasoning"])
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ad.prompt(ex["sentence"])}]},
            {"role": "assistant", "content": target}]
    text = ad.processor.apply_chat_template(conv, tokenize=False)
    ref = ad.processor(images=[ex["image"]], text=[text], return_tensors="pt", **ad.image_kwargs())["input_ids"][0]
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert text.endswith("<|im_end|>\n") and ids.tolist() == ref[:-1].tolist()  # all but the template's final "\n"
    on = labels != -100
    assert torch.equal(labels[on], ids[on]) and on[-int(on.sum()):].all()  # one contiguous block at the end
    header = text.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
    assert ad.response_prefix + ad.tokenizer.decode(labels[on]) == text[header:-1]
    if family == "qwen3_vl":  # the generation prompt's "<think>\n" is prompt, the reasoning is label
        assert ad.tokenizer.decode(labels[on]).startswith("The man on the left")


@pytest.mark.parametrize("family", FAMILIES)
def test_answers_parse_after_real_tokenisation(real_dirs, family):
    """format_target -> token ids -> adapter.decode -> parse gives the box back (InternVL's <ref>/<box>
    are special tokens: decode must keep them)."""
    ad = _ad(real_dirs, family)
    w, h = REFCOCO_WH
    box = [40.0, 60.0, 300.0, 420.0]
    target = ad.format_target(box, w, h, "the man", "He stands left.")
    body = target[len(ad.response_prefix):]
    tok = ad.tokenizer
    ids = tok(body, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id]
    text = ad.decode(torch.tensor([[7, 8] + ids]), 2)[0]
    assert text == target
    parsed = ad.parse(text, w, h)
    assert parsed.failure is None and parsed.rel_box == tuple(float(v) for v in to_rel1000(box, w, h))
    if family == "internvl":
        assert "<box>" not in tok.decode(ids, skip_special_tokens=True)  # why decode keeps special tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_that_fills_max_length_warns_with_the_sample_id(real_dirs, family, caplog):
    ad = _ad(real_dirs, family, max_length=200)  # 270 / 3,328 image tokens alone
    with caplog.at_level(logging.WARNING, logger="egm.models.base"):
        batch = ad.collate_train([_example(3)])
    assert (batch["labels"] == -100).all() and ad.n_prompt_full >= 1
    n_img = 270 if family == "qwen3_vl" else 3328
    assert "'refcoco_3'" in caplog.text and "fills max_length 200" in caplog.text and f"{n_img} of them image" in caplog.text
    caplog.clear()
    ok = _ad(real_dirs, family, max_length=4096)
    with caplog.at_level(logging.WARNING, logger="egm.models.base"):
        ok.collate_train([_example(3)])
    assert "fills max_length" not in caplog.text


def _adapter_args(cfg):
    """``(class_path, init_args)`` of the adapter of a recipe (SFT or GRPO module)."""
    ad = cfg["model"]["init_args"]["adapter"]
    return ad["class_path"], ad.get("init_args", {})


RECIPES = sorted(p.name for p in CONFIGS.glob("*.yaml")
                 if "adapter" in (yaml.safe_load(p.read_text()).get("model") or {}).get("init_args", {}))


def test_recipes_exist():
    assert {"sft_qwen3vl.yaml", "sft_internvl.yaml", "rl_qwen3vl.yaml", "rl_internvl.yaml", "demo_sft.yaml"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_states_its_resolution_and_its_image_tokens(real_dirs, recipe):
    """max_pixels (Qwen3-VL) / max_patches (InternVL) is set, and the comment on its line gives the image
    tokens of a 586x480 RefCOCO image, recomputed here with the released processor."""
    text = (CONFIGS / recipe).read_text()
    cls, args = _adapter_args(yaml.safe_load(text))
    key, family = ("max_pixels", "qwen3_vl") if cls.endswith("Qwen3VLAdapter") else ("max_patches", "internvl")
    assert isinstance(args.get(key), int), f"{recipe}: model.init_args.adapter.init_args.{key} is not set"
    line = next(ln for ln in text.splitlines() if re.match(rf"\s*{key}:", ln))
    m = re.search(r"(\d[\d,]*) image tokens for a 586x480 RefCOCO image", line)
    assert m, f"{recipe}: the {key} line needs '# ... N image tokens for a 586x480 RefCOCO image'"
    ad = _ad(real_dirs, family, **{key: args[key]})
    assert ad.image_token_count(ad.collate_generate([_example()])["input_ids"]) == int(m.group(1).replace(",", ""))


@pytest.mark.parametrize("job,difficulties", [("vanilla", ("plain", "ordinal")), ("amodal", ("amodal",))])
def test_curated_samples_render_for_both_families(real_dirs, tmp_path, job, difficulties):
    """``egm curate`` (oracle teacher: Fig. 8, or Figs. 9 -> 10 -> 11) -> manifest -> SFT batch of each
    family with the released tokenizer and template: the labels decode to the teacher's trace and the
    family's answer, which parses back to the ground-truth box; the Fig. 7 prompt of the task is the prompt."""
    from dataclasses import replace

    from egm.curation.jobs import curate
    from egm.data.manifest import read_manifest, write_manifest
    from egm.data.synthetic import make_synthetic
    from egm.models.prompts import task_prompt

    paths = make_synthetic(str(tmp_path / "w"), n_train=0, n_val=3, n_test=0, image_size=48,
                           difficulties=list(difficulties))
    bare = tmp_path / "in.jsonl"
    write_manifest(bare, [replace(s, reasoning=None) for s in read_manifest(paths["val"])])
    out = tmp_path / "curated.jsonl"
    stats = curate(str(bare), str(out), job=job, teacher_class="egm.curation.oracle:OracleTeacher", concurrency=1,
                   progress=False)
    curated = read_manifest(out)
    assert stats["kept"] == len(curated) > 0 and all(s.reasoning for s in curated)
    for family in FAMILIES:
        ad = _ad(real_dirs, family)
        for s in curated:
            ex = {"sample": s, "image": Image.open(s.image).convert("RGB")}
            batch = ad.collate_train([ex])
            labels = batch["labels"][0][batch["labels"][0] != -100]
            body = ad.tokenizer.decode(labels)
            assert body.endswith("<|im_end|>") and s.reasoning.strip() in body
            assert task_prompt(family, s.task, s.sentence) in ad.tokenizer.decode(batch["input_ids"][0])
            parsed = ad.parse(ad.response_prefix + body.removesuffix("<|im_end|>"), s.width, s.height)
            assert parsed.failure is None
            assert parsed.rel_box == tuple(float(v) for v in to_rel1000(s.box, s.width, s.height))


def test_make_tiny_routes_shape_real_and_refuses_bad_shapes(tmp_path):
    from egm.errors import InputError
    from egm.models.tiny import make_tiny

    with pytest.raises(InputError, match="shape must be 'toy' or 'real'"):
        make_tiny("qwen3_vl", tmp_path / "a", shape="released")
    with pytest.raises(InputError, match="shape='real' takes size/seed/dtype"):
        make_tiny("qwen3_vl", tmp_path / "b", shape="real", text_hidden=32)
    with pytest.raises(InputError, match="unknown size '3B' for qwen3_vl"):
        make_tiny("qwen3_vl", tmp_path / "c", shape="real", size="3B")
