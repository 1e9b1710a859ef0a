"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes (gloo, ``egm.strategies.CPUDeepSpeedStrategy``),
each checked against an independent path: the same step in 1 process without DeepSpeed.

One launch per ZeRO stage (this file is the script: ``python tests/test_strategies.py STAGE CK TRAIN
OUT``) runs several fits in the same 2 processes; rank 0 writes what the tests compare:

1. **GRPO**: one optimiser step accumulated over 3 micro-batches per rank (fixed rollouts, as in
   ``test_ddp.py``) against one full-batch backward in 1 process -- ZeRO-1/2 kept only the last
   micro-batch, ZeRO-3 overwrote each one's gradient with the next, before
   ``egm.strategies.begin_micro_batch``;
2. **SFT**: one optimiser step accumulated over 2 micro-batches (batch 1 per rank) against
   Lightning's own accumulation in 1 process (batch 2 = the same global micro-batches) -- DeepSpeed
   divided by the accumulation a second time before ``egm.strategies.deepspeed_loss_factor``. The
   fit ends with the Hugging Face export, compared with the gathered ZeRO weights;
3. **resume** (ZeRO-2): 4 SFT steps (AdamW, warm-up + cosine) uninterrupted, then 2 steps with a
   checkpoint, then ``ckpt_path="last"`` up to 4: the per-micro-batch losses must agree.

The two single-step checks use plain SGD: the update is then ``-lr x gradient``, so it checks the
gradient including its scale. AdamW's first step is about ``lr x sign(gradient)``, blind to a
gradient 1/accumulation too small. Parameters are gathered with ``deepspeed.utils``'s public
``safe_get_full_fp32_param``, independently of the export's own gathering.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

import deepspeed  # noqa: F401  (the test environment must have it: fail, never skip)
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy
from multirank import QUIET, grpo_module, launch, sft_module, uneven_world

from egm.strategies import INTERNALS, CPUDeepSpeedStrategy

GRPO_PROMPTS, SFT_GLOBAL_BATCH = 4, 4  # per optimiser step, over all ranks


def sgd(module, lr: float = 1e4):
    """Swap the module's AdamW for SGD (constant LR): the update is ``-lr x gradient``.

    The LR is large so that the update, not the fp32 rounding of ``p - lr g``, sets the digits
    compared: some weights are O(1) (the vision position embedding) and their gradients O(1e-4).
    """

    def configure_optimizers():
        opt = torch.optim.SGD([p for p in module.model.parameters() if p.requires_grad], lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    module.configure_optimizers = configure_optimizers
    return module


def full_params(module) -> dict[str, torch.Tensor]:
    """Trainable parameters as full fp32 tensors; under DeepSpeed a collective (all ranks call it)."""
    zero = any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in module.parameters())
    if zero:
        from deepspeed.utils import safe_get_full_fp32_param
    return {n: (safe_get_full_fp32_param(p) if zero else p).detach().float().cpu().clone()
            for n, p in module.named_parameters() if p.requires_grad}


class Record(Callback):
    """Final parameters (gathered) and the synced ``train/loss`` of every micro-batch."""

    def __init__(self):
        self.params: dict[str, torch.Tensor] = {}
        self.losses: dict[tuple[int, int], float] = {}  # (epoch, batch index) -> loss
        self.world_size = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self.losses[(trainer.current_epoch, batch_idx)] = float(loss)

    def on_train_end(self, trainer, pl_module):
        self.params, self.world_size = full_params(pl_module), trainer.world_size

    def result(self) -> dict:
        return {"params": self.params, "losses": self.losses, "world_size": self.world_size}


def fit(module, train: str, batch: int, strategy, devices: int, max_steps: int, callbacks=(), ckpt_path=None,
        accumulate: int = 1, **trainer_kwargs) -> dict:
    from egm.data.datamodule import GroundingDataModule

    L.seed_everything(0)
    rec = Record()
    t = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=devices, strategy=strategy,
                  accumulate_grad_batches=accumulate, callbacks=[rec, *callbacks],
                  **{**QUIET, **trainer_kwargs})
    t.fit(module, GroundingDataModule(train=train, batch_size=batch, seed=5), ckpt_path=ckpt_path)
    return rec.result()


