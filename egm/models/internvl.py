"""InternVL3 (1B/2B/8B) adapter: ``<ref>sentence</ref><box>[[x1, y1, x2, y2]]</box>`` on 0-1000.

Checkpoints: the adapter uses transformers' native ``InternVLForConditionalGeneration`` and
expects the **``-hf``** repositories (``OpenGVLab/InternVL3-1B-hf``, ``-2B-hf``, ``-8B-hf``).
The plain ``OpenGVLab/InternVL3-*`` repositories are the remote-code format
(``InternVLChatModel``, ``trust_remote_code``) and do not load here.

Answer format: the InternVL RefCOCO SFT data (``/work/shared/fixtures/
internvl_refcoco_sft_sample.jsonl``): the sentence echoed in ``<ref>`` and one box in
``<box>[[...]]</box>``; a reasoning trace, when present, comes first on its own line(s).

Image resolution: InternVL tiles the image into ``min_patches``..``max_patches`` square tiles
(448 px on real checkpoints) plus a thumbnail; each tile costs ``image_seq_length`` (256)
tokens. ``None`` keeps the checkpoint's ``preprocessor_config.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from egm.boxes import to_rel1000
from egm.models.base import GroundingAdapter, LoraSettings


class InternVLAdapter(GroundingAdapter):
    """``class_path: egm.models.InternVLAdapter``; args as in :class:`GroundingAdapter` plus:

    Args:
        min_patches, max_patches: bounds on the number of image tiles (``None``: keep).
    """

    family = "internvl"
    model_class = "InternVLForConditionalGeneration"
    processor_class = "InternVLProcessor"
    vision_attr = "model.vision_tower"

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        torch_dtype: str = "float32",
        attn_implementation: str = "sdpa",
        lora: LoraSettings | None = None,
        freeze_vision: bool = False,
        gradient_checkpointing: bool = False,
        max_length: int = 4096,
        min_patches: int | None = None,
        max_patches: int | None = None,
    ):
        super().__init__(pretrained_model_name_or_path, torch_dtype, attn_implementation, lora,
                         freeze_vision, gradient_checkpointing, max_length)
        self.min_patches, self.max_patches = min_patches, max_patches

    def image_kwargs(self) -> dict[str, Any]:
        kw = {"min_patches": self.min_patches, "max_patches": self.max_patches}
        return {k: v for k, v in kw.items() if v is not None}

    def format_answer(self, rel_box: tuple[int, int, int, int], sentence: str) -> str:
        x1, y1, x2, y2 = rel_box
        return f"<ref>{sentence}</ref><box>[[{x1}, {y1}, {x2}, {y2}]]</box>"

    def format_target(self, box_xyxy_px: Sequence[float], width: int, height: int, sentence: str,
                      reasoning: str | None = None) -> str:
        answer = self.format_answer(to_rel1000(box_xyxy_px, width, height), sentence)
        trace = (reasoning or "").strip()
        return f"{trace}\n{answer}" if trace else answer
