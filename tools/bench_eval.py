"""Evaluation throughput: batched vs one-by-one generation on a tiny model, in one run (issue 7).

Runs :func:`egm.eval.runner.evaluate` with :func:`egm.eval.checkpoint.hf_generate_fn` (greedy, Table 7
decoding but ``max_new_tokens`` capped) twice over the same synthetic val samples, with generation
batch ``batch_size`` and with batch 1, and prints samples/s of each (image loading, prompt
collation, generation, decoding, parsing and scoring included; no latency pass) and their ratio.
It also counts the answers the two passes agree on (greedy, left-padded: they should all agree).

    python tools/bench_eval.py --n 64 --batch_size 16 --max_new_tokens 96 --threads 1
    python tools/bench_eval.py --checkpoint runs/demo/sft/export   # a trained tiny model
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import CLI

from egm.data.manifest import read_manifest
from egm.data.synthetic import make_synthetic
from egm.eval.checkpoint import hf_generate_fn
from egm.eval.runner import evaluate
from egm.generation.sampling import SamplingParams
from egm.models import ADAPTERS
from egm.models.tiny import tiny_checkpoint

SPLIT = "synthetic_val"


def main(
    n: int = 64,
    batch_size: int = 16,
    max_new_tokens: int = 96,
    family: Literal["qwen3_vl", "internvl"] = "qwen3_vl",
    checkpoint: str | None = None,
    synthetic_dir: str = "runs/bench_eval",
    image_size: int = 128,
    tiny_root: str = "runs/tiny",
    threads: int = 1,
) -> dict[str, float]:
    torch.set_num_threads(threads)
    val = make_synthetic(synthetic_dir, n_train=0, n_val=n, n_test=0, image_size=image_size)["val"]
    samples = read_manifest(val)[:n]
    adapter = ADAPTERS[family](checkpoint or str(tiny_checkpoint(family, tiny_root)))
    torch.manual_seed(0)
    model = adapter.load_model().eval()
    gen = hf_generate_fn(adapter, model, SamplingParams(max_new_tokens=max_new_tokens))

    rates, tokens, answers = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="egm-bench-eval-") as tmp:
        evaluate(gen, {SPLIT: samples[:2]}, Path(tmp) / "warmup", batch_size=2, latency_fraction=0,
                 parse_fn=adapter.parse)
        for bs in (batch_size, 1):
            out = Path(tmp) / f"batch{bs}"
            t0 = time.perf_counter()
            res = evaluate(gen, {SPLIT: samples}, out, batch_size=bs, latency_fraction=0, parse_fn=adapter.parse)
            rates[bs] = len(samples) / (time.perf_counter() - t0)
            tokens[bs] = res["splits"][SPLIT]["mean_tokens"]
            recs = [json.loads(x) for x in (out / "predictions" / f"{SPLIT}.jsonl").read_text().splitlines()]
            answers[bs] = {r["id"]: r["answer"] for r in recs}
    same = sum(answers[batch_size][i] == answers[1][i] for i in answers[1])
    result = {"batched_samples_per_s": rates[batch_size], "single_samples_per_s": rates[1],
              "speedup": rates[batch_size] / rates[1], "mean_tokens": tokens[1], "same_answers": same}
    name = checkpoint or f"tiny {family}"
    print(f"[bench_eval] {name}: {len(samples)} synthetic val samples ({image_size} px), greedy, "
          f"max_new_tokens {max_new_tokens}, torch threads {threads}")
    print(f"  batch {batch_size:<3d} {rates[batch_size]:7.2f} samples/s (mean {tokens[batch_size]:.1f} generated tokens)")
    print(f"  batch 1   {rates[1]:7.2f} samples/s (mean {tokens[1]:.1f} generated tokens)")
    print(f"  batched / one-by-one: {result['speedup']:.1f}x; identical answers {same}/{len(answers[1])}")
    return result


if __name__ == "__main__":
    CLI(main)
