"""Per-job leases: who may train a job now. Renewed by a heartbeat; a dead worker's lease expires.

Redis (`SET NX PX` with a token; renew and release only with the same token) where a broker runs,
a lock-guarded file on shared storage in the embedded mode. Leases keep two workers off the same
job; commits are still fenced by the job record's compare-and-set, so a lease lost to a paused
process can waste work but never corrupt it.
"""
from __future__ import annotations

import fcntl
import json
import secrets
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from segmodel.checkpoint import atomic_write_bytes
from worker import redis_url

T = TypeVar("T")
Record = dict[str, Any] | None


class Leases(Protocol):
    def acquire(self, job_id: str, holder: str, token: str | None = None) -> str | None:
        """Take the lease (or retake it with our own token); None if someone else holds it."""

    def renew(self, job_id: str, token: str) -> bool: ...

    def release(self, job_id: str, token: str) -> None: ...

    def holder(self, job_id: str) -> str | None:
        """Who holds a live lease on the job, if anyone."""


_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


class RedisLeases:
    def __init__(self, url: str, ttl_s: float) -> None:
        self.client = redis_url.client(url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=10)
        self.ttl_ms = int(ttl_s * 1000)

    @staticmethod
    def _key(job_id: str) -> str:
        return f"relay:lease:{job_id}"

    def acquire(self, job_id: str, holder: str, token: str | None = None) -> str | None:
        token = token or secrets.token_hex(8)
        value = f"{token}:{holder}"
        if self.client.set(self._key(job_id), value, nx=True, px=self.ttl_ms):
            return token
        current = self.client.get(self._key(job_id))
        return token if current is not None and current.decode() == value else None

    def _value(self, job_id: str, token: str) -> str | None:
        current = self.client.get(self._key(job_id))
        return current.decode() if current is not None and current.decode().startswith(token + ":") else None

    def renew(self, job_id: str, token: str) -> bool:
        value = self._value(job_id, token)
        return bool(value and self.client.eval(_RENEW, 1, self._key(job_id), value, self.ttl_ms))

    def release(self, job_id: str, token: str) -> None:
        value = self._value(job_id, token)
        if value:
            self.client.eval(_RELEASE, 1, self._key(job_id), value)

    def holder(self, job_id: str) -> str | None:
        current = self.client.get(self._key(job_id))
        return current.decode().split(":", 1)[1] if current is not None else None


class FileLeases:
    """Leases as files under <storage>/leases, changed only under an exclusive flock."""

    def __init__(self, storage: Path, ttl_s: float) -> None:
        self.dir = Path(storage) / "leases"
        self.ttl_s = ttl_s

    def _change(self, job_id: str, fn: Callable[[Record], tuple[Record, T]]) -> T:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{job_id}.json"
        with open(self.dir / f"{job_id}.lock", "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                current = json.loads(path.read_text()) if path.is_file() else None
                if current is not None and current["expires"] < time.time():
                    current = None
                new, result = fn(current)
                if new is not current:
                    if new is None:
                        path.unlink(missing_ok=True)
                    else:
                        atomic_write_bytes(path, json.dumps(new).encode())
                return result
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def acquire(self, job_id: str, holder: str, token: str | None = None) -> str | None:
        token = token or secrets.token_hex(8)

        def take(current: Record) -> tuple[Record, str | None]:
            if current is None or current["token"] == token:
                return {"token": token, "holder": holder, "expires": time.time() + self.ttl_s}, token
            return current, None

        return self._change(job_id, take)

    def renew(self, job_id: str, token: str) -> bool:
        def extend(current: Record) -> tuple[Record, bool]:
            if current is not None and current["token"] == token:
                return {**current, "expires": time.time() + self.ttl_s}, True
            return current, False

        return self._change(job_id, extend)

    def release(self, job_id: str, token: str) -> None:
        self._change(job_id, lambda c: (None, None) if c is not None and c["token"] == token else (c, None))

    def holder(self, job_id: str) -> str | None:
        return self._change(job_id, lambda c: (c, c["holder"] if c else None))


def make_leases(broker_url: str | None, storage: Path, ttl_s: float) -> Leases:
    if broker_url and broker_url.startswith(("redis://", "rediss://")):
        return RedisLeases(broker_url, ttl_s)
    return FileLeases(storage, ttl_s)
