"""The embedded broker's transport: kombu's filesystem transport, drained in short slices.

Celery runs a transport without asynchronous I/O, like this one, in its blocking loop, which
drains with a 2 s timeout and looks for a requested shutdown only between drains: every stop of
an embedded worker (`relay run` ending, Ctrl-C, `docker stop` in a test) waited up to 2 s doing
nothing. Draining in slices lets the loop look again within a slice; a message is still taken at
the first poll that finds it (every `polling_interval`).
"""
from __future__ import annotations

from typing import Any

from kombu.transport import filesystem

SLICE_S = 0.25


class Transport(filesystem.Transport):
    def drain_events(self, connection: Any, timeout: float | None = None) -> Any:
        return super().drain_events(connection, timeout=None if timeout is None else min(timeout, SLICE_S))
