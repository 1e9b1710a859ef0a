"""Loading, saving (LoRA merged), freezing and the tiny checkpoint builder."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from egm.errors import InputError
from egm.models import InternVLAdapter, LoraSettings, Qwen3VLAdapter
from egm.models.tiny import FAMILIES, make_tiny

ADAPTERS = {"qwen3_vl": Qwen3VLAdapter, "internvl": InternVLAdapter}


def _batch(ad):
    rng = np.random.default_rng(0)
    exs = [dict(image=Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)), sentence=s, task=t,
                box=[4, 4, 40, 30], width=w, height=h, reasoning=r)
           for (w, h), s, t, r in [((96, 64), "the red circle", "vanilla", "It is red."),
                                   ((64, 64), "the blue square", "amodal", None)]]
    return ad.collate_train(exs)


@torch.no_grad()
def _logits(model, batch):
    model.eval()
    return model(**batch).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_gives_identical_logits(tiny_dirs, family, tmp_path):
    ad = ADAPTERS[family](str(tiny_dirs[family]))
    model = ad.load_model()
    assert type(model).__name__ == ad.model_class
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
    batch = _batch(ad)
    ref = _logits(model, batch)
    out = ad.save_pretrained(model, tmp_path / "saved")
    ad2 = ADAPTERS[family](str(out))
    b2 = _batch(ad2)
    assert all(torch.equal(batch[k], b2[k]) for k in batch)  # the saved processor encodes alike
    assert torch.equal(_logits(ad2.load_model(), b2), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_the_language_model_and_merges_on_save(tiny_dirs, family, tmp_path):
    ad = ADAPTERS[family](str(tiny_dirs[family]), lora=LoraSettings(rank=4, alpha=8, dropout=0.0))
    model = ad.load_model()
    lora_names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora_names and all("language_model" in n for n in lora_names)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f".{proj}." in n for n in lora_names), proj
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora_names)
    batch = _batch(ad)
    base = _logits(model, batch)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter change the function
        g = torch.Generator().manual_seed(0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    tuned = _logits(model, batch)
    assert not torch.allclose(tuned, base, atol=1e-3)
    ad.save_pretrained(model, tmp_path / "merged")
    assert any("lora_" in n for n, _ in model.named_parameters())  # training model untouched
    plain = getattr(transformers, ad.model_class).from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(_logits(plain, batch), tuned, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_freeze_vision_and_gradient_checkpointing(tiny_dirs, family):
    ad = ADAPTERS[family](str(tiny_dirs[family]), freeze_vision=True, gradient_checkpointing=True)
    model = ad.load_model()
    vision = {id(p) for p in ad.vision_tower(model).parameters()}
    assert vision
    for p in model.parameters():
        assert p.requires_grad == (id(p) not in vision)
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    model.train()
    model(**_batch(ad)).loss.backward()
    assert all(p.grad is None for p in ad.vision_tower(model).parameters())
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_bad_dtype_is_rejected_at_construction():
    with pytest.raises(ValueError, match="torch_dtype"):
        Qwen3VLAdapter("org/x", torch_dtype="float33")  # a hub id: the dtype check comes first


def test_make_tiny_is_idempotent_and_refuses_foreign_folders(tmp_path):
    out = make_tiny("internvl", tmp_path / "t", text_layers=1)
    stamp = os.stat(out / "model.safetensors").st_mtime_ns
    assert make_tiny("internvl", out, text_layers=1) == out
    assert os.stat(out / "model.safetensors").st_mtime_ns == stamp  # identical: left alone
    make_tiny("internvl", out, text_layers=2)  # a different tiny build replaces it
    assert transformers.AutoConfig.from_pretrained(out).text_config.num_hidden_layers == 2
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        make_tiny("internvl", tmp_path / "mine")
    with pytest.raises(ValueError, match="dims"):
        make_tiny("internvl", tmp_path / "u", hidden=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "t"]  # no temp folders left


def test_tiny_tokenizer_splits_digits_and_keeps_words_whole(tiny_dirs):
    tok = Qwen3VLAdapter(str(tiny_dirs["qwen3_vl"])).tokenizer
    assert tok.tokenize("[1000, 7]") == ["[", "1", "0", "0", "0", ",", "Ġ", "7", "]"]
    for w in ("left", "circle", "occluded", "significantly", "triangle", "second"):
        assert len(tok.tokenize(" " + w)) == 1, w
    text = 'Locate the red circle amodally\n```json\n[\n\t{"bbox_2d": [1, 2, 3, 4]}\n]\n```'
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_init_seed_changes_the_weights_but_not_the_vocabulary(tmp_path):
    """``egm demo --seed`` varies the initialisation over one shared tokenizer."""
    import json

    import safetensors.torch

    a = make_tiny("qwen3_vl", tmp_path / "a", text_layers=1)
    b = make_tiny("qwen3_vl", tmp_path / "b", text_layers=1, init_seed=1)
    c = make_tiny("qwen3_vl", tmp_path / "c", text_layers=1, init_seed=0)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    wa, wb, wc = (safetensors.torch.load_file(d / "model.safetensors") for d in (a, b, c))
    assert wa.keys() == wb.keys()
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    assert all(torch.equal(wa[k], wc[k]) for k in wa)  # init_seed = seed is the default
    assert json.loads((b / "egm_tiny.json").read_text())["init_seed"] == 1


def test_check_weights_names_the_truncated_shard(tmp_path):
    """A sharded folder whose second shard lost its tail (an interrupted copy): that shard is named."""
    from safetensors.torch import save_file

    from egm.errors import InputError
    from egm.models.base import check_weights

    for i in (1, 2):
        save_file({f"w{i}": torch.arange(256, dtype=torch.float32)}, str(tmp_path / f"model-0000{i}-of-00002.safetensors"))
    check_weights(tmp_path)  # intact: passes
    check_weights("Qwen/Qwen3-VL-2B-Thinking")  # a hub id: left to the hub
    shard = tmp_path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(InputError, match=rf"^{shard}: unreadable weights \(.*file not fully covered\)"):
        check_weights(tmp_path)


def test_vision_position_code_is_a_smooth_grid_code(tiny_dirs, tmp_path):
    """Issue 25: the tiny vision towers start with a 2-D sine-cosine position code (std 1), from
    which a patch's row and column are an exact linear read-out; InternVL's class-token row
    stays random. Checked on the written checkpoints of both families."""
    from egm.models.tiny import sincos_grid

    code = sincos_grid(8, 64).double()
    assert code.shape == (64, 64) and code.std().item() == pytest.approx(1.0, abs=1e-6)
    A = torch.cat([code, torch.ones(64, 1, dtype=torch.float64)], 1)
    rows, cols = torch.arange(8.0).repeat_interleave(8).double(), torch.arange(8.0).repeat(8).double()
    for target in (rows, cols):
        fit = A @ (torch.linalg.pinv(A) @ target)
        assert (fit - target).abs().max().item() < 1e-9
    # neighbouring patches are closer in code space than distant ones (a smooth code, not a lookup table)
    d = torch.cdist(code, code)
    assert d[0, 1] < d[0, 7] and d[0, 8] < d[0, 56]
    for family in FAMILIES:
        model = transformers.AutoModelForImageTextToText.from_pretrained(tiny_dirs[family])
        name, p = next((n, p) for n, p in model.named_parameters()
                       if n.endswith(("visual.pos_embed.weight", "vision_tower.embeddings.position_embeddings")))
        p = p.detach().reshape(-1, p.shape[-1])
        cls = p.shape[0] - int(p.shape[0] ** 0.5) ** 2  # InternVL: one class-token row first
        g = int((p.shape[0] - cls) ** 0.5)
        torch.testing.assert_close(p[cls:], sincos_grid(g, p.shape[-1]), rtol=0, atol=1e-6, msg=name)
    # the earlier init, kept for the comparison of docs/demo.md: random numbers of the same scale
    rnd = make_tiny("qwen3_vl", tmp_path / "random", vision_position="random")
    p = transformers.AutoModelForImageTextToText.from_pretrained(rnd).model.visual.pos_embed.weight.detach()
    assert p.std().item() == pytest.approx(1.0, abs=0.05)
    assert (p - sincos_grid(8, 64)).abs().max().item() > 1.0
    with pytest.raises(InputError, match="vision_position"):
        make_tiny("qwen3_vl", tmp_path / "bad", vision_position="learned")


def test_demo_patch_size_gives_64_image_tokens_with_a_position_code_per_patch(tmp_path):
    """Issue 25: the CPU demo's tiny Qwen3-VL uses 8 px patches, so a 128x128 demo image is 16 x 16
    patches and 64 image tokens after the 2x2 merge (16 with the default 16 px patches), and the
    vision tower's position table is the sine-cosine code of that 16 x 16 grid (not an
    interpolation of a coarser one). The model runs on what its own processor produces."""
    from PIL import Image

    from egm.models import Qwen3VLAdapter
    from egm.models.tiny import sincos_grid

    tokens = {}
    for patch in (16, 8):
        path = make_tiny("qwen3_vl", tmp_path / f"p{patch}", patch_size=patch)
        ad = Qwen3VLAdapter(str(path), max_pixels=128 * 128)
        enc = ad.processor(images=[Image.new("RGB", (128, 128), "white")],
                           text=["<|vision_start|><|image_pad|><|vision_end|>the red circle"], return_tensors="pt")
        model = ad.load_model()
        assert model(**enc).logits.shape[:2] == enc["input_ids"].shape
        tokens[patch] = int((enc["input_ids"] == model.config.image_token_id).sum())
        table = model.model.visual.pos_embed.weight.detach()
        g = 128 // patch
        assert table.shape[0] == g * g
        torch.testing.assert_close(table, sincos_grid(g, table.shape[1]), rtol=0, atol=1e-6)
    assert tokens == {16: 16, 8: 64}
