"""Optimiser and learning-rate schedule shared by the SFT and GRPO modules.

Both stages of the paper use AdamW with a cosine schedule after a linear warm-up (section 5.1,
Table 5: LR 3e-6, 30 warm-up steps, cosine). The schedule is stepped per optimiser step, and
its length comes from ``trainer.estimated_stepping_batches`` so that gradient accumulation and
the number of devices are accounted for.

Against verl (the paper's RL framework), two differences, both selectable:

* **Schedule** (``schedule``): egm's :func:`cosine_with_warmup` starts at ``lr / warmup`` and
  steps per optimiser step; verl's ``get_cosine_schedule_with_warmup`` starts at LR 0 and its
  FSDP worker steps it once per rollout batch (``update_actor``), however many mini-batch
  optimiser steps that batch takes: :func:`verl_cosine_with_warmup`, ``schedule="verl"``.
* **Weight decay**: verl's AdamW (``actor.optim.weight_decay``, default 0.01) decays every
  parameter; egm leaves biases and norm weights (``ndim < 2``) undecayed, the usual
  transformers/nanoGPT practice. At LR 3e-6 and decay 0.01 a weight shrinks by 3e-8 of itself
  per step, 7e-5 over the ~2,200 steps of the largest run (Table 6: 111,093 prompts / 256 x 5
  epochs), so the two choices differ by less than bf16's resolution (4e-3) on the norms.

Numerics (not here: a trainer setting): verl loads the actor in float32 (Table 5's "dtype
float32") and computes in bf16 through FSDP ``MixedPrecision(param_dtype=bf16,
reduce_dtype=fp32)``, i.e. bf16 compute with fp32 master weights. In Lightning that is
``trainer.precision: bf16-mixed`` with the adapter's ``torch_dtype: float32`` (autocast under
DDP; under DeepSpeed, bf16 weights with fp32 master copies in the ZeRO optimiser).
"""

from __future__ import annotations

import math

import torch

from egm.errors import InputError


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """LR multiplier: linear ramp ``(step+1)/warmup`` then cosine decay to ``min_lr_ratio``.

    ``step`` counts optimiser steps from 0. The first step already uses a non-zero LR
    (``1/warmup``), as in transformers' ``get_cosine_schedule_with_warmup`` shifted by one, so
    that no optimiser step is wasted at LR 0.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def verl_cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """verl's ``get_cosine_schedule_with_warmup`` multiplier: linear warm-up from the floor, then cosine.

    ``step`` counts scheduler steps, which verl makes once per rollout batch; with Table 5's
    cosine to 0 (``min_lr_ratio = 0``) the first batch trains at LR 0 (Adam's moments still see
    its gradients). The warm-up starts at ``min_lr_ratio`` as in verl of the paper's time (2025;
    later versions start at ``init_lr_ratio``, default 0: the same for ``min_lr_ratio = 0``).
    ``progress`` is capped at 1 (verl's cosine would rise again past ``total_steps``).
    """
    if step < warmup_steps:
        return min_lr_ratio + (1.0 - min_lr_ratio) * step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return max(min_lr_ratio, min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_optimizer(
    params,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
    schedule: str = "per_step",
    steps_per_batch: int = 1,
):
    """AdamW on trainable parameters (biases and norms without weight decay) + cosine.

    ``schedule="per_step"``: :func:`cosine_with_warmup` over ``total_steps`` optimiser steps.
    ``schedule="verl"``: :func:`verl_cosine_with_warmup` over ``total_steps`` rollout batches of
    ``steps_per_batch`` optimiser steps each, which all share their batch's LR. The scheduler is
    stepped once per optimiser step either way. Returns the ``configure_optimizers`` dict.
    """
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas)
    if schedule == "per_step":
        def fn(s: int) -> float:
            return cosine_with_warmup(s, warmup_steps, max(1, total_steps), min_lr_ratio)
    elif schedule == "verl":
        if steps_per_batch < 1:
            raise InputError(f"steps_per_batch must be >= 1, got {steps_per_batch}")

        def fn(s: int) -> float:
            return verl_cosine_with_warmup(s // steps_per_batch, warmup_steps, max(1, total_steps), min_lr_ratio)
    else:
        raise InputError(f"schedule must be 'per_step' or 'verl', got {schedule!r}")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
