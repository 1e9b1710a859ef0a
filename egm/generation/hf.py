"""The one Hugging Face ``generate`` path: validation, evaluation and GRPO rollouts all call it.

:func:`hf_generate` is the single ``model.generate`` call (decoding settings from
:class:`~egm.generation.sampling.SamplingParams`, the adapter's pad id); its callers differ only in
what they do with the new tokens:

* validation (:mod:`egm.validation`) and evaluation (:func:`egm.eval.checkpoint.hf_generate_fn`)
  decode one greedy answer per prompt (Table 7);
* :class:`HFEngine` samples ``G`` responses per prompt for GRPO (Table 5). The prompt batch is
  repeat-interleaved ``G`` times, which is correct for every family's image tensors
  (``num_return_sequences`` would repeat InternVL's multi-tile ``pixel_values`` wrongly), and
  multimodal placeholder tokens are suppressed (a response holding one cannot be re-scored).
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from egm.generation.rollout import Rollout, RolloutEngine, encode_prompts, placeholder_token_ids, responses_from_rows
from egm.generation.sampling import SamplingParams
from egm.models.base import GroundingAdapter


def hf_generate(adapter: GroundingAdapter, model: torch.nn.Module, batch: Mapping[str, Tensor],
                sampling: SamplingParams, suppress: Collection[int] = (), stops: Collection[int] = ()) -> Tensor:
    """``model.generate`` on a left-padded prompt batch (on the model's device) -> the new tokens
    ``(B, T)`` after the prompt (finished rows padded with the pad id).

    ``suppress``: token ids that may never be generated (``suppress_tokens``).
    ``stops``: token ids that end a row besides the checkpoint's own eos ids (a reasoning budget's
    end-of-reasoning token, :mod:`egm.generation.budget`).
    """
    kw: dict[str, Any] = {"suppress_tokens": sorted(suppress)} if suppress else {}
    if stops:
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        kw["eos_token_id"] = eos + sorted(set(stops) - set(eos))
    out = model.generate(**batch, **sampling.hf_generate_kwargs(), pad_token_id=adapter.pad_token_id, **kw)
    return out[:, batch["input_ids"].shape[1]:]


def count_generated(new_ids: Tensor, stop_ids: set[int]) -> list[int]:
    """Generated tokens per row of ``new_ids`` ``(B, T)``: up to and including the first stop token
    (padding after an early stop is not generation)."""
    counts = []
    for row in new_ids.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        counts.append(end)
    return counts


class HFEngine(RolloutEngine):
    """Sampling with ``model.generate`` of the (live) training model.

    Args:
        adapter: the family adapter (prompt encoding, stop tokens, decoding).
        model: the policy; generation runs in eval mode under ``no_grad``.
        max_batch: responses per ``generate`` call (``None``: all ``P * G`` at once); bounds
            memory like Table 5's "per device rollout batch size".
    """

    def __init__(self, adapter: GroundingAdapter, model: torch.nn.Module, max_batch: int | None = None):
        self.adapter, self.model, self.max_batch = adapter, model, max_batch

    @torch.no_grad()
    def generate(self, examples: Sequence[Mapping[str, Any]], n: int, sampling: SamplingParams,
                 seed: int | None = None) -> Rollout:
        if n < 1:
            raise ValueError(f"n (samples per prompt) must be >= 1, got {n}")
        ad, model = self.adapter, self.model
        encs = encode_prompts(ad, examples)
        order = [j for j in range(len(encs)) for _ in range(n)]  # repeat-interleave: (P*G,)
        step = self.max_batch or len(order) or 1
        device = next(model.parameters()).device
        forbidden = placeholder_token_ids(model.config)
        was_training = model.training
        model.eval()
        rows: list[list[int]] = []
        try:
            with _seeded(seed, device):
                for s in range(0, len(order), step):
                    batch = ad.pad_batch([encs[j] for j in order[s:s + step]], "left")
                    batch = {k: v.to(device) for k, v in batch.items()}
                    rows += hf_generate(ad, model, batch, sampling, suppress=forbidden).tolist()
        finally:
            model.train(was_training)
        ids, mask, lengths, trunc = responses_from_rows(rows, ad.stop_token_ids(), sampling.max_new_tokens,
                                                        ad.pad_token_id, forbidden)
        texts = ad.decode(ids, 0)
        return Rollout(list(examples), encs, ids, mask, lengths, trunc, texts, n)


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Seed torch's RNG for the block only (the training RNG stream is left untouched)."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
