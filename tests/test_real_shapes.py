"""The whole path on real-shaped checkpoints of both families (egm.models.real: the released
vocabulary, 151,936 / 151,674 embedding rows, tying, templates and processors on a tiny trunk),
with 586x480 RefCOCO-sized images at the recipes' resolution (270 / 3,328 image tokens):

SFT step -> GRPO step (HF engine) -> GRPO step (vLLM engine, push: vLLM greedy == trained HF
greedy) -> export -> reload in transformers (same logits) and in vLLM through ``egm evaluate``
(same answers as ``egm evaluate --engine hf``) -> budget forcing with the single-token
``</think>``. Nothing is mocked but the reward (a random model never parses, so rewards are
spread to make the GRPO update non-zero). One vLLM start per step that needs one: starting
vLLM on a 151k-token checkpoint dominates the time (tokenizer loads).
"""

from __future__ import annotations

import json
import math
import sys

import lightning as L
import numpy as np
import pytest
import torch
import vllm  # noqa: F401  (make test installs it: a missing vLLM fails, never skips)
from PIL import Image

import egm.rl.module as rl_module
from egm.data.datamodule import GroundingDataModule
from egm.data.manifest import Sample, read_manifest, write_manifest
from egm.generation.budget import BudgetPlan, hf_budget_generate, reasoning_layout
from egm.generation.hf import HFEngine
from egm.generation.sampling import SamplingParams
from egm.generation.vllm import VLLMEngine, VLLMSettings
from egm.models import ADAPTERS
from egm.rl.module import GRPOModule
from egm.sft import SFTModule

FAMILIES = ["qwen3_vl", "internvl"]
# the recipes' resolution (configs/*_qwen3vl.yaml, *_internvl.yaml): 270 / 3,328 image tokens
RESOLUTION = {"qwen3_vl": {"max_pixels": 1048576}, "internvl": {"max_patches": 12}}
IMAGE_TOKENS = {"qwen3_vl": 270, "internvl": 3328}
GREEDY = SamplingParams(max_new_tokens=12)
ROLLOUT = SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=8)
CPU_VLLM = VLLMSettings(dtype="float32", enforce_eager=True, max_model_len=4096, max_num_seqs=16)
QUIET = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
             enable_model_summary=False, limit_val_batches=0)


@pytest.fixture(scope="module")
def refcoco(tmp_path_factory):
    """Four 586x480 samples (a RefCOCO image size), each image different, with reasoning traces."""
    root = tmp_path_factory.mktemp("refcoco_real")
    rng = np.random.default_rng(0)
    samples = []
    sentences = ["the man in a red shirt", "a dog on the left", "second car from the right", "the tallest tree"]
    for i in range(4):
        path = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (480, 586, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(id=f"r{i}", image=str(path), width=586, height=480, sentence=sentences[i],
                              task="vanilla", box=[40.0 + 10 * i, 60.0, 300.0, 420.0], split="refcoco_unc_val",
                              source="test", reasoning="The man on the left wears a red shirt."))
    write_manifest(root / "train.jsonl", samples)
    return str(root / "train.jsonl")


def _examples(manifest, n=2):
    return [{"sample": s, "image": Image.open(s.image).convert("RGB")} for s in read_manifest(manifest)[:n]]


def _adapter(ck, family):
    return ADAPTERS[family](str(ck), max_length=4096, **RESOLUTION[family])


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("family", FAMILIES)
def test_whole_path_on_a_real_shaped_checkpoint(real_dirs, refcoco, family, tmp_path):
    """Each family in its own process: vLLM engines keep memory after they are dropped, and the two
    families together passed 11 GB RSS in one process (one family peaks at ~5 GB)."""
    from multirank import launch

    launch(__file__, "whole_path", family, str(real_dirs[family]), refcoco, str(tmp_path), timeout=1100)


