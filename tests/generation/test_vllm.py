"""vLLM itself (the CPU build, fp32, in-process) against Hugging Face ``generate``, both families.

Nothing here is mocked: each test starts a real ``vllm.LLM`` on a tiny checkpoint. The reference
is always the HF model the trainer holds, decoded greedily by :class:`egm.generation.hf.HFEngine`
(which suppresses the same placeholder tokens). ``make test`` installs vLLM, so a missing vLLM
is an import error here, never a skip.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import vllm  # noqa: F401  (the suite must fail, not skip, where vLLM is missing)
import yaml
from PIL import Image

import egm.rl.module as rl_module
from egm import cli
from egm.data.datamodule import GroundingDataModule
from egm.data.manifest import read_manifest
from egm.data.synthetic import make_synthetic
from egm.generation.sampling import SamplingParams
from egm.models import ADAPTERS
from egm.models.base import LoraSettings
from egm.reward import grounding_reward
from egm.rl.module import GRPOModule
from egm.generation.hf import HFEngine
from egm.generation.vllm import VLLMEngine, VLLMSettings, sample_seeds

FAMILIES = ["qwen3_vl", "internvl"]
GREEDY = SamplingParams(max_new_tokens=24)
ROLLOUT = SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=8)
CPU_VLLM = VLLMSettings(dtype="float32", enforce_eager=True, max_model_len=2048, max_num_seqs=256)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "syn_vllm"
    return make_synthetic(str(root), n_train=8, n_val=5, n_test=5, image_size=64)


def _examples(world, n=3):
    return [{"sample": s, "image": Image.open(s.image).convert("RGB")} for s in read_manifest(world["val"])[:n]]


def _engine(adapter) -> VLLMEngine:
    from dataclasses import asdict

    return VLLMEngine(adapter, **asdict(CPU_VLLM))


@pytest.fixture
def spread_rewards(monkeypatch):
    """A random tiny model never parses: distinct rewards per sample so advantages, and the update, are non-zero."""
    rng = np.random.default_rng(0)

    def fake(texts, gt_boxes, sizes, parse=None, alpha=0.5):
        out = grounding_reward([None] * len(texts), gt_boxes, alpha)
        return type(out)(rng.uniform(0, 1, len(texts)), out.iou, out.success, out.parse_ok, out.failures)

    monkeypatch.setattr(rl_module, "reward_from_texts", fake)


@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_greedy_equals_hf_generate(tiny_dirs, world, family, caplog):
    """(a) same prompts and images, greedy: token-for-token equal; greedy n=2 is two equal requests.
    Sleep mode, asked for (the settings' default), is switched off on CPU with the reason logged."""
    ad = ADAPTERS[family](str(tiny_dirs[family]))
    exs = _examples(world)
    hf = HFEngine(ad, ad.load_model()).generate(exs, 2, GREEDY)
    assert CPU_VLLM.enable_sleep_mode
    with caplog.at_level("INFO"):
        eng = _engine(ad)
    assert not eng.enable_sleep_mode and "sleep mode off" in caplog.text
    ro = eng.generate(exs, 2, GREEDY)
    assert ro.completion_ids.tolist() == hf.completion_ids.tolist()
    assert ro.texts == hf.texts and ro.lengths.tolist() == hf.lengths.tolist()
    assert torch.equal(ro.completion_ids[0::2], ro.completion_ids[1::2])  # n=2 greedy: identical pairs
    assert ro.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]


def test_every_sample_of_a_step_has_its_own_stream(tiny_dirs, world):
    """One seed per sample: reproducible for a seed, distinct across samples, prompts and seeds."""
    seeds = sample_seeds(7, 4096)
    assert len(set(seeds)) == 4096 and all(0 <= s < 2**63 for s in seeds)
    assert not set(seeds) & set(sample_seeds(8, 4096))  # the next step / rank
    ad = ADAPTERS["qwen3_vl"](str(tiny_dirs["qwen3_vl"]))
    eng = _engine(ad)
    exs = _examples(world, 2)
    same = [exs[0], exs[0]]  # two identical prompts: under one SamplingParams(seed, n) they would match
    sampling = SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=16)
    a, b = eng.generate(same, 4, sampling, seed=3), eng.generate(same, 4, sampling, seed=3)
    assert torch.equal(a.completion_ids, b.completion_ids)
    rows = [tuple(r) for r in a.completion_ids.tolist()]
    assert len(set(rows)) == 8  # 2 identical prompts x 4 samples: 8 different samples
    assert not torch.equal(a.completion_ids, eng.generate(same, 4, sampling, seed=4).completion_ids)
    # more prompt tokens than one scheduler step takes (4096): seeded requests across steps
    big = eng.generate(_examples(world, 5) * 4, 12, SamplingParams(temperature=1.0, top_k=-1, max_new_tokens=2), seed=5)
    assert len(big) == 240