def grpo_step(ck, train, strategy, devices):
    """One GRPO optimiser step on 4 prompts x 3 samples: micro-batches of 2 responses under
    DeepSpeed (3 per rank; groups split over micro-batches, log-probs with the shared prefix,
    :mod:`egm.rl.prefix`), the whole batch in one backward, per response, for the 1-process reference."""
    micro = 2 if devices > 1 else GRPO_PROMPTS * 3
    return fit(sgd(grpo_module(ck, micro_batch_size=micro, shared_prefix=devices > 1)), train, GRPO_PROMPTS // devices,
               strategy, devices, 1)


def sft_step(ck, train, strategy, devices, export_dir=None):
    """One SFT optimiser step over a global batch of 4 in micro-batches of 2 (over all ranks)."""
    accumulate = SFT_GLOBAL_BATCH // 2
    return fit(sgd(sft_module(ck, export_dir=export_dir)), train, 2 // devices, strategy, devices, 1,
               accumulate=accumulate)


def resume_runs(ck, train, out: Path, strategy) -> dict:
    """Losses of an uninterrupted 4-step SFT run, of its first 2 steps, and of the resume to 4."""
    from egm.callbacks import RNGStateCheckpoint

    def run(max_steps, name, ckpt_path=None):
        ckpt = ModelCheckpoint(dirpath=out / name, save_last=True, every_n_train_steps=2)
        m = sft_module(ck, warmup_steps=2, min_lr_ratio=0.1)
        return fit(m, train, 1, strategy(), 2, max_steps, [ckpt, RNGStateCheckpoint()], ckpt_path,
                   accumulate=2, enable_checkpointing=True)["losses"]

    return {"full": run(4, "full"), "cut": run(2, "cut"), "resumed": run(4, "cut", ckpt_path="last"),
            "last_is_dir": (out / "cut" / "last.ckpt").is_dir()}


def main(stage: int, ck: str, train: str, out: str) -> None:
    torch.set_num_threads(1)
    out = Path(out)

    def strategy():
        if stage == 2:
            return CPUDeepSpeedStrategy(stage=2)
        # every parameter partitioned: by default ZeRO-3 keeps parameters under 1e5 elements whole
        # on every rank, which is all of the tiny model's
        return CPUDeepSpeedStrategy(config={"zero_allow_untested_optimizer": True, "zero_optimization": {
            "stage": 3, "stage3_param_persistence_threshold": 0}})

    res = {"grpo": grpo_step(ck, train, strategy(), 2),
           "sft": sft_step(ck, train, strategy(), 2, export_dir=str(out / "export"))}
    if stage == 2:
        res["resume"] = resume_runs(ck, train, out, strategy)
    if torch.distributed.get_rank() == 0:
        torch.save(res, out / "result.pt")


# -- tests ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory, qwen_dir):
    return str(qwen_dir), uneven_world(tmp_path_factory.getbasetemp(), qwen_dir)


@pytest.fixture(scope="module")
def reference(world, qwen_dir):
    """1 process, no DeepSpeed: initial weights and the GRPO / SFT steps."""
    ck, train = world
    m = sft_module(ck)
    m.configure_model()
    return {"init": full_params(m), "grpo": grpo_step(ck, train, "auto", 1), "sft": sft_step(ck, train, "auto", 1)}


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def zero(request, world, tmp_path_factory):
    ck, train = world
    out = tmp_path_factory.mktemp(f"zero{request.param}")
    launch(__file__, str(request.param), ck, train, str(out), timeout=600)
    return {"stage": request.param, "out": out, **torch.load(out / "result.pt", weights_only=False)}


def assert_same_update(got: dict, ref: dict, init: dict) -> None:
    """Per tensor: ``|du - du_ref| <= 1e-5 (|du_ref| + max |du_ref|)`` for the update ``du``."""
    assert got["world_size"] == 2 and ref["world_size"] == 1
    assert got["params"].keys() == ref["params"].keys() == init.keys() and len(init) > 10
    moved = 0
    for name, p0 in init.items():
        du, du_ref = got["params"][name] - p0, ref["params"][name] - p0
        scale = float(du_ref.abs().max())
        torch.testing.assert_close(du, du_ref, rtol=1e-5, atol=1e-5 * scale + 1e-12, msg=name)
        moved += scale > 0
    assert moved > len(init) // 2  # the step moved most tensors


