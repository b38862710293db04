"""What workers and the scheduler ask of the broker: send a job's next task, and see what is waiting.

Queue depths are read from the broker itself (Redis LLEN, or the embedded transport's files):
Flower only reports queues some live worker consumes.
"""
from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

from celery import Celery

from segmodel.jobs import JobState, JobStore
from worker import redis_url
from worker.app import EVAL_TASK, TRAIN_TASK, broker_folders
from worker.settings import Settings

QUEUES = ("cpu", "gpu")
# kombu's Redis transport keeps priorities in sibling lists: "<queue>\x06\x16<priority>".
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


def task_id(job_id: str, what: str) -> str:
    """Task ids carry the job id so waiting messages can be traced to their job."""
    return f"{job_id}.{what}.{secrets.token_hex(4)}"


def job_of(task: str) -> str:
    return task.split(".", 1)[0]


class Broker:
    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._redis = (redis_url.client(settings.broker_url, socket_timeout=5, socket_connect_timeout=5)
                       if settings.broker_url else None)

    def send(self, job_id: str, state: JobState, queue: str) -> str:
        """Send the task that moves the job on from where storage says it stands."""
        if state.training_done:
            tid = task_id(job_id, "eval")
            self.app.send_task(EVAL_TASK, args=[job_id], queue=queue, task_id=tid)
        else:
            tid = task_id(job_id, f"c{state.chunk}")
            self.app.send_task(TRAIN_TASK, args=[job_id, state.chunk], queue=queue, task_id=tid)
        return tid

    def dispatch(self, store: JobStore, job_id: str, why: str) -> JobState:
        """Send the next task of an active job and note it; storage decides which task that is."""
        spec = store.spec(job_id)

        def mark(state: JobState) -> bool:
            if not state.status.active:
                return False
            state.enqueued_at = time.time()
            state.note(f"enqueued {'evaluation' if state.training_done else f'chunk {state.chunk}'}: {why}")
            return True

        state, go = store.update(job_id, mark)
        if go:
            self.send(job_id, state, spec.queue)
        return state

    def ping(self) -> None:
        """Raise if the broker cannot be used now."""
        if self._redis is not None:
            self._redis.ping()
        else:
            broker_folders(self.settings)

    def _messages(self) -> list[tuple[str, dict]]:
        """(queue, message) for every message waiting (not yet delivered) in the broker."""
        found: list[tuple[str, dict]] = []
        if self._redis is not None:
            for q in QUEUES:
                for suffix in _PRIORITY_SUFFIXES:
                    found += [(q, json.loads(raw)) for raw in self._redis.lrange(q + suffix, 0, -1)]
            return found
        folder = Path(broker_folders(self.settings)["data_folder_in"])
        for path in folder.glob("*.msg"):
            queue = path.name.rsplit(".", 2)[-2]
            try:
                found.append((queue, json.loads(path.read_text())))
            except (OSError, ValueError):
                continue  # taken by a worker while we looked
        return found

    def depths(self) -> dict[str, int]:
        counts = dict.fromkeys(QUEUES, 0)
        for queue, _ in self._messages():
            counts[queue] = counts.get(queue, 0) + 1
        return counts

    def waiting_jobs(self) -> set[str]:
        return {job_of(m.get("headers", {}).get("id", "")) for _, m in self._messages()}
