"""Failure case analysis of paper Sec. 3 / Appendix D (Fig. 13) and the summary of Table 1.

Every prediction with ``IoU <= 0.5`` (not a success, Eq. 1) goes to the teacher with the GT box
drawn in green and the prediction in red; the reply is parsed into one of five categories, a
reasoning and a confidence. A reply without a recognisable category is a recorded failure (the
raw text is kept), never a guess. The summary gives each category's share of the analysed
failures (the paper: 62.8% COMPLEX_PROMPT for InternVL-3-8B) and, for other models, the accuracy
on the subset of ids where the analysed model failed with COMPLEX_PROMPT (Table 1; the analysed
model scores 0 there by construction).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from egm.boxes import normalize_xyxy, success
from egm.curation.cache import ReplyCache
from egm.curation.client import Teacher, TeacherConfig, TeacherError, TeacherRequest, UsageMeter
from egm.curation.draw import GREEN, RED, Overlay
from egm.curation.jobs import make_teacher, run_requests
from egm.curation.prompts import FAILURE_ANALYSIS, PromptTemplate, format_box
from egm.data.manifest import Sample, read_manifest, write_manifest
from egm.eval.predictions import read_predictions
from egm.geometry import to_rel999
from egm.scoring import Prediction

CATEGORIES = ("COMPLEX_PROMPT", "AMBIGUOUS_IMAGE", "SMALL_OBJECT", "GT_ERROR", "OTHER")
CONFIDENCES = ("high", "medium", "low")
NO_BOX = "none (no box could be parsed from the model's answer)"


@dataclass(frozen=True)
class FailureVerdict:
    category: str
    reasoning: str
    confidence: str | None  # high / medium / low, None when the reply gave none


def _tag(text: str, name: str) -> str | None:
    m = re.search(rf"<\s*{name}\s*>(.*?)<\s*/\s*{name}\s*>", text, flags=re.I | re.S)
    if m:
        return m.group(1)
    m = re.search(rf"<\s*{name}\s*>([^<\n]*)", text, flags=re.I)  # unclosed tag: rest of the line
    if m:
        return m.group(1)
    m = re.search(rf"^\W*{name}\W*\s*[:=]\s*(.+)$", text, flags=re.I | re.M)  # "Category: X"
    return m.group(1) if m else None


def parse_failure_analysis(text: str) -> FailureVerdict:
    """Fig. 13 reply -> verdict; ``ValueError`` when no single category can be read.

    Tolerates brackets, bold, numbering, case, spaces or hyphens instead of underscores
    (``[Complex prompt]``, ``**1. COMPLEX-PROMPT**``), unclosed tags and ``Category: X`` lines.
    A value naming several categories (the template echoed back) is malformed.
    """
    raw = _tag(text, "category")
    if raw is None:
        raise ValueError("no <category> in the reply")
    norm = re.sub(r"[\s\-]+", "_", raw.upper())
    found = [c for c in CATEGORIES if re.search(rf"(?<![A-Z]){c}(?![A-Z])", norm)]
    if len(found) != 1:
        raise ValueError(f"category {raw.strip()[:60]!r} names {len(found)} of {CATEGORIES}")
    reasoning = (_tag(text, "reasoning") or "").strip().strip("[]").strip()
    conf_raw = (_tag(text, "confidence") or "").lower()
    conf = next((c for c in CONFIDENCES if re.search(rf"\b{c}\b", conf_raw)), None)
    return FailureVerdict(found[0], reasoning, conf)


def failure_request(pred: Prediction, sample: Sample, tag: str, template: PromptTemplate = FAILURE_ANALYSIS) -> TeacherRequest:
    """GT green, prediction red; boxes in the prompt on the 0-999 scale of Fig. 13."""
    W, H = sample.width, sample.height
    gt = pred.gt_box if pred.gt_box is not None else sample.box
    overlays = [Overlay(gt, GREEN)]
    if pred.pred_box is not None:
        pb = normalize_xyxy(pred.pred_box)
        overlays.append(Overlay(pb, RED))
        pred_norm = format_box(to_rel999(pb, W, H))
    else:
        pred_norm = NO_BOX
    fields = {
        "question": pred.sentence or sample.sentence,
        "pred_bbox_norm": pred_norm,
        "gt_bbox_norm": format_box(to_rel999(gt, W, H)),
        "iou": pred.iou,
    }
    return TeacherRequest(template.name, f"{tag}/{pred.id}", template.key, sample, template.render(**fields), fields, tuple(overlays))


@dataclass
class FailureAnalysis:
    verdicts: dict[str, FailureVerdict]      # prediction id -> verdict
    samples: list[Sample]                    # analysed failures, verdict in meta["failure"]
    failures: list[dict[str, Any]] = field(default_factory=list)  # requests/replies that failed
    stats: dict[str, Any] = field(default_factory=dict)


def run_failure_analysis(
    predictions: Mapping[str, Prediction],
    samples: Mapping[str, Sample],
    teacher: Teacher,
    cache: ReplyCache,
    *,
    tag: str,
    concurrency: int = 8,
    progress: bool = False,
    price: tuple[float, float] = (0.0, 0.0),
) -> FailureAnalysis:
    """Ask the teacher why each ``IoU <= 0.5`` prediction of model ``tag`` failed (Fig. 13)."""
    meter = UsageMeter(*price)
    failures: list[dict[str, Any]] = []
    reqs: dict[str, TeacherRequest] = {}
    for p in predictions.values():
        if success(p.iou):
            continue
        if p.failure == "image_error":  # the evaluator could not read the image
            failures.append({"id": p.id, "job": FAILURE_ANALYSIS.name, "kind": "skipped", "reason": "image_error record"})
            continue
        s = samples.get(p.id)
        if s is None:
            failures.append({"id": p.id, "job": FAILURE_ANALYSIS.name, "kind": "skipped", "reason": "id not in the manifest"})
            continue
        reqs[p.id] = failure_request(p, s, tag)
    replies = run_requests(list(reqs.values()), teacher, cache, concurrency=concurrency, meter=meter, progress=progress)
    verdicts: dict[str, FailureVerdict] = {}
    out: list[Sample] = []
    for pid, r in reqs.items():
        reply = replies[r.item_id]
        if isinstance(reply, TeacherError):
            failures.append({"id": pid, "job": r.job, "kind": "error", "reason": str(reply), "status": reply.status})
            continue
        try:
            v = parse_failure_analysis(reply.text)
        except ValueError as e:
            failures.append({"id": pid, "job": r.job, "kind": "malformed", "reason": str(e), "reply": reply.text[:2000]})
            continue
        verdicts[pid] = v
        p = predictions[pid]
        meta = {**r.sample.meta, "failure": {
            "model": tag, "category": v.category, "reasoning": v.reasoning, "confidence": v.confidence,
            "iou": p.iou, "pred_box": p.pred_box, "teacher": teacher.model, "prompt": r.prompt_key}}
        out.append(replace(r.sample, meta=meta))
    kinds = Counter(f["kind"] for f in failures)
    stats = {"job": FAILURE_ANALYSIS.name, "prompt": FAILURE_ANALYSIS.key, "model": teacher.model, "analysed_model": tag,
             "predictions": len(predictions), "failed_predictions": len(reqs) + kinds["skipped"],
             "verdicts": len(verdicts), "skipped": kinds["skipped"], "errors": kinds["error"],
             "malformed": kinds["malformed"], **meter.as_dict()}
    return FailureAnalysis(verdicts, out, failures, stats)


def failure_summary(
    verdicts: Mapping[str, FailureVerdict],
    models: Mapping[str, Mapping[str, Prediction]] | None = None,
    category: str = "COMPLEX_PROMPT",
) -> dict[str, Any]:
    """Category shares and, per model, the accuracy on the ``category`` failure subset (Table 1).

    A model lacking predictions for some subset ids is scored on those it has; the count of
    missing ids is reported beside its accuracy.
    """
    counts = Counter(v.category for v in verdicts.values())
    n = len(verdicts)
    subset = [i for i, v in verdicts.items() if v.category == category]
    acc = {}
    for name, preds in (models or {}).items():
        have = [preds[i] for i in subset if i in preds]
        acc[name] = {
            "acc": (sum(p.success for p in have) / len(have)) if have else None,
            "n": len(have),
            "missing": len(subset) - len(have),
        }
    return {
        "analysed": n,
        "counts": {c: counts[c] for c in CATEGORIES},
        "share": {c: (counts[c] / n if n else 0.0) for c in CATEGORIES},
        "subset_category": category,
        "subset_size": len(subset),
        "accuracy": acc,
    }


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """The summary as two Markdown tables (shares; Table 1 accuracies)."""
    lines = ["| Category | Count | Share |", "|---|---:|---:|"]
    for c in CATEGORIES:
        lines.append(f"| {c} | {summary['counts'][c]} | {summary['share'][c]:.1%} |")
    lines += ["", f"Accuracy on the {summary['subset_size']} {summary['subset_category']} failures:", "",
              "| Model | Acc | n | missing |", "|---|---:|---:|---:|"]
    for name, a in summary["accuracy"].items():
        acc = "-" if a["acc"] is None else f"{a['acc']:.1%}"
        lines.append(f"| {name} | {acc} | {a['n']} | {a['missing']} |")
    return "\n".join(lines) + "\n"


def _named(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH`` (name = file stem)."""
    if "=" in spec and not Path(spec).exists():
        name, _, path = spec.partition("=")
        return name, path
    return Path(spec).stem, spec


