"""The reconciler: brings back jobs whose next task was lost.

A running job with no live lease, no waiting message and no live worker saying it trains it (the
registry on storage, which outlives a flushed broker and its leases), quiet for longer than the
grace period, lost its message (a flushed or restarted broker, a worker killed after its last commit, a message
the embedded transport dropped with a killed worker). Its next task is sent again from what
storage says. A duplicate this creates is harmless: workers drop stale or leased messages.
"""
from __future__ import annotations

import logging
import threading
import time

from worker.broker import Broker
from segmodel.jobs import JobNotFound, JobStore
from worker.lease import Leases
from worker.registry import online

log = logging.getLogger("relay.reconciler")


def reconcile_once(store: JobStore, broker: Broker, leases: Leases, grace_s: float) -> list[str]:
    """One pass; returns the ids of the jobs it re-enqueued."""
    now = time.time()
    waiting = broker.waiting_jobs()
    busy = {w["job"] for w in online(store.backend) if w.get("job")}
    revived = []
    for job_id in store.ids():
        try:
            state = store.state(job_id)
        except (JobNotFound, ValueError):
            continue
        if not state.status.active or job_id in waiting or job_id in busy:
            continue
        if now - max(state.updated_at, state.enqueued_at or 0.0) < grace_s:
            continue
        if leases.holder(job_id) is not None:
            continue
        broker.dispatch(store, job_id, "reconciler: no lease and no message in the queue")
        revived.append(job_id)
        log.warning("re-enqueued %s (chunk %s)", job_id, state.chunk)
    return revived


class Reconciler:
    """Runs reconcile_once every interval in a background thread until stopped."""

    def __init__(self, store: JobStore, broker: Broker, leases: Leases, interval_s: float, grace_s: float) -> None:
        self.args = (store, broker, leases, grace_s)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="relay-reconciler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                reconcile_once(*self.args)
            except Exception:  # a broker or storage outage: log it and try again next round
                log.exception("reconcile pass failed")
