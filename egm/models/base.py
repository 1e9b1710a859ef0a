"""The one interface every part of EGM uses to talk to a model family.

A :class:`GroundingAdapter` owns everything that differs between Qwen3-VL and InternVL3:
the Figure-7 task prompt, the training target (reasoning trace + the family's box format),
the chat format and collation, checkpoint loading (dtype, attention, LoRA, frozen vision
tower, gradient checkpointing), decoding and answer parsing. SFT, GRPO and evaluation only see
this interface::

    adapter = Qwen3VLAdapter("Qwen/Qwen3-VL-2B-Thinking", torch_dtype="bfloat16")
    model = adapter.load_model()
    batch = adapter.collate_train(examples)        # right-padded, labels on assistant tokens
    loss = model(**batch).loss
    gen = adapter.collate_generate(examples)       # left-padded prompts + generation prompt
    out = model.generate(**gen, max_new_tokens=1024, pad_token_id=adapter.pad_token_id)
    texts = adapter.decode(out, gen["input_ids"].shape[1])
    parsed = [adapter.parse(t, ex["width"], ex["height"]) for t, ex in zip(texts, examples)]
    adapter.save_pretrained(model, "out/")         # LoRA merged; loads in plain transformers

An *example* is a mapping with ``image`` (PIL) and either the fields of a manifest
:class:`~egm.data.manifest.Sample` (``sentence``, ``task``, ``box``, ``width``, ``height``,
``reasoning``) or a ``sample`` entry holding one. An optional ``target`` string replaces the
formatted target (e.g. a curated trace already in answer format).

Chat format: the prompt is the checkpoint's own chat template applied to one user turn
(image, then the prompt text) with the generation prompt; the assistant turn is the target
followed by the end-of-turn token. Text the generation prompt already contains (Qwen3-VL
Thinking's ``<think>\\n``) is dropped from the target before tokenisation and put back by
:meth:`GroundingAdapter.decode`, so targets and decoded generations look alike. The
completion is tokenised on its own and appended to the prompt ids, so the prompt/answer
boundary is exact.

GRPO: :meth:`GroundingAdapter.with_completion` turns a generation batch plus sampled completion
ids into forward inputs (Qwen3-VL's ``mm_token_type_ids`` extended), and
:meth:`GroundingAdapter.pad_batch` re-batches size-1 :meth:`collate_generate` encodings.

Processors: transformers 5.2x processors insist on a video processor, which needs torchvision;
without torchvision (this CPU box) :func:`video_free` drops that component (EGM feeds no video).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import transformers
from torch.nn.utils.rnn import pad_sequence

from egm.answers import ParsedAnswer, parse_answer
from egm.config_checks import ADAPTER_RULES, check_checkpoint_path, check_ranges
from egm.errors import InputError
from egm.models.prompts import task_prompt

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# PEFT full-match regex: the language model's attention + MLP projections, never the vision
# tower (whose layers in InternVL are also called q_proj/k_proj/v_proj).
LM_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class LoraSettings:
    """PEFT LoRA settings; ``target_modules=None`` means :data:`LM_LORA_TARGETS`."""

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] | None = None


def video_free(processor_cls: type) -> type:
    """The processor class, minus its video processor when torchvision is missing.

    transformers 5.2x processors of both families require a video processor, which needs
    torchvision; EGM never feeds videos, and this CPU machine has no working torchvision.
    The subclass (same name, so saved configs are unchanged) declares only the image processor
    and tokenizer, so ``from_pretrained`` and ``__call__`` behave as usual for images.
    """
    if transformers.utils.is_torchvision_available():
        return processor_cls
    return type(processor_cls.__name__, (processor_cls,),
                {"get_attributes": classmethod(lambda cls: ["image_processor", "tokenizer"]),
                 "__module__": processor_cls.__module__})


class GroundingAdapter:
    """Base class; subclasses set the class variables and the two box-format methods."""

    family: ClassVar[str]
    model_class: ClassVar[str]  # transformers class name
    processor_class: ClassVar[str]
    vision_attr: ClassVar[str]  # dotted path of the vision tower inside the model
    token_keys: ClassVar[tuple[str, ...]] = ()  # per-token processor outputs, padded like input_ids
    assistant_header: ClassVar[str] = "<|im_start|>assistant\n"
    end_of_turn: ClassVar[str] = "<|im_end|>"

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        torch_dtype: str = "float32",
        attn_implementation: str = "sdpa",
        lora: LoraSettings | None = None,
        freeze_vision: bool = False,
        gradient_checkpointing: bool = False,
        max_length: int = 4096,
    ):
        check_ranges(type(self).__name__, locals(), ADAPTER_RULES)
        check_checkpoint_path(str(pretrained_model_name_or_path))  # a missing local folder: now, by name
        self.pretrained_model_name_or_path = str(pretrained_model_name_or_path)
        if not isinstance(getattr(torch, torch_dtype, None), torch.dtype):
            raise InputError(f"torch_dtype must name a torch dtype (float32, bfloat16, ...), got {torch_dtype!r}")
        self.torch_dtype = torch_dtype
        self.attn_implementation = attn_implementation
        self.lora = lora
        self.freeze_vision = freeze_vision
        self.gradient_checkpointing = gradient_checkpointing
        self.max_length = max_length
        self.n_truncated = 0  # targets cut to fit max_length (counted, never fatal)
        self.n_prompt_full = 0  # prompts that alone fill max_length (no label left)
        self._processor = None
        self._response_prefix: str | None = None

    # -- the family-specific part ------------------------------------------------------------
    def format_answer(self, rel_box: tuple[int, int, int, int], sentence: str) -> str:
        raise NotImplementedError

    def format_target(self, box_xyxy_px: Sequence[float], width: int, height: int, sentence: str,
                      reasoning: str | None = None) -> str:
        """The full assistant message: reasoning trace, then the answer (box on 0-1000)."""
        raise NotImplementedError

    def image_kwargs(self) -> dict[str, Any]:
        """Per-call image-processor settings (resolution limits)."""
        return {}

    # -- prompt / parse ------------------------------------------------------------------------
    def prompt(self, sentence: str, task: str = "vanilla") -> str:
        """The Figure-7 task prompt (appendix A.2) for this family."""
        return task_prompt(self.family, task, sentence)

    def parse(self, text: str, width: int, height: int) -> ParsedAnswer:
        """Answer text -> pixel box (never raises; see :mod:`egm.answers`)."""
        return parse_answer(text, width, height, family=self.family)

    # -- processor -----------------------------------------------------------------------------
    @property
    def processor(self):
        if self._processor is None:
            self._processor = self.load_processor()
        return self._processor

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def load_processor(self):
        cls = video_free(getattr(transformers, self.processor_class))
        return cls.from_pretrained(self.pretrained_model_name_or_path)

    def chat_prompt(self, prompt: str) -> str:
        """One user turn (image + prompt) in the checkpoint's chat template, ready to answer."""
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    @property
    def response_prefix(self) -> str:
        """What the generation prompt already says of the answer (``<think>\\n`` or "")."""
        if self._response_prefix is None:
            text = self.chat_prompt("x")
            cut = text.rfind(self.assistant_header)
            self._response_prefix = text[cut + len(self.assistant_header):] if cut >= 0 else ""
        return self._response_prefix

    def image_token_count(self, input_ids: torch.Tensor) -> int:
        """Image placeholder tokens in ``input_ids`` (the processor's ``image_token``)."""
        return int((input_ids == self.tokenizer.convert_tokens_to_ids(self.processor.image_token)).sum())

    # -- collation -----------------------------------------------------------------------------
    @staticmethod
    def _fields(ex: Mapping[str, Any]) -> dict[str, Any]:
        s = ex.get("sample")
        out = dict(vars(s)) if s is not None and not isinstance(s, Mapping) else dict(s or {})
        out.update({k: v for k, v in ex.items() if k != "sample"})
        if "image" not in out or not hasattr(out["image"], "size"):
            raise ValueError("an example needs a loaded PIL image under 'image'")
        return out

    def chat_inputs(self, ex: Mapping[str, Any]) -> tuple[str, Any]:
        """``(chat prompt text, PIL image)`` of one example: what an engine with its own processor
        (vLLM) needs to build exactly the prompt :meth:`collate_generate` builds."""
        f = self._fields(ex)
        return self.chat_prompt(self.prompt(f["sentence"], f.get("task", "vanilla"))), f["image"]

    def _target(self, f: Mapping[str, Any]) -> str:
        if f.get("target") is not None:
            return f["target"]
        w, h = f.get("width") or f["image"].size[0], f.get("height") or f["image"].size[1]
        return self.format_target(f["box"], w, h, f["sentence"], f.get("reasoning"))

    def _encode_prompt(self, image, prompt: str) -> dict[str, torch.Tensor]:
        enc = self.processor(images=[image], text=[self.chat_prompt(prompt)], return_tensors="pt",
                             **self.image_kwargs())
        return dict(enc)

    def _completion_ids(self, target: str) -> list[int]:
        prefix = self.response_prefix
        if prefix and target.startswith(prefix):
            target = target[len(prefix):]
        ids = self.tokenizer(target, add_special_tokens=False)["input_ids"]
        return ids + [self.tokenizer.convert_tokens_to_ids(self.end_of_turn)]

    def pad_batch(self, encs: Sequence[Mapping[str, torch.Tensor]], side: str) -> dict[str, torch.Tensor]:
        """Stack single-example encodings (e.g. ``collate_generate([ex])`` outputs) into a batch.

        ``side`` is ``"right"`` (training) or ``"left"`` (generation); token-level tensors are
        padded (ids with the pad id, masks/``token_keys`` with 0, labels with -100), image
        tensors concatenated along their first axis.
        """
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        pad = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX,
               **{k: 0 for k in self.token_keys}}
        out: dict[str, torch.Tensor] = {}
        for key in encs[0]:
            rows = [e[key] for e in encs]
            if key in pad:  # (1, L_i) or (L_i,) -> (B, L_max)
                rows = [r.reshape(-1) for r in rows]
                if side == "left":
                    rows = [r.flip(0) for r in rows]
                t = pad_sequence(rows, batch_first=True, padding_value=pad[key])
                out[key] = t.flip(1) if side == "left" else t
            else:  # image tensors: concatenated along their first axis
                out[key] = torch.cat(rows, dim=0)
        return out

    def collate_train(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-padded batch; ``labels`` = input ids on target + end-of-turn tokens, else -100."""
        encs = []
        for ex in examples:
            f = self._fields(ex)
            enc = self._encode_prompt(f["image"], self.prompt(f["sentence"], f.get("task", "vanilla")))
            n_prompt = enc["input_ids"].shape[-1]
            comp = self._completion_ids(self._target(f))
            room = max(self.max_length - n_prompt, 0)
            if room == 0:  # nothing of the answer is left to learn: say which sample and why
                self.n_prompt_full += 1
                log.warning("prompt of sample %r alone has %d tokens, %d of them image tokens, and fills "
                            "max_length %d: it trains on no label; lower the image resolution (max_pixels / "
                            "max_patches) or raise max_length", f.get("id", f["sentence"]), n_prompt,
                            self.image_token_count(enc["input_ids"]), self.max_length)
                comp = []
            elif len(comp) > room:
                self.n_truncated += 1
                log.warning("target of %r cut from %d to %d tokens (max_length %d)",
                            f.get("id", f["sentence"]), len(comp), room, self.max_length)
                comp = comp[:room]
            c = torch.tensor(comp, dtype=enc["input_ids"].dtype).reshape(1, -1)
            enc["labels"] = torch.cat([torch.full_like(enc["input_ids"], IGNORE_INDEX), c], dim=1)
            enc["input_ids"] = torch.cat([enc["input_ids"], c], dim=1)
            enc["attention_mask"] = torch.cat([enc["attention_mask"], torch.ones_like(c)], dim=1)
            for k in self.token_keys:
                enc[k] = torch.cat([enc[k], torch.zeros_like(c)], dim=1)
            encs.append(enc)
        return self.pad_batch(encs, "right")

    def collate_generate(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Left-padded prompts (with the generation prompt) for batched ``model.generate``."""
        encs = []
        for ex in examples:
            f = self._fields(ex)
            encs.append(self._encode_prompt(f["image"], self.prompt(f["sentence"], f.get("task", "vanilla"))))
        return self.pad_batch(encs, "left")

    def with_completion(self, batch: Mapping[str, torch.Tensor], completion_ids: torch.Tensor,
                        completion_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward inputs for prompt + sampled completion (GRPO log-probs of rollouts).

        ``batch`` is a :meth:`collate_generate` output, ``completion_ids``/``completion_mask``
        are ``(B, T)``; per-token extras (Qwen3-VL ``mm_token_type_ids``) are extended with 0.
        """
        out = dict(batch)
        out["input_ids"] = torch.cat([batch["input_ids"], completion_ids], dim=1)
        out["attention_mask"] = torch.cat([batch["attention_mask"], completion_mask.to(batch["attention_mask"].dtype)], 1)
        for k in self.token_keys:
            out[k] = torch.cat([batch[k], torch.zeros_like(completion_ids, dtype=batch[k].dtype)], dim=1)
        return out

    # -- decoding ------------------------------------------------------------------------------
    def stop_token_ids(self) -> set[int]:
        tok = self.tokenizer
        ids = {tok.convert_tokens_to_ids(self.end_of_turn), tok.pad_token_id, tok.eos_token_id}
        return {i for i in ids if i is not None}

    def decode(self, generated_ids: torch.Tensor, prompt_len: int) -> list[str]:
        """Generated ids ``(B, prompt_len + T)`` -> assistant texts, cut at the first stop token.

        Special tokens are kept (``<ref>``/``<box>`` may be special in real InternVL
        tokenizers) and the response prefix of the generation prompt is put back.
        """
        stops = self.stop_token_ids()
        texts = []
        for row in generated_ids[:, prompt_len:].tolist():
            end = next((i for i, t in enumerate(row) if t in stops), len(row))
            texts.append(self.response_prefix + self.tokenizer.decode(row[:end], skip_special_tokens=False))
        return texts

    # -- model ---------------------------------------------------------------------------------
    def load_model(self) -> torch.nn.Module:
        """A fresh model (call twice for a policy and a frozen reference)."""
        check_weights(self.pretrained_model_name_or_path)
        cls = getattr(transformers, self.model_class)
        model = cls.from_pretrained(self.pretrained_model_name_or_path, dtype=getattr(torch, self.torch_dtype),
                                    attn_implementation=self.attn_implementation)
        if self.freeze_vision:
            for p in self.vision_tower(model).parameters():
                p.requires_grad_(False)
        if self.gradient_checkpointing:
            # deprecated name in 5.24 (activation_checkpointing_enable), the one 5.16-5.20 know
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if self.lora is not None:
            from peft import LoraConfig, get_peft_model

            cfg = LoraConfig(r=self.lora.rank, lora_alpha=self.lora.alpha, lora_dropout=self.lora.dropout,
                             target_modules=self.lora.target_modules or LM_LORA_TARGETS)
            model = get_peft_model(model, cfg)
        return model

    def vision_tower(self, model: torch.nn.Module) -> torch.nn.Module:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        for name in self.vision_attr.split("."):
            base = getattr(base, name)
        return base

    def save_pretrained(self, model: torch.nn.Module, path: str | Path, inplace: bool = False) -> Path:
        """Write model (LoRA merged) + processor so ``from_pretrained`` needs no EGM code.

        ``inplace=True`` merges LoRA into ``model`` itself (no copy; use at the end of a run
        with a large model); otherwise a copy is merged and the training model is untouched.
        """
        path = Path(path)
        if hasattr(model, "merge_and_unload"):
            model = (model if inplace else copy.deepcopy(model)).merge_and_unload()
        model.save_pretrained(path)
        self.processor.save_pretrained(path)
        # transformers 5.2x nests the image processor in processor_config.json; the stand-alone
        # preprocessor_config.json keeps the folder readable by loaders that look for it.
        self.processor.image_processor.save_pretrained(path)
        return path


def check_weights(name_or_path: str | Path) -> None:
    """Raise :class:`~egm.errors.InputError` naming the first unreadable ``*.safetensors`` file of a
    local checkpoint folder (a hub id or a file path passes).

    An interrupted copy leaves a truncated file, and safetensors then says only ``incomplete
    metadata, file not fully covered``, naming no file. Opening a file reads just its header and
    checks that the tensors it lists cover the file exactly, so this costs milliseconds even for
    multi-GB shards. Every loader of a checkpoint folder calls this first (:meth:`GroundingAdapter.load_model`,
    the vLLM engine).
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        return
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(f, framework="pt"):
                pass
        except SafetensorError as e:
            raise InputError(f"{f}: unreadable weights ({e}): an interrupted copy or download "
                             f"leaves a truncated file; copy it again") from e


_DROPOUT_NAMES = ("dropout", "drop_path", "drop_prob")


def _is_dropout_rate(name: str, value: Any) -> bool:
    return (any(k in name for k in _DROPOUT_NAMES) and isinstance(value, (int, float))
            and not isinstance(value, bool) and value > 0)


def disable_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout of ``model`` (GRPO: old, new and reference log-probs of a rollout agree).

    ``nn.Dropout`` modules (LoRA's included) are not all: HF attention layers keep the rate as a
    float (``self.attention_dropout = config.attention_dropout``) and pass it to SDPA / eager
    attention in train mode; vision towers have ``projection_dropout`` and the like. So the
    rates stored on modules and on the (nested text/vision) configs are zeroed too.
    """
    seen: set[int] = set()

    def zero_config(cfg: transformers.PretrainedConfig) -> None:
        if id(cfg) in seen:
            return
        seen.add(id(cfg))
        for name, value in list(vars(cfg).items()):
            if isinstance(value, transformers.PretrainedConfig):
                zero_config(value)
            elif _is_dropout_rate(name, value):
                setattr(cfg, name, 0.0)

    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = 0.0
        cfg = getattr(m, "config", None)
        if isinstance(cfg, transformers.PretrainedConfig):
            zero_config(cfg)
        for name, value in list(vars(m).items()):  # plain attributes; submodules live in m._modules
            if _is_dropout_rate(name, value):
                setattr(m, name, 0.0)
