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

Bounds, checked on every line (numbers are checked before anything computes with them)
-------------------------------------------------------------------------------------------
* ``width``/``height`` are integers in ``[1, MAX_IMAGE_SIDE]``; box coordinates are finite
  JSON numbers (``true``, ``"1"``, ``NaN``, ``1e400`` and 400-digit integers are rejected).
* A vanilla ``box`` lies inside the image (a tolerance of one pixel absorbs COCO's float
  rounding).
* An amodal ``box`` may leave the frame (TAO-Amodal objects do), by at most
  :data:`AMODAL_MAX_OUTSIDE` times the image size on each side: with the default 1.0, inside
  ``[-W, 2W] x [-H, 2H]``. Further out is a unit or format bug, not an occluded object.
* ``visible_box`` lies inside the image (same one-pixel tolerance) and, unless it is empty
  (``[0, 0, 0, 0]`` marks a fully hidden object), overlaps ``box`` with a positive area.
* ``meta`` is a JSON object (or absent / ``null``); ``[]`` or ``0`` reject the line.

Reading: a file must be UTF-8 JSON Lines; a line that is not (bad bytes, invalid JSON, nesting
deeper than the JSON decoder allows, an integer of more than 4300 digits) raises
:class:`ManifestError` with file and line. Duplicate ids name both lines. A manifest without a
single sample (empty or whitespace only) is read as ``[]`` with a :class:`EmptyManifestWarning`
naming the file: empty manifests are legitimate (the synthetic world writes one per difficulty,
some of them empty), but reading one is never silent; consumers that cannot work on nothing
(the train sampler) then raise.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from egm.config_checks import finite_number
from egm.errors import InputError

TASKS = ("vanilla", "amodal")
_REQUIRED = ("id", "image", "width", "height", "sentence", "task", "box", "split", "source")
_OPTIONAL = ("visible_box", "reasoning", "category", "meta")
_EDGE_TOLERANCE = 1.0
#: Largest image side accepted (JPEG's own limit is 65,535; anything bigger is a corrupt size).
MAX_IMAGE_SIDE = 1 << 16
#: How far an amodal box may leave the frame, as a fraction of the image size, on each side.
AMODAL_MAX_OUTSIDE = 1.0


class ManifestError(InputError):
    """A manifest line failed validation; the message names file, line and field."""

    def __init__(self, path: str | os.PathLike | None, line: int | None, field_name: str | None, msg: str,
                 record: str | None = None):
        self.path, self.line, self.field = (str(path) if path else None), line, field_name
        self.record = record  # e.g. "annotation 123" for an importer's source json (no line there)
        where = f"{self.path or '<memory>'}" + (f":{line}" if line else "")
        msg = " ".join(str(msg).split())  # always one line: a log or terminal shows it whole
        msg = f"{record}: {msg}" if record else msg
        super().__init__(f"{where}: field '{field_name}': {msg}" if field_name else f"{where}: {msg}")


class EmptyManifestWarning(UserWarning):
    """A manifest held no sample (see the module docstring)."""


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
    def from_json(cls, obj: Any, *, path=None, line: int | None = None, record: str | None = None) -> "Sample":
        """Validate a decoded JSON object and build a sample, or raise :class:`ManifestError`.

        Importers build their samples through here too (``record`` names the source annotation),
        so a dataset file and a manifest pass the same checks (module docstring).
        """

        def err(f, m):
            return ManifestError(path, line, f, m, record)

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
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_IMAGE_SIDE:
                raise err(f, f"must be an integer in [1, {MAX_IMAGE_SIDE}], got {_short(v)}")
        if obj["task"] not in TASKS:
            raise err("task", f"must be one of {TASKS}, got {_short(obj['task'])}")
        box = _check_box(obj["box"], "box", err)
        W, H = obj["width"], obj["height"]
        t = _EDGE_TOLERANCE
        if obj["task"] == "vanilla":
            if not _inside(box, -t, -t, W + t, H + t):
                raise err("box", f"{box} lies outside the {W}x{H} image")
        else:
            f = AMODAL_MAX_OUTSIDE
            if not _inside(box, -f * W, -f * H, (1 + f) * W, (1 + f) * H):
                raise err("box", f"{box} leaves the {W}x{H} image by more than {f:g}x its size "
                                 f"(amodal boxes must lie in [{-f * W:g}, {(1 + f) * W:g}] x [{-f * H:g}, {(1 + f) * H:g}])")
        vis = obj.get("visible_box")
        if vis is not None:
            if obj["task"] != "amodal":
                raise err("visible_box", "only amodal samples have a visible box")
            vis = _check_box(vis, "visible_box", err, allow_empty=True)
            if not _inside(vis, -t, -t, W + t, H + t):
                raise err("visible_box", f"{vis} lies outside the {W}x{H} image (the visible part is in the image)")
            empty = vis[2] == vis[0] or vis[3] == vis[1]
            if not empty and (min(vis[2], box[2]) <= max(vis[0], box[0]) or min(vis[3], box[3]) <= max(vis[1], box[1])):
                raise err("visible_box", f"{vis} does not overlap box {box} (the visible part is part of the object)")
        for f in ("reasoning", "category"):
            if obj.get(f) is not None and not isinstance(obj[f], str):
                raise err(f, f"must be a string, got {type(obj[f]).__name__}")
        meta = obj.get("meta")
        meta = {} if meta is None else meta
        if not isinstance(meta, dict):
            raise err("meta", f"must be a JSON object, got {type(meta).__name__} {_short(meta)}")
        return cls(
            id=obj["id"], image=obj["image"], width=W, height=H, sentence=obj["sentence"],
            task=obj["task"], box=box, split=obj["split"], source=obj["source"], visible_box=vis,
            reasoning=obj.get("reasoning"), category=obj.get("category"), meta=meta,
        )