def test_grpo_step_over_micro_batches_matches_one_process(zero, reference):
    assert_same_update(zero["grpo"], reference["grpo"], reference["init"])


def test_sft_accumulated_step_matches_one_process(zero, reference):
    assert_same_update(zero["sft"], reference["sft"], reference["init"])
    # train/loss is synced over ranks: the token-mean of each global micro-batch, as in 1 process
    got, ref = zero["sft"]["losses"], reference["sft"]["losses"]
    assert list(got) == list(ref) == [(0, 0), (0, 1)]
    assert list(got.values()) == pytest.approx(list(ref.values()), rel=1e-5)


def test_export_loads_in_transformers_and_equals_gathered_weights(zero):
    import transformers

    model, info = transformers.Qwen3VLForConditionalGeneration.from_pretrained(
        zero["out"] / "export", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    gathered = zero["sft"]["params"]
    exported = dict(model.named_parameters())
    assert {f"model.{n}" for n in exported} == set(gathered)
    for name, p in exported.items():
        assert torch.equal(p.detach(), gathered[f"model.{name}"]), name


@pytest.mark.parametrize("zero", [2], indirect=True, ids=["zero2"])
def test_zero2_resume_from_last_continues_with_identical_losses(zero):
    r = zero["resume"]
    assert r["last_is_dir"]  # a DeepSpeed checkpoint (a folder of shards), restored by DeepSpeed
    full, cut, resumed = r["full"], r["cut"], r["resumed"]
    assert sorted(full) == [(e, b) for e in range(4) for b in range(2)]  # 1 step per epoch (4 samples)
    assert sorted(cut) == sorted(full)[:4] and sorted(resumed) == sorted(full)[4:]
    for key, loss in {**cut, **resumed}.items():
        assert loss == pytest.approx(full[key], rel=1e-5, abs=1e-6), key
    assert len(set(full.values())) == len(full)  # the losses do change from step to step


def _undecorated(fn, qualname: str):
    """``fn`` itself under a decorator (DeepSpeed's ``instrument_w_nvtx`` keeps it in a closure)."""
    fn = inspect.unwrap(fn)
    inner = [c.cell_contents for c in getattr(fn, "__closure__", None) or ()
             if getattr(c.cell_contents, "__qualname__", None) == qualname]
    return inner[0] if inner else fn


def test_cpu_strategy_overrides_match_the_internals_they_replace():
    """The CPU strategy re-implements parts of Lightning's DeepSpeedStrategy and switches off a
    DeepSpeed op; ``begin_micro_batch`` repeats what DeepSpeed's engine forward does first (private
    API): when an upgrade changes them, this fails and names what to re-read."""
    for target, fragments in INTERNALS.items():
        module, _, qualname = target.partition(":")
        obj = importlib.import_module(module)
        for attr in qualname.split("."):
            assert hasattr(obj, attr), f"{target} is gone"
            obj = getattr(obj, attr)
        src = inspect.getsource(_undecorated(obj, qualname))
        for fragment in fragments:
            assert fragment in src, f"{target} no longer contains {fragment!r}"
    assert CPUDeepSpeedStrategy.root_device.fget is not DeepSpeedStrategy.root_device.fget


def test_cpu_strategy_by_class_path(capsys, monkeypatch):
    """``trainer.strategy.class_path: egm.strategies.CPUDeepSpeedStrategy`` resolves in a recipe."""
    import yaml

    from egm import cli

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    with pytest.raises(SystemExit) as e:
        cli.lightning_cli(["fit", "--config", "configs/demo_sft.yaml",
                           "--trainer.strategy", "egm.strategies.CPUDeepSpeedStrategy",
                           "--trainer.strategy.init_args.stage", "3", "--print_config"])
    assert e.value.code in (0, None)
    strat = yaml.safe_load(capsys.readouterr().out)["trainer"]["strategy"]
    assert strat["class_path"] == "egm.strategies.CPUDeepSpeedStrategy" and strat["init_args"]["stage"] == 3


if __name__ == "__main__":
    stage, ck, train, out = sys.argv[1:5]
    main(int(stage), ck, train, out)
