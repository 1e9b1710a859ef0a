"""Budget forcing (egm.generation.budget) on tiny checkpoints: HF generate against a hand-rolled
greedy loop, the early-stop path on a model that closes its reasoning, and vLLM against HF."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from egm.data.manifest import read_manifest
from egm.data.synthetic import make_synthetic
from egm.generation.budget import BudgetPlan, hf_budget_generate, reasoning_layout
from egm.generation.hf import count_generated, hf_generate
from egm.generation.rollout import encode_prompts, placeholder_token_ids
from egm.generation.sampling import SamplingParams
from egm.models import ADAPTERS

FAMILIES = ["qwen3_vl", "internvl"]
M = 16  # Table 7 max length of these tests
GREEDY = SamplingParams(max_new_tokens=M)
ANSWER = 5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_synthetic(str(tmp_path_factory.getbasetemp() / "syn_budget"), n_train=0, n_val=5, n_test=0,
                          image_size=64)


def _examples(world, n=3):
    return [{"sample": s, "image": Image.open(s.image).convert("RGB")} for s in read_manifest(world["val"])[:n]]


def _plain(ad, model, exs, max_new=M) -> list[list[int]]:
    """Plain greedy decoding (no budget), each row cut after its first stop token."""
    batch = ad.collate_generate(exs)
    new = hf_generate(ad, model, batch, SamplingParams(max_new_tokens=max_new))
    return [r[:n] for r, n in zip(new.tolist(), count_generated(new, ad.stop_token_ids()))]


@torch.no_grad()
def _greedy_loop(ad, model, ex, ids: list[int], n: int) -> list[int]:
    """Reference: argmax of a full forward (no KV cache) ``n`` times after prompt + ``ids``."""
    enc = encode_prompts(ad, [ex])[0]
    out: list[int] = []
    for _ in range(n):
        c = torch.tensor([ids + out])
        logits = model(**ad.with_completion(enc, c, torch.ones_like(c))).logits[0, -1]
        out.append(int(logits.argmax()))
        if out[-1] in ad.stop_token_ids():
            break
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_is_the_adapters_target_layout(tiny_dirs, family):
    """forced/empty texts are exactly what ``format_target`` puts between reasoning and answer."""
    ad = ADAPTERS[family](str(tiny_dirs[family]))
    lay = reasoning_layout(ad)
    with_r = ad.format_target([8, 8, 40, 40], 64, 64, "the red circle", reasoning="R")
    empty = ad.format_target([8, 8, 40, 40], 64, 64, "the red circle")
    head = ad.response_prefix + "R" + lay.forced
    assert with_r.startswith(head)
    assert empty == ad.response_prefix + lay.empty + with_r[len(head):]
    assert lay.close in lay.forced and lay.close in lay.empty
    with pytest.raises(ValueError, match="delimiter"):
        reasoning_layout(ADAPTERS["qwen3_vl"](str(tiny_dirs["qwen3_vl"]), thinking=False))


def test_plan_splits_token_rows_by_hand():
    """Phase-1 rows -> kind, reasoning, what is appended and the answer allowance (close 9, stop 2)."""
    plan = BudgetPlan(budget=4, close_id=9, forced_ids=[7, 9, 8], empty_ids=[9, 8], stop_ids=frozenset({2}),
                      max_new_tokens=10, answer_tokens=3)
    assert plan.split([5, 9, 0, 0]) == ("closed", [5, 9])           # the model closed it: early stop
    assert plan.appended("closed", [5, 9]) == [] and plan.allowance("closed", [5, 9]) == 8
    assert plan.split([5, 6, 7, 8]) == ("forced", [5, 6, 7, 8])     # cut at the budget
    assert plan.appended("forced", [5, 6, 7, 8]) == [7, 9, 8] and plan.allowance("forced", [5]) == 3
    assert plan.appended("forced", []) == [9, 8]                      # budget 0: empty reasoning
    assert plan.split([5, 2, 0, 0]) == ("finished", [5, 2]) and plan.allowance("finished", [5, 2]) == 0
    assert plan.cut_answer([4, 4, 2, 4], 3) == [4, 4, 2] and plan.cut_answer([4, 4, 4, 4], 3) == [4, 4, 4]
    big = BudgetPlan(12, 9, [7], [9], frozenset({2}), 10, 3)  # a budget >= max length never binds
    assert big.split([5] * 10) == ("truncated", [5] * 10) and big.allowance("truncated", [5] * 10) == 0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", FAMILIES)
def test_budget_is_honoured_and_answer_forced(tiny_dirs, world, family):
    """(a)+(c) reasoning <= B tokens (the first B of plain greedy decoding), the forced text after it,
    the answer = a hand-rolled greedy continuation, tokens = reasoning + answer (forced not counted)."""
    ad = ADAPTERS[family](str(tiny_dirs[family]))
    model = ad.load_model().eval()
    exs = _examples(world)
    lay, tok = reasoning_layout(ad), ad.tokenizer
    plain = _plain(ad, model, exs)
    for b in (0, 3, 7):
        answers = hf_budget_generate(ad, model, exs, b, GREEDY, answer_tokens=ANSWER)
        for ex, p, a in zip(exs, plain, answers):
            assert len(a.reasoning_ids) <= b and a.reasoning_ids == p[:len(a.reasoning_ids)]
            assert a.num_tokens == len(a.reasoning_ids) + len(a.answer_ids)
            if a.kind == "forced":  # the random model does not close its reasoning within B
                assert len(a.reasoning_ids) == b and len(a.answer_ids) <= ANSWER
                forced = lay.forced if b else lay.empty
                assert a.forced_ids == tok(forced, add_special_tokens=False)["input_ids"]
                assert a.text.startswith(ad.response_prefix + tok.decode(a.reasoning_ids) + forced)
                ref = _greedy_loop(ad, model, ex, a.reasoning_ids + a.forced_ids, ANSWER)
                assert a.answer_ids == ref
            if b == 0:
                assert a.kind == "forced" and a.reasoning_ids == []
                assert a.text.startswith(ad.response_prefix + lay.empty)  # (c) empty reasoning
    assert any(a.kind == "forced" for a in answers)


def _closing_model(ad, model, exs):
    """The tiny model with ``lm_head`` rows of a token it writes early and of the close token swapped:
    it now closes its reasoning by itself, at the second token of the first example."""
    t = _plain(ad, model, exs[:1])[0][1]
    close = BudgetPlan.of(ad, 1, GREEDY).close_id
    w = model.get_output_embeddings().weight
    with torch.no_grad():
        w[[t, close]] = w[[close, t]].clone()
    return model


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", FAMILIES)
def test_model_that_closes_its_reasoning_is_not_forced(tiny_dirs, world, family):
    """Early stop: a model that writes the close token within B continues from it (nothing forced,
    the close token counted); (b) a budget >= max length reproduces plain greedy decoding exactly."""
    ad = ADAPTERS[family](str(tiny_dirs[family]))
    exs = _examples(world)
    model = _closing_model(ad, ad.load_model().eval(), exs)
    close = BudgetPlan.of(ad, 1, GREEDY).close_id
    plain = _plain(ad, model, exs)
    assert plain[0][1] == close
    decode = ad.decode(torch.tensor([p + [ad.pad_token_id] * (M - len(p)) for p in plain]), 0)
    for b in (6, M, 10 * M):
        answers = hf_budget_generate(ad, model, exs, b, GREEDY, answer_tokens=ANSWER)
        a = answers[0]
        assert a.kind == "closed" and a.reasoning_ids == plain[0][:2] and a.forced_ids == []
        assert a.reasoning_ids + a.answer_ids == plain[0]  # the rest of the max length, unforced
        if b >= M:
            assert [x.text for x in answers] == decode
            assert [x.num_tokens for x in answers] == [len(p) for p in plain]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_budget_equals_hf_budget(tiny_dirs, world, family):
    """(e) vLLM's CPU build (fp32, two rounds of requests) gives the HF budget answers, token for token."""
    import vllm  # noqa: F401  (make test installs it: missing vLLM fails here)

    from egm.generation.budget import vllm_budget_generate
    from egm.generation.vllm import VLLMEngine

    ad = ADAPTERS[family](str(tiny_dirs[family]))
    model = ad.load_model().eval()
    exs = _examples(world)
    eng = VLLMEngine(ad, dtype="float32", enable_sleep_mode=False, enforce_eager=True, max_model_len=2048)
    forbidden = placeholder_token_ids(model.config)
    for b in (0, 4, M):
        hf = hf_budget_generate(ad, model, exs, b, GREEDY, ANSWER, suppress=forbidden)
        vl = vllm_budget_generate(eng, exs, b, GREEDY, ANSWER)
        assert [(a.kind, a.reasoning_ids, a.forced_ids, a.answer_ids) for a in vl] == \
               [(a.kind, a.reasoning_ids, a.forced_ids, a.answer_ids) for a in hf]
        assert [a.text for a in vl] == [a.text for a in hf]
