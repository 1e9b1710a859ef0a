"""`make demo` (tools/demo.py) end to end on a miniature world: every step runs and writes what the README says."""

import json

import pytest

from egm.cli import load_script
from egm.data.manifest import Sample, read_manifest

DEMO = load_script("tools/demo.py")  # what `egm demo` / `egm demo-rl` run
demo, demo_rl, mean_box_baseline = DEMO.demo, DEMO.demo_rl, DEMO.mean_box_baseline


def _s(box, w=100, h=100):
    return Sample(id="x", image="x.png", width=w, height=h, sentence="s", task="vanilla", box=box,
                  split="t", source="t")


def test_mean_box_baseline_hand_computed():
    train = [_s([0, 0, 50, 50]), _s([50, 50, 100, 100])]  # mean relative box [0.25, 0.25, 0.75, 0.75]
    evals = {"a": [_s([25, 25, 75, 75]), _s([0, 0, 40, 40])], "b": [_s([20, 20, 70, 80], w=100, h=100)]}
    out = mean_box_baseline(train, evals)
    assert out["a"] == 0.5  # IoU 1 and IoU 0.0 (overlap 15x15 / 2500+1600-225 = 0.058)
    # [25,25,75,75] vs [20,20,70,80]: inter 45*50 = 2250, union 2500 + 3000 - 2250 = 3250 -> 0.69
    assert out["b"] == 1.0


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    rows = demo(root=str(tmp_path), n_train=48, n_val=10, max_epochs=1)
    assert set(rows) == {"mean-box baseline", "untrained", "after SFT"}
    assert set(rows["after SFT"]) == {f"val_{d}" for d in ("plain", "attribute", "ordinal", "relation", "amodal")}
    assert all(0.0 <= v <= 1.0 for r in rows.values() for v in r.values())
    assert "| split | mean-box baseline | untrained | after SFT |" in (tmp_path / "results.md").read_text()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {k: saved[k] for k in rows} == rows and saved["seed"] == 0 and "torch threads 1" in saved["machine"]
    assert (tmp_path / "sft_export" / "model.safetensors").exists()
    report = tmp_path / "report"
    for name in ("splits.md", "efficiency.md", "accuracy_vs_latency.png", "accuracy_vs_latency.svg"):
        assert (report / name).exists(), name
    assert "test_plain" in (report / "splits.md").read_text()

    # the GRPO stage starts from that export and writes its own before/after table
    rl = demo_rl(root=str(tmp_path), max_steps=2, n_eval=15)
    # the evaluation world extends the demo's validation split: its first 10 scenes are the demo's
    demo_val = read_manifest(tmp_path / "data" / "val.jsonl")
    eval_val = read_manifest(tmp_path / "data_eval" / "val.jsonl")
    assert len(eval_val) == 15
    assert [(s.id, s.sentence, s.box) for s in eval_val[:10]] == [(s.id, s.sentence, s.box) for s in demo_val]
    assert set(rl) == {"after SFT (start)", "after GRPO"}
    text = (tmp_path / "results_rl.md").read_text()
    assert "(2 steps)" in text and "| split | after SFT (start) | after GRPO | fixed | broken | p (McNemar) |" in text
    assert ":func:" not in text and "`egm.eval.metrics.paired_comparison`" in text  # Markdown, not Sphinx
    saved = json.loads((tmp_path / "results_rl.json").read_text())
    for split, c in saved["paired"].items():  # the flips account for the change in accuracy
        assert c["n"] == 3
        assert c["after"] - c["before"] == c["fixed"] - c["broken"]
        assert c["before"] / c["n"] == pytest.approx(rl["after SFT (start)"][split])
        assert c["after"] / c["n"] == pytest.approx(rl["after GRPO"][split])
    assert (tmp_path / "rl_export" / "model.safetensors").exists()

    # the figure of issue 25: the budget sweep as a curve, box-only and mean-box as points
    DEMO.boxonly_arm("configs/demo_sft.yaml", tmp_path, 0, n_eval=15, max_epochs=1)
    sweep = DEMO.demo_budget(root=str(tmp_path), budgets=[0, 16], max_new_tokens=32, answer_tokens=16)
    assert [r["budget"] for r in sweep["budgets"]] == [0, 16]
    boxonly = json.loads((tmp_path / "eval" / "boxonly" / "results.json").read_text())
    assert set(boxonly["splits"]) == {f"test_{d}" for d in ("plain", "attribute", "ordinal", "relation", "amodal")}
    svg = (tmp_path / "report" / "accuracy_vs_latency.svg").read_text()
    for text in ("B=0", "B=16", "tiny-Qwen3-VL (box-only SFT)", "mean-box baseline (no model call)"):
        assert text in svg, text


