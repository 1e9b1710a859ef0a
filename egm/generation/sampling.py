"""Sampling parameters shared by evaluation, validation and GRPO rollouts.

One dataclass so that the paper's two tables map to two config blocks: Table 7 (inference:
greedy, top_p 1.0, top_k 20, max length 4096, repetition penalty 1.0) and Table 5 (rollout:
temperature 0.7, top_p 0.9/0.7, top_k 50/-1, max response 1024). ``top_k = -1`` means no top-k
filtering, as in verl and vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from egm.errors import InputError


@dataclass
class SamplingParams:
    """Decoding settings; ``temperature == 0`` is greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 20
    max_new_tokens: int = 4096
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise InputError(f"top_k must be -1 (disabled) or positive, got {self.top_k}")
        if self.max_new_tokens <= 0:
            raise InputError(f"max_new_tokens must be positive, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def hf_generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``transformers`` ``generate``.

        Greedy decoding ignores top_p/top_k (they only filter a distribution one samples from),
        so they are not passed, which also silences transformers' warnings about them.
        """
        kw: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.greedy:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p,
                      top_k=None if self.top_k == -1 else self.top_k)
        return kw

    def vllm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``vllm.SamplingParams`` (``top_k=-1`` disables top-k there too)."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "max_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}


TABLE7_INFERENCE = SamplingParams(temperature=0.0, top_p=1.0, top_k=20, max_new_tokens=4096, repetition_penalty=1.0)

# Table 5 (rollout parameters), one column per model family, keyed by ``GroundingAdapter.family``:
# the single source of the GRPO rollout defaults (GRPOModule falls back to it, the configs are
# tested against it). max_new_tokens is Table 5's max_response_length.
TABLE5_ROLLOUT: dict[str, SamplingParams] = {
    "qwen3_vl": SamplingParams(temperature=0.7, top_p=0.9, top_k=50, max_new_tokens=1024),
    "internvl": SamplingParams(temperature=0.7, top_p=0.7, top_k=-1, max_new_tokens=1024),
}

# Module hparams hold SamplingParams: let `torch.load(weights_only=True)`, the default since
# torch 2.6, rebuild them so that `egm fit --ckpt_path last` resumes.
import torch.serialization as _ts  # noqa: E402

_ts.add_safe_globals([SamplingParams])
