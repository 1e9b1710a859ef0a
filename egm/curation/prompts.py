"""The teacher prompts of the paper (Appendix B, Figs. 8-11; Appendix D, Fig. 13), versioned.

Each prompt is a :class:`PromptTemplate` whose ``key`` (``name@version``) is part of the cache
key of every teacher request made with it: editing a template's text without bumping its
version would let the cache serve replies to the old wording, so the test suite pins a hash of
each text (``tests/curation/test_prompts.py``).

Version ``paper-v1`` is the wording of the figures, copied verbatim. The paper's text came to us
through a PDF-to-Markdown conversion, so three kinds of conversion artefacts were undone (the
words themselves are untouched):

* Markdown escapes (``gt\\_bbox`` -> ``gt_bbox``) and the bold markup the figures use for
  highlighting were removed. The one exception is Fig. 11's ``**IMPORTANT: ...**``, whose
  asterisks are escaped in the source and are therefore literal characters of the prompt.
* Fig. 13 ran its "Task details" fields and its category list into single lines; they are put
  back on one line each, and ``building")AND`` gets its missing line break.
* Fig. 9/10/11/13 lists are plain ``-`` / ``1.`` lists.

Placeholders use :meth:`str.format` syntax with the figures' names (``{question}``,
``{gt_bbox}``, ``{object_category}``, ``{description}``, ``{width}``, ``{height}``,
``{guidance_str}``, ``{directions_str}``, ``{pred_bbox_norm}``, ``{gt_bbox_norm}``, ``{iou:.3f}``).
Boxes in prompts are on the 0-999 scale the figures name (:func:`egm.geometry.to_rel999`); Fig. 11's
``{guidance_str}``/``{directions_str}`` come from :func:`egm.geometry.expansion`.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PromptTemplate:
    """A named, versioned prompt; ``key`` enters the teacher cache key."""

    name: str
    version: str
    text: str

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(f for _, f, _, _ in string.Formatter().parse(self.text) if f)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def render(self, **values: object) -> str:
        """Fill the placeholders; a missing or unexpected field is an error (never a silent gap)."""
        missing, extra = self.fields - set(values), set(values) - self.fields
        if missing or extra:
            raise KeyError(f"prompt {self.key}: missing fields {sorted(missing)}, unexpected {sorted(extra)}")
        return self.text.format(**values)


def format_box(box: Sequence[int]) -> str:
    """``[x1, y1, x2, y2]`` as written into prompts."""
    return "[" + ", ".join(str(int(v)) for v in box) + "]"


# Fig. 8: vanilla grounding reasoning dataset generation.
VANILLA_REASONING = PromptTemplate(
    "vanilla_reasoning",
    "paper-v1",
    """You are looking at an image with a visual grounding task. The image shows a green bounding box indicating the Ground Truth (GT) target object.

Question: "{question}"

Ground Truth bbox (normalized 0-999 coordinates): {gt_bbox}, which is highlighted as a green bbox on the input image.

Please analyze this visual grounding case and explain how to correctly output the Ground Truth bbox according to the text description of the Question, especially when there are multiple similar objects.

Please provide a clear and concise analysis focusing on the visual reasoning process in 1-2 sentences. Don't say 'green bbox' in your answer. The answer you give is going to be used to train a small model, so you should pretend not to know the GT bbox before hand. Just answer the question with reasoning.""",
)

# Fig. 9: amodal grounding prompt (description) generation.
AMODAL_DESCRIPTION = PromptTemplate(
    "amodal_description",
    "paper-v1",
    """You are helping with a visual grounding task. I have added a TEMPORARY green box to mark the location of a {object_category} in this image.

CRITICAL INSTRUCTIONS:

- The green box/rectangle/border is ARTIFICIAL and was added by me
- The green color is NOT part of the actual {object_category}
- Ignore the green box completely when describing the object
- DO NOT mention: "green box", "green border", "green outline", "green frame", "marked in green", or any reference to green artificial markers
- If the object itself is naturally green (like grass or leaves), that's fine to mention
- But DO NOT describe anything green that is part of my annotation

Your task: Provide a concise description that uniquely identifies THIS specific {object_category} in the image.

Requirements:

1. Length: 5-15 words
2. Must uniquely identify this object (not confusable with other objects)
3. Use spatial relationships for multiple similar objects:
  - Ordinal: "the second/third/fourth xxx from left/right/top/bottom"
  - Position: "the leftmost/rightmost/topmost/bottommost xxx"
  - Location: "xxx in the top-left/center/bottom-right"
  - Relative: "xxx behind/next to/above/below the yyy"
4. Describe natural features: position, appearance, color (of the actual object, not the annotation), state
5. Use lowercase, natural referring expression style

Good examples:

- "the man in yellow coat"
- "the second teddy bear from left"
- "the rightmost hot dog in the container"
- "woman in coveralls at the back"
- "the white computer screen that is on"
- "top sandwich in the left container"

Bad examples (DO NOT do this):

- "the object marked with green box" ❌
- "the item with green border" ❌
- "the magnet outlined in green" ❌

Now describe this {object_category} (ignore my green annotation)""",
)