def _fit(ck, family, paths, steps=1, lora=None, **kw):
    dm = GroundingDataModule(train=paths["train"], batch_size=2)
    ad = ADAPTERS[family](str(ck), lora=lora)
    m = GRPOModule(ad, lr=kw.pop("lr", 5e-3), warmup_steps=0, n_samples=3, rollout=ROLLOUT, engine="vllm",
                   vllm=CPU_VLLM, **kw)
    t = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    t.fit(m, dm)
    return m, t


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_push_after_a_grpo_step_matches_the_trained_hf_model(tiny_dirs, world, spread_rewards, family, lora):
    """(b) one real GRPO optimiser step (full, or LoRA merged for the push), then vLLM == trained HF."""
    ck = tiny_dirs[family]
    exs = _examples(world)
    ad = ADAPTERS[family](str(ck))
    before = HFEngine(ad, ad.load_model()).generate(exs, 1, GREEDY).completion_ids
    settings = LoraSettings(rank=4, alpha=8, dropout=0.0) if lora else None
    m, t = _fit(ck, family, world, lora=settings, lr=5e-2 if lora else 5e-3)
    assert t.global_step == 1 and isinstance(m.engine, VLLMEngine)
    trained = HFEngine(m.adapter, m.model).generate(exs, 1, GREEDY).completion_ids
    assert not torch.equal(trained, before)  # the step changed the greedy answers
    m.engine.update_weights(m.model)
    pushed = m.engine.generate(exs, 1, GREEDY).completion_ids
    assert pushed.tolist() == trained.tolist()
    if lora:  # the push merged a copy of the deltas; the training model keeps them separate
        assert any("lora_B" in n and p.abs().sum() > 0 for n, p in m.model.named_parameters())


def test_vllm_samples_rescore_finite_with_ratio_exactly_one(tiny_dirs, world, spread_rewards):
    """(d) the trainer re-scores vLLM's samples: finite log-probs, ratio exactly 1 at the first update.

    ``ppo_epochs=2`` forces the separate no-grad pass for the old log-probs; with one response per
    micro-batch both passes see identical inputs, so the ratio is 1 bit for bit.
    """
    m, _ = _fit(tiny_dirs["qwen3_vl"], "qwen3_vl", world, ppo_epochs=2, micro_batch_size=1, max_grad_norm=None)
    first = m.last_stats["first_minibatch"]
    assert first["ppo_kl"] == 0.0 and first["clip_frac"] == 0.0
    assert math.isfinite(m.last_stats["loss"]) and m.last_stats["optimizer_steps"] == 2
    ro = m.engine.generate(_examples(world, 2), 3, ROLLOUT, seed=1)
    logp = m.score(ro)
    assert torch.isfinite(logp[ro.completion_mask.bool()]).all() and (logp[ro.completion_mask.bool()] <= 0).all()


def _cli_config(tmp_path: Path, ck: Path, world, engine: str) -> Path:
    root = tmp_path / engine
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 3, "log_every_n_steps": 1,
                    "enable_checkpointing": False, "enable_progress_bar": False, "limit_val_batches": 0,
                    "default_root_dir": str(root),
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(root), "name": "logs"}}},
        "model": {"class_path": "egm.rl.module.GRPOModule", "init_args": {
            "adapter": {"class_path": "egm.models.Qwen3VLAdapter",
                        "init_args": {"pretrained_model_name_or_path": str(ck), "torch_dtype": "float32"}},
            "lr": 1e-3, "warmup_steps": 0, "n_samples": 4, "micro_batch_size": 4,
            "rollout": {"temperature": 1.0, "top_p": 0.9, "top_k": 50, "max_new_tokens": 8},
            "engine": engine, "vllm": {"dtype": "float32", "enforce_eager": True, "max_model_len": 2048}}},
        "data": {"class_path": "egm.data.GroundingDataModule",
                 "init_args": {"train": [world["train"]], "batch_size": 2, "num_workers": 0}},
    }
    p = tmp_path / f"rl_{engine}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _logged(root: Path) -> dict[str, list[float]]:
    (metrics,) = root.glob("logs/version_*/metrics.csv")
    cols: dict[str, list[float]] = {}
    with open(metrics) as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if v not in ("", None):
                    cols.setdefault(k, []).append(float(v))
    return cols


