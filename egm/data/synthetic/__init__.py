"""The synthetic grounding world: seeded scenes that let EGM run and *learn* on a CPU.

Scenes are a plain background with 2-5 similar objects (shape circle/square/triangle, colour
red/green/blue/yellow, size small/large) and one referring expression per image, in the
``COMPLEX_PROMPT`` families of the paper's Figure 2, each a named difficulty (plain, attribute,
ordinal, relation, amodal). Boxes are exact, and every sample carries its scene and structured
expression in ``meta`` and the oracle's reasoning trace.

* :mod:`~egm.data.synthetic.world`: vocabulary, objects, exact rasterisation;
* :mod:`~egm.data.synthetic.expressions`: resolve / write / parse referring expressions;
* :mod:`~egm.data.synthetic.scenes`: one scene per difficulty, by rejection sampling (:class:`Layout`);
* :mod:`~egm.data.synthetic.traces`: the oracle's reasoning traces (Figs. 8 and 11 from ground truth);
* :mod:`~egm.data.synthetic.make`: PNGs + manifests per split and difficulty (``egm make-synthetic``).
"""

from egm.data.synthetic.expressions import parse_expression, resolve, sentence_of
from egm.data.synthetic.make import GENERATOR_VERSION, generate_split, make_synthetic, sample_rng, scene_sample
from egm.data.synthetic.scenes import MIN_OBJECTS, Layout, Scene, make_scene
from egm.data.synthetic.traces import amodal_guidance, amodal_trace, guidance_text, location_phrase, synthetic_trace
from egm.data.synthetic.world import (
    COLOURS,
    COUNTING_DIRECTIONS,
    DIFFICULTIES,
    ORDINALS,
    RELATIONS,
    SHAPES,
    SIZES,
    VANILLA_DIFFICULTIES,
    Obj,
    mask_box,
    object_mask,
    render,
)

__all__ = [
    "COLOURS", "COUNTING_DIRECTIONS", "DIFFICULTIES", "GENERATOR_VERSION", "MIN_OBJECTS", "ORDINALS", "RELATIONS",
    "SHAPES", "SIZES", "VANILLA_DIFFICULTIES", "Layout", "Obj", "Scene", "amodal_guidance", "amodal_trace",
    "generate_split", "guidance_text", "location_phrase", "make_scene", "make_synthetic", "mask_box", "object_mask",
    "parse_expression", "render", "resolve", "sample_rng", "scene_sample", "sentence_of", "synthetic_trace",
]
