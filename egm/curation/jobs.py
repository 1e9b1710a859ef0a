"""SFT data curation jobs of paper Sec. 4.1 / Appendix B, over plain manifests.

* :func:`vanilla_reasoning` (Fig. 8): GT box drawn in green, given in 0-999 coordinates ->
  ``Sample.reasoning`` (the dataset D_C).
* :func:`amodal_descriptions` (Fig. 9): amodal box drawn in green, object category -> a
  RefCOCO-style referring expression that becomes ``Sample.sentence``.
* :func:`verify_descriptions` (Fig. 10): amodal box drawn in red and labelled TARGET -> YES keeps
  the sample, NO drops it (the paper drops about half): the dataset D_T.
* :func:`amodal_reasoning` (Fig. 11): modal box red, amodal box green, expansion directions and
  amounts computed from the two boxes (:func:`egm.geometry.expansion`) -> ``reasoning``
  (the dataset D_A).

Every job takes any :class:`~egm.curation.client.Teacher` (the API client or the synthetic
oracle) and a :class:`~egm.curation.cache.ReplyCache`; replies already in the cache are reused,
so rerunning a killed job only asks for what is missing: the replies never received plus at
most ``concurrency`` requests that were in flight at the kill (possibly answered and billed by
the provider, but not yet cached; see :mod:`egm.curation.cache`). A sample whose request fails, or whose
reply does not parse, is dropped from the output and listed in the job's ``failures`` (never
fatal). The outputs are ordinary manifests, read by the SFT and RL datamodules as they are.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from egm.boxes import is_degenerate
from egm.curation.cache import ReplyCache
from egm.curation.client import OpenAITeacher, Reply, Teacher, TeacherConfig, TeacherError, TeacherRequest, UsageMeter
from egm.curation.draw import GREEN, RED, Overlay
from egm.curation.prompts import (
    AMODAL_DESCRIPTION,
    AMODAL_REASONING,
    AMODAL_VERIFICATION,
    VANILLA_REASONING,
    PromptTemplate,
    format_box,
)
from egm.data.manifest import Sample, read_manifest, write_manifest
from egm.errors import InputError
from egm.geometry import expansion, to_rel999

log = logging.getLogger(__name__)


class Skip(ValueError):
    """A sample the job cannot ask about (wrong task, no visible box, ...)."""


@dataclass
class JobResult:
    """Kept samples (input order), dropped ones with the reason, and counters."""

    samples: list[Sample]
    failures: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


def prompt_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def run_requests(
    requests: Sequence[TeacherRequest],
    teacher: Teacher,
    cache: ReplyCache,
    *,
    concurrency: int = 8,
    meter: UsageMeter | None = None,
    progress: bool = False,
) -> dict[str, Reply | TeacherError]:
    """Answer each request from the cache or the teacher (``concurrency`` threads) -> id -> reply.

    A finished request is cached before the next is counted, so a kill loses at most the
    requests in flight: at most ``concurrency`` (one per worker thread; the queued ones have
    not been sent), which a rerun asks, and may pay for, again. :class:`TeacherError` is
    returned for its item; any other exception
    (a bug, Ctrl-C) cancels what has not started and propagates once the in-flight requests end.
    """
    if concurrency < 1:
        raise InputError(f"concurrency must be >= 1, got {concurrency}")
    meter = meter if meter is not None else UsageMeter()
    out: dict[str, Reply | TeacherError] = {}
    todo: list[tuple[TeacherRequest, str]] = []
    for r in requests:
        sha = prompt_sha(r.prompt)
        hit = cache.get(r.item_id, r.prompt_key, teacher.model, sha)
        if hit is not None:
            meter.add(hit, cached=True)
            out[r.item_id] = hit
        else:
            todo.append((r, sha))

    def work(r: TeacherRequest, sha: str) -> Reply:
        reply = teacher.complete(r)
        cache.put(r.item_id, r.prompt_key, teacher.model, sha, reply)
        return reply

    bar = _progress(progress, len(todo), requests[0].job if requests else "")
    window = 2 * concurrency  # bounded submission: memory stays flat on 500k-sample manifests
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="teacher") as pool:
        pending: dict[Future, TeacherRequest] = {}
        it = iter(todo)
        try:
            while True:
                while len(pending) < window and (nxt := next(it, None)) is not None:
                    pending[pool.submit(work, *nxt)] = nxt[0]
                if not pending:
                    break
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    r = pending.pop(f)
                    try:
                        reply = f.result()
                    except TeacherError as e:
                        log.warning("teacher failed on %s (%s): %s", r.item_id, r.job, e)
                        meter.add_error()
                        out[r.item_id] = e
                    else:
                        meter.add(reply, cached=False)
                        out[r.item_id] = reply
                    if bar:
                        bar[0].advance(bar[1])
        except BaseException:
            for f in pending:
                f.cancel()
            raise
        finally:
            if bar:
                bar[0].stop()
    return out


def _progress(enabled: bool, total: int, desc: str):
    if not enabled or total == 0:
        return None
    from rich.progress import Progress

    p = Progress(transient=False)
    task = p.add_task(desc, total=total)
    p.start()
    return p, task


def run_job(
    samples: Sequence[Sample],
    teacher: Teacher,
    cache: ReplyCache,
    template: PromptTemplate,
    make_request: Callable[[Sample, PromptTemplate], TeacherRequest],
    parse: Callable[[str], Any],
    apply: Callable[[Sample, Any], Sample | None],
    *,
    concurrency: int = 8,
    progress: bool = False,
    price: tuple[float, float] = (0.0, 0.0),
) -> JobResult:
    """The shape shared by every job: requests -> replies (cached) -> parse -> new samples.

    ``make_request`` may raise :class:`Skip`; ``parse`` raises ``ValueError`` on a malformed
    reply; ``apply`` returns the output sample, or None to filter the sample out (a NO verdict).
    """
    meter = UsageMeter(*price)
    failures: list[dict[str, Any]] = []
    requests: dict[str, TeacherRequest] = {}
    for s in samples:
        try:
            requests[s.id] = make_request(s, template)
        except Skip as e:
            failures.append({"id": s.id, "job": template.name, "kind": "skipped", "reason": str(e)})
    replies = run_requests(list(requests.values()), teacher, cache, concurrency=concurrency, meter=meter, progress=progress)
    kept, rejected = [], 0
    for s in samples:
        r = requests.get(s.id)
        if r is None:
            continue
        reply = replies[r.item_id]
        if isinstance(reply, TeacherError):
            failures.append({"id": s.id, "job": template.name, "kind": "error", "reason": str(reply), "status": reply.status})
            continue
        try:
            value = parse(reply.text)
        except ValueError as e:
            failures.append({"id": s.id, "job": template.name, "kind": "malformed", "reason": str(e), "reply": reply.text[:2000]})
            continue
        new = apply(s, value)
        if new is None:
            rejected += 1
            failures.append({"id": s.id, "job": template.name, "kind": "rejected", "reason": "teacher said NO", "reply": reply.text[:200]})
        else:
            kept.append(_provenance(new, template, teacher.model))
    kinds = Counter(f["kind"] for f in failures)
    stats = {
        "job": template.name, "prompt": template.key, "model": teacher.model, "input": len(samples),
        "kept": len(kept), "rejected": rejected, "skipped": kinds["skipped"], "errors": kinds["error"],
        "malformed": kinds["malformed"], **meter.as_dict(),
    }
    retries = getattr(teacher, "retries", None)
    if retries is not None:
        stats["retries"] = dict(retries)
    return JobResult(kept, failures, stats)


def _provenance(s: Sample, template: PromptTemplate, model: str) -> Sample:
    cur = dict(s.meta.get("curation", {}))
    cur[template.name] = {"teacher": model, "prompt": template.key}
    return replace(s, meta={**s.meta, "curation": cur})


def _request(s: Sample, t: PromptTemplate, fields: dict[str, Any], overlays: tuple[Overlay, ...]) -> TeacherRequest:
    return TeacherRequest(t.name, s.id, t.key, s, t.render(**fields), fields, overlays)


# ---------------------------------------------------------------------------------------------
# Reply parsers (pure; ValueError = malformed reply)

_WS = re.compile(r"\s+")


def parse_reasoning(text: str) -> str:
    """A reasoning trace: the reply stripped; empty is malformed."""
    out = text.strip()
    if not out:
        raise ValueError("empty reply")
    return out


def parse_description(text: str, max_words: int = 30) -> str:
    """Fig. 9 reply -> lowercase referring expression (first non-empty line, quotes and labels removed)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        raise ValueError("empty reply")
    d = re.sub(r"^(description|answer)\s*:\s*", "", lines[0], flags=re.I)
    d = d.strip().strip("*-•").strip().strip("\"'`“”‘’").strip().rstrip(".").strip().strip("\"'“”")
    d = _WS.sub(" ", d).lower()
    if not d:
        raise ValueError("empty description")
    if len(d.split()) > max_words:
        raise ValueError(f"description of {len(d.split())} words (> {max_words}): not a referring expression")
    return d


