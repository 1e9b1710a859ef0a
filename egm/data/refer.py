"""Import RefCOCO / RefCOCO+ / RefCOCOg (the REFER layout) into EGM manifests.

Layout read (lichengunc/refer)::

    <data_root>/<dataset>/refs(<splitBy>).p   pickle: list of ref dicts
    <data_root>/<dataset>/instances.json      COCO json: images, annotations, categories
    <image_dir>/COCO_train2014_%012d.jpg      COCO train2014 images

One :class:`~egm.data.manifest.Sample` per referring *sentence* (paper Sec. 5.2 evaluates per
sentence), id ``f"{dataset}_{splitBy}_{sent_id}"`` and split ``f"{dataset}_{splitBy}_{split}"``
(e.g. ``refcoco_unc_testA``). The box is the referred annotation's COCO bbox converted to pixel
``xyxy``. The image file name comes from ``instances.json``; a ref's own ``file_name``
(``COCO_train2014_000000581857_16.jpg``) carries an annotation suffix and is *not* an image.

The pickle files are trusted input (they are the official REFER release); never point this
importer at a pickle from an unknown source.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections import defaultdict
from pathlib import Path
from typing import Any

from egm.data.manifest import ManifestError, Sample, finite_number, images_by_id, read_json, write_manifest
from egm.errors import InputError

log = logging.getLogger(__name__)

# The eight standard eval splits of paper Table 3 with their real sizes
# (tensorflow_datasets refcoco card; refs(unc).p conversion scripts; Ref-L4 totals).
STANDARD_EVAL_SPLITS: dict[str, dict[str, int]] = {
    "refcoco_unc_val": {"refs": 3811, "images": 1500, "expressions": 10834},
    "refcoco_unc_testA": {"refs": 1975, "images": 750, "expressions": 5657},
    "refcoco_unc_testB": {"refs": 1810, "images": 750, "expressions": 5095},
    "refcoco+_unc_val": {"refs": 3805, "images": 1500, "expressions": 10758},
    "refcoco+_unc_testA": {"refs": 1975, "images": 750, "expressions": 5726},
    "refcoco+_unc_testB": {"refs": 1798, "images": 750, "expressions": 4889},
    "refcocog_umd_val": {"refs": 2573, "images": 1300, "expressions": 4896},
    "refcocog_umd_test": {"refs": 5023, "images": 2600, "expressions": 9602},
}
TRAIN_SPLIT_SIZES: dict[str, dict[str, int]] = {
    "refcoco_unc_train": {"refs": 42404, "images": 16994, "expressions": 120624},
    "refcoco+_unc_train": {"refs": 42278, "images": 16992, "expressions": 120191},
    "refcocog_umd_train": {"refs": 42226, "images": 21899},
}
# (dataset, splitBy) pairs of the standard benchmark.
STANDARD_DATASETS: tuple[tuple[str, str], ...] = (("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd"))


def load_refs(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Load a ``refs(<splitBy>).p`` pickle (written by Python 2; decoded as latin-1 if needed)."""
    with open(path, "rb") as fh:
        try:
            refs = pickle.load(fh)
        except UnicodeDecodeError:
            fh.seek(0)
            refs = pickle.load(fh, encoding="latin1")
    if not isinstance(refs, list):
        raise ManifestError(path, None, None, f"expected a list of refs, got {type(refs).__name__}")
    return refs


