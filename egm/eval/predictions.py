"""Per-split predictions JSONL: appended record by record, readable after a kill, resumable.

Each line is one evaluated sample, an :class:`egm.scoring.Prediction` (fields of
:data:`egm.scoring.PREDICTION_FIELDS`); :func:`read_predictions` reads a file back as records,
validated. The writer flushes every
record, so a killed run leaves at most one partial last line; :func:`read_jsonl` ignores such a
line and :class:`JsonlAppender` cuts it off before appending, so a rerun resumes cleanly and skips
the ids already present. A malformed line *before* the last one is real corruption and raises
with the file and line number (fail loudly at the edge).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from egm.boxes import success
from egm.data.manifest import ManifestError
from egm.scoring import Prediction

def _split_lines(data: bytes) -> tuple[list[tuple[int, bytes]], bytes, int]:
    """Complete lines with their start offsets, the trailing partial chunk, and its offset."""
    lines, start = [], 0
    while True:
        nl = data.find(b"\n", start)
        if nl < 0:
            return lines, data[start:], start
        lines.append((start, data[start:nl]))
        start = nl + 1


def scan_jsonl(path: str | os.PathLike) -> tuple[list[tuple[int, dict[str, Any]]], int]:
    """Parse a JSONL file -> ``([(line_number, record), ...], byte length of its valid prefix)``.

    Blank lines are skipped; a partial last line (a killed writer) is ignored; a malformed line
    before it raises :class:`~egm.data.manifest.ManifestError` naming the file and line.
    """
    path = Path(path)
    data = path.read_bytes()
    lines, tail, _ = _split_lines(data)
    records: list[tuple[int, dict[str, Any]]] = []
    good_end = 0
    for n, (offset, raw) in enumerate(lines, start=1):
        if not raw.strip():
            good_end = offset + len(raw) + 1
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ManifestError(path, n, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ManifestError(path, n, None, f"expected a JSON object, got {type(obj).__name__}")
        records.append((n, obj))
        good_end = offset + len(raw) + 1
    if tail.strip():
        try:
            obj = json.loads(tail)
        except json.JSONDecodeError:
            return records, good_end  # partial last line from a kill: ignored
        if isinstance(obj, dict):
            records.append((len(lines) + 1, obj))
            return records, len(data)  # complete record missing only its newline
    return records, good_end


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete records of a JSONL file ([] when it does not exist); a partial last line is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    return [r for _, r in scan_jsonl(path)[0]]


def _box_or_none(v: Any, path: Path, n: int, name: str) -> list[float] | None:
    if v is None:
        return None
    if not isinstance(v, (list, tuple)) or len(v) != 4 or not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v
    ):
        raise ManifestError(path, n, name, f"must be null or 4 finite numbers, got {v!r}")
    return [float(x) for x in v]


def read_predictions(path: str | os.PathLike) -> dict[str, Prediction]:
    """A prediction JSONL file -> ``{id: Prediction}`` (file order); errors name file, line, field.

    ``id`` and ``iou`` are required, everything else optional (a reference model's file may come
    from another evaluator): ``iou: null`` (no box, image error) reads as 0, a missing ``success``
    as ``iou > 0.5``, boxes must be null or 4 finite numbers. An id twice is an error (the
    evaluator writes each id once). A partial last line (a killed evaluation) is ignored.
    """
    path = Path(path)
    out: dict[str, Prediction] = {}
    for n, obj in scan_jsonl(path)[0]:
        pid = obj.get("id")
        if not isinstance(pid, str) or not pid:
            raise ManifestError(path, n, "id", f"must be a non-empty string, got {pid!r}")
        if pid in out:
            raise ManifestError(path, n, "id", f"duplicate id {pid!r}")
        if "iou" not in obj:
            raise ManifestError(path, n, "iou", "missing")
        iou = 0.0 if obj["iou"] is None else obj["iou"]
        if isinstance(iou, bool) or not isinstance(iou, (int, float)) or not math.isfinite(iou):
            raise ManifestError(path, n, "iou", f"must be a finite number or null, got {iou!r}")
        ok = obj.get("success")
        if ok is None:
            ok = success(float(iou))
        elif not isinstance(ok, bool):
            raise ManifestError(path, n, "success", f"must be true/false, got {ok!r}")
        sentence = obj.get("sentence")
        out[pid] = Prediction.from_json({
            **obj, "iou": float(iou), "success": ok,
            "pred_box": _box_or_none(obj.get("pred_box"), path, n, "pred_box"),
            "gt_box": _box_or_none(obj.get("gt_box"), path, n, "gt_box"),
            "sentence": sentence if isinstance(sentence, str) else None,
            "parse_failure": bool(obj.get("parse_failure")),
        })
    return out


class JsonlAppender:
    """Append-only JSONL store keyed by ``id`` that resumes after a kill.

    On open the file is scanned, a partial last line is truncated away (and a complete last record
    missing its newline gets one), so that new records always start on a fresh line.

    ``retry(record) -> bool`` marks records to be asked again (the evaluator passes
    :func:`is_image_error`: an image that was missing may have been restored since). Those are
    removed on open by rewriting the file without them (temp file, fsync, rename: a kill leaves
    the old or the new file, never a mix), so every id still has exactly one record.

    >>> with JsonlAppender(path) as w:          # doctest: +SKIP
    ...     if "a1" not in w.done_ids: w.append({"id": "a1", ...})
    """

    def __init__(self, path: str | os.PathLike, retry: Callable[[dict[str, Any]], bool] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict[str, Any]] = []
        self.retried = 0  # records dropped on open by ``retry``
        if self.path.exists():
            numbered, good_end = scan_jsonl(self.path)
            self.records = [r for _, r in numbered]
            if retry is not None and any(retry(r) for r in self.records):
                keep = [r for r in self.records if not retry(r)]
                self.retried = len(self.records) - len(keep)
                _rewrite(self.path, keep)
                self.records, good_end = keep, self.path.stat().st_size
            size = self.path.stat().st_size
            with open(self.path, "r+b") as fh:
                if good_end < size:
                    fh.truncate(good_end)
                if good_end > 0:
                    fh.seek(good_end - 1)
                    if fh.read(1) != b"\n":
                        fh.seek(0, os.SEEK_END)
                        fh.write(b"\n")
        self.done_ids: set[str] = {str(r["id"]) for r in self.records}
        self._fh = open(self.path, "a", encoding="utf-8")

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one record as a single line and flush it (a kill loses at most this line)."""
        line = json.dumps(dict(record), ensure_ascii=False) + "\n"
        self._fh.write(line)
        self._fh.flush()
        self.records.append(dict(record))
        self.done_ids.add(str(record["id"]))

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_image_error(record: Mapping[str, Any]) -> bool:
    """A record written because the sample's image could not be read (retried on a rerun)."""
    return record.get("failure") == "image_error"


def _rewrite(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