def parse_verdict(text: str) -> bool:
    """Fig. 10 reply -> True for YES, False for NO; anything else is malformed."""
    m = re.match(r"^[\s\W_]*(yes|no)\b", text, flags=re.I)
    if not m:
        raise ValueError(f"expected YES or NO, got {text[:80]!r}")
    return m.group(1).lower() == "yes"


# ---------------------------------------------------------------------------------------------
# Requests per job


def vanilla_request(s: Sample, t: PromptTemplate = VANILLA_REASONING) -> TeacherRequest:
    if s.task != "vanilla":
        raise Skip(f"task {s.task!r}: vanilla reasoning needs a vanilla sample (use amodal reasoning)")
    fields = {"question": s.sentence, "gt_bbox": format_box(to_rel999(s.box, s.width, s.height))}
    return _request(s, t, fields, (Overlay(s.box, GREEN),))


def description_request(s: Sample, t: PromptTemplate = AMODAL_DESCRIPTION) -> TeacherRequest:
    category = s.category or s.sentence
    return _request(s, t, {"object_category": category}, (Overlay(s.box, GREEN),))


def verification_request(s: Sample, t: PromptTemplate = AMODAL_VERIFICATION) -> TeacherRequest:
    return _request(s, t, {"description": s.sentence}, (Overlay(s.box, RED, "TARGET"),))


