"""Tables shaped like paper Tables 3 and 4 (plus an efficiency table for Figure 4) from results.json files.

One results file (written by :func:`egm.eval.runner.evaluate`) is one row. Accuracies are printed
as percentages with one decimal, as in the paper; a split that was not evaluated prints ``-``.
Table 3 (Table 4) is written only when some run evaluated a RefCOCO (an amodal) split. A CPU run
(``device.type == "cpu"`` in results.json) has no GPU latency: its efficiency row names the CPU
and threads, with ``#GPUs`` 0.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from egm.errors import InputError
from egm.eval.benchmarks import (
    AMODAL_COLUMN, AVG_COLUMN, MODEL_COLUMN, REFCOCO_SPLITS, canonical_split, table3_columns, table4_columns,
)
from egm.eval.latency import device_label, on_cpu, reported_latency
from egm.eval.metrics import amodal_accuracy, headline_accuracy, refcoco_average

MISSING = "-"
EFFICIENCY_COLUMNS = [MODEL_COLUMN, "#Params (B)", "Device", "#GPUs", "Latency (ms)", "Latency p50 (ms)",
                      "Latency p90 (ms)", "GPU latency (ms)", "#Tokens", AVG_COLUMN]
SPLIT_COLUMN = "Split"
SUMMARY_COLUMNS = [SPLIT_COLUMN, "n", "Acc (%)", "Mean IoU", "Parse failures", "Latency (ms)",
                   "Latency p50 (ms)", "Latency p90 (ms)", "#Tokens"]


def load_results(paths: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """Read results files (a directory means its ``results.json``); validates the fields the report uses."""
    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            p = p / "results.json"
        try:
            r = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{p}: cannot read results: {e}") from None
        for key in ("model", "splits"):
            if key not in r:
                raise InputError(f"{p}: field '{key}' missing")
        r["splits"] = {canonical_split(k): v for k, v in r["splits"].items()}
        out.append(r)
    return out


def pct(x: float | None) -> str:
    """Fraction -> percent with one decimal; the epsilon rounds binary ties like 0.6375 half up."""
    return MISSING if x is None else f"{100.0 * x + 1e-9:.1f}"


def _num(x: float | None, fmt: str = "{:.0f}") -> str:
    return MISSING if x is None else fmt.format(x)


def table3_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Table 3: per-split accuracy on the eight RefCOCO splits and their macro average."""
    rows = []
    for r in results:
        row = {MODEL_COLUMN: r["model"]}
        for s in REFCOCO_SPLITS:
            m = r["splits"].get(s.name)
            row[s.label] = pct(m["accuracy"] if m else None)
        row[AVG_COLUMN] = pct(refcoco_average(r["splits"]))
        rows.append(row)
    return rows


def splits_rows(results: Sequence[dict[str, Any]]) -> tuple[list[dict[str, str]], list[str]]:
    """Every evaluated split as a column (accuracy %), for benchmarks outside Tables 3/4."""
    names = sorted({n for r in results for n in r["splits"]})
    rows = [{MODEL_COLUMN: r["model"], **{n: pct(r["splits"][n]["accuracy"]) if n in r["splits"] else MISSING
                                          for n in names},
             "Macro Avg.": pct(headline_accuracy(r["splits"])[0])} for r in results]
    return rows, [MODEL_COLUMN, *names, "Macro Avg."]