def _short(v: Any, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters: a 400-digit number or a huge list stays readable."""
    try:
        r = repr(v)
    except ValueError:  # int repr beyond sys.get_int_max_str_digits
        return f"<{type(v).__name__} too large to print>"
    return r if len(r) <= limit else r[: limit - 3] + "..."




def _inside(b: list[float], x0: float, y0: float, x1: float, y1: float) -> bool:
    return b[0] >= x0 and b[1] >= y0 and b[2] <= x1 and b[3] <= y1


def _check_box(v, name, err, allow_empty=False) -> list[float]:
    if not isinstance(v, (list, tuple)) or len(v) != 4:
        raise err(name, f"must be a list of 4 numbers, got {_short(v)}")
    xs = [finite_number(x) for x in v]
    if any(x is None for x in xs):
        k = next(i for i, x in enumerate(xs) if x is None)
        raise err(name, f"coordinate {k} must be a finite number, got {_short(v[k])}")
    x1, y1, x2, y2 = xs
    if x2 < x1 or y2 < y1 or (not allow_empty and (x2 == x1 or y2 == y1)):
        raise err(name, f"must be xyxy with x1<x2 and y1<y2, got {_short(v)}")
    return [x1, y1, x2, y2]


def images_by_id(data: Any, path: str | os.PathLike | None) -> dict[Any, dict[str, Any]]:
    """The COCO-style ``images`` table of an importer's json, by id, every entry checked.

    Shared by the COCO-Amodal, TAO-Amodal and REFER importers: each image needs an ``id``, a
    non-empty ``file_name`` and integer ``width``/``height`` in ``[1, MAX_IMAGE_SIDE]`` (a
    negative height once reached pycocotools and raised ``OverflowError``).
    """
    if not isinstance(data, dict):
        raise ManifestError(path, None, None, f"expected a JSON object, got {type(data).__name__}")
    images = data.get("images", [])
    if not isinstance(images, list):
        raise ManifestError(path, None, "images", "must be a list")
    out = {}
    for i, im in enumerate(images):
        rec = f"image #{i} (id {_short(im.get('id') if isinstance(im, dict) else None, 40)})"
        if not isinstance(im, dict) or "id" not in im:
            raise ManifestError(path, None, "id", "missing (an image must be an object with an id)", rec)
        for f in ("width", "height"):
            v = im.get(f)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_IMAGE_SIDE:
                raise ManifestError(path, None, f, f"must be an integer in [1, {MAX_IMAGE_SIDE}], got {_short(v, 40)}", rec)
        if not isinstance(im.get("file_name"), str) or not im["file_name"]:
            raise ManifestError(path, None, "file_name", "must be a non-empty string", rec)
        out[im["id"]] = im
    return out


def decode_json(raw: bytes | str, path: str | os.PathLike | None, line: int | None = None) -> Any:
    """``json.loads`` whose every failure is a :class:`ManifestError` naming file and line.

    Covers what ``json`` itself reports without a location: bytes that are not UTF-8
    (``UnicodeDecodeError``), nesting deeper than the decoder's recursion limit
    (``RecursionError``) and integers over Python's 4300-digit limit (``ValueError``). For a
    whole file (``line=None``) the line is computed from the failing offset.
    """
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
            where = raw.count(b"\n", 0, e.start) + 1 if line is None else line
            raise ManifestError(path, where, None,
                                f"not UTF-8: byte 0x{raw[e.start]:02x} at column {col}") from None
    else:
        text = raw
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(path, e.lineno if line is None else line, None,
                            f"invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise ManifestError(path, line, None, "invalid JSON: nested too deeply") from None
    except ValueError as e:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise ManifestError(path, line, None, f"invalid JSON: {e}") from None


def read_json(path: str | os.PathLike) -> Any:
    """A whole JSON file (an importer's annotation file), with :func:`decode_json`'s errors."""
    with open(path, "rb") as fh:
        return decode_json(fh.read(), path)


def iter_manifest(path: str | os.PathLike, *, resolve_images: bool = True) -> Iterator[Sample]:
    """Yield validated samples of a JSONL manifest; blank lines are skipped.

    Image paths that are relative are made absolute against the manifest's folder (so a
    manifest and its images can move together). Raises :class:`ManifestError` on the first bad
    line with file, line number and field. (Streaming: an empty file yields nothing here;
    :func:`read_manifest` is the one that refuses it.)
    """
    for _, s in _numbered(path, resolve_images):
        yield s


def _numbered(path: str | os.PathLike, resolve_images: bool) -> Iterator[tuple[int, Sample]]:
    path = Path(path)
    root = path.parent
    n = 0
    with open(path, "rb") as fh:  # bytes: a non-UTF-8 line is reported with its number
        for n, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            s = Sample.from_json(decode_json(raw, path, n), path=path, line=n)
            if resolve_images and not os.path.isabs(s.image):
                s.image = str(root / s.image)
            yield n, s


def read_manifest(path: str | os.PathLike, *, resolve_images: bool = True) -> list[Sample]:
    """Read and validate a whole manifest; ids must be unique (an empty one warns: module docstring)."""
    out, seen = [], {}
    for n, s in _numbered(path, resolve_images):
        if s.id in seen:
            raise ManifestError(path, n, "id", f"duplicate id {_short(s.id)} (first on line {seen[s.id]})")
        seen[s.id] = n
        out.append(s)
    if not out:
        warnings.warn(f"{path}: no samples: the manifest is empty or only whitespace", EmptyManifestWarning,
                      stacklevel=2)
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