def test_egm_fit_with_the_vllm_engine_logs_what_the_hf_engine_logs(tiny_dirs, world, tmp_path):
    """(c) ``egm fit`` with a GRPO recipe and ``engine: vllm`` runs several steps on CPU."""
    ck = tiny_dirs["qwen3_vl"]
    runs = {}
    for engine in ("hf", "vllm"):
        c = cli.lightning_cli(["fit", "--config", str(_cli_config(tmp_path, ck, world, engine))])
        assert c.trainer.global_step == 3
        assert type(c.model.engine).__name__ == {"hf": "HFEngine", "vllm": "VLLMEngine"}[engine]
        runs[engine] = _logged(tmp_path / engine)
    assert set(runs["vllm"]) == set(runs["hf"])
    train_keys = [k for k in runs["vllm"] if k.startswith(("train/", "time/"))]
    assert {"train/reward/mean", "train/rollout_tokens_per_s", "time/rollout_s", "train/loss"} <= set(train_keys)
    for k in train_keys:
        assert len(runs["vllm"][k]) == 3 and all(math.isfinite(v) for v in runs["vllm"][k]), k


def test_evaluate_with_vllm_matches_hf(tiny_dirs, world, tmp_path):
    """(e) ``egm evaluate --engine vllm`` and ``--engine hf``: the same answers, hence the same metrics."""
    import json

    from egm.eval.checkpoint import evaluate_checkpoint

    ck = str(tiny_dirs["internvl"])
    res = {}
    for engine in ("hf", "vllm"):
        res[engine] = evaluate_checkpoint(ck, {"val_plain": world["val"]}, str(tmp_path / engine), family="internvl",
                                          torch_dtype="float32", device="cpu", max_new_tokens=16,
                                          latency_fraction=0.0, engine=engine, vllm_enforce_eager=True)

    def answers(engine):
        f = tmp_path / engine / "predictions" / "val_plain.jsonl"
        return {r["id"]: r["answer"] for r in map(json.loads, f.read_text().splitlines())}

    assert answers("vllm") == answers("hf") and len(answers("hf")) == 5
    assert res["vllm"]["splits"] == res["hf"]["splits"]


# -- ZeRO-3: the push gathers partitioned parameters ---------------------------------------


def zero3_push(ck: str, train: str, out: str) -> None:
    """(Subprocess.) One GRPO step with vLLM rollouts under ZeRO-3 (every parameter partitioned),
    then a push; saves vLLM's greedy answers and the gathered weights for the test to compare."""
    from multirank import QUIET, fixed_reward

    from egm.models import Qwen3VLAdapter
    from egm.strategies import CPUDeepSpeedStrategy, gathered_parameters

    torch.set_num_threads(1)
    rl_module.reward_from_texts = fixed_reward  # spread rewards: a non-zero update
    strategy = CPUDeepSpeedStrategy(config={"zero_allow_untested_optimizer": True, "zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0}})
    m = GRPOModule(Qwen3VLAdapter(ck), lr=5e-3, warmup_steps=0, n_samples=3, rollout=ROLLOUT, engine="vllm",
                   vllm=CPU_VLLM, micro_batch_size=4, max_grad_norm=None)
    L.Trainer(max_steps=1, accelerator="cpu", devices=1, strategy=strategy, **QUIET).fit(
        m, GroundingDataModule(train=train, batch_size=2))
    partitioned = all(hasattr(p, "ds_id") and p.data.numel() == 0 for p in m.model.parameters())
    m.engine.update_weights(m.model)
    exs = [{"sample": s, "image": Image.open(s.image).convert("RGB")} for s in read_manifest(train)[:3]]
    pushed = m.engine.generate(exs, 1, GREEDY).completion_ids
    with gathered_parameters(m.model):
        full = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    torch.save({"partitioned": partitioned, "pushed": pushed, "full": full}, out)


def test_push_gathers_zero3_parameters(tiny_dirs, world, tmp_path):
    """After a ZeRO-3 GRPO step, vLLM answers as an HF model holding the gathered weights."""
    from multirank import launch

    ck = str(tiny_dirs["qwen3_vl"])
    launch(__file__, "zero3_push", ck, world["train"], str(tmp_path / "push.pt"), timeout=600)
    res = torch.load(tmp_path / "push.pt", weights_only=False)
    assert res["partitioned"]  # the engine really saw empty ZeRO-3 shards
    ad = ADAPTERS["qwen3_vl"](ck)
    model = ad.load_model()
    exs = [{"sample": s, "image": Image.open(s.image).convert("RGB")} for s in read_manifest(world["train"])[:3]]
    before = HFEngine(ad, model).generate(exs, 1, GREEDY).completion_ids
    model.load_state_dict(res["full"])
    trained = HFEngine(ad, model).generate(exs, 1, GREEDY).completion_ids
    assert not torch.equal(trained, before)  # the step changed the greedy answers
    assert res["pushed"].tolist() == trained.tolist()


if __name__ == "__main__":
    {"zero3_push": zero3_push}[sys.argv[1]](*sys.argv[2:])
