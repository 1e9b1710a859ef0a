"""Let PyPI's (CUDA) torchvision import beside the CPU build of torch: the CPU test environment only.

Why: PyPI publishes torchvision only as CUDA builds. Next to ``torch==2.13.0+cpu`` its C++ ops
library cannot load, and ``import torchvision`` then fails in ``torchvision/_meta_registrations.py``
while registering fake kernels for ``torchvision::nms`` and ``torchvision::qnms``, two operators
that were never defined. vLLM and transformers' Qwen2-VL image processor import torchvision, but
only for its pure-Python transforms. Defining exactly those two operator schemas *before*
torchvision is imported lets it import; its transforms then work (its C++ ops, e.g. ``nms``,
still raise if called, and nothing in EGM or vLLM's CPU path calls them).

How: ``make test`` copies this file into the test virtualenv's ``site-packages`` together with
``egm_torchvision_cpu.pth`` (one line: ``import egm_torchvision_cpu``), and only when a plain
``import torchvision`` fails there. Python runs ``.pth`` lines at start-up in every process of
the venv, so the fix also reaches the subprocesses vLLM starts to inspect model classes
(``python -m vllm.model_executor.models.registry``). The hook is lazy: it adds a meta-path
finder and imports torch only when something first imports torchvision, so processes that never
touch torchvision (pip, plain scripts) pay nothing.

GPU machines install a matching CUDA torch + torchvision and never need this file.
See docs/cpu_test_env.md.
"""

from __future__ import annotations

import importlib.abc
import sys

OPS = ("nms", "qnms")
SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


def define_torchvision_schemas() -> None:
    """Define ``torchvision::nms`` / ``torchvision::qnms`` unless some library already did."""
    import torch

    for op in OPS:
        try:
            torch.library.define(f"torchvision::{op}", SCHEMA)
        except RuntimeError:  # already defined (e.g. a torchvision whose C++ library loaded)
            pass


class _TorchvisionHook(importlib.abc.MetaPathFinder):
    """Runs :func:`define_torchvision_schemas` once, right before torchvision is first imported."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            define_torchvision_schemas()
        return None  # the regular finders import the package itself


def install() -> None:
    if "torchvision" in sys.modules:
        define_torchvision_schemas()
    elif not any(isinstance(f, _TorchvisionHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionHook())


install()