def _mcnemar_reference(a: dict, b: dict) -> tuple[int, int, float]:
    """Exact two-sided McNemar from the binomial pmf in float64 (independent of paired_comparison)."""
    import math

    fixed = sum(1 for k in a if b[k] and not a[k])
    broken = sum(1 for k in a if a[k] and not b[k])
    n = fixed + broken
    pmf = [math.comb(n, i) * 0.5**n for i in range(n + 1)]
    p = sum(x for x in pmf if x <= pmf[min(fixed, broken)] * (1 + 1e-12))  # two-sided: every outcome as unlikely
    return fixed, broken, min(1.0, p)


@pytest.mark.slow
def test_demo_seeds_tables_follow_from_the_per_seed_files(tmp_path):
    """`egm demo-seeds` on a miniature world, 2 seeds: each seed changes the initial weights, a
    seed replicates, the table's means, spreads and pooled McNemar tests follow from the per-seed
    outcome files, and a rerun trains nothing."""
    import statistics

    import safetensors.torch
    import torch

    kw = dict(root=str(tmp_path / "s"), n_train=40, n_val=10, n_eval=15, max_epochs=1, max_steps=1, report=False)
    out = DEMO.demo_seeds(seeds=[0, 1], **kw)
    w0, w1 = (safetensors.torch.load_file(tmp_path / "s" / f"seed{s}" / "tiny_qwen3vl" / "model.safetensors")
              for s in (0, 1))
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    assert ((tmp_path / "s" / "seed0" / "tiny_qwen3vl" / "tokenizer.json").read_text()
            == (tmp_path / "s" / "seed1" / "tiny_qwen3vl" / "tokenizer.json").read_text())
    again = demo(root=str(tmp_path / "again"), seed=1, n_train=40, n_val=10, max_epochs=1, report=False)
    first = json.loads((tmp_path / "s" / "seed1" / "results.json").read_text())
    assert {k: first[k] for k in again} == again  # one seed, one machine: the same numbers

    arms = {a: [json.loads((tmp_path / "s" / f"seed{s}" / "arms" / f"{a}.json").read_text()) for s in (0, 1)]
            for a in ("boxonly_sft", "reasoning_sft", "grpo")}
    text = (tmp_path / "s" / "results.md").read_text()
    for sp in arms["reasoning_sft"][0]:
        assert len(arms["reasoning_sft"][0][sp]) == 3  # 15 evaluation scenes over 5 splits
        per_seed = {a: [sum(r["success"] for r in run[sp].values()) / len(run[sp]) for run in runs]
                    for a, runs in arms.items()}
        assert out["accuracy"]["grpo"][sp] == per_seed["grpo"]
        half_up = lambda x: f"{100 * x + 1e-9:.1f}"  # noqa: E731  (the report's rounding)
        cells = [f"{half_up(statistics.mean(v))} ± {half_up(statistics.stdev(v))}" for v in per_seed.values()]
        pooled = {a: {(s, i): r["success"] for s, run in zip((0, 1), runs) for i, r in run[sp].items()}
                  for a, runs in arms.items()}
        rb = _mcnemar_reference(pooled["boxonly_sft"], pooled["reasoning_sft"])
        gr = _mcnemar_reference(pooled["reasoning_sft"], pooled["grpo"])
        got = out["paired"][sp]
        assert (got["reasoning_vs_boxonly"]["fixed"], got["reasoning_vs_boxonly"]["broken"]) == rb[:2]
        assert got["reasoning_vs_boxonly"]["p_value"] == pytest.approx(rb[2], rel=1e-9)
        assert got["grpo_vs_reasoning"]["p_value"] == pytest.approx(gr[2], rel=1e-9)
        ahead = [f"{sum(b > a for a, b in zip(per_seed[x], per_seed[y]))}/2"
                 for x, y in (("boxonly_sft", "reasoning_sft"), ("reasoning_sft", "grpo"))]
        assert (f"| {sp} | {cells[0]} | {cells[1]} | {cells[2]} | {rb[0]}/{rb[1]}, {rb[2]:.2g}, ahead {ahead[0]} | "
                f"{gr[0]}/{gr[1]}, {gr[2]:.2g}, ahead {ahead[1]} |") in text
        named = [r for run in arms["reasoning_sft"] for r in run[sp].values() if r["named_region"] == r["target_region"]]
        assert out["why"][sp]["named_right"] == len(named) / 6
    assert f"`egm demo-seeds --seeds [0,1] --root {tmp_path / 's'} --threads 1 --max_epochs 1 --max_steps 1` on " in text

    stamp = (tmp_path / "s" / "seed0" / "boxonly_sft_export" / "model.safetensors").stat().st_mtime_ns
    rerun = DEMO.demo_seeds(seeds=[0, 1], **kw)  # every step's output exists: nothing trains again
    assert (tmp_path / "s" / "seed0" / "boxonly_sft_export" / "model.safetensors").stat().st_mtime_ns == stamp
    assert rerun["paired"] == out["paired"]


