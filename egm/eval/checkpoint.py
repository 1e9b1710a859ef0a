"""``egm evaluate``: a Hugging Face checkpoint on split manifests, on transformers or vLLM, through
:func:`egm.eval.runner.evaluate`.

Prompts follow paper Figure 7 (the adapter's ``collate_generate``) and decoding follows Table 7
(``TABLE7_INFERENCE``: greedy, max length 4096, repetition penalty 1.0). The two ``generate_fn``
wrappers below turn the generation layer (:func:`egm.generation.hf.hf_generate`, or any
:class:`~egm.generation.rollout.RolloutEngine` such as vLLM's) into what the runner calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from egm.compat import model_from_config
from egm.errors import InputError
from egm.eval.budget import budget_generate_fn, budget_sweep, budget_table, check_budgets
from egm.eval.latency import cpu_name
from egm.eval.report import results_summary
from egm.eval.runner import GenerateFn, GenerationOutput, evaluate
from egm.generation.budget import BudgetPlan, hf_budget_generate, vllm_budget_generate
from egm.generation.hf import count_generated, hf_generate
from egm.generation.rollout import RolloutEngine
from egm.generation.sampling import TABLE7_INFERENCE, SamplingParams
from egm.generation.vllm import VLLMEngine
from egm.models import ADAPTERS
from egm.models.base import GroundingAdapter


def hf_generate_fn(adapter: GroundingAdapter, model: torch.nn.Module,
                   sampling: SamplingParams = TABLE7_INFERENCE) -> GenerateFn:
    """Wrap ``adapter`` and ``model`` as a ``generate_fn`` (the number of generated tokens counts up to
    and including the first stop token: padding after an early stop is not generation)."""
    device = next(model.parameters()).device

    @torch.inference_mode()
    def generate(examples: Sequence[Mapping[str, Any]]) -> list[GenerationOutput]:
        batch = adapter.collate_generate(list(examples))
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        new = hf_generate(adapter, model, batch, sampling)
        counts = count_generated(new, adapter.stop_token_ids())
        return [GenerationOutput(t, n) for t, n in zip(adapter.decode(new, 0), counts)]

    return generate


def engine_generate_fn(engine: RolloutEngine, sampling: SamplingParams = TABLE7_INFERENCE) -> GenerateFn:
    """A ``generate_fn`` over a rollout engine: one greedy answer per example. This is how
    evaluation runs on vLLM (:class:`egm.generation.vllm.VLLMEngine`)."""

    def generate(examples: Sequence[Mapping[str, Any]]) -> list[GenerationOutput]:
        ro = engine.generate(list(examples), n=1, sampling=sampling)
        return [GenerationOutput(t, int(n)) for t, n in zip(ro.texts, ro.lengths.tolist())]

    return generate


def evaluate_checkpoint(
    checkpoint: str,
    manifests: dict[str, str],
    out_dir: str,
    family: str = "qwen3_vl",
    model_name: str | None = None,
    batch_size: int = 8,
    latency_fraction: float = 0.1,
    seed: int = 0,
    num_gpus: int = 1,
    torch_dtype: str = "auto",
    device: str = "auto",
    max_new_tokens: int = 4096,
    engine: str = "hf",
    vllm_gpu_memory_utilization: float = 0.85,
    vllm_enforce_eager: bool = False,
    vllm_max_model_len: int | None = None,
    reasoning_budget: int | list[int] | None = None,
    answer_tokens: int = 64,
    max_pixels: int | None = None,
    max_patches: int | None = None,
) -> dict[str, Any]:
    """Evaluate a Hugging Face checkpoint on split manifests (CLI entry point; Table 7 decoding).

    Args:
        checkpoint: model folder or hub id.
        manifests: split name -> JSONL manifest, e.g. ``{refcoco_unc_val: data/refcoco_unc_val.jsonl}``.
        out_dir: predictions, latency records and results.json go here; rerunning resumes.
        family: ``qwen3_vl`` or ``internvl`` (prompt of Figure 7, answer format, parser).
        model_name: row name in the reports (default: the checkpoint's folder name).
        batch_size: generation batch of the accuracy pass (latency always uses batch size 1).
        latency_fraction: share of each RefCOCO split timed for latency (paper: 10%); 0 skips.
        seed: seed of the latency subset.
        num_gpus: GPUs the model runs on (GPU latency = latency x num_gpus).
        torch_dtype: weights dtype; ``auto``: bfloat16 on CUDA, float32 on a CPU.
        device: where the model runs; ``auto``: ``cuda`` when available, else ``cpu``.
        max_new_tokens: Table 7 "max length".
        engine: ``hf`` (transformers ``generate``, any device) or ``vllm`` (``pip install 'egm[gpu]'``
            on GPUs; vLLM's CPU build in ``make test``'s venv), as the paper measured (Sec. 5.1: "all
            rollouts and inference ... vLLM").
        vllm_gpu_memory_utilization: share of the GPU vLLM may use (``engine=vllm``).
        vllm_enforce_eager: no CUDA graphs / compilation (faster start; ``engine=vllm``).
        vllm_max_model_len: vLLM's context length (``engine=vllm``); ``None``: the adapter's prompt
            cap (``max_length``, 4096) plus ``max_new_tokens``, at most the checkpoint's declared
            context. Not the checkpoint's own context alone:
            Qwen3-VL declares 262,144 positions, whose KV cache alone (~28 GiB at 2B) vLLM must be
            able to hold before it starts, which a CPU or a small GPU cannot.
        reasoning_budget: a test-time reasoning budget, or a list of them (a sweep, e.g.
            ``[0, 16, 32, 64]``): reasoning capped at ``B`` generated tokens, then the answer is
            forced (:mod:`egm.generation.budget`). Each budget is evaluated into
            ``out_dir/budget_<B>``; returns the summary of :func:`egm.eval.budget.budget_sweep`
            (also ``budget_sweep.json|md``, ``budget_curves.png|svg``). ``None``: no budget.
        answer_tokens: answer allowance after a forced end of reasoning (``reasoning_budget``).
        max_pixels: Qwen3-VL image area cap (``None``: the checkpoint's processor; evaluate at the
            recipe's training resolution, see configs/).
        max_patches: InternVL tile cap (``None``: the checkpoint's processor).
    """
    if family not in ADAPTERS:
        raise InputError(f"family must be one of {sorted(ADAPTERS)}, got {family!r}")
    if engine not in ("hf", "vllm"):
        raise InputError(f"engine must be 'hf' or 'vllm', got {engine!r}")
    device, torch_dtype = resolve_device(device, torch_dtype)
    resolution = {"max_pixels": max_pixels} if family == "qwen3_vl" else {"max_patches": max_patches}
    if (max_pixels if family != "qwen3_vl" else max_patches) is not None:
        raise InputError(f"family {family!r} takes {next(iter(resolution))}, not "
                         f"{'max_patches' if family == 'qwen3_vl' else 'max_pixels'}")
    adapter = ADAPTERS[family](checkpoint, torch_dtype=torch_dtype, **resolution)
    sampling = SamplingParams(**{**vars(TABLE7_INFERENCE), "max_new_tokens": max_new_tokens})
    if reasoning_budget is not None:  # fail at the edge: bad budgets, a layout without a delimiter
        budgets = check_budgets(reasoning_budget)
        BudgetPlan.of(adapter, budgets[0], sampling, answer_tokens)
    if engine == "vllm":
        from transformers import AutoConfig

        # vLLM picks its own platform (CUDA, or the CPU build): `device` does not apply; the model
        # runs in `torch_dtype` as with HF, with the context this evaluation can use (capped by
        # the checkpoint's declared one, which vLLM will not exceed).
        config = AutoConfig.from_pretrained(checkpoint)
        declared = getattr(getattr(config, "text_config", None) or config, "max_position_embeddings", None)
        context = vllm_max_model_len or adapter.max_length + max_new_tokens
        eng = VLLMEngine(adapter, gpu_memory_utilization=vllm_gpu_memory_utilization, dtype=torch_dtype,
                         enable_sleep_mode=False, enforce_eager=vllm_enforce_eager,
                         max_model_len=min(context, declared) if declared else context)
        generate_fn = engine_generate_fn(eng, sampling)
        n_params = _count_params(config)
    else:
        model = adapter.load_model().to(device).eval()
        n_params = sum(p.numel() for p in model.parameters())
        generate_fn = hf_generate_fn(adapter, model, sampling)
    if reasoning_budget is not None:
        def budget_fn(b: int) -> GenerateFn:
            if engine == "vllm":
                return budget_generate_fn(lambda exs: vllm_budget_generate(eng, exs, b, sampling, answer_tokens))
            return budget_generate_fn(lambda exs: hf_budget_generate(adapter, model, exs, b, sampling, answer_tokens))

        summary = budget_sweep(budget_fn, budgets, manifests, out_dir, answer_tokens=answer_tokens,
                            batch_size=batch_size, latency_fraction=latency_fraction, seed=seed,
                            num_gpus=num_gpus, parse_fn=adapter.parse, n_params=n_params,
                            model_name=model_name or Path(checkpoint.rstrip("/")).name,
                            extra={"device": device_info(device, num_gpus)})
        print(budget_table(summary["budgets"]), flush=True)
        return summary
    # what the latency was measured on goes into results.json: a CPU run has no "GPU latency"
    results = evaluate(generate_fn, manifests, out_dir, batch_size=batch_size,
                       latency_fraction=latency_fraction, seed=seed, num_gpus=num_gpus, parse_fn=adapter.parse,
                       model_name=model_name or Path(checkpoint.rstrip("/")).name, n_params=n_params,
                       extra={"device": device_info(device, num_gpus)})
    print(results_summary(results), flush=True)
    return results


def resolve_device(device: str = "auto", torch_dtype: str = "auto") -> tuple[str, str]:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; dtype ``auto`` -> bfloat16 on CUDA,
    float32 on a CPU (bfloat16 matmuls are slow or unsupported on many CPUs). Explicit values pass."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch_dtype == "auto":
        torch_dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    return device, torch_dtype


def device_info(device: str, num_gpus: int = 1) -> dict[str, Any]:
    """results.json ``device``: ``{type: cpu, name, threads}`` or ``{type: cuda, name, num_gpus}``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(dev), "num_gpus": num_gpus}
    if dev.type == "cpu":
        return {"type": "cpu", "name": cpu_name(), "threads": torch.get_num_threads()}
    return {"type": dev.type, "name": str(dev), "num_gpus": num_gpus}


def _count_params(config: Any) -> int | None:
    """Parameter count without loading weights (the model lives inside vLLM)."""
    try:
        import transformers

        with torch.device("meta"):
            model = model_from_config(getattr(transformers, config.architectures[0]), config)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # an unknown architecture only loses the #Params column
        return None
