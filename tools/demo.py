"""The CPU demo behind ``make demo`` / ``egm demo``: the whole SFT pipeline, learning, in minutes.

A script of the source checkout, like the ``configs/demo_*.yaml`` recipes it runs, not part of the
library: ``egm demo`` and ``egm demo-rl`` load it from ``tools/`` (see :mod:`egm.cli`), and
``python tools/demo.py [demo|demo_rl] --help`` runs it directly.

Steps (each skipped when its output already exists, so a rerun is cheap):

1. write a tiny random Qwen3-VL checkpoint (``egm make-tiny``) and the synthetic grounding world
   (``egm make-synthetic``);
2. measure the untrained model and a trivial baseline (the mean training box, in relative
   coordinates) on every validation split;
3. SFT with ``configs/demo_sft.yaml`` (the same ``LightningCLI`` as ``egm fit``);
4. measure again and print the before/after table (also written to ``runs/demo/results.md``);
5. evaluate the exported checkpoint on the test splits (``egm evaluate``: predictions, latency)
   and write the report (``egm report``: tables, accuracy-vs-latency figure, IoU histogram,
   qualitative panels) to ``runs/demo/report``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from egm.boxes import iou_batch
from egm.data.manifest import Sample
from egm.eval.metrics import paired_comparison


def mean_box_baseline(train: Sequence[Sample], evals: dict[str, Sequence[Sample]]) -> dict[str, float]:
    """Accuracy of always answering the mean training box (relative coordinates, IoU > 0.5)."""
    rel = np.array([[s.box[0] / s.width, s.box[1] / s.height, s.box[2] / s.width, s.box[3] / s.height]
                    for s in train])
    mean = rel.mean(0)
    out = {}
    for name, samples in evals.items():
        pred = np.array([mean * [s.width, s.height, s.width, s.height] for s in samples])
        gt = np.array([s.box for s in samples])
        out[name] = float((iou_batch(pred, gt) > 0.5).mean()) if len(samples) else float("nan")
    return out


def _table(rows: dict[str, dict[str, float]], splits: list[str]) -> str:
    head = "| split | " + " | ".join(rows) + " |"
    sep = "|---|" + "---:|" * len(rows)
    lines = [head, sep]
    for sp in splits:
        lines.append(f"| {sp} | " + " | ".join(f"{100 * r.get(sp, float('nan')):.1f}" for r in rows.values()) + " |")
    return "\n".join(lines)


def _accuracies(metrics: dict[str, float], splits: list[str]) -> dict[str, float]:
    return {sp: float(metrics.get(f"val/{sp}/acc", float("nan"))) for sp in splits}


def demo(
    config: str = "configs/demo_sft.yaml",
    root: str = "runs/demo",
    n_train: int = 4000,
    n_val: int = 400,
    max_epochs: int | None = None,
    object_scale: float = 1.6,
    max_objects: int = 1,
) -> dict[str, dict[str, float]]:
    """Run the CPU demo (see module docstring); returns ``{row: {split: accuracy}}``.

    Args:
        config: the SFT recipe; its ``runs/demo/`` paths are rebased on ``root`` (the resolved
            recipe is saved as ``<root>/demo_sft.yaml``).
        root: where the tiny checkpoint, data, logs and export go.
        n_train, n_val: synthetic world sizes.
        max_epochs: override the recipe's epochs (quick runs).
        object_scale, max_objects: the world's layout (:class:`egm.data.synthetic.Layout`): large
            objects and no distractor beyond what each difficulty needs (plain scenes hold only
            the target), so that a from-scratch 1 M-parameter model learns *where* things are
            within the CPU budget; with the standard world it stays at chance (measured).
    """
    from egm.data.synthetic import make_synthetic
    from egm.models.tiny import make_tiny

    t0 = time.perf_counter()
    root_p = Path(root)
    make_tiny("qwen3_vl", root_p / "tiny_qwen3vl")
    make_synthetic(str(root_p / "data"), n_train=n_train, n_val=n_val, n_test=n_val,
                   object_scale=object_scale, max_objects=max_objects)
    run = _fit_between_validations(config, root_p, max_epochs=max_epochs)
    before, after, fit_s = run.before, run.after, run.fit_s
    model, dm = run.cli.model, run.cli.datamodule
    splits = dm.val_names
    baseline = mean_box_baseline(dm.train_sets[0].samples, {n: dm.val_sets[n].samples for n in splits})
    rows = {"mean-box baseline": baseline, "untrained": before, "after SFT": after}
    table = _table(rows, splits)
    summary = (f"# EGM CPU demo\n\nAccuracy@0.5 (%) on the synthetic validation splits; SFT took "
               f"{fit_s / 60:.1f} min, the whole demo {(time.perf_counter() - t0) / 60:.1f} min.\n\n{table}\n")
    (root_p / "results.md").write_text(summary)
    (root_p / "results.json").write_text(json.dumps(rows, indent=1))
    print("\n" + summary)
    export = getattr(model.hparams, "export_dir", None)
    if export and Path(export).is_dir():
        report = evaluation_report(export, root_p, [s.replace("val_", "test_", 1) for s in splits],
                                   max_new_tokens=model.validation.sampling.max_new_tokens)
        print(f"report written to {report}")
    return rows


def demo_rl(config: str = "configs/demo_rl.yaml", root: str = "runs/demo", max_steps: int | None = None,
            n_eval: int = 2000) -> dict[str, dict[str, float]]:
    """GRPO on top of the SFT demo's export (run ``egm demo`` first); prints before/after.

    Writes the evaluation world (:func:`eval_world`, ``n_eval`` validation scenes), validates the
    starting checkpoint on the recipe's validation splits, runs
    ``egm fit --config configs/demo_rl.yaml`` (paths rebased on ``root``), validates again and
    writes ``<root>/results_rl.md``. ``max_steps`` overrides the recipe's (quick runs).
    """
    t0 = time.perf_counter()
    root_p = Path(root)
    eval_world(root_p, n_eval)
    run = _fit_between_validations(config, root_p, max_steps=max_steps)
    cli, splits = run.cli, run.cli.datamodule.val_names
    rows = {"after SFT (start)": run.before, "after GRPO": run.after}
    paired = {sp: paired_comparison(run.outcomes_before[sp], run.outcomes_after[sp]) for sp in splits}
    sizes = sorted({len(cli.datamodule.val_sets[n]) for n in splits})
    lines = ["| split | after SFT (start) | after GRPO | fixed | broken | p (McNemar) |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {sp} | {100 * run.before[sp]:.1f} | {100 * run.after[sp]:.1f} | {c.fixed} | {c.broken} | "
              f"{c.p_value:.3g} |" for sp, c in paired.items()]
    summary = (f"# EGM CPU demo: GRPO\n\nAccuracy@0.5 (%) on the synthetic validation splits "
               f"({'/'.join(map(str, sizes))} samples each); GRPO took {run.fit_s / 60:.1f} min "
               f"({cli.trainer.global_step} steps), in all {(time.perf_counter() - t0) / 60:.1f} min.\n\n"
               f"`fixed` / `broken`: samples wrong before and right after / right before and wrong after; "
               f"p: exact two-sided McNemar test on those flips (:func:`egm.eval.metrics.paired_comparison`).\n\n"
               + "\n".join(lines) + "\n")
    (root_p / "results_rl.md").write_text(summary)
    (root_p / "results_rl.json").write_text(json.dumps(
        {**rows, "paired": {sp: asdict(c) for sp, c in paired.items()}}, indent=1))
    print("\n" + summary)
    return rows


def eval_world(root: Path, n_val: int) -> dict[str, str]:
    """More validation scenes of the demo's world, in ``<root>/data_eval`` (for the GRPO demo).

    RL moves accuracy by a few points, less than the noise of the SFT demo's 80 samples per
    split (one standard error at 25 %: 4.8 points). Scenes are drawn per ``(seed, split, index)``,
    so this world -- same seed and layout as ``<root>/data`` (read from its
    ``synthetic_config.json``), no train or test scenes -- *extends* the demo's validation split:
    its first scenes are the demo's own.
    """
    from egm.data.synthetic import make_synthetic

    cfg = json.loads((root / "data" / "synthetic_config.json").read_text())
    world = {k: v for k, v in cfg.items() if k not in ("version", "n_train", "n_val", "n_test")}  # seed, layout...
    return make_synthetic(str(root / "data_eval"), n_train=0, n_val=n_val, n_test=0, **world)


@dataclass
class _FitRun:
    cli: Any
    before: dict[str, float]  # validation acc@0.5 per split, before and after the fit
    after: dict[str, float]
    fit_s: float
    outcomes_before: dict[str, dict[str, bool]]  # {split: {sample id: success}}
    outcomes_after: dict[str, dict[str, bool]]


def _fit_between_validations(config: str, root: Path, **overrides: int | None) -> _FitRun:
    """Load a recipe through the CLI (its ``runs/demo/`` paths rebased on ``root``; the resolved
    copy is kept next to the outputs), validate, fit, validate."""
    from egm.cli import lightning_cli

    text = Path(config).read_text().replace("runs/demo/", f"{root.as_posix().rstrip('/')}/")
    (root / Path(config).name).write_text(text)
    args = ["--config", str(root / Path(config).name)]
    for key, value in overrides.items():
        if value is not None:
            args += [f"--trainer.{key}", str(value)]
    cli = lightning_cli(args, run=False)
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    dm.setup("fit")
    model.validation.keep = max(model.validation.keep, sum(len(v) for v in dm.val_sets.values()))
    before = _accuracies(_validate(trainer, model, dm), dm.val_names)
    outcomes_before = _outcomes(model)
    t_fit = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    fit_s = time.perf_counter() - t_fit
    after = _accuracies(_validate(trainer, model, dm), dm.val_names)
    return _FitRun(cli, before, after, fit_s, outcomes_before, _outcomes(model))


def _outcomes(model) -> dict[str, dict[str, bool]]:
    """Per-sample success of the last validation (the module keeps every scored record)."""
    out: dict[str, dict[str, bool]] = {}
    for r in model.validation.last_records.get("val", []):
        out.setdefault(r.split, {})[r.id] = r.success
    return out


def evaluation_report(checkpoint: str, root: Path, splits: list[str], max_new_tokens: int = 96) -> Path:
    """``egm evaluate`` on the synthetic test splits, then ``egm report`` (tables and figures)."""
    from egm.eval.checkpoint import evaluate_checkpoint
    from egm.eval.report import make_report

    manifests = {s: str(root / "data" / f"{s}.jsonl") for s in splits if (root / "data" / f"{s}.jsonl").exists()}
    evaluate_checkpoint(checkpoint, manifests, str(root / "eval" / "sft"), family="qwen3_vl",
                        model_name="EGM-tiny-Qwen3-VL (SFT demo)", batch_size=40, torch_dtype="float32",
                        device="cpu", max_new_tokens=max_new_tokens)
    make_report([str(root / "eval" / "sft")], out_dir=str(root / "report"), qualitative=4)
    return root / "report"


def _validate(trainer, model, dm) -> dict[str, float]:
    """Validation metrics as one flat dict (Lightning returns one dict per dataloader)."""
    out: dict[str, float] = {}
    for d in trainer.validate(model, datamodule=dm, verbose=False):
        out.update({k: float(v) for k, v in d.items()})
    return out


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli([demo, demo_rl], as_positional=False)
