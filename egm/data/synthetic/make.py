"""Writing the synthetic world: scenes -> PNGs + JSONL manifests, per split and per difficulty.

Each sample's ``meta`` holds the scene (objects in drawing order with their boxes) and the
structured expression, which :func:`~egm.data.synthetic.expressions.resolve` evaluates
independently of the generator; its ``reasoning`` is the oracle's trace
(:func:`~egm.data.synthetic.traces.synthetic_trace`).

Determinism: sample ``i`` of split ``s`` depends only on ``(seed, s, i, image_size,
difficulty)``; PNGs and manifests are byte-identical across runs.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from egm.data.manifest import Sample, write_manifest
from egm.data.synthetic.expressions import sentence_of
from egm.data.synthetic.scenes import Layout, Scene, make_scene
from egm.data.synthetic.traces import synthetic_trace
from egm.data.synthetic.world import DIFFICULTIES, mask_box, render
from egm.errors import InputError

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1


def scene_sample(scene: Scene, image_path: str, sample_id: str, split: str, image_size: int) -> tuple[Sample, Image.Image]:
    """Render a scene into its image and manifest sample (reasoning: the oracle's :func:`synthetic_trace`)."""
    img, full, vis = render(scene.objects, image_size)
    objs = []
    for o, m, v in zip(scene.objects, full, vis):
        d = asdict(o)
        d["box"] = mask_box(m)
        if not np.array_equal(m, v):
            d["visible_box"] = mask_box(v)
        objs.append(d)
    amodal = scene.difficulty == "amodal"
    s = Sample(
        id=sample_id,
        image=image_path,
        width=image_size,
        height=image_size,
        sentence=sentence_of(scene.expression),
        task="amodal" if amodal else "vanilla",
        box=mask_box(full[scene.target]),
        visible_box=mask_box(vis[scene.target]) if amodal else None,
        split=split,
        source="synthetic",
        category=scene.objects[scene.target].shape,
        meta={
            "difficulty": scene.difficulty,
            "expression": scene.expression,
            "target": scene.target,
            **({"occluder": scene.occluder} if scene.occluder is not None else {}),
            "objects": objs,
        },
    )
    s.reasoning = synthetic_trace(s)
    return s, img


def sample_rng(seed: int, split: str, index: int) -> random.Random:
    """Per-sample RNG (string seeding is hashed with SHA-512: stable across runs and platforms)."""
    return random.Random(f"egm-synthetic/{seed}/{split}/{index}")


def generate_split(
    out_dir: str | Path, split: str, n: int, *, seed: int, image_size: int,
    difficulties: list[str], amodal_fraction: float | None, layout: Layout = Layout(),
) -> list[Sample]:
    """Generate and save ``n`` samples; difficulties round-robin (eval) or drawn (``amodal_fraction``)."""
    out_dir = Path(out_dir)
    (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
    vanilla = [d for d in difficulties if d != "amodal"] or ["amodal"]
    samples = []
    for i in range(n):
        rng = sample_rng(seed, split, i)
        if amodal_fraction is None:
            diff = difficulties[i % len(difficulties)]
        elif "amodal" in difficulties and rng.random() < amodal_fraction:
            diff = "amodal"
        else:
            diff = rng.choice(vanilla)
        scene = make_scene(rng, diff, image_size, layout=layout)
        sid = f"syn_{split}_{i:06d}"
        path = out_dir / "images" / split / f"{sid}.png"
        s, img = scene_sample(scene, str(path.resolve()), sid, split, image_size)
        img.save(path, format="PNG")
        samples.append(s)
    return samples


def make_synthetic(
    out_dir: str,
    n_train: int = 4000,
    n_val: int = 500,
    n_test: int = 500,
    seed: int = 0,
    image_size: int = 128,
    difficulties: list[str] = list(DIFFICULTIES),
    amodal_fraction: float = 0.2,
    object_scale: float = 1.0,
    max_objects: int = 5,
    grid: int = 0,
    overwrite: bool = False,
) -> dict[str, str]:
    """Write the synthetic world: PNGs + manifests ``train``, ``val``, ``test`` and per difficulty
    ``train_<d>`` / ``val_<d>`` / ``test_<d>``. Returns ``{split: manifest_path}``.

    Train difficulties are drawn per sample (``amodal_fraction`` amodal, the rest uniform over the
    vanilla ones); val/test cycle through ``difficulties`` so each per-difficulty split has
    ``n // len(difficulties)`` samples. Idempotent: when ``<out_dir>/synthetic_config.json``
    matches this call and every manifest exists, nothing is regenerated. ``object_scale``,
    ``max_objects`` and ``grid`` shape the scenes (see :class:`Layout`).
    """
    layout = Layout(object_scale=object_scale, max_objects=max_objects, grid=grid)
    bad = [d for d in difficulties if d not in DIFFICULTIES]
    if bad or not difficulties:
        raise InputError(f"unknown difficulties {bad}; expected a subset of {DIFFICULTIES}")
    if image_size < 48:
        raise InputError(f"image_size must be >= 48 to fit several objects, got {image_size}")
    if not 0.0 <= amodal_fraction <= 1.0:
        raise InputError(f"amodal_fraction must be in [0, 1], got {amodal_fraction}")
    out = Path(out_dir)
    config = {"version": GENERATOR_VERSION, "n_train": n_train, "n_val": n_val, "n_test": n_test, "seed": seed,
              "image_size": image_size, "difficulties": list(difficulties), "amodal_fraction": amodal_fraction,
              **{k: v for k, v in asdict(layout).items() if v != getattr(Layout(), k)}}
    names = ["train", "val", "test"] + [f"{s}_{d}" for s in ("train", "val", "test") for d in difficulties]
    paths = {name: str(out / f"{name}.jsonl") for name in names}
    cfg_path = out / "synthetic_config.json"
    if (not overwrite and cfg_path.is_file() and json.loads(cfg_path.read_text()) == config
            and all(Path(p).is_file() for p in paths.values())):
        return paths
    if cfg_path.is_file():
        cfg_path.unlink()
    if (out / "images").is_dir():
        shutil.rmtree(out / "images")
    t0 = time.perf_counter()
    for split, n, frac in (("train", n_train, amodal_fraction), ("val", n_val, None), ("test", n_test, None)):
        samples = generate_split(out, split, n, seed=seed, image_size=image_size,
                                 difficulties=list(difficulties), amodal_fraction=frac, layout=layout)
        write_manifest(paths[split], samples)
        for d in difficulties:  # train_<d>: e.g. RL prompts of one difficulty; the samples stay "train"
            sub = [s if split == "train" else Sample(**{**asdict(s), "split": f"{split}_{d}"})
                   for s in samples if s.meta["difficulty"] == d]
            write_manifest(paths[f"{split}_{d}"], sub)
    cfg_path.write_text(json.dumps(config, indent=1) + "\n")
    log.info("make_synthetic: wrote %d samples to %s in %.1fs", n_train + n_val + n_test, out, time.perf_counter() - t0)
    return paths
