"""Data parallelism on CPU (gloo): 2 processes x batch 2 give the gradient of 1 process x batch 4.

SFT: the global-token-mean loss (``SFTModule.training_step``) makes the DDP-averaged gradient the
token-mean over the whole global batch, whatever each rank's token count. GRPO: every rank rolls
out its own prompts (whole groups) and normalises by the global token count; with rollouts fixed
per (prompt, sample index) -- sampling differs per rank by design -- the gradient of the global
batch is the single-process one. The 2-process runs go through Lightning's ``strategy="ddp"``
launcher in a subprocess (this file is the script: ``python tests/test_ddp.py sft|grpo ...``); the
reference runs in the test process. Gradients are dumped by rank 0 before the optimiser step.
"""

from __future__ import annotations

import json
import os
import sys

import lightning as L
import pytest
import torch
from multirank import QUIET, ROOT, grpo_module, launch, sft_module, uneven_world
from lightning.pytorch.callbacks import Callback


class DumpGrads(Callback):
    """Rank 0 writes the (already all-reduced) gradients and step metrics of the first optimiser step."""

    def __init__(self, out: str):
        self.out = out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.is_global_zero and not os.path.exists(self.out):
            grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
            torch.save({"grads": grads, "world_size": trainer.world_size}, self.out)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.is_global_zero:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
            obj = torch.load(self.out)
            torch.save({**obj, "metrics": metrics}, self.out)


def run(kind: str, ck: str, train: str, out: str, devices: int, batch: int) -> None:
    """One optimiser step of SFT or GRPO on ``train`` (4 samples), gradients dumped to ``out``."""
    from egm.data.datamodule import GroundingDataModule

    torch.set_num_threads(1)
    L.seed_everything(0)
    dm = GroundingDataModule(train=train, batch_size=batch, seed=5)
    m = sft_module(ck) if kind == "sft" else grpo_module(ck)
    t = L.Trainer(max_steps=1, accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                  callbacks=[DumpGrads(out)], **QUIET)
    t.fit(m, dm)


@pytest.fixture(scope="module")
def world(tmp_path_factory, qwen_dir):
    return str(qwen_dir), uneven_world(tmp_path_factory.getbasetemp(), qwen_dir)


def _compare(kind: str, world, tmp_path):
    ck, train = world
    n = torch.get_num_threads()
    try:
        run(kind, ck, train, str(tmp_path / "one.pt"), devices=1, batch=4)
    finally:
        torch.set_num_threads(n)
    launch(__file__, kind, ck, train, str(tmp_path / "two.pt"), "2", "2")
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 10
    for name, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], g, rtol=1e-4, atol=1e-7, msg=name)
    return one, two


def test_sft_ddp_gradient_matches_single_process(world, tmp_path):
    one, two = _compare("sft", world, tmp_path)
    # train/loss is reduced over ranks: the token-mean of the global batch
    assert two["metrics"]["train/loss"] == pytest.approx(one["metrics"]["train/loss"], rel=1e-5)


def test_grpo_ddp_gradient_matches_single_process(world, tmp_path):
    one, two = _compare("grpo", world, tmp_path)
    for key in ("train/reward/mean", "train/response_len", "train/response_len_max"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-5), key


@pytest.mark.parametrize("configs, nodes, stage", [
    (["sft_qwen3vl"], 1, 2), (["sft_internvl"], 1, 2), (["sft_qwen3vl", "zero3"], 1, 3),
    (["sft_internvl", "zero3"], 1, 3), (["sft_qwen3vl_zero3_2nodes"], 2, 3), (["rl_qwen3vl"], 1, None),
    (["rl_internvl"], 1, None)])
def test_scale_out_configs_resolve(capsys, monkeypatch, configs, nodes, stage):
    """GPU recipes: DeepSpeed stage, nodes, W&B logger and the resume / W&B callbacks."""
    import yaml

    from egm import cli

    monkeypatch.chdir(ROOT)
    args = ["fit"] + [a for c in configs for a in ("--config", f"configs/{c}.yaml")] + ["--print_config"]
    with pytest.raises(SystemExit) as e:
        cli.lightning_cli(args)
    assert e.value.code in (0, None)
    t = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert t["num_nodes"] == nodes and t["devices"] == 8
    strat = t["strategy"]["init_args"]
    cfg = strat.get("config")
    if cfg is not None:  # DeepSpeed JSON file (an inline mapping would reach Lightning as a str)
        cfg = json.loads((ROOT / cfg).read_text())
    got = cfg["zero_optimization"]["stage"] if cfg else strat["stage"]
    assert got == (stage or 2)
    assert t["logger"]["class_path"] == "lightning.pytorch.loggers.WandbLogger"
    assert {"project", "name", "tags"} <= set(t["logger"]["init_args"])
    names = [c["class_path"] for c in t["callbacks"]]
    assert "egm.callbacks.RNGStateCheckpoint" in names and "egm.callbacks.WandbPredictionTable" in names


if __name__ == "__main__":
    kind, ck, train, out, devices, batch = sys.argv[1:7]
    run(kind, ck, train, out, int(devices), int(batch))
