"""Accuracy vs. reasoning tokens: an evaluation per test-time reasoning budget (paper Sec. 5.5, Fig. 4).

:func:`budget_sweep` runs the ordinary runner (:func:`egm.eval.runner.evaluate`) once per budget,
each into its own folder, so every budget resumes on its own; then it writes one summary::

    out_dir/budget_<B>/results.json, predictions/, latency/   one evaluate run per budget B
    out_dir/budget_sweep.json | .md                           budget, mean tokens, latency, accuracy
    out_dir/budget_curves.png | .svg                          accuracy vs tokens and vs latency

The generation side (budget forcing: cap the reasoning at ``B`` tokens, then force the answer)
is :mod:`egm.generation.budget`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from egm.errors import InputError
from egm.eval.plots import new_figure, save_png_svg
from egm.eval.report import pct
from egm.eval.runner import GenerateFn, GenerationOutput, evaluate
from egm.generation.budget import BudgetAnswer

SUMMARY_NAME = "budget_sweep"
CURVES_NAME = "budget_curves"
MACRO = "Macro Avg."


def budget_generate_fn(generate: Callable[[list[dict[str, Any]]], Sequence[BudgetAnswer]]) -> GenerateFn:
    """``examples -> [BudgetAnswer]`` (e.g. :func:`~egm.generation.budget.hf_budget_generate` bound to a
    model and budget) as the runner's ``generate_fn``: text + generated tokens (forced text not counted)."""

    def fn(examples: list[dict[str, Any]]) -> list[GenerationOutput]:
        return [GenerationOutput(a.text, a.num_tokens) for a in generate(examples)]

    return fn


def check_budgets(reasoning_budget: int | Sequence[int]) -> list[int]:
    """One budget or a sweep -> a sorted list of distinct non-negative ints (fails at the edge)."""
    budgets = [reasoning_budget] if isinstance(reasoning_budget, int) else list(reasoning_budget)
    if not budgets:
        raise InputError("reasoning_budget: give one budget or a non-empty list, e.g. [0, 16, 32, 64]")
    bad = [b for b in budgets if not isinstance(b, int) or isinstance(b, bool) or b < 0]
    if bad:
        raise InputError(f"reasoning_budget: budgets are token counts >= 0, got {bad}")
    return sorted(set(budgets))


def budget_row(budget: int, results: Mapping[str, Any]) -> dict[str, Any]:
    """One summary row from a budget's ``results.json``: mean tokens pooled over the splits."""
    splits = results["splits"]
    tok = [(m["mean_tokens"], m["n"]) for m in splits.values() if m.get("mean_tokens") is not None and m["n"]]
    n_tok = sum(n for _, n in tok)
    acc = {k: m["accuracy"] for k, m in splits.items()}
    lat = results.get("latency") or {}
    return {
        "budget": budget,
        "mean_tokens": sum(t * n for t, n in tok) / n_tok if n_tok else None,
        "latency_mean_ms": lat.get("mean_ms"),
        "latency_mean_tokens": lat.get("mean_tokens"),
        "accuracy": acc,
        "macro_avg": float(np.mean(list(acc.values()))) if acc else None,
        "mean_iou": results["summary"].get("mean_iou"),
    }


def budget_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: budget, mean generated tokens, latency (batch size 1), accuracy@0.5 (%) per split."""
    splits = sorted({s for r in rows for s in r["accuracy"]})
    f = (lambda v, d=1: "n/a" if v is None else f"{v:.{d}f}")  # noqa: E731
    lines = ["| budget | mean tokens | latency mean (ms) | " + " | ".join(splits) + f" | {MACRO} |",
             "| ---: | ---: | ---: | " + " | ".join("---:" for _ in splits) + " | ---: |"]
    for r in rows:
        accs = [pct(r["accuracy"][s]) if r["accuracy"].get(s) is not None else "n/a" for s in splits]
        macro = "n/a" if r["macro_avg"] is None else pct(r["macro_avg"])  # rounded as the report's tables
        lines.append(f"| {r['budget']} | {f(r['mean_tokens'])} | {f(r['latency_mean_ms'])} | "
                     + " | ".join(accs) + f" | {macro} |")
    return "\n".join(lines) + "\n"


def budget_curves(rows: Sequence[Mapping[str, Any]], out_stem: str | os.PathLike,
                  figsize: tuple[float, float] = (11.0, 4.5), dpi: int = 150) -> list[Path]:
    """Figure-4 style, per budget: accuracy (%) vs mean generated tokens (left) and vs latency at
    batch size 1 (right); one line per split and the macro average (black), points labelled by
    budget. Writes PNG and SVG."""
    rows = sorted(rows, key=lambda r: r["budget"])
    splits = sorted({s for r in rows for s in r["accuracy"]})
    fig = new_figure(figsize, dpi)
    panels = [("mean_tokens", "Mean generated tokens"), ("latency_mean_ms", "Latency (ms, batch size 1)")]
    for i, (key, xlabel) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        lines = [(s, [r["accuracy"].get(s) for r in rows]) for s in splits] + [(MACRO, [r["macro_avg"] for r in rows])]
        for name, ys in lines:
            pts = [(r[key], 100 * y, r["budget"]) for r, y in zip(rows, ys) if r[key] is not None and y is not None]
            if not pts:
                continue
            macro = name == MACRO
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="*" if macro else "o",
                    color="black" if macro else None, lw=2.2 if macro else 1.0, ms=9 if macro else 4,
                    alpha=1.0 if macro else 0.8, label=name, zorder=3 if macro else 2)
            if macro:
                for x, y, b in pts:
                    ax.annotate(f"B={b}", (x, y), textcoords="offset points", xytext=(4, 5), fontsize=8)
        if not ax.lines:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("Acc@0.5 (%)")
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.12, y=0.12)
    fig.axes[0].set_title("Accuracy vs. reasoning tokens")
    fig.axes[1].set_title("Accuracy vs. latency")
    fig.axes[0].legend(fontsize=7, loc="best")
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.9, wspace=0.22)
    return save_png_svg(fig, out_stem, dpi)


def budget_sweep(make_generate_fn: Callable[[int], GenerateFn], budgets: int | Sequence[int],
                 splits: Mapping[str, Any], out_dir: str | os.PathLike, answer_tokens: int | None = None,
                 **evaluate_kwargs: Any) -> dict[str, Any]:
    """:func:`egm.eval.runner.evaluate` once per budget (``make_generate_fn(B)`` gives its generator)
    into ``out_dir/budget_<B>``, then the summary table and curves; returns the summary dict."""
    out = Path(out_dir)
    rows = []
    model = evaluate_kwargs.pop("model_name", "model")
    extra = dict(evaluate_kwargs.pop("extra", None) or {})
    for b in check_budgets(budgets):
        sub = out / f"budget_{b}"
        res = evaluate(make_generate_fn(b), splits, sub, model_name=f"{model} (B={b})", **evaluate_kwargs,
                       extra={**extra, "reasoning_budget": {"budget": b, "answer_tokens": answer_tokens}})
        rows.append({**budget_row(b, res), "results": str(sub / "results.json")})
    summary = {"model": model, "answer_tokens": answer_tokens, "budgets": rows,
               "figure": [str(p) for p in budget_curves(rows, out / CURVES_NAME)]}
    _write(out / f"{SUMMARY_NAME}.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    _write(out / f"{SUMMARY_NAME}.md", f"## {model}: accuracy@0.5 (%) per reasoning budget\n\n{budget_table(rows)}")
    return summary


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