def table4_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Table 4: pooled accuracy over the amodal (COCO-Amodal val + test) samples."""
    return [{MODEL_COLUMN: r["model"], AMODAL_COLUMN: pct(amodal_accuracy(r["splits"]))} for r in results]


def efficiency_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Sec. 5.5 / Figure 4 numbers: parameters, device, latency (mean, p50, p90), GPU latency (GPU
    runs only), tokens, accuracy."""
    rows = []
    for r in results:
        lat = r.get("latency") or {}
        n_params = r.get("n_params")
        cpu = on_cpu(r)
        rows.append({
            MODEL_COLUMN: r["model"],
            "#Params (B)": _num(n_params / 1e9 if n_params else None,
                                "{:.2f}" if (n_params or 0) >= 1e7 else "{:.2g}"),  # a tiny model: 0.001
            "Device": device_label(r.get("device")),
            "#GPUs": "0" if cpu else str(r.get("num_gpus", 1)),
            "Latency (ms)": _num(lat.get("mean_ms")),
            "Latency p50 (ms)": _num(lat.get("p50_ms")),
            "Latency p90 (ms)": _num(lat.get("p90_ms")),
            "GPU latency (ms)": MISSING if cpu else _num(lat.get("gpu_mean_ms")),
            "#Tokens": _num(lat.get("mean_tokens"), "{:.1f}"),
            AVG_COLUMN: pct(refcoco_average(r["splits"])),
        })
    return rows


def summary_rows(result: dict[str, Any]) -> list[dict[str, str]]:
    """One row per evaluated split of one results.json: accuracy, mean IoU, parse failures, and the
    split's batch-1 latency when it was timed (``egm evaluate`` prints these)."""
    lat_splits = (result.get("latency") or {}).get("splits") or {}
    rows = []
    for name, m in result["splits"].items():
        lat = lat_splits.get(name) or {}
        rows.append({
            SPLIT_COLUMN: name,
            "n": str(m["n"]),
            "Acc (%)": pct(m["accuracy"]),
            "Mean IoU": _num(m.get("mean_iou"), "{:.3f}"),
            "Parse failures": f"{m.get('n_parse_failures', 0)} ({pct(m.get('parse_failure_rate', 0.0))}%)",
            "Latency (ms)": _num(lat.get("mean_ms")),
            "Latency p50 (ms)": _num(lat.get("p50_ms")),
            "Latency p90 (ms)": _num(lat.get("p90_ms")),
            "#Tokens": _num(m.get("mean_tokens"), "{:.1f}"),
        })
    return rows


def results_summary(result: dict[str, Any]) -> str:
    """The per-split table of one run, headed by model and device, and its pooled latency line."""
    lines = [f"{result['model']} on {device_label(result.get('device'))}", "",
             to_markdown(summary_rows(result), SUMMARY_COLUMNS)]
    lat = result.get("latency") or {}
    if lat.get("n"):
        gpu = "" if on_cpu(result) or "gpu_mean_ms" not in lat else (
            f"; GPU latency {lat['gpu_mean_ms']:.0f} ms ({result.get('num_gpus', 1)} GPU)")
        lines.append(f"Latency (batch 1, {lat['n']} samples): mean {lat['mean_ms']:.0f} ms, "
                     f"p50 {lat['p50_ms']:.0f} ms, p90 {lat['p90_ms']:.0f} ms{gpu}")
    return "\n".join(lines).rstrip("\n") + "\n"


def to_markdown(rows: Sequence[dict[str, str]], columns: Sequence[str]) -> str:
    """GitHub Markdown table; the model (or split) column is left-aligned, numbers right-aligned."""
    head = "| " + " | ".join(columns) + " |"
    sep = "| " + " | ".join(":---" if c in (MODEL_COLUMN, SPLIT_COLUMN) else "---:" for c in columns) + " |"
    body = ["| " + " | ".join(str(row.get(c, MISSING)) for c in columns) + " |" for row in rows]
    return "\n".join([head, sep, *body]) + "\n"


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, str]], columns: Sequence[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns))
        w.writeheader()
        for row in rows:
            w.writerow({c: row.get(c, MISSING) for c in columns})


