"""The synthetic world's vocabulary and objects, rasterised exactly (PIL, no anti-aliasing).

Every object is drawn into its own mask, and its box is the pixel extent of that mask in
continuous ``xyxy`` coordinates (pixel ``i`` covers ``[i, i + 1)``): boxes are exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "yellow": (235, 200, 30),
}
SIZES: dict[str, float] = {"small": 0.20, "large": 0.34}  # side of the shape / image side
BACKGROUND = (235, 235, 235)
VANILLA_DIFFICULTIES = ("plain", "attribute", "ordinal", "relation")
DIFFICULTIES = VANILLA_DIFFICULTIES + ("amodal",)
COUNTING_DIRECTIONS = ("left", "right", "top", "bottom")  # "the second circle from the <direction>"
RELATIONS = ("left of", "right of", "above", "below")
ORDINALS = ("first", "second", "third", "fourth")


@dataclass
class Obj:
    """One object: drawn inside the square ``[x0, x0 + side) x [y0, y0 + side)``."""

    shape: str
    colour: str
    size: str
    x0: int = 0
    y0: int = 0
    side: int = 0

    @property
    def square(self) -> tuple[int, int, int, int]:
        return self.x0, self.y0, self.x0 + self.side, self.y0 + self.side


def object_mask(obj: Obj | dict[str, Any], image_size: int) -> np.ndarray:
    """Boolean ``(H, W)`` mask of one object rasterised alone (the reference for exact boxes)."""
    o = obj if isinstance(obj, Obj) else Obj(**{k: obj[k] for k in ("shape", "colour", "size", "x0", "y0", "side")})
    im = Image.new("L", (image_size, image_size), 0)
    d = ImageDraw.Draw(im)
    x0, y0, x1, y1 = o.x0, o.y0, o.x0 + o.side - 1, o.y0 + o.side - 1
    if o.shape == "circle":
        d.ellipse([x0, y0, x1, y1], fill=255)
    elif o.shape == "square":
        d.rectangle([x0, y0, x1, y1], fill=255)
    elif o.shape == "triangle":
        d.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=255)
    else:
        raise ValueError(f"unknown shape {o.shape!r}")
    return np.asarray(im) > 0


def mask_box(mask: np.ndarray) -> list[float]:
    """Continuous ``xyxy`` extent of a boolean mask; ``[0, 0, 0, 0]`` when empty."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if len(cols) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def render(objects: list[Obj], image_size: int) -> tuple[Image.Image, list[np.ndarray], list[np.ndarray]]:
    """Draw objects in order on the background -> (RGB image, full masks, visible masks)."""
    img = np.empty((image_size, image_size, 3), np.uint8)
    img[:] = BACKGROUND
    full = [object_mask(o, image_size) for o in objects]
    for o, m in zip(objects, full):
        img[m] = COLOURS[o.colour]
    visible = []
    for i, m in enumerate(full):
        v = m.copy()
        for later in full[i + 1:]:
            v &= ~later
        visible.append(v)
    return Image.fromarray(img, "RGB"), full, visible
