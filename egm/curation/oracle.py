"""The curation oracle: a :class:`~egm.curation.client.Teacher` that answers from ground truth.

:class:`OracleTeacher` puts the synthetic world's known scene behind the curation jobs' teacher
protocol (``egm curate --teacher_class egm.curation.oracle:OracleTeacher``), so the CPU demo runs
the same jobs, cache and parsers as an API teacher: the reasoning traces of Figs. 8 and 11
(:mod:`egm.data.synthetic.traces`), the Fig. 9 description and Fig. 10 check of an expression
(:mod:`egm.data.synthetic.expressions`), and the Fig. 13 verdict on a failure
(:func:`failure_verdict`). Real (non-synthetic) samples get what their boxes and sentence tell.
"""

from __future__ import annotations

import re

from egm.curation.client import Reply, TeacherError, TeacherRequest
from egm.curation.prompts import (
    AMODAL_DESCRIPTION,
    AMODAL_REASONING,
    AMODAL_VERIFICATION,
    FAILURE_ANALYSIS,
    VANILLA_REASONING,
)
from egm.data.manifest import Sample
from egm.data.synthetic.expressions import normalize_text, parse_expression, resolve, sentence_of
from egm.data.synthetic.traces import amodal_trace, synthetic_trace


def synthetic_description(sample: Sample) -> str:
    """Fig. 9 for a synthetic sample: the shortest expression (shape, + colour, + size, + both)
    that singles the target out, else the scene's own (ordinal / relation) expression."""
    m = sample.meta
    objs, t = m["objects"], m["target"]
    o = objs[t]
    for keys in ((), ("colour",), ("size",), ("size", "colour")):
        expr = {"shape": o["shape"], **{k: o[k] for k in keys}}
        if resolve(expr, objs) == [t]:
            return sentence_of(expr)
    return sentence_of(m["expression"])


def _is_synthetic(sample: Sample) -> bool:
    return all(k in sample.meta for k in ("objects", "target", "expression", "difficulty"))


_COMPLEX_WORDS = re.compile(
    r"\b(first|second|third|fourth|fifth|last|left of|right of|above|below|between|behind|in front of|"
    r"next to|closest|nearest|farthest|furthest)\b")
SMALL_FRACTION = 0.01  # a GT box under 1 % of the image is a SMALL_OBJECT failure


def failure_verdict(sample: Sample, question: str) -> tuple[str, str, str]:
    """Fig. 13 category, reasoning and confidence of a failed prediction, from what is known.

    Synthetic samples: ordinal / relation difficulties are COMPLEX_PROMPT (the paper's family),
    attribute ones AMBIGUOUS_IMAGE (similar objects, simple prompt), a target under
    ``SMALL_FRACTION`` of the image SMALL_OBJECT, the rest OTHER, all with high confidence. Other
    samples: the same rules on the question's words and the box, with medium confidence.
    """
    x1, y1, x2, y2 = sample.box
    small = max(x2 - x1, 0) * max(y2 - y1, 0) < SMALL_FRACTION * sample.width * sample.height
    if _is_synthetic(sample):
        d, conf = sample.meta["difficulty"], "high"
        cue = {"ordinal": "counting", "relation": "a spatial relation"}.get(d)
        similar = d == "attribute"
    else:
        m, conf = _COMPLEX_WORDS.search(question.lower()), "medium"
        cue, similar = (f'the word "{m[1]}"' if m else None), False
    if cue:
        why = (f'The prompt "{question}" needs {cue} to tell apart similar objects. '
               "The prediction picked one of the look-alikes.")
        return "COMPLEX_PROMPT", why, conf
    if small:
        return "SMALL_OBJECT", "The target covers a tiny part of the image. The prediction missed it.", conf
    if similar:
        return "AMBIGUOUS_IMAGE", ("Several objects share the target's shape, and only one attribute in the "
                                   "simple prompt tells them apart."), conf
    if sample.task == "amodal":
        return "OTHER", "The prompt is simple; the target is partly hidden and the prediction missed its full extent.", conf
    return "OTHER", "The prompt is simple and the target is clearly visible, yet the prediction missed it.", conf


class OracleTeacher:
    """The synthetic world's oracle as a curation :class:`~egm.curation.client.Teacher`.

    Answers every job from ``request.job``, ``request.sample`` and ``request.fields``, never from
    pixels, in the formats the jobs' parsers read:

    * Fig. 8 vanilla reasoning: :func:`synthetic_trace` (synthetic samples only);
    * Fig. 9 amodal description: :func:`synthetic_description`, else the sample's sentence;
    * Fig. 10 verification: ``YES`` when the description resolves to the target alone
      (:func:`egm.data.synthetic.expressions.resolve`); for a non-synthetic sample, when it is the sentence;
    * Fig. 11 amodal reasoning: :func:`synthetic_trace` (occluder + Fig. 11 guidance), else
      :func:`amodal_trace` from the boxes;
    * Fig. 13 failure analysis: :func:`failure_verdict` in the ``<category>`` format.

    A request it cannot answer (vanilla reasoning without a synthetic scene) raises
    ``TeacherError``: the job records the sample as failed. Deterministic and thread-safe.
    """

    model = "oracle"

    def complete(self, request: TeacherRequest) -> Reply:
        s, f = request.sample, request.fields
        if request.job == VANILLA_REASONING.name:
            if not _is_synthetic(s):
                raise TeacherError(f"oracle: sample {s.id} has no synthetic scene (meta.objects) to explain")
            text = synthetic_trace(s)
        elif request.job == AMODAL_DESCRIPTION.name:
            text = synthetic_description(s) if _is_synthetic(s) else s.sentence
        elif request.job == AMODAL_VERIFICATION.name:
            text = "YES" if self.confirms(s, str(f.get("description", s.sentence))) else "NO"
        elif request.job == AMODAL_REASONING.name:
            text = synthetic_trace(s) if _is_synthetic(s) and s.meta["difficulty"] == "amodal" else amodal_trace(s)
        elif request.job == FAILURE_ANALYSIS.name:
            cat, why, conf = failure_verdict(s, str(f.get("question", s.sentence)))
            text = f"<category> {cat} </category>\n<reasoning> {why} </reasoning>\n<confidence> {conf} </confidence>"
        else:
            raise ValueError(f"OracleTeacher: no answer for job {request.job!r}")
        return Reply(text)

    @staticmethod
    def confirms(sample: Sample, description: str) -> bool:
        """Fig. 10: does ``description`` single out the sample's target?"""
        if not _is_synthetic(sample):
            return normalize_text(description) == normalize_text(sample.sentence)
        expr = parse_expression(description)
        return expr is not None and resolve(expr, sample.meta["objects"]) == [sample.meta["target"]]
