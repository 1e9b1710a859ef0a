"""GroundingDataModule: weighted mixing, seeded order, image checks, named eval loaders, hooks."""

import os
from collections import Counter
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from PIL import Image

from egm.data.datamodule import GroundingDataModule, WeightedMixSampler, list_collate, mix_counts
from egm.data.manifest import read_manifest, write_manifest
from egm.data.synthetic import make_synthetic


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("dm")
    paths = make_synthetic(str(out), n_train=40, n_val=10, n_test=5, seed=1)
    train = read_manifest(paths["train"])
    write_manifest(out / "a.jsonl", train[:30])
    write_manifest(out / "b.jsonl", train[30:])
    return out, paths


def ids(dm, loader=None):
    return [ex["sample"].id for batch in (loader or dm.train_dataloader()) for ex in batch]


def test_mix_counts_and_sampler_proportions():
    assert mix_counts(400, [1, 3]) == [100, 300]
    assert mix_counts(10, [1, 1, 1]) == [4, 3, 3] and sum(mix_counts(7, [0.2, 0.5, 0.3])) == 7
    with pytest.raises(ValueError, match="weights"):
        mix_counts(5, [0, 0])
    s = WeightedMixSampler([30, 10], [1, 3], num_samples=400, seed=0)
    order = list(s)
    src = ["b" if i >= 30 else "a" for i in order]
    assert Counter(src) == {"a": 100, "b": 300}
    head = src[:100]  # mixed per sample: any window has about the right share
    assert abs(head.count("b") / 100 - 0.75) < 0.12
    per_item = Counter(order)
    assert {per_item[i] for i in range(30, 40)} == {30}  # permutations: each b item exactly 30 times
    assert {per_item[i] for i in range(30)} <= {3, 4}


def test_mixing_through_the_datamodule(world):
    out, _ = world
    dm = GroundingDataModule(train=[str(out / "a.jsonl"), str(out / "b.jsonl")], train_weights=[1.0, 3.0],
                             epoch_size=200, batch_size=16, seed=5)
    dm.setup("fit")
    got = ids(dm)
    b_ids = {s.id for s in read_manifest(out / "b.jsonl")}
    assert len(got) == 200
    assert sum(i in b_ids for i in got) == 150


def test_deterministic_and_epoch_aware(world):
    out, paths = world
    mk = lambda seed: GroundingDataModule(train=paths["train"], batch_size=7, seed=seed)  # noqa: E731
    a, b, c = mk(0), mk(0), mk(1)
    for dm in (a, b, c):
        dm.setup("fit")
    ea, eb = ids(a), ids(b)
    assert ea == eb and sorted(ea) == sorted(s.id for s in read_manifest(paths["train"]))
    assert ids(c) != ea
    la = a.train_dataloader()
    la.sampler.set_epoch(1)
    e1 = ids(a, la)
    assert e1 != ea and sorted(e1) == sorted(ea)
    la.sampler.set_epoch(0)
    assert ids(a, la) == ea


def test_examples_and_default_collate(world):
    _, paths = world
    dm = GroundingDataModule(train=paths["train"], val={"val": paths["val"]}, batch_size=4, max_train_samples=8,
                             num_workers=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, list) and len(batch) == 4
    ex = batch[0]
    assert set(ex) == {"sample", "image"} and ex["image"].mode == "RGB"
    assert ex["image"].size == (ex["sample"].width, ex["sample"].height)
    assert len(dm.train_dataloader().sampler) == 8
    assert list_collate([1, 2]) == [1, 2]


def test_missing_and_bad_images(world, tmp_path):
    _, paths = world
    samples = read_manifest(paths["val"])
    bad = tmp_path / "bad.jsonl"
    missing = str(tmp_path / "gone.png")
    Image.new("RGB", (10, 10)).save(tmp_path / "small.png")
    samples[3].image = missing
    samples[5].image = str(tmp_path / "small.png")
    write_manifest(bad, samples)
    dm = GroundingDataModule(val={"v": str(bad)})
    with pytest.raises(FileNotFoundError) as e:
        dm.setup("validate")
    msg = str(e.value)
    assert f"{bad}:4:" in msg and samples[3].id in msg and missing in msg and "file not found" in msg
    dm = GroundingDataModule(val={"v": str(bad)}, skip_bad_images=True)
    dm.setup("validate")
    assert dm.skipped == {"v": 2} and len(dm.val_sets["v"]) == len(samples) - 2
    with pytest.raises(FileNotFoundError, match="size 10x10 differs from the manifest's 128x128"):
        samples[3].image = paths["val"].replace("val.jsonl", "images/val/syn_val_000003.png")
        write_manifest(bad, samples)
        GroundingDataModule(val={"v": str(bad)}).setup("validate")


def test_truncated_image_is_caught_at_setup(world, tmp_path):
    """A PNG cut in half has a valid header: only a full decode at set-up finds it (before, the
    first batch died with ``OSError: image file is truncated``)."""
    _, paths = world
    samples = read_manifest(paths["val"])
    data = open(samples[2].image, "rb").read()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with Image.open(cut) as im:
        assert im.size == (samples[2].width, samples[2].height)  # the header alone looks fine
    samples[2].image = str(cut)
    bad = tmp_path / "trunc.jsonl"
    write_manifest(bad, samples)
    with pytest.raises(FileNotFoundError, match=rf"{bad}:3: sample '{samples[2].id}': image {cut}: unreadable "
                                                r"\(OSError: .*truncated"):
        GroundingDataModule(val={"v": str(bad)}).setup("validate")
    dm = GroundingDataModule(val={"v": str(bad)}, skip_bad_images=True)
    dm.setup("validate")
    assert dm.skipped == {"v": 1} and str(cut) not in {s.image for s in dm.val_sets["v"].samples}
    assert len([ex for batch in dm.val_dataloader()[0] for ex in batch]) == len(samples) - 1  # every batch loads


