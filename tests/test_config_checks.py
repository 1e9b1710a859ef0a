"""Hyper-parameters and checkpoint paths are checked in ``__init__``: ``egm fit`` fails before any
model loads, naming the key and its allowed range (egm.config_checks)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from egm import cli
from egm.config_checks import GRPO_RULES, check_checkpoint_path, check_ranges, looks_local
from egm.data.datamodule import GroundingDataModule
from egm.models import Qwen3VLAdapter
from egm.rl.module import GRPOModule
from egm.sft import SFTModule

ROOT = Path(__file__).resolve().parents[1]
HUB_ID = "Qwen/Qwen3-VL-2B-Thinking"  # never fetched: the checks fire before any load


@pytest.mark.parametrize("key, value, msg", [
    ("clip_eps", -1.0, "clip_eps must be a finite number > 0, got -1.0"),
    ("clip_eps", 0.0, "clip_eps must be a finite number > 0"),
    ("alpha", 2.0, r"alpha must be a finite number in \[0, 1\], got 2.0"),
    ("beta", -0.005, "beta must be a finite number >= 0"),
    ("gamma", float("nan"), "gamma must be a finite number >= 0, got nan"),
    ("lr", 0.0, "lr must be a finite number > 0"),
    ("lr", float("inf"), "lr must be a finite number > 0"),
    ("weight_decay", -0.01, "weight_decay must be a finite number >= 0"),
    ("betas", (0.9, 1.5), r"betas must be a list of finite numbers each in \[0, 1\)"),
    ("min_lr_ratio", 1.5, "min_lr_ratio"),
    ("warmup_steps", -1, "warmup_steps must be an integer >= 0"),
    ("n_samples", 1, "n_samples must be an integer >= 2"),
    ("ppo_epochs", 0, "ppo_epochs must be an integer >= 1"),
    ("micro_batch_size", 0, "micro_batch_size must be an integer >= 1"),
    ("mini_batch_size", 0, r"mini_batch_size must be an integer >= 1 \(or null\)"),
    ("rollout_batch_size", 2.5, "rollout_batch_size must be an integer >= 1"),
    ("max_grad_norm", 0.0, "max_grad_norm must be a finite number > 0"),
    ("seed", -1, "seed must be an integer >= 0"),
])
def test_grpo_module_rejects_out_of_range(key, value, msg):
    with pytest.raises(ValueError, match=rf"^GRPOModule: {msg}"):
        GRPOModule(Qwen3VLAdapter(HUB_ID), **{key: value})


@pytest.mark.parametrize("key, value", [("lr", -1e-5), ("weight_decay", -1.0), ("betas", (1.0, 0.999)),
                                        ("warmup_steps", 2.5), ("min_lr_ratio", -0.1)])
def test_sft_module_rejects_out_of_range(key, value):
    with pytest.raises(ValueError, match=rf"^SFTModule: {key} must be"):
        SFTModule(Qwen3VLAdapter(HUB_ID), **{key: value})


@pytest.mark.parametrize("key, value", [("batch_size", 0), ("eval_batch_size", 0), ("num_workers", -1),
                                        ("epoch_size", 0), ("max_train_samples", 0), ("max_eval_samples", 0),
                                        ("seed", -3), ("train_weights", [1.0, float("nan")]), ("batch_size", 8.0)])
def test_datamodule_rejects_out_of_range(key, value):
    kw = {"train": ["a.jsonl", "b.jsonl"]} if key == "train_weights" else {}
    with pytest.raises(ValueError, match=rf"^GroundingDataModule: {key} must be"):
        GroundingDataModule(**kw, **{key: value})


def test_defaults_and_boundaries_pass():
    GRPOModule(Qwen3VLAdapter(HUB_ID), alpha=0.0, beta=0.0, gamma=0.0, mini_batch_size=None)
    GRPOModule(Qwen3VLAdapter(HUB_ID), alpha=1.0, n_samples=2, max_grad_norm=None)
    SFTModule(Qwen3VLAdapter(HUB_ID))
    GroundingDataModule(batch_size=1, num_workers=0, eval_batch_size=None)
    check_ranges("X", {"unknown": -1, "clip_eps": 1e-9}, GRPO_RULES)


@pytest.mark.parametrize("path, local", [("./x", True), ("../x", True), ("/abs/ckpt", True), ("~/ckpt", True),
                                         ("runs/demo/sft_export", True), ("tests/missing", True),
                                         ("gpt2", True), ("does_not_exist", True),  # hub ids are org/name
                                         ("org/name", False), (HUB_ID, False)])
def test_local_paths_and_hub_ids(monkeypatch, path, local):
    monkeypatch.chdir(ROOT)  # tests/ exists here: "tests/missing" looks local
    assert looks_local(path) is local


@pytest.mark.parametrize("path", ["./no_such_ckpt", "runs/no/such_export", "/no/such/checkpoint", "no_such_ckpt"])
def test_missing_local_checkpoint_fails_at_construction(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"pretrained_model_name_or_path '{path}': no such local checkpoint"):
        Qwen3VLAdapter(path)
    check_checkpoint_path("org/name")  # a hub id is left to the hub


def _fit(args):
    with pytest.raises(Exception) as e:
        cli.lightning_cli(["fit", "--config", str(ROOT / "configs" / "demo_rl.yaml"), *args])
    return e.value


def test_egm_fit_fails_before_the_model_loads(tmp_path, monkeypatch):
    """The demo RL recipe through the real CLI: a bad value stops it while the checkpoint folder
    is still empty (loading it, or the missing data, would fail otherwise), and a missing
    checkpoint folder is named instead of reaching Hugging Face's ``Repo id must be ...``."""
    monkeypatch.chdir(tmp_path)
    err = _fit([])  # (jsonargparse lists the instantiation error under its own "Errors:")
    assert "pretrained_model_name_or_path 'runs/demo/sft_export': no such local checkpoint folder" in str(err)
    assert "Repo id" not in str(err)
    (tmp_path / "runs" / "demo" / "sft_export").mkdir(parents=True)  # exists, holds no model
    for args, msg in [(["--model.clip_eps", "-1"], "GRPOModule: clip_eps must be a finite number > 0, got -1.0"),
                      (["--model.alpha", "2.0"], "GRPOModule: alpha must be a finite number in [0, 1], got 2.0"),
                      (["--data.batch_size", "0"], "GroundingDataModule: batch_size must be an integer >= 1, got 0")]:
        err = _fit(args)
        assert msg in str(err), (args, repr(err))
    shutil.rmtree(tmp_path / "runs")
