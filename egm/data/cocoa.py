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

Validation (the release is large and third-party; a bad number must fail here, named, not
inside pycocotools, where a single NaN polygon coordinate once grew the process to 24 GB):
every number is checked before it reaches numpy or pycocotools. Image sizes are integers in
``[1, MAX_IMAGE_SIDE]`` (:func:`~egm.data.manifest.images_by_id`); a polygon is an even-length
flat list of at least 6 finite numbers, each within
:data:`~egm.data.manifest.AMODAL_MAX_OUTSIDE` image sizes of the frame; a ``visible_mask`` is
an RLE whose ``size`` is the image's and whose run lengths (compressed string or list) are
non-negative and sum to ``H * W``. Each sample then passes the manifest checks
(:meth:`~egm.data.manifest.Sample.from_json`). Every error is one line naming the file, the
annotation (index and id), the region and the field.

The sentence is the region name (``"hot dog"``) unless a curated description is given for the
sample id (paper Sec. 4.1 / appendix B Fig. 9 generate such descriptions; the region name alone
rarely singles out one object).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from pycocotools import mask as mask_utils

from egm.boxes import xywh_to_xyxy
from egm.data.importing import import_annotations
from egm.data.manifest import AMODAL_MAX_OUTSIDE, ManifestError, Sample, finite_number, images_by_id


def polygon_box(segmentation: list[float], height: int, width: int) -> list[float]:
    """Pixel ``xyxy`` box of one flat amodal polygon, rasterised by pycocotools.

    Call :func:`check_polygon` first: pycocotools does not check its input (NaN -> a huge
    allocation or a segfault).
    """
    rle = mask_utils.merge(mask_utils.frPyObjects([segmentation], height, width))
    return list(xywh_to_xyxy(mask_utils.toBbox(rle).tolist()))


def rle_box(rle: dict[str, Any], height: int, width: int) -> list[float]:
    """Pixel ``xyxy`` box of an RLE mask (compressed string/bytes or uncompressed list counts).

    The RLE is validated first (:func:`check_rle`, ``ValueError``); an empty mask gives
    ``[0, 0, 0, 0]``.
    """
    rle = check_rle(rle, height, width)
    return list(xywh_to_xyxy(mask_utils.toBbox(rle).tolist()))


def check_polygon(seg: Any, height: int, width: int) -> list[float]:
    """A flat polygon ``[x1, y1, x2, y2, ...]`` as floats, or ``ValueError`` saying what is wrong.

    At least 3 points, an even count, finite numbers, each within ``AMODAL_MAX_OUTSIDE`` image
    sizes of the frame (an amodal polygon may leave the image, not by thousands of widths).
    """
    if not isinstance(seg, list) or (seg and isinstance(seg[0], list)):
        raise ValueError("expected one flat polygon list [x1, y1, x2, y2, ...]")
    if len(seg) < 6 or len(seg) % 2:
        raise ValueError(f"expected an even number (>= 6) of coordinates, got {len(seg)}")
    f = AMODAL_MAX_OUTSIDE
    out = []
    for i, v in enumerate(seg):
        x = finite_number(v)
        if x is None:
            raise ValueError(f"coordinate {i} must be a finite number, got {v!r:.40}")
        size = width if i % 2 == 0 else height
        if not -f * size <= x <= (1 + f) * size:
            raise ValueError(f"coordinate {i} = {x:g} is more than {f:g}x the image size outside the "
                             f"{width}x{height} image")
        out.append(x)
    return out


def _rle_string_counts(s: str) -> list[int]:
    """Run lengths of a COCO compressed RLE string (pycocotools' ``rleFrString``, checked).

    Each count is 5-bit groups in characters ``'0'..'o'``, bit 0x20 = "more groups follow",
    bit 0x10 of the last group = negative; from the third count on, values are deltas to the
    count two places before. pycocotools reads past the end of a string whose last character
    says "more", and accepts any character: both are errors here.
    """
    counts: list[int] = []
    x = k = 0
    more = False
    for p, ch in enumerate(s):
        c = ord(ch) - 48
        if not 0 <= c < 64:
            raise ValueError(f"character {ch!r} at {p} is not in the RLE alphabet '0'..'o'")
        x |= (c & 0x1F) << (5 * k)
        k += 1
        more = bool(c & 0x20)
        if not more:
            if c & 0x10:
                x |= -1 << (5 * k)
            if len(counts) > 2:
                x += counts[-2]
            counts.append(x)
            x = k = 0
    if more:
        raise ValueError("string ends inside a run length")
    return counts


