"""vLLM rollouts colocated with the trainer (paper Sec. 5.1: "all rollouts ... use the vLLM engine").

Each training process owns one in-process ``vllm.LLM`` on its own GPU (``distributed_executor_
backend="external_launcher"``, as TRL's ``vllm_mode="colocate"``), sharing memory with the
trainer through sleep mode:

1. ``update_weights(model)``: ``wake_up(tags=["weights"])``, then the policy's current weights
   (LoRA merged with ``merge_adapter()``/``unmerge_adapter()``, names stripped of PEFT's
   prefixes) are pushed parameter by parameter with the vLLM model's own ``load_weights``
   (``llm.llm_engine.model_executor.driver_worker...model_runner.model``, the path TRL 1.16's
   ``VLLMGeneration.sync_weights`` uses), then the prefix cache is reset;
2. ``generate``: ``wake_up(tags=["kv_cache"])``, sample ``n`` responses per prompt in fp16/bf16,
   then ``sleep(level=2)``: weights and KV cache are released for the update phase. Level 2
   discards the weights, which is fine because they are pushed again before every rollout
   (vLLM's ``reload_weights`` would reload the initial checkpoint from disk, not the policy).

vLLM's log-probs are never used: the trainer recomputes them (:func:`egm.rl.rollout.token_logprobs`).
Prompts are the adapter's own chat-template text plus the PIL image, so vLLM runs the same HF
processor as the trainer; the prompt tensors for the loss come from the adapter.

Unverified here (no GPU, vLLM not installable on this machine): written against vLLM 0.33 / TRL
1.16's colocate code; ZeRO-3/FSDP sharded parameters are not gathered (ZeRO-2 keeps full copies).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from egm.generation import SamplingParams
from egm.models.base import GroundingAdapter
from egm.rl.rollout import Rollout, RolloutEngine, encode_prompts, placeholder_token_ids, responses_from_rows

log = logging.getLogger(__name__)

INSTALL_HINT = ("the vLLM rollout engine needs vLLM (CUDA GPUs only): pip install 'egm[gpu]'. "
                "On CPU use the Hugging Face engine (model.engine: hf).")


def import_vllm():
    """``import vllm`` or an ImportError that says how to get it."""
    try:
        import vllm
    except ImportError as e:  # also raised when sys.modules["vllm"] is None
        raise ImportError(INSTALL_HINT) from e
    return vllm


def vllm_weight_names(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` in checkpoint naming; PEFT models must already be merged.

    PEFT wraps names as ``base_model.model.<name>`` and LoRA layers as ``<layer>.base_layer``;
    the adapters' own ``lora_*`` tensors do not exist in vLLM and are skipped.
    """
    peft_prefix = getattr(model, "prefix", None) if hasattr(model, "merge_adapter") else None
    for name, p in model.named_parameters():
        if peft_prefix and peft_prefix in name:
            continue
        if "original_module" in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        name = name.replace("modules_to_save.default.", "").replace("_checkpoint_wrapped_module.", "")
        yield name, p.data


class VLLMEngine(RolloutEngine):
    """Colocated vLLM sampler (see module docstring).

    Args:
        adapter: the family adapter (chat prompt, stop tokens, decoding, prompt tensors).
        gpu_memory_utilization: share of the GPU vLLM may take while awake (weights + KV cache).
        dtype: rollout dtype (Table 5: float16).
        enable_sleep_mode: release vLLM's memory while the trainer updates.
        sleep_level: 2 discards weights (re-pushed before each rollout), 1 offloads them to CPU.
        tensor_parallel_size: GPUs per vLLM instance (1 for 2B-8B models).
        max_model_len: context size (Table 5: 32768; smaller saves KV cache).
        max_num_seqs: concurrent sequences.
        enforce_eager: skip CUDA graph capture (faster start, slower decode).
        model_path: checkpoint to start from (default: the adapter's).
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
        model_path: str | None = None,
        rank: int = 0,
        local_rank: int = 0,
        world_size: int = 1,
    ):
        vllm = import_vllm()
        self.adapter = adapter
        self.enable_sleep_mode, self.sleep_level = enable_sleep_mode, sleep_level
        # external_launcher: vLLM joins the trainer's process group instead of spawning workers
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        os.environ.setdefault("WORLD_SIZE", str(world_size))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        kwargs: dict[str, Any] = dict(
            model=model_path or adapter.pretrained_model_name_or_path,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=enable_sleep_mode,
            tensor_parallel_size=tensor_parallel_size,
            distributed_executor_backend="external_launcher",
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            enforce_eager=enforce_eager,
            seed=rank // tensor_parallel_size,  # identical sampling within a TP group
            limit_mm_per_prompt={"image": 1},
        )
        if adapter.image_kwargs():
            kwargs["mm_processor_kwargs"] = adapter.image_kwargs()
        self._sampling_cls = vllm.SamplingParams
        from transformers import AutoConfig

        self.forbidden = placeholder_token_ids(AutoConfig.from_pretrained(kwargs["model"]))
        self.llm = vllm.LLM(**kwargs)
        self._weights_loaded = True
        if enable_sleep_mode:
            self.llm.sleep(level=sleep_level)
            self._weights_loaded = sleep_level == 1

    # -- weights -----------------------------------------------------------------------------
    def _vllm_model(self) -> torch.nn.Module:
        worker = self.llm.llm_engine.model_executor.driver_worker
        worker = getattr(worker, "worker", worker)  # WorkerWrapperBase -> Worker
        return worker.model_runner.model

    @torch.no_grad()
    def update_weights(self, model: torch.nn.Module) -> None:
        if self.enable_sleep_mode:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])
        target = self._vllm_model()
        merged = hasattr(model, "merge_adapter")
        if merged:
            model.merge_adapter()
        try:
            for name, tensor in vllm_weight_names(model):
                target.load_weights([(name, tensor)])
        finally:
            if merged:
                model.unmerge_adapter()
        self.llm.reset_prefix_cache()
        self._weights_loaded = True

    # -- sampling ----------------------------------------------------------------------------
    def vllm_prompts(self, examples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        ad = self.adapter
        out = []
        for ex in examples:
            f = ad._fields(ex)
            text = ad.chat_prompt(ad.prompt(f["sentence"], f.get("task", "vanilla")))
            out.append({"prompt": text, "multi_modal_data": {"image": f["image"]}})
        return out

    def generate(self, examples: Sequence[Mapping[str, Any]], n: int, sampling: SamplingParams,
                 seed: int | None = None) -> Rollout:
        if not self._weights_loaded:
            raise RuntimeError("vLLM weights were released by sleep(level=2): call update_weights(model) first")
        ad = self.adapter
        stops = ad.stop_token_ids()
        params = self._sampling_cls(n=n, seed=seed, stop_token_ids=sorted(stops), skip_special_tokens=False,
                                    **sampling.vllm_kwargs())
        if self.enable_sleep_mode:
            self.llm.wake_up(tags=["kv_cache"])
        try:
            outputs = self.llm.generate(self.vllm_prompts(examples), sampling_params=params, use_tqdm=False)
        finally:
            if self.enable_sleep_mode:
                self.llm.sleep(level=self.sleep_level)
                self._weights_loaded = self.sleep_level == 1
        eot = ad.tokenizer.convert_tokens_to_ids(ad.end_of_turn)
        rows = []
        for req in outputs:
            for o in req.outputs:
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


# Module hparams hold this block: let `torch.load(weights_only=True)` (resume) rebuild it.
torch.serialization.add_safe_globals([VLLMSettings])
