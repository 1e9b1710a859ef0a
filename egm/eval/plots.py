"""Figures of the paper from evaluation outputs (matplotlib, Agg canvas, no pyplot state).

* :func:`accuracy_vs_latency` - Figure 4: RefCOCO average accuracy vs GPU latency, one point per run
  (CPU runs: plain latency, and the axis says so), reasoning-budget sweeps as curves and
  no-model baselines as points at 0 ms.
* :func:`qualitative_panels` - Figures 2 and 6: image with the ground truth and the prediction
  (orange), the text prompt and the reasoning wrapped underneath, each panel titled with split,
  success/failure and IoU. The paper draws the ground truth in blue; here it is magenta with a
  black outline, outside the synthetic world's palette (red, green, blue, yellow on light gray),
  so it stays visible on a blue object.
* :func:`iou_histogram` - distribution of per-sample IoU with the 0.5 success threshold marked.

Sizes are exact: a figure of ``figsize`` inches saved at ``dpi`` is ``figsize * dpi`` pixels
(no ``bbox_inches="tight"``), so callers and tests can rely on them.
"""

from __future__ import annotations

import os
import random
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from egm.boxes import SUCCESS_IOU
from egm.eval.latency import device_label, on_cpu, reported_latency
from egm.eval.metrics import headline_accuracy, record_iou
from egm.eval.predictions import read_jsonl

GT_COLOR = "#ff00ff"         # paper Figure 2 uses blue; magenta is in no object's colour
PRED_COLOR = "tab:orange"    # paper Figure 2: prediction in orange
OUTLINE = [patheffects.Stroke(linewidth=4, foreground="black"), patheffects.Normal()]  # visible on any fill
HIST_COLOR = "tab:blue"
EGM_COLOR = "tab:green"
OTHER_COLOR = "tab:gray"


def new_figure(figsize: tuple[float, float], dpi: int) -> Figure:
    """A figure on the Agg canvas, without pyplot's global state (safe in training processes)."""
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def slug(name: str) -> str:
    """File-name-safe form of a model name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def load_prediction_records(pred_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of ``<pred_dir>/*.jsonl`` (split files in name order)."""
    return [r for p in sorted(Path(pred_dir).glob("*.jsonl")) for r in read_jsonl(p)]


def accuracy_vs_latency(
    results: Sequence[Mapping[str, Any]],
    out_stem: str | os.PathLike,
    figsize: tuple[float, float] = (7.0, 5.0),
    dpi: int = 150,
    log_x: bool | None = None,
    curves: Mapping[str, Sequence[tuple[float, float, str]]] | None = None,
    baselines: Mapping[str, float] | None = None,
) -> list[Path]:
    """Figure 4: Avg. Acc (%) of the eight RefCOCO splits vs GPU latency (ms); writes PNG and SVG.

    ``curves``: ``{name: [(latency_ms, accuracy in [0, 1], point label), ...]}`` drawn as lines,
    e.g. one checkpoint's reasoning-budget sweep (``B=0`` ... the full trace), which is the
    paper's thesis in one line: accuracy bought with reasoning tokens, i.e. with latency.
    ``baselines``: ``{name: accuracy}`` of answers that need no model call (the mean training
    box), drawn as points at 0 ms; a log axis cannot hold 0, so there they become dashed lines.

    A CPU run is placed at its plain latency (no "GPU latency" on a CPU); the axis is "GPU
    latency" only when every point is a GPU run, and names the CPU when every point is on one.

    Runs whose name contains "EGM" are drawn as green stars, others as gray circles. Runs without
    latency are left out; accuracy is the RefCOCO average when all eight splits were
    evaluated, else the macro average over the evaluated splits (the label says which). ``log_x`` defaults to a log axis when
    latencies span more than a factor of 10 (2B vs 235B models do).
    """
    pts, labels, devices = [], set(), set()
    for r in results:
        acc, label = headline_accuracy(r["splits"])
        labels.add(label)
        lat = reported_latency(r)
        if acc is not None and lat:
            pts.append((r["model"], float(lat), 100.0 * acc))
            devices.add(device_label(r.get("device")) if on_cpu(r) else "GPU")
    curves = {k: [(float(x), 100.0 * a, lab) for x, a, lab in v if x and a is not None] for k, v in (curves or {}).items()}
    baselines = dict(baselines or {})
    fig = new_figure(figsize, dpi)
    ax = fig.add_subplot(1, 1, 1)
    xs = [p[1] for p in pts] + [c[0] for v in curves.values() for c in v]
    if log_x is None:
        log_x = bool(xs) and max(xs) / min(xs) > 10 and not baselines
    for name, cpts in curves.items():
        egm = "EGM" in name
        ax.plot([c[0] for c in cpts], [c[1] for c in cpts], marker="*" if egm else "o", ms=8 if egm else 5,
                color=EGM_COLOR if egm else OTHER_COLOR, lw=1.5, label=name, zorder=3)
        for x, y, lab in cpts:
            ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    for name, acc in baselines.items():
        if log_x:
            ax.axhline(100.0 * acc, color="black", ls="--", lw=1.0, label=f"{name} (no model call)")
        else:
            ax.scatter([0.0], [100.0 * acc], marker="X", s=60, color="black", zorder=3)
            ax.annotate(f"{name} (no model call)", (0.0, 100.0 * acc), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)
    mid = float(np.median(np.log(xs) if log_x else xs)) if xs else 0.0
    for name, x, y in pts:
        egm = "EGM" in name
        ax.scatter([x], [y], s=90 if egm else 50, marker="*" if egm else "o",
                   color=EGM_COLOR if egm else OTHER_COLOR, zorder=3)
        right = (np.log(x) if log_x else x) > mid  # labels point inwards so they stay on the canvas
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(-5 if right else 5, 4),
                    ha="right" if right else "left", fontsize=8)
    ax.margins(x=0.12, y=0.12)
    if log_x:
        ax.set_xscale("log")
    if devices <= {"GPU"}:
        ax.set_xlabel("GPU latency (ms)")
    elif "GPU" in devices:
        ax.set_xlabel("Latency (ms): GPU latency of GPU runs, latency of CPU runs")
    else:
        ax.set_xlabel("Latency (ms)" + (f" on {devices.pop()}" if len(devices) == 1 else " on CPU"))
    ax.set_ylabel(f"{labels.pop() if len(labels) == 1 else 'Avg. Acc'} (%)")
    ax.set_title("Accuracy vs. efficiency")
    if curves or (baselines and log_x):
        ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, alpha=0.3)
    fig.subplots_adjust(left=0.12, right=0.95, bottom=0.12, top=0.92)
    return save_png_svg(fig, out_stem, dpi)


