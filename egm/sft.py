"""Supervised fine-tuning on reasoning traces (paper section 4.1 and 4.3, settings of 5.1).

The model learns to write the reasoning trace, then the answer in its family's box format.
The loss is the causal-LM cross-entropy on the assistant tokens only: the collator of the
model adapter sets every other label to -100, so this module only wires adapter, optimiser and
metrics. Logits are computed only at those tokens, a chunk at a time
(:func:`egm.models.head.label_cross_entropy`): the same loss and gradients as the model's own
``loss``, without a ``(b, L, V)`` logits tensor. Validation generates greedily with the paper's
inference parameters (Table 7) on every eval split and logs grounding accuracy (IoU > 0.5), mean
IoU and the parse-failure rate.

Paper settings (section 5.1): lr 1e-5, 1 epoch, global batch 128 (8 GPUs); the global batch is
reached with :class:`GlobalBatchSize`, which derives gradient accumulation from it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from egm.config_checks import SFT_RULES, check_ranges
from egm.errors import InputError
from egm.generation.sampling import SamplingParams
from egm.models.base import GroundingAdapter
from egm.models.head import DEFAULT_CHUNK_TOKENS, label_cross_entropy
from egm.optim import build_optimizer
from egm.strategies import deepspeed_loss_factor
from egm.validation import GroundingEvalHooks, GroundingValidation

log = logging.getLogger(__name__)


class SFTModule(GroundingEvalHooks, LightningModule):
    """SFT of any :class:`~egm.models.base.GroundingAdapter` model on (image, prompt, trace+answer).

    Args:
        adapter: the model family adapter (``class_path: egm.models.Qwen3VLAdapter`` ...):
            checkpoint, dtype, LoRA, vision freezing and gradient checkpointing live there.
        lr: peak learning rate (paper: 1e-5).
        weight_decay, betas: AdamW settings.
        warmup_steps: linear warm-up optimiser steps before the cosine decay.
        min_lr_ratio: the cosine floor as a fraction of ``lr``.
        val_sampling: decoding for validation (paper Table 7: greedy). ``max_new_tokens``
            bounds validation time.
        export_dir: where to write the Hugging Face model + processor at the end of ``fit``
            (``None`` disables the export).
        logprob_chunk_tokens: label tokens per chunk of the vocabulary projection: logits exist
            only at label positions, a chunk at a time (:func:`egm.models.head.label_cross_entropy`).
    """

    def __init__(
        self,
        adapter: GroundingAdapter,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        val_sampling: SamplingParams = SamplingParams(),
        export_dir: str | None = None,
        logprob_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ):
        check_ranges("SFTModule", locals(), SFT_RULES)  # before any model loads (egm.config_checks)
        super().__init__()
        if isinstance(val_sampling, dict):  # jsonargparse may hand a YAML block over as a dict
            val_sampling = SamplingParams(**val_sampling)
        self.save_hyperparameters(ignore=["adapter"])
        self.adapter = adapter
        self.model: torch.nn.Module | None = None
        self.validation = GroundingValidation(self, val_sampling)
        self._t_last: float | None = None

    # -- model -----------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Load the model lazily (DeepSpeed ZeRO-3 / FSDP shard it as it is built)."""
        if self.model is None:
            # from_pretrained returns eval mode; Lightning keeps a module's mode, so switch here
            self.model = self.load_policy().train()

    def collate_fn(self, stage: str):
        """Collator the datamodule uses: training batches, or generation batches + samples."""
        if stage == "train":
            return lambda examples: {"inputs": self.adapter.collate_train(examples)}
        return self.collate_eval

    # -- training --------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Token-mean cross-entropy over the *global* micro-batch (all ranks).

        The model's loss is the mean over this rank's target tokens; DDP/DeepSpeed then average
        the ranks' gradients, which weights every rank equally whatever its token count. Rescaling
        by ``local tokens / (global tokens / world)`` makes the averaged gradient the token-mean of
        the whole global micro-batch, i.e. the same as one process with ``world`` times the batch.
        With gradient accumulation each micro-batch's mean counts ``1/accumulation`` (Lightning's
        division; under DeepSpeed :func:`~egm.strategies.deepspeed_loss_factor` undoes the engine's
        second one).
        """
        inputs = batch["inputs"]
        loss, n_tok = label_cross_entropy(self.model, inputs, self.hparams.logprob_chunk_tokens)
        bs = inputs["input_ids"].shape[0]
        world = self.trainer.world_size if self._trainer else 1
        if world > 1:
            total = self.trainer.strategy.reduce(n_tok.float(), reduce_op="sum")
            loss = loss * n_tok / (total / world).clamp_min(1.0)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs, sync_dist=world > 1)
        self.log("train/target_tokens", n_tok.float(), reduce_fx="sum", batch_size=bs, sync_dist=world > 1)
        now = time.perf_counter()
        if self._t_last is not None:
            self.log("train/samples_per_s", bs / max(now - self._t_last, 1e-9), batch_size=bs)
        self._t_last = now
        return loss * deepspeed_loss_factor(self._trainer)

    def configure_optimizers(self):
        total = int(self.trainer.estimated_stepping_batches) if self.trainer else 1
        h = self.hparams
        return build_optimizer(self.model.parameters(), h.lr, h.weight_decay, tuple(h.betas),
                               h.warmup_steps, total, h.min_lr_ratio)

class GlobalBatchSize(Callback):
    """Reach a global batch (paper: 128 for SFT, 256 for RL) by gradient accumulation.

    ``accumulate = global_batch_size / (micro_batch_size * world_size)``; a global batch that
    does not divide evenly is an error at set-up rather than a silently different recipe.
    """

    def __init__(self, global_batch_size: int):
        self.global_batch_size = global_batch_size

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        micro = getattr(trainer.datamodule, "batch_size", None)
        if micro is None:
            raise InputError("GlobalBatchSize needs a datamodule with a `batch_size` attribute")
        per_step = micro * trainer.world_size
        if self.global_batch_size % per_step:
            raise InputError(
                f"global batch {self.global_batch_size} is not a multiple of micro batch {micro} x "
                f"{trainer.world_size} processes"
            )
        trainer.accumulate_grad_batches = self.global_batch_size // per_step
        log.info("global batch %d = %d x %d processes x %d accumulation", self.global_batch_size, micro,
                 trainer.world_size, trainer.accumulate_grad_batches)
