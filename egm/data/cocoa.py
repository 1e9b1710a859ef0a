"""Import COCO-Amodal (``COCO_amodal_{train,val,test}2014.json``) into EGM amodal samples.

Each annotation holds the ``regions`` of one image; a region is one object (or stuff) with an
*amodal* polygon (``segmentation``: ONE flat list ``[x1, y1, x2, y2, ...]``) and, only when it is
occluded, a ``visible_mask`` RLE. Following the amodalAPI / deocclusion readers:

* amodal box = ``toBbox(merge(frPyObjects([segmentation], H, W)))`` (pycocotools rasterises the
  polygon, so the box is the pixel extent inside the image);
* visible box = ``toBbox(visible_mask)`` when present, else the amodal box (not occluded).

A region whose visible mask is empty is *fully* hidden: nothing in the image locates it, so it
is skipped by default and counted (``keep_invisible=True`` keeps it with ``visible_box`` =
``[0, 0, 0, 0]``).

The sentence is the region name (``"hot dog"``) unless a curated description is given for the
sample id (paper Sec. 4.1 / appendix B Fig. 9 generate such descriptions; the region name alone
rarely singles out one object).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from pycocotools import mask as mask_utils

from egm.boxes import xywh_to_xyxy
from egm.data.manifest import ManifestError, Sample, write_manifest


def polygon_box(segmentation: list[float], height: int, width: int) -> list[float]:
    """Pixel ``xyxy`` box of one flat amodal polygon, rasterised by pycocotools."""
    rle = mask_utils.merge(mask_utils.frPyObjects([segmentation], height, width))
    return list(xywh_to_xyxy(mask_utils.toBbox(rle).tolist()))


def rle_box(rle: dict[str, Any], height: int, width: int) -> list[float]:
    """Pixel ``xyxy`` box of an RLE mask (compressed string/bytes or uncompressed list counts).

    An empty mask gives ``[0, 0, 0, 0]``.
    """
    if isinstance(rle.get("counts"), list):
        rle = mask_utils.frPyObjects(rle, height, width)
    elif isinstance(rle.get("counts"), str):
        rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return list(xywh_to_xyxy(mask_utils.toBbox(rle).tolist()))


def cocoa_sample_id(image_id: int, region_index: int) -> str:
    """Regions have no id of their own: image id + index in ``regions`` is stable."""
    return f"cocoa_{image_id}_{region_index}"


def cocoa_samples(
    data: dict[str, Any],
    *,
    image_dir: str | os.PathLike,
    split: str,
    descriptions: dict[str, str] | None = None,
    keep_invisible: bool = False,
    include_stuff: bool = True,
    only_described: bool = False,
    path: str | os.PathLike | None = None,
    counts: Counter | None = None,
) -> list[Sample]:
    """Samples of a decoded COCO-Amodal json (see module docstring).

    ``descriptions`` maps sample id (:func:`cocoa_sample_id`) -> curated referring expression;
    with ``only_described`` regions without one are left out. ``counts`` (if given) receives
    ``kept``, ``skipped_invisible``, ``skipped_stuff``, ``skipped_undescribed``.
    """
    counts = Counter() if counts is None else counts
    descriptions = descriptions or {}
    images = {im["id"]: im for im in data.get("images", [])}
    out: list[Sample] = []
    for a_idx, ann in enumerate(data.get("annotations", [])):
        im = images.get(ann["image_id"])
        if im is None:
            raise ManifestError(path, None, "image_id", f"annotation #{a_idx}: image {ann['image_id']} not in 'images'")
        H, W = int(im["height"]), int(im["width"])
        for r_idx, reg in enumerate(ann.get("regions", [])):
            sid = cocoa_sample_id(ann["image_id"], r_idx)
            where = f"annotation #{a_idx} region #{r_idx} ({sid})"
            if reg.get("isStuff") and not include_stuff:
                counts["skipped_stuff"] += 1
                continue
            if only_described and sid not in descriptions:
                counts["skipped_undescribed"] += 1
                continue
            seg = reg.get("segmentation")
            if not isinstance(seg, list) or len(seg) < 6 or isinstance(seg[0], list):
                raise ManifestError(path, None, "segmentation", f"{where}: expected one flat polygon list")
            amodal = polygon_box(seg, H, W)
            if amodal[2] <= amodal[0] or amodal[3] <= amodal[1]:
                raise ManifestError(path, None, "segmentation", f"{where}: polygon has no area")
            if "visible_mask" in reg and reg["visible_mask"] is not None:
                visible = rle_box(reg["visible_mask"], H, W)
            else:
                visible = list(amodal)
            if visible[2] <= visible[0] or visible[3] <= visible[1]:
                if not keep_invisible:
                    counts["skipped_invisible"] += 1
                    continue
                visible = [0.0, 0.0, 0.0, 0.0]
            out.append(
                Sample(
                    id=sid,
                    image=str(Path(image_dir) / im["file_name"]),
                    width=W,
                    height=H,
                    sentence=descriptions.get(sid, reg["name"]),
                    task="amodal",
                    box=amodal,
                    visible_box=visible,
                    split=split,
                    source="cocoa",
                    category=reg["name"],
                    meta={
                        "image_id": ann["image_id"],
                        "ann_id": ann.get("id"),
                        "region_index": r_idx,
                        "order": reg.get("order"),
                        "occlude_rate": reg.get("occlude_rate", 0.0),
                        "is_stuff": bool(reg.get("isStuff", 0)),
                        "described": sid in descriptions,
                    },
                )
            )
            counts["kept"] += 1
    return out


def load_descriptions(path: str | os.PathLike | None) -> dict[str, str]:
    """Curated descriptions: a JSON object ``{sample_id: sentence}`` or JSONL of ``{"id", "sentence"}``."""
    if path is None:
        return {}
    text = Path(path).read_text(encoding="utf-8")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and not ("id" in whole and "sentence" in whole):
        return {str(k): str(v) for k, v in whole.items()}
    out = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            obj = json.loads(line)
            if "id" not in obj or "sentence" not in obj:
                raise ManifestError(path, n, "id" if "id" not in obj else "sentence", "missing")
            out[obj["id"]] = obj["sentence"]
    return out


def import_cocoa(
    annotation_json: str,
    image_dir: str,
    out: str,
    split: str = "cocoa_val",
    descriptions: str | None = None,
    keep_invisible: bool = False,
    include_stuff: bool = True,
    only_described: bool = False,
) -> dict[str, int]:
    """Import one COCO-Amodal json into the manifest ``out``; returns the counts (kept/skipped)."""
    with open(annotation_json, encoding="utf-8") as fh:
        data = json.load(fh)
    counts: Counter = Counter()
    samples = cocoa_samples(
        data, image_dir=image_dir, split=split, descriptions=load_descriptions(descriptions),
        keep_invisible=keep_invisible, include_stuff=include_stuff, only_described=only_described,
        path=annotation_json, counts=counts,
    )
    write_manifest(out, samples)
    return dict(counts)
