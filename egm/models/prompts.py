"""Task prompts of the paper's Figure 7 (appendix A.2), verbatim.

The vanilla prompts are the official grounding examples of each family; the amodal ones are
the paper's edits of them. The QwenVL amodal prompt has no final period in the paper and we
keep it that way: models are trained and evaluated on these exact strings.
"""

from __future__ import annotations

TASKS = ("vanilla", "amodal")

FIGURE7_TEMPLATES: dict[tuple[str, str], str] = {
    ("qwen3_vl", "vanilla"): "Locate {sent}, output its bbox coordinates using JSON format.",
    ("qwen3_vl", "amodal"): "Locate {sent} amodally, output its amodal bbox coordinates using JSON format",
    ("internvl", "vanilla"): (
        "Please provide the bounding box coordinate of the region this sentence describes: <ref>{sent}</ref>"
    ),
    ("internvl", "amodal"): (
        "Please provide the amodal bounding box coordinate of the region this sentence describes: <ref>{sent}</ref>"
    ),
}


def task_prompt(family: str, task: str, sentence: str) -> str:
    """Fill the Figure-7 template of ``family`` and ``task`` with the referring sentence.

    ``str.replace`` rather than ``str.format`` so that braces inside a sentence are kept.
    """
    try:
        template = FIGURE7_TEMPLATES[(family, task)]
    except KeyError:
        raise ValueError(f"no Figure-7 prompt for family={family!r}, task={task!r}; tasks are {TASKS}") from None
    return template.replace("{sent}", sentence)