def save_png_svg(fig: Figure, out_stem: str | os.PathLike, dpi: int) -> list[Path]:
    """Write ``<out_stem>.png`` and ``.svg`` (the paper-figure plots come in both)."""
    stem = Path(out_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".svg")]
    for p in paths:
        fig.savefig(p, dpi=dpi)
    return paths


def iou_histogram(
    records_or_ious: Sequence[Mapping[str, Any]] | Sequence[float],
    out_path: str | os.PathLike,
    bins: int = 20,
    figsize: tuple[float, float] = (6.0, 4.0),
    dpi: int = 100,
    title: str = "",
) -> Path:
    """Histogram of per-sample IoU (failures count at 0) with the success threshold marked."""
    vals = [record_iou(v) if isinstance(v, Mapping) else float(v) for v in records_or_ious]
    fig = new_figure(figsize, dpi)
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(np.asarray(vals, dtype=np.float64), bins=bins, range=(0.0, 1.0), color=HIST_COLOR, alpha=0.8)
    ax.axvline(SUCCESS_IOU, color=PRED_COLOR, linestyle="--", label=f"success: IoU > {SUCCESS_IOU}")
    ax.set_xlabel("IoU")
    ax.set_ylabel("samples")
    acc = np.mean([v > SUCCESS_IOU for v in vals]) if vals else 0.0
    ax.set_title(f"{title + ': ' if title else ''}n={len(vals)}, acc={100 * acc:.1f}%")
    ax.legend(loc="upper left")
    fig.subplots_adjust(left=0.12, right=0.95, bottom=0.14, top=0.9)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out


def is_success(record: Mapping[str, Any]) -> bool:
    return record_iou(record) > SUCCESS_IOU


