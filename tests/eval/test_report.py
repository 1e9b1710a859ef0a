"""Tables 3/4 (Markdown, CSV) and figures (PNG sizes, SVG is XML) from results files."""

import csv
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

from egm.eval.benchmarks import REFCOCO_SPLIT_NAMES, table3_columns
from egm.eval.plots import accuracy_vs_latency, iou_histogram, qualitative_panels
from egm.eval.report import EFFICIENCY_COLUMNS, efficiency_rows, load_results, make_report, table3_rows, write_tables


def split(acc, n=1000, task="vanilla"):
    k = round(acc * n)
    return {"n": n, "n_success": k, "accuracy": k / n, "mean_iou": 0.7, "task": task,
            "n_parse_failures": 0, "parse_failure_rate": 0.0, "n_image_failures": 0, "mean_tokens": 50.0}


def results(model, accs, amodal=None, gpu_ms=None, n_params=None, num_gpus=1):
    sp = {name: split(a) for name, a in zip(REFCOCO_SPLIT_NAMES, accs)}
    if amodal:
        sp["cocoa_val"] = split(amodal[0], n=400, task="amodal")
        sp["cocoa_test"] = split(amodal[1], n=600, task="amodal")
    lat = None if gpu_ms is None else {"n": 10, "mean_ms": gpu_ms / num_gpus, "p50_ms": 1.0, "p90_ms": 2.0,
                                         "gpu_mean_ms": gpu_ms, "mean_tokens": 123.4}
    return {"model": model, "n_params": n_params, "num_gpus": num_gpus, "splits": sp, "latency": lat}


# Table 3 rows of the paper
EGM_2B = [0.930, 0.940, 0.894, 0.878, 0.917, 0.827, 0.886, 0.893]
BASE_2B = [0.875, 0.914, 0.820, 0.802, 0.867, 0.721, 0.844, 0.845]


@pytest.fixture
def result_files(tmp_path):
    paths = []
    for name, r in [("base", results("Qwen3-VL-2B-Thinking", BASE_2B, amodal=(0.6, 0.7), gpu_ms=900, n_params=2_100_000_000)),
                    ("egm", results("EGM-Qwen3-VL-2B", EGM_2B, amodal=(0.7, 0.75), gpu_ms=400, n_params=2_100_000_000)),
                    ("big", results("Qwen3-VL-235B-A22B-Thinking", EGM_2B[:5], gpu_ms=13900, num_gpus=8))]:
        d = tmp_path / name
        d.mkdir()
        (d / "results.json").write_text(json.dumps(r))
        paths.append(d)
    return paths


