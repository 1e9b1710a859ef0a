"""The README's "Reproduce the paper" section, run in order on a miniature of the paper's data.

The section's commands live in fenced ``bash`` blocks, each right after a marker line:

* ``<!-- reproduce: cpu -->``: every line runs as written, in a scratch folder laid out like the
  downloads of step 1 (built here from ``tests/fixtures``'s REFER records plus small COCO-Amodal
  and TAO-Amodal files in the release formats). ``egm`` lines run in this process through
  :func:`egm.cli.main` (one import of torch for the whole section), other lines through bash.
  The stand-ins: models named by a hub id (``org/name``) or by the reference path are tiny random
  checkpoints of the command's ``--family``; the teacher API is a local fake OpenAI-compatible
  server; :data:`CPU_FLAGS` shortens generation and lifts the check of the real split sizes.
* ``<!-- reproduce: gpu -->``: each ``egm fit`` line runs with ``--print_config``; every local path
  the printed recipe reads must exist (written by the steps before it), and a tiny checkpoint of
  the recipe's family stands in for its ``export_dir``, which the later steps read.

So a renamed command, flag, config or output path in the README fails here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import pickle
import re
import shlex
import subprocess
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from egm import cli

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
MARKER = re.compile(r"^<!-- reproduce: (cpu|gpu) -->\n```bash\n(.*?)^```", re.M | re.S)
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
REFERENCE_MODEL = "models/reference"  # step 4's M_ref, a folder the user provides

# Appended to a CPU command (the last value wins): tiny models answer within a few tokens, and the
# miniature RefCOCO has 1 ref per eval split, not the benchmark's sizes.
CPU_FLAGS = {
    "evaluate": ["--max_new_tokens", "24", "--batch_size", "16"],
    "import-refer": ["--check_sizes", "false"],
    "curate": ["--progress", "false"],
}
ADAPTER_FAMILY = {"egm.models.Qwen3VLAdapter": "qwen3_vl", "egm.models.InternVLAdapter": "internvl"}

# The files the section says each step writes (checked after the whole section ran).
EXPECTED_OUTPUTS = [
    "data/refcoco/refcoco_unc_testA.jsonl", "data/refcoco/refcocog_umd_test.jsonl", "data/refcoco/refer_train.jsonl",
    "data/cocoa/cocoa_train.jsonl", "data/cocoa/cocoa_val.jsonl", "data/cocoa/cocoa_test.jsonl",
    "data/amodal/tao_amodal_train.jsonl", "data/amodal/amodal_train.jsonl",
    "data/curated/refcoco_train_reasoning.jsonl", "data/curated/refcoco_train_reasoning.jsonl.stats.json",
    "data/curated/refcoco_train_reasoning.jsonl.failures.jsonl", "data/curated/teacher_cache.jsonl",
    "data/curated/amodal_train_reasoning.jsonl", "data/cocoa/cocoa_val_verified.jsonl", "data/cocoa/cocoa_test_verified.jsonl",
    "runs/select/reference/predictions/train.jsonl", "runs/select/qwen3vl_sft/predictions/train.jsonl",
    "data/rl/qwen3vl_rl_train.jsonl", "data/rl/qwen3vl_rl_train.jsonl.stats.json", "data/rl/internvl_rl_train.jsonl",
    "runs/eval/egm_qwen3vl_8b/results.json", "runs/eval/egm_internvl3_8b/predictions/refcoco_unc_testA.jsonl",
    "reports/paper/table3.md", "reports/paper/table3.csv", "reports/paper/table4.md", "reports/paper/efficiency.md",
    "reports/paper/splits.md", "reports/paper/accuracy_vs_latency.png",
]


@dataclass
class Block:
    kind: str            # cpu | gpu
    commands: list[str]  # one shell command each (continuations joined, comment lines dropped)


def reproduce_section(readme: str) -> str:
    start = readme.index("\n## Reproduce the paper\n")
    end = readme.find("\n## ", start + 1)
    return readme[start: end if end > 0 else None]


def reproduce_blocks(readme: str) -> list[Block]:
    blocks = []
    for kind, body in MARKER.findall(reproduce_section(readme)):
        lines = body.replace("\\\n", " ").splitlines()
        blocks.append(Block(kind, [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]))
    return blocks


# ---------------------------------------------------------------------------------------------
# The miniature of step 1's downloads


def _image(path: Path, width: int, height: int, boxes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (width, height), (200, 200, 190))
    draw = ImageDraw.Draw(im)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        draw.rectangle([x1, y1, x2, y2], fill=[(40, 90, 200), (200, 60, 40), (60, 160, 60)][i % 3])
    im.save(path)


def _refer(data: Path) -> None:
    """refcoco, refcoco+ (unc) and refcocog (umd): the fixture's real ref 0 and image/annotation
    records, one ref per eval split, two per train split."""
    refs_fx = json.loads((FIXTURES / "refer_refs_unc_sample.json").read_text())
    inst_fx = json.loads((FIXTURES / "refer_instances_sample.json").read_text())
    ref0, facts = refs_fx["refs"][0], refs_fx["derived_facts_for_ref0"]
    w0, h0 = facts["image_581857_width_height"]
    img0 = {"id": ref0["image_id"], "file_name": facts["image_file"], "width": w0, "height": h0}
    ann0 = {"id": ref0["ann_id"], "image_id": ref0["image_id"], "category_id": ref0["category_id"], "iscrowd": 0,
            "bbox": facts["ann_1719310_bbox_xywh"], "area": 1.0, "segmentation": []}
    img1, ann1 = inst_fx["images"][0], inst_fx["annotations"][0]
    instances = {"images": [img0, img1], "annotations": [ann0, ann1],
                 "categories": [{"id": 1, "name": "person", "supercategory": "person"},
                                {"id": ann1["category_id"], "name": "dog", "supercategory": "animal"}]}
    eval_splits = {"refcoco": ["val", "testA", "testB"], "refcoco+": ["val", "testA", "testB"], "refcocog": ["val", "test"]}
    for dataset, split_by in (("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd")):
        refs = []
        for i, split in enumerate(["train", "train", *eval_splits[dataset]]):
            img, ann = (img0, ann0) if i % 2 == 0 else (img1, ann1)
            sents = ref0["sentences"] if img is img0 else [{"tokens": ["small", "dog"], "raw": "small dog", "sent": "small dog"}]
            sents = [{**s, "sent_id": 10 * i + k} for k, s in enumerate(sents)]
            refs.append({"ref_id": i, "ann_id": ann["id"], "image_id": img["id"], "category_id": ann["category_id"],
                         "split": split, "file_name": "ignored.jpg", "sent_ids": [s["sent_id"] for s in sents],
                         "sentences": sents})
        d = data / "refer" / dataset
        d.mkdir(parents=True)
        with open(d / f"refs({split_by}).p", "wb") as fh:
            pickle.dump(refs, fh, protocol=2)
        (d / "instances.json").write_text(json.dumps(instances))
    for img, ann in ((img0, ann0), (img1, ann1)):
        x, y, w, h = ann["bbox"]
        _image(data / "coco" / "train2014" / img["file_name"], img["width"], img["height"], [(x, y, x + w, y + h)])


def _rle(height: int, width: int, box) -> dict:
    m = np.zeros((height, width), np.uint8, order="F")
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = 1
    r = mask_utils.encode(m)
    return {"size": r["size"], "counts": r["counts"].decode("ascii")}


def _cocoa(data: Path) -> None:
    """One image per COCO-Amodal json: an unoccluded object and one half hidden behind it."""
    h, w = 240, 320
    for i, (split, folder) in enumerate((("train", "train2014"), ("val", "val2014"), ("test", "val2014"))):
        file_name = f"COCO_{folder}_{100 + i:012d}.jpg"
        front, back, back_visible = (40, 40, 160, 200), (120, 60, 280, 180), (160, 60, 280, 180)
        regions = [
            {"name": "cup", "segmentation": [40, 40, 160, 40, 160, 200, 40, 200], "area": 1.0, "isStuff": 0, "order": 1},
            {"name": "laptop", "segmentation": [120, 60, 280, 60, 280, 180, 120, 180], "area": 1.0, "isStuff": 0,
             "order": 2, "visible_mask": _rle(h, w, back_visible)},
        ]
        ann_file = data / "cocoa" / "annotations" / f"COCO_amodal_{split}2014.json"
        ann_file.parent.mkdir(parents=True, exist_ok=True)
        ann_file.write_text(json.dumps({
            "images": [{"id": 100 + i, "file_name": file_name, "width": w, "height": h}],
            "annotations": [{"id": 500 + i, "image_id": 100 + i, "size": 2, "regions": regions}],
        }))
        _image(data / "coco" / folder / file_name, w, h, [back, front])


def _tao(data: Path) -> None:
    """One TAO-Amodal frame: a person partly out of the frame and a partly occluded bat."""
    w, h = 320, 180
    file_name = "train/ArgoVerse/seq/ring_front_center_1.jpg"
    ann = {"image_id": 10, "video_id": 3, "area": 1.0, "amodal_is_uncertain": False}
    out = data / "tao" / "amodal_annotations" / "train.json"
    out.parent.mkdir(parents=True)
    out.write_text(json.dumps({
        "images": [{"id": 10, "video_id": 3, "file_name": file_name, "width": w, "height": h}],
        "categories": [{"id": 805, "name": "person"}, {"id": 95, "name": "baseball_bat"}],
        "annotations": [
            {**ann, "id": 1, "track_id": 11, "category_id": 805, "bbox": [0, 40, 30, 100], "amodal_bbox": [-20, 40, 50, 100],
             "visibility": 0.6},
            {**ann, "id": 2, "track_id": 12, "category_id": 95, "bbox": [150, 90, 40, 20], "amodal_bbox": [150, 90, 80, 20],
             "visibility": 0.5},
        ],
    }))
    _image(data / "tao" / "frames" / file_name, w, h, [(0, 40, 30, 140), (150, 90, 190, 110)])


def build_world(root: Path, tiny_dirs) -> None:
    data = root / "data"
    _refer(data)
    _cocoa(data)
    _tao(data)
    (root / "configs").symlink_to(REPO / "configs")
    (root / "tools").symlink_to(REPO / "tools")
    (root / "models").mkdir()
    (root / REFERENCE_MODEL).symlink_to(tiny_dirs["internvl"])


# ---------------------------------------------------------------------------------------------
# The teacher: a local OpenAI-compatible server answering each Appendix B prompt in its format


class FakeTeacher:
    def __init__(self):
        self.requests = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = body["messages"][0]["content"]
                prompt = next(p["text"] for p in content if p["type"] == "text")
                assert sum(p["type"] == "image_url" for p in content) == 1
                with outer.lock:
                    outer.requests += 1
                data = json.dumps({
                    "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": outer.answer(prompt)}}],
                    "usage": {"prompt_tokens": 800, "completion_tokens": 40, "total_tokens": 840},
                }).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @staticmethod
    def answer(prompt: str) -> str:
        if "Your response (YES or NO)" in prompt:  # Fig. 10
            return "YES"
        m = re.search(r"location of a (.+?) in this image", prompt)  # Fig. 9
        if m:
            return f"the {m.group(1)} partly hidden behind the object in front"
        return "The target is the one the question singles out; it is the only such object on that side."  # Figs. 8, 11

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------------------------------
# Running the blocks


def run_egm(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            cli.main(argv)
        except SystemExit as e:  # --print_config exits 0
            if e.code not in (0, None):
                raise AssertionError(f"egm {' '.join(argv)} exited {e.code}") from None
    return out.getvalue()


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def cpu_argv(argv: list[str], root: Path, tiny_dirs) -> list[str]:
    """The stand-ins of the module docstring: tiny models for hub ids and the reference, CPU flags."""
    argv = list(argv)
    if "--checkpoint" in argv:
        i = argv.index("--checkpoint") + 1
        family = flag(argv, "--family") or "qwen3_vl"
        if HUB_ID.match(argv[i]) and not (root / argv[i]).exists():
            argv[i] = str(tiny_dirs[family])
    return argv + CPU_FLAGS.get(argv[0], [])


def local_inputs(cfg: dict) -> list[str]:
    """The files and folders a printed fit recipe reads: train/val manifests, a local start model."""
    data = cfg["data"]["init_args"]
    paths = list(data.get("train") or []) + list((data.get("val") or {}).values())
    start = cfg["model"]["init_args"]["adapter"]["init_args"]["pretrained_model_name_or_path"]
    if not HUB_ID.match(start):
        paths.append(start)
    return paths


def run_gpu_command(cmd: str, root: Path, tiny_dirs) -> dict:
    argv = shlex.split(cmd, comments=True)
    assert argv[:2] == ["egm", "fit"], f"a gpu block holds `egm fit` recipes, got {cmd!r}"
    cfg = yaml.safe_load(run_egm(argv[1:] + ["--print_config"]))
    missing = [p for p in local_inputs(cfg) if not (root / p).exists()]
    assert not missing, f"{cmd}: the recipe reads {missing}, which no step before it wrote"
    model = cfg["model"]["init_args"]
    export = root / model["export_dir"]
    export.parent.mkdir(parents=True, exist_ok=True)
    export.symlink_to(tiny_dirs[ADAPTER_FAMILY[model["adapter"]["class_path"]]])
    return cfg


def run_cpu_command(cmd: str, root: Path, tiny_dirs, monkeypatch) -> None:
    argv = shlex.split(cmd, comments=True)
    if argv[0] == "export":
        for assignment in argv[1:]:
            key, _, value = assignment.partition("=")
            monkeypatch.setenv(key, value)
    elif argv[0] == "egm":
        run_egm(cpu_argv(argv[1:], root, tiny_dirs))
    else:
        r = subprocess.run(["bash", "-c", cmd], cwd=root, capture_output=True, text=True)
        assert r.returncode == 0, f"{cmd}: {r.stderr}"


# ---------------------------------------------------------------------------------------------
# Tests


def test_the_section_is_marked_and_near_the_top():
    """The pipeline is one ordered list within the README's first 150 lines, every step marked."""
    readme = (REPO / "README.md").read_text()
    head = readme.splitlines()[:150]
    assert head.index("## Reproduce the paper") > head.index("## Two commands")
    steps = [ln for ln in head if re.match(r"\*\*\d\. ", ln)]
    assert [s[2] for s in steps] == list("1234567"), steps
    blocks = reproduce_blocks(readme)
    assert [b.kind for b in blocks] == ["cpu", "cpu", "gpu", "cpu", "gpu", "cpu", "cpu"]
    assert all(b.commands for b in blocks)
    assert all(cmd in head for b in blocks for cmd in b.commands), "every command within the first 150 lines"
    section = reproduce_section(readme)
    assert section.count("```bash") == len(blocks), "every bash block of the section carries a marker"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"egm_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_curation_estimate_in_the_readme_is_the_tools_output(capsys):
    """Step 2's table is what `python tools/curation_estimate.py` prints, line for line; its request
    counts follow from Table 2 (575,208 vanilla, 23,698 amodal, Fig. 10 keeping about half)."""
    tool = load_tool("curation_estimate")
    tool.main([])
    printed = capsys.readouterr().out.splitlines()
    section = reproduce_section((REPO / "README.md").read_text())
    table = [ln for ln in printed if ln.startswith("|")]
    assert len(table) == 7 and all(ln in section.splitlines() for ln in table), table
    rows = {r["key"]: r for r in tool.estimate()}
    assert rows["vanilla_reasoning"]["requests"] == 575_208
    assert rows["amodal_description"]["requests"] == rows["amodal_verification"]["requests"] == 2 * 23_698
    assert rows["amodal_reasoning"]["requests"] == 23_698
    assert all(r["prompt_tokens_est"] == -(-r["prompt_chars"] // 4) for r in rows.values())


def test_parser_reads_markers_continuations_and_comments():
    text = ("\n## Reproduce the paper\n<!-- reproduce: cpu -->\n```bash\n# note\negm a \\\n  --b c\n\ncat x > y\n```\n"
            "```bash\negm unmarked\n```\n<!-- reproduce: gpu -->\n```bash\negm fit --config z.yaml\n```\n## Next\n"
            "<!-- reproduce: cpu -->\n```bash\negm later\n```\n")
    assert reproduce_blocks(text) == [Block("cpu", ["egm a    --b c", "cat x > y"]), Block("gpu", ["egm fit --config z.yaml"])]


@pytest.fixture
def one_torch_thread():
    """The tiny models run in this process: one thread, as conftest sets for the modules that import
    torch at collection (this one imports it only when the section's first model loads)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_reproduce_the_paper_runs(tmp_path, tiny_dirs, monkeypatch, one_torch_thread):
    """Every block of the section, in order, on the miniature world (see the module docstring)."""
    blocks = reproduce_blocks((REPO / "README.md").read_text())
    root = tmp_path / "repro"
    root.mkdir()
    build_world(root, tiny_dirs)
    monkeypatch.chdir(root)
    teacher = FakeTeacher()
    monkeypatch.setenv("EGM_TEACHER_BASE_URL", teacher.base_url)
    for var in ("EGM_TEACHER_MODEL", "EGM_TEACHER_API_KEY", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    try:
        for block in blocks:
            for cmd in block.commands:
                if block.kind == "gpu":
                    run_gpu_command(cmd, root, tiny_dirs)
                else:
                    run_cpu_command(cmd, root, tiny_dirs, monkeypatch)
        asked = teacher.requests
        # step 2's cost estimate scaled by a trial's measured tokens (the fake teacher bills 800 + 40)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            load_tool("curation_estimate").main(["--trial", "data/curated/amodal_train_reasoning.jsonl.stats.json"])
        assert "measured 800 input + 40 output tokens each -> 23,698 requests: 19.0 M input + 0.9 M output" in out.getvalue()
        # the README's resume claim: the same curate command again asks the teacher nothing
        curate = next(c for b in blocks for c in b.commands if c.startswith("egm curate --job vanilla"))
        run_cpu_command(curate, root, tiny_dirs, monkeypatch)
        assert teacher.requests == asked
    finally:
        teacher.close()
    missing = [p for p in EXPECTED_OUTPUTS if not (root / p).exists()]
    assert not missing, missing
    vanilla = json.loads((root / "data/curated/refcoco_train_reasoning.jsonl.stats.json").read_text())
    assert vanilla["requests"] == 0 and vanilla["cache_hits"] == vanilla["input"] == vanilla["kept"] > 0
    reasoned = [json.loads(ln) for ln in (root / "data/curated/amodal_train_reasoning.jsonl").read_text().splitlines()]
    assert reasoned and all(s["reasoning"] and s["task"] == "amodal" for s in reasoned)
    table3 = (root / "reports/paper/table3.md").read_text()
    assert all(name in table3 for name in ("Qwen3-VL-8B-Thinking", "EGM-Qwen3-VL-8B", "InternVL3-8B", "EGM-InternVL3-8B"))


def test_readme_and_docs_links_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists (the sections moved)."""
    broken = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not re.match(r"[a-z]+:", target) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken


def test_readme_demo_numbers_come_from_docs_demo():
    """The README's demo summary quotes docs/demo.md, where each number sits next to its command."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("\n## The CPU demo\n")
    summary = readme[start: readme.index("\n## ", start + 1)]
    demo = (REPO / "docs" / "demo.md").read_text()
    numbers = re.findall(r"\d+\.\d+(?: ± \d+\.\d+)?", summary)
    assert len(numbers) >= 8 and all(n in demo for n in numbers), [n for n in numbers if n not in demo]