def check_rle(rle: Any, height: int, width: int) -> dict[str, Any]:
    """A pycocotools-ready RLE (``counts`` as bytes) after checking it, or ``ValueError``.

    ``size`` must be ``[height, width]`` of the image; the run lengths must be non-negative
    integers that sum to ``height * width`` (pycocotools silently decodes ``"zzz"`` into a box).
    """
    if not isinstance(rle, dict) or "counts" not in rle or "size" not in rle:
        raise ValueError("expected an RLE object {size: [h, w], counts: ...}")
    size = rle["size"]
    if not (isinstance(size, list) and len(size) == 2 and all(type(v) is int for v in size)):
        raise ValueError(f"size must be [height, width] integers, got {size!r:.60}")
    if size != [height, width]:
        raise ValueError(f"size {size} is not the image's [{height}, {width}]")
    raw = rle["counts"]
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", errors="replace")
    if isinstance(raw, str):
        counts = _rle_string_counts(raw)
    elif isinstance(raw, list) and all(type(v) is int for v in raw):
        counts = raw
    else:
        raise ValueError("counts must be a compressed RLE string or a list of integers")
    if any(v < 0 for v in counts):
        raise ValueError("counts has a negative run length")
    if sum(counts) != height * width:
        raise ValueError(f"run lengths sum to {sum(counts)}, not {height}x{width} = {height * width} pixels")
    if isinstance(raw, list):
        return mask_utils.frPyObjects({"size": size, "counts": counts}, height, width)
    return {"size": size, "counts": raw.encode("ascii")}


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
    images = images_by_id(data, path)
    out: list[Sample] = []
    for a_idx, ann in enumerate(data.get("annotations", [])):
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        rec = f"annotation #{a_idx} (annotation id {ann_id!r:.40})"
        if not isinstance(ann, dict):
            raise ManifestError(path, None, None, "an annotation must be a JSON object", rec)
        im = images.get(ann.get("image_id"))
        if im is None:
            raise ManifestError(path, None, "image_id", f"image {ann.get('image_id')!r:.40} not in 'images'", rec)
        H, W = im["height"], im["width"]
        regions = ann.get("regions", [])
        if not isinstance(regions, list):
            raise ManifestError(path, None, "regions", "must be a list", rec)
        for r_idx, reg in enumerate(regions):
            sid = cocoa_sample_id(ann["image_id"], r_idx)
            where = f"annotation #{a_idx} region #{r_idx} ({sid}), annotation id {ann_id!r:.40}"

            def err(field: str, msg: str) -> ManifestError:
                return ManifestError(path, None, field, msg, where)

            if not isinstance(reg, dict):
                raise err("regions", "a region must be a JSON object")
            if not isinstance(reg.get("name"), str) or not reg["name"].strip():
                raise err("name", f"must be a non-empty string, got {reg.get('name')!r:.40}")
            occ = reg.get("occlude_rate", 0.0)
            if finite_number(occ) is None or not 0.0 <= occ <= 1.0:
                raise err("occlude_rate", f"must be a number in [0, 1], got {occ!r:.40}")
            if reg.get("isStuff") and not include_stuff:
                counts["skipped_stuff"] += 1
                continue
            if only_described and sid not in descriptions:
                counts["skipped_undescribed"] += 1
                continue
            try:
                seg = check_polygon(reg.get("segmentation"), H, W)
            except ValueError as e:
                raise err("segmentation", str(e)) from None
            amodal = polygon_box(seg, H, W)
            if amodal[2] <= amodal[0] or amodal[3] <= amodal[1]:
                raise err("segmentation", "polygon has no area")
            if reg.get("visible_mask") is not None:
                try:
                    visible = rle_box(reg["visible_mask"], H, W)
                except ValueError as e:
                    raise err("visible_mask", f"malformed RLE: {e}") from None
            else:
                visible = list(amodal)
            if visible[2] <= visible[0] or visible[3] <= visible[1]:
                if not keep_invisible:
                    counts["skipped_invisible"] += 1
                    continue
                visible = [0.0, 0.0, 0.0, 0.0]
            out.append(Sample.from_json({
                "id": sid,
                "image": str(Path(image_dir) / im["file_name"]),
                "width": W,
                "height": H,
                "sentence": descriptions.get(sid, reg["name"]),
                "task": "amodal",
                "box": amodal,
                "visible_box": visible,
                "split": split,
                "source": "cocoa",
                "category": reg["name"],
                "meta": {
                    "image_id": ann["image_id"],
                    "ann_id": ann_id,
                    "region_index": r_idx,
                    "order": reg.get("order"),
                    "occlude_rate": occ,
                    "is_stuff": bool(reg.get("isStuff", 0)),
                    "described": sid in descriptions,
                },
            }, path=path, record=where))
            counts["kept"] += 1
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
    return import_annotations(cocoa_samples, annotation_json, out, descriptions, image_dir=image_dir, split=split,
                              keep_invisible=keep_invisible, include_stuff=include_stuff, only_described=only_described)
