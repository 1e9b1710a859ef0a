"""Shared by the multi-process tests (``test_ddp.py``, ``test_strategies.py``).

* fixed GRPO rollouts and rewards, the same per (prompt, sample index) on whichever rank or in
  whichever batch they are drawn, so that a 2-process run and a 1-process run see the same data;
* the tiny-model modules those tests train, and the quiet Trainer settings they share;
* the synthetic world with uneven target-token counts per sample;
* :func:`launch`: a test file run as a script in a subprocess; Lightning's launcher there starts
  the other rank itself.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
             limit_val_batches=0, num_sanity_val_steps=0)


class FixedEngine:
    """Rollouts fixed per (prompt id, sample index), whichever rank or batch they are drawn in."""

    def __init__(self, adapter):
        self.adapter = adapter

    def update_weights(self, model):
        pass

    def generate(self, examples, n, sampling, seed=None):
        from egm.generation.rollout import Rollout, encode_prompts, responses_from_rows

        rows = []
        for ex in examples:
            for g in range(n):
                rng = np.random.default_rng(zlib.crc32(f"{ex['sample'].id}/{g}".encode()))
                rows.append(rng.integers(20, 400, size=int(rng.integers(2, 7))).tolist())
        ids, mask, lengths, trunc = responses_from_rows(rows, set(), 8, self.adapter.pad_token_id)
        return Rollout(list(examples), encode_prompts(self.adapter, examples), ids, mask, lengths, trunc,
                       self.adapter.decode(ids, 0), n)


def fixed_reward(texts, gt_boxes, sizes, parse=None, alpha=0.5):
    from egm.reward import grounding_reward

    out = grounding_reward([None] * len(texts), gt_boxes, alpha)
    rewards = np.array([zlib.crc32(t.encode()) % 97 / 97 for t in texts])
    return type(out)(rewards, out.iou, out.success, out.parse_ok, out.failures)


def grpo_module(ck: str, **kwargs):
    """GRPO on the tiny Qwen3-VL with fixed rollouts and rewards (3 samples per prompt)."""
    import egm.rl.module as rl_module
    from egm.generation.sampling import SamplingParams
    from egm.models import Qwen3VLAdapter

    rl_module.reward_from_texts = fixed_reward
    kwargs = {"lr": 1e-3, "warmup_steps": 0, "n_samples": 3, "micro_batch_size": 2, "max_grad_norm": None,
              "rollout": SamplingParams(temperature=1.0, max_new_tokens=8), **kwargs}
    m = rl_module.GRPOModule(Qwen3VLAdapter(ck), **kwargs)
    m.engine = FixedEngine(m.adapter)  # on_fit_start builds an engine only when none is set
    return m


def sft_module(ck: str, **kwargs):
    from egm.models import Qwen3VLAdapter
    from egm.sft import SFTModule

    return SFTModule(Qwen3VLAdapter(ck, max_length=256), **{"lr": 1e-3, **kwargs})


def uneven_world(root: Path, ck: Path) -> str:
    """A 4-sample train manifest whose target-token counts differ so that any 2 + 2 split gives the
    ranks different counts (with equal counts a plain per-rank mean would pass the tests too)."""
    from PIL import Image

    from egm.data.manifest import read_manifest, write_manifest
    from egm.data.synthetic import make_synthetic
    from egm.models import Qwen3VLAdapter

    train = root / "syn_ddp" / "train_uneven.jsonl"
    if train.exists():
        return str(train)
    paths = make_synthetic(str(root / "syn_ddp"), n_train=4, n_val=1, n_test=1, image_size=64)
    samples = [dataclasses.replace(s, reasoning=(s.reasoning or "") + " Checking again." * (5 * k * k))
               for k, s in enumerate(read_manifest(paths["train"]))]
    write_manifest(str(train), samples, relative_to_dir=False)
    ad = Qwen3VLAdapter(str(ck), max_length=256)
    tokens = [int((ad.collate_train([{"sample": s, "image": Image.open(s.image).convert("RGB")}])["labels"][..., 1:]
                   != -100).sum()) for s in samples]
    assert all(tokens[0] + tokens[k] != sum(tokens) / 2 for k in (1, 2, 3)), tokens
    return str(train)


def launch(script: str, *args: str, timeout: int = 300) -> str:
    """Run ``python script args...`` (one torch thread, DeepSpeed on its CPU accelerator); its stdout."""
    # the repository (egm) and tests/ (this module, for scripts in tests/<package>/)
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    r = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-6000:]
    return r.stdout
