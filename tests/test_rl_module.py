"""GRPOModule on the tiny Qwen3-VL, on CPU: a full step, PPO ratio at identical policies, reference."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

import egm.rl.module as rl_module
from egm.data.datamodule import GroundingDataModule
from egm.data.synthetic import make_synthetic
from egm.generation import SamplingParams
from egm.models import Qwen3VLAdapter
from egm.reward import grounding_reward
from egm.rl.module import GRPOModule

ROLLOUT = SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=8)


@pytest.fixture(scope="module")
def world(qwen_dir, tmp_path_factory):
    paths = make_synthetic(str(tmp_path_factory.getbasetemp() / "syn_module"), n_train=8, n_val=5, n_test=5, image_size=64)
    return qwen_dir, paths


@pytest.fixture
def spread_rewards(monkeypatch):
    """A random tiny model never parses: give every group distinct rewards so advantages != 0."""
    rng = np.random.default_rng(0)

    def fake(texts, gt_boxes, sizes, family="auto", alpha=0.5):
        n = len(texts)
        out = grounding_reward([None] * n, gt_boxes, alpha)
        return type(out)(rng.uniform(0, 1, n), out.iou, out.success, out.parse_ok, out.failures)

    monkeypatch.setattr(rl_module, "reward_from_texts", fake)


def _fit(ck, paths, steps=1, **kw):
    dm = GroundingDataModule(train=paths["train"], batch_size=2)
    m = GRPOModule(Qwen3VLAdapter(str(ck)), lr=1e-3, warmup_steps=0, n_samples=3, rollout=ROLLOUT,
                   micro_batch_size=4, **kw)
    m.configure_model()
    before = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    t = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    t.fit(m, dm)
    return m, t, before


def test_beta_zero_builds_no_reference_model(world):
    ck, _ = world
    m = GRPOModule(Qwen3VLAdapter(str(ck)), beta=0.0)
    m.configure_model()
    assert m.ref_model is None
    m2 = GRPOModule(Qwen3VLAdapter(str(ck)), beta=0.01)
    m2.configure_model()
    assert m2.ref_model is not None and not any(p.requires_grad for p in m2.ref_model.parameters())
    assert "ref_model" not in dict(m2.named_children())  # never checkpointed or optimised
    assert all(torch.equal(a, b) for a, b in zip(m2.model.parameters(), m2.ref_model.parameters()))


def test_full_grpo_step_changes_the_weights(world, spread_rewards):
    ck, paths = world
    m, t, before = _fit(*world, beta=0.01, gamma=0.01, mini_batch_size=1)
    assert t.global_step == 2  # two mini-batches of one prompt = two optimiser steps
    changed = [n for n, p in m.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) > 0.5 * len(before)
    s = m.last_stats
    assert s["optimizer_steps"] == 2 and np.isfinite(s["loss"])
    for k in ("train/reward/mean", "train/reward/parse_failure_rate", "train/kl", "train/entropy",
              "train/clip_frac", "train/zero_spread_frac", "train/rollout_tokens_per_s", "time/rollout_s",
              "time/ref_s", "time/update_s", "train/response_len"):
        assert k in s, k
    assert s["time/ref_s"] > 0


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_identical_policies_give_ratio_one_and_loss_minus_mean_advantage(world, spread_rewards, agg):
    # ppo_epochs=2 forces the separate no-grad pass for the old log-probs
    m, _, _ = _fit(*world, ppo_epochs=2, beta=0.0, gamma=0.0, agg=agg, max_grad_norm=None)
    s = m.last_stats
    first = s["first_minibatch"]
    adv, lengths = s["advantages"].double(), s["lengths"].double()
    expected = -(adv * lengths).sum() / lengths.sum() if agg == "token-mean" else -adv.mean()
    assert first["clip_frac"] == 0.0
    assert abs(first["ppo_kl"]) < 1e-5
    assert first["loss"] == pytest.approx(float(expected), abs=1e-5)
    assert s["optimizer_steps"] == 2