def refer_samples(
    refs: list[dict[str, Any]],
    instances: dict[str, Any],
    *,
    dataset: str,
    split_by: str,
    image_dir: str | os.PathLike,
    refs_path: str | os.PathLike | None = None,
    splits: list[str] | None = None,
    instances_path: str | os.PathLike | None = None,
) -> list[Sample]:
    """Turn REFER refs + COCO instances into samples, one per sentence.

    ``splits`` keeps only refs whose ``split`` is listed (e.g. ``["val", "testA"]``).
    A ref whose annotation, image or category is missing raises :class:`ManifestError` naming
    ``refs_path`` and the ref (such a file is not the official release, so failing is right).
    Every image size and box is checked first (:func:`~egm.data.manifest.images_by_id`; a box
    is 4 finite numbers inside its image), and each sample passes the manifest checks.
    """
    images = images_by_id(instances, instances_path)
    anns = {a["id"]: a for a in instances.get("annotations", [])}
    cats = {c["id"]: c["name"] for c in instances.get("categories", [])}
    out: list[Sample] = []
    for i, ref in enumerate(refs):
        if splits is not None and ref["split"] not in splits:
            continue

        def err(field: str, msg: str) -> ManifestError:
            return ManifestError(refs_path, None, field, f"ref #{i} (ref_id {ref.get('ref_id')}): {msg}")

        ann = anns.get(ref["ann_id"])
        if ann is None:
            raise err("ann_id", f"annotation {ref['ann_id']} not in instances.json")
        im = images.get(ref["image_id"])
        if im is None:
            raise err("image_id", f"image {ref['image_id']} not in instances.json")
        cat_id = ann.get("category_id", ref.get("category_id"))
        if cat_id not in cats:
            raise err("category_id", f"category {cat_id} not in instances.json")
        bbox = ann.get("bbox")
        xs = [finite_number(v) for v in bbox] if isinstance(bbox, (list, tuple)) and len(bbox) == 4 else None
        if xs is None or None in xs or xs[2] <= 0 or xs[3] <= 0:
            raise ManifestError(instances_path, None, "bbox", f"must be [x, y, w, h]: 4 finite numbers, w and h > 0, "
                                f"got {bbox!r:.60}", f"annotation {ref['ann_id']!r:.40} (of ref_id {ref.get('ref_id')!r:.40})")
        box = [xs[0], xs[1], xs[0] + xs[2], xs[1] + xs[3]]
        sentences = ref.get("sentences")
        if not isinstance(sentences, list) or not all(isinstance(x, dict) and "sent_id" in x for x in sentences):
            raise err("sentences", "must be a list of {sent_id, sent} objects")
        for sent in sentences:
            out.append(
                Sample.from_json(dict(
                    id=f"{dataset}_{split_by}_{sent['sent_id']}",
                    image=str(Path(image_dir) / im["file_name"]),
                    width=im["width"],
                    height=im["height"],
                    sentence=sent.get("sent"),
                    task="vanilla",
                    box=box,
                    split=f"{dataset}_{split_by}_{ref['split']}",
                    source=dataset,
                    category=cats[cat_id],
                    meta={
                        "ref_id": ref["ref_id"],
                        "ann_id": ref["ann_id"],
                        "image_id": ref["image_id"],
                        "sent_id": sent["sent_id"],
                    },
                ), path=refs_path, record=f"ref #{i} (ref_id {ref.get('ref_id')!r:.40}) sentence {sent['sent_id']!r:.40}")
            )
    return out


def load_refer(
    data_root: str | os.PathLike,
    dataset: str = "refcoco",
    split_by: str = "unc",
    image_dir: str | os.PathLike | None = None,
    splits: list[str] | None = None,
) -> list[Sample]:
    """Read ``<data_root>/<dataset>/refs(<split_by>).p`` + ``instances.json`` into samples.

    ``image_dir`` defaults to REFER's ``<data_root>/images/mscoco/images/train2014``.
    """
    root = Path(data_root)
    refs_path = root / dataset / f"refs({split_by}).p"
    inst_path = root / dataset / "instances.json"
    for p in (refs_path, inst_path):
        if not p.is_file():
            raise FileNotFoundError(f"REFER file not found: {p}")
    if image_dir is None:
        image_dir = root / "images" / "mscoco" / "images" / "train2014"
    return refer_samples(
        load_refs(refs_path), read_json(inst_path), dataset=dataset, split_by=split_by,
        image_dir=image_dir, refs_path=refs_path, splits=splits, instances_path=inst_path,
    )


