"""Import TAO-Amodal (``amodal_annotations/{train,validation,test}.json``) into EGM amodal samples.

Per annotation: ``amodal_bbox`` ``[x, y, w, h]`` (may extend outside the frame: objects leave the
picture), ``bbox`` (the visible, modal box; absent when the object is fully invisible) and
``visibility`` (0..1).

Decisions (documented because they change the benchmark):

* **Target box clipped to the frame.** A model can only answer inside the image (the 0-1000
  scale of Qwen/InternVL saturates at the border), and TAO-Amodal's own visualisation clips the
  amodal box, so ``box`` = amodal box clipped to ``[0, W] x [0, H]``. The unclipped box is kept
  in ``meta["amodal_box_unclipped"]`` (and ``meta["out_of_frame"]``) for analysis.
* **Fully invisible objects are skipped** by default and counted (``skipped_invisible``): no
  pixel of the image locates them, so neither SFT traces nor the IoU reward can be grounded.
  ``keep_invisible=True`` keeps them with ``visible_box = [0, 0, 0, 0]``.
* An amodal box with no area left after clipping (entirely outside the frame) is skipped
  (``skipped_outside``).

The sentence is the category name (``"baseball bat"``, LVIS underscores replaced by spaces)
unless a curated description is given for the sample id ``f"tao_{annotation_id}"``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from egm.boxes import clip_xyxy, iou, xywh_to_xyxy
from egm.data.cocoa import load_descriptions
from egm.data.manifest import ManifestError, Sample, write_manifest


def _nonempty(b) -> bool:
    return b[2] > b[0] and b[3] > b[1]


def tao_amodal_samples(
    data: dict[str, Any],
    *,
    image_dir: str | os.PathLike,
    split: str,
    descriptions: dict[str, str] | None = None,
    keep_invisible: bool = False,
    max_visibility: float = 1.0,
    only_described: bool = False,
    path: str | os.PathLike | None = None,
    counts: Counter | None = None,
) -> list[Sample]:
    """Samples of a decoded TAO-Amodal json (see module docstring).

    ``max_visibility`` < 1 keeps only occluded objects (e.g. 0.8 = the "highly- and partially-
    occluded" bins of the TAO-Amodal evaluation). ``counts`` receives ``kept``,
    ``skipped_invisible``, ``skipped_outside``, ``skipped_visible``, ``skipped_undescribed``.
    """
    counts = Counter() if counts is None else counts
    descriptions = descriptions or {}
    images = {im["id"]: im for im in data.get("images", [])}
    cats = {c["id"]: c["name"].replace("_", " ") for c in data.get("categories", [])}
    out: list[Sample] = []
    for i, ann in enumerate(data.get("annotations", [])):
        sid = f"tao_{ann['id']}"

        def err(field: str, msg: str) -> ManifestError:
            return ManifestError(path, None, field, f"annotation #{i} (id {ann.get('id')}): {msg}")

        im = images.get(ann.get("image_id"))
        if im is None:
            raise err("image_id", f"image {ann.get('image_id')} not in 'images'")
        if ann.get("category_id") not in cats:
            raise err("category_id", f"category {ann.get('category_id')} not in 'categories'")
        if "amodal_bbox" not in ann:
            raise err("amodal_bbox", "missing")
        if only_described and sid not in descriptions:
            counts["skipped_undescribed"] += 1
            continue
        W, H = int(im["width"]), int(im["height"])
        raw = list(xywh_to_xyxy(ann["amodal_bbox"]))
        box = list(clip_xyxy(raw, W, H))
        if not _nonempty(box):
            counts["skipped_outside"] += 1
            continue
        if ann.get("visibility") is not None:
            visibility = float(ann["visibility"])
        else:  # TAO-Amodal's heuristic: IoU(modal, amodal), 0 without a modal box
            visibility = 0.0 if ann.get("bbox") is None else iou(xywh_to_xyxy(ann["bbox"]), raw)
        if visibility > max_visibility:
            counts["skipped_visible"] += 1
            continue
        vis = None
        if ann.get("bbox") is not None:
            vis = list(clip_xyxy(xywh_to_xyxy(ann["bbox"]), W, H))
        if vis is None or not _nonempty(vis):
            if not keep_invisible:
                counts["skipped_invisible"] += 1
                continue
            vis = [0.0, 0.0, 0.0, 0.0]
        out.append(
            Sample(
                id=sid,
                image=str(Path(image_dir) / im["file_name"]),
                width=W,
                height=H,
                sentence=descriptions.get(sid, cats[ann["category_id"]]),
                task="amodal",
                box=box,
                visible_box=vis,
                split=split,
                source="tao_amodal",
                category=cats[ann["category_id"]],
                meta={
                    "ann_id": ann["id"],
                    "image_id": ann["image_id"],
                    "track_id": ann.get("track_id"),
                    "video_id": ann.get("video_id", im.get("video_id")),
                    "visibility": visibility,
                    "amodal_box_unclipped": raw,
                    "out_of_frame": bool(ann.get("out_of_frame", raw != box)),
                    "amodal_is_uncertain": bool(ann.get("amodal_is_uncertain", False)),
                    "described": sid in descriptions,
                },
            )
        )
        counts["kept"] += 1
    return out


def import_tao_amodal(
    annotation_json: str,
    image_dir: str,
    out: str,
    split: str = "tao_amodal_val",
    descriptions: str | None = None,
    keep_invisible: bool = False,
    max_visibility: float = 1.0,
    only_described: bool = False,
) -> dict[str, int]:
    """Import one TAO-Amodal json into the manifest ``out``; returns the counts (kept/skipped)."""
    with open(annotation_json, encoding="utf-8") as fh:
        data = json.load(fh)
    counts: Counter = Counter()
    samples = tao_amodal_samples(
        data, image_dir=image_dir, split=split, descriptions=load_descriptions(descriptions),
        keep_invisible=keep_invisible, max_visibility=max_visibility, only_described=only_described,
        path=annotation_json, counts=counts,
    )
    write_manifest(out, samples)
    return dict(counts)
