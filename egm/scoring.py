"""Score generated answers against ground truth (parse -> IoU -> success, paper Eq. 1), and the
one prediction record every evaluation path writes.

Shared by SFT/GRPO validation, Lightning ``predict``, the evaluator and the RL data selection so
that every number EGM reports is computed the same way: an answer that does not parse has IoU 0,
is not a success, and is counted as a parse failure. :class:`Prediction` is the record of one
evaluated sample, whoever wrote it (``egm evaluate``'s JSONL lines, ``egm predict``'s outputs,
the samples validation keeps for the W&B table); ``egm.eval.predictions.read_predictions`` reads
a file of them back, validated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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


@dataclass(frozen=True, kw_only=True)
class Prediction:
    """One evaluated sample. Field order is the JSONL field order; optional fields may be ``None``
    (a reference model's file may hold only ``id`` and ``iou``).

    ``parse_failure`` is True when the answer text gave no box; ``failure`` says why (a
    parse-failure kind of :mod:`egm.answers`, ``"parse_error"`` when the parser raised,
    ``"image_error"`` when the image could not be read, ``None`` on success); ``error`` holds the
    exception text of those two. ``extra`` keeps any other fields of a record read from a file.
    """

    id: str
    split: str | None = None
    task: str | None = None           # vanilla | amodal
    sentence: str | None = None       # referring expression
    image: str | None = None          # image path
    width: int | None = None
    height: int | None = None
    gt_box: list[float] | None = None    # pixel xyxy
    pred_box: list[float] | None = None  # pixel xyxy, None when no box was parsed
    iou: float                        # 0 when there is no prediction
    success: bool                     # IoU > 0.5 (Eq. 1)
    parse_failure: bool = False
    failure: str | None = None
    error: str | None = None
    reasoning: str | None = None      # reasoning text extracted from the answer
    answer: str | None = None         # raw generated text
    num_tokens: int | None = None     # generated tokens (None when the generator did not say)
    latency_ms: float | None = None   # wall time of the batch / its size (throughput, not paper latency)
    batch_size: int | None = None     # generation batch this record came from
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, sample: Any, split: str | None, answer: str | None, scored: Scored, **fields: Any) -> "Prediction":
        """The record of ``sample`` (an :class:`egm.data.manifest.Sample`) answered with ``answer``."""
        return cls(**sample_fields(sample, split), pred_box=None if scored.pred_box is None else
                   [float(v) for v in scored.pred_box], iou=scored.iou, success=scored.success,
                   parse_failure=not scored.parse_ok, failure=scored.failure, reasoning=scored.reasoning,
                   answer=answer, **fields)

    def to_json(self) -> dict[str, Any]:
        """The JSONL object: every field in order, then ``extra``'s keys."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "Prediction":
        """A record from a JSON object as written by :meth:`to_json` (values not checked here: see
        ``egm.eval.predictions.read_predictions``); unknown keys go to ``extra``."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in obj.items() if k in known},
                   extra={k: v for k, v in obj.items() if k not in known})


PREDICTION_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Prediction) if f.name != "extra")


def sample_fields(sample: Any, split: str | None) -> dict[str, Any]:
    """The fields of a record that come from the sample itself (the manifest line)."""
    return {"id": sample.id, "split": split, "task": sample.task, "sentence": sample.sentence,
            "image": sample.image, "width": sample.width, "height": sample.height,
            "gt_box": [float(v) for v in sample.box]}
