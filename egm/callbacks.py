"""Callbacks for long multi-GPU runs: exact-resume RNG state and the W&B prediction dashboard.

* :class:`RNGStateCheckpoint` -- Lightning 2.6 checkpoints do not hold the random state; this
  callback stores every rank's (torch, CUDA, numpy, Python) state and restores it just before the
  first batch after a resume, so dropout, sampling and augmentation continue the same stream.
* :class:`WandbPredictionTable` -- after validation, a ``wandb.Table`` of sample predictions
  (image with ground-truth and predicted boxes as W&B box overlays, expression, reasoning,
  answer, IoU, reward) and IoU / reward histograms; during GRPO, histograms of the rollout rewards
  and advantages. It reads the :class:`egm.scoring.Prediction` records that
  :class:`egm.validation.GroundingValidation` kept (``last_records``) and ``GRPOModule.last_stats``,
  and does nothing unless a ``WandbLogger`` is attached. The reward column is Eq. 8 (:func:`egm.reward.eq8`).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from egm.reward import eq8
from egm.scoring import Prediction

log = logging.getLogger(__name__)


class RNGStateCheckpoint(Callback):
    """Save each rank's RNG state in the checkpoint; restore it at the first batch after a resume.

    Restoring at ``on_train_batch_start`` (not at load time) matters: the train iterator draws its
    worker base seed from torch's RNG when the resumed epoch starts, which the uninterrupted run
    did before the checkpoint, so restoring earlier would shift the stream by that draw.
    """

    def __init__(self):
        self._pending: dict[str, Any] | None = None

    @staticmethod
    def _collect() -> dict[str, Any]:
        """The states Lightning's ``seed_everything`` sets, in the layout of Lightning's own (private)
        ``_collect_rng_states``, so checkpoints written before stay readable."""
        kind, keys, pos, has_gauss, gauss = np.random.get_state()  # numpy arrays break weights_only loading
        state = {"torch": torch.get_rng_state(), "python": random.getstate(),
                 "numpy": (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss))}
        if torch.cuda.is_available():
            state["torch.cuda"] = torch.cuda.get_rng_state_all()
        return state

    @staticmethod
    def _restore(state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if "torch.cuda" in state:
            torch.cuda.set_rng_state_all(state["torch.cuda"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, internal, py_gauss = state["python"]
        random.setstate((version, tuple(internal), py_gauss))

    def state_dict(self) -> dict[str, Any]:
        state = self._collect()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            per_rank: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(per_rank, state)  # dump_checkpoint runs on every rank
            return {"per_rank": per_rank}
        return {"per_rank": [state]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is None:
            return
        states = self._pending["per_rank"]
        if len(states) != trainer.world_size:
            log.warning("RNG state saved by %d ranks, resuming on %d: rank 0's state is used for all",
                        len(states), trainer.world_size)
        self._restore(states[trainer.global_rank] if len(states) == trainer.world_size else states[0])
        self._pending = None


def _wandb_logger(trainer: Trainer):
    from lightning.pytorch.loggers import WandbLogger

    return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)


def box_overlay(box, caption: str, class_id: int) -> dict[str, Any]:
    """One ``wandb.Image`` box (pixel ``xyxy``)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return {"position": {"minX": x0, "minY": y0, "maxX": x1, "maxY": y1}, "domain": "pixel",
            "class_id": class_id, "box_caption": caption}


class WandbPredictionTable(Callback):
    """Log validation predictions (box overlays, reasoning, IoU, reward) and histograms to W&B.

    Args:
        every_n_val: log after every n-th validation run (1: each one).
        max_rows: table rows per validation (predictions kept by the validation on rank 0).
        alpha: reward weight of Eq. 8 for the table's reward column, when the module has none
            (``GRPOModule`` has ``hparams.alpha``).
        train_every_n_steps: GRPO only, log rollout reward / advantage histograms every n
            training steps (``0``: never).
        max_text_chars: reasoning text is cut to this length in the table.
    """

    COLUMNS = ["split", "id", "image", "sentence", "reasoning", "answer", "iou", "success", "reward",
               "parse_ok", "failure"]

    def __init__(self, every_n_val: int = 1, max_rows: int = 16, alpha: float = 0.5, train_every_n_steps: int = 10,
                 max_text_chars: int = 2000):
        self.every_n_val, self.max_rows, self.alpha = every_n_val, max_rows, alpha
        self.train_every_n_steps, self.max_text_chars = train_every_n_steps, max_text_chars
        self._n_val = 0

    def _alpha(self, pl_module: LightningModule) -> float:
        return float(getattr(pl_module, "hparams", {}).get("alpha", self.alpha))

    def table(self, records: list[Prediction], alpha: float):
        """A ``wandb.Table`` of up to ``max_rows`` prediction records."""
        import wandb
        from PIL import Image

        table = wandb.Table(columns=self.COLUMNS)
        for r in records[:self.max_rows]:
            boxes = {"ground_truth": {"box_data": [box_overlay(r.gt_box, "ground truth", 0)],
                                      "class_labels": {0: "ground truth"}}}
            if r.pred_box is not None:
                boxes["prediction"] = {"box_data": [box_overlay(r.pred_box, f"IoU {r.iou:.2f}", 1)],
                                       "class_labels": {1: "prediction"}}
            try:
                with Image.open(r.image) as im:
                    image = wandb.Image(im.convert("RGB"), boxes=boxes, caption=r.sentence)
            except OSError as e:  # a moved image costs its picture, not the run
                log.warning("W&B table: cannot open %s: %s", r.image, e)
                image = None
            table.add_data(r.split, r.id, image, r.sentence, (r.reasoning or "")[:self.max_text_chars],
                           (r.answer or "")[-self.max_text_chars:], r.iou, r.success, float(eq8(r.iou, r.success, alpha)),
                           not r.parse_failure, r.failure)
        return table

    def _log_stage(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        logger = _wandb_logger(trainer)
        validation = getattr(pl_module, "validation", None)
        if logger is None or validation is None or not trainer.is_global_zero:
            return
        records = validation.last_records.get(stage) or []
        if not records:
            return
        import wandb

        alpha = self._alpha(pl_module)
        ious = np.array([r.iou for r in records], dtype=np.float64)
        succ = np.array([r.success for r in records])
        payload = {f"{stage}/predictions": self.table(records, alpha),
                   f"{stage}/iou_hist": wandb.Histogram(ious, num_bins=20),
                   f"{stage}/reward_hist": wandb.Histogram(eq8(ious, succ, alpha), num_bins=20),
                   "trainer/global_step": trainer.global_step}
        logger.experiment.log(payload)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._n_val += 1
        if (self._n_val - 1) % self.every_n_val == 0:
            self._log_stage(trainer, pl_module, "val")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_stage(trainer, pl_module, "test")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        stats = getattr(pl_module, "last_stats", None)
        n = self.train_every_n_steps
        if not stats or not n or batch_idx % n or not trainer.is_global_zero:
            return
        logger = _wandb_logger(trainer)
        if logger is None:
            return
        import wandb

        payload = {f"train/{k}_hist": wandb.Histogram(torch.as_tensor(stats[k]).float().numpy(), num_bins=20)
                   for k in ("rewards", "advantages") if k in stats}
        if payload:
            logger.experiment.log({**payload, "trainer/global_step": trainer.global_step})
