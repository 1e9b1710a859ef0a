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
    assert json.loads((tmp_path / "results.json").read_text()) == rows
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
    saved = json.loads((tmp_path / "results_rl.json").read_text())
    for split, c in saved["paired"].items():  # the flips account for the change in accuracy
        assert c["n"] == 3
        assert c["after"] - c["before"] == c["fixed"] - c["broken"]
        assert c["before"] / c["n"] == pytest.approx(rl["after SFT (start)"][split])
        assert c["after"] / c["n"] == pytest.approx(rl["after GRPO"][split])
    assert (tmp_path / "rl_export" / "model.safetensors").exists()
