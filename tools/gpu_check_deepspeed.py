"""GPU check of the DeepSpeed path (issue 15 item 5): 2 SFT steps and 2 GRPO steps (HF rollout
engine) on a randomly initialised model with Qwen3-VL-2B's shape, under Lightning's own
``DeepSpeedStrategy`` with ZeRO-2 and then ZeRO-3, on 1 GPU in bf16.

It reports, per stage, the time of each step and the HF engine's rollout tokens/s against the
memory-bandwidth bound of decoding: each decode step reads every language-model weight once for
the whole batch, so ``tokens/s <= batch x bandwidth / weight bytes`` (H200: 4.8 TB/s). KV-cache
reads and the prefill are left out, so the bound is optimistic. The CPU test suite proves the
numerics (``tests/test_strategies.py``); this checks that the same code runs on a GPU, at what
speed, and within memory.

No network and no weights are needed: the weights are random (written once to ``--work``, 4.3 GB
in bf16), the tokenizer, processor and chat template are those of egm's tiny Qwen3-VL (the model
keeps Qwen's 151,936-row vocabulary; ids the tiny tokenizer lacks decode to nothing). A random
model rarely stops, so nearly every response runs to ``--max-new-tokens`` and the reward is 0.
Needs torch with CUDA, lightning, transformers, peft and deepspeed (a wheel can be carried:
``pip install --no-deps deepspeed-*.whl``); run from the repository root::

    PYTHONPATH=. python tools/gpu_check_deepspeed.py --out results.json     # H200: < 8 minutes
    PYTHONPATH=. python tools/gpu_check_deepspeed.py --dry-run              # config + plan only
    PYTHONPATH=. python tools/gpu_check_deepspeed.py --device cpu --tiny    # the same flow on CPU

``--device cpu --tiny`` runs the tiny model under :class:`egm.strategies.CPUDeepSpeedStrategy`
(float32), to check this script without a GPU. A phase that would start after ``--budget-s``
seconds is skipped and reported as such, so the run stays within its time limit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Qwen/Qwen3-VL-2B-Instruct's config.json (transformers 5 key names); the token ids are taken
# from the tiny tokenizer when the checkpoint folder is written.
QWEN3_VL_2B: dict[str, Any] = {
    "text_config": {
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "max_position_embeddings": 262144, "attention_bias": False,
        "attention_dropout": 0.0, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
                            "mrope_interleaved": True},
    },
    "vision_config": {
        "depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16, "in_channels": 3,
        "hidden_act": "gelu_pytorch_tanh", "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "out_hidden_size": 2048, "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17],
    },
    "tie_word_embeddings": True,
}
H200_TBS = 4.8
_READY = "egm_gpu_check.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="egm's tiny Qwen3-VL instead of the 2B shape")
    ap.add_argument("--dry-run", action="store_true", help="build the config, print the plan and the bound; no run")
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    ap.add_argument("--steps", type=int, default=2, help="optimiser steps per SFT / GRPO run")
    ap.add_argument("--sft-batch", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=2, help="GRPO prompts per step")
    ap.add_argument("--samples", type=int, default=8, help="GRPO responses per prompt (G)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=8, help="GRPO responses per forward/backward")
    ap.add_argument("--bandwidth-tbs", type=float, default=H200_TBS, help="memory bandwidth, TB/s (H200: 4.8)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip phases that would start after this")
    ap.add_argument("--work", type=Path, default=Path("runs/gpu_check_deepspeed"))
    ap.add_argument("--out", type=Path, default=None, help="JSON report (default: <work>/report.json)")
    args = ap.parse_args(argv)
    if args.device == "cpu" and not args.tiny and not args.dry_run:
        ap.error("--device cpu trains only the tiny model: add --tiny (or --dry-run)")
    return args


def model_config(tok, tiny_config: dict[str, Any] | None = None):
    """Qwen3-VL-2B's config with the tiny tokenizer's special-token ids (or the tiny config)."""
    from transformers import Qwen3VLConfig

    if tiny_config is not None:
        return Qwen3VLConfig(**tiny_config)
    ids = tok.convert_tokens_to_ids
    text = {**QWEN3_VL_2B["text_config"], "pad_token_id": tok.pad_token_id, "bos_token_id": None,
            "eos_token_id": ids("<|im_end|>")}
    return Qwen3VLConfig(text_config=text, vision_config=QWEN3_VL_2B["vision_config"],
                         tie_word_embeddings=QWEN3_VL_2B["tie_word_embeddings"],
                         image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                         vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def decode_weight_bytes(config, bytes_per_param: int = 2) -> tuple[int, int]:
    """(all parameters, bytes one decode step reads: the language model and the LM head, tied
    weights once), counted on the meta device."""
    from transformers import Qwen3VLForConditionalGeneration

    from egm.compat import model_from_config

    with torch.device("meta"):
        model = model_from_config(Qwen3VLForConditionalGeneration, config)
    params = dict(model.named_parameters())  # tied parameters appear once
    decode = sum(p.numel() for n, p in params.items() if ".visual." not in n)
    return sum(p.numel() for p in params.values()), decode * bytes_per_param


def tokens_per_s_bound(batch: int, weight_bytes: int, bandwidth_tbs: float) -> float:
    return batch * bandwidth_tbs * 1e12 / weight_bytes


def build_checkpoint(work: Path, tiny: bool, device: str) -> Path:
    """A checkpoint folder: the tiny one, or the 2B shape with random bf16 weights (written once)."""
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    from egm.compat import model_from_config
    from egm.models.tiny import tiny_checkpoint

    tiny_dir = tiny_checkpoint("qwen3_vl", work / "tiny")
    if tiny:
        return tiny_dir
    out = work / "qwen3_vl_2b_random"
    if (out / _READY).exists():
        return out
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(tiny_dir, out, ignore=shutil.ignore_patterns("*.safetensors", "config.json", "egm_tiny.json",
                                                                  "generation_config.json"))
    cfg = model_config(AutoTokenizer.from_pretrained(tiny_dir))
    torch.manual_seed(0)
    with torch.device(device):
        model = model_from_config(Qwen3VLForConditionalGeneration, cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    (out / _READY).write_text(json.dumps({"shape": "Qwen3-VL-2B", "seed": 0}))
    return out


class StepTimer:
    """Wall time of every training batch (CUDA synchronised) and the GRPO module's step stats."""

    def __init__(self, device: str):
        self.device, self.times, self.stats = device, [], []
        self._t0 = 0.0

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def callback(self):
        from lightning.pytorch.callbacks import Callback

        timer = self

        class _Timer(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                timer._sync()
                timer._t0 = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                timer._sync()
                timer.times.append(time.perf_counter() - timer._t0)
                stats = getattr(pl_module, "last_stats", None) or {}
                keep = ("train/rollout_tokens_per_s", "time/rollout_s", "time/update_s", "train/response_len")
                timer.stats.append({k: float(stats[k]) for k in keep if k in stats})

        return _Timer()


def strategy(stage: int, device: str):
    if device == "cpu":
        from egm.strategies import CPUDeepSpeedStrategy

        return CPUDeepSpeedStrategy(stage=stage)
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(stage=stage)


def run_phase(kind: str, stage: int, ck: Path, train: str, args) -> dict[str, Any]:
    """One fit of ``args.steps`` optimiser steps; returns step times (and GRPO rollout stats)."""
    import lightning as L

    from egm.data.datamodule import GroundingDataModule
    from egm.generation.sampling import SamplingParams
    from egm.models import Qwen3VLAdapter

    dtype = "float32" if args.device == "cpu" else "bfloat16"
    adapter = Qwen3VLAdapter(str(ck), torch_dtype=dtype, max_length=1024)
    if kind == "sft":
        from egm.sft import SFTModule

        module, batch = SFTModule(adapter, lr=1e-5, warmup_steps=0), args.sft_batch
    else:
        from egm.rl.module import GRPOModule

        rollout = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, max_new_tokens=args.max_new_tokens)
        module = GRPOModule(adapter, lr=3e-6, warmup_steps=0, n_samples=args.samples, rollout=rollout,
                            micro_batch_size=args.micro_batch, max_grad_norm=None, engine="hf")
        batch = args.prompts
    timer = StepTimer(args.device)
    trainer = L.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
                        strategy=strategy(stage, args.device),
                        precision="bf16-mixed" if args.device == "cuda" else "32-true",
                        max_steps=args.steps, gradient_clip_val=1.0 if kind == "sft" else None,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[timer.callback()])
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.fit(module, GroundingDataModule(train=train, batch_size=batch, seed=0))
    out: dict[str, Any] = {"kind": kind, "stage": stage, "fit_s": time.perf_counter() - t0,
                           "step_s": timer.times, "steps": timer.stats if kind == "grpo" else []}
    if args.device == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    del trainer, module
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return out


