"""Rollouts for GRPO: sample ``G`` responses per prompt, keep what the loss needs to re-score them.

A rollout engine turns ``P`` adapter examples (``{"sample", "image"}``) into ``P * G`` responses,
laid out contiguously per prompt (the layout :func:`egm.rl.grpo.group_advantages` expects).
Engines only *sample*: the log-probabilities used in the loss (old, new and reference) are always
recomputed by the training model from :meth:`Rollout.model_inputs` (:func:`token_logprobs`), so
that rollouts may come from another numerics stack (vLLM, fp16) without biasing the ratio.

Two engines share the :class:`RolloutEngine` interface:

* :class:`HFEngine`: ``model.generate`` of the training model itself (CPU, tests, small GPU runs);
  the prompt batch is repeat-interleaved ``G`` times, which is correct for every family's image
  tensors (``num_return_sequences`` would repeat InternVL's multi-tile ``pixel_values`` wrongly).
* :class:`egm.rl.vllm_engine.VLLMEngine`: vLLM colocated with the trainer (GPU only).

Response layout: token ids after the prompt, up to and *including* the first stop token
(end-of-turn / eos / pad), right-padded with ``pad_token_id``; ``truncated`` marks responses that
hit ``max_new_tokens`` without a stop token (Table 5: max_response_length 1024).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from egm.generation import SamplingParams
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
                    out = model.generate(**batch, **sampling.hf_generate_kwargs(), pad_token_id=ad.pad_token_id,
                                         suppress_tokens=sorted(forbidden) or None)
                    rows += out[:, batch["input_ids"].shape[1]:].tolist()
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


def token_logprobs(model: torch.nn.Module, inputs: Mapping[str, Tensor], completion_ids: Tensor,
                   temperature: float = 1.0, with_entropy: bool = False,
                   entropy_grad: bool = True) -> tuple[Tensor, Tensor | None]:
    """Log-probs ``(b, t)`` of ``completion_ids`` under ``model`` (and exact entropies ``(b, t)``).

    Logits are divided by the rollout temperature, as verl and TRL do, so that the recomputed
    distribution is the one responses were sampled from. Only the last ``t + 1`` positions are
    projected to the vocabulary (``logits_to_keep``). ``entropy_grad=False`` computes the
    entropy outside the autograd graph (logged only, when the entropy weight gamma is 0).
    """
    from egm.rl.grpo import entropy_from_logits

    t = completion_ids.shape[1]
    logits = model(**inputs, logits_to_keep=t + 1).logits[:, :-1]  # (b, t, V): position k predicts token k
    logits = logits.float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    ent = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            ent = entropy_from_logits(logits)
    return logp, ent
