"""egm.compat: every private name of another library that egm relies on still exists and still
does what the wrapper assumes; an upgrade that changes one fails here, naming it."""

from __future__ import annotations

import importlib
import inspect

import torch
from torch.utils.data import DataLoader

from egm.compat import INTERNALS, base_sampler, model_from_config


def _resolve(target: str):
    module, _, qualname = target.partition(":")
    obj = importlib.import_module(module)
    for attr in qualname.split("."):
        assert hasattr(obj, attr), f"{target} is gone"
        obj = getattr(obj, attr)
    return obj.fget if isinstance(obj, property) else obj


def test_private_api_is_still_there():
    for target, fragments in INTERNALS.items():
        src = inspect.getsource(inspect.unwrap(getattr(_resolve(target), "__func__", _resolve(target))))
        for fragment in fragments:
            assert fragment in src, f"{target} no longer contains {fragment!r}"


def test_base_sampler_unwraps_lightnings_distributed_wrapper():
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    sampler = torch.utils.data.SequentialSampler(range(6))
    wrapped = DistributedSamplerWrapper(sampler, num_replicas=2, rank=0, shuffle=False)
    assert base_sampler(wrapped) is sampler and base_sampler(sampler) is sampler


def test_dataloader_private_properties_behave():
    batched, single = DataLoader(range(4), batch_size=2), DataLoader(range(4), batch_size=None)
    assert batched._auto_collation and batched._index_sampler is batched.batch_sampler
    assert not single._auto_collation and single._index_sampler is single.sampler


def test_model_from_config_builds_without_weights(qwen_dir):
    import transformers

    config = transformers.AutoConfig.from_pretrained(qwen_dir)
    with torch.device("meta"):
        model = model_from_config(getattr(transformers, config.architectures[0]), config)
    assert all(p.device.type == "meta" for p in model.parameters())
