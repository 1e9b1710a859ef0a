"""The EGM JSONL manifest: one grounding sample per line.

Every dataset EGM reads (RefCOCO/+/g, COCO-Amodal, TAO-Amodal, curated traces, the synthetic
world) is first imported into this one format, so the datamodules, the evaluator and the
curation jobs never see dataset-specific layouts.

Fields of one line (JSON object)
--------------------------------
==============  ========  ===================================================================
field           type      meaning
==============  ========  ===================================================================
id              str       unique sample id (one per referring sentence)
image           str       image path; relative paths are resolved against the manifest's folder
width, height   int       image size in pixels (boxes are validated against it)
sentence        str       the referring expression
task            str       ``vanilla`` or ``amodal``
box             [4 num]   target box, pixel ``xyxy`` (for ``amodal``: the full, amodal box)
visible_box     [4 num]   amodal only, optional: the visible (modal) part, pixel ``xyxy``
split           str       e.g. ``train``, ``val``, ``refcoco_unc_testA``
source          str       where it came from: ``refcoco``, ``cocoa``, ``tao_amodal``, ``synthetic``
reasoning       str       optional reasoning trace (SFT target before the answer)
category        str       optional object category
meta            object    optional free-form extras (difficulty, ann_id, ...)
==============  ========  ===================================================================

Amodal boxes may extend past the image (TAO-Amodal objects leave the frame); vanilla boxes must
lie inside it (a tolerance of one pixel absorbs COCO's float rounding).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("vanilla", "amodal")
_REQUIRED = ("id", "image", "width", "height", "sentence", "task", "box", "split", "source")
_OPTIONAL = ("visible_box", "reasoning", "category", "meta")
_EDGE_TOLERANCE = 1.0


class ManifestError(ValueError):
    """A manifest line failed validation; the message names file, line and field."""

    def __init__(self, path: str | os.PathLike | None, line: int | None, field_name: str | None, msg: str):
        self.path, self.line, self.field = (str(path) if path else None), line, field_name
        where = f"{self.path or '<memory>'}" + (f":{line}" if line else "")
        super().__init__(f"{where}: field '{field_name}': {msg}" if field_name else f"{where}: {msg}")


@dataclass
class Sample:
    """One grounding sample (see module docstring for the field meanings)."""

    id: str
    image: str
    width: int
    height: int
    sentence: str
    task: str
    box: list[float]
    split: str
    source: str
    visible_box: list[float] | None = None
    reasoning: str | None = None
    category: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: v for k, v in d.items() if not (k in _OPTIONAL and v in (None, {}))}

    @classmethod
    def from_json(cls, obj: Any, *, path=None, line: int | None = None) -> "Sample":
        """Validate a decoded JSON object and build a sample, or raise :class:`ManifestError`."""

        def err(f, m):
            return ManifestError(path, line, f, m)

        if not isinstance(obj, dict):
            raise err(None, f"expected a JSON object, got {type(obj).__name__}")
        for f in _REQUIRED:
            if f not in obj:
                raise err(f, "missing")
        unknown = set(obj) - set(_REQUIRED) - set(_OPTIONAL)
        if unknown:
            raise err(sorted(unknown)[0], "unknown field")
        for f in ("id", "image", "sentence", "split", "source"):
            if not isinstance(obj[f], str) or not obj[f].strip():
                raise err(f, f"must be a non-empty string, got {obj[f]!r}")
        for f in ("width", "height"):
            v = obj[f]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise err(f, f"must be a positive integer, got {v!r}")
        if obj["task"] not in TASKS:
            raise err("task", f"must be one of {TASKS}, got {obj['task']!r}")
        box = _check_box(obj["box"], "box", err)
        W, H = obj["width"], obj["height"]
        if obj["task"] == "vanilla":
            t = _EDGE_TOLERANCE
            if box[0] < -t or box[1] < -t or box[2] > W + t or box[3] > H + t:
                raise err("box", f"{box} lies outside the {W}x{H} image")
        vis = obj.get("visible_box")
        if vis is not None:
            if obj["task"] != "amodal":
                raise err("visible_box", "only amodal samples have a visible box")
            vis = _check_box(vis, "visible_box", err, allow_empty=True)
        for f in ("reasoning", "category"):
            if obj.get(f) is not None and not isinstance(obj[f], str):
                raise err(f, f"must be a string, got {type(obj[f]).__name__}")
        meta = obj.get("meta") or {}
        if not isinstance(meta, dict):
            raise err("meta", "must be an object")
        return cls(
            id=obj["id"], image=obj["image"], width=W, height=H, sentence=obj["sentence"],
            task=obj["task"], box=box, split=obj["split"], source=obj["source"], visible_box=vis,
            reasoning=obj.get("reasoning"), category=obj.get("category"), meta=meta,
        )


def _check_box(v, name, err, allow_empty=False) -> list[float]:
    if not isinstance(v, (list, tuple)) or len(v) != 4:
        raise err(name, f"must be a list of 4 numbers, got {v!r}")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise err(name, f"must be numbers, got {v!r}")
    if not all(math.isfinite(x) for x in v):
        raise err(name, f"has a non-finite coordinate: {v!r}")
    x1, y1, x2, y2 = (float(x) for x in v)
    if x2 < x1 or y2 < y1 or (not allow_empty and (x2 == x1 or y2 == y1)):
        raise err(name, f"must be xyxy with x1<x2 and y1<y2, got {v!r}")
    return [x1, y1, x2, y2]


def iter_manifest(path: str | os.PathLike, *, resolve_images: bool = True) -> Iterator[Sample]:
    """Yield validated samples of a JSONL manifest; blank lines are skipped.

    Image paths that are relative are made absolute against the manifest's folder (so a
    manifest and its images can move together). Raises :class:`ManifestError` on the first bad
    line with file, line number and field.
    """
    path = Path(path)
    root = path.parent
    with open(path, encoding="utf-8") as fh:
        for n, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ManifestError(path, n, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
            s = Sample.from_json(obj, path=path, line=n)
            if resolve_images and not os.path.isabs(s.image):
                s.image = str(root / s.image)
            yield s


def read_manifest(path: str | os.PathLike, *, resolve_images: bool = True) -> list[Sample]:
    """Read and validate a whole manifest; ids must be unique within it."""
    out, seen = [], {}
    for s in iter_manifest(path, resolve_images=resolve_images):
        if s.id in seen:
            raise ManifestError(path, None, "id", f"duplicate id {s.id!r}")
        seen[s.id] = True
        out.append(s)
    return out


def write_manifest(path: str | os.PathLike, samples: Iterable[Sample], *, relative_to_dir: bool = True) -> int:
    """Write samples atomically (temp file + rename); returns the number written.

    With ``relative_to_dir`` image paths under the manifest's folder are stored relative to it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for s in samples:
            d = s.to_json()
            if relative_to_dir and os.path.isabs(d["image"]):
                try:
                    d["image"] = os.path.relpath(d["image"], path.parent.resolve())
                except ValueError:
                    pass
                if d["image"].startswith(".."):
                    d["image"] = s.image
            fh.write(json.dumps(d, ensure_ascii=False) + "\n")
            n += 1
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return n
