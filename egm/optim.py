"""Optimiser and learning-rate schedule shared by the SFT and GRPO modules.

Both stages of the paper use AdamW with a cosine schedule after a linear warm-up (section 5.1,
Table 5: LR 3e-6, 30 warm-up steps, cosine). The schedule is stepped per optimiser step, and
its length comes from ``trainer.estimated_stepping_batches`` so that gradient accumulation and
the number of devices are accounted for.
"""

from __future__ import annotations

import math

import torch


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


def build_optimizer(
    params,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
):
    """AdamW on trainable parameters (biases and norms without weight decay) + per-step cosine.

    Returns the ``configure_optimizers`` dict Lightning expects.
    """
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_with_warmup(s, warmup_steps, max(1, total_steps), min_lr_ratio)
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
