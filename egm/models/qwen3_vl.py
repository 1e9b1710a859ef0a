"""Qwen3-VL (2B/4B/8B-Thinking) adapter: JSON ``bbox_2d`` answers on the 0-1000 scale.

Answer format (Qwen3-VL cookbook ``2d_grounding``, kept byte for byte)::

    ```json
    [
    	{"bbox_2d": [x1, y1, x2, y2], "label": "<sentence>"}
    ]
    ```

Thinking checkpoints write their reasoning as ``<think>\\n{trace}\\n</think>\\n\\n`` before it,
the layout of the Qwen3 chat template (an empty trace gives the empty think block).

Image resolution: ``min_pixels``/``max_pixels`` bound the area the processor resizes to
(multiples of 32x32, one visual token per 32x32 after the 2x2 merge); ``None`` keeps the
checkpoint's ``preprocessor_config.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from egm.boxes import to_rel1000
from egm.models.base import GroundingAdapter, LoraSettings


class Qwen3VLAdapter(GroundingAdapter):
    """``class_path: egm.models.Qwen3VLAdapter``; args as in :class:`GroundingAdapter` plus:

    Args:
        thinking: wrap the reasoning in ``<think></think>`` (Thinking checkpoints).
        min_pixels, max_pixels: image area limits of the processor's resize (``None``: keep).
    """

    family = "qwen3_vl"
    model_class = "Qwen3VLForConditionalGeneration"
    processor_class = "Qwen3VLProcessor"
    vision_attr = "model.visual"
    # transformers >= 5.2x refuses images without it (M-RoPE needs to know image positions)
    token_keys = ("mm_token_type_ids",)

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        torch_dtype: str = "float32",
        attn_implementation: str = "sdpa",
        thinking: bool = True,
        lora: LoraSettings | None = None,
        freeze_vision: bool = False,
        gradient_checkpointing: bool = False,
        max_length: int = 4096,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ):
        super().__init__(pretrained_model_name_or_path, torch_dtype, attn_implementation, lora,
                         freeze_vision, gradient_checkpointing, max_length)
        self.thinking = thinking
        self.min_pixels, self.max_pixels = min_pixels, max_pixels

    def image_kwargs(self) -> dict[str, Any]:
        if self.min_pixels is None and self.max_pixels is None:
            return {}
        size = self.processor.image_processor.size
        longest = self.max_pixels or size["longest_edge"]
        # a cap below the checkpoint's floor (released: 65,536 px) lowers the floor with it
        return {"size": {"shortest_edge": min(self.min_pixels or size["shortest_edge"], longest),
                         "longest_edge": longest}}

    def format_answer(self, rel_box: tuple[int, int, int, int], sentence: str) -> str:
        obj = json.dumps({"bbox_2d": list(rel_box), "label": sentence}, ensure_ascii=False)
        return f"```json\n[\n\t{obj}\n]\n```"

    def format_target(self, box_xyxy_px: Sequence[float], width: int, height: int, sentence: str,
                      reasoning: str | None = None) -> str:
        answer = self.format_answer(to_rel1000(box_xyxy_px, width, height), sentence)
        trace = (reasoning or "").strip()
        if self.thinking:
            return f"<think>\n{trace}\n</think>\n\n{answer}"
        return f"{trace}\n\n{answer}" if trace else answer
