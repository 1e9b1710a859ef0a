"""What the COCO-style importers (COCO-Amodal, TAO-Amodal) share: curated descriptions and the
read -> samples -> write pipeline of one annotation json."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from egm.data.manifest import ManifestError, Sample, decode_json, read_json, write_manifest


def import_annotations(
    to_samples: Callable[..., list[Sample]], annotation_json: str, out: str, descriptions: str | None, **options: Any
) -> dict[str, int]:
    """``to_samples(decoded json, descriptions=..., path=annotation_json, counts=..., **options)``
    -> the manifest ``out``; returns what it counted (``kept``, ``skipped_<why>``).

    ``descriptions``: a file of curated referring expressions (:func:`load_descriptions`) or None.
    """
    counts: Counter = Counter()
    if options.get("image_dir") is not None:  # a manifest resolves a relative image path against its own folder
        options["image_dir"] = os.path.abspath(options["image_dir"])
    samples = to_samples(read_json(annotation_json), descriptions=load_descriptions(descriptions),
                         path=annotation_json, counts=counts, **options)
    write_manifest(out, samples)
    return dict(counts)


def load_descriptions(path: str | os.PathLike | None) -> dict[str, str]:
    """Curated descriptions: a JSON object ``{sample_id: sentence}`` or JSONL of ``{"id", "sentence"}``."""
    if path is None:
        return {}
    raw = Path(path).read_bytes()
    try:
        whole = decode_json(raw, path)
    except ManifestError:
        whole = None
    if isinstance(whole, dict) and not ("id" in whole and "sentence" in whole):
        return {str(k): str(v) for k, v in whole.items()}
    out = {}
    for n, line in enumerate(raw.splitlines(), start=1):
        if line.strip():
            obj = decode_json(line, path, n)
            if not isinstance(obj, dict):
                raise ManifestError(path, n, None, f"expected a JSON object, got {type(obj).__name__}")
            if "id" not in obj or "sentence" not in obj:
                raise ManifestError(path, n, "id" if "id" not in obj else "sentence", "missing")
            out[obj["id"]] = obj["sentence"]
    return out
