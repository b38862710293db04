"""A chunk's TensorBoard event file, named to sort after every earlier file of the job's run.

All chunks of a job, on whichever worker, write into one run: <job_dir>/tensorboard. TensorBoard
reads a run's files in name order, and a name begins with a second: SummaryWriter's is the second
it opened the file, so two chunks that begin within one second (chunks under a second: small data,
a GPU) could sort out of training order, and a retried chunk's purge would then hide the wrong
steps. Waiting for the next second cost each such chunk up to a second. Here a file's second is
the later of now and the newest file's second + 1: names sort in the order the chunks began, with
no wait. The records are what SummaryWriter writes (TensorBoard's protos and RecordWriter): the
file version, the purge marker (a SessionLog START at the first step, which hides any steps an
earlier failed attempt wrote from there on) and simple scalars.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import BinaryIO

from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.record_writer import RecordWriter

PREFIX = "events.out.tfevents."
FLUSH_S = 5.0  # what SummaryWriter was given: the curve of a running chunk shows within seconds


def _newest_second(log_dir: Path) -> int:
    seconds = (p.name[len(PREFIX):].split(".")[0] for p in log_dir.glob(PREFIX + "*"))
    return max((int(s) for s in seconds if s.isdigit()), default=0)


class EventFile:
    def __init__(self, log_dir: Path, suffix: str, purge_step: int | None = None) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        second = max(int(time.time()), _newest_second(log_dir) + 1)
        self.path = log_dir / f"{PREFIX}{second:010d}.{socket.gethostname()}.{os.getpid()}{suffix}"
        self._file: BinaryIO = open(self.path, "xb")
        self._records = RecordWriter(self._file)
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        if purge_step is not None:
            self._write(Event(wall_time=time.time(), step=purge_step, session_log=SessionLog(status=SessionLog.START)))
        self._flushed = time.monotonic()

    def _write(self, event: Event) -> None:
        self._records.write(event.SerializeToString())

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._write(Event(wall_time=time.time(), step=step, summary=Summary(value=[Summary.Value(tag=tag, simple_value=float(value))])))
        if time.monotonic() - self._flushed >= FLUSH_S:
            self._records.flush()
            self._flushed = time.monotonic()

    def close(self) -> None:
        self._records.close()
