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

Validation: every number is checked before use and every error names the file, the annotation
(index and id) and the field: image sizes (:func:`~egm.data.manifest.images_by_id`);
``amodal_bbox`` and ``bbox`` are 4 finite numbers with non-negative width and height, lying
within :data:`~egm.data.manifest.AMODAL_MAX_OUTSIDE` image sizes of the frame (further out is a
unit bug, not an object leaving the picture); ``visibility`` is a number in ``[0, 1]``. Each
sample then passes the manifest checks (:meth:`~egm.data.manifest.Sample.from_json`: the visible
box lies in the image and overlaps the amodal box).

The sentence is the category name (``"baseball bat"``, LVIS underscores replaced by spaces)
unless a curated description is given for the sample id ``f"tao_{annotation_id}"``.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from egm.boxes import clip_xyxy, iou
from egm.data.importing import import_annotations
from egm.data.manifest import AMODAL_MAX_OUTSIDE, ManifestError, Sample, finite_number, images_by_id


def _nonempty(b) -> bool:
    return b[2] > b[0] and b[3] > b[1]


def check_xywh(v: Any, width: int, height: int) -> list[float]:
    """A COCO ``[x, y, w, h]`` as an ``xyxy`` list of floats, or ``ValueError`` saying why not.

    Four finite numbers, ``w, h >= 0``, and the box within ``AMODAL_MAX_OUTSIDE`` image sizes
    of the frame on every side.
    """
    if not isinstance(v, (list, tuple)) or len(v) != 4:
        raise ValueError(f"must be [x, y, w, h], got {v!r:.60}")
    xs = [finite_number(x) for x in v]
    if any(x is None for x in xs):
        k = next(i for i, x in enumerate(xs) if x is None)
        raise ValueError(f"value {k} must be a finite number, got {v[k]!r:.40}")
    x, y, w, h = xs
    if w < 0 or h < 0:
        raise ValueError(f"negative width or height: {v!r:.60}")
    f = AMODAL_MAX_OUTSIDE
    box = [x, y, x + w, y + h]
    if box[0] < -f * width or box[1] < -f * height or box[2] > (1 + f) * width or box[3] > (1 + f) * height:
        raise ValueError(f"{v!r:.60} leaves the {width}x{height} image by more than {f:g}x its size")
    return box


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
    images = images_by_id(data, path)
    cats = {}
    for k, c in enumerate(data.get("categories", [])):
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not c["name"].strip():
            raise ManifestError(path, None, "name", "a category needs a non-empty string name", f"category #{k}")
        cats[c.get("id")] = c["name"].replace("_", " ")
    out: list[Sample] = []
    for i, ann in enumerate(data.get("annotations", [])):
        if not isinstance(ann, dict) or "id" not in ann:
            raise ManifestError(path, None, "id", "an annotation must be an object with an id", f"annotation #{i}")
        sid = f"tao_{ann['id']}"
        where = f"annotation #{i} (id {ann.get('id')!r:.40})"

        def err(field: str, msg: str) -> ManifestError:
            return ManifestError(path, None, field, msg, where)

        im = images.get(ann.get("image_id"))
        if im is None:
            raise err("image_id", f"image {ann.get('image_id')} not in 'images'")
        if ann.get("category_id") not in cats:
            raise err("category_id", f"category {ann.get('category_id')} not in 'categories'")
        if ann.get("amodal_bbox") is None:
            raise err("amodal_bbox", "missing")
        if only_described and sid not in descriptions:
            counts["skipped_undescribed"] += 1
            continue
        W, H = im["width"], im["height"]
        checked = {}
        for f in ("amodal_bbox", "bbox"):
            try:
                checked[f] = None if ann.get(f) is None else check_xywh(ann[f], W, H)
            except ValueError as e:
                raise err(f, str(e)) from None
        raw, modal = checked["amodal_bbox"], checked["bbox"]
        vis_raw = ann.get("visibility")
        if vis_raw is not None and (finite_number(vis_raw) is None or not 0.0 <= vis_raw <= 1.0):
            raise err("visibility", f"must be a number in [0, 1], got {vis_raw!r:.40}")
        box = list(clip_xyxy(raw, W, H))
        if not _nonempty(box):
            counts["skipped_outside"] += 1
            continue
        if vis_raw is not None:
            visibility = float(vis_raw)
        else:  # TAO-Amodal's heuristic: IoU(modal, amodal), 0 without a modal box
            visibility = 0.0 if modal is None else iou(modal, raw)
        if visibility > max_visibility:
            counts["skipped_visible"] += 1
            continue
        vis = None
        if modal is not None:
            vis = list(clip_xyxy(modal, W, H))
        if vis is None or not _nonempty(vis):
            if not keep_invisible:
                counts["skipped_invisible"] += 1
                continue
            vis = [0.0, 0.0, 0.0, 0.0]
        out.append(
            Sample.from_json(dict(
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
            ), path=path, record=where)
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
    return import_annotations(tao_amodal_samples, annotation_json, out, descriptions, image_dir=image_dir, split=split,
                              keep_invisible=keep_invisible, max_visibility=max_visibility, only_described=only_described)
