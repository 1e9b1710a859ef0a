"""Private API of other libraries that egm relies on, each used through this module only.

Lightning/DeepSpeed internals of the DeepSpeed glue live with it (:data:`egm.strategies.INTERNALS`);
everything else is here, listed in :data:`INTERNALS` and checked by ``tests/test_compat.py``, so
that an upgrade that renames or changes one fails there, naming it, instead of breaking a run:

* PyTorch's ``DataLoader._auto_collation`` / ``_index_sampler`` and Lightning's
  ``_DatasetSamplerWrapper._sampler`` (the user's sampler under ``DistributedSamplerWrapper``):
  mid-epoch resume of the train loader (:class:`egm.data.datamodule.ResumableDataLoader`).
* transformers' ``PreTrainedModel._from_config``: a model of a given class from its config with no
  weights loaded (``egm evaluate``'s parameter count on the meta device).
"""

from __future__ import annotations

from typing import Any

#: ``"module:qualname"`` -> source fragments it is expected to contain (Lightning 2.6.6, torch 2.13,
#: transformers in the test venv). When a test names one, re-read it and update the wrapper below.
INTERNALS: dict[str, tuple[str, ...]] = {
    "torch.utils.data.dataloader:DataLoader._auto_collation": ("self.batch_sampler is not None",),
    "torch.utils.data.dataloader:DataLoader._index_sampler": ("self._auto_collation", "self.batch_sampler"),
    "lightning.fabric.utilities.distributed:_DatasetSamplerWrapper.__init__": ("self._sampler = sampler",),
    "transformers.modeling_utils:PreTrainedModel._from_config": ("def _from_config(cls, config",),
}


def base_sampler(sampler: Any) -> Any:
    """The user's sampler under Lightning's ``DistributedSamplerWrapper`` (``.dataset._sampler``), else ``sampler``."""
    return getattr(getattr(sampler, "dataset", None), "_sampler", sampler)


def model_from_config(cls: Any, config: Any, **kwargs: Any) -> Any:
    """``cls._from_config(config)``: the model without loading weights (transformers has no public
    per-class equivalent; the ``AutoModel*.from_config`` classes pick their own class)."""
    return cls._from_config(config, **kwargs)
