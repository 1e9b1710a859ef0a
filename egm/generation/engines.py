"""The rollout engine a GRPO run uses, built from its ``model.engine`` / ``model.vllm`` settings."""

from __future__ import annotations

from dataclasses import asdict
from typing import Literal

import torch

from egm.errors import InputError
from egm.generation.hf import HFEngine
from egm.generation.rollout import RolloutEngine
from egm.generation.vllm import VLLMEngine, VLLMSettings
from egm.models.base import GroundingAdapter


def build_engine(kind: Literal["hf", "vllm"], adapter: GroundingAdapter, model: torch.nn.Module,
                 rollout_batch_size: int | None = None, vllm: VLLMSettings | None = None,
                 rank: int = 0, local_rank: int = 0, world_size: int = 1) -> RolloutEngine:
    """``"hf"``: :class:`HFEngine` on the live policy ``model`` (``rollout_batch_size`` responses per
    ``generate``); ``"vllm"``: a colocated :class:`VLLMEngine` for this rank (``vllm`` settings)."""
    if kind == "hf":
        return HFEngine(adapter, model, rollout_batch_size)
    if kind == "vllm":
        return VLLMEngine(adapter, **asdict(vllm or VLLMSettings()), rank=rank, local_rank=local_rank,
                          world_size=world_size)
    raise InputError(f"engine must be 'hf' or 'vllm', got {kind!r}")
