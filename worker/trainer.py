"""The trainer: a warm, supervised subprocess that runs chunks and evaluations for one worker.

Training never runs inside Celery's daemonic pool child: there a DataLoader cannot start worker
processes (pytorch #15950) and CUDA cannot be initialised after fork (pytorch #40403). The worker
keeps one trainer process per pool slot, started ahead of time so torch is already imported when a
chunk arrives, talks to it over stdin/stdout in JSON lines, and watches it: a crash (OOM kill,
segfault) becomes a recorded failure, and cancel kills its whole process group within a second.
The trainer dies with its worker (PR_SET_PDEATHSIG), so a killed worker leaves no orphan training.

Run as `python -m worker.trainer`.
"""
from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# What retrying cannot fix: the job fails at once with the message.
PERMANENT = {"DataError", "TrainingError", "PretrainedWeightsUnavailable", "ValidationError"}


class TrainerCrashed(RuntimeError):
    """The trainer process died (killed by a signal or exited) while running a request."""


class TrainerFailed(RuntimeError):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def permanent(self) -> bool:
        return self.kind in PERMANENT


class Cancelled(RuntimeError):
    """The request was stopped on purpose (cancel, pause, lost lease)."""


def _die_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class TrainerProcess:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.trainer"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=self.env,
            start_new_session=True,  # its own process group: killing it takes its DataLoader workers too
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def kill(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None

    def run(self, request: dict[str, Any], tick: Callable[[], bool], tick_s: float = 0.5) -> dict[str, Any]:
        """Send one request and wait for its answer, calling `tick` every `tick_s`; when tick
        returns False the trainer is killed and Cancelled raised."""
        self.start()
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died already: reported below with its exit status
        fd = self.proc.stdout.fileno()
        while True:
            ready, _, _ = select.select([fd], [], [], tick_s)
            if ready:
                line = self.proc.stdout.readline()
                if line:
                    reply = json.loads(line)
                    if reply["ok"]:
                        return reply["result"]
                    raise TrainerFailed(reply["kind"], reply["message"])
                code = self.proc.wait()
                self.proc = None
                how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
                hint = " (out of memory?)" if code == -signal.SIGKILL else ""
                raise TrainerCrashed(f"trainer process {how}{hint}")
            if not tick():
                self.kill()
                raise Cancelled("stopped while running")


def _serve() -> None:
    """The subprocess side: import torch once, then answer requests until stdin closes."""
    from segmodel.evaluate import evaluate
    from segmodel.spec import TrainSpec
    from segmodel.train import train_chunk
    from scheduler.jobs import append_jsonl

    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # stray prints must not corrupt the reply channel
    for line in sys.stdin.buffer:
        request = json.loads(line)
        try:
            spec = TrainSpec.model_validate(request["spec"])
            job_dir = Path(request["job_dir"])
            if request["op"] == "train":
                tags = {"chunk": request["chunk"], "attempt": request["attempt"], "worker": request["worker"]}
                metrics = job_dir / "metrics.jsonl"

                def on_step(m: dict[str, Any]) -> None:
                    append_jsonl(metrics, {**m, **tags, "time": time.time()})

                result = train_chunk(spec, job_dir, request["chunk"], on_step=on_step).to_dict()
            else:
                result = evaluate(spec, job_dir, Path(request["weights"]))
            reply = {"ok": True, "result": result}
        except Exception as exc:  # every failure goes back to the worker, which records it
            reply = {"ok": False, "kind": type(exc).__name__, "message": str(exc)}
        out.write((json.dumps(reply) + "\n").encode())
        out.flush()


if __name__ == "__main__":
    _serve()
