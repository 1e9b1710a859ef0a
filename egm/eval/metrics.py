"""Grounding metrics from prediction records (paper Sec. 5.2, Tables 3 and 4).

Accuracy is the share of samples with grounding success ``IoU > 0.5`` (Eq. 1, strict: IoU exactly
0.5 fails, see :func:`egm.boxes.success`). Every sample of a split is in the denominator: an
unparseable answer, or a sample whose image could not be read, scores IoU 0 and fails.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from egm.boxes import success
from egm.eval.benchmarks import REFCOCO_SPLIT_NAMES, canonical_split


@dataclass
class SplitMetrics:
    """Metrics of one split; accuracies and rates are fractions in [0, 1]."""

    split: str
    task: str
    n: int
    n_success: int
    accuracy: float
    mean_iou: float
    n_parse_failures: int
    parse_failure_rate: float
    n_image_failures: int
    mean_tokens: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def record_iou(record: Mapping[str, Any]) -> float:
    """IoU of a prediction record; 0 for any failed or box-less record."""
    if record.get("pred_box") is None or record.get("parse_failure") or record.get("failure") == "image_error":
        return 0.0
    return float(record.get("iou") or 0.0)


def split_metrics(records: Iterable[Mapping[str, Any]], split: str = "", task: str | None = None) -> SplitMetrics:
    """Aggregate prediction records (see :mod:`egm.eval.predictions`) of one split.

    ``task`` defaults to the records' majority ``task`` field (``vanilla`` when absent).
    """
    records = list(records)
    ious = np.array([record_iou(r) for r in records], dtype=np.float64)
    n = len(records)
    n_success = int(sum(success(v) for v in ious))
    n_parse = sum(bool(r.get("parse_failure")) for r in records)
    n_image = sum(r.get("failure") == "image_error" for r in records)
    tokens = [r["num_tokens"] for r in records if r.get("num_tokens") is not None]
    if task is None:
        tasks = [r.get("task") or "vanilla" for r in records]
        task = max(set(tasks), key=tasks.count) if tasks else "vanilla"
    return SplitMetrics(
        split=split,
        task=task,
        n=n,
        n_success=n_success,
        accuracy=n_success / n if n else 0.0,
        mean_iou=float(ious.mean()) if n else 0.0,
        n_parse_failures=n_parse,
        parse_failure_rate=n_parse / n if n else 0.0,
        n_image_failures=n_image,
        mean_tokens=float(np.mean(tokens)) if tokens else None,
    )


def _get(m: SplitMetrics | Mapping[str, Any], key: str) -> Any:
    return getattr(m, key) if isinstance(m, SplitMetrics) else m[key]


def refcoco_average(splits: Mapping[str, SplitMetrics | Mapping[str, Any]]) -> float | None:
    """Table 3 "Avg. Acc": macro average of the eight RefCOCO split accuracies.

    None unless all eight splits are present (a partial average is not the paper's number).
    """
    by_name = {canonical_split(k): v for k, v in splits.items()}
    if not all(name in by_name for name in REFCOCO_SPLIT_NAMES):
        return None
    return float(np.mean([_get(by_name[name], "accuracy") for name in REFCOCO_SPLIT_NAMES]))


def headline_accuracy(splits: Mapping[str, SplitMetrics | Mapping[str, Any]]) -> tuple[float | None, str]:
    """The one accuracy a figure or summary row shows, with its label.

    The Table 3 average when all eight RefCOCO splits are present; otherwise (the synthetic world,
    a custom benchmark) the macro average over every evaluated split, labelled as such so it is
    never mistaken for the paper's number.
    """
    ref = refcoco_average(splits)
    if ref is not None:
        return ref, "RefCOCO Avg. Acc"
    if not splits:
        return None, "Macro Avg. Acc"
    return float(np.mean([_get(v, "accuracy") for v in splits.values()])), "Macro Avg. Acc (evaluated splits)"


def amodal_accuracy(splits: Mapping[str, SplitMetrics | Mapping[str, Any]]) -> float | None:
    """Table 4 "Amodal Acc": pooled accuracy over every amodal split (COCO-Amodal val + test).

    The paper reports one number over the 11,261-sample benchmark, so samples (not splits) are
    averaged. None when no amodal split was evaluated.
    """
    amodal = [m for m in splits.values() if _get(m, "task") == "amodal"]
    n = sum(_get(m, "n") for m in amodal)
    if not n:
        return None
    return sum(_get(m, "n_success") for m in amodal) / n


def summarize(splits: Mapping[str, SplitMetrics | Mapping[str, Any]]) -> dict[str, Any]:
    """Benchmark-level numbers: RefCOCO macro average, amodal accuracy, pooled mean IoU and failures."""
    n = sum(_get(m, "n") for m in splits.values())
    return {
        "refcoco_avg": refcoco_average(splits),
        "amodal_acc": amodal_accuracy(splits),
        "n": n,
        "mean_iou": sum(_get(m, "mean_iou") * _get(m, "n") for m in splits.values()) / n if n else None,
        "parse_failure_rate": sum(_get(m, "n_parse_failures") for m in splits.values()) / n if n else None,
    }


@dataclass
class PairedComparison:
    """Two models scored on the same samples: how many each got right, and the flips between them."""

    n: int
    before: int  # successes of the first model
    after: int  # successes of the second model
    fixed: int  # wrong before, right after
    broken: int  # right before, wrong after
    p_value: float  # exact two-sided McNemar test (binomial on the flips)


def paired_comparison(before: Mapping[Any, bool], after: Mapping[Any, bool]) -> PairedComparison:
    """Compare per-sample successes of two models on the same samples (keys: sample ids).

    Why paired: a few points of accuracy between two checkpoints are within the noise of either
    accuracy alone, but most samples are scored the same by both; only the flips carry evidence.
    Under "no difference" a flip is equally likely to go either way, so the exact McNemar p-value
    is the two-sided binomial tail of ``min(fixed, broken)`` out of ``fixed + broken`` at 1/2.
    """
    if before.keys() != after.keys():
        missing = sorted(map(str, before.keys() ^ after.keys()))
        raise ValueError(f"paired_comparison needs the same samples on both sides; unpaired: {missing[:5]}")
    fixed = sum(1 for k, ok in after.items() if ok and not before[k])
    broken = sum(1 for k, ok in after.items() if before[k] and not ok)
    flips = fixed + broken
    tail = sum(math.comb(flips, i) for i in range(min(fixed, broken) + 1)) / 2**flips
    return PairedComparison(n=len(before), before=sum(map(bool, before.values())),
                            after=sum(map(bool, after.values())), fixed=fixed, broken=broken,
                            p_value=min(1.0, 2 * tail))
