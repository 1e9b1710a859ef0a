"""Evaluation driver: generate -> parse -> score -> append, then the latency pass, then results.json.

The model side is a plain callable so that any backend (HF generate, vLLM, a remote endpoint, a
test fake) plugs in::

    generate_fn(examples: list[dict]) -> list[GenerationOutput]   # same length and order

Each example dict carries ``id``, ``image`` (a loaded RGB :class:`PIL.Image.Image`), ``sentence``,
``task``, ``width``, ``height`` and ``sample`` (the :class:`~egm.data.manifest.Sample`); the
adapter builds its prompt from them (paper Figure 7) and decodes with the Table 7 settings.

Output layout under ``out_dir``::

    predictions/<split>.jsonl   one record per sample (egm.eval.predictions), resumable
    latency/<split>.jsonl       {id, latency_ms, num_tokens} of the batch-1 latency pass, resumable
    results.json                per-split metrics, benchmark summary, latency, model name, #params

A rerun with the same ``out_dir`` skips every id already recorded, so a killed evaluation
continues where it stopped. Samples whose image is missing or corrupt are recorded as failures
(``failure="image_error"``) and never reach the generator; a rerun asks for them again (the
image may have been restored), replacing their record, so a fixed image is never counted as a
failure forever.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

from egm.answers import parse_answer
from egm.data.manifest import Sample, read_manifest
from egm.errors import InputError
from egm.eval.benchmarks import canonical_split, refcoco_splits_in
from egm.eval.latency import Clock, latency_stats, latency_subset, timed_call
from egm.eval.metrics import split_metrics, summarize
from egm.eval.predictions import JsonlAppender, is_image_error
from egm.scoring import Prediction, sample_fields, score_answer

log = logging.getLogger(__name__)

RESULTS_VERSION = 1


@dataclass
class GenerationOutput:
    """One generated answer: the decoded text and the number of generated tokens."""

    text: str
    num_tokens: int | None = None


GenerateFn = Callable[[list[dict[str, Any]]], Sequence[GenerationOutput]]
ParseFn = Callable[[str, int, int], Any]


def default_parse_fn(text: str, width: int, height: int) -> Any:
    """:func:`egm.answers.parse_answer` with family auto-detection."""
    return parse_answer(text, width, height, family="auto")


def open_rgb(path: str) -> Image.Image:
    """Open an image fully decoded in RGB (raises on a missing or corrupt file)."""
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def _as_output(o: Any) -> GenerationOutput:
    if isinstance(o, GenerationOutput):
        return o
    if isinstance(o, str):
        return GenerationOutput(o, None)
    return GenerationOutput(str(o.text), getattr(o, "num_tokens", None))


def score_sample(sample: Sample, split: str, text: str, parse_fn: ParseFn, **fields: Any) -> Prediction:
    """Parse one answer and score it with :func:`egm.scoring.score_answer` (never raises on a bad answer)."""
    try:
        sc = score_answer(parse_fn(text, sample.width, sample.height), sample.box)
    except Exception as e:  # a parser must not kill the run: count the sample as a failure
        return Prediction(**sample_fields(sample, split), iou=0.0, success=False, parse_failure=True,
                          failure="parse_error", error=f"{type(e).__name__}: {e}", answer=text, **fields)
    return Prediction.of(sample, split, text, sc, **fields)


def image_failure_record(sample: Sample, split: str, err: BaseException) -> Prediction:
    """Prediction record of a sample whose image could not be read: IoU 0, counted as a failure."""
    return Prediction(**sample_fields(sample, split), iou=0.0, success=False, failure="image_error",
                      error=f"{type(err).__name__}: {err}", batch_size=0)


def make_example(sample: Sample, image: Image.Image) -> dict[str, Any]:
    """The dict handed to ``generate_fn`` for one sample."""
    return {"id": sample.id, "image": image, "sentence": sample.sentence, "task": sample.task,
            "width": sample.width, "height": sample.height, "sample": sample}


def resolve_splits(splits: Mapping[str, Sequence[Sample] | str | os.PathLike]) -> dict[str, list[Sample]]:
    """Split name -> samples; a manifest path is read and validated here (fail at the edge)."""
    out: dict[str, list[Sample]] = {}
    for name, src in splits.items():
        samples = read_manifest(src) if isinstance(src, (str, os.PathLike)) else list(src)
        ids = [s.id for s in samples]
        if len(set(ids)) != len(ids):
            raise InputError(f"split {name!r}: duplicate sample ids")
        out[canonical_split(name)] = samples
    return out


def _load_batch(batch: Sequence[Sample], loader: Callable[[str], Image.Image]):
    ok, failed = [], []
    for s in batch:
        try:
            ok.append((s, loader(s.image)))
        except Exception as e:  # missing / corrupt / unreadable image: recorded, not fatal
            failed.append((s, e))
    return ok, failed


def predict_split(
    generate_fn: GenerateFn,
    samples: Sequence[Sample],
    path: str | os.PathLike,
    split: str,
    batch_size: int = 8,
    parse_fn: ParseFn = default_parse_fn,
    clock: Clock = time.perf_counter,
    loader: Callable[[str], Image.Image] = open_rgb,
) -> list[dict[str, Any]]:
    """Append one prediction record per sample not yet in ``path``; returns all records of the split."""
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    with JsonlAppender(path, retry=is_image_error) as store:
        todo = [s for s in samples if s.id not in store.done_ids]
        log.info("%s: %d done, %d to go (%d image errors retried)", split, len(samples) - len(todo), len(todo),
                 store.retried)
        for start in range(0, len(todo), batch_size):
            ok, failed = _load_batch(todo[start:start + batch_size], loader)
            for s, err in failed:
                log.warning("%s: image of %s unreadable: %s", split, s.id, err)
                store.append(image_failure_record(s, split, err).to_json())
            if not ok:
                continue
            outs, ms = timed_call(lambda: generate_fn([make_example(s, im) for s, im in ok]), clock)
            outs = [_as_output(o) for o in outs]
            if len(outs) != len(ok):
                raise RuntimeError(f"generate_fn returned {len(outs)} outputs for {len(ok)} examples")
            for (s, _), out in zip(ok, outs):
                store.append(score_sample(s, split, out.text, parse_fn, num_tokens=out.num_tokens,
                                          latency_ms=ms / len(ok), batch_size=len(ok)).to_json())
        wanted = {s.id for s in samples}
        return [r for r in store.records if r["id"] in wanted]


def measure_latency(
    generate_fn: GenerateFn,
    samples: Sequence[Sample],
    path: str | os.PathLike,
    clock: Clock = time.perf_counter,
    loader: Callable[[str], Image.Image] = open_rgb,
    warmup: int = 1,
) -> list[dict[str, Any]]:
    """Time ``generate_fn`` one sample at a time (batch size 1) and append ``{id, latency_ms, num_tokens}``.

    The image is loaded before the clock starts; the timed span is prompt -> whole answer.
    ``warmup`` untimed calls precede the first timed one (CUDA context, kernels, caches).
    """
    with JsonlAppender(path) as store:
        todo = [s for s in samples if s.id not in store.done_ids]
        warm_left = warmup if todo else 0
        for s in todo:
            try:
                example = make_example(s, loader(s.image))
            except Exception as e:
                log.warning("latency: image of %s unreadable, skipped: %s", s.id, e)
                continue
            while warm_left > 0:
                generate_fn([example])
                warm_left -= 1
            outs, ms = timed_call(lambda: generate_fn([example]), clock)
            out = _as_output(outs[0])
            store.append({"id": s.id, "latency_ms": ms, "num_tokens": out.num_tokens})
        wanted = {s.id for s in samples}
        return [r for r in store.records if r["id"] in wanted]


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def evaluate(
    generate_fn: GenerateFn,
    splits: Mapping[str, Sequence[Sample] | str | os.PathLike],
    out_dir: str | os.PathLike,
    batch_size: int = 8,
    latency_fraction: float = 0.1,
    seed: int = 0,
    num_gpus: int = 1,
    parse_fn: ParseFn = default_parse_fn,
    model_name: str = "model",
    n_params: int | None = None,
    latency_splits: Sequence[str] | None = None,
    latency_warmup: int = 1,
    clock: Clock = time.perf_counter,
    loader: Callable[[str], Image.Image] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate ``generate_fn`` on ``splits`` and write ``out_dir/results.json`` (returned as a dict).

    ``extra`` adds top-level entries to results.json: ``device`` (what the model ran on,
    ``egm.eval.checkpoint.device_info``, so that a report says what a latency was measured on),
    ``reasoning_budget`` (``egm.eval.budget``).

    ``latency_splits`` defaults to the RefCOCO splits being evaluated (Sec. 5.2), or every split
    when none is RefCOCO; ``latency_fraction=0`` skips the latency pass. ``loader`` defaults to
    :func:`open_rgb` with a small per-run LRU cache (RefCOCO has several sentences per image).
    """
    out = Path(out_dir)
    data = resolve_splits(splits)
    loader = loader or functools.lru_cache(maxsize=32)(open_rgb)
    metrics = {}
    for name, samples in data.items():
        records = predict_split(generate_fn, samples, out / "predictions" / f"{name}.jsonl", name,
                                batch_size=batch_size, parse_fn=parse_fn, clock=clock, loader=loader)
        metrics[name] = split_metrics(records, split=name)
        log.info("%s: acc %.4f over %d", name, metrics[name].accuracy, metrics[name].n)

    latency: dict[str, Any] | None = None
    if latency_fraction > 0:
        lat_names = [canonical_split(n) for n in latency_splits] if latency_splits is not None else (
            refcoco_splits_in(data) or list(data))
        pooled: list[dict[str, Any]] = []
        per_split: dict[str, Any] = {}
        for name in lat_names:
            by_id = {s.id: s for s in data[name]}
            subset = [by_id[i] for i in latency_subset(list(by_id), latency_fraction, seed, key=name)]
            recs = measure_latency(generate_fn, subset, out / "latency" / f"{name}.jsonl",
                                   clock=clock, loader=loader, warmup=latency_warmup)
            stats = latency_stats([r["latency_ms"] for r in recs], [r.get("num_tokens") for r in recs], num_gpus)
            per_split[name] = stats.to_json() if stats else None
            pooled += recs
        stats = latency_stats([r["latency_ms"] for r in pooled], [r.get("num_tokens") for r in pooled], num_gpus)
        latency = {**(stats.to_json() if stats else {"n": 0}), "fraction": latency_fraction, "seed": seed,
                   "batch_size": 1, "splits": per_split}

    results = {
        "version": RESULTS_VERSION,
        "model": model_name,
        "n_params": n_params,
        "num_gpus": num_gpus,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {"batch_size": batch_size, "latency_fraction": latency_fraction, "seed": seed},
        "splits": {k: m.to_json() for k, m in metrics.items()},
        "summary": summarize(metrics),
        "latency": latency,
    }
    results.update(extra or {})
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "results.json", results)
    return results
