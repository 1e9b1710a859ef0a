"""Parse a model's grounding answer into (reasoning, pixel box), or a typed failure.

:func:`parse_answer` never raises on its text: the GRPO reward scores thousands of sampled
rollouts, and a malformed one is a zero reward and a counted failure (:class:`ParseFailure`),
never a crash (STYLE habit 7).

Answer formats (paper appendix A.2, Figure 7)
---------------------------------------------
* **Qwen3-VL** (``"Locate {sent}, output its bbox coordinates using JSON format."``)::

      ```json
      [{"bbox_2d": [243, 469, 558, 746], "label": "the lady with the blue shirt"}]
      ```

  with or without the fence, also a bare object ``{"bbox_2d": [...]}``.
* **InternVL3** (``"... this sentence describes: <ref>{sent}</ref>"``)::

      <ref>the lady with the blue shirt</ref><box>[[243, 469, 558, 746]]</box>

* **Thinking models / EGM**: free reasoning first, then one of the answers above. Qwen3-VL
  Thinking wraps the reasoning in ``<think>...</think>``; its chat template already puts
  ``<think>`` in the prompt, so the generated text usually has only the closing tag.

Both families emit coordinates on the 0-1000 relative scale (see :mod:`egm.boxes`).

Rules
-----
* **Where the answer is.** With a ``</think>``, the answer is searched only *after the last*
  ``</think>``: a box the model considered while reasoning must not score. An opened but never
  closed ``<think>`` (a rollout cut at ``max_response_length``) has no answer: ``NO_BOX``.
* **Which format.** One lenient scanner per family rather than ``json.loads``: real outputs
  have trailing commas, single quotes, numbers as strings, missing ``]``/fences or are cut
  after the box, and a scanner reads valid and broken JSON alike. The Qwen scanner keys on
  ``"bbox_2d": [...]``; the InternVL one on ``<box>[[...]]</box>`` (several ``[..]`` inside one
  tag, or several tags). ``family="auto"`` runs both. Only when no such structured box is found
  does a bare ``[n, n, n, n]`` anywhere in the answer count (both families; the lmms-eval
  fallback).
* **First box wins.** With several boxes (RefCOCO has one target per sentence) the first one in
  the text decides the result, even when it is broken and a later one is fine: "try until one
  parses" would reward spraying boxes. ``n_boxes`` counts every box found.
* **Coordinates.** Four finite numbers, else ``MALFORMED`` (not four / not numbers) or
  ``BAD_COORDS`` (``nan``, ``inf``, ``1e999``). Inverted corners are swapped (the Qwen cookbook
  does the same). Values up to :data:`REL_TOLERANCE` outside ``[0, 1000]`` are clipped to the
  image, like the cookbook; further out is ``BAD_COORDS``, because a box at, say, 1500 is no
  longer a slightly-off 0-1000 box but most likely pixel coordinates, and clipping would hide
  that. A box with zero area after clipping is ``DEGENERATE``. Amodal predictions are clipped
  too, so an amodal ground truth that leaves the frame (TAO-Amodal) is matched by its in-image
  part at best.
* **Time** is linear in the text: no pattern can backtrack (see the comment above the
  regexes), so a 1 MB rollout of ``<`` and spaces parses in milliseconds, not minutes.
* **Reasoning** is the text before the answer block (its fence, ``[{``, or ``<ref>``), with the
  think tags removed and whitespace stripped; with no answer, the whole text.
"""

from __future__ import annotations

import enum
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from egm.boxes import REL_SCALE, Box, clip_xyxy, from_rel1000, is_degenerate, normalize_xyxy

log = logging.getLogger(__name__)

FAMILIES = ("qwen3_vl", "internvl", "auto")

#: Accepted overshoot of the 0-1000 scale (5%): values in ``[-50, 1050]`` are clipped.
REL_TOLERANCE = 50.0


class ParseFailure(str, enum.Enum):
    """Why an answer gave no usable box (values are stable strings for logs and reports)."""

    EMPTY = "empty"  # no text at all: None, not a str, "" or only whitespace
    NO_BOX = "no_box"  # text but no box in the answer part (e.g. nothing after </think>)
    MALFORMED = "malformed"  # a box was started but is not four numbers
    BAD_COORDS = "bad_coords"  # non-finite, or outside [-REL_TOLERANCE, 1000 + REL_TOLERANCE]
    DEGENERATE = "degenerate"  # zero width or height after clipping to the image
    BAD_IMAGE_SIZE = "bad_image_size"  # width/height not finite and positive (a data bug)


@dataclass(frozen=True)
class ParsedAnswer:
    """One parsed answer; ``box`` is set exactly when ``failure`` is None."""

    reasoning: str  # text before the answer block, think tags removed, stripped
    box: Box | None  # pixel xyxy, corners sorted, clipped to the image, positive area
    rel_box: tuple[float, ...] | None  # the four numbers as emitted (0-1000), when readable
    failure: ParseFailure | None
    n_boxes: int  # how many boxes the answer contained (broken ones included)

    @property
    def ok(self) -> bool:
        return self.failure is None and self.box is not None