def test_named_eval_loaders_and_limits(world):
    _, paths = world
    dm = GroundingDataModule(val={"val_plain": paths["val_plain"], "val_amodal": paths["val_amodal"]},
                             test={"test": paths["test"]}, eval_batch_size=3, max_eval_samples=1)
    dm.setup("validate")
    loaders = dm.val_dataloader()
    assert dm.val_names == ["val_plain", "val_amodal"] and len(loaders) == 2
    assert [ids(dm, ld) for ld in loaders] == [["syn_val_000000"], ["syn_val_000004"]]
    assert dm.split_name("val", 1) == "val_amodal"
    dm.setup("test")
    assert dm.test_names == ["test"] and len(dm.test_dataloader()[0].dataset) == 1
    only_amodal = GroundingDataModule(val={"v": paths["val"]}, tasks=["amodal"])
    only_amodal.setup("validate")
    assert {s.task for s in only_amodal.val_sets["v"].samples} == {"amodal"}


def test_collator_hook(world):
    _, paths = world
    dm = GroundingDataModule(train=paths["train"], val={"v": paths["val"]}, batch_size=2)
    dm.setup("fit")
    assert dm.collate_fn("train") is list_collate
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(collator=lambda exs: ("all", len(exs))))
    assert next(iter(dm.train_dataloader())) == ("all", 2)

    class LM:
        def collate_fn(self, stage):
            return lambda exs: (stage, len(exs))

    dm.trainer = SimpleNamespace(lightning_module=LM())
    assert next(iter(dm.train_dataloader())) == ("train", 2)
    assert next(iter(dm.val_dataloader()[0])) == ("val", 2)


class _Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen_train, self.seen_val = [], []

    def collate_fn(self, stage):
        return lambda exs: [ex["sample"].id for ex in exs]

    def training_step(self, batch, batch_idx):
        self.seen_train.append((self.current_epoch, batch))
        return (self.w ** 2).sum() + 1.0

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.seen_val.append((self.trainer.datamodule.split_name("val", dataloader_idx), batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_uses_hook_names_and_epochs(world):
    _, paths = world
    dm = GroundingDataModule(train=paths["train"], val={"val_plain": paths["val_plain"],
                                                        "val_ordinal": paths["val_ordinal"]}, batch_size=8)
    lm = _Recorder()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(lm, datamodule=dm)
    per_epoch = [[i for e, b in lm.seen_train if e == ep for i in b] for ep in (0, 1)]
    assert sorted(per_epoch[0]) == sorted(per_epoch[1]) and per_epoch[0] != per_epoch[1]  # set_epoch reached us
    names = {n for n, _ in lm.seen_val}
    assert names == {"val_plain", "val_ordinal"}


def test_jsonargparse_builds_it(world):
    from jsonargparse import ArgumentParser

    _, paths = world
    p = ArgumentParser()
    p.add_class_arguments(GroundingDataModule, "data")
    cfg = p.parse_object({"data": {"train": [paths["train"]], "train_weights": [1.0],
                                   "val": {"val_plain": paths["val_plain"]}, "batch_size": 4}})
    dm = p.instantiate_classes(cfg).data
    assert isinstance(dm, GroundingDataModule) and dm.val_names == ["val_plain"] and dm.batch_size == 4
    assert os.path.isfile(dm.train_paths[0])


def test_train_reasoning_false_trains_on_the_same_samples_box_only(world, tiny_dirs):
    """The box-only arm of the reasoning ablation: same train samples and order, no trace in the
    target; evaluation samples keep theirs."""
    from egm.models import Qwen3VLAdapter

    _, paths = world
    kw = dict(train=paths["train"], val={"val": paths["val"]}, batch_size=4, seed=3)
    with_r, box_only = GroundingDataModule(**kw), GroundingDataModule(**kw, train_reasoning=False)
    for dm in (with_r, box_only):
        dm.setup("fit")
    assert ids(with_r) == ids(box_only)
    a, b = with_r.train_sets[0].samples[0], box_only.train_sets[0].samples[0]
    assert a.reasoning and b.reasoning is None and (a.id, a.box, a.sentence) == (b.id, b.box, b.sentence)
    assert [s.reasoning for s in box_only.val_sets["val"].samples] == [s.reasoning for s in with_r.val_sets["val"].samples]
    adapter = Qwen3VLAdapter(str(tiny_dirs["qwen3_vl"]), thinking=True)
    batch = adapter.collate_train([box_only.train_sets[0][0]])  # what SFT trains on
    labels = batch["labels"][0]
    target = adapter.tokenizer.decode(labels[labels != -100], skip_special_tokens=False)
    assert target.startswith("\n</think>\n\n```json"), target  # "<think>\n" ends the prompt
    assert target.strip().removesuffix("<|im_end|>").strip().endswith("```")
