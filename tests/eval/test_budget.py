"""``egm evaluate --reasoning_budget``: a sweep on a tiny checkpoint and the tiny synthetic world,
written per budget through the ordinary runner, summarised and plotted."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from egm.data.synthetic import make_synthetic
from egm.eval.budget import budget_row, budget_table, check_budgets
from egm.eval.checkpoint import evaluate_checkpoint
from egm.eval.predictions import read_jsonl

M = 12


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_synthetic(str(tmp_path_factory.getbasetemp() / "syn_eval_budget"), n_train=0, n_val=5, n_test=0,
                          image_size=64, difficulties=["plain", "relation"])


def _manifests(world):
    return {"val_plain": world["val_plain"], "val_relation": world["val_relation"]}


def _answers(run, split):
    return [(r["id"], r["answer"], r["num_tokens"]) for r in read_jsonl(run / "predictions" / f"{split}.jsonl")]


def test_check_budgets_fails_at_the_edge():
    assert check_budgets(8) == [8] and check_budgets([32, 0, 8, 8]) == [0, 8, 32]
    for bad in ([], [-1], [1.5], [True]):
        with pytest.raises(ValueError, match="reasoning_budget"):
            check_budgets(bad)


@pytest.mark.timeout(600)
def test_sweep_writes_results_summary_and_curves(qwen_dir, world, tmp_path, capsys):
    """(d) per-budget results + predictions, budget_sweep.json|md and the two-panel PNG/SVG;
    (b) a budget >= max length gives the predictions of a run without a budget; a rerun resumes."""
    common = dict(family="qwen3_vl", torch_dtype="float32", device="cpu", max_new_tokens=M, batch_size=2,
                  latency_fraction=0.4)
    summary = evaluate_checkpoint(str(qwen_dir), _manifests(world), str(tmp_path / "sweep"),
                                  reasoning_budget=[0, 4, M], answer_tokens=4, **common)
    printed = capsys.readouterr().out
    assert budget_table(summary["budgets"]) in printed  # the sweep prints its table
    base = evaluate_checkpoint(str(qwen_dir), _manifests(world), str(tmp_path / "plain"), **common)
    out = tmp_path / "sweep"
    assert [r["budget"] for r in summary["budgets"]] == [0, 4, M]
    on_disk = json.loads((out / "budget_sweep.json").read_text())
    assert on_disk["budgets"] == summary["budgets"] and on_disk["answer_tokens"] == 4
    for row in summary["budgets"]:
        res = json.loads((out / f"budget_{row['budget']}" / "results.json").read_text())
        assert res["reasoning_budget"] == {"budget": row["budget"], "answer_tokens": 4}
        assert res["device"]["type"] == "cpu" and res["device"]["threads"] >= 1
        assert set(res["splits"]) == {"val_plain", "val_relation"} and res["latency"]["n"] > 0
        assert row == {**budget_row(row["budget"], res), "results": row["results"]}
        assert row["latency_mean_ms"] > 0 and row["mean_tokens"] is not None
    by_b = {r["budget"]: r for r in summary["budgets"]}
    assert by_b[0]["mean_tokens"] <= 4 and by_b[4]["mean_tokens"] <= 4 + 4  # reasoning + answer allowance
    for split in ("val_plain", "val_relation"):  # (b)
        assert _answers(out / f"budget_{M}", split) == _answers(tmp_path / "plain", split)
        assert all(a.startswith("<think>\n\n</think>\n\n") for _, a, _ in _answers(out / "budget_0", split))
    assert by_b[M]["accuracy"] == {k: m["accuracy"] for k, m in base["splits"].items()}
    md = (out / "budget_sweep.md").read_text()
    assert md.count("\n| ") == 2 + 3 and "Macro Avg." in md and "val_relation" in md
    for ext in ("png", "svg"):
        p = out / f"budget_curves.{ext}"
        assert p.stat().st_size > 1000 and str(p) in summary["figure"]
    with Image.open(out / "budget_curves.png") as im:
        assert im.size[0] > 1.8 * im.size[1]  # two panels side by side
    assert "B=4" in (out / "budget_curves.svg").read_text()
    mtime = (out / "budget_0" / "predictions" / "val_plain.jsonl").stat().st_mtime_ns
    again = evaluate_checkpoint(str(qwen_dir), _manifests(world), str(out), reasoning_budget=[0], answer_tokens=4,
                                **common)
    assert (out / "budget_0" / "predictions" / "val_plain.jsonl").stat().st_mtime_ns == mtime  # resumed
    assert again["budgets"][0]["accuracy"] == by_b[0]["accuracy"]


def test_budget_table_marks_missing_values():
    rows = [{"budget": 0, "mean_tokens": 3.0, "latency_mean_ms": None, "accuracy": {"a": 0.5}, "macro_avg": 0.5}]
    assert budget_table(rows).splitlines()[2] == "| 0 | 3.0 | n/a | 50.0 | 50.0 |"
