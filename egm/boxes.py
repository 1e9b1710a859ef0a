"""Box geometry: formats, the 0-1000 relative scale, clipping, IoU and grounding success.

Conventions used everywhere in EGM
----------------------------------
* Pixel boxes are ``xyxy`` floats ``[x1, y1, x2, y2]`` in continuous image coordinates
  (COCO style: a box ``[x, y, w, h]`` covers ``[x, x + w) x [y, y + h)``; there is no ``+1``).
* COCO annotations are ``xywh`` (``[x, y, w, h]`` pixels); convert at the edge with
  :func:`xywh_to_xyxy`.
* Qwen3-VL and InternVL3 both emit boxes on a **0-1000 relative scale**:
  ``rel = round_half_up(pixel / size * 1000)`` clipped to ``[0, 1000]`` (the formula of the
  InternVL RefCOCO data and of Qwen2-VL/Qwen3-VL's ``process_bbox``). We round half *up*
  (``floor(v + 0.5)``) rather than Python's banker's rounding so that the mapping is the one
  documented by both model families. The inverse is ``pixel = rel / 1000 * size`` (no rounding:
  IoU is computed on floats).
* Grounding success (paper Eq. 1) is ``IoU > 0.5``, strictly greater.

Degenerate boxes (zero width or height) have zero area and therefore IoU 0 with anything.
Inverted boxes (``x2 < x1``) are normalised by :func:`normalize_xyxy` (models sometimes emit
corners in the other order, and the Qwen cookbook swaps them); :func:`iou` itself treats an
inverted box as empty so that a caller who forgot to normalise never gets a positive reward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Box = tuple[float, float, float, float]

REL_SCALE = 1000
SUCCESS_IOU = 0.5


def _four(box: Sequence[float]) -> Box:
    if len(box) != 4:
        raise ValueError(f"a box needs 4 numbers, got {len(box)}: {box!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"box has a non-finite coordinate: {box!r}")
    return x1, y1, x2, y2


def xywh_to_xyxy(box: Sequence[float]) -> Box:
    """COCO ``[x, y, w, h]`` -> ``[x1, y1, x2, y2]`` (pixels)."""
    x, y, w, h = _four(box)
    return x, y, x + w, y + h


def xyxy_to_xywh(box: Sequence[float]) -> Box:
    """``[x1, y1, x2, y2]`` -> COCO ``[x, y, w, h]`` (pixels)."""
    x1, y1, x2, y2 = _four(box)
    return x1, y1, x2 - x1, y2 - y1


def normalize_xyxy(box: Sequence[float]) -> Box:
    """Sort the corners so that ``x1 <= x2`` and ``y1 <= y2`` (an inverted box is swapped)."""
    x1, y1, x2, y2 = _four(box)
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def clip_xyxy(box: Sequence[float], width: float, height: float) -> Box:
    """Clip a pixel box to the image ``[0, width] x [0, height]``."""
    x1, y1, x2, y2 = _four(box)
    return (
        min(max(x1, 0.0), width),
        min(max(y1, 0.0), height),
        min(max(x2, 0.0), width),
        min(max(y2, 0.0), height),
    )


def area(box: Sequence[float]) -> float:
    """Area of an ``xyxy`` box; degenerate and inverted boxes have area 0."""
    x1, y1, x2, y2 = _four(box)
    return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def is_degenerate(box: Sequence[float]) -> bool:
    """True when the box has no area (zero or negative width or height)."""
    return area(box) <= 0.0


def _round_half_up(v: float) -> int:
    return int(math.floor(v + 0.5))


def to_rel1000(box: Sequence[float], width: float, height: float) -> tuple[int, int, int, int]:
    """Pixel ``xyxy`` -> integer 0-1000 relative ``xyxy`` (round half up, clipped to [0, 1000]).

    >>> to_rel1000(xywh_to_xyxy([103.93, 299.99, 134.22, 177.42]), 427, 640)
    (243, 469, 558, 746)
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    x1, y1, x2, y2 = _four(box)
    out = (
        _round_half_up(x1 / width * REL_SCALE),
        _round_half_up(y1 / height * REL_SCALE),
        _round_half_up(x2 / width * REL_SCALE),
        _round_half_up(y2 / height * REL_SCALE),
    )
    return tuple(min(max(v, 0), REL_SCALE) for v in out)  # type: ignore[return-value]


def from_rel1000(box: Sequence[float], width: float, height: float) -> Box:
    """0-1000 relative ``xyxy`` -> pixel ``xyxy`` floats (no rounding)."""
    x1, y1, x2, y2 = _four(box)
    s = float(REL_SCALE)
    return x1 / s * width, y1 / s * height, x2 / s * width, y2 / s * height


def rel1000_max_error(width: float, height: float) -> tuple[float, float]:
    """Largest pixel error of a 0-1000 round trip: half a relative unit on each axis."""
    return 0.5 * width / REL_SCALE, 0.5 * height / REL_SCALE


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two pixel ``xyxy`` boxes (continuous coordinates).

    Empty, degenerate or inverted boxes give 0.0 (never NaN).
    """
    ax1, ay1, ax2, ay2 = _four(a)
    bx1, by1, bx2, by2 = _four(b)
    iw = min(ax2, bx2) - max(ax1, bx1)
    ih = min(ay2, by2) - max(ay1, by1)
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = area(a) + area(b) - inter
    if union <= 0:
        return 0.0
    return inter / union


def iou_batch(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise IoU of two ``(N, 4)`` arrays of ``xyxy`` boxes -> ``(N,)`` float64.

    Same semantics as :func:`iou`; rows containing NaN (e.g. unparseable answers) give 0.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    iw = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])
    ih = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a + area_b - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return np.nan_to_num(out, nan=0.0)


def success(iou_value: float, threshold: float = SUCCESS_IOU) -> bool:
    """Grounding success of paper Eq. 1: ``IoU > threshold`` (strictly greater)."""
    return iou_value > threshold
