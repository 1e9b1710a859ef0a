"""The rollout type and the engine interface: ``G`` sampled responses per prompt, kept as the loss
needs them to re-score them.

A rollout engine turns ``P`` adapter examples (``{"sample", "image"}``) into ``P * G`` responses,
laid out contiguously per prompt (the layout :func:`egm.rl.grpo.group_advantages` expects).
Engines only *sample*: the log-probabilities used in the loss (old, new and reference) are always
recomputed by the training model from :meth:`Rollout.model_inputs`
(:func:`egm.rl.grpo.token_logprobs`), so that rollouts may come from another numerics stack
(vLLM, fp16) without biasing the ratio.

Two engines share the :class:`RolloutEngine` interface:

* :class:`egm.generation.hf.HFEngine`: ``model.generate`` of the training model itself (CPU,
  tests, small GPU runs);
* :class:`egm.generation.vllm.VLLMEngine`: vLLM colocated with the trainer.

Response layout: token ids after the prompt, up to and *including* the first stop token
(end-of-turn / eos / pad), right-padded with ``pad_token_id``; ``truncated`` marks responses that
hit ``max_new_tokens`` without a stop token (Table 5: max_response_length 1024).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from egm.generation.sampling import SamplingParams
from egm.models.base import GroundingAdapter


@dataclass
class Rollout:
    """``P`` prompts x ``G`` responses (``B = P * G``, contiguous per prompt).

    Attributes:
        examples: the ``P`` adapter examples (samples + images) the prompts came from.
        prompt_encodings: ``P`` single-prompt :meth:`GroundingAdapter.collate_generate` outputs.
        completion_ids: ``(B, T)`` response tokens, right-padded with the pad id.
        completion_mask: ``(B, T)`` 1 on response tokens (stop token included).
        lengths: ``(B,)`` response lengths; truncated: ``(B,)`` bool, no stop token within T.
        texts: ``B`` decoded responses (``adapter.decode``: cut at the stop token).
        group_size: ``G``.
    """

    examples: list[Mapping[str, Any]]
    prompt_encodings: list[dict[str, Tensor]]
    completion_ids: Tensor
    completion_mask: Tensor
    lengths: Tensor
    truncated: Tensor
    texts: list[str]
    group_size: int

    def __len__(self) -> int:
        return int(self.completion_ids.shape[0])

    @property
    def prompt_index(self) -> Tensor:
        """``(B,)`` index of each response's prompt."""
        return torch.arange(len(self.examples)).repeat_interleave(self.group_size)

    @property
    def prompt_lengths(self) -> Tensor:
        """``(P,)`` tokens of each prompt encoding (image tokens included)."""
        return torch.tensor([int(e["input_ids"].shape[-1]) for e in self.prompt_encodings], dtype=torch.long)

    @property
    def sequence_lengths(self) -> Tensor:
        """``(B,)`` prompt + response tokens of each response: what its training forward processes."""
        return self.prompt_lengths[self.prompt_index] + self.lengths

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def model_inputs(self, adapter: GroundingAdapter, idx: Sequence[int] | Tensor | None = None,
                     device: torch.device | str | None = None) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Forward inputs (left-padded prompt + completion) for the responses ``idx``.

        Returns ``(inputs, completion_ids, completion_mask)`` with the completion trimmed to the
        longest response of ``idx`` (``(b, t)``), everything on ``device``.
        """
        idx = torch.arange(len(self)) if idx is None else torch.as_tensor(idx, dtype=torch.long)
        pidx = self.prompt_index[idx].tolist()
        prompts = adapter.pad_batch([self.prompt_encodings[j] for j in pidx], "left")
        t = max(int(self.lengths[idx].max()), 1) if len(idx) else 1
        comp, mask = self.completion_ids[idx, :t], self.completion_mask[idx, :t]
        inputs = adapter.with_completion(prompts, comp, mask)
        if device is not None:
            inputs = {k: v.to(device) for k, v in inputs.items()}
            comp, mask = comp.to(device), mask.to(device)
        return inputs, comp, mask


def encode_prompts(adapter: GroundingAdapter, examples: Sequence[Mapping[str, Any]]) -> list[dict[str, Tensor]]:
    """One :meth:`~GroundingAdapter.collate_generate` batch of size 1 per example (images processed once)."""
    return [adapter.collate_generate([ex]) for ex in examples]


PLACEHOLDER_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                    "image_token_index", "video_token_index")


def placeholder_token_ids(config) -> set[int]:
    """Multimodal placeholder tokens of a model config (``<|image_pad|>``, ``<IMG_CONTEXT>``, ...).

    A response must never contain them: the re-scoring forward would count them as image slots
    ("image features and image tokens do not match"). Engines suppress them while sampling.
    """
    ids = {getattr(config, k, None) for k in PLACEHOLDER_KEYS}
    return {int(i) for i in ids if isinstance(i, int) and i >= 0}


def responses_from_rows(rows: Iterable[Sequence[int]], stop_ids: set[int], max_new_tokens: int,
                        pad_id: int, forbidden: set[int] = frozenset()) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Generated rows (tokens after the prompt) -> ``(ids, mask, lengths, truncated)``.

    Each row is cut after its first stop token (kept: the model must learn to stop); a row
    without one is truncated at ``max_new_tokens``. A ``forbidden`` token (multimodal
    placeholder, if an engine let one through) cuts the row before it and counts as truncated.
    """
    cut, trunc = [], []
    for row in rows:
        row = list(row)[:max_new_tokens]
        end = next((i for i, tok in enumerate(row) if tok in stop_ids or tok in forbidden), None)
        if end is not None and row[end] in forbidden and row[end] not in stop_ids:
            row, end = row[:end], None  # cut before the placeholder: no stop, so truncated
        trunc.append(end is None)
        cut.append(row if end is None else row[:end + 1])
    cut = [r or [pad_id] for r in cut]  # never empty (a placeholder as first token)
    lengths = torch.tensor([len(r) for r in cut], dtype=torch.long)
    t = max(int(lengths.max()) if len(cut) else 0, 1)
    ids = torch.full((len(cut), t), pad_id, dtype=torch.long)
    for i, r in enumerate(cut):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    return ids, mask, lengths, torch.tensor(trunc, dtype=torch.bool)


class RolloutEngine:
    """Interface: ``generate`` samples; ``update_weights`` syncs the engine with the policy."""

    def generate(self, examples: Sequence[Mapping[str, Any]], n: int, sampling: SamplingParams,
                 seed: int | None = None) -> Rollout:
        raise NotImplementedError

    def update_weights(self, model: torch.nn.Module) -> None:
        """Push the policy's current weights (no-op for engines that sample with the policy itself)."""
