"""The curation jobs against a real ``openai`` client and a fake OpenAI-compatible server.

The server (``http.server`` on 127.0.0.1, port 0, stopped by the fixture and by a watchdog)
decodes each request's base64 image and checks the drawn boxes against the 0-999 boxes of the
prompt, answers from a per-test script (faults injected by attempt number) and counts requests.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from egm.curation.cache import ReplyCache
from egm.curation.client import OpenAITeacher, TeacherConfig
from egm.curation.draw import GREEN, RED, from_data_url
from egm.curation.failures import run_failure_analysis
from egm.curation.jobs import amodal_pipeline, curate, vanilla_reasoning
from egm.eval.predictions import read_predictions
from egm.data.manifest import Sample, read_manifest, write_manifest

REPO = Path(__file__).resolve().parents[2]
W, H = 80, 60


class FakeServer:
    """Minimal ``POST /v1/chat/completions``; ``script(prompt, attempt) -> (status, text|body, delay)``."""

    def __init__(self, script, watchdog_s: float = 50.0):
        self.script = script
        self.log: list[dict] = []  # one entry per request: prompt, status, question, image checks
        self.lock = threading.Lock()
        self.attempts: Counter[str] = Counter()
        self.image_errors: list[str] = []
        self.received = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.handle(self, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.watchdog = threading.Timer(watchdog_s, self.httpd.shutdown)
        self.watchdog.daemon = True
        self.watchdog.start()

    def handle(self, h, body):
        content = body["messages"][0]["content"]
        prompt = next(p["text"] for p in content if p["type"] == "text")
        urls = [p["image_url"]["url"] for p in content if p["type"] == "image_url"]
        with self.lock:
            self.attempts[prompt] += 1
            attempt = self.attempts[prompt]
        self.check_images(prompt, urls)
        status, payload, delay = self.script(prompt, attempt)
        with self.lock:
            self.log.append({"prompt": prompt, "status": status, "question": _question(prompt)})
        self.received.set()
        if delay:
            time.sleep(delay)
        try:
            if isinstance(payload, bytes):  # raw (malformed) body
                data = payload
            elif status == 200:
                data = json.dumps({
                    "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": payload}}],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
                }).encode()
            else:
                data = json.dumps({"error": {"message": f"injected {status}", "type": "x", "code": None}}).encode()
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass

    def check_images(self, prompt, urls):
        """Decode the image; boxes named in the prompt must be drawn in their colour at their edges."""
        errs = []
        if len(urls) != 1 or not urls[0].startswith("data:image/png;base64,"):
            errs.append(f"expected one PNG data URL, got {[u[:30] for u in urls]}")
        else:
            im = from_data_url(urls[0]).convert("RGB")
            for colour, box in _boxes_in_prompt(prompt):
                if not _edges_have(im, box, colour):
                    errs.append(f"no {colour} edges at {box} for {prompt[:60]!r}")
        if errs:
            with self.lock:
                self.image_errors += errs

    def count(self, question=None, status=None):
        return sum(1 for e in self.log if (question is None or e["question"] == question) and (status is None or e["status"] == status))

    def close(self):
        self.watchdog.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()


def _question(prompt: str) -> str | None:
    m = re.search(r'(?:Question|Description|Object description): "([^"]*)"', prompt) or re.search(r"location of a (.+?) in this image", prompt)
    return m.group(1) if m else None


def _boxes_in_prompt(prompt: str):
    """(colour, pixel box) pairs implied by the prompt text (0-999 boxes back to pixels)."""
    def px(s):
        v = [int(x) for x in re.findall(r"\d+", s)]
        return (v[0] / 999 * W, v[1] / 999 * H, v[2] / 999 * W, v[3] / 999 * H)

    out = []
    if m := re.search(r"Ground Truth bbox \(normalized 0-999 coordinates\): (\[[^\]]*\])", prompt):
        out.append((GREEN, px(m.group(1))))
    if m := re.search(r"Ground Truth \(0-999 coordinates\): (\[[^\]]*\])", prompt):
        out.append((GREEN, px(m.group(1))))
    if m := re.search(r"Model's prediction \(0-999 coordinates\): (\[[^\]]*\])", prompt):
        out.append((RED, px(m.group(1))))
    return out


def _edges_have(im: Image.Image, box, colour) -> bool:
    x1, y1, x2, y2 = (round(v) for v in box)
    mx, my = (x1 + x2) // 2, (y1 + y2) // 2
    probes = [(mx, y1), (mx, y2 - 1), (x1, my), (x2 - 1, my)]

    def near(x, y):
        return any(im.getpixel((min(max(x + dx, 0), W - 1), min(max(y + dy, 0), H - 1))) == colour
                   for dx in (-1, 0, 1) for dy in (-1, 0, 1))

    return all(near(x, y) for x, y in probes)


def test_server_image_check_is_meaningful():
    from egm.curation.draw import Overlay, draw_boxes

    blank = Image.new("RGB", (W, H), (90, 90, 90))
    box = (10, 8, 40, 30)
    assert not _edges_have(blank, box, GREEN)
    assert _edges_have(draw_boxes(blank, [Overlay(box, GREEN)]), box, GREEN)
    assert not _edges_have(draw_boxes(blank, [Overlay((12, 20, 60, 50), GREEN)]), box, GREEN)


@pytest.fixture
def world(tmp_path):
    """Six vanilla samples on two grey images; boxes well inside the image."""
    for name in ("a.png", "b.png"):
        Image.new("RGB", (W, H), (90, 90, 90)).save(tmp_path / name)
    samples = [
        Sample(id=f"s{i}", image=str(tmp_path / ("a.png" if i % 2 else "b.png")), width=W, height=H,
               sentence=f"object number {i}", task="vanilla", box=[5 + 3 * i, 6 + 2 * i, 40 + 4 * i, 44 + i],
               split="train", source="synthetic")
        for i in range(6)
    ]
    path = tmp_path / "train.jsonl"
    write_manifest(path, samples)
    return tmp_path, path, samples


def serve(script):
    s = FakeServer(script)
    return s


def teacher_for(server, **kw) -> OpenAITeacher:
    cfg = dict(model="fake-vlm", base_url=server.base_url, api_key="test-key", timeout=2.0, max_attempts=4,
               backoff_initial=0.01, backoff_max=0.05, price_input_per_1m=2.0, price_output_per_1m=10.0)
    cfg.update(kw)
    return OpenAITeacher(TeacherConfig(**cfg))


def ok(prompt, attempt):
    return 200, f"Reasoning for {_question(prompt)}: pick the one described.", 0


def test_vanilla_reasoning_images_usage_and_cache(world):
    tmp, path, samples = world
    server = serve(ok)
    try:
        t = teacher_for(server)
        with ReplyCache(tmp / "cache.jsonl") as cache:
            res = vanilla_reasoning(read_manifest(path), t, cache, concurrency=3, price=(2.0, 10.0))
        assert server.image_errors == []
        assert [s.id for s in res.samples] == [s.id for s in samples]
        assert res.samples[2].reasoning == "Reasoning for object number 2: pick the one described."
        assert res.samples[0].meta["curation"]["vanilla_reasoning"] == {"teacher": "fake-vlm", "prompt": "vanilla_reasoning@paper-v1"}
        st = res.stats
        assert (st["requests"], st["cache_hits"], st["input_tokens"], st["output_tokens"]) == (6, 0, 600, 60)
        assert st["cost_usd"] == pytest.approx(600 * 2e-6 + 60 * 10e-6)
        # rerun: everything from the cache, nothing sent
        with ReplyCache(tmp / "cache.jsonl") as cache:
            res2 = vanilla_reasoning(read_manifest(path), t, cache, concurrency=3, price=(2.0, 10.0))
        assert server.count() == 6
        assert res2.stats["cache_hits"] == 6 and res2.stats["requests"] == 0
        assert res2.stats["saved_cost_usd"] == pytest.approx(st["cost_usd"])
        assert [s.reasoning for s in res2.samples] == [s.reasoning for s in res.samples]
    finally:
        server.close()


def test_retries_on_429_500_timeout_not_on_400(world):
    tmp, path, _ = world
    plan = {
        "object number 0": [429, 500, "timeout"],  # then 200
        "object number 1": [503],
        "object number 2": [400],
        "object number 3": [401],
        "object number 4": [500, 500, 500, 500],  # max_attempts=4: gives up
    }

    def script(prompt, attempt):
        faults = plan.get(_question(prompt), [])
        if attempt <= len(faults):
            f = faults[attempt - 1]
            return (200, "late", 3.0) if f == "timeout" else (f, None, 0)
        return ok(prompt, attempt)

    server = serve(script)
    try:
        t = teacher_for(server, timeout=1.0)
        with ReplyCache(tmp / "cache.jsonl") as cache:
            res = vanilla_reasoning(read_manifest(path), t, cache, concurrency=2)
        q = "object number {}".format
        assert server.count(q(0)) == 4 and server.count(q(1)) == 2
        assert server.count(q(2)) == 1 and server.count(q(3)) == 1  # 400/401: no retry
        assert server.count(q(4)) == 4
        assert sorted(s.id for s in res.samples) == ["s0", "s1", "s5"]
        fails = {f["id"]: f for f in res.failures}
        assert set(fails) == {"s2", "s3", "s4"} and all(f["kind"] == "error" for f in fails.values())
        assert (fails["s2"]["status"], fails["s3"]["status"], fails["s4"]["status"]) == (400, 401, 500)
        assert res.stats["retries"] == {"429": 1, "500": 4, "APITimeoutError": 1, "503": 1}
        # failed requests were not cached: a rerun asks again for exactly those three
        with ReplyCache(tmp / "cache.jsonl") as cache:
            vanilla_reasoning(read_manifest(path), t, cache, concurrency=2)
        assert server.count(q(0)) == 4 and server.count(q(2)) == 2 and server.count(q(4)) == 5
    finally:
        server.close()


def test_malformed_replies_are_recorded(world, tmp_path):
    tmp, path, samples = world
    replies = {"object number 0": "   ", "object number 1": b"{not json", "object number 2": None}

    def script(prompt, attempt):
        q = _question(prompt)
        return (200, replies[q], 0) if replies.get(q) is not None else ok(prompt, attempt)

    server = serve(script)
    try:
        t = teacher_for(server)
        with ReplyCache(tmp / "cache.jsonl") as cache:
            res = vanilla_reasoning(read_manifest(path), t, cache, concurrency=2)
        fails = {f["id"]: f for f in res.failures}
        assert fails["s0"]["kind"] == "malformed"           # empty text: paid for, cached, unusable
        assert fails["s1"]["kind"] == "error"               # body is not JSON: no reply at all
        assert "s0" not in {s.id for s in res.samples} and len(res.samples) == 4
        assert server.count("object number 1") == 1         # a broken body is not retried
        with ReplyCache(tmp / "cache.jsonl") as cache:
            res2 = vanilla_reasoning(read_manifest(path), t, cache, concurrency=2)
        assert server.count("object number 0") == 1         # the malformed reply is not bought twice
        assert {f["id"]: f["kind"] for f in res2.failures} == {"s0": "malformed", "s1": "error"}
    finally:
        server.close()


def test_failure_analysis_through_server(world):
    tmp, path, samples = world
    by_id = {s.id: s for s in read_manifest(path)}
    preds = tmp / "preds.jsonl"
    lines = [
        {"id": "s0", "iou": 0.9, "success": True, "pred_box": samples[0].box, "gt_box": samples[0].box, "sentence": samples[0].sentence},
        {"id": "s1", "iou": 0.1, "success": False, "pred_box": [50, 30, 75, 55], "gt_box": samples[1].box, "sentence": samples[1].sentence},
        {"id": "s2", "iou": 0.0, "success": False, "pred_box": None, "gt_box": samples[2].box, "sentence": samples[2].sentence},
        {"id": "s3", "iou": 0.5, "success": False, "pred_box": [60, 2, 78, 20], "sentence": samples[3].sentence},
    ]
    preds.write_text("".join(json.dumps(x) + "\n" for x in lines))
    answers = {
        "object number 1": "<category> [COMPLEX_PROMPT] </category>\n<reasoning> [Ordinal.] </reasoning>\n<confidence> [high] </confidence>",
        "object number 2": "<category>Small object</category><reasoning>tiny</reasoning>",
        "object number 3": "I think it is hard.",
    }
    server = serve(lambda p, a: (200, answers[_question(p)], 0))
    try:
        t = teacher_for(server)
        with ReplyCache(tmp / "cache.jsonl") as cache:
            fa = run_failure_analysis(read_predictions(preds), by_id, t, cache, tag="m8b", concurrency=2)
        assert server.image_errors == [] and server.count() == 3  # s0 succeeded: not analysed
        assert {k: v.category for k, v in fa.verdicts.items()} == {"s1": "COMPLEX_PROMPT", "s2": "SMALL_OBJECT"}
        assert fa.verdicts["s1"].confidence == "high" and fa.verdicts["s2"].confidence is None
        assert [(f["id"], f["kind"]) for f in fa.failures] == [("s3", "malformed")]
        assert "none (no box" in next(e["prompt"] for e in server.log if e["question"] == "object number 2")
        assert fa.samples[0].meta["failure"]["category"] == "COMPLEX_PROMPT"
    finally:
        server.close()


AMODAL_ANSWERS = {"cat": '"The sleeping cat behind the sofa."', "dog": "the brown dog near the door"}


def test_amodal_pipeline_through_server(tmp_path):
    Image.new("RGB", (W, H), (90, 90, 90)).save(tmp_path / "a.png")
    def mk(i, cat, vis):
        return Sample(id=f"a{i}", image=str(tmp_path / "a.png"), width=W, height=H, sentence=cat, task="amodal",
                      box=[10, 10, 50, 50], visible_box=vis, category=cat, split="train", source="cocoa")

    samples = [mk(0, "cat", [10, 10, 50, 35]), mk(1, "dog", [20, 10, 50, 50]), mk(2, "cat", None)]
    seen = []

    def script(prompt, attempt):
        seen.append(prompt)
        if prompt.startswith("You are helping"):
            return 200, AMODAL_ANSWERS[re.search(r"location of a (\w+)", prompt).group(1)], 0
        if prompt.startswith("Look at this image"):
            return 200, "YES." if '"the sleeping cat' in prompt else "No", 0
        return 200, "The cat is behind the sofa. Extend considerably downward.", 0

    server = serve(script)
    try:
        t = teacher_for(server)
        with ReplyCache(tmp_path / "cache.jsonl") as cache:
            res = amodal_pipeline(samples, t, cache, concurrency=2)
        assert [s.id for s in res.samples] == ["a0"]
        s = res.samples[0]
        assert s.sentence == "the sleeping cat behind the sofa" and s.meta["orig_sentence"] == "cat"
        assert s.reasoning.startswith("The cat is behind")
        reason_prompt = [p for p in seen if p.startswith("You are analyzing")]
        assert len(reason_prompt) == 1
        assert "direction(s): down (considerably, by about 60% of the visible height)" in reason_prompt[0]
        assert "in which direction(s) (down)" in reason_prompt[0]
        kinds = {(f["id"], f["job"]): f["kind"] for f in res.failures}
        assert kinds == {("a1", "amodal_verification"): "rejected", ("a2", "amodal_reasoning"): "skipped"}
    finally:
        server.close()


def test_kill_and_rerun_never_pays_twice(world):
    """A curate process is SIGKILLed after 3 finished requests; the rerun asks only for the rest."""
    tmp, path, samples = world
    release = threading.Event()

    def script(prompt, attempt):
        with server.lock:
            served = sum(1 for e in server.log if e["status"] == 200)
        if served >= 3 and not release.is_set():
            return 200, "never delivered", 30.0  # hang: the process is killed meanwhile
        return ok(prompt, attempt)

    server = serve(script)
    out, cache = tmp / "out.jsonl", tmp / "cache.jsonl"
    args = [sys.executable, str(REPO / "tools" / "curate.py"), "--manifest", str(path), "--output", str(out),
            "--cache", str(cache), "--teacher.model", "fake-vlm", "--teacher.base_url", server.base_url,
            "--teacher.timeout", "40", "--concurrency", "1", "--progress", "false"]
    env = {**os.environ, "EGM_TEACHER_API_KEY": "test-key"}
    try:
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 30
        while server.count() < 4 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert server.count() == 4, proc.stderr.read().decode() if proc.poll() is not None else "timeout"
        while time.time() < deadline and len(cache.read_text().splitlines()) < 3:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert not out.exists()
        done_before = [json.loads(x)["id"] for x in cache.read_text().splitlines()]
        assert len(done_before) == 3
        n_before = server.count()
        release.set()
        rerun = subprocess.run(args, env=env, capture_output=True, timeout=60)
        assert rerun.returncode == 0, rerun.stderr.decode()
        rerun_questions = [e["question"] for e in server.log[n_before:]]
        finished = {f"object number {i[1:]}" for i in done_before}
        assert not finished & set(rerun_questions)
        assert len(rerun_questions) == 3
        assert [s.id for s in read_manifest(out)] == [s.id for s in samples]
        stats = json.loads((tmp / "out.jsonl.stats.json").read_text())
        assert (stats["cache_hits"], stats["requests"]) == (3, 3)
    finally:
        release.set()
        server.close()


def test_exception_midway_then_rerun(world):
    """An exception escaping the teacher (a crash) aborts the job; finished replies stay cached."""
    tmp, path, samples = world
    server = serve(ok)

    class Crashing(OpenAITeacher):
        calls = 0

        def complete(self, request):
            type(self).calls += 1
            if type(self).calls > 2:
                raise KeyboardInterrupt
            return super().complete(request)

    try:
        cfg = teacher_for(server).config
        with ReplyCache(tmp / "cache.jsonl") as cache, pytest.raises(KeyboardInterrupt):
            vanilla_reasoning(read_manifest(path), Crashing(cfg), cache, concurrency=1)
        assert server.count() == 2
        res = curate(str(path), str(tmp / "out.jsonl"), teacher=cfg, cache=str(tmp / "cache.jsonl"), concurrency=2, progress=False)
        assert server.count() == 6 and len({e["question"] for e in server.log}) == 6
        assert (res["cache_hits"], res["requests"], res["kept"]) == (2, 4, 6)
    finally:
        server.close()


PLANTED = "sk-planted-3f9c2a7e41d05b68"


def test_planted_api_key_never_appears_in_any_output(world):
    """A key given on the command line and in the environment, against a server that echoes it
    in its 401 and 500 bodies: no byte of stdout, stderr or any file written shows it, on the
    success path, the retry/failure path, a bad setting (``--teacher.max_attempts 0``, which used
    to print the whole config) and ``--print_config``."""
    from egm.curation.client import Secret, TeacherError, redact

    tmp, path, _ = world
    echo = json.dumps({"error": {"message": f"Incorrect API key provided: {PLANTED}", "type": "auth"}}).encode()

    def script(prompt, attempt):
        q = _question(prompt)
        if q == "object number 1":
            return 401, echo, 0  # not retried: a failure record
        if q == "object number 2" and attempt == 1:
            return 500, echo, 0  # retried (logged), then fine
        return ok(prompt, attempt)

    server = serve(script)
    out = tmp / "out"
    base = [sys.executable, str(REPO / "tools" / "curate.py"), "--manifest", str(path),
            "--output", str(out / "curated.jsonl"), "--teacher.model", "fake-vlm",
            "--teacher.base_url", server.base_url, "--teacher.backoff_initial", "0.01", "--progress", "false"]
    env = {**os.environ, "EGM_TEACHER_API_KEY": PLANTED, "OPENAI_API_KEY": PLANTED}
    runs = {
        "run": base + ["--teacher.api_key", PLANTED],
        "run_env_key": base + ["--output", str(out / "curated_env.jsonl"), "--cache", str(out / "cache_env.jsonl")],
        "bad_setting": base + ["--teacher.api_key", PLANTED, "--teacher.max_attempts", "0"],
        "print_config": base + ["--teacher.api_key", PLANTED, "--print_config"],
    }
    try:
        results = {k: subprocess.run(a, env=env, capture_output=True, timeout=60) for k, a in runs.items()}
    finally:
        server.close()
    assert results["run"].returncode == 0, results["run"].stderr.decode()[-2000:]
    assert results["run_env_key"].returncode == 0
    assert results["bad_setting"].returncode != 0
    assert b"teacher.max_attempts >= 1 (got 0)" in results["bad_setting"].stderr
    assert Secret.MASK.encode() in results["print_config"].stdout
    assert b"retrying" in results["run"].stderr  # the 500 was logged ...
    assert b"Incorrect API key provided: " + Secret.MASK.encode() in results["run"].stderr  # ... redacted
    fails = [json.loads(x) for x in (out / "curated.jsonl.failures.jsonl").read_text().splitlines()]
    assert [(f["id"], f["status"]) for f in fails] == [("s1", 401)] and Secret.MASK in fails[0]["reason"]
    for name, r in results.items():
        assert PLANTED.encode() not in r.stdout + r.stderr, name
    written = [p for p in tmp.rglob("*") if p.is_file()]
    assert len(written) >= 8  # manifests, failures, stats, caches of both runs, images
    for p in written:
        assert PLANTED.encode() not in p.read_bytes(), p
    # in-process: the config's repr, a derived error, the redaction helper
    cfg = TeacherConfig(model="m", api_key=PLANTED)
    assert PLANTED not in repr(cfg) and PLANTED not in repr(cfg.resolved()) and cfg.api_key == PLANTED
    assert PLANTED not in str(TeacherError(redact(f"echo {PLANTED}", cfg.api_key)))
    with pytest.raises(ValueError) as e:
        TeacherConfig(model="m", api_key=PLANTED, timeout=0).resolved()
    assert PLANTED not in str(e.value) and "teacher.timeout > 0" in str(e.value)


def test_a_kill_pays_again_for_at_most_the_requests_in_flight(world):
    """With ``concurrency=3``, SIGKILL while three requests sit answered-but-undelivered at the
    server (billed there, never cached): the rerun asks exactly those again -- the bound the
    docs state (at most ``concurrency`` per kill), where "never pays twice" was claimed before."""
    tmp, path, samples = world
    concurrency = 3
    release = threading.Event()

    def script(prompt, attempt):
        with server.lock:
            served = sum(1 for e in server.log if e["status"] == 200)
        if served >= 3 and not release.is_set():
            return 200, "answered, billed, never delivered", 30.0
        return ok(prompt, attempt)

    server = serve(script)
    out, cache = tmp / "out.jsonl", tmp / "cache.jsonl"
    args = [sys.executable, str(REPO / "tools" / "curate.py"), "--manifest", str(path), "--output", str(out),
            "--cache", str(cache), "--teacher.model", "fake-vlm", "--teacher.base_url", server.base_url,
            "--teacher.timeout", "40", "--concurrency", str(concurrency), "--progress", "false"]
    env = {**os.environ, "EGM_TEACHER_API_KEY": "test-key"}
    try:
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 30
        while time.time() < deadline and proc.poll() is None and not (
                server.count() == 6 and cache.exists() and len(cache.read_text().splitlines()) == 3):
            time.sleep(0.05)
        assert server.count() == 6, proc.stderr.read().decode() if proc.poll() is not None else "timeout"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        cached = {json.loads(x)["id"] for x in cache.read_text().splitlines()}
        in_flight = {e["question"] for e in server.log} - {f"object number {i[1:]}" for i in cached}
        assert len(cached) == 3 and len(in_flight) == concurrency
        n_before = server.count()
        release.set()
        rerun = subprocess.run(args, env=env, capture_output=True, timeout=60)
        assert rerun.returncode == 0, rerun.stderr.decode()
        asked_again = [e["question"] for e in server.log[n_before:]]
        assert sorted(asked_again) == sorted(in_flight)  # paid twice: exactly the in-flight ones
        assert len(asked_again) <= concurrency
        assert [s.id for s in read_manifest(out)] == [s.id for s in samples]
    finally:
        release.set()
        server.close()
