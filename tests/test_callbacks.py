"""W&B offline: the prediction table (image + ground-truth / predicted box overlays, reasoning,
reward) and the IoU / reward histograms are written to the run directory, no network."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import lightning as L
import pytest

import egm.rl.module as rl_module
import egm.sft as sft
import egm.validation as validation
from egm.callbacks import WandbPredictionTable
from egm.data.datamodule import GroundingDataModule
from egm.data.synthetic import make_synthetic
from egm.generation.sampling import SamplingParams
from egm.models import Qwen3VLAdapter
from egm.rl.module import GRPOModule
from egm.scoring import Scored

wandb = pytest.importorskip("wandb")
from lightning.pytorch.loggers import WandbLogger  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory, qwen_dir):
    root = tmp_path_factory.getbasetemp()
    ck = qwen_dir
    paths = make_synthetic(str(root / "syn_wandb"), n_train=4, n_val=5, n_test=2, image_size=64)
    return ck, paths


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))  # artifact staging (tables + media)
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def fake_scores(texts, samples, parse):
    """A random tiny model never answers: predict the ground truth shifted by 4 px (IoU < 1)."""
    out = []
    for i, s in enumerate(samples):
        if i % 2:
            out.append(Scored(0.0, False, False, None, "", "no_box"))
        else:
            x0, y0, x1, y1 = s.box
            out.append(Scored(0.7, True, True, (x0 + 4, y0, x1 + 4, y1), "the red square is left", None))
    return out


def _fit(module, ck, paths, tmp_path, name):
    dm = GroundingDataModule(train=paths["train"], val={"val": paths["val"]}, batch_size=2, eval_batch_size=3)
    logger = WandbLogger(project="egm-test", name=name, save_dir=str(tmp_path), offline=True, tags=["test"])
    t = L.Trainer(max_steps=1, accelerator="cpu", logger=logger, enable_checkpointing=False, log_every_n_steps=1,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=1,
                  callbacks=[WandbPredictionTable(max_rows=4, train_every_n_steps=1)])
    t.fit(module, dm)
    run_dir = logger.experiment.dir  # <save_dir>/wandb/offline-run-*/files
    logger.experiment.finish()
    return Path(run_dir)


def wandb_records(path):
    """Records of an offline ``run-*.wandb`` file (LevelDB-log framing: 32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, buf, out, block = 7, b"", [], 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and n == 0:  # zero padding to the block end
            pos += left - 7
            continue
        if pos + n > len(data):  # a record the writer has not finished flushing: the tail is torn
            break
        buf += data[pos:pos + n]
        pos += n
        if kind in (1, 4):  # FULL / LAST chunk
            r = pb.Record()
            r.ParseFromString(buf)
            out.append(r)
            buf = b""
    return out


def history(files, need: tuple[str, ...] = ()) -> dict[str, object]:
    """Last logged value of every history key (``a.b`` for nested fields such as ``val/iou_hist._type``).

    The wandb service may append the last history records just after ``finish()`` returns (as
    it does artifacts, see :func:`_tables`): the file is read again, for up to 20 s, until every
    key of ``need`` is there.
    """
    run_file, = files.parent.glob("run-*.wandb")
    for _ in range(100):
        out = {}
        for r in wandb_records(run_file):
            if r.WhichOneof("record_type") == "history":
                for item in r.history.item:
                    out[item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
        if all(k in out for k in need):
            break
        time.sleep(0.2)
    return out


def _tables(files):
    """``{artifact entry: table JSON}`` of the run's table artifacts, found through the .wandb file.

    Offline, a logged table becomes a ``run_table`` artifact whose files (the table JSON with the
    image cells and their boxes, the PNGs) are staged locally until ``wandb sync``; the copy in
    ``files/media/table`` only holds placeholders.
    """
    run_file, = files.parent.glob("run-*.wandb")
    for _ in range(100):  # the service may write the artifact record just after finish() returns
        records = wandb_records(run_file)
        if any(r.WhichOneof("record_type") == "artifact" for r in records):
            break
        time.sleep(0.2)
    out = {}
    for r in records:
        if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "run_table":
            entries = {c.path: c.local_path for c in r.artifact.manifest.contents}
            for path, local in entries.items():
                if path.endswith(".table.json"):
                    out[r.artifact.name + "/" + path] = (json.loads(Path(local).read_text()), entries)
    return out


def test_sft_validation_table_offline(world, tmp_path, offline, monkeypatch):
    ck, paths = world
    monkeypatch.setattr(validation, "score_texts", fake_scores)
    m = sft.SFTModule(Qwen3VLAdapter(str(ck), max_length=256), lr=1e-3,
                      val_sampling=SamplingParams(max_new_tokens=4))
    files = _fit(m, ck, paths, tmp_path, "sft-test")
    tables = _tables(files)
    assert len(tables) == 1, list((files / "media").rglob("*"))
    (name, (tab, entries)), = tables.items()
    assert name.endswith("val/predictions.table.json"), name
    cols = tab["columns"]
    assert cols == WandbPredictionTable.COLUMNS and len(tab["data"]) == 4  # max_rows of 5 val samples
    rows = [dict(zip(cols, r)) for r in tab["data"]]
    assert rows[0]["reasoning"] == "the red square is left" and rows[0]["reward"] == pytest.approx(0.5 * 0.7 + 0.5)
    assert rows[1]["reward"] == 0.0 and rows[1]["failure"] == "no_box" and rows[1]["success"] is False
    img0, img1 = rows[0]["image"], rows[1]["image"]
    assert img0["_type"] == "image-file" and set(img0["boxes"]) == {"ground_truth", "prediction"}
    assert set(img1["boxes"]) == {"ground_truth"}  # nothing parsed: no predicted box
    gt, pred = img0["boxes"]["ground_truth"][0]["position"], img0["boxes"]["prediction"][0]["position"]
    assert pred["minX"] == pytest.approx(gt["minX"] + 4) and pred["maxY"] == pytest.approx(gt["maxY"])
    assert img0["width"] == 64 and Path(entries[img0["path"]]).stat().st_size > 0  # the staged PNG
    h = history(files, need=("val/iou_hist._type", "val/reward_hist._type", "val/val/acc"))
    assert h["val/iou_hist._type"] == "histogram" and h["val/reward_hist._type"] == "histogram"
    assert sum(h["val/iou_hist.values"]) == 4 + 1  # the 5 kept predictions (2 of them IoU 0.7)
    assert h["val/val/acc"] == pytest.approx(3 / 5)


def test_grpo_train_histograms_offline(world, tmp_path, offline, monkeypatch):
    ck, paths = world
    monkeypatch.setattr(validation, "score_texts", fake_scores)
    m = GRPOModule(Qwen3VLAdapter(str(ck)), lr=1e-3, warmup_steps=0, n_samples=2, alpha=0.5,
                   rollout=SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=4),
                   val_sampling=SamplingParams(max_new_tokens=4))
    files = _fit(m, ck, paths, tmp_path, "grpo-test")
    keys = ("train/rewards_hist", "train/advantages_hist", "val/iou_hist", "val/reward_hist")
    h = history(files, need=tuple(k + "._type" for k in keys) + ("train/reward/mean",))
    for key in keys:
        assert h[key + "._type"] == "histogram", key
    assert sum(h["train/rewards_hist.values"]) == 2 * 2  # 2 prompts x n_samples 2
    assert "train/reward/mean" in h
    assert len(_tables(files)) == 1
    assert rl_module.GRPOModule is GRPOModule


def test_no_wandb_logger_no_logging(world, tmp_path):
    """With another logger the callback stays silent (CPU demo, tests)."""
    ck, paths = world
    cb = WandbPredictionTable()
    m = sft.SFTModule(Qwen3VLAdapter(str(ck), max_length=256), val_sampling=SamplingParams(max_new_tokens=2))
    dm = GroundingDataModule(train=paths["train"], val={"val": paths["val"]}, batch_size=2, eval_batch_size=5)
    t = L.Trainer(max_steps=1, accelerator="cpu", logger=L.pytorch.loggers.CSVLogger(tmp_path), callbacks=[cb],
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  num_sanity_val_steps=0, val_check_interval=1)
    t.fit(m, dm)
    assert len(m.validation.last_records["val"]) == 5
    assert not list(tmp_path.rglob("*.wandb"))