def write_tables(results: Sequence[dict[str, Any]], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``table3``, ``table4``, ``efficiency`` and ``splits`` (every split) as ``.md`` and ``.csv``;
    returns the paths. Table 3 / Table 4 only when some run evaluated one of its splits (an
    all-``-`` table says nothing)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = {}
    if any(s.name in r["splits"] for r in results for s in REFCOCO_SPLITS):
        tables["table3"] = (table3_rows(results), table3_columns())
    if any(amodal_accuracy(r["splits"]) is not None for r in results):
        tables["table4"] = (table4_rows(results), table4_columns())
    tables["efficiency"] = (efficiency_rows(results), EFFICIENCY_COLUMNS)
    tables["splits"] = splits_rows(results)
    paths: dict[str, Path] = {}
    for name, (rows, cols) in tables.items():
        (out / f"{name}.md").write_text(to_markdown(rows, cols), encoding="utf-8")
        write_csv(out / f"{name}.csv", rows, cols)
        paths[f"{name}.md"], paths[f"{name}.csv"] = out / f"{name}.md", out / f"{name}.csv"
    return paths


def budget_curve(path: str | os.PathLike) -> tuple[str, list[tuple[float, float, str]]]:
    """``(model, [(latency_ms, macro accuracy, "B=<budget>"), ...])`` of a ``budget_sweep.json``
    (or the folder holding it), in budget order; budgets without latency are left out."""
    p = Path(path)
    p = p / "budget_sweep.json" if p.is_dir() else p
    try:
        sweep = json.loads(p.read_text())
        rows = sorted(sweep["budgets"], key=lambda r: r["budget"])
        pts = [(r["latency_mean_ms"], r["macro_avg"], f"B={r['budget']}") for r in rows if r.get("latency_mean_ms")]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{p}: not a budget sweep summary (budget_sweep.json): {e}") from e
    return f"{sweep.get('model', 'model')}: reasoning budget", pts


def make_report(
    results: list[str],
    out_dir: str = "reports",
    figure: bool = True,
    histogram: bool = True,
    qualitative: int = 0,
    seed: int = 0,
    budget_sweeps: list[str] | None = None,
    baselines: dict[str, float] | None = None,
) -> dict[str, str]:
    """Tables 3/4 + efficiency (Markdown, CSV), the Figure 4 plot and IoU histograms from results files.

    Args:
        results: results.json files or the evaluation folders that contain them (one row each).
        out_dir: where the report goes.
        figure: write ``accuracy_vs_latency.{png,svg}`` (Figure 4) when latencies are present.
        histogram: write ``iou_hist_<model>.png`` from each run's predictions folder when present.
        qualitative: number of Figure 2/6-style panels per run (0 = none): half failures, half
            successes when both exist, seeded.
        seed: seed of the qualitative sample choice.
        budget_sweeps: ``budget_sweep.json`` files (``egm evaluate --reasoning_budget [...]``) or
            their folders, drawn in the figure as curves: macro accuracy vs latency per budget.
        baselines: ``{name: accuracy in [0, 1]}`` of answers without a model call (e.g. the
            mean training box), drawn as points at 0 ms.
    """
    from egm.eval import plots  # matplotlib only when a figure is asked for

    loaded = load_results(results)
    out = Path(out_dir)
    written = {k: str(v) for k, v in write_tables(loaded, out).items()}
    curves = dict(budget_curve(p) for p in budget_sweeps or [])
    if figure and (any(reported_latency(r) for r in loaded) or curves):
        for p in plots.accuracy_vs_latency(loaded, out / "accuracy_vs_latency", curves=curves, baselines=baselines):
            written[p.name] = str(p)
    for src, r in zip(results, loaded):
        pred_dir = (Path(src) if Path(src).is_dir() else Path(src).parent) / "predictions"
        if not pred_dir.is_dir():
            continue
        records = plots.load_prediction_records(pred_dir)
        tag = plots.slug(r["model"])
        if histogram and records:
            p = plots.iou_histogram(records, out / f"iou_hist_{tag}.png", title=r["model"])
            written[p.name] = str(p)
        if qualitative and records:
            chosen = plots.pick_examples(records, qualitative, seed=seed)
            p = plots.qualitative_panels(chosen, out / f"qualitative_{tag}.png")
            written[p.name] = str(p)
    return written