def test_tables_have_paper_columns_and_numbers(tmp_path, result_files):
    res = load_results(result_files)
    paths = write_tables(res, tmp_path / "rep")
    with open(paths["table3.csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == table3_columns()
    assert rows[1]["Model"] == "EGM-Qwen3-VL-2B"
    assert [rows[1][c] for c in table3_columns()[1:]] == ["93.0", "94.0", "89.4", "87.8", "91.7", "82.7", "88.6", "89.3", "89.6"]
    assert rows[0]["Avg. Acc"] == "83.6"          # paper Table 3, Qwen3-VL-2B-Thinking
    assert rows[2]["RefCOCOg val"] == "-" and rows[2]["Avg. Acc"] == "-"
    with open(paths["table4.csv"]) as fh:
        t4 = list(csv.DictReader(fh))
    assert list(t4[0]) == ["Model", "Amodal Acc"]
    # pooled: (0.6*400 + 0.7*600) / 1000 = 66.0; (0.7*400 + 0.75*600)/1000 = 73.0
    assert [r["Amodal Acc"] for r in t4] == ["66.0", "73.0", "-"]
    md = paths["table3.md"].read_text().splitlines()
    assert md[0] == "| " + " | ".join(table3_columns()) + " |"
    assert md[3].startswith("| EGM-Qwen3-VL-2B | 93.0 |") and md[3].endswith("| 89.6 |")
    assert len(md) == 2 + 3
    with open(paths["efficiency.csv"]) as fh:
        eff = list(csv.DictReader(fh))
    assert list(eff[0]) == EFFICIENCY_COLUMNS
    assert eff[1]["GPU latency (ms)"] == "400" and eff[1]["#Params (B)"] == "2.10" and eff[2]["#GPUs"] == "8"
    assert table3_rows(res)[1]["Avg. Acc"] == "89.6"
    assert efficiency_rows([{**res[0], "n_params": 1_024_000}])[0]["#Params (B)"] == "0.001"  # not "0.00"


def test_accuracy_vs_latency_png_and_svg(tmp_path, result_files):
    png, svg = accuracy_vs_latency(load_results(result_files), tmp_path / "fig4", figsize=(6, 4), dpi=100)
    with Image.open(png) as im:
        assert im.size == (600, 400)
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    assert "EGM-Qwen3-VL-2B" in svg.read_text()


def test_qualitative_panels_and_histogram(tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (80, 60), (200, 180, 160)).save(img)
    recs = [
        {"image": str(img), "width": 80, "height": 60, "sentence": "girl third from right front row",
         "reasoning": "Count the individuals from the rightmost person in the front row. " * 12,
         "gt_box": [10, 10, 40, 50], "pred_box": [12, 8, 44, 52], "iou": 0.8},
        {"image": str(tmp_path / "missing.png"), "width": 80, "height": 60, "sentence": "pen in the cup",
         "reasoning": None, "gt_box": [-10, 5, 30, 70], "pred_box": None, "iou": 0.0, "parse_failure": True,
         "failure": "no_box"},
        {"image": str(img), "width": 80, "height": 60, "sentence": "chair", "reasoning": "x",
         "gt_box": [1, 1, 5, 5], "pred_box": [50, 40, 60, 50], "iou": 0.0},
    ]
    p = qualitative_panels(recs, tmp_path / "qual.png", ncols=2, panel_size=(4, 5), dpi=50)
    with Image.open(p) as im:
        assert im.size == (2 * 4 * 50, 2 * 5 * 50)
    h = iou_histogram(recs, tmp_path / "hist.png", figsize=(5, 3), dpi=80)
    with Image.open(h) as im:
        assert im.size == (400, 240)


def test_make_report_end_to_end(tmp_path, result_files):
    pred_dir = result_files[1] / "predictions"
    pred_dir.mkdir()
    (pred_dir / "refcoco_unc_val.jsonl").write_text(json.dumps(
        {"id": "1", "image": "nope.png", "width": 40, "height": 30, "sentence": "s", "gt_box": [1, 1, 9, 9],
         "pred_box": [1, 1, 9, 9], "iou": 1.0}) + "\n")
    written = make_report([str(p) for p in result_files], out_dir=str(tmp_path / "rep"), qualitative=1)
    for name in ("table3.md", "table3.csv", "table4.md", "efficiency.csv", "accuracy_vs_latency.png",
                 "accuracy_vs_latency.svg", "iou_hist_EGM-Qwen3-VL-2B.png", "qualitative_EGM-Qwen3-VL-2B.png"):
        assert name in written
    with Image.open(written["accuracy_vs_latency.png"]) as im:
        assert im.size == (7 * 150, 5 * 150)


def test_splits_table_lists_every_evaluated_split():
    from egm.eval.report import splits_rows

    rows, cols = splits_rows([
        {"model": "a", "splits": {"val_plain": {"accuracy": 0.75}, "val_relation": {"accuracy": 0.25}}},
        {"model": "b", "splits": {"val_plain": {"accuracy": 0.5}}},
    ])
    assert cols == ["Model", "val_plain", "val_relation", "Macro Avg."]
    assert rows[0] == {"Model": "a", "val_plain": "75.0", "val_relation": "25.0", "Macro Avg.": "50.0"}
    assert rows[1]["val_relation"] == "-" and rows[1]["Macro Avg."] == "50.0"


def cpu_results(model="tiny-cpu", splits=None):
    sp = splits or {"val_plain": split(0.5, n=10)}
    return {"model": model, "n_params": 1000, "num_gpus": 1, "splits": sp,
            "device": {"type": "cpu", "name": "AMD EPYC 7B13 64-Core Processor", "threads": 1},
            "latency": {"n": 2, "mean_ms": 250.0, "p50_ms": 240.0, "p90_ms": 260.0, "gpu_mean_ms": 250.0,
                        "mean_tokens": 30.0, "num_gpus": 1, "splits": {"val_plain": {"mean_ms": 250.0}}}}


def test_cpu_run_reports_its_device_not_gpu_latency(tmp_path, result_files):
    from egm.eval.report import efficiency_rows

    gpu = load_results(result_files)[2]
    gpu["device"] = {"type": "cuda", "name": "NVIDIA H200", "num_gpus": 8}
    cpu_row, gpu_row = efficiency_rows([cpu_results(), gpu])
    assert cpu_row["Device"] == "CPU (AMD EPYC 7B13 64-Core Processor, 1 thread)" and cpu_row["#GPUs"] == "0"
    assert cpu_row["Latency (ms)"] == "250" and cpu_row["GPU latency (ms)"] == "-"
    assert gpu_row["Device"] == "8x GPU (NVIDIA H200)" and gpu_row["#GPUs"] == "8"
    assert gpu_row["GPU latency (ms)"] == "13900"
    assert efficiency_rows(load_results(result_files[:1]))[0]["Device"] == "-"  # results.json without device

    _, svg = accuracy_vs_latency([cpu_results()], tmp_path / "cpu")
    text = svg.read_text()  # matplotlib writes each text as a comment beside its glyphs
    assert "Latency (ms) on CPU (AMD EPYC 7B13 64-Core Processor, 1 thread)" in text and "GPU latency" not in text
    _, svg = accuracy_vs_latency(load_results(result_files), tmp_path / "gpu")
    assert "GPU latency (ms)" in svg.read_text()


def test_tables_3_and_4_only_when_their_splits_were_evaluated(tmp_path, result_files):
    paths = write_tables([cpu_results()], tmp_path / "synthetic")
    assert "table3.md" not in paths and "table4.md" not in paths and "efficiency.md" in paths
    assert not (tmp_path / "synthetic" / "table3.md").exists()
    amodal_only = cpu_results(splits={"cocoa_val": split(0.5, n=10, task="amodal")})
    assert set(write_tables([amodal_only], tmp_path / "amodal")) == {
        "table4.md", "table4.csv", "efficiency.md", "efficiency.csv", "splits.md", "splits.csv"}
    assert {"table3.md", "table4.md"} <= set(write_tables(load_results(result_files), tmp_path / "all"))


def test_pick_examples_mixes_successes_and_failures():
    from egm.eval.plots import pick_examples

    recs = [{"id": str(i), "pred_box": [0, 0, 1, 1], "iou": 0.9 if i < 3 else 0.1}
            for i in range(20)]  # 3 successes, 17 failures
    for seed in range(5):
        chosen = pick_examples(recs, 4, seed=seed)
        assert [r["iou"] for r in chosen] == [0.1, 0.9, 0.1, 0.9] and len({r["id"] for r in chosen}) == 4
    assert sorted(r["iou"] for r in pick_examples(recs, 9)) == [0.1] * 6 + [0.9] * 3  # successes run short
    assert [r["iou"] for r in pick_examples(recs, 1)] == [0.1]
    assert pick_examples(recs[:3], 2) == pick_examples(recs[:3], 2, seed=0) and len(pick_examples(recs[:3], 2)) == 2


def test_qualitative_ground_truth_box_is_visible_on_a_blue_object(tmp_path):
    """The synthetic world draws blue objects: the GT box must not vanish on them."""
    import numpy as np

    from egm.data.synthetic.world import COLOURS, Obj, mask_box, render

    obj = Obj("square", "blue", "large", x0=8, y0=8, side=48)
    img, full, _ = render([obj], 64)
    img.save(tmp_path / "blue.png")
    x1, y1, x2, y2 = mask_box(full[0])
    base = {"image": str(tmp_path / "blue.png"), "width": 64, "height": 64, "split": "val_plain", "sentence": "s",
            "reasoning": "r", "pred_box": [0, 0, 4, 4], "iou": 0.8}
    rec = {**base, "gt_box": [x1 + 8, y1 + 8, x2 - 8, y2 - 8]}  # inside the object: every edge over blue

    def pixels(r, name):
        p = qualitative_panels([r], tmp_path / name, ncols=1, panel_size=(4, 5), dpi=100)
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB")).astype(int)

    without, with_gt = pixels({**base, "gt_box": None}, "without.png"), pixels(rec, "with.png")
    blue = np.array(COLOURS["blue"])
    over_blue = np.abs(without - blue).sum(-1) < 30
    drawn = np.abs(with_gt - without).sum(-1) > 0
    edge = over_blue & drawn
    assert edge.sum() > 200  # the box's four edges, over the object
    # far from the object's blue along the edge, not a blue box on a blue square
    assert np.median(np.sqrt(((with_gt[edge] - blue) ** 2).sum(-1))) > 150

    svg = qualitative_panels([rec, {**rec, "split": "val_relation", "iou": 0.1}], tmp_path / "q.svg").read_text()
    assert "val_plain | success | IoU 0.80" in svg and "val_relation | failure | IoU 0.10" in svg


def test_report_figure_draws_the_budget_curve_and_baselines(tmp_path, result_files):
    """Issue 25 item 4: the accuracy-vs-latency figure carries a reasoning-budget sweep as a
    curve (read from budget_sweep.json, budget order, macro accuracy) and no-model baselines."""
    from egm.errors import InputError
    from egm.eval.report import budget_curve

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    rows = [{"budget": b, "latency_mean_ms": lat, "macro_avg": acc, "accuracy": {}} for b, lat, acc in
            [(32, 30.0, 0.41), (0, 12.5, 0.20), (144, 55.0, 0.52), (8, None, 0.3)]]
    (sweep / "budget_sweep.json").write_text(json.dumps({"model": "EGM-tiny", "budgets": rows}))
    name, pts = budget_curve(sweep)
    assert name == "EGM-tiny: reasoning budget"
    assert pts == [(12.5, 0.20, "B=0"), (30.0, 0.41, "B=32"), (55.0, 0.52, "B=144")]  # sorted; no latency: left out
    written = make_report([str(result_files[0])], out_dir=str(tmp_path / "rep"), histogram=False,
                          budget_sweeps=[str(sweep / "budget_sweep.json")], baselines={"mean-box baseline": 0.025})
    svg = Path(written["accuracy_vs_latency.svg"]).read_text()
    for text in ("B=0", "B=32", "B=144", "mean-box baseline (no model call)", "EGM-tiny: reasoning budget"):
        assert text in svg, text
    (sweep / "budget_sweep.json").write_text("{}")
    with pytest.raises(InputError, match="budget_sweep.json"):
        budget_curve(sweep)