def split_counts(samples: list[Sample]) -> dict[str, dict[str, int]]:
    """Per split: number of refs, images and expressions (the three numbers of the REFER tables)."""
    refs: dict[str, set] = defaultdict(set)
    imgs: dict[str, set] = defaultdict(set)
    sents: dict[str, int] = defaultdict(int)
    for s in samples:
        refs[s.split].add(s.meta.get("ref_id"))
        imgs[s.split].add(s.meta.get("image_id", s.image))
        sents[s.split] += 1
    return {k: {"refs": len(refs[k]), "images": len(imgs[k]), "expressions": sents[k]} for k in sents}


def check_split_sizes(
    counts: dict[str, dict[str, int]],
    expected: dict[str, dict[str, int]] | None = None,
) -> list[str]:
    """Compare counts with the real split sizes; returns one message per mismatch (empty = ok).

    Only splits present in ``counts`` are compared unless they are in ``expected`` but missing,
    which is reported too (call it with the counts of all three datasets for a full check).
    """
    expected = STANDARD_EVAL_SPLITS if expected is None else expected
    problems = []
    for split, want in expected.items():
        got = counts.get(split)
        if got is None:
            problems.append(f"{split}: missing (expected {want['expressions'] if 'expressions' in want else want})")
            continue
        for key, n in want.items():
            if got.get(key) != n:
                problems.append(f"{split}: {key} = {got.get(key)}, expected {n}")
    return problems


def import_refer(
    data_root: str,
    out_dir: str,
    datasets: list[str] | None = None,
    image_dir: str | None = None,
    check_sizes: bool = True,
) -> dict[str, str]:
    """Import REFER datasets into one manifest per split: ``<out_dir>/<dataset>_<splitBy>_<split>.jsonl``.

    ``datasets`` are ``"dataset/splitBy"`` strings (default: refcoco/unc, refcoco+/unc,
    refcocog/umd); a dataset whose files are absent is skipped with a message. When all three
    standard datasets were imported, the eight eval splits are checked against their real sizes
    (``check_sizes``) and any mismatch raises :class:`ValueError` listing every difference; finding
    none of ``datasets`` raises :class:`FileNotFoundError`.
    Returns ``{split: manifest_path}``.
    """
    # absolute: a manifest resolves a relative image path against its own folder, not the cwd
    data_root, image_dir = os.path.abspath(data_root), image_dir and os.path.abspath(image_dir)
    pairs = [tuple(d.split("/")) for d in datasets] if datasets else list(STANDARD_DATASETS)
    by_split: dict[str, list[Sample]] = defaultdict(list)
    present = [(d, b) for d, b in pairs if (Path(data_root) / d / f"refs({b}).p").is_file()]
    if not present:  # skipping every dataset is a wrong data_root, not a successful import
        raise FileNotFoundError(f"no REFER dataset under {data_root}: none of "
                                + ", ".join(f"{d}/refs({b}).p" for d, b in pairs) + " exists")
    imported = []
    for dataset, split_by in pairs:
        if (dataset, split_by) not in present:
            log.warning("import_refer: skip %s/%s: refs(%s).p not found under %s", dataset, split_by, split_by, data_root)
            continue
        for s in load_refer(data_root, dataset, split_by, image_dir):
            by_split[s.split].append(s)
        imported.append((dataset, split_by))
    out = {}
    for split, samples in sorted(by_split.items()):
        path = Path(out_dir) / f"{split}.jsonl"
        write_manifest(path, samples)
        out[split] = str(path)
    if check_sizes and set(STANDARD_DATASETS) <= set(imported):
        problems = check_split_sizes(split_counts([s for v in by_split.values() for s in v]))
        if problems:
            raise InputError("REFER split sizes differ from the standard benchmark:\n  " + "\n  ".join(problems))
    return out