def whole_path(family: str, ck: str, refcoco: str, out: str) -> None:
    """(Subprocess.) The whole path on one family's real-shaped checkpoint, asserting as it goes."""
    from pathlib import Path

    from multirank import fixed_reward

    from egm.eval.checkpoint import evaluate_checkpoint

    rl_module.reward_from_texts = fixed_reward  # a random model never parses: spread rewards, a real update
    tmp_path = Path(out)
    exs = _examples(refcoco)
    # -- SFT: one optimiser step on assistant-token labels (their exact tokens: tests/models/test_real.py)
    sft = SFTModule(_adapter(ck, family), lr=1e-3, warmup_steps=0)
    sft.configure_model()
    batch = sft.collate_fn("train")([{"sample": s, "image": e["image"]} for s, e in
                                      zip(read_manifest(refcoco)[:2], exs)])["inputs"]
    assert sft.adapter.image_token_count(batch["input_ids"][:1]) == IMAGE_TOKENS[family]
    labels = batch["labels"][0][batch["labels"][0] != -100]
    assert sft.adapter.tokenizer.decode(labels).endswith("</box><|im_end|>" if family == "internvl" else "```<|im_end|>")
    before = {n: p.detach().clone() for n, p in sft.model.named_parameters()}
    t = L.Trainer(max_steps=1, **QUIET)
    t.fit(sft, GroundingDataModule(train=refcoco, batch_size=2))
    assert t.global_step == 1
    assert any(not torch.equal(p, before[n]) for n, p in sft.model.named_parameters())

    # -- GRPO with the HF engine: one step
    hf_m = GRPOModule(_adapter(ck, family), lr=1e-3, warmup_steps=0, n_samples=2, rollout=ROLLOUT,
                      micro_batch_size=4, engine="hf")
    t = L.Trainer(max_steps=1, **QUIET)
    t.fit(hf_m, GroundingDataModule(train=refcoco, batch_size=2))
    assert t.global_step == 1 and math.isfinite(hf_m.last_stats["loss"])

    # -- GRPO with vLLM: one step, push, vLLM greedy == the trained HF model's greedy; export
    ad = _adapter(ck, family)
    untrained = HFEngine(ad, ad.load_model()).generate(exs, 1, GREEDY)
    export = tmp_path / "export"
    m = GRPOModule(_adapter(ck, family), lr=5e-3, warmup_steps=0, n_samples=2, rollout=ROLLOUT,
                   micro_batch_size=4, engine="vllm", vllm=CPU_VLLM, export_dir=str(export))
    t = L.Trainer(max_steps=1, **QUIET)
    t.fit(m, GroundingDataModule(train=refcoco, batch_size=2))
    assert t.global_step == 1 and isinstance(m.engine, VLLMEngine)
    trained = HFEngine(m.adapter, m.model).generate(exs, 1, GREEDY)
    assert not torch.equal(trained.completion_ids, untrained.completion_ids)  # the step changed the answers
    m.engine.update_weights(m.model)
    pushed = m.engine.generate(exs, 1, GREEDY)
    assert pushed.completion_ids.tolist() == trained.completion_ids.tolist() and pushed.texts == trained.texts
    del m.engine

    # -- export -> plain transformers: the trained model's logits
    import transformers

    re_model = getattr(transformers, ad.model_class).from_pretrained(export).eval()
    inputs = ad.collate_train([{"sample": s, "image": e["image"]} for s, e in zip(read_manifest(refcoco)[:1], exs)])
    inputs.pop("labels")
    n_answer = 24  # the answer's positions: full-length logits of a 151k-row head are 2 GB per copy
    m.model.eval()
    with torch.no_grad():
        a, b = re_model(**inputs, logits_to_keep=n_answer).logits, m.model(**inputs, logits_to_keep=n_answer).logits
    assert a.shape[1] == n_answer
    torch.testing.assert_close(a, b)
    assert re_model.get_input_embeddings().weight.shape[0] == (151936 if family == "qwen3_vl" else 151674)

    # -- egm evaluate on the export, both engines (vLLM reloads the exported folder): same answers
    res = {}
    for engine in ("hf", "vllm"):
        res[engine] = evaluate_checkpoint(str(export), {"refcoco_unc_val": refcoco}, str(tmp_path / engine),
                                          family=family, torch_dtype="float32", device="cpu", max_new_tokens=12,
                                          latency_fraction=0.0, engine=engine, vllm_enforce_eager=True,
                                          **RESOLUTION[family])


    def answers(engine):
        f = tmp_path / engine / "predictions" / "refcoco_unc_val.jsonl"
        return {r["id"]: r["answer"] for r in map(json.loads, f.read_text().splitlines())}

    assert len(answers("hf")) == 4 and answers("vllm") == answers("hf")
    assert res["vllm"]["splits"] == res["hf"]["splits"]

    # -- budget forcing on the export: the close is one released token, forced text as the template
    ad = _adapter(export, family)
    lay, tok = reasoning_layout(ad), ad.tokenizer
    close = BudgetPlan.of(ad, 1, GREEDY).close_id
    assert close == {"qwen3_vl": 151668, "internvl": 151670}[family]  # </think>, <ref>
    assert tok(lay.close, add_special_tokens=False)["input_ids"] == [close]
    for b in (0, 3):
        for a in hf_budget_generate(ad, re_model, exs, b, GREEDY, answer_tokens=4):
            assert len(a.reasoning_ids) <= b
            if a.kind == "forced":
                assert a.forced_ids == tok(lay.forced if b else lay.empty, add_special_tokens=False)["input_ids"]
                assert close in a.forced_ids


if __name__ == "__main__":
    {"whole_path": whole_path}[sys.argv[1]](*sys.argv[2:])