def parse_failure_rate(parsed: Sequence[ParsedAnswer]) -> float:
    """Fraction of answers without a usable box (0.0 for no answers): the format-error rate
    logged next to the reward."""
    if not parsed:
        return 0.0
    return sum(not p.ok for p in parsed) / len(parsed)


def parse_answer(text: str, width: int, height: int, family: str = "auto") -> ParsedAnswer:
    """Parse a Qwen3-VL / InternVL (thinking or EGM) answer; see the module docstring.

    Never raises for any ``text`` (non-str input is ``EMPTY``) nor image size (``BAD_IMAGE_SIZE``).
    An unknown ``family`` is a configuration error and raises ``ValueError``.

    >>> p = parse_answer('Lady in blue.</think>[{"bbox_2d": [243, 469, 558, 746]}]', 427, 640)
    >>> p.reasoning, p.n_boxes, [round(v, 3) for v in p.box]
    ('Lady in blue.', 1, [103.761, 300.16, 238.266, 477.44])
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    try:
        return _parse(text, width, height, family)
    except Exception:  # a parser bug must cost one sample, not the run
        log.warning("answer parser failed on %.200r", text, exc_info=True)
        return ParsedAnswer("", None, None, ParseFailure.MALFORMED, 0)


# ---------------------------------------------------------------------------------------------
# Scanning

# Linear time on any input: a rollout is untrusted text, and one regex that backtracks
# quadratically (``<`` + 64k spaces took 30-70 s with ``<\s*/?\s*think\s*>``, whose two
# ``\s*`` both match the same spaces) stalls a whole GRPO reward step. So no two adjacent
# quantifiers may match the same character, and the quantifiers are possessive (``*+``,
# ``++``, Python >= 3.11): once a run of spaces or digits is consumed it is never re-split.
# ``tests/test_answers.py::test_adversarial_megabyte_inputs_parse_in_linear_time`` times 1 MB
# inputs built to trip each pattern.
_THINK_TAG = re.compile(r"<\s*+(?:/\s*+)?think\s*+>", re.IGNORECASE)
_THINK_OPEN = re.compile(r"<\s*+think\s*+>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"<\s*+/\s*+think\s*+>", re.IGNORECASE)

_NUM = r"[+-]?+(?:\d++(?:\.\d*+)?+|\.\d++)(?:[eE][+-]?+\d++)?+"
_NONFINITE = r"[+-]?+(?:nan|inf(?:inity)?+)"
_TOKEN = re.compile(rf"(?:{_NUM}|{_NONFINITE})", re.IGNORECASE)
_Q = r"[\"']?+"
_T = rf"{_Q}(?:{_NUM}|{_NONFINITE}){_Q}"
_BARE_QUAD = re.compile(rf"\[\s*+{_T}\s*+,\s*+{_T}\s*+,\s*+{_T}\s*+,\s*+{_T}\s*+\]", re.IGNORECASE)
_QWEN_KEY = re.compile(r"[\"']?bbox_2d[\"']?+\s*+:\s*+")
_BOX_OPEN = re.compile(r"<box>", re.IGNORECASE)
_BOX_CLOSE = re.compile(r"</box>", re.IGNORECASE)
_INNER_LIST = re.compile(r"\[([^\[\]]*+)\]")
_FENCE_TAIL = re.compile(r"```[A-Za-z]*+\s*+$")
_REF_TAIL = re.compile(r"<ref>[^<]*+</ref>\s*+$", re.IGNORECASE)


@dataclass(frozen=True)
class _Found:
    start: int  # where the answer block begins (for the reasoning)
    pos: int  # where the box itself is (for "first wins")
    body: str | None  # the text between the box's brackets; None: no bracketed list at all


def _qwen_boxes(answer: str) -> tuple[int, _Found | None]:
    """(number of ``"bbox_2d": [...]`` entries, the first one)."""
    keys = list(_QWEN_KEY.finditer(answer))
    if not keys:
        return 0, None
    m, body = keys[0], None
    i = m.end()
    if answer.startswith(("[", '"[', "'["), i):
        close = answer.find("]", i)
        if close != -1:  # "[[1, 2, 3, 4]]": the inner "[" is dropped by _read_numbers
            body = answer[answer.index("[", i) + 1 : close]
    return len(keys), _Found(_json_start(answer, m.start()), m.start(), body)


def _json_start(answer: str, key: int) -> int:
    """Start of the JSON block holding the key at ``key``: its ``{``, a ``[`` and fence before."""
    brace = answer.rfind("{", max(0, key - 300), key)  # other keys may come first: {"label": ..
    start = brace if brace != -1 and "}" not in answer[brace:key] else key
    return _skip_back(answer, start)


# ``[``, ``{`` and every character ``str.isspace`` accepts (all 29 lie below U+3001)
_SKIP_BACK_CHARS = "[{" + "".join(c for c in map(chr, range(0x3001)) if c.isspace())


def _skip_back(answer: str, start: int) -> int:
    """Move ``start`` back over whitespace, ``[``/``{`` and a code-fence opening."""
    start = len(answer[:start].rstrip(_SKIP_BACK_CHARS))  # C speed: a run of 1M "{" is one call
    m = _FENCE_TAIL.search(answer, max(0, start - 32), start)
    return m.start() if m else start


def _internvl_boxes(answer: str) -> tuple[int, _Found | None]:
    """(number of boxes in all ``<box>`` tags, the first one); a tag without a list is one
    broken box, and so is a tag cut before its ``</box>`` if its list is unfinished."""
    opens = [m.span() for m in _BOX_OPEN.finditer(answer)]
    if not opens:
        return 0, None
    count = 0
    ends = [s for s, _ in opens[1:]] + [len(answer)]
    for (_, body_start), end in zip(opens, ends):  # pos/endpos instead of slices: no copies
        close = _BOX_CLOSE.search(answer, body_start, end) if body_start < end else None
        count += max(1, len(_INNER_LIST.findall(answer, body_start, close.start() if close else end)))
    tag, body_start = opens[0]
    close = _BOX_CLOSE.search(answer, body_start, ends[0])
    lst = _INNER_LIST.search(answer, body_start, close.start() if close else ends[0])
    ref = _REF_TAIL.search(answer, max(0, tag - 2000), tag)
    start = _skip_back(answer, ref.start() if ref else tag)
    return count, _Found(start, tag, lst.group(1) if lst else None)


def _bare_boxes(answer: str) -> tuple[int, _Found | None]:
    """(number of bare ``[n, n, n, n]`` lists, the first one): the last-resort format."""
    quads = list(_BARE_QUAD.finditer(answer))
    if not quads:
        return 0, None
    m = quads[0]
    return len(quads), _Found(_skip_back(answer, m.start()), m.start(), m.group(0)[1:-1])


def _read_numbers(body: str) -> tuple[float, ...] | ParseFailure:
    """Four numbers from a list body ('243, "469", 558.5, 746,'), or why not."""
    items = [t.strip("\"'") for t in re.split(r"[\s,\[\]]+", body) if t.strip("\"'")]
    if len(items) != 4 or not all(_TOKEN.fullmatch(t) for t in items):
        return ParseFailure.MALFORMED
    return tuple(float(t) for t in items)  # "1e999" -> inf, huge ints -> inf: no OverflowError


_SCANNERS = {
    "qwen3_vl": (_qwen_boxes,),
    "internvl": (_internvl_boxes,),
    "auto": (_qwen_boxes, _internvl_boxes),
}


# ---------------------------------------------------------------------------------------------


def _split_think(text: str) -> tuple[str, str]:
    """(prefix, answer): the answer is after the last </think>; none if <think> never closed."""
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:
        cut = closes[-1]
        return text[: cut.start()], text[cut.end() :]
    if _THINK_OPEN.search(text):
        return text, ""
    return "", text


def _clean(reasoning: str) -> str:
    return _THINK_TAG.sub("", reasoning).strip()


def _image_size(width: object, height: object) -> tuple[float, float] | None:
    try:
        w, h = float(width), float(height)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    if not (math.isfinite(w) and math.isfinite(h) and w > 0 and h > 0):
        return None
    return w, h


def _parse(text: object, width: object, height: object, family: str) -> ParsedAnswer:
    if not isinstance(text, str) or not text.strip():
        return ParsedAnswer("", None, None, ParseFailure.EMPTY, 0)
    prefix, answer = _split_think(text)

    scanned = [scan(answer) for scan in _SCANNERS[family]]
    n_boxes = sum(n for n, _ in scanned)
    if n_boxes == 0:
        scanned = [_bare_boxes(answer)]
        n_boxes = scanned[0][0]
    if n_boxes == 0:
        return ParsedAnswer(_clean(prefix + answer), None, None, ParseFailure.NO_BOX, 0)

    first = min((f for _, f in scanned if f is not None), key=lambda f: f.pos)
    reasoning = _clean(prefix + answer[: first.start])

    def fail(why: ParseFailure, rel: tuple[float, ...] | None = None) -> ParsedAnswer:
        return ParsedAnswer(reasoning, None, rel, why, n_boxes)

    rel = _read_numbers(first.body) if first.body is not None else ParseFailure.MALFORMED
    if isinstance(rel, ParseFailure):
        return fail(rel)
    if not all(math.isfinite(v) and -REL_TOLERANCE <= v <= REL_SCALE + REL_TOLERANCE for v in rel):
        return fail(ParseFailure.BAD_COORDS, rel)
    size = _image_size(width, height)
    if size is None:
        return fail(ParseFailure.BAD_IMAGE_SIZE, rel)
    box = clip_xyxy(from_rel1000(normalize_xyxy(rel), *size), *size)
    if is_degenerate(box):
        return fail(ParseFailure.DEGENERATE, rel)
    return ParsedAnswer(reasoning, box, rel, None, n_boxes)
