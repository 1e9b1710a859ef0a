"""The evaluation benchmarks of paper Sec. 5.2, named in one place.

* Vanilla grounding (Table 3): the eight RefCOCO test splits; "Avg. Acc" is the *macro* average
  of the eight split accuracies (each split counts once, whatever its size).
* Amodal grounding (Table 4): the val and test splits of COCO-Amodal with generated prompts,
  11,261 samples in all, reported as one number "Amodal Acc" (the pooled accuracy over every
  amodal sample, i.e. a micro average over the amodal splits).
* Efficiency (Sec. 5.5): latency on a seeded random 10% subset of the RefCOCO splits.

Manifest split names follow ``<dataset>_<splitBy>_<split>`` (``refcoco_unc_testA``);
:func:`canonical_split` also accepts the usual spellings of RefCOCO+ (``refcocoplus``,
``refcoco_plus``) so that importers and users need not agree on one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchmarkSplit:
    """One Table 3 column: manifest split name, column group and sub-column as printed."""

    name: str
    dataset: str
    column: str

    @property
    def label(self) -> str:
        """Flat column name used in CSV/Markdown headers, e.g. ``RefCOCO+ test-A``."""
        return f"{self.dataset} {self.column}"


REFCOCO_SPLITS: tuple[BenchmarkSplit, ...] = (
    BenchmarkSplit("refcoco_unc_val", "RefCOCO", "val"),
    BenchmarkSplit("refcoco_unc_testA", "RefCOCO", "test-A"),
    BenchmarkSplit("refcoco_unc_testB", "RefCOCO", "test-B"),
    BenchmarkSplit("refcoco+_unc_val", "RefCOCO+", "val"),
    BenchmarkSplit("refcoco+_unc_testA", "RefCOCO+", "test-A"),
    BenchmarkSplit("refcoco+_unc_testB", "RefCOCO+", "test-B"),
    BenchmarkSplit("refcocog_umd_val", "RefCOCOg", "val"),
    BenchmarkSplit("refcocog_umd_test", "RefCOCOg", "test"),
)
REFCOCO_SPLIT_NAMES: tuple[str, ...] = tuple(s.name for s in REFCOCO_SPLITS)

# COCO-Amodal val + test with generated prompts (Sec. 5.2). Amodal accuracy pools every split
# whose samples have ``task == "amodal"``; these are the names the importer is expected to use.
AMODAL_SPLIT_NAMES: tuple[str, ...] = ("cocoa_val", "cocoa_test")

AVG_COLUMN = "Avg. Acc"        # Table 3, last column
AMODAL_COLUMN = "Amodal Acc"   # Table 4, only column
MODEL_COLUMN = "Model"

_ALIASES = {"refcocoplus": "refcoco+", "refcoco_plus": "refcoco+", "refcoco-plus": "refcoco+"}


def canonical_split(name: str) -> str:
    """Map alias spellings to the canonical split name (``refcocoplus_unc_val`` -> ``refcoco+_unc_val``)."""
    for alias, canon in _ALIASES.items():
        if name.startswith(alias + "_"):
            return canon + name[len(alias):]
    return name


def table3_columns() -> list[str]:
    """Header of Table 3 as flat column names: Model, the eight splits, Avg. Acc."""
    return [MODEL_COLUMN, *(s.label for s in REFCOCO_SPLITS), AVG_COLUMN]


def table4_columns() -> list[str]:
    """Header of Table 4: Model, Amodal Acc."""
    return [MODEL_COLUMN, AMODAL_COLUMN]


def refcoco_splits_in(names: Iterable[str]) -> list[str]:
    """The canonical RefCOCO split names among ``names`` (in Table 3 order)."""
    present = {canonical_split(n) for n in names}
    return [n for n in REFCOCO_SPLIT_NAMES if n in present]