def pick_examples(records: Sequence[Mapping[str, Any]], k: int, seed: int = 0, balanced: bool = True) -> list[Mapping[str, Any]]:
    """A seeded choice of ``k`` records: half failures (IoU <= 0.5), half successes when both exist
    (failures take the odd one, as Figure 2 is about errors; one kind short: the other fills
    up), alternating failure, success, ... ``balanced=False``: a plain seeded sample."""
    rng = random.Random(seed)
    pool = list(records)
    rng.shuffle(pool)
    if not balanced:
        return pool[:k]
    fails = [r for r in pool if not is_success(r)]
    oks = [r for r in pool if is_success(r)]
    n_ok = min(len(oks), k // 2)
    n_fail = min(len(fails), k - n_ok)
    n_ok = min(len(oks), k - n_fail)
    chosen: list[Mapping[str, Any]] = []
    for i in range(max(n_fail, n_ok)):
        chosen += fails[i:i + 1] if i < n_fail else []
        chosen += oks[i:i + 1] if i < n_ok else []
    return chosen


def _load_image(path: str | None, width: int, height: int) -> np.ndarray:
    try:
        from PIL import Image

        with Image.open(path) as im:  # type: ignore[arg-type]
            return np.asarray(im.convert("RGB"))
    except Exception:  # missing image: a gray canvas of the recorded size still shows the boxes
        return np.full((max(1, int(height)), max(1, int(width)), 3), 200, dtype=np.uint8)


def _box(xy, w, h, color: str, label: str) -> Rectangle:
    r = Rectangle(xy, w, h, fill=False, edgecolor=color, linewidth=2, label=label)
    r.set_path_effects(OUTLINE)
    return r


def _draw_box(ax, box, color: str, label: str) -> None:
    x1, y1, x2, y2 = box
    ax.add_patch(_box((x1, y1), x2 - x1, y2 - y1, color, label))


def _wrap(label: str, text: str | None, width: int, max_chars: int) -> str:
    text = " ".join((text or "").split())
    if len(text) > max_chars:
        text = text[: max_chars - 3].rstrip() + "..."
    return textwrap.fill(f"{label} {text}", width=width)


def qualitative_panels(
    records: Sequence[Mapping[str, Any]],
    out_path: str | os.PathLike,
    ncols: int = 2,
    panel_size: tuple[float, float] = (4.0, 5.0),
    dpi: int = 100,
    wrap: int = 64,
    max_reasoning_chars: int = 400,
) -> Path:
    """Figures 2 / 6: one panel per record - image, GT box (magenta), predicted box (orange), both
    outlined in black, a title "<split> | success|failure | IoU 0.83", and "Text Prompt:" /
    "Reasoning:" text wrapped below. Writes one PNG (or SVG by extension).

    Output size is ``(ncols * panel_w * dpi, nrows * panel_h * dpi)`` pixels. The view is
    widened to include boxes that leave the image (amodal targets can).
    """
    n = max(1, len(records))
    ncols = max(1, min(ncols, n))
    nrows = (n + ncols - 1) // ncols
    fig = new_figure((ncols * panel_size[0], nrows * panel_size[1]), dpi)
    title_room = 0.3 / (nrows * panel_size[1])  # 0.3 inch above the first row's titles
    grid = fig.add_gridspec(2 * nrows, ncols, height_ratios=[3, 2] * nrows, hspace=0.12, wspace=0.05,
                            left=0.02, right=0.98, top=1 - title_room, bottom=0.02)
    for i, r in enumerate(records):
        row, col = divmod(i, ncols)
        ax = fig.add_subplot(grid[2 * row, col])
        img = _load_image(r.get("image"), r.get("width") or 1, r.get("height") or 1)
        ax.imshow(img)
        boxes = [b for b in (r.get("gt_box"), r.get("pred_box")) if b is not None]
        h, w = img.shape[:2]
        xs = [0, w] + [v for b in boxes for v in (b[0], b[2])]
        ys = [0, h] + [v for b in boxes for v in (b[1], b[3])]
        ax.set_xlim(min(xs), max(xs))
        ax.set_ylim(max(ys), min(ys))
        if r.get("gt_box") is not None:
            _draw_box(ax, r["gt_box"], GT_COLOR, "ground truth")
        if r.get("pred_box") is not None:
            _draw_box(ax, r["pred_box"], PRED_COLOR, "prediction")
        if i == 0:
            ax.legend(handles=[_box((0, 0), 1, 1, c, lab)
                               for c, lab in ((GT_COLOR, "ground truth"), (PRED_COLOR, "prediction"))],
                      loc="upper right", fontsize=6, framealpha=0.8)
        ok = is_success(r)
        ax.set_title(f"{r.get('split') or '?'} | {'success' if ok else 'failure'} | IoU {record_iou(r):.2f}",
                     fontsize=8, pad=3, color="tab:green" if ok else "tab:red")
        ax.set_xticks([])
        ax.set_yticks([])
        tax = fig.add_subplot(grid[2 * row + 1, col])
        tax.axis("off")
        status = f"IoU {record_iou(r):.2f}" + ("" if r.get("pred_box") is not None else f" ({r.get('failure') or 'no box'})")
        text = "\n".join([
            _wrap("Text Prompt:", r.get("sentence"), wrap, 200),
            _wrap("Reasoning:", r.get("reasoning") or "-", wrap, max_reasoning_chars),
            status,
        ])
        tax.text(0.0, 1.0, text, va="top", ha="left", fontsize=7, transform=tax.transAxes)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out
