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
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from egm.boxes import iou_batch
from egm.data.manifest import Sample
from egm.errors import InputError
from egm.eval.metrics import paired_comparison
from egm.eval.report import pct  # one rounding (half up) for every table


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
        lines.append(f"| {sp} | " + " | ".join(pct(r.get(sp)) for r in rows.values()) + " |")
    return "\n".join(lines)


def _accuracies(metrics: dict[str, float], splits: list[str]) -> dict[str, float]:
    return {sp: float(metrics.get(f"val/{sp}/acc", float("nan"))) for sp in splits}


def machine() -> str:
    """The CPU a run's numbers come from and the threads torch uses (for the results files)."""
    import torch

    from egm.eval.latency import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def _set_threads(threads: int) -> None:
    """Pin torch's intra-op threads: a seeded demo then gives the same numbers on any core count."""
    import torch

    if threads < 1:
        raise InputError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def demo(
    recipe: str = "configs/demo_sft.yaml",
    root: str = "runs/demo",
    seed: int = 0,
    threads: int = 1,
    n_train: int = 4000,
    n_val: int = 400,
    max_epochs: int | None = None,
    object_scale: float = 1.6,
    max_objects: int = 1,
    report: bool = True,
    vision_position: str = "sincos",
    patch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """Run the CPU demo (see module docstring); returns ``{row: {split: accuracy}}``.

    Args:
        recipe: the SFT recipe; its ``runs/demo/`` paths are rebased on ``root`` (the resolved
            recipe is saved as ``<root>/demo_sft.yaml``).
        root: where the tiny checkpoint, data, logs and export go.
        seed: initialisation of the tiny model's weights (the vocabulary stays the same), the
            run's ``seed_everything`` and the training data order; the world itself is fixed.
            One seed is one draw: ``egm demo-seeds`` reports the spread over seeds.
        threads: torch threads. Pinned (default 1) so that one seed gives the same numbers on
            any number of cores; float reductions split over threads add up in another order.
        n_train, n_val: synthetic world sizes.
        max_epochs: override the recipe's epochs (quick runs).
        object_scale, max_objects: the world's layout (:class:`egm.data.synthetic.Layout`): large
            objects and no distractor beyond what each difficulty needs (plain scenes hold only
            the target), so that a from-scratch 1 M-parameter model learns *where* things are
            within the CPU budget; with the standard world it stays at chance (measured).
        report: evaluate the export on the test splits and write the report.
        vision_position: the tiny vision tower's initial position code, "sincos" or "random"
            (:func:`egm.models.tiny.make_tiny`; the comparison in docs/demo.md).
        patch_size: the tiny vision tower's patch side in pixels: 8 gives the demo's 128x128 images
            64 image tokens (after the 2x2 merge), 16 gives 16. With 16 tokens, whether the
            model learns *where* things are within the budget was a matter of the seed
            (docs/demo.md, "What we tried").
    """
    from egm.data.synthetic import make_synthetic
    from egm.models.tiny import make_tiny

    _set_threads(threads)
    t0 = time.perf_counter()
    root_p = Path(root)
    make_tiny("qwen3_vl", root_p / "tiny_qwen3vl", init_seed=seed, vision_position=vision_position,
              patch_size=patch_size)
    make_synthetic(str(root_p / "data"), n_train=n_train, n_val=n_val, n_test=n_val,
                   object_scale=object_scale, max_objects=max_objects)
    run = _fit_between_validations(recipe, root_p, seed, {"trainer.max_epochs": max_epochs})
    before, after, fit_s = run.before, run.after, run.fit_s
    model, dm = run.cli.model, run.cli.datamodule
    splits = dm.val_names
    baseline = mean_box_baseline(dm.train_sets[0].samples, {n: dm.val_sets[n].samples for n in splits})
    rows = {"mean-box baseline": baseline, "untrained": before, "after SFT": after}
    table = _table(rows, splits)
    summary = (f"# EGM CPU demo (seed {seed})\n\n`egm demo --seed {seed} --threads {threads}` on {machine()}.\n\n"
               f"Accuracy@0.5 (%) on the synthetic validation splits ({len(dm.val_sets[splits[0]])} samples "
               f"each); SFT took {fit_s / 60:.1f} min ({run.cli.trainer.global_step} steps), the whole demo "
               f"{(time.perf_counter() - t0) / 60:.1f} min.\n\n{table}\n")
    (root_p / "results.md").write_text(summary)
    (root_p / "results.json").write_text(json.dumps({**rows, "seed": seed, "samples_per_split": len(dm.val_sets[splits[0]]),
                                                     "machine": machine()}, indent=1))
    print("\n" + summary)
    export = getattr(model.hparams, "export_dir", None)
    if report and export and Path(export).is_dir():
        out = evaluation_report(export, root_p, [s.replace("val_", "test_", 1) for s in splits],
                                max_new_tokens=model.validation.sampling.max_new_tokens)
        print(f"report written to {out}")
    return rows


def demo_rl(recipe: str = "configs/demo_rl.yaml", root: str = "runs/demo", seed: int = 0, threads: int = 1,
            max_steps: int | None = None, n_eval: int = 2000) -> dict[str, dict[str, float]]:
    """GRPO on top of the SFT demo's export (run ``egm demo`` first); prints before/after.

    Writes the evaluation world (:func:`eval_world`, ``n_eval`` validation scenes), validates the
    starting checkpoint on the recipe's validation splits, runs
    ``egm fit --config configs/demo_rl.yaml`` (paths rebased on ``root``), validates again and
    writes ``<root>/results_rl.md``, and both validations' per-sample outcomes to
    ``<root>/arms/{reasoning_sft,grpo}.json`` (for ``egm demo-seeds``). ``seed`` seeds the
    rollouts and the prompt order; ``max_steps`` overrides the recipe's (quick runs).
    """
    _set_threads(threads)
    t0 = time.perf_counter()
    root_p = Path(root)
    eval_world(root_p, n_eval)
    run = _fit_between_validations(recipe, root_p, seed, {"trainer.max_steps": max_steps, "model.init_args.seed": seed})
    cli, splits = run.cli, run.cli.datamodule.val_names
    rows = {"after SFT (start)": run.before, "after GRPO": run.after}
    paired = {sp: paired_comparison(run.outcomes_before[sp], run.outcomes_after[sp]) for sp in splits}
    sizes = sorted({len(cli.datamodule.val_sets[n]) for n in splits})
    lines = ["| split | after SFT (start) | after GRPO | fixed | broken | p (McNemar) |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {sp} | {pct(run.before[sp])} | {pct(run.after[sp])} | {c.fixed} | {c.broken} | "
              f"{c.p_value:.3g} |" for sp, c in paired.items()]
    summary = (f"# EGM CPU demo: GRPO (seed {seed})\n\n`egm demo-rl --seed {seed} --threads {threads}` on "
               f"{machine()}.\n\nAccuracy@0.5 (%) on the synthetic validation splits "
               f"({'/'.join(map(str, sizes))} samples each); GRPO took {run.fit_s / 60:.1f} min "
               f"({cli.trainer.global_step} steps), in all {(time.perf_counter() - t0) / 60:.1f} min.\n\n"
               f"`fixed` / `broken`: samples wrong before and right after / right before and wrong after; "
               f"p: exact two-sided McNemar test on those flips (`egm.eval.metrics.paired_comparison`).\n\n"
               + "\n".join(lines) + "\n")
    (root_p / "results_rl.md").write_text(summary)
    (root_p / "results_rl.json").write_text(json.dumps(
        {**rows, "paired": {sp: asdict(c) for sp, c in paired.items()}, "seed": seed, "machine": machine()}, indent=1))
    _save_arm(root_p / "arms" / "reasoning_sft.json", run.records_before)
    _save_arm(root_p / "arms" / "grpo.json", run.records_after)
    print("\n" + summary)
    return rows


DIFFICULTY_SPLITS = ("plain", "attribute", "ordinal", "relation", "amodal")
ARMS = {"boxonly_sft": "box-only SFT", "reasoning_sft": "reasoning SFT", "grpo": "reasoning SFT + GRPO"}


def demo_seeds(
    seeds: list[int] | None = None,
    root: str = "runs/seeds",
    threads: int = 1,
    sft_recipe: str = "configs/demo_sft.yaml",
    rl_recipe: str = "configs/demo_rl.yaml",
    n_eval: int = 2000,
    n_train: int = 4000,
    n_val: int = 400,
    max_epochs: int | None = None,
    max_steps: int | None = None,
    report: bool = True,
    grpo: bool = True,
) -> dict[str, Any]:
    """The demo over seeds, and the reasoning ablation; writes ``<root>/results.md`` and ``.json``.

    ``seeds`` defaults to ``[0, 1, 2]``. Per seed (``<root>/seed<N>``; a step whose output exists is not run again, so an interrupted
    run resumes where it stopped):

    1. ``egm demo --seed N``: SFT on reasoning traces (the evaluation report for the first seed
       only);
    2. the *box-only* arm: the same recipe, samples, steps and seed with the traces dropped
       (``data.train_reasoning: false``), validated on the evaluation world;
    3. ``egm demo-rl --seed N``: validates the reasoning SFT export on the evaluation world
       (``n_eval`` scenes, 400 per split), runs GRPO on it and validates again.

    Then, for the first seed, :func:`demo_budget`: the reasoning-budget sweep of its export and
    the accuracy-vs-latency figure (budget curve, box-only arm, mean-box baseline).

    ``n_train``, ``n_val``, ``max_epochs``, ``max_steps``: as :func:`demo` and :func:`demo_rl`
    (quick runs); ``report``: the evaluation report and figure of the first seed; ``grpo=False`` leaves
    out the GRPO arm (step 3 then only validates the reasoning export). The summary reports
    every accuracy as mean ± sample standard deviation over the seeds, and
    compares arms with the exact McNemar test on the flips pooled over seeds (pairs are
    ``(seed, sample)``; :func:`egm.eval.metrics.paired_comparison`). A "why" table counts how
    often the reasoning names the target's region, and the accuracy when it does.
    """
    _set_threads(threads)
    seeds = [0, 1, 2] if seeds is None else list(seeds)
    root_p = Path(root)
    for seed in seeds:
        r = root_p / f"seed{seed}"
        if not (r / "results.json").exists():
            demo(recipe=sft_recipe, root=str(r), seed=seed, threads=threads, n_train=n_train, n_val=n_val,
                 max_epochs=max_epochs, report=report and seed == seeds[0])
        if not (r / "arms" / "boxonly_sft.json").exists():
            boxonly_arm(sft_recipe, r, seed, n_eval, max_epochs)
        if grpo and not (r / "arms" / "grpo.json").exists():
            demo_rl(recipe=rl_recipe, root=str(r), seed=seed, threads=threads, max_steps=max_steps, n_eval=n_eval)
        elif not grpo and not (r / "arms" / "reasoning_sft.json").exists():
            reasoning_arm(sft_recipe, r, seed, n_eval)
    first = root_p / f"seed{seeds[0]}"
    if report and not (first / "eval" / "boxonly" / "results.json").exists():
        demo_budget(root=str(first), threads=threads)  # the figure: budget curve, box-only and mean-box points
    summary = seeds_summary(root_p, seeds)
    command = " ".join([f"egm demo-seeds --seeds [{','.join(map(str, seeds))}] --root {root} --threads {threads}",
                        *([f"--max_epochs {max_epochs}"] if max_epochs is not None else []),
                        *([f"--max_steps {max_steps}"] if max_steps is not None else []),
                        *(["--grpo false"] if not grpo else [])])
    text = f"# EGM CPU demo over seeds {', '.join(map(str, seeds))}\n\n`{command}` on {machine()}.\n\n" + summary["markdown"]
    (root_p / "results.md").write_text(text)
    (root_p / "results.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "markdown"}, indent=1))
    print("\n" + text)
    return summary


def boxonly_arm(recipe: str, root: Path, seed: int, n_eval: int = 2000, max_epochs: int | None = None) -> _FitRun:
    """SFT without the reasoning traces (same recipe, samples, steps, seed), validated on the
    evaluation world; the per-sample outcomes go to ``<root>/arms/boxonly_sft.json``."""
    eval_world(root, n_eval)
    run = _fit_between_validations(recipe, root, seed, {"data.init_args.train_reasoning": False,
                                                        "trainer.max_epochs": max_epochs},
                                   rename={"runs/demo/sft": "runs/demo/boxonly_sft",
                                           "runs/demo/data/val_": "runs/demo/data_eval/val_"},
                                   validate_before=False, tag="boxonly_")
    _save_arm(root / "arms" / "boxonly_sft.json", run.records_after)
    return run


def reasoning_arm(recipe: str, root: Path, seed: int, n_eval: int = 2000) -> None:
    """Validate the reasoning SFT export on the evaluation world (what :func:`demo_rl` does before
    GRPO) into ``<root>/arms/reasoning_sft.json``: the recipe's validation, on the export."""
    from egm.cli import lightning_cli

    eval_world(root, n_eval)
    args = _recipe_args(recipe, root, seed, {}, rename={"runs/demo/tiny_qwen3vl": "runs/demo/sft_export",
                                                        "runs/demo/data/val_": "runs/demo/data_eval/val_"},
                        tag="eval_")
    cli = lightning_cli(args, run=False)
    cli.datamodule.setup("validate")
    cli.model.validation.keep = max(cli.model.validation.keep, sum(len(v) for v in cli.datamodule.val_sets.values()))
    _validate(cli.trainer, cli.model, cli.datamodule)
    _save_arm(root / "arms" / "reasoning_sft.json", _arm_records(cli.model, cli.datamodule))


def _mean_sd(values: Sequence[float]) -> str:
    v = np.asarray(values, dtype=np.float64)
    return f"{pct(v.mean())} ± {pct(v.std(ddof=1))}" if len(v) > 1 else pct(v.mean())


def seeds_summary(root: Path, seeds: Sequence[int]) -> dict[str, Any]:
    """Tables of :func:`demo_seeds` from the files each seed's run wrote."""
    demos = [json.loads((root / f"seed{s}" / "results.json").read_text()) for s in seeds]
    arms = {a: [json.loads((root / f"seed{s}" / "arms" / f"{a}.json").read_text()) for s in seeds] for a in ARMS
            if all((root / f"seed{s}" / "arms" / f"{a}.json").exists() for s in seeds)}
    demo_splits = list(demos[0]["after SFT"])
    splits = list(arms["reasoning_sft"][0])
    n = {sp: len(arms["reasoning_sft"][0][sp]) for sp in splits}

    def acc(a: str, sp: str | None) -> list[float]:  # per seed; sp None: macro average over splits
        sps = splits if sp is None else [sp]
        return [float(np.mean([np.mean([r["success"] for r in run[x].values()]) for x in sps])) for run in arms[a]]

    def pooled(a: str, sp: str | None) -> dict[Any, bool]:  # sp None: every split (the macro average's test)
        return {(s, x, i): r["success"] for s, run in zip(seeds, arms[a]) for x in (splits if sp is None else [sp])
                for i, r in run[x].items()}

    def ahead(first: str, second: str, sp: str | None) -> str:  # per-seed direction
        return f"{sum(b > a for a, b in zip(acc(first, sp), acc(second, sp)))}/{len(seeds)}"

    md = [f"## The SFT demo over seeds\n\nAccuracy@0.5 (%) on the demo's validation splits "
          f"({demos[0]['samples_per_split']} samples each), mean ± standard deviation over "
          f"{len(seeds)} seeds; per seed in brackets.\n",
          "| split | mean-box baseline | untrained | after SFT | after SFT per seed |", "|---|---:|---:|---:|---|"]
    for sp in demo_splits:
        after = [d["after SFT"][sp] for d in demos]
        md.append(f"| {sp} | {pct(demos[0]['mean-box baseline'][sp])} | {_mean_sd([d['untrained'][sp] for d in demos])} "
                  f"| {_mean_sd(after)} | {' / '.join(pct(a) for a in after)} |")
    has_grpo = "grpo" in arms
    md += ["", f"## Reasoning vs box-only{' vs GRPO' if has_grpo else ''}\n\nSame SFT recipe, samples, steps and "
           f"seeds for both SFT arms (box-only drops the traces: `data.train_reasoning: false`)"
           + ("; GRPO adds `configs/demo_rl.yaml` on the reasoning export" if has_grpo else "")
           + f". Accuracy@0.5 (%) on the evaluation world ({'/'.join(sorted({str(v) for v in n.values()}))} samples "
           f"per split and seed), mean ± sd over seeds. Paired exact McNemar tests over the pooled (seed, sample) "
           f"pairs (for the macro average: (seed, split, sample)): `fixed/broken` = samples the second arm gets "
           f"right and the first wrong / the reverse; `ahead` = seeds on which the second arm is more accurate.\n",
           "| split | box-only SFT | reasoning SFT | " + ("reasoning SFT + GRPO | " if has_grpo else "")
           + "reasoning vs box-only: fixed/broken, p, ahead |" + (" GRPO vs reasoning SFT: fixed/broken, p, ahead |" if has_grpo else ""),
           "|---|---:|---:|" + ("---:|" if has_grpo else "") + "---:|" + ("---:|" if has_grpo else "")]
    paired: dict[str, dict[str, Any]] = {}
    for sp in [*splits, None]:
        rb = paired_comparison(pooled("boxonly_sft", sp), pooled("reasoning_sft", sp))
        key = sp or "macro average"
        paired[key] = {"reasoning_vs_boxonly": {**asdict(rb), "ahead": ahead("boxonly_sft", "reasoning_sft", sp)}}
        row = f"| {key} | {_mean_sd(acc('boxonly_sft', sp))} | {_mean_sd(acc('reasoning_sft', sp))} | "
        if has_grpo:
            gr = paired_comparison(pooled("reasoning_sft", sp), pooled("grpo", sp))
            paired[key]["grpo_vs_reasoning"] = {**asdict(gr), "ahead": ahead("reasoning_sft", "grpo", sp)}
            row += f"{_mean_sd(acc('grpo', sp))} | "
        row += f"{rb.fixed}/{rb.broken}, {rb.p_value:.2g}, ahead {paired[key]['reasoning_vs_boxonly']['ahead']} |"
        if has_grpo:
            row += f" {gr.fixed}/{gr.broken}, {gr.p_value:.2g}, ahead {paired[key]['grpo_vs_reasoning']['ahead']} |"
        md.append(row)
    md += ["", "Per seed (" + ", ".join(f"seed {x}" for x in seeds) + "):\n",
           "| split | " + " | ".join(ARMS[a] for a in arms) + " |", "|---|" + "---:|" * len(arms)]
    for sp in [*splits, None]:
        md.append(f"| {sp or 'macro average'} | "
                  + " | ".join(" / ".join(pct(v) for v in acc(a, sp)) for a in arms) + " |")
    md += ["", "## Why: does the reasoning name the target's region?\n\nThe reasoning SFT arm, pooled over seeds. "
           "`named right`: the last location phrase of the reasoning (`egm.data.synthetic.traces.named_region`) "
           "is the target's 3x3 region (`location_phrase`; of the visible part for amodal). Accuracies (%) when "
           "the reasoning names the right / a wrong region (or none).\n",
           "| split | named right | acc, named right | acc, named wrong |", "|---|---:|---:|---:|"]
    why: dict[str, dict[str, float]] = {}
    for sp in splits:
        rec = [r for run in arms["reasoning_sft"] for r in run[sp].values()]
        named = [r for r in rec if r["named_region"] == r["target_region"]]
        wrong = [r for r in rec if r["named_region"] != r["target_region"]]
        w = {"named_right": len(named) / len(rec), "acc_named_right": _rate(named), "acc_named_wrong": _rate(wrong)}
        why[sp] = w
        md.append(f"| {sp} | " + " | ".join("n/a" if v != v else pct(v) for v in w.values()) + " |")
    return {"seeds": list(seeds), "demo": demos, "paired": paired, "why": why,
            "accuracy": {a: {sp: acc(a, sp) for sp in splits} for a in arms}, "markdown": "\n".join(md) + "\n"}


def _rate(records: Sequence[dict]) -> float:
    """Share of successes (NaN when there is no record)."""
    return float(np.mean([r["success"] for r in records])) if records else float("nan")


def demo_budget(root: str = "runs/demo", budgets: list[int] | None = None, threads: int = 1,
                answer_tokens: int = 48, max_new_tokens: int = 144) -> dict[str, Any]:
    """The test-time reasoning budget curve of the SFT demo's export (run ``egm demo`` first), and
    the demo's accuracy-vs-latency figure.

    ``egm evaluate --reasoning_budget`` on the demo's test splits: each budget caps the reasoning
    at ``B`` tokens and then forces the answer within ``answer_tokens`` (``budgets`` defaults to
    ``[0, 8, 16, 32, 48, 64, 144]``; 144 is the demo's whole generation budget ``max_new_tokens``,
    the same decoding as its validation, i.e. unconstrained; the longest trace is ~80 tokens).
    Writes ``<root>/eval/budget/budget_sweep.md|json`` and ``budget_curves.png|svg``
    (Figure 4 style). Then, when the box-only arm's export exists (``egm demo-seeds``), evaluates
    it on the same splits (``<root>/eval/boxonly``) and writes ``<root>/report``: the
    accuracy-vs-latency figure with the budget sweep as a curve, the reasoning export and the
    box-only arm as points, and the mean-box baseline as a point at 0 ms (no model call).
    """
    from egm.data.manifest import read_manifest
    from egm.eval.checkpoint import evaluate_checkpoint
    from egm.eval.report import make_report

    _set_threads(threads)
    root_p = Path(root)
    budgets = [0, 8, 16, 32, 48, 64, 144] if budgets is None else list(budgets)
    manifests = {f"test_{d}": str(root_p / "data" / f"test_{d}.jsonl") for d in DIFFICULTY_SPLITS}
    sweep = evaluate_checkpoint(str(root_p / "sft_export"), manifests, str(root_p / "eval" / "budget"),
                                family="qwen3_vl", model_name="EGM-tiny-Qwen3-VL (SFT demo)", batch_size=40,
                                max_new_tokens=max_new_tokens, reasoning_budget=budgets,
                                answer_tokens=answer_tokens)
    runs = [str(root_p / "eval" / "sft")] if (root_p / "eval" / "sft" / "results.json").exists() else []
    if (root_p / "boxonly_sft_export").is_dir():
        evaluate_checkpoint(str(root_p / "boxonly_sft_export"), manifests, str(root_p / "eval" / "boxonly"),
                            family="qwen3_vl", model_name="tiny-Qwen3-VL (box-only SFT)", batch_size=40,
                            torch_dtype="float32", device="cpu", max_new_tokens=max_new_tokens)
        runs.append(str(root_p / "eval" / "boxonly"))
    train = read_manifest(root_p / "data" / "train.jsonl")
    mean_box = mean_box_baseline(train, {k: read_manifest(v) for k, v in manifests.items()})
    make_report(runs, out_dir=str(root_p / "report"), qualitative=4 if runs else 0,
                budget_sweeps=[str(root_p / "eval" / "budget")],
                baselines={"mean-box baseline": float(np.mean(list(mean_box.values())))})
    return sweep


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
    records_before: dict[str, dict[str, dict]]  # {split: {sample id: arm record}}, see _arm_records
    records_after: dict[str, dict[str, dict]]

    @property
    def outcomes_before(self) -> dict[str, dict[str, bool]]:
        return {sp: {i: r["success"] for i, r in recs.items()} for sp, recs in self.records_before.items()}

    @property
    def outcomes_after(self) -> dict[str, dict[str, bool]]:
        return {sp: {i: r["success"] for i, r in recs.items()} for sp, recs in self.records_after.items()}


def _recipe_args(recipe: str, root: Path, seed: int, overrides: dict[str, Any],
                 rename: dict[str, str] | None = None, tag: str = "") -> list[str]:
    """CLI args of a demo recipe: its ``runs/demo/`` paths rebased on ``root`` (``rename`` maps
    path prefixes first, e.g. another output folder for an ablation arm), the resolved copy saved
    next to the outputs (name prefixed with ``tag``), ``seed`` as ``seed_everything`` and the data order, then ``overrides``
    (dotted keys; ``None`` values skipped)."""
    text = Path(recipe).read_text()
    for old, new in (rename or {}).items():
        text = text.replace(old, new)
    text = text.replace("runs/demo/", f"{root.as_posix().rstrip('/')}/")
    name = f"{tag}{Path(recipe).name}"
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text)
    args = ["--config", str(root / name), "--seed_everything", str(seed), "--data.init_args.seed", str(seed)]
    for key, value in overrides.items():
        if value is not None:
            args += [f"--{key}", json.dumps(value) if isinstance(value, bool) else str(value)]
    return args


def _fit_between_validations(recipe: str, root: Path, seed: int, overrides: dict[str, Any],
                             rename: dict[str, str] | None = None, validate_before: bool = True,
                             tag: str = "") -> _FitRun:
    """Load a recipe through the CLI (:func:`_recipe_args`), validate, fit, validate."""
    from egm.cli import lightning_cli

    cli = lightning_cli(_recipe_args(recipe, root, seed, overrides, rename, tag), run=False)
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    dm.setup("fit")
    model.validation.keep = max(model.validation.keep, sum(len(v) for v in dm.val_sets.values()))
    before, records_before = {}, {}
    if validate_before:
        before = _accuracies(_validate(trainer, model, dm), dm.val_names)
        records_before = _arm_records(model, dm)
    t_fit = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    fit_s = time.perf_counter() - t_fit
    after = _accuracies(_validate(trainer, model, dm), dm.val_names)
    return _FitRun(cli, before, after, fit_s, records_before, _arm_records(model, dm))


def _arm_records(model, dm) -> dict[str, dict[str, dict]]:
    """Per-sample outcome of the last validation (the module keeps every scored record), with the
    region the reasoning names and the target's (:func:`egm.data.synthetic.traces.named_region`):
    what the ablation's "why" table counts."""
    from egm.data.synthetic.traces import location_phrase, named_region

    samples = {s.id: s for ds in dm.val_sets.values() for s in ds.samples}
    out: dict[str, dict[str, dict]] = {}
    for r in model.validation.last_records.get("val", []):
        s = samples[r.id]
        gt = s.visible_box if s.task == "amodal" and s.visible_box is not None else s.box
        out.setdefault(r.split, {})[r.id] = {
            "success": bool(r.success), "task": s.task, "iou": float(r.iou), "pred_box": r.pred_box,
            "target_region": location_phrase(gt, s.width, s.height), "named_region": named_region(r.reasoning)}
    return out


def _save_arm(path: Path, records: dict[str, dict[str, dict]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(records))
    tmp.replace(path)


def evaluation_report(checkpoint: str, root: Path, splits: list[str], max_new_tokens: int = 144) -> Path:
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

    auto_cli([demo, demo_rl, demo_seeds, demo_budget], as_positional=False)
