"""Rollout engines compared in one process: vLLM (CPU build, fp32) against Hugging Face ``generate``.

Part 1, per family and shape (prompts x G samples x max tokens): median wall time of one rollout
with each engine on the same tiny checkpoint, prompts and sampling, and rollout tokens/s; the
ratio vLLM / HF is what to read (the absolute numbers belong to this machine). The random tiny
model rarely emits a stop token, so nearly every response runs to the token budget; the tokens
actually generated are counted and printed.

Part 2: one GRPO step per engine (``GRPOModule`` under a Trainer, two optimiser steps per batch so
that the old log-probs pass runs), its time split into rollout, log-probs (the no-grad pass over
all responses) and update (forward + backward + optimiser steps), from the module's own clock.

    python tools/bench_rollout.py [--threads 1] [--repeat 3] [--families qwen3_vl,internvl]

Needs vLLM (``make test``'s venv: ``.venv-test/bin/python tools/bench_rollout.py``).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

SHAPES = ((4, 16, 96), (8, 16, 256))  # the demo's shape (4 prompts x G 16, 96 tokens), and a larger one


def _examples(n: int, size: int = 128):
    import numpy as np
    from PIL import Image

    from egm.data.manifest import Sample

    rng = np.random.default_rng(0)
    return [{"sample": Sample(id=f"b{i}", image="x.png", width=size, height=size, task="vanilla",
                              sentence=f"the small red circle left of square {i}", box=[10, 20, 90, 100],
                              split="bench", source="bench"),
             "image": Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))} for i in range(n)]


def _median_time(fn, repeat: int):
    out, res = [], None
    fn()  # warm-up (first-call allocations, vLLM's first prefill)
    for _ in range(repeat):
        t = time.perf_counter()
        res = fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out), res


def bench_engines(family: str, root: str, repeat: int) -> None:
    from egm.generation.sampling import SamplingParams
    from egm.models import ADAPTERS
    from egm.models.tiny import tiny_checkpoint
    from egm.generation.hf import HFEngine
    from egm.generation.vllm import VLLMEngine

    ad = ADAPTERS[family](str(tiny_checkpoint(family, root)))
    hf = HFEngine(ad, ad.load_model())
    vl = VLLMEngine(ad, dtype="float32", enforce_eager=True, max_model_len=2048, max_num_seqs=256)
    print(f"\n{family}: rollout, median of {repeat} (temperature 1.0, top_p 1.0)")
    print(f"{'prompts x G x tokens':>22} | {'HF s':>7} {'HF tok/s':>9} | {'vLLM s':>7} {'vLLM tok/s':>10} | vLLM/HF speed")
    for p, g, t in SHAPES:
        exs = _examples(p)
        sampling = SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=t)
        th, ro_h = _median_time(lambda: hf.generate(exs, g, sampling, seed=0), repeat)
        tv, ro_v = _median_time(lambda: vl.generate(exs, g, sampling, seed=0), repeat)
        rh, rv = ro_h.num_tokens / th, ro_v.num_tokens / tv
        print(f"{f'{p} x {g} x {t}':>22} | {th:7.2f} {rh:9.0f} | {tv:7.2f} {rv:10.0f} | {rv / rh:5.2f}x"
              f"   (tokens: HF {ro_h.num_tokens}, vLLM {ro_v.num_tokens})")


def bench_grpo_step(family: str, root: str, steps: int) -> None:
    import lightning as L

    from egm.data.datamodule import GroundingDataModule
    from egm.data.synthetic import make_synthetic
    from egm.generation.sampling import SamplingParams
    from egm.models import ADAPTERS
    from egm.models.tiny import tiny_checkpoint
    from egm.rl.module import GRPOModule
    from egm.generation.vllm import VLLMSettings

    paths = make_synthetic(os.path.join(root, "syn"), n_train=64, n_val=2, n_test=2, image_size=128)
    ck = str(tiny_checkpoint(family, root))
    p, g, t = SHAPES[0]
    rows = {}
    for engine in ("hf", "vllm"):
        m = GRPOModule(ADAPTERS[family](ck), lr=1e-5, warmup_steps=0, n_samples=g, engine=engine,
                       rollout=SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=t),
                       mini_batch_size=p // 2, micro_batch_size=32,
                       vllm=VLLMSettings(dtype="float32", enforce_eager=True, max_model_len=2048))
        times: dict[str, list[float]] = {}

        class Keep(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, *a):
                for k in ("rollout", "reward", "old_logp", "update"):
                    times.setdefault(k, []).append(pl_module.last_stats[f"time/{k}_s"])

        tr = L.Trainer(max_steps=2 * (steps + 1), accelerator="cpu", logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[Keep()])
        tr.fit(m, GroundingDataModule(train=paths["train"], batch_size=p, num_workers=0))
        rows[engine] = {k: statistics.median(v[1:]) for k, v in times.items()}  # first step: warm-up
    print(f"\n{family}: one GRPO step ({p} prompts x G {g}, {t} tokens, 2 optimiser steps), median of {steps}")
    print(f"{'engine':>6} | {'rollout s':>9} {'log-probs s':>11} {'update s':>9} {'total s':>8}")
    for engine, r in rows.items():
        total = sum(r.values())
        print(f"{engine:>6} | {r['rollout']:9.2f} {r['old_logp']:11.2f} {r['update']:9.2f} {total:8.2f}")
    h, v = rows["hf"], rows["vllm"]
    print(f"vLLM/HF: rollout time {v['rollout'] / h['rollout']:.2f}, step time {sum(v.values()) / sum(h.values()):.2f}")


def main(threads: int = 1, repeat: int = 3, steps: int = 2, families: str = "qwen3_vl,internvl",
         root: str | None = None) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(threads)
    root = root or tempfile.mkdtemp(prefix="egm-bench-rollout-")
    for fam in families.split(","):
        bench_engines(fam, root, repeat)
        torch.set_num_threads(threads)  # vLLM's CPU worker resets the thread count when it starts
        bench_grpo_step(fam, root, steps)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