def analyze_failures(
    predictions: str,
    manifest: str,
    output: str,
    compare: list[str] | None = None,
    name: str | None = None,
    teacher: TeacherConfig = TeacherConfig(),
    teacher_class: str | None = None,
    cache: str | None = None,
    concurrency: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Categorise a model's grounding failures with a teacher VLM (Sec. 3, Fig. 13, Table 1).

    Args:
        predictions: prediction JSONL of the analysed model (evaluator output).
        manifest: the manifest the predictions were made on (images, sizes, GT).
        output: manifest of the analysed failures (verdict in ``meta.failure``); beside it go
            ``<output>.failures.jsonl`` (failed or malformed requests), ``<output>.summary.json``
            and ``<output>.summary.md``.
        compare: prediction files of other models (``NAME=PATH`` or ``PATH``) scored on the
            COMPLEX_PROMPT subset (Table 1 rows); the analysed model is always the first row.
        name: the analysed model's name (cache key part and first row); default the file stem.
        teacher: OpenAI-compatible endpoint, limits and prices (env vars fill model/url/key).
        teacher_class: ``module:callable`` building another Teacher, e.g. the synthetic oracle
            ``egm.curation.oracle:OracleTeacher`` (then ``teacher`` is unused).
        cache: reply cache (JSONL); default ``<output folder>/teacher_cache.jsonl``.
        concurrency: requests in flight.
        progress: show a progress bar.
    """
    tag = name or Path(predictions).stem
    preds = read_predictions(predictions)
    samples = {s.id: s for s in read_manifest(manifest)}
    t = make_teacher(teacher, teacher_class)
    cfg = getattr(t, "config", teacher)
    cache_path = Path(cache) if cache else Path(output).parent / "teacher_cache.jsonl"
    with ReplyCache(cache_path) as c:
        res = run_failure_analysis(preds, samples, t, c, tag=tag, concurrency=concurrency, progress=progress,
                                   price=(cfg.price_input_per_1m, cfg.price_output_per_1m))
    models = {tag: preds}
    for spec in compare or []:
        n, p = _named(spec)
        models[n] = read_predictions(p)
    summary = {**failure_summary(res.verdicts, models), "stats": res.stats}
    out = Path(output)
    write_manifest(out, res.samples)
    out.with_name(out.name + ".failures.jsonl").write_text(
        "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in res.failures), encoding="utf-8")
    out.with_name(out.name + ".summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    out.with_name(out.name + ".summary.md").write_text(summary_markdown(summary), encoding="utf-8")
    return summary