def amodal_reasoning_request(s: Sample, t: PromptTemplate = AMODAL_REASONING) -> TeacherRequest:
    if s.task != "amodal":
        raise Skip(f"task {s.task!r}: amodal reasoning needs an amodal sample")
    if s.visible_box is None or is_degenerate(s.visible_box):
        raise Skip("no visible (modal) box: nothing to extend from")
    exp = expansion(s.visible_box, s.box)
    fields = {
        "question": s.sentence, "width": s.width, "height": s.height,
        "guidance_str": exp.guidance_str, "directions_str": exp.directions_str,
    }
    return _request(s, t, fields, (Overlay(s.box, GREEN), Overlay(s.visible_box, RED)))


# ---------------------------------------------------------------------------------------------
# Jobs


def vanilla_reasoning(samples: Sequence[Sample], teacher: Teacher, cache: ReplyCache, **kw: Any) -> JobResult:
    """Fig. 8: add the teacher's reasoning trace to each vanilla sample (D_G -> D_C)."""
    return run_job(samples, teacher, cache, VANILLA_REASONING, vanilla_request, parse_reasoning,
                   lambda s, z: replace(s, reasoning=z), **kw)


def amodal_descriptions(samples: Sequence[Sample], teacher: Teacher, cache: ReplyCache, **kw: Any) -> JobResult:
    """Fig. 9: replace each amodal sample's sentence with a generated referring expression."""
    def apply(s: Sample, d: str) -> Sample:
        return replace(s, sentence=d, meta={**s.meta, "orig_sentence": s.sentence})

    return run_job(samples, teacher, cache, AMODAL_DESCRIPTION, description_request, parse_description, apply, **kw)


def verify_descriptions(samples: Sequence[Sample], teacher: Teacher, cache: ReplyCache, **kw: Any) -> JobResult:
    """Fig. 10: keep the samples whose description the teacher confirms (YES)."""
    return run_job(samples, teacher, cache, AMODAL_VERIFICATION, verification_request, parse_verdict,
                   lambda s, ok: s if ok else None, **kw)


def amodal_reasoning(samples: Sequence[Sample], teacher: Teacher, cache: ReplyCache, **kw: Any) -> JobResult:
    """Fig. 11: add the occlusion-aware reasoning trace to each amodal sample (D_T -> D_A)."""
    return run_job(samples, teacher, cache, AMODAL_REASONING, amodal_reasoning_request, parse_reasoning,
                   lambda s, z: replace(s, reasoning=z), **kw)


