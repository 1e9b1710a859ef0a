"""A ``generate_fn`` for :func:`egm.eval.runner.evaluate` over a transformers model and an EGM adapter.

Prompts follow paper Figure 7 (the adapter's ``collate_generate``) and decoding follows Table 7
(``TABLE7_INFERENCE``: greedy, max length 4096, repetition penalty 1.0). The number of generated
tokens per sample counts the tokens up to and including the first stop token (padding after an
early stop is not generation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from egm.eval.runner import GenerateFn, GenerationOutput
from egm.generation import TABLE7_INFERENCE, SamplingParams


def count_generated(new_ids: torch.Tensor, stop_ids: set[int]) -> list[int]:
    """Generated tokens per row of ``new_ids`` ``(B, T)``: up to and including the first stop token."""
    counts = []
    for row in new_ids.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        counts.append(end)
    return counts


def hf_generate_fn(adapter: Any, model: torch.nn.Module, sampling: SamplingParams = TABLE7_INFERENCE) -> GenerateFn:
    """Wrap ``adapter`` (:class:`egm.models.GroundingAdapter`) and ``model`` as a ``generate_fn``."""
    device = next(model.parameters()).device

    @torch.inference_mode()
    def generate(examples: Sequence[Mapping[str, Any]]) -> list[GenerationOutput]:
        batch = adapter.collate_generate(list(examples))
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        prompt_len = batch["input_ids"].shape[1]
        out = model.generate(**batch, **sampling.hf_generate_kwargs(), pad_token_id=adapter.pad_token_id)
        texts = adapter.decode(out, prompt_len)
        counts = count_generated(out[:, prompt_len:], adapter.stop_token_ids())
        return [GenerationOutput(t, n) for t, n in zip(texts, counts)]

    return generate
