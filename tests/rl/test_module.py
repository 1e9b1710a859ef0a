"""GRPOModule on the tiny Qwen3-VL, on CPU: a full step, PPO ratio at identical policies, reference."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

import egm.rl.module as rl_module
from egm.data.datamodule import GroundingDataModule
from egm.data.synthetic import make_synthetic
from egm.generation.sampling import SamplingParams
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

    def fake(texts, gt_boxes, sizes, parse=None, alpha=0.5):
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
    assert m.reference.model is None
    m2 = GRPOModule(Qwen3VLAdapter(str(ck)), beta=0.01)
    m2.configure_model()
    ref = m2.reference.model
    assert ref is not None and not any(p.requires_grad for p in ref.parameters())
    assert not any(c is ref for c in m2.modules())  # not in the module tree: never checkpointed or optimised
    assert not any(k.startswith("reference") for k in m2.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(m2.model.parameters(), ref.parameters()))


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


# --- fidelity fixes (issue 15 item 4): rollout defaults, dropout, verl LR schedule, DAPO sampling


def test_rollout_defaults_to_the_family_table5_column_with_a_warning(qwen_dir):
    from egm.generation.sampling import TABLE5_ROLLOUT
    from egm.models import InternVLAdapter

    with pytest.warns(UserWarning, match="model.rollout is not set"):
        m = GRPOModule(Qwen3VLAdapter(str(qwen_dir)))
    assert (m.rollout.temperature, m.rollout.top_p, m.rollout.top_k, m.rollout.max_new_tokens) == (0.7, 0.9, 50, 1024)
    assert m.hparams.rollout == m.rollout and m.rollout is not TABLE5_ROLLOUT["qwen3_vl"]
    with pytest.warns(UserWarning):
        m = GRPOModule(InternVLAdapter("unused/path"))  # the adapter loads nothing until configure_model
    assert (m.rollout.top_p, m.rollout.top_k) == (0.7, -1)
    bare = Qwen3VLAdapter(str(qwen_dir))
    bare.family = "other"
    with pytest.raises(ValueError, match="no rollout column"):
        GRPOModule(bare)


def test_attention_dropout_is_zeroed_so_train_mode_forwards_agree(qwen_dir, tmp_path):
    """A checkpoint whose config has attention_dropout 0.5: HF attention reads the float, not nn.Dropout."""
    import json
    import shutil

    ck = tmp_path / "dropout_ckpt"
    shutil.copytree(qwen_dir, ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["text_config"]["attention_dropout"] = 0.5
    (ck / "config.json").write_text(json.dumps(cfg))
    ids = torch.randint(10, 200, (2, 12), generator=torch.Generator().manual_seed(0))

    def two_forwards(model):
        model.train()
        with torch.no_grad():
            return [torch.log_softmax(model(input_ids=ids).logits.double(), -1) for _ in range(2)]

    raw = Qwen3VLAdapter(str(ck)).load_model()  # as loaded: the stochastic attention is really on
    a, b = two_forwards(raw)
    assert not torch.equal(a, b)
    m = GRPOModule(Qwen3VLAdapter(str(ck)), rollout=ROLLOUT)
    m.configure_model()
    assert m.model.config.text_config.attention_dropout == 0.0
    assert all(getattr(mod, "attention_dropout", 0.0) == 0.0 for mod in m.model.modules())
    a, b = two_forwards(m.model)
    assert torch.equal(a, b)


def test_verl_lr_schedule_trains_the_first_rollout_batch_at_lr_zero(world, spread_rewards):
    """verl: LR 0 for every optimiser step of rollout batch 0 (two here, mini_batch_size=1)."""
    ck, paths = world
    dm = GroundingDataModule(train=paths["train"], batch_size=2)
    m = GRPOModule(Qwen3VLAdapter(str(ck)), lr=1e-3, warmup_steps=2, lr_schedule="verl", n_samples=3,
                   rollout=ROLLOUT, micro_batch_size=4, mini_batch_size=1)
    m.configure_model()
    before = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    t = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    t.fit(m, dm)
    assert t.global_step == 2 and m.last_stats["optimizer_steps"] == 2
    assert all(torch.equal(p, before[n]) for n, p in m.model.named_parameters())
    assert m.lr_schedulers().get_last_lr()[0] == pytest.approx(0.5e-3)  # rollout batch 1: 1/2 of the LR


def test_dynamic_sampling_replaces_zero_spread_groups(world, monkeypatch):
    ck, paths = world
    scripted = iter([np.array([0.5, 0.5, 0.5, 0.1, 0.2, 0.3]),    # the batch: group 0 has no spread
                     np.array([0.0, 1.0, 0.5, 0.4, 0.6, 0.8])])   # the refill of 2 prompts: both spread

    def fake(texts, gt_boxes, sizes, parse=None, alpha=0.5):
        out = grounding_reward([None] * len(texts), gt_boxes, alpha)
        return type(out)(next(scripted), out.iou, out.success, out.parse_ok, out.failures)

    monkeypatch.setattr(rl_module, "reward_from_texts", fake)
    m, t, _ = _fit(ck, paths, dynamic_sampling=True, max_refill_rounds=2)
    s = m.last_stats
    # short 1 group at keep rate 1/2 -> 2 refill prompts in one round; the first refill group fills the batch
    assert (s["train/dynamic/dropped_groups"], s["train/dynamic/padded_groups"]) == (1.0, 0.0)
    assert (s["train/dynamic/refill_rounds"], s["train/dynamic/refill_prompts"]) == (1.0, 2.0)
    torch.testing.assert_close(s["rewards"], torch.tensor([0.1, 0.2, 0.3, 0.0, 1.0, 0.5]))
    assert len(s["examples"]) == 2 and s["train/zero_spread_frac"] == 0.5  # logged on the batch's own prompts
    assert s["train/reward/mean"] == pytest.approx((1.5 + 0.6) / 6)
    assert (s["advantages"].view(2, 3).abs().sum(1) > 0).all()


def test_reward_parses_with_the_adapters_own_parser(world, monkeypatch):
    """An adapter that overrides ``parse`` reaches the GRPO reward, as it reaches validation."""
    from multirank import FixedEngine

    import egm.reward
    from egm.answers import ParsedAnswer
    from egm.boxes import iou
    from egm.data.datamodule import GroundingDataset
    from egm.data.manifest import read_manifest

    class WholeImage(Qwen3VLAdapter):
        def parse(self, text, width, height):  # every answer: the whole image
            return ParsedAnswer("", (0.0, 0.0, float(width), float(height)), None, None, 1)

    # the real reward (multirank.grpo_module, run earlier in the suite, replaces it for good)
    monkeypatch.setattr(rl_module, "reward_from_texts", egm.reward.reward_from_texts)
    ck, paths = world
    m = GRPOModule(WholeImage(str(ck)), n_samples=2, rollout=ROLLOUT, alpha=0.5)
    ds = GroundingDataset(read_manifest(paths["train"])[:2])
    ro = FixedEngine(m.adapter).generate([ds[0], ds[1]], 2, ROLLOUT)
    out = m.rewards(ro)
    expected = []
    for s in (ds[0]["sample"], ds[1]["sample"]):
        v = iou([0, 0, s.width, s.height], s.box)
        expected += [0.5 * v + 0.5 * (v > 0.5)] * 2
    np.testing.assert_allclose(out.rewards, expected)
    assert out.parse_ok.all()
