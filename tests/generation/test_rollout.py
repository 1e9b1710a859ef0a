"""Rollout engines: HF generate on the tiny model, response layout, vLLM without vLLM."""

from __future__ import annotations

import sys

import pytest
import torch
from PIL import Image

from egm.data.manifest import read_manifest
from egm.data.synthetic import make_synthetic
from egm.generation.sampling import SamplingParams
from egm.models import Qwen3VLAdapter
from egm.generation.hf import HFEngine
from egm.generation.rollout import responses_from_rows
from egm.rl.ppo import token_logprobs
from egm.generation.vllm import VLLMEngine, vllm_weight_names

SAMPLING = SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=10)


@pytest.fixture(scope="module")
def setup(qwen_dir, tmp_path_factory):
    paths = make_synthetic(str(tmp_path_factory.getbasetemp() / "syn_rollout"), n_train=4, n_val=5, n_test=5, image_size=64)
    exs = [{"sample": s, "image": Image.open(s.image).convert("RGB")} for s in read_manifest(paths["val"])[:3]]
    ad = Qwen3VLAdapter(str(qwen_dir))
    torch.manual_seed(0)
    return ad, ad.load_model(), exs


def test_responses_from_rows_cuts_after_first_stop_and_flags_truncation():
    ids, mask, lengths, trunc = responses_from_rows([[5, 6, 9, 7], [5, 5, 5, 5, 5], [9]], {9}, 4, pad_id=0)
    assert lengths.tolist() == [3, 4, 1] and trunc.tolist() == [False, True, False]
    assert ids.tolist() == [[5, 6, 9, 0], [5, 5, 5, 5], [9, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_placeholder_tokens_cut_the_response_and_count_as_truncated(setup):
    ad, model, _ = setup
    img = model.config.image_token_id
    from egm.generation.rollout import placeholder_token_ids

    assert img in placeholder_token_ids(model.config)
    ids, mask, lengths, trunc = responses_from_rows([[5, img, 9], [img, 5], [5, 9]], {9}, 4, 0, {img})
    assert lengths.tolist() == [1, 1, 2] and trunc.tolist() == [True, True, False]
    assert img not in ids.tolist()[0] + ids.tolist()[1]


def test_hf_engine_shapes_groups_and_flags(setup):
    ad, model, exs = setup
    ro = HFEngine(ad, model, max_batch=4).generate(exs, n=3, sampling=SAMPLING, seed=1)
    B = len(exs) * 3
    assert len(ro) == B and ro.completion_ids.shape[0] == B and len(ro.texts) == B
    assert ro.completion_ids.shape[1] <= SAMPLING.max_new_tokens
    assert ro.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert torch.equal(ro.completion_mask.sum(1), ro.lengths)
    stops = ad.stop_token_ids()
    for row, n, tr in zip(ro.completion_ids.tolist(), ro.lengths.tolist(), ro.truncated.tolist()):
        has_stop = any(t in stops for t in row[:n])
        assert tr == (not has_stop)
        assert (n == SAMPLING.max_new_tokens) if tr else (row[n - 1] in stops)
    assert ro.truncated.any()  # a random tiny model rarely stops within 10 tokens


def test_hf_engine_is_deterministic_with_a_seed(setup):
    ad, model, exs = setup
    eng = HFEngine(ad, model)
    a = eng.generate(exs[:2], 4, SAMPLING, seed=7)
    b = eng.generate(exs[:2], 4, SAMPLING, seed=7)
    c = eng.generate(exs[:2], 4, SAMPLING, seed=8)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert not torch.equal(a.completion_ids, c.completion_ids)
    assert len(set(map(tuple, a.completion_ids.tolist()))) > 1  # G samples of one prompt differ


def test_recomputed_logprobs_do_not_depend_on_batching(setup):
    ad, model, exs = setup
    ro = HFEngine(ad, model).generate(exs, 2, SAMPLING, seed=3)
    with torch.no_grad():
        inp, comp, mask = ro.model_inputs(ad)
        full, _ = token_logprobs(model, inp, comp, temperature=1.0)
        inp1, comp1, _ = ro.model_inputs(ad, [4])
        one, _ = token_logprobs(model, inp1, comp1, temperature=1.0)
    n = int(ro.lengths[4])
    assert full.shape == comp.shape
    torch.testing.assert_close(one[0, :n], full[4, :n], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(full[mask.bool()]).all() and (full[mask.bool()] <= 0).all()


def test_vllm_missing_gives_install_hint(setup, monkeypatch):
    ad, _, _ = setup
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r"pip install 'egm\[gpu\]'"):
        VLLMEngine(ad)


def test_vllm_weight_names_strip_peft_wrapping(setup):
    from peft import LoraConfig, get_peft_model

    _, model, _ = setup
    plain = {n: p.shape for n, p in model.named_parameters()}
    import copy

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    named = {n: t.shape for n, t in vllm_weight_names(peft_model)}
    assert named == plain
