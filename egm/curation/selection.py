"""RL data selection by learnability (paper Sec. 4.2) and the prediction files it reads.

For every vanilla sample ``d_i`` the reference model (a strong grounding model) and the learner
(the small VLM to be trained) each have a prediction; with grounding success ``S = IoU > 0.5``
(Eq. 1) the learnability is ``l_i = S_ref,i - S_theta,i``.

* ``D_neg = {d_i | l_i > 0}``: the reference succeeds where the learner fails;
* ``D_pos``: drawn uniformly (seeded) from ``{d_i | S_theta,i = 1}``, ``|D_pos| = |D_neg|`` (all of
  them, and a reported shortfall, when there are fewer);
* ``D = D_pos ∪ D_neg``; amodal samples pass whole (Sec. 4.2, "Amodal Grounding").

Samples absent from either prediction file have no learnability: they are excluded from both
sets and listed in the statistics (``strict`` makes them an error) rather than silently dropped.

Prediction files are JSONL, one :class:`egm.scoring.Prediction` per sample, read with the one
validated reader, :func:`egm.eval.predictions.read_predictions`: ``id`` and ``iou`` are required;
``success`` (else ``iou > 0.5``), ``pred_box``/``gt_box`` (pixel ``xyxy``; ``null`` when no box could
be parsed), ``sentence`` and anything else are optional.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from egm.data.manifest import Sample, read_manifest, write_manifest
from egm.errors import InputError
from egm.eval.predictions import read_predictions
from egm.scoring import Prediction

log = logging.getLogger(__name__)


@dataclass
class SelectionResult:
    """Selected samples (manifest order) and the counts of Sec. 4.2 / Table 6."""

    samples: list[Sample]
    negatives: list[str]
    positives: list[str]
    amodal: list[str]
    missing_reference: list[str]
    missing_learner: list[str]
    stats: dict[str, Any]


def select_by_learnability(
    samples: Sequence[Sample],
    reference: Mapping[str, Prediction],
    learner: Mapping[str, Prediction],
    *,
    seed: int = 0,
) -> SelectionResult:
    """D = D_neg ∪ D_pos (vanilla) plus every amodal sample; see the module docstring."""
    neg, pos_pool, amodal, miss_ref, miss_learn = [], [], [], [], []
    l_counts = {-1: 0, 0: 0, 1: 0}
    for s in samples:
        if s.task == "amodal":
            amodal.append(s.id)
            continue
        r, t = reference.get(s.id), learner.get(s.id)
        if r is None:
            miss_ref.append(s.id)
        if t is None:
            miss_learn.append(s.id)
        if r is None or t is None:
            continue
        l = int(r.success) - int(t.success)
        l_counts[l] += 1
        if l > 0:
            neg.append(s.id)
        elif t.success:
            pos_pool.append(s.id)
    k = min(len(neg), len(pos_pool))
    pos = random.Random(seed).sample(pos_pool, k)
    tags = {**{i: "neg" for i in neg}, **{i: "pos" for i in pos}, **{i: "amodal" for i in amodal}}
    out = []
    for s in samples:
        if s.id in tags:
            meta = {**s.meta, "rl_selection": tags[s.id]}
            if tags[s.id] != "amodal":
                meta["learnability"] = int(reference[s.id].success) - int(learner[s.id].success)
            out.append(replace(s, meta=meta))
    ids = {s.id for s in samples}
    stats = {
        "samples": len(samples),
        "vanilla": len(samples) - len(amodal),
        "amodal": len(amodal),
        "scored": sum(l_counts.values()),
        "learnability_counts": {str(k_): v for k_, v in l_counts.items()},
        "negatives": len(neg),
        "positive_pool": len(pos_pool),
        "positives": len(pos),
        "positive_shortfall": len(neg) - len(pos),
        "selected": len(out),
        "missing_reference": len(miss_ref),
        "missing_learner": len(miss_learn),
        "unknown_reference_ids": sum(1 for i in reference if i not in ids),
        "unknown_learner_ids": sum(1 for i in learner if i not in ids),
        "seed": seed,
    }
    chosen = set(pos)
    positives = [i for i in pos_pool if i in chosen]  # manifest order
    return SelectionResult(out, neg, positives, amodal, miss_ref, miss_learn, stats)


def select_rl_data(
    manifest: str,
    reference: str,
    learner: str,
    output: str,
    seed: int = 0,
    strict: bool = False,
) -> dict[str, Any]:
    """Select the RL training set by learnability (paper Sec. 4.2) and write it as a manifest.

    Args:
        manifest: the training manifest D_G (amodal samples in it pass whole).
        reference: prediction JSONL of the reference model M_ref on ``manifest``.
        learner: prediction JSONL of the learner M_theta on ``manifest``.
        output: output manifest; ``<output>.stats.json`` (counts and the missing ids) goes beside it.
        seed: seed of the uniform draw of D_pos.
        strict: fail when a vanilla sample lacks a prediction instead of reporting it.
    """
    samples = read_manifest(manifest)
    res = select_by_learnability(samples, read_predictions(reference), read_predictions(learner), seed=seed)
    if strict and (res.missing_reference or res.missing_learner):
        raise InputError(
            f"{len(res.missing_reference)} samples of {manifest} lack a prediction in {reference}, "
            f"{len(res.missing_learner)} in {learner} (first: {(res.missing_reference + res.missing_learner)[:5]})"
        )
    write_manifest(output, res.samples)
    stats = {**res.stats, "manifest": manifest, "reference": reference, "learner": learner, "output": output,
             "missing_reference_ids": res.missing_reference, "missing_learner_ids": res.missing_learner}
    Path(output).with_name(Path(output).name + ".stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return {k: v for k, v in stats.items() if not k.endswith("_ids")}
