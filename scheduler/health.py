"""What the scheduler knows about the services it depends on: the broker and storage.

State lives on storage, so reads answer with the broker down; what only the broker knows (queue
depths, lease holders) is then reported as unknown with the reason. After a broker call fails,
broker-backed reads answer "unknown" at once for a few seconds rather than each waiting out a
timeout against a hung broker.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from kombu.exceptions import OperationalError

from segmodel.storage import StorageError, open_storage
from worker.settings import Settings

T = TypeVar("T")
# What a broker call raises when Redis is down, hung or refusing: redis-py's errors, kombu's
# (Celery's publish), and the socket errors either lets through.
BROKER_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OperationalError, OSError)
CHECK_TIMEOUT_S = 10.0


def redact(url: str) -> str:
    """A broker URL fit for messages: the password replaced."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class BrokerDown(RuntimeError):
    """The broker did not answer; the message names it and the error."""


class BrokerGuard:
    def __init__(self, settings: Settings, quiet_s: float = 5.0) -> None:
        self.where = "embedded broker" if settings.embedded else f"broker {redact(settings.broker_url or '')}"
        self.quiet_s = quiet_s
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._reason: str | None = None

    def call(self, fn: Callable[[], T]) -> T:
        """fn(), or BrokerDown at once while a recent failure is fresh."""
        with self._lock:
            if time.monotonic() < self._down_until:
                raise BrokerDown(self._reason or f"{self.where} unreachable")
        try:
            result = fn()
        except BROKER_ERRORS as exc:
            reason = f"{self.where} unreachable ({exc.__class__.__name__}: {exc})"
            with self._lock:
                self._down_until, self._reason = time.monotonic() + self.quiet_s, reason
            raise BrokerDown(reason) from exc
        with self._lock:
            self._down_until, self._reason = 0.0, None
        return result

    def ask(self, fn: Callable[[], T]) -> tuple[T | None, str | None]:
        """(fn(), None), or (None, why) when the broker cannot answer."""
        try:
            return self.call(fn), None
        except BrokerDown as exc:
            return None, str(exc)


_checks = ThreadPoolExecutor(max_workers=4, thread_name_prefix="relay-health")


def _bounded(check: Callable[[], Any], what: str) -> str | None:
    """None if the check passes within the time limit, else why not."""
    future = _checks.submit(check)
    try:
        future.result(timeout=CHECK_TIMEOUT_S)
    except FutureTimeout:
        return f"{what}: no answer within {CHECK_TIMEOUT_S:.0f} s"
    except (StorageError, *BROKER_ERRORS) as exc:
        return f"{what}: {exc.__class__.__name__}: {exc}"
    return None


def health(settings: Settings, ping_broker: Callable[[], Any]) -> dict[str, Any]:
    """Each dependency checked for real (a broker ping; a storage write, read and delete)."""
    if settings.embedded:
        broker: dict[str, Any] = {"kind": "embedded", "url": None}
    else:
        broker = {"kind": "redis", "url": redact(settings.broker_url or "")}
    broker_error = _bounded(ping_broker, f"broker {broker['url'] or 'embedded'} unreachable")
    storage_error = _bounded(lambda: open_storage(settings.storage).check(), f"storage {settings.storage} unusable")
    broker.update(ok=broker_error is None, error=broker_error)
    storage = {"path": str(settings.storage), "ok": storage_error is None, "error": storage_error}
    ok = broker["ok"] and storage["ok"]
    return {"status": "ok" if ok else "degraded", "ok": ok, "broker": broker, "storage": storage}
