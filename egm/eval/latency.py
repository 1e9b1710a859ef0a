"""Latency as paper Sec. 5.2 defines it.

"The average latency per sample on a random 10% subset of the standard RefCOCO benchmarks ...
measured as the time (in milliseconds) from sending the text prompt to receiving the entire
answer from the model", one sample at a time (batch size 1). Models spread over several GPUs are
compared by *GPU latency* = latency x number of GPUs (Figure 4's x axis). A run on a CPU has no
GPU latency: its reports give the plain latency and say which CPU and how many threads
(``results.json`` ``device``, see :func:`device_label`).

The clock is injected (seconds, monotonic) so tests can drive it; production uses
:func:`time.perf_counter`. A generator that returns decoded text has necessarily synchronised the
device, so no explicit CUDA synchronisation is needed around the call.
"""

from __future__ import annotations

import math
import platform
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np

from egm.errors import InputError

T = TypeVar("T")
Clock = Callable[[], float]


def latency_subset(ids: Sequence[str], fraction: float = 0.1, seed: int = 0, key: str = "") -> list[str]:
    """A seeded random ``fraction`` of ``ids`` (at least one when ``ids`` is non-empty).

    The draw depends only on the *set* of ids, ``seed`` and ``key`` (the split name, so splits
    get independent draws): ids are sorted first, so manifest order does not change the subset.
    The result keeps that sorted order. ``round(fraction * n)`` ids are drawn.
    """
    if not 0.0 < fraction <= 1.0:
        raise InputError(f"latency fraction must be in (0, 1], got {fraction}")
    ordered = sorted(set(ids))
    if not ordered:
        return []
    k = min(len(ordered), max(1, int(math.floor(fraction * len(ordered) + 0.5))))
    rng = np.random.default_rng([int(seed), zlib.crc32(key.encode("utf-8"))])
    picked = np.sort(rng.choice(len(ordered), size=k, replace=False))
    return [ordered[i] for i in picked]


def timed_call(fn: Callable[[], T], clock: Clock = time.perf_counter) -> tuple[T, float]:
    """Run ``fn()`` and return its result with the elapsed time in milliseconds."""
    t0 = clock()
    out = fn()
    return out, (clock() - t0) * 1000.0


@dataclass
class LatencyStats:
    """Per-sample latency summary (ms) and generated tokens; ``gpu_*`` = value x ``num_gpus``."""

    n: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    mean_tokens: float | None
    num_gpus: int
    gpu_mean_ms: float
    gpu_p50_ms: float
    gpu_p90_ms: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def latency_stats(latencies_ms: Sequence[float], tokens: Sequence[int | None] | None = None, num_gpus: int = 1) -> LatencyStats | None:
    """Mean / p50 / p90 (numpy linear-interpolation percentiles) of per-sample latencies.

    Returns None for an empty input.
    """
    if num_gpus < 1:
        raise InputError(f"num_gpus must be >= 1, got {num_gpus}")
    lat = np.asarray(latencies_ms, dtype=np.float64)
    if lat.size == 0:
        return None
    toks = [t for t in (tokens or []) if t is not None]
    mean, p50, p90 = float(lat.mean()), float(np.percentile(lat, 50)), float(np.percentile(lat, 90))
    return LatencyStats(
        n=int(lat.size),
        mean_ms=mean,
        p50_ms=p50,
        p90_ms=p90,
        mean_tokens=float(np.mean(toks)) if toks else None,
        num_gpus=num_gpus,
        gpu_mean_ms=mean * num_gpus,
        gpu_p50_ms=p50 * num_gpus,
        gpu_p90_ms=p90 * num_gpus,
    )


def cpu_name() -> str:
    """The CPU model ("AMD EPYC 7B13 64-Core Processor") from /proc/cpuinfo, else ``platform``'s guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def on_cpu(result: Mapping[str, Any]) -> bool:
    """Whether a results.json was measured on a CPU (files without ``device`` are GPU runs, as before)."""
    return (result.get("device") or {}).get("type") == "cpu"


def device_label(device: Mapping[str, Any] | None) -> str:
    """What latency was measured on: ``CPU (AMD EPYC 7B13, 1 thread)``, ``8x GPU (NVIDIA H200)``; ``-`` if unknown."""
    if not device:
        return "-"
    name = device.get("name") or "unknown"
    if device.get("type") == "cpu":
        threads = device.get("threads")
        return f"CPU ({name}" + ("" if threads is None else f", {threads} thread{'' if threads == 1 else 's'}") + ")"
    n = device.get("num_gpus") or 1
    return f"{'' if n == 1 else f'{n}x '}GPU ({name})"


def reported_latency(result: Mapping[str, Any]) -> float | None:
    """Figure 4's x value of one results.json: GPU latency (latency x #GPUs) of a GPU run, the
    plain mean latency of a CPU run (there latency x #GPUs would be meaningless)."""
    lat = result.get("latency") or {}
    return lat.get("mean_ms") if on_cpu(result) else lat.get("gpu_mean_ms")