def test_seeds_summary_by_hand(tmp_path):
    """The ablation table from hand-made per-seed files: 2 seeds x 4 samples of one split."""
    outcomes = {"boxonly_sft": ["TFFF", "TTFF"], "reasoning_sft": ["TTTF", "TTTT"], "grpo": ["TTTF", "FTTT"]}
    named = ["RRWN", "RRRW"]  # the reasoning arm names the Right region, a Wrong one, or None
    for seed in (0, 1):
        d = tmp_path / f"seed{seed}"
        (d / "arms").mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"mean-box baseline": {"val_plain": 0.0}, "untrained": {"val_plain": 0.0},
                                                    "after SFT": {"val_plain": 0.25 * (seed + 1)}, "samples_per_split": 4}))
        for arm, per_seed in outcomes.items():
            recs = {f"id{i}": {"success": c == "T", "task": "vanilla", "iou": 0.6 if c == "T" else 0.1, "pred_box": None,
                               "target_region": "in the center",
                               "named_region": {"R": "in the center", "W": "on the left", "N": None}[named[seed][i]]
                               if arm == "reasoning_sft" else None}
                    for i, c in enumerate(per_seed[seed])}
            (d / "arms" / f"{arm}.json").write_text(json.dumps({"val_plain": recs}))
    out = DEMO.seeds_summary(tmp_path, [0, 1])
    md = out["markdown"]
    # acc per seed: box-only 25 / 50, reasoning 75 / 100, GRPO 75 / 75; sd of two values a, b = |a - b| / sqrt(2)
    # reasoning vs box-only: 4 fixed (seed 0: id1, id2; seed 1: id2, id3), 0 broken: p = 2 / 2**4 = 0.125
    # GRPO vs reasoning: 0 fixed, 1 broken (seed 1, id0): p = 1
    # ahead: reasoning beats box-only on both seeds; GRPO beats reasoning on neither (75 = 75, 75 < 100)
    assert "| val_plain | 37.5 ± 17.7 | 87.5 ± 17.7 | 75.0 ± 0.0 | 4/0, 0.12, ahead 2/2 | 0/1, 1, ahead 0/2 |" in md
    assert out["paired"]["val_plain"]["reasoning_vs_boxonly"]["p_value"] == 0.125
    # one split: the macro row's test pools the same pairs
    assert "| macro average | 37.5 ± 17.7 | 87.5 ± 17.7 | 75.0 ± 0.0 | 4/0, 0.12, ahead 2/2 | 0/1, 1, ahead 0/2 |" in md
    assert out["paired"]["macro average"]["grpo_vs_reasoning"]["broken"] == 1
    assert "| val_plain | 25.0 / 50.0 | 75.0 / 100.0 | 75.0 / 75.0 |" in md  # per seed
    assert "| val_plain | 0.0 | 0.0 ± 0.0 | 37.5 ± 17.7 | 25.0 / 50.0 |" in md  # the demo's own table
    # named right: 5 of 8; their accuracy 5/5; named wrong or none: id2 (T), id3 (F) of seed 0, id3 (T) of seed 1
    assert out["why"]["val_plain"] == {"named_right": 5 / 8, "acc_named_right": 1.0, "acc_named_wrong": 2 / 3}
    assert "| val_plain | 62.5 | 100.0 | 66.7 |" in md
