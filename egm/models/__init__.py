"""Model-family adapters (prompt, target format, collation, loading) and tiny checkpoints."""

from egm.models.base import IGNORE_INDEX, GroundingAdapter, LoraSettings
from egm.models.internvl import InternVLAdapter
from egm.models.prompts import FIGURE7_TEMPLATES, task_prompt
from egm.models.qwen3_vl import Qwen3VLAdapter

ADAPTERS = {"qwen3_vl": Qwen3VLAdapter, "internvl": InternVLAdapter}

__all__ = ["ADAPTERS", "FIGURE7_TEMPLATES", "IGNORE_INDEX", "GroundingAdapter", "InternVLAdapter", "LoraSettings",
           "Qwen3VLAdapter", "task_prompt"]
