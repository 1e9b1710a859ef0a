"""Greedy per-split validation shared by the SFT and GRPO modules (paper Table 7 decoding).

Every val/test/predict batch goes through the one HF generate path
(:func:`egm.generation.hf.hf_generate`), is scored with the adapter's own parser
(:func:`egm.scoring.score_texts`) and becomes :class:`egm.scoring.Prediction` records, the format
``egm evaluate`` writes too. Validation logs per split grounding accuracy (IoU > 0.5), mean IoU and
the parse-failure rate as torchmetrics ``MeanMetric`` objects (reduced across ranks) and keeps the
first records of the epoch for the W&B table (:class:`egm.callbacks.WandbPredictionTable`).

:class:`GroundingEvalHooks` is the part both LightningModules share: the validation, test and
predict hooks, the evaluation collator, the model loading that ZeRO-3 needs, and the Hugging Face
export at the end of ``fit``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric

from egm.generation.hf import hf_generate
from egm.generation.sampling import SamplingParams
from egm.models.base import GroundingAdapter
from egm.scoring import Prediction, score_texts
from egm.strategies import gathered_parameters, zero3_for_transformers

log = logging.getLogger(__name__)


class GroundingValidation:
    """Greedy generation + per-split grounding metrics and kept records, for one LightningModule.

    Args:
        module: the host module (``adapter``, ``model``, ``device``, ``log_dict``).
        sampling: validation decoding (Table 7: greedy).
        keep: records kept per stage and epoch on this rank (the W&B table's rows).
    """

    METRICS = ("acc", "miou", "parse_fail")

    def __init__(self, module: LightningModule, sampling: SamplingParams, keep: int = 256):
        self.module, self.sampling = module, sampling
        self.metrics = torch.nn.ModuleDict()
        self.keep = keep
        self.records: dict[str, list[Prediction]] = {}
        #: the kept records of the last finished epoch, per stage ("val", "test")
        self.last_records: dict[str, list[Prediction]] = {}

    def _metric(self, key: str) -> MeanMetric:
        safe = key.replace("/", "__")
        if safe not in self.metrics:
            self.metrics[safe] = MeanMetric().to(self.module.device)
        return self.metrics[safe]

    @torch.no_grad()
    def predict(self, batch: dict[str, Any], split: str | None) -> list[Prediction]:
        """Greedy answers for a generation batch (``{"inputs", "examples"}``), scored -> records."""
        adapter: GroundingAdapter = self.module.adapter
        new = hf_generate(adapter, self.module.model, batch["inputs"], self.sampling)
        texts = adapter.decode(new, 0)
        samples = [ex["sample"] for ex in batch["examples"]]
        return [Prediction.of(s, split, t, sc) for s, t, sc in zip(samples, texts, score_texts(texts, samples, adapter.parse))]

    def step(self, batch: dict[str, Any], split: str, stage: str) -> list[Prediction]:
        records = self.predict(batch, split)
        kept = self.records.setdefault(stage, [])
        kept += records[:max(self.keep - len(kept), 0)]
        for r in records:
            self._metric(f"{stage}/{split}/acc").update(float(r.success))
            self._metric(f"{stage}/{split}/miou").update(r.iou)
            self._metric(f"{stage}/{split}/parse_fail").update(float(r.parse_failure))
        return records

    def epoch_end(self, stage: str) -> dict[str, float]:
        out = {}
        for safe, m in self.metrics.items():
            key = safe.replace("__", "/")
            if key.startswith(stage + "/") and m.update_called:
                out[key] = float(m.compute())  # MeanMetric.compute() syncs across ranks
                m.reset()
        self.last_records[stage] = self.records.pop(stage, [])
        if out:
            self.module.log_dict(out, sync_dist=False, add_dataloader_idx=False)
        return out


class GroundingEvalHooks:
    """Hooks shared by the SFT and GRPO modules: validation, test, predict, evaluation collate,
    ZeRO-3-aware model loading and the export at the end of ``fit``.

    The host LightningModule provides ``self.validation`` (:class:`GroundingValidation`),
    ``self.adapter``, ``self.model`` and an ``export_dir`` hyper-parameter.
    """

    def split_name(self, dataloader_idx: int, stage: str) -> str:
        """The split behind ``dataloader_idx``: the datamodule's name for it (``split<i>`` without one)."""
        dm = getattr(self._trainer, "datamodule", None)  # None outside a Trainer
        names = getattr(dm, "split_name", None)
        return names(stage, dataloader_idx) if callable(names) else f"split{dataloader_idx}"

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        self.validation.step(batch, self.split_name(dataloader_idx, "val"), "val")

    def on_validation_epoch_end(self) -> None:
        self.validation.epoch_end("val")

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        self.validation.step(batch, self.split_name(dataloader_idx, "test"), "test")

    def on_test_epoch_end(self) -> None:
        self.validation.epoch_end("test")

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """``egm predict``: one :class:`~egm.scoring.Prediction` record (JSON form) per sample."""
        return [r.to_json() for r in self.validation.predict(batch, self.split_name(dataloader_idx, "predict"))]

    def collate_eval(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Collator of the val/test/predict loaders: left-padded prompts + the samples to score."""
        return {"inputs": self.adapter.collate_generate(examples),
                "examples": [{"sample": ex["sample"]} for ex in examples]}

    def load_policy(self) -> torch.nn.Module:
        """The adapter's model, loaded so that ZeRO-3 can partition it as it is built."""
        self.zero3_hf = zero3_for_transformers(self._trainer)  # kept alive: transformers holds a weakref
        return self.adapter.load_model()

    def on_fit_end(self) -> None:
        if self.hparams.export_dir:
            self.export(self.hparams.export_dir)

    def export(self, out_dir: str | Path) -> Path:
        """Write a Hugging Face folder (LoRA merged) that transformers and vLLM load.

        Every rank calls it (``on_fit_end``): under ZeRO-3 each rank holds only a shard of every
        parameter, so they gather them together first; rank 0 writes, the others wait for it.
        """
        with gathered_parameters(self.model):
            if self.global_rank == 0:
                self.adapter.save_pretrained(self.model, out_dir)
                log.info("exported Hugging Face checkpoint to %s", out_dir)
        if self._trainer is not None and self.trainer.world_size > 1:
            self.trainer.strategy.barrier("export")
        return Path(out_dir)
