"""A worker's life: stop on SIGTERM, at a runtime limit or when idle, keeping the chunk in flight.

Celery's warm shutdown (SIGTERM to the worker's main process: `docker stop`, a spot notice, the
`--max-runtime` timer) stops taking messages and waits for the running task. The task runs in a
pool child, and its training in the trainer process below it, neither of which sees the signal, so
the main process leaves a stop note in the worker's cache folder; the task's watch finds it within
a tick and asks the trainer to end the chunk at its next step and commit there. A second SIGTERM
is a cold shutdown in Celery's own terms: the chunk is lost back to its last commit.
"""
from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

from celery.signals import worker_shutting_down

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(text: str) -> float:
    """Seconds in "11h30m", "90m", "45s", "1h" or a plain number of seconds."""
    t = text.strip().lower()
    try:
        seconds = float(t)
    except ValueError:
        m = _DURATION.match(t)
        if not t or m is None or not any(m.groups()):
            raise ValueError(f"{text!r} is not a duration (examples: 11h30m, 90m, 45s)") from None
        h, mins, s = (float(g) if g else 0.0 for g in m.groups())
        seconds = h * 3600 + mins * 60 + s
    if seconds <= 0:
        raise ValueError(f"{text!r}: a duration must be positive")
    return seconds


def stop_note(caches: Path, node: str) -> Path:
    return caches / "stop" / node


def stop_requested(caches: Path, node: str) -> str | None:
    """Why this worker was told to stop ("signal", "runtime limit", "idle"), or None."""
    try:
        return stop_note(caches, node).read_text().strip() or "signal"
    except FileNotFoundError:
        return None


class Lifetime:
    """Runs in the worker's main process: the stop note, the runtime limit and the idle timer."""

    def __init__(self, caches: Path, node: str, max_runtime_s: float | None = None, idle_s: float | None = None) -> None:
        self.note = stop_note(caches, node)
        self.max_runtime_s, self.idle_s = max_runtime_s, idle_s
        self.started = time.monotonic()

    def install(self) -> None:
        self.note.parent.mkdir(parents=True, exist_ok=True)
        self.note.unlink(missing_ok=True)  # a note from an earlier life of this node
        worker_shutting_down.connect(self._on_shutdown, weak=False)
        if self.max_runtime_s or self.idle_s:
            threading.Thread(target=self._watch, name="relay-lifetime", daemon=True).start()

    def _on_shutdown(self, sig: str | None = None, how: str | None = None, **_: Any) -> None:
        if how == "Warm":
            self._leave("signal")

    def _leave(self, why: str) -> None:
        """Write the note (the first reason wins) and start Celery's warm shutdown."""
        try:
            with open(self.note, "x") as f:
                f.write(why)
        except FileExistsError:
            return
        if why != "signal":
            os.kill(os.getpid(), signal.SIGTERM)

    def _deadline(self) -> float | None:
        """When to stop: the runtime limit less a margin for the chunk in flight to reach its next
        step and commit (a tenth of the limit, at most two minutes)."""
        if not self.max_runtime_s:
            return None
        return self.started + self.max_runtime_s - min(120.0, self.max_runtime_s / 10)

    def _watch(self) -> None:
        from celery.worker import state  # the main process's own record of the messages it holds

        idle_since = time.monotonic()
        deadline = self._deadline()
        while True:
            time.sleep(0.5)
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                self._leave("runtime limit")
                return
            if state.active_requests or state.reserved_requests:
                idle_since = now
            elif self.idle_s and now - idle_since >= self.idle_s:
                self._leave("idle")
                return
