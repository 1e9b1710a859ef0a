"""Wall-clock laps of a training step's phases (GRPO: rollout / reward / old_logp / ref / update)."""

from __future__ import annotations

import time


class PhaseClock:
    """``lap(name)`` adds the time since the previous lap (or since construction) to ``t[name]``."""

    def __init__(self):
        self.t: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.t[name] = self.t.get(name, 0.0) + now - self._last
        self._last = now

    @property
    def total(self) -> float:
        return sum(self.t.values())