def amodal_pipeline(samples: Sequence[Sample], teacher: Teacher, cache: ReplyCache, **kw: Any) -> JobResult:
    """Figs. 9 -> 10 -> 11 in sequence; failures and per-step stats are concatenated."""
    failures: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    cur: Sequence[Sample] = samples
    for step in (amodal_descriptions, verify_descriptions, amodal_reasoning):
        res = step(cur, teacher, cache, **kw)
        failures += res.failures
        steps.append(res.stats)
        cur = res.samples
    return JobResult(list(cur), failures, {"job": "amodal", "input": len(samples), "kept": len(cur), "steps": steps})


JOBS: dict[str, Callable[..., JobResult]] = {
    "vanilla": vanilla_reasoning,
    "amodal": amodal_pipeline,
    "amodal_description": amodal_descriptions,
    "amodal_verification": verify_descriptions,
    "amodal_reasoning": amodal_reasoning,
}


def make_teacher(config: TeacherConfig, teacher_class: str | None = None) -> Teacher:
    """The API teacher, or ``module:callable`` (e.g. the synthetic oracle) called without arguments."""
    if teacher_class:
        module, _, attr = teacher_class.partition(":")
        if not attr:
            raise InputError(f"teacher_class must be 'module:callable', got {teacher_class!r}")
        teacher = getattr(importlib.import_module(module), attr)()
    else:
        teacher = OpenAITeacher(config)
    if not isinstance(teacher, Teacher):
        raise TypeError(f"{teacher!r} does not implement Teacher (model attribute + complete(request))")
    return teacher


def write_job_outputs(output: str | Path, result: JobResult) -> dict[str, Any]:
    """``output`` manifest + ``<output>.failures.jsonl`` + ``<output>.stats.json``; returns the stats."""
    output = Path(output)
    write_manifest(output, result.samples)
    fail_path = output.with_name(output.name + ".failures.jsonl")
    tmp = fail_path.with_name(fail_path.name + ".tmp")
    tmp.write_text("".join(json.dumps(f, ensure_ascii=False) + "\n" for f in result.failures), encoding="utf-8")
    tmp.replace(fail_path)
    stats = {**result.stats, "output": str(output), "failures_file": str(fail_path)}
    output.with_name(output.name + ".stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return stats


def curate(
    manifest: str,
    output: str,
    job: Literal["vanilla", "amodal", "amodal_description", "amodal_verification", "amodal_reasoning"] = "vanilla",
    teacher: TeacherConfig = TeacherConfig(),
    teacher_class: str | None = None,
    cache: str | None = None,
    concurrency: int = 8,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Curate SFT data with a teacher VLM (paper Sec. 4.1, Appendix B) and write a manifest.

    Args:
        manifest: input JSONL manifest (vanilla samples for ``vanilla``, amodal ones otherwise).
        output: output manifest; ``<output>.failures.jsonl`` and ``<output>.stats.json`` go beside it.
        job: ``vanilla`` (Fig. 8), ``amodal`` (Figs. 9 -> 10 -> 11), or one amodal step alone.
        teacher: OpenAI-compatible endpoint, limits and prices (env vars fill model/url/key).
        teacher_class: ``module:callable`` building another Teacher, e.g. the synthetic oracle
            ``egm.curation.oracle:OracleTeacher`` (then ``teacher`` is unused).
        cache: reply cache (JSONL); default ``<output folder>/teacher_cache.jsonl``. Reruns reuse it.
        concurrency: requests in flight; also the most a kill can make a rerun pay for twice.
        limit: only the first ``limit`` samples (try a prompt on a few before paying for all).
        progress: show a progress bar.
    """
    samples = read_manifest(manifest)
    if limit is not None:
        samples = samples[:limit]
    t = make_teacher(teacher, teacher_class)
    cfg = getattr(t, "config", teacher)
    cache_path = Path(cache) if cache else Path(output).parent / "teacher_cache.jsonl"
    with ReplyCache(cache_path) as c:
        result = JOBS[job](samples, t, c, concurrency=concurrency, progress=progress,
                           price=(cfg.price_input_per_1m, cfg.price_output_per_1m))
    return write_job_outputs(output, result)