# Fig. 10: amodal grounding prompt verification (YES/NO).
AMODAL_VERIFICATION = PromptTemplate(
    "amodal_verification",
    "paper-v1",
    """Look at this image. There is a region marked with a RED box and labeled "TARGET".

Your task: Determine if the following description UNIQUELY and ACCURATELY identifies the TARGET region:

Description: "{description}"

Please carefully check:

1. Does the description match the object/region inside the TARGET box?
2. Is the description specific enough that it couldn't refer to any other object in the image?
3. Would someone reading this description be able to locate exactly this TARGET region and no other?

Respond with ONLY ONE WORD:

- "YES" if the description uniquely and accurately identifies the TARGET region
- "NO" if the description is ambiguous, incorrect, or could refer to multiple objects

Your response (YES or NO):""",
)

# Fig. 11: amodal grounding reasoning dataset generation.
AMODAL_REASONING = PromptTemplate(
    "amodal_reasoning",
    "paper-v1",
    """You are analyzing an amodal object detection task. The image shows two bounding boxes:

- RED box: Modal bounding box (visible part of the object only)
- GREEN box: Amodal bounding box (complete object including parts occluded by OTHER OBJECTS)

Object description: "{question}"
Image dimensions: {width} x {height} pixels

The complete object should be expanded in the following direction(s): {guidance_str}

IMPORTANT: The red and green bounding boxes are added by us for your reference. They are NOT part of the original image. In your response, DO NOT mention the colored boxes, bounding boxes, or technical terms like "modal", "amodal", "bbox", or "IoU". Describe only what you see in the actual image.

Your task:

**IMPORTANT: Your ENTIRE response must be NO MORE THAN 5 SENTENCES TOTAL.**

Provide a brief analysis:

1. How to locate this object
2. What object(s) are causing the occlusion
3. What does this object's complete unoccluded shape look like?
4. Therefore, to recover the complete object, explain in which direction(s) ({directions_str}) and how much (using terms: "slightly", "a bit", "moderately", "considerably", or "significantly") should be extended from the visible part

Be extremely concise. Maximum 5 sentences. DO NOT mention: specific pixel values, image boundaries, red/green boxes, bounding boxes, modal/amodal, bbox, or IoU. DO NOT add concluding sentences about reasoning, spatial understanding, or detection accuracy.""",
)

# Fig. 13 (Appendix D): failure case analysis.
FAILURE_ANALYSIS = PromptTemplate(
    "failure_analysis",
    "paper-v1",
    """Analyze this visual grounding failure case. The image shows:

- Green box: Ground Truth (correct answer)
- Red box: Model's prediction

Task details:
Question: "{question}"
Model's prediction (0-999 coordinates): {pred_bbox_norm}
Ground Truth (0-999 coordinates): {gt_bbox_norm}
IoU: {iou:.3f}

Please analyze this failure and categorize it into ONE of the following categories:

1. COMPLEX_PROMPT: The text prompt contains complex linguistic elements that make it difficult:
  - Spatial relationships (e.g., "left of", "below", "between", "in front of")
  - Ordinal numbers (e.g., "first", "second", "third")
  - Relative descriptions (e.g., "closest to", "farthest from")
  - Compositional reasoning (e.g., "the red car next to the blue building")
  AND the image contains multiple similar objects that could be confused.
2. AMBIGUOUS_IMAGE: The image itself is ambiguous or contains very similar objects, but the prompt is relatively simple.
3. SMALL_OBJECT: The target object is very small or hard to see in the image.
4. GT_ERROR: The ground truth annotation appears to be incorrect or questionable based on the question and image.
5. OTHER: Other types of failures not covered above.

Provide your analysis in this EXACT format:

<category> [One of: COMPLEX_PROMPT, AMBIGUOUS_IMAGE, SMALL_OBJECT, GT_ERROR, OTHER] </category>
<reasoning> [2-3 sentences explaining why you chose this category. Be specific about what makes the prompt complex (if COMPLEX_PROMPT), what makes the GT questionable (if GT_ERROR), etc.] </reasoning>
<confidence> [high/medium/low] </confidence>

Focus on the actual visual content, not the box colors.""",
)

TEMPLATES: dict[str, PromptTemplate] = {
    t.name: t for t in (VANILLA_REASONING, AMODAL_DESCRIPTION, AMODAL_VERIFICATION, AMODAL_REASONING, FAILURE_ANALYSIS)
}

