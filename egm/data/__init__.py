"""EGM data layer: the JSONL manifest, importers (REFER, COCO-Amodal, TAO-Amodal), the synthetic
grounding world with its reasoning traces (:mod:`egm.data.synthetic`), and the LightningDataModule.

The datamodule names are imported lazily so that importers and tools do not pay for Lightning.
"""

from egm.data.manifest import ManifestError, Sample, iter_manifest, read_manifest, write_manifest

_LAZY = {"GroundingDataModule", "GroundingDataset", "WeightedMixSampler", "list_collate"}


def __getattr__(name):
    if name in _LAZY:
        from egm.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module 'egm.data' has no attribute {name!r}")


__all__ = [
    "GroundingDataModule",
    "GroundingDataset",
    "ManifestError",
    "Sample",
    "WeightedMixSampler",
    "iter_manifest",
    "list_collate",
    "read_manifest",
    "write_manifest",
]
