"""Does the data pipeline keep the tiny model's training step fed? (issue 4)

Measures, in one process on the synthetic world (128 px images, oracle reasoning targets):

1. loader: samples/s of PIL open + decode + list collate (:func:`bench_loader`, best of ``epochs``);
2. collate: samples/s of the adapter's ``collate_train`` (chat template, tokenisation, image
   patches, label masking) on batches the loader produced;
3. step: samples/s of one training step of the tiny checkpoint on those collated batches
   (forward + backward + AdamW step, median of ``steps``);

and prints the ratios loader/step and (loader + collate in one worker)/step. A ratio above 1
means one worker prepares batches faster than the step consumes them; with ``num_workers`` > 0
the loader's share runs beside the step.

    python tools/bench_data.py --n_train 512 --num_workers 0 --threads 1
    python tools/bench_data.py --train data/refcoco_train.jsonl   # any manifest
"""

from __future__ import annotations

import itertools
import statistics
import time
from typing import Literal

import torch
from jsonargparse import CLI

from egm.data.datamodule import GroundingDataModule
from egm.data.synthetic import make_synthetic
from egm.models import ADAPTERS
from egm.models.tiny import tiny_checkpoint


def bench_loader(train: str, batch_size: int = 16, num_workers: int = 0, epochs: int = 2) -> dict[str, float]:
    """Loader throughput of the manifest ``train``: samples/s of PIL open + decode + default (list)
    collate. Epoch 0 includes worker start-up; the reported rate is the best epoch."""
    t0 = time.perf_counter()
    dm = GroundingDataModule(train=train, batch_size=batch_size, num_workers=num_workers)
    dm.setup("fit")
    setup_s = time.perf_counter() - t0
    loader = dm.train_dataloader()
    rates = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        t0, n = time.perf_counter(), 0
        for batch in loader:
            n += len(batch)
        rates.append(n / (time.perf_counter() - t0))
    out = {"samples": float(len(loader.sampler)), "setup_s": setup_s, "samples_per_s": max(rates)}
    print(f"[bench_data] {train}: {int(out['samples'])} samples, setup (image checks) {setup_s:.2f}s, "
          f"loader {out['samples_per_s']:.0f} samples/s (batch {batch_size}, workers {num_workers})")
    return out


def main(
    train: str | None = None,
    synthetic_dir: str = "runs/bench_data",
    n_train: int = 2000,
    batch_size: int = 16,
    num_workers: int = 0,
    epochs: int = 2,
    family: Literal["qwen3_vl", "internvl"] = "qwen3_vl",
    tiny_root: str = "runs/tiny",
    collate_batches: int = 8,
    steps: int = 5,
    lr: float = 1e-4,
    threads: int = 1,
) -> dict[str, float]:
    torch.set_num_threads(threads)
    if train is None:  # the synthetic world, generated once (idempotent)
        train = make_synthetic(synthetic_dir, n_train=n_train, n_val=50, n_test=50)["train"]
    loader_rate = bench_loader(train, batch_size=batch_size, num_workers=num_workers, epochs=epochs)["samples_per_s"]

    dm = GroundingDataModule(train=train, batch_size=batch_size)
    dm.setup("fit")
    batches = list(itertools.islice(dm.train_dataloader(), collate_batches))
    adapter = ADAPTERS[family](str(tiny_checkpoint(family, tiny_root)))
    adapter.collate_train(batches[0])  # warm-up (tokenizer caches)
    t0 = time.perf_counter()
    collated = [adapter.collate_train(b) for b in batches]
    collate_rate = sum(len(b) for b in batches) / (time.perf_counter() - t0)

    torch.manual_seed(0)
    model = adapter.load_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    times = []
    for i in range(steps + 1):  # the first step (allocations, AdamW state) is a warm-up
        inputs = collated[i % len(collated)]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    step_rate = batch_size / statistics.median(times[1:])

    worker_rate = 1 / (1 / loader_rate + 1 / collate_rate)  # one worker loads, then collates
    seq = statistics.mean(c["input_ids"].shape[1] for c in collated)
    n_params = sum(p.numel() for p in model.parameters())
    out = {"loader_samples_per_s": loader_rate, "collate_samples_per_s": collate_rate,
           "worker_samples_per_s": worker_rate, "step_samples_per_s": step_rate,
           "loader_over_step": loader_rate / step_rate, "worker_over_step": worker_rate / step_rate}
    print(f"[bench_data] tiny {family} ({n_params / 1e6:.2f} M params), batch {batch_size}, 128 px, mean seq {seq:.0f}, "
          f"torch threads {threads}, loader workers {num_workers}")
    print(f"  loader (open + decode)         {loader_rate:8.0f} samples/s")
    print(f"  collate_train                  {collate_rate:8.0f} samples/s")
    print(f"  loader + collate, one worker   {worker_rate:8.0f} samples/s")
    print(f"  train step (fwd+bwd+AdamW)     {step_rate:8.1f} samples/s ({statistics.median(times[1:]) * 1e3:.0f} ms/step)")
    print(f"  ratio loader / step            {out['loader_over_step']:8.1f}x")
    print(f"  ratio (loader + collate) / step {out['worker_over_step']:7.1f}x")
    return out


if __name__ == "__main__":
    CLI(main)
