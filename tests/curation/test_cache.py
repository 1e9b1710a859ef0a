"""Reply cache: durable appends, torn last line, stale prompts; drawing and the Teacher protocol."""

from __future__ import annotations

import json
import threading

from PIL import Image

from egm.curation.cache import ReplyCache
from egm.curation.client import Reply, Teacher, TeacherConfig, TeacherRequest
from egm.curation.draw import GREEN, RED, Overlay, draw_boxes, from_data_url, to_data_url
from egm.curation.jobs import parse_description, parse_reasoning, parse_verdict, vanilla_reasoning
from egm.data.manifest import Sample

import pytest


def test_cache_roundtrip_and_torn_line(tmp_path):
    p = tmp_path / "c.jsonl"
    with ReplyCache(p) as c:
        c.put("s1", "vanilla_reasoning@paper-v1", "m", "sha1", Reply("one", 10, 2, "stop"))
        c.put("s2", "vanilla_reasoning@paper-v1", "m", "sha2", Reply("two", 11, 3))
    with open(p, "ab") as fh:  # a writer killed mid-line
        fh.write(b'{"id": "s3", "prompt": "vanilla_reasoning@pa')
    c = ReplyCache(p)
    assert c.truncated_bytes > 0 and len(c) == 2
    assert c.get("s1", "vanilla_reasoning@paper-v1", "m", "sha1") == Reply("one", 10, 2, "stop")
    assert c.get("s1", "vanilla_reasoning@paper-v1", "other-model", "sha1") is None
    assert c.get("s1", "vanilla_reasoning@paper-v2", "m", "sha1") is None
    assert c.get("s1", "vanilla_reasoning@paper-v1", "m", "changed-prompt") is None  # stale
    c.put("s3", "vanilla_reasoning@paper-v1", "m", "sha3", Reply("three"))
    c.close()
    lines = p.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(x) for x in lines)  # the append starts on a fresh line
    assert len(ReplyCache(p)) == 3


def test_cache_skips_bad_lines_and_newest_wins(tmp_path):
    p = tmp_path / "c.jsonl"
    rec = {"id": "a", "prompt": "k", "model": "m", "prompt_sha": "x", "text": "old"}
    p.write_text(json.dumps(rec) + "\nnot json\n" + json.dumps({**rec, "text": "new"}) + "\n")
    c = ReplyCache(p)
    assert c.skipped_lines == 1 and c.get("a", "k", "m").text == "new"


def test_cache_threads_write_whole_lines(tmp_path):
    p = tmp_path / "c.jsonl"
    with ReplyCache(p, fsync=False) as c:
        ts = [threading.Thread(target=lambda k=k: [c.put(f"{k}-{i}", "k", "m", "s", Reply("x" * 5000)) for i in range(25)])
              for k in range(4)]
        [t.start() for t in ts]
        [t.join() for t in ts]
    assert len(ReplyCache(p)) == 100
    assert all(json.loads(x)["text"] == "x" * 5000 for x in p.read_text().splitlines())


def test_draw_and_data_url():
    im = Image.new("RGB", (50, 40), (10, 10, 10))
    out = draw_boxes(im, [Overlay([5, 5, 30, 20], GREEN)])
    assert out.getpixel((5, 12)) == GREEN and out.getpixel((29, 12)) == GREEN and out.getpixel((17, 5)) == GREEN
    assert out.getpixel((17, 19)) == GREEN and out.getpixel((17, 12)) == (10, 10, 10)  # outline only
    assert out.getpixel((17, 21)) == (10, 10, 10)  # [x1, x2) pixels: nothing drawn past the box
    red = draw_boxes(im, [Overlay([-10, 10, 45, 60], RED, "TARGET")])
    assert red.getpixel((0, 30)) == RED and red.getpixel((44, 30)) == RED  # clipped to the image
    assert im.getpixel((5, 12)) == (10, 10, 10)  # the input is untouched
    url = to_data_url(out)
    assert url.startswith("data:image/png;base64,")
    assert from_data_url(url).convert("RGB").tobytes() == out.tobytes()
    assert to_data_url(out, "jpeg").startswith("data:image/jpeg;base64,")
    with pytest.raises(ValueError):
        to_data_url(out, "gif")


def test_teacher_config_from_env(monkeypatch):
    monkeypatch.setenv("EGM_TEACHER_BASE_URL", "http://127.0.0.1:1/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "k-openai")
    monkeypatch.delenv("EGM_TEACHER_API_KEY", raising=False)
    monkeypatch.delenv("EGM_TEACHER_MODEL", raising=False)
    with pytest.raises(ValueError, match="model"):
        TeacherConfig().resolved()
    cfg = TeacherConfig(model="gpt-4o").resolved()
    assert (cfg.base_url, cfg.api_key) == ("http://127.0.0.1:1/v1", "k-openai")
    monkeypatch.setenv("EGM_TEACHER_API_KEY", "k-egm")
    assert TeacherConfig(model="x").resolved().api_key == "k-egm"
    assert TeacherConfig(model="x", api_key="explicit").resolved().api_key == "explicit"


def test_parsers():
    assert parse_reasoning("  The dog on the left.\n") == "The dog on the left."
    assert parse_description('Description: "The Second teddy bear from left."\n') == "the second teddy bear from left"
    assert parse_description("**the man in yellow coat**") == "the man in yellow coat"
    assert parse_verdict("YES") and parse_verdict("**Yes.**") and not parse_verdict('"NO"') and not parse_verdict("no, it is ambiguous")
    for bad in ("", "Maybe", "yesterday"):
        with pytest.raises(ValueError):
            parse_verdict(bad)
    for bad in ("", "   \n", " ".join(["word"] * 40)):
        with pytest.raises(ValueError):
            parse_description(bad)
    with pytest.raises(ValueError):
        parse_reasoning(" \n")


class EchoOracle:
    """A non-API teacher (what the synthetic oracle looks like): answers from the request fields."""

    model = "oracle"

    def __init__(self):
        self.calls = 0

    def complete(self, request: TeacherRequest) -> Reply:
        self.calls += 1
        assert request.job == "vanilla_reasoning" and request.prompt_key == "vanilla_reasoning@paper-v1"
        return Reply(f"look for {request.sample.sentence} at {request.fields['gt_bbox']}")


def test_oracle_teacher_fits_the_jobs(tmp_path):
    t = EchoOracle()
    assert isinstance(t, Teacher)
    samples = [
        Sample("v1", "/nonexistent.png", 100, 50, "red cup", "vanilla", [10, 5, 60, 45], "train", "synthetic"),
        Sample("a1", "/nonexistent.png", 100, 50, "cup", "amodal", [10, 5, 60, 45], "train", "synthetic"),
    ]
    with ReplyCache(tmp_path / "c.jsonl") as c:
        res = vanilla_reasoning(samples, t, c, concurrency=2)
    assert [s.reasoning for s in res.samples] == ["look for red cup at [100, 100, 599, 899]"]
    assert res.failures[0]["id"] == "a1" and res.failures[0]["kind"] == "skipped"
    assert res.stats["input_tokens"] == 0 and t.calls == 1
