"""Generation on the tiny checkpoints: batched left padding, and end to end learn -> parse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from egm.boxes import rel1000_max_error
from egm.models import InternVLAdapter, Qwen3VLAdapter
from egm.models.tiny import FAMILIES

ADAPTERS = {"qwen3_vl": Qwen3VLAdapter, "internvl": InternVLAdapter}


def _ex(w, h, seed, sentence, task="vanilla", box=(4, 4, 40, 30), reasoning=None):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    return dict(image=img, sentence=sentence, task=task, box=list(box), width=w, height=h, reasoning=reasoning)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_left_padded_greedy_equals_one_by_one(tiny_dirs, family):
    ad = ADAPTERS[family](str(tiny_dirs[family]))
    torch.manual_seed(0)
    model = ad.load_model().eval()
    exs = [_ex(128, 96, 0, "the red circle"), _ex(64, 64, 1, "the small blue square behind the large triangle", "amodal"),
           _ex(96, 128, 2, "the third shape")]
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=ad.pad_token_id)
    batch = ad.collate_generate(exs)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # really padded
    with torch.no_grad():
        texts = ad.decode(model.generate(**batch, **kw), batch["input_ids"].shape[1])
        singles = []
        for ex in exs:
            one = ad.collate_generate([ex])
            singles += ad.decode(model.generate(**one, **kw), one["input_ids"].shape[1])
    assert texts == singles
    assert all(t.startswith(ad.response_prefix) and len(t) > len(ad.response_prefix) for t in texts)


@pytest.mark.parametrize("family", FAMILIES)
def test_end_to_end_learns_to_emit_a_box_that_parses_back(tiny_dirs, family):
    """collate -> forward+backward (overfit two samples) -> batched generate -> decode -> parse."""
    ad = ADAPTERS[family](str(tiny_dirs[family]))
    exs = [_ex(64, 64, 0, "the red circle", box=(8, 4, 40, 30), reasoning="It is red."),
           _ex(64, 48, 1, "the blue square", "amodal", box=(0, 12, 64, 40))]
    torch.manual_seed(0)
    model = ad.load_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = ad.collate_train(exs)
    for _ in range(60):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    model.eval()
    gen = ad.collate_generate(exs)
    with torch.no_grad():
        out = model.generate(**gen, max_new_tokens=60, do_sample=False, pad_token_id=ad.pad_token_id)
    texts = ad.decode(out, gen["input_ids"].shape[1])
    for text, ex in zip(texts, exs):
        assert text == ad.format_target(ex["box"], ex["width"], ex["height"], ex["sentence"], ex["reasoning"])
        parsed = ad.parse(text, ex["width"], ex["height"])
        assert parsed.ok and parsed.reasoning == (ex["reasoning"] or "")
        ex_, ey = rel1000_max_error(ex["width"], ex["height"])
        np.testing.assert_allclose(parsed.box, ex["box"], atol=max(ex_, ey) + 1e-9, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_with_completion_rebuilds_the_rollout_for_a_teacher_forced_pass(tiny_dirs, family):
    """GRPO path: one forward over prompt + sampled completion reproduces the greedy choices."""
    ad = ADAPTERS[family](str(tiny_dirs[family]))
    torch.manual_seed(0)
    model = ad.load_model().eval()
    gen = ad.collate_generate([_ex(128, 96, 0, "the red circle"), _ex(64, 64, 1, "the blue square", "amodal")])
    n_prompt = gen["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**gen, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=ad.pad_token_id)
        comp = out[:, n_prompt:]
        full = ad.with_completion(gen, comp, torch.ones_like(comp))
        for k in ad.token_keys:
            assert full[k].shape == full["input_ids"].shape and not full[k][:, n_prompt:].any()
        logits = model(**full).logits
    assert torch.equal(logits[:, n_prompt - 1:-1].argmax(-1), comp)
