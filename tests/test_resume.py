"""Exact mid-epoch resume: a run killed after a checkpoint and restarted with ``ckpt_path="last"``
sees the same batches, optimiser / scheduler / RNG state, hence the same per-step losses, as an
uninterrupted run (SFT of the tiny Qwen3-VL on the synthetic world, CPU)."""

from __future__ import annotations

import csv

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from egm.callbacks import RNGStateCheckpoint
from egm.data.datamodule import GroundingDataModule, ResumableDataLoader, WeightedMixSampler
from egm.data.synthetic import make_synthetic
from egm.generation.sampling import SamplingParams
from egm.models import Qwen3VLAdapter
from egm.sft import SFTModule

STEPS, EVERY, KILL_AT = 10, 4, 8  # 6 batches / epoch: the kill is at epoch 1, batch 2


@pytest.fixture(scope="module")
def world(tmp_path_factory, qwen_dir):
    root = tmp_path_factory.getbasetemp()
    ck = qwen_dir
    paths = make_synthetic(str(root / "syn_resume"), n_train=12, n_val=2, n_test=2, image_size=64)
    return ck, paths


class Killed(RuntimeError):
    pass


class KillAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Killed(f"killed at step {self.step}")


def _run(ck, paths, tmp, name, kill_at=None, ckpt_path=None):
    L.seed_everything(0)
    dm = GroundingDataModule(train=paths["train"], batch_size=2, seed=3)
    m = SFTModule(Qwen3VLAdapter(str(ck), max_length=256), lr=3e-3, warmup_steps=3, min_lr_ratio=0.1,
                  val_sampling=SamplingParams(max_new_tokens=4))
    order = []

    class Order(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            order.append((trainer.global_step, batch["inputs"]["input_ids"].sum().item()))

    cbs = [ModelCheckpoint(dirpath=tmp / "ckpt", every_n_train_steps=EVERY, save_last=True, save_top_k=-1),
           RNGStateCheckpoint(), Order()]
    if kill_at is not None:
        cbs.append(KillAt(kill_at))
    t = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=CSVLogger(tmp, name=name),
                  log_every_n_steps=1, callbacks=cbs, limit_val_batches=0, num_sanity_val_steps=0,
                  enable_progress_bar=False, enable_model_summary=False)
    try:
        t.fit(m, dm, ckpt_path=ckpt_path)
    except Killed:
        pass
    rows = list(csv.DictReader(open(t.logger.log_dir + "/metrics.csv")))
    losses = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    return losses, dict(order), t


def test_mid_epoch_resume_matches_uninterrupted_run(world, tmp_path):
    ck, paths = world
    full, full_order, _ = _run(ck, paths, tmp_path / "full", "full")
    assert sorted(full) == list(range(STEPS))
    part, _, t = _run(ck, paths, tmp_path / "cut", "cut", kill_at=KILL_AT)
    assert t.global_step == KILL_AT and max(part) == KILL_AT - 1
    assert (tmp_path / "cut" / "ckpt" / "last.ckpt").is_file()
    resumed, resumed_order, t2 = _run(ck, paths, tmp_path / "cut", "resumed", ckpt_path="last")
    assert t2.global_step == STEPS
    assert sorted(resumed) == list(range(KILL_AT, STEPS))
    # the same batches (fingerprint = sum of input ids) at the same steps ...
    assert {s: full_order[s] for s in resumed_order} == resumed_order
    # ... and the same losses: optimiser, scheduler and weights restored
    for s in range(KILL_AT, STEPS):
        assert resumed[s] == pytest.approx(full[s], rel=1e-5, abs=1e-6), (s, resumed[s], full[s])
    for s in range(KILL_AT):
        assert part[s] == pytest.approx(full[s], rel=1e-5, abs=1e-6)


def test_loader_state_skips_the_trained_batches():
    sampler = WeightedMixSampler([10], seed=1)
    dl = ResumableDataLoader(list(range(10)), batch_size=2, sampler=sampler, collate_fn=list)
    sampler.set_epoch(2)
    full = list(dl)
    it = iter(dl)
    seen = [next(it) for _ in range(3)]
    state = dl.state_dict()
    assert state == {"batches": 3, "sampler": {"epoch": 2, "seed": 1, "num_samples": 10}}

    fresh_sampler = WeightedMixSampler([10], seed=1)
    fresh = ResumableDataLoader(list(range(10)), batch_size=2, sampler=fresh_sampler, collate_fn=list)
    fresh.load_state_dict(state)
    assert fresh_sampler.epoch == 2 and len(fresh) == 5  # full length: Lightning counts skipped batches
    assert seen + list(fresh) == full
    assert list(fresh) == full  # the skip applies to one iteration only
    with pytest.raises(ValueError, match="seed"):
        ResumableDataLoader(list(range(10)), batch_size=2, sampler=WeightedMixSampler([10], seed=2)).load_state_dict(state)
