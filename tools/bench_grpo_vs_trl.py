"""One GRPO step of EGM's GRPOModule vs TRL's GRPOTrainer on the same tiny VLM, on CPU.

Same model (the tiny Qwen3-VL of :mod:`egm.models.tiny`), same prompts and images (the
synthetic world), same ``G``, same sampling and *forced* response lengths (``min_new_tokens =
max_new_tokens``, so both sides generate and train on exactly ``P * G * T`` tokens), same loss
setting (token-mean "dapo", beta 0, one optimiser step per rollout batch). Reports the median
wall time of a full step (rollout + reward + log-probs + update) per side and the ratio,
measured in one process (ours first, then TRL; the first step of each is a warm-up).

    .venv/bin/python tools/bench_grpo_vs_trl.py --prompts 4 --G 8 --tokens 32 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _examples(root: Path, n: int):
    from PIL import Image

    from egm.data.manifest import read_manifest
    from egm.data.synthetic import make_synthetic

    paths = make_synthetic(str(root / "syn"), n_train=max(n, 8), n_val=5, n_test=5, image_size=64)
    return [{"sample": s, "image": Image.open(s.image).convert("RGB")} for s in read_manifest(paths["train"])[:n]]


def bench_egm(ck: Path, examples, G: int, T: int, steps: int, root: Path) -> list[float]:
    import lightning as L
    from torch.utils.data import DataLoader

    from egm.generation.sampling import SamplingParams
    from egm.models import Qwen3VLAdapter
    from egm.rl.module import GRPOModule

    class Forced(SamplingParams):
        def hf_generate_kwargs(self):
            return {**super().hf_generate_kwargs(), "min_new_tokens": self.max_new_tokens}

    rollout = Forced(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=T)
    m = GRPOModule(Qwen3VLAdapter(str(ck)), lr=1e-5, warmup_steps=0, n_samples=G, rollout=rollout, beta=0.0,
                   gamma=0.0, micro_batch_size=len(examples) * G, max_grad_norm=1.0)
    times: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, *a):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *a):
            times.append(time.perf_counter() - self.t0)

    dl = DataLoader([examples] * (steps + 1), batch_size=None, collate_fn=lambda ex: {"examples": ex})
    t = L.Trainer(max_steps=steps + 1, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, callbacks=[Timer()],
                  default_root_dir=str(root))
    t.fit(m, dl)
    return times[1:]  # first step warms up


def bench_trl(ck: Path, examples, G: int, T: int, steps: int, root: Path) -> list[float]:
    from datasets import Dataset
    from transformers import Qwen3VLForConditionalGeneration, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from egm.models import Qwen3VLAdapter

    ad = Qwen3VLAdapter(str(ck))
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": ad.prompt(ex["sample"].sentence)}]}],
             "image": ex["image"]} for ex in examples]
    ds = Dataset.from_list(rows * (steps + 1))
    P = len(examples)
    args = GRPOConfig(
        output_dir=str(root / "trl"), per_device_train_batch_size=P * G, num_generations=G,
        max_completion_length=T, temperature=1.0, top_p=1.0, top_k=0, beta=0.0, loss_type="dapo",
        learning_rate=1e-5, max_steps=steps + 1, use_cpu=True, report_to=[], logging_steps=1000,
        save_strategy="no", generation_kwargs={"min_new_tokens": T}, gradient_accumulation_steps=1,
        max_grad_norm=1.0, shuffle_dataset=False, bf16=False, fp16=False,
    )
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    model = Qwen3VLForConditionalGeneration.from_pretrained(str(ck), dtype=torch.float32)
    processor = ad.processor

    def reward(completions, **kw):
        return [float(len(str(c))) % 7 for c in completions]

    tr = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=processor,
                     callbacks=[Timer()])
    tr.train()
    return times[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from egm.models.tiny import tiny_checkpoint

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        ck = tiny_checkpoint("qwen3_vl", root / "tiny")
        exs = _examples(root, a.prompts)
        ours = bench_egm(ck, exs, a.G, a.tokens, a.steps, root)
        try:
            theirs = bench_trl(ck, exs, a.G, a.tokens, a.steps, root)
        except Exception as e:  # noqa: BLE001 -- report, do not hide, why TRL could not run
            print(f"TRL GRPOTrainer failed on the tiny VLM: {type(e).__name__}: {e}")
            raise
    mo, mt = statistics.median(ours), statistics.median(theirs)
    print(f"setting: P={a.prompts} prompts x G={a.G} x T={a.tokens} tokens, {a.steps} timed steps, "
          f"{a.threads} thread(s), CPU, tiny Qwen3-VL")
    print(f"EGM GRPOModule  step median {mo:.3f} s  ({[round(x, 3) for x in ours]})")
    print(f"TRL GRPOTrainer step median {mt:.3f} s  ({[round(x, 3) for x in theirs]})")
    print(f"ratio EGM / TRL = {mo / mt:.2f}")


if __name__ == "__main__":
    main()
