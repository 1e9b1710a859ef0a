"""Grounding reward (paper Eq. 8): ``r = alpha * IoU + (1 - alpha) * S``, ``S = [IoU > 0.5]``.

The reward takes already-parsed boxes, so it does not depend on the answer parser:

* a prediction is a pixel ``xyxy`` box, or ``None`` when the answer could not be parsed
  (an ``(N, 4)`` array with NaN rows means the same);
* an unparseable answer gets reward 0 (IoU 0, S 0) and is counted in ``parse_ok``: inside a run a
  bad sample is logged, never fatal (STYLE habit 7).

:func:`reward_from_texts` is the thin wrapper that parses model answers first, with the parser it
is given (GRPO passes the adapter's own ``parse``, the one validation and evaluation use).
:func:`eq8` is the formula itself, also used for the W&B table's reward column. Everything is vectorised with numpy in float64; the GRPO module converts with
``torch.as_tensor(out.rewards)``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from egm.answers import ParsedAnswer, parse_answer
from egm.boxes import SUCCESS_IOU, iou_batch

DEFAULT_ALPHA = 0.5  # paper Sec. 4.3 / Table 5: "reward weight alpha 0.5"

BoxLike = Sequence[float] | np.ndarray | None


@dataclass(frozen=True)
class RewardOutput:
    """Per-sample reward terms, all shaped ``(N,)``.

    ``rewards`` float64, ``iou`` float64 in [0, 1], ``success`` bool (Eq. 1), ``parse_ok`` bool.
    ``failures`` counts parse-failure reasons when the wrapper parsed texts (empty otherwise).
    """

    rewards: np.ndarray
    iou: np.ndarray
    success: np.ndarray
    parse_ok: np.ndarray
    failures: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return int(self.rewards.shape[0])

    def metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """Batch statistics to log: reward mean/std, IoU mean, success rate, parse-failure rate.

        ``std`` is the population std (``ddof=0``) of the batch; an empty batch logs zeros.
        """
        n = len(self)
        if n == 0:
            vals = dict(mean=0.0, std=0.0, iou=0.0, success_rate=0.0, parse_failure_rate=0.0)
        else:
            vals = dict(
                mean=float(self.rewards.mean()),
                std=float(self.rewards.std()),
                iou=float(self.iou.mean()),
                success_rate=float(self.success.mean()),
                parse_failure_rate=float(1.0 - self.parse_ok.mean()),
            )
        return {prefix + k: v for k, v in vals.items()}


def _pred_array(pred_boxes: Sequence[BoxLike] | np.ndarray) -> np.ndarray:
    """Predictions -> ``(N, 4)`` float64 with NaN rows for unparseable answers."""
    if isinstance(pred_boxes, np.ndarray) and pred_boxes.dtype != object:
        return np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)
    out = np.full((len(pred_boxes), 4), np.nan, dtype=np.float64)
    for i, box in enumerate(pred_boxes):
        if box is not None:
            out[i] = np.asarray(box, dtype=np.float64).reshape(4)
    return out


def eq8(iou: np.ndarray | float, success: np.ndarray | bool, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """Eq. 8: ``alpha * IoU + (1 - alpha) * S`` (float64, elementwise)."""
    return alpha * np.asarray(iou, dtype=np.float64) + (1.0 - alpha) * np.asarray(success, dtype=np.float64)


def grounding_reward(
    pred_boxes: Sequence[BoxLike] | np.ndarray,
    gt_boxes: Sequence[Sequence[float]] | np.ndarray,
    alpha: float = DEFAULT_ALPHA,
    threshold: float = SUCCESS_IOU,
) -> RewardOutput:
    """Eq. 8 reward for a batch of ``N`` answers.

    Args:
        pred_boxes: ``N`` pixel ``xyxy`` boxes or ``None`` (unparseable), or an ``(N, 4)`` array
            where a row with any non-finite value is unparseable.
        gt_boxes: ``(N, 4)`` pixel ``xyxy`` ground truth.
        alpha: weight of the IoU term; ``1 - alpha`` weighs grounding success.
        threshold: success is ``IoU > threshold``, strictly (Eq. 1): IoU exactly 0.5 fails.

    Returns:
        :class:`RewardOutput` with ``(N,)`` arrays; ``rewards`` lies in ``[0, 1]``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    pred = _pred_array(pred_boxes)
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    if pred.shape != gt.shape:
        raise ValueError(f"{pred.shape[0]} predictions but {gt.shape[0]} ground-truth boxes")
    parse_ok = np.isfinite(pred).all(axis=1)
    iou = np.where(parse_ok, iou_batch(np.where(parse_ok[:, None], pred, 0.0), gt), 0.0)
    success = iou > threshold
    rewards = eq8(iou, success, alpha)
    return RewardOutput(rewards=rewards, iou=iou, success=success, parse_ok=parse_ok)


def reward_from_texts(
    texts: Sequence[str],
    gt_boxes: Sequence[Sequence[float]] | np.ndarray,
    sizes: Sequence[tuple[float, float]],
    parse: Callable[[str, float, float], ParsedAnswer] | None = None,
    alpha: float = DEFAULT_ALPHA,
) -> RewardOutput:
    """Parse ``N`` model answers with ``parse(text, width, height)``, then apply Eq. 8.

    ``parse`` is the model adapter's ``parse`` in training (``None``: :func:`egm.answers.parse_answer`
    with family auto-detection). ``sizes`` holds the ``(width, height)`` of each image (the parser
    maps the 0-1000 scale to pixels). Failure reasons are counted in ``RewardOutput.failures``.
    """
    parse = parse or parse_answer
    if not len(texts) == len(sizes) == len(gt_boxes):
        raise ValueError(f"{len(texts)} texts, {len(sizes)} sizes, {len(gt_boxes)} boxes")
    boxes: list[BoxLike] = []
    failures: Counter = Counter()
    for text, (w, h) in zip(texts, sizes):
        parsed = parse(text, w, h)
        boxes.append(parsed.box if parsed.ok else None)
        if not parsed.ok:
            failures[str(getattr(parsed.failure, "value", parsed.failure))] += 1
    out = grounding_reward(boxes, gt_boxes, alpha=alpha)
    return RewardOutput(out.rewards, out.iou, out.success, out.parse_ok, failures)
