"""A test-time reasoning-token budget ("budget forcing", as in s1, Muennighoff et al. 2025).

The paper's thesis (Sec. 5.5, Figure 4) is that a small model's grounding accuracy is bought with
reasoning tokens at test time. A budget ``B`` makes that trade a dial: the model reasons for at
most ``B`` generated tokens, then answers.

Two phases per prompt:

1. *reasoning*: generate at most ``B`` tokens, stopping early where the model closes its
   reasoning itself (:class:`ReasoningLayout.close`) or ends its turn;
2. *answer*: where the reasoning was cut at ``B``, the family's end-of-reasoning text
   (:class:`ReasoningLayout.forced`) is appended to prompt + partial reasoning and the answer is
   generated with a fixed allowance (``answer_tokens``). Where the model closed its reasoning
   itself, it continues from there with what is left of the Table 7 max length, so a budget
   changes only the samples that exceed it: a budget of at least ``max_new_tokens`` never binds
   and reproduces plain greedy decoding.

``B = 0`` answers at once (:class:`ReasoningLayout.empty` after the generation prompt: an empty
reasoning). Generated tokens = reasoning + answer; the forced text is not generated and not counted.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from egm.errors import InputError
from egm.generation.hf import hf_generate
from egm.generation.rollout import encode_prompts
from egm.generation.sampling import TABLE7_INFERENCE, SamplingParams
from egm.models.base import GroundingAdapter

Kind = Literal["closed", "forced", "finished", "truncated"]
DEFAULT_ANSWER_TOKENS = 64


@dataclass(frozen=True)
class ReasoningLayout:
    """How a family ends its reasoning (its ``format_target`` layout).

    Attributes:
        close: the single token whose generation ends the reasoning (kept, and counted).
        forced: text appended after a trace cut at the budget.
        empty: text appended at budget 0, right after the generation prompt.
    """

    close: str
    forced: str
    empty: str


def reasoning_layout(adapter: GroundingAdapter) -> ReasoningLayout:
    """Qwen3-VL Thinking: ``<think>\\n{trace}\\n</think>\\n\\n{answer}`` (the generation prompt holds
    ``<think>\\n``). InternVL: ``{trace}\\n<ref>...`` -- no reasoning delimiter, so the answer's
    opening ``<ref>`` is what ends the reasoning, and forcing writes it."""
    if adapter.family == "qwen3_vl" and getattr(adapter, "thinking", True):
        return ReasoningLayout("</think>", "\n</think>\n\n", "\n</think>\n\n")
    if adapter.family == "internvl":
        return ReasoningLayout("<ref>", "\n<ref>", "<ref>")
    raise ValueError(f"a reasoning budget needs a layout that ends the reasoning with a delimiter; "
                     f"{type(adapter).__name__} (family {adapter.family!r}, thinking=False?) has none")


@dataclass
class BudgetAnswer:
    """One budgeted answer; ``text`` is what ``adapter.decode`` would give for the whole response."""

    text: str
    kind: Kind  # closed: the model ended its reasoning; forced: cut at the budget; finished: ended
    reasoning_ids: list[int]  # its turn within the budget; truncated: hit max_new_tokens (no forcing)
    forced_ids: list[int]  # appended, not generated
    answer_ids: list[int]  # phase 2, up to and including the stop token

    @property
    def num_tokens(self) -> int:
        return len(self.reasoning_ids) + len(self.answer_ids)


@dataclass(frozen=True)
class BudgetPlan:
    """Token ids a budget run needs (resolved once per adapter, validated at the edge)."""

    budget: int
    close_id: int
    forced_ids: list[int]
    empty_ids: list[int]
    stop_ids: frozenset[int]
    max_new_tokens: int
    answer_tokens: int

    @classmethod
    def of(cls, adapter: GroundingAdapter, budget: int, sampling: SamplingParams,
           answer_tokens: int = DEFAULT_ANSWER_TOKENS) -> BudgetPlan:
        if budget < 0:
            raise InputError(f"reasoning_budget must be >= 0, got {budget}")
        if answer_tokens < 1:
            raise InputError(f"answer_tokens must be >= 1, got {answer_tokens}")
        lay, tok = reasoning_layout(adapter), adapter.tokenizer
        close = tok(lay.close, add_special_tokens=False)["input_ids"]
        if len(close) != 1:
            raise ValueError(f"{lay.close!r} must be one token in {adapter.pretrained_model_name_or_path}'s "
                             f"tokenizer to end a reasoning budget early, got {close}")
        ids = (lambda s: tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
        return cls(budget, close[0], ids(lay.forced), ids(lay.empty), frozenset(adapter.stop_token_ids()),
                   sampling.max_new_tokens, answer_tokens)

    @property
    def reasoning_cap(self) -> int:
        return min(self.budget, self.max_new_tokens)

    def split(self, row: Sequence[int]) -> tuple[Kind, list[int]]:
        """Phase-1 output row (tokens after the prompt, any padding after) -> kind, reasoning tokens."""
        for i, t in enumerate(row):
            if t in self.stop_ids:
                return "finished", list(row[:i + 1])
            if t == self.close_id:
                return "closed", list(row[:i + 1])
        row = list(row[:self.reasoning_cap])
        return ("forced" if self.budget < self.max_new_tokens else "truncated"), row

    def appended(self, kind: Kind, reasoning: Sequence[int]) -> list[int]:
        """What goes after the reasoning before phase 2 (nothing where the model closed it)."""
        if kind != "forced":
            return []
        return list(self.forced_ids if reasoning else self.empty_ids)

    def allowance(self, kind: Kind, reasoning: Sequence[int]) -> int:
        """Phase-2 max new tokens: ``answer_tokens`` after forcing, the rest of the max length after
        the model closed its reasoning, 0 where the response is complete."""
        if kind == "forced":
            return self.answer_tokens
        if kind == "closed":
            return max(self.max_new_tokens - len(reasoning), 0)
        return 0

    def cut_answer(self, row: Sequence[int], allowance: int) -> list[int]:
        """Phase-2 row -> answer tokens up to and including the first stop, at most ``allowance``."""
        row = list(row[:allowance])
        end = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
        return row if end is None else row[:end + 1]

    def answer(self, adapter: GroundingAdapter, kind: Kind, reasoning: list[int], answer: list[int]) -> BudgetAnswer:
        forced = self.appended(kind, reasoning)
        ids = reasoning + forced + answer
        end = next((i for i, t in enumerate(ids) if t in self.stop_ids), len(ids))
        text = adapter.response_prefix + adapter.tokenizer.decode(ids[:end], skip_special_tokens=False)
        return BudgetAnswer(text, kind, reasoning, forced, answer)


@torch.no_grad()
def hf_budget_generate(adapter: GroundingAdapter, model: torch.nn.Module, examples: Sequence[Mapping[str, Any]],
                       budget: int, sampling: SamplingParams = TABLE7_INFERENCE,
                       answer_tokens: int = DEFAULT_ANSWER_TOKENS, suppress: Collection[int] = ()) -> list[BudgetAnswer]:
    """Budget forcing with :func:`egm.generation.hf.hf_generate` (both phases batched; ``suppress``:
    token ids never generated, e.g. the placeholders :class:`~egm.generation.vllm.VLLMEngine` keeps out)."""
    plan = BudgetPlan.of(adapter, budget, sampling, answer_tokens)
    device = next(model.parameters()).device
    encs = encode_prompts(adapter, examples)

    def run(batch_encs: list[dict[str, torch.Tensor]], max_new: int, stops: Sequence[int] = ()) -> list[list[int]]:
        batch = {k: v.to(device) for k, v in adapter.pad_batch(batch_encs, "left").items()}
        return hf_generate(adapter, model, batch, replace(sampling, max_new_tokens=max_new), suppress, stops).tolist()

    if plan.reasoning_cap > 0:
        phase1 = [plan.split(r) for r in run(encs, plan.reasoning_cap, [plan.close_id])]
    else:
        phase1 = [("forced", [])] * len(encs)
    answers: list[list[int]] = [[] for _ in encs]
    for kind in ("forced", "closed"):  # one batch per kind: forced rows all share one allowance
        rows = [j for j, (k, r) in enumerate(phase1) if k == kind and plan.allowance(k, r) > 0]
        if not rows:
            continue
        allow = {j: plan.allowance(*phase1[j]) for j in rows}
        cont = [_extend(adapter, encs[j], phase1[j][1] + plan.appended(*phase1[j])) for j in rows]
        for j, row in zip(rows, run(cont, max(allow.values()))):
            answers[j] = plan.cut_answer(row, allow[j])
    return [plan.answer(adapter, k, r, a) for (k, r), a in zip(phase1, answers)]


def _extend(adapter: GroundingAdapter, enc: Mapping[str, torch.Tensor], ids: Sequence[int]) -> dict[str, torch.Tensor]:
    """A single-prompt encoding with ``ids`` appended (a prompt that continues a response)."""
    c = torch.tensor([list(ids)], dtype=enc["input_ids"].dtype)
    return adapter.with_completion(enc, c, torch.ones_like(c))


def vllm_budget_generate(engine: Any, examples: Sequence[Mapping[str, Any]], budget: int,
                         sampling: SamplingParams = TABLE7_INFERENCE,
                         answer_tokens: int = DEFAULT_ANSWER_TOKENS) -> list[BudgetAnswer]:
    """Budget forcing on a :class:`~egm.generation.vllm.VLLMEngine`: two rounds of requests.

    The answer round sends token ids (the chat prompt as the tokenizer writes it, image placeholder
    not yet expanded, + reasoning + forced ids), so it continues exactly the tokens of round one;
    vLLM expands the image placeholder itself.
    """
    if getattr(engine, "enable_sleep_mode", False):
        raise ValueError("a reasoning budget runs on a vLLM engine without sleep mode (enable_sleep_mode=False)")
    ad = engine.adapter
    plan = BudgetPlan.of(ad, budget, sampling, answer_tokens)
    eot = ad.tokenizer.convert_tokens_to_ids(ad.end_of_turn)

    def run(prompts: list[dict[str, Any]], max_new: int, stops: Sequence[int] = ()) -> list[list[int]]:
        params = engine.sampling_params(replace(sampling, max_new_tokens=max_new), None, stops)
        rows = []
        for req in engine.llm.generate(prompts, sampling_params=[params] * len(prompts), use_tqdm=False):
            o = req.outputs[0]
            ids = list(o.token_ids)
            if o.finish_reason == "stop" and (not ids or ids[-1] not in plan.stop_ids | set(stops)):
                ids.append(o.stop_reason if isinstance(o.stop_reason, int) else eot)  # keep the stop token
            rows.append(ids)
        return rows

    chats = [ad.chat_inputs(ex) for ex in examples]
    if plan.reasoning_cap > 0:
        phase1 = [plan.split(r) for r in run(engine.vllm_prompts(examples), plan.reasoning_cap, [plan.close_id])]
    else:
        phase1 = [("forced", [])] * len(chats)
    answers: list[list[int]] = [[] for _ in chats]
    rows = [j for j, (k, r) in enumerate(phase1) if plan.allowance(k, r) > 0]
    for allow in sorted({plan.allowance(*phase1[j]) for j in rows}):  # one round per allowance
        group = [j for j in rows if plan.allowance(*phase1[j]) == allow]
        prompts = [{"prompt_token_ids": ad.tokenizer(chats[j][0], add_special_tokens=False)["input_ids"]
                    + phase1[j][1] + plan.appended(*phase1[j]), "multi_modal_data": {"image": chats[j][1]}}
                   for j in group]
        for j, row in zip(group, run(prompts, allow)):
            answers[j] = plan.cut_answer(row, allow)
    return [plan.answer(ad, k, r, a) for (k, r), a in zip(phase1, answers)]
