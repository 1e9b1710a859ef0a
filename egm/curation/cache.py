"""Resumable cache of teacher replies: a rerun never asks again for a reply that was cached.

What a kill costs, exactly: every reply is cached the moment it arrives, so a rerun re-asks
only the requests that were *in flight* when the process died, at most ``concurrency`` of them
(:func:`egm.curation.jobs.run_requests`). The provider may already have answered, and billed,
those; their replies never reached this cache, and OpenAI-compatible chat completions offer no
idempotency key to fetch them back, so they are paid twice. (Independently of kills, a retry
after a client-side timeout may be billed twice by the provider too.)

Storage: one append-only JSONL file. Each finished request is one line, written with a single
``os.write`` on an ``O_APPEND`` descriptor followed by ``fsync``, under a lock shared by the
job's threads. A kill can therefore leave at most one torn line, the last one: on open, a file
that does not end with a newline is truncated back to its last complete line (and any other
undecodable line is skipped and counted), so the next append starts on a fresh line.

Key: ``(item id, prompt key "name@version", teacher model)``. Each record also keeps the
SHA-256 of the rendered prompt: a record whose prompt hash differs from the request's (the
description under verification changed, a prediction file was regenerated under the same tag)
is stale and is asked again; the newest record of a key wins. One process should write a given
cache file at a time (threads of that process may share it).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from egm.curation.client import Reply

log = logging.getLogger(__name__)

Key = tuple[str, str, str]


@dataclass(frozen=True)
class CachedReply:
    reply: Reply
    prompt_sha: str


class ReplyCache:
    """Teacher replies keyed by ``(item_id, prompt_key, model)``; see the module docstring."""

    def __init__(self, path: str | os.PathLike, *, fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync
        self.skipped_lines = 0
        self.truncated_bytes = 0
        self._lock = threading.Lock()
        self._records: dict[Key, CachedReply] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_and_load()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _repair_and_load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a torn last line from a killed writer
            self.truncated_bytes = len(data) - end
            log.warning("%s: dropping a torn last line (%d bytes)", self.path, self.truncated_bytes)
            with open(self.path, "r+b") as fh:
                fh.truncate(end)
            data = data[:end]
        for n, raw in enumerate(data.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                key = (rec["id"], rec["prompt"], rec["model"])
                reply = Reply(rec["text"], int(rec.get("input_tokens", 0)), int(rec.get("output_tokens", 0)), rec.get("finish_reason"))
                self._records[key] = CachedReply(reply, rec["prompt_sha"])
            except (ValueError, KeyError, TypeError) as e:
                self.skipped_lines += 1
                log.warning("%s:%d: skipping an unreadable cache line (%s)", self.path, n, e)

    def __len__(self) -> int:
        return len(self._records)

    def get(self, item_id: str, prompt_key: str, model: str, prompt_sha: str | None = None) -> Reply | None:
        """The cached reply, or None when absent or recorded for a different prompt text."""
        with self._lock:
            rec = self._records.get((item_id, prompt_key, model))
        if rec is None or (prompt_sha is not None and rec.prompt_sha != prompt_sha):
            return None
        return rec.reply

    def put(self, item_id: str, prompt_key: str, model: str, prompt_sha: str, reply: Reply) -> None:
        """Append one record durably (single write + fsync) and index it."""
        rec = {
            "id": item_id, "prompt": prompt_key, "model": model, "prompt_sha": prompt_sha,
            "text": reply.text, "input_tokens": reply.input_tokens, "output_tokens": reply.output_tokens,
            "finish_reason": reply.finish_reason, "time": round(time.time(), 3),
        }
        line = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            view = memoryview(line)
            while view:  # one write in practice; a regular file only writes short on ENOSPC/signals
                view = view[os.write(self._fd, view):]
            if self.fsync:
                os.fsync(self._fd)
            self._records[(item_id, prompt_key, model)] = CachedReply(reply, prompt_sha)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> ReplyCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
