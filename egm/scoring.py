"""Score generated answers against ground truth: parse -> IoU -> success (paper Eq. 1).

Shared by SFT validation, the evaluator and GRPO rewards so that every number EGM reports is
computed the same way: an answer that does not parse has IoU 0, is not a success, and is
counted as a parse failure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from egm.boxes import iou, success


@dataclass(frozen=True)
class Scored:
    iou: float
    success: bool
    parse_ok: bool
    pred_box: tuple[float, float, float, float] | None
    reasoning: str
    failure: str | None


def score_answer(parsed, gt_box: Sequence[float]) -> Scored:
    """Score one :class:`egm.answers.ParsedAnswer` against a pixel ``xyxy`` ground truth."""
    if parsed.box is None:
        fail = getattr(parsed.failure, "value", parsed.failure)
        return Scored(0.0, False, False, None, parsed.reasoning, str(fail) if fail is not None else "no_box")
    v = iou(parsed.box, gt_box)
    return Scored(v, success(v), True, tuple(parsed.box), parsed.reasoning, None)


def score_texts(
    texts: Sequence[str],
    samples: Sequence,
    parse: Callable[[str, int, int], object],
) -> list[Scored]:
    """Parse each text with ``parse(text, width, height)`` and score it against ``sample.box``."""
    if len(texts) != len(samples):
        raise ValueError(f"{len(texts)} texts for {len(samples)} samples")
    return [score_answer(parse(t, s.width, s.height), s.box) for t, s in zip(texts, samples)]