def report(plan: dict[str, Any], phases: list[dict[str, Any]]) -> list[str]:
    lines = [f"model: {plan['model']}, {plan['params'] / 1e6:,.1f} M parameters, decode reads "
             f"{plan['decode_weight_bytes'] / 1e6:,.1f} MB/step; rollout batch {plan['rollout_batch']}: bound "
             f"{plan['bound_tokens_per_s']:,.0f} tokens/s at {plan['bandwidth_tbs']} TB/s"]
    for p in phases:
        if p.get("skipped"):
            lines.append(f"ZeRO-{p['stage']} {p['kind']}: skipped ({p['skipped']})")
            continue
        steps = ", ".join(f"{t:.2f}" for t in p["step_s"])
        line = f"ZeRO-{p['stage']} {p['kind']}: steps {steps} s (fit {p['fit_s']:.1f} s"
        line += f", peak {p['peak_mem_gb']:.1f} GB)" if "peak_mem_gb" in p else ")"
        for i, s in enumerate(p["steps"]):
            tps = s.get("train/rollout_tokens_per_s", 0.0)
            line += (f"\n    step {i}: rollout {s.get('time/rollout_s', 0):.2f} s, {tps:,.0f} tokens/s = "
                     f"{tps / plan['bound_tokens_per_s']:.1%} of the bound, update {s.get('time/update_s', 0):.2f} s, "
                     f"mean response {s.get('train/response_len', 0):.0f} tokens")
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.device == "cuda" and not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu --tiny, or --dry-run")
    if not args.dry_run:
        try:
            import deepspeed  # noqa: F401
        except ImportError as e:  # before minutes of set-up, not after
            sys.exit(f"deepspeed does not import ({e}): install its wheel and its dependencies (einops, hjson, "
                     "msgpack, ninja, psutil, py-cpuinfo, pydantic) with pip install --no-deps")
    args.work.mkdir(parents=True, exist_ok=True)
    from transformers import AutoConfig, AutoTokenizer

    from egm.models.tiny import tiny_checkpoint

    tiny_dir = tiny_checkpoint("qwen3_vl", args.work / "tiny")
    tiny_cfg = AutoConfig.from_pretrained(tiny_dir).to_dict() if args.tiny else None
    config = model_config(AutoTokenizer.from_pretrained(tiny_dir), tiny_cfg)
    params, weight_bytes = decode_weight_bytes(config, 4 if args.device == "cpu" else 2)
    batch = args.prompts * args.samples
    plan = {"model": "tiny Qwen3-VL" if args.tiny else "Qwen3-VL-2B shape (random weights)", "params": params,
            "decode_weight_bytes": weight_bytes, "rollout_batch": batch, "bandwidth_tbs": args.bandwidth_tbs,
            "bound_tokens_per_s": tokens_per_s_bound(batch, weight_bytes, args.bandwidth_tbs),
            "stages": args.stages, "steps": args.steps, "max_new_tokens": args.max_new_tokens,
            "device": args.device, "torch": torch.__version__}
    phases: list[dict[str, Any]] = []
    if not args.dry_run:
        from egm.data.synthetic import make_synthetic

        n = max(args.sft_batch, args.prompts) * args.steps
        train = make_synthetic(str(args.work / "data"), n_train=n, n_val=1, n_test=1, image_size=256)["train"]
        ck = build_checkpoint(args.work, args.tiny, args.device)
        plan["setup_s"] = time.perf_counter() - t_start
        for stage in args.stages:
            for kind in ("sft", "grpo"):
                elapsed = time.perf_counter() - t_start
                if elapsed > args.budget_s:
                    phases.append({"kind": kind, "stage": stage, "skipped": f"budget: {elapsed:.0f} s elapsed"})
                    continue
                phases.append(run_phase(kind, stage, ck, train, args))
    result = {"plan": plan, "phases": phases, "total_s": time.perf_counter() - t_start}
    print("\n".join(report(plan, phases)) + f"\ntotal {result['total_s']:.0f} s")
    out = args.out or args.work / "report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
