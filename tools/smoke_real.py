"""Real-size smoke run on CPU (opt-in: ``make smoke-real``): released architectures with random
weights (egm.models.real), one 586x480 image, every phase of the path, wall time and peak RSS each.

Phases, each in its own process so that its peak RSS is its own:

* ``sft``        one SFT optimiser step (batch 1);
* ``grpo_hf``    one GRPO step, G = 2 responses of up to 32 new tokens, HF ``generate`` rollouts;
* ``grpo_vllm``  the same with vLLM's CPU build (rollouts, then a weight push);
* ``eval_hf`` / ``eval_vllm``  ``egm evaluate`` on 4 samples (``--eval-tokens`` new tokens at most).

Defaults follow issue 22: InternVL3-1B-hf with full fine-tuning, Qwen3-VL-2B-Thinking with LoRA
(full AdamW on 2.1 B parameters needs ~34 GB in fp32), bf16 weights. A random model never
writes a parsable box, so GRPO rewards are a fixed hash of each response's text (spread, so the
update is not zero). A phase that fails is recorded with its error and the run goes on.

    PYTHONPATH=. python tools/smoke_real.py                                  # the released sizes
    PYTHONPATH=. python tools/smoke_real.py --size tiny --dtype float32      # dry run: real shapes, tiny trunk

Writes ``<work>/smoke_real.json`` and ``<work>/smoke_real.md`` (the table, with the command).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

PHASES = ("sft", "grpo_hf", "grpo_vllm", "eval_hf", "eval_vllm")
SIZES = {"internvl": "1B", "qwen3_vl": "2B"}  # issue 22: InternVL3-1B-hf, Qwen3-VL-2B-Thinking
RESOLUTION = {"qwen3_vl": {"max_pixels": 1048576}, "internvl": {"max_patches": 12}}  # the recipes'


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=["internvl", "qwen3_vl"], choices=["internvl", "qwen3_vl"])
    ap.add_argument("--size", default="released", help="'released' (InternVL 1B, Qwen3-VL 2B), 'tiny', or a size")
    ap.add_argument("--dtype", default="bfloat16", help="weights, training and vLLM dtype")
    ap.add_argument("--lora", nargs="*", default=["qwen3_vl"], help="families trained with LoRA (rank 16)")
    ap.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    ap.add_argument("--new-tokens", type=int, default=32, help="GRPO rollout length")
    ap.add_argument("--eval-tokens", type=int, default=32, help="egm evaluate max_new_tokens")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--work", type=Path, default=Path("runs/smoke_real"))
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)  # internal: run one phase
    ap.add_argument("--family", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _size(args: argparse.Namespace, family: str) -> str:
    return SIZES[family] if args.size == "released" else args.size


def world(work: Path) -> str:
    """Four 586x480 samples (a RefCOCO image size) in a manifest; returns its path."""
    import numpy as np
    from PIL import Image

    from egm.data.manifest import Sample, write_manifest

    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(4):
        p = work / f"img{i}.png"
        if not p.exists():
            Image.fromarray(rng.integers(0, 255, (480, 586, 3), dtype=np.uint8)).save(p)
        samples.append(Sample(id=f"s{i}", image=str(p.resolve()), width=586, height=480, sentence=f"the man in red {i}",
                              task="vanilla", box=[40.0, 60.0, 300.0, 420.0], split="refcoco_unc_val",
                              source="smoke", reasoning="The man on the left wears a red shirt."))
    man = work / "refcoco.jsonl"
    write_manifest(man, samples)
    return str(man)


def spread_reward(texts, gt_boxes, sizes, parse=None, alpha=0.5):
    """GRPO reward of a random model: a fixed hash of each text in [0, 1) (no response parses)."""
    import numpy as np

    from egm.reward import grounding_reward

    out = grounding_reward([None] * len(texts), gt_boxes, alpha)
    return type(out)(np.array([zlib.crc32(t.encode()) % 97 / 97 for t in texts]), out.iou, out.success,
                     out.parse_ok, out.failures)


def run_phase(args: argparse.Namespace, ck: str, manifest: str) -> dict[str, Any]:
    """One phase in this process; returns its measurements."""
    import lightning as L
    import torch

    import egm.rl.module as rl_module
    from egm.data.datamodule import GroundingDataModule
    from egm.data.manifest import read_manifest
    from egm.generation.sampling import SamplingParams
    from egm.models import ADAPTERS, LoraSettings

    torch.set_num_threads(args.threads)
    fam = args.family
    lora = LoraSettings(rank=16, alpha=32, dropout=0.0) if fam in args.lora else None
    kw = dict(torch_dtype=args.dtype, max_length=4096, gradient_checkpointing=True, **RESOLUTION[fam])
    out: dict[str, Any] = {}
    ad = ADAPTERS[fam](ck, lora=lora, **kw)
    s = read_manifest(manifest)[0]
    from PIL import Image

    enc = ad.collate_generate([{"sample": s, "image": Image.open(s.image).convert("RGB")}])
    out["image_tokens"] = ad.image_token_count(enc["input_ids"])
    out["prompt_tokens"] = int(enc["input_ids"].shape[1])
    quiet = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                 enable_model_summary=False, limit_val_batches=0, max_steps=1)
    precision = "bf16-true" if args.dtype == "bfloat16" else "32-true"
    t0 = time.perf_counter()
    if args.phase == "sft":
        from egm.sft import SFTModule

        m = SFTModule(ad, lr=1e-5, warmup_steps=0)
        L.Trainer(precision=precision, **quiet).fit(m, GroundingDataModule(train=manifest, batch_size=1))
    elif args.phase in ("grpo_hf", "grpo_vllm"):
        from egm.generation.vllm import VLLMSettings
        from egm.rl.module import GRPOModule

        rl_module.reward_from_texts = spread_reward  # see the module docstring
        engine = args.phase.split("_")[1]
        m = GRPOModule(ad, lr=3e-6, warmup_steps=0, n_samples=2, micro_batch_size=2, engine=engine,
                       rollout=SamplingParams(temperature=0.7, top_p=0.9, top_k=50, max_new_tokens=args.new_tokens),
                       vllm=VLLMSettings(dtype=args.dtype, enforce_eager=True, max_model_len=8192, max_num_seqs=4))
        L.Trainer(precision=precision, **quiet).fit(m, GroundingDataModule(train=manifest, batch_size=1))
        out["loss"] = m.last_stats.get("loss")
        if engine == "vllm":
            m.engine.update_weights(m.model)
    else:
        from egm.eval.checkpoint import evaluate_checkpoint

        res = evaluate_checkpoint(ck, {"refcoco_unc_val": manifest}, str(args.work / f"eval_{fam}_{args.phase}"),
                                  family=fam, torch_dtype=args.dtype, device="cpu", batch_size=4,
                                  max_new_tokens=args.eval_tokens, latency_fraction=0.0,
                                  engine=args.phase.split("_")[1], vllm_enforce_eager=True, **RESOLUTION[fam])
        out["n"] = res["splits"]["refcoco_unc_val"]["n"]
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def build(args: argparse.Namespace, family: str) -> str:
    from egm.models.real import MARKER, make_real

    size = _size(args, family)
    out = args.work / f"{family}-{size}-{args.dtype}"
    if not (out / MARKER).exists():
        make_real(family, out, size=size, dtype=args.dtype if size != "tiny" else "float32", cache_dir=args.work)
    return str(out)


def table(rows: list[dict[str, Any]], command: str) -> str:
    lines = [f"Command: `{command}`", "",
             "| family | size | phase | image tokens | prompt tokens | wall (s, whole process) | phase (s) | peak RSS (GiB) | result |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['size']} | {r['phase']} | {r.get('image_tokens', '')} | "
                     f"{r.get('prompt_tokens', '')} | {r['process_s']} | {r.get('wall_s', '')} | "
                     f"{r['peak_rss_gib']} | {r.get('error') or 'ok'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.phase:  # child: one phase, JSON on the last stdout line
        manifest = str(args.work / "refcoco.jsonl")
        res = run_phase(args, build(args, args.family), manifest)
        res["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        print("SMOKE " + json.dumps(res), flush=True)
        return 0
    world(args.work)
    command = "PYTHONPATH=. python tools/smoke_real.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = []
    for fam in args.families:
        build(args, fam)
        for phase in args.phases:
            cmd = [sys.executable, __file__, "--phase", phase, "--family", fam, "--size", args.size, "--dtype",
                   args.dtype, "--work", str(args.work), "--threads", str(args.threads), "--new-tokens",
                   str(args.new_tokens), "--eval-tokens", str(args.eval_tokens), "--lora", *args.lora]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True)
            row: dict[str, Any] = {"family": fam, "size": _size(args, fam), "phase": phase,
                                   "process_s": round(time.perf_counter() - t0, 1), "peak_rss_gib": ""}
            last = [ln for ln in p.stdout.splitlines() if ln.startswith("SMOKE ")]
            if p.returncode == 0 and last:
                row.update(json.loads(last[-1][6:]))
            else:
                tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or [f"exit {p.returncode}"]
                row["error"] = f"exit {p.returncode}: {tail[0][:200]}"
                (args.work / f"{fam}_{phase}.log").write_text(p.stdout + p.stderr)
            print(json.dumps(row), flush=True)
            rows.append(row)
    (args.work / "smoke_real.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    (args.work / "smoke_real.md").write_text(table(rows, command))
    print(table(rows, command))
    return int(any("error" in r for r in rows))


if __name__ == "__main__":
    sys.exit(main())
