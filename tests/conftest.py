"""Fixtures shared by the test suite: tiny offline checkpoints and one torch thread.

The tests mirror the package: ``tests/<package>/test_<module>.py`` tests ``egm/<package>/<module>.py``;
files they read live in ``tests/fixtures/`` (see its SOURCE.md).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# DeepSpeed runs on this CPU through its CPU accelerator. Set before anything imports deepspeed
# (transformers and peft probe it), in this process and in every subprocess a test starts:
# without it DeepSpeed guesses, and prints its guess on stdout (breaking `--print_config` YAML).
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# the helper modules beside this file (multirank, toy_lightning), for tests in tests/<package>/
sys.path.insert(0, str(Path(__file__).resolve().parent))


class TinyDirs(dict):
    """``family -> tiny checkpoint dir``, each built on first use (a test of one family builds one)."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, family: str) -> Path:
        from egm.models.tiny import tiny_checkpoint

        self[family] = path = tiny_checkpoint(family, self.root)
        return path


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> TinyDirs:
    """Tiny checkpoints under ``<basetemp>/tiny``, shared by every test of the session."""
    return TinyDirs(tmp_path_factory.getbasetemp() / "tiny")


class RealDirs(TinyDirs):
    """``family -> real-shaped checkpoint dir`` (:mod:`egm.models.real`: released vocabulary, templates,
    processors on a tiny trunk); the converted Qwen BPE is cached beside them, built once per session."""

    def __missing__(self, family: str) -> Path:
        from egm.models.real import real_checkpoint

        self[family] = path = real_checkpoint(family, self.root)
        return path


@pytest.fixture(scope="session")
def real_dirs(tmp_path_factory) -> RealDirs:
    """Real-shaped tiny-trunk checkpoints under ``<basetemp>/real``, shared by every test of the session."""
    return RealDirs(tmp_path_factory.getbasetemp() / "real")


@pytest.fixture(scope="session")
def qwen_dir(tiny_dirs) -> Path:
    return tiny_dirs["qwen3_vl"]


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread; two threads on a shared 2-core box thrash.

    Only set when a collected test module imported torch (collection precedes this fixture), so
    pure-Python test files do not pay for importing it. Subprocess tests (DDP) set their own.
    """
    torch = sys.modules.get("torch")
    n = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(1)
    yield
    if torch is not None:
        torch.set_num_threads(n)
