"""Box overlays for the teacher (green GT / amodal box, red modal / prediction / TARGET box).

The teacher sees the boxes drawn on the image (Figs. 8-11, 13). Colours are pure RGB green
``(0, 255, 0)`` and red ``(255, 0, 0)`` so that the prompts' colour words are unambiguous; the
line width grows with the image (``max(2, round(min(W, H) / 150))``) so a box stays visible after
the API downsizes a large image. Amodal boxes may leave the frame: they are clipped to the image
before drawing (the edge then runs along the image border).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from egm.boxes import clip_xyxy

GREEN = (0, 255, 0)
RED = (255, 0, 0)


@dataclass(frozen=True)
class Overlay:
    """One box to draw: pixel ``xyxy``, colour, optional text label (e.g. ``TARGET``)."""

    box: Sequence[float]
    color: tuple[int, int, int]
    label: str | None = None


def line_width(width: int, height: int) -> int:
    return max(2, round(min(width, height) / 150))


def draw_boxes(image: Image.Image, overlays: Sequence[Overlay]) -> Image.Image:
    """A copy of ``image`` (as RGB) with each overlay drawn as a rectangle outline inside its box."""
    out = image.convert("RGB").copy()
    W, H = out.size
    lw = line_width(W, H)
    draw = ImageDraw.Draw(out)
    for ov in overlays:
        x1, y1, x2, y2 = clip_xyxy(ov.box, W, H)
        # PIL's rectangle includes its end pixel: the last pixel inside [x1, x2) is x2 - 1.
        x2, y2 = max(x2 - 1, x1), max(y2 - 1, y1)
        draw.rectangle([x1, y1, x2, y2], outline=ov.color, width=lw)
        if ov.label:
            font = _font(max(10, 4 * lw))
            tx, ty = x1 + lw, y1 - 5 * lw if y1 - 5 * lw >= 0 else y1 + lw
            l, t, r, b = draw.textbbox((tx, ty), ov.label, font=font)
            draw.rectangle([l - 1, t - 1, r + 1, b + 1], fill=ov.color)
            draw.text((tx, ty), ov.label, fill=(255, 255, 255), font=font)
    return out


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def load_and_draw(path: str, overlays: Sequence[Overlay]) -> Image.Image:
    with Image.open(path) as im:
        return draw_boxes(im, overlays)


def to_data_url(image: Image.Image, fmt: str = "png", quality: int = 90) -> str:
    """Encode an image as a ``data:image/png;base64,...`` (or jpeg) URL for an ``image_url`` part."""
    fmt = fmt.lower()
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG")
        mime = "image/png"
    elif fmt in ("jpeg", "jpg"):
        image.convert("RGB").save(buf, format="JPEG", quality=quality)
        mime = "image/jpeg"
    else:
        raise ValueError(f"image format must be 'png' or 'jpeg', got {fmt!r}")
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def from_data_url(url: str) -> Image.Image:
    """Inverse of :func:`to_data_url` (used by test servers and the oracle teacher)."""
    head, _, payload = url.partition(",")
    if not head.startswith("data:image/") or ";base64" not in head:
        raise ValueError(f"not a base64 image data URL: {url[:40]!r}")
    return Image.open(io.BytesIO(base64.b64decode(payload)))
