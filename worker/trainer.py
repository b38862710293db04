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
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# What retrying cannot fix: the job fails at once with the message.
# Not a full cache disk (CacheSpaceError): another worker may have room, or this one later.
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


class TrainerStalled(TrainerCrashed):
    """The trainer reported no progress for longer than the stall timeout, and was killed."""


class Cancelled(RuntimeError):
    """The request was killed on purpose (cancel, lost lease)."""


# What a watch tells a running request between polls: go on; end the chunk at its next step and
# commit there (SIGUSR1 to the trainer; an evaluation finishes); or kill it now.
GO, STOP, KILL = "go", "stop", "kill"


def _in_child() -> None:
    """Before the trainer's exec: it dies with the worker, and a stop request (SIGUSR1) that comes
    before it has installed its handler is ignored (an ignored signal stays ignored across exec),
    not fatal; the worker repeats the request every tick until the chunk stops."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class TrainerProcess:
    """Requests and replies are JSON lines that carry the request's id: a reply is taken only for
    the request in hand, and a request abandoned for any reason (a broker error in the watch, a
    stall, a cancel) kills the trainer, so no late reply can ever answer the next request.

    While it works the trainer sends progress lines (each step, each slice of a cache build); one
    that sends none for `stall_timeout_s`, or for ten times its slowest interval so far if that is
    longer, is hung (an NFS hang, a deadlocked loader, a wedged GPU): killed, TrainerStalled."""

    def __init__(self, env: dict[str, str] | None = None, stall_timeout_s: float = 600.0) -> None:
        self.env = env
        self.stall_timeout_s = stall_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self._requests = 0
        self._ready_at: float | None = None  # when the trainer said its imports were done (its clock: this machine's)
        self.waited_s = 0.0  # how long the last request waited for that

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self._ready_at = None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.trainer"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=self.env,
            start_new_session=True,  # its own process group: killing it takes its DataLoader workers too
            preexec_fn=_in_child,
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

    def run(self, request: dict[str, Any], tick: Callable[[], str], tick_s: float = 0.5) -> dict[str, Any]:
        """Send one request and wait for its answer, calling `tick` every `tick_s`: on STOP the
        trainer is asked to stop (again at every tick, so a request it had not yet read is asked
        too), on KILL it is killed and Cancelled raised."""
        self.start()
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self._requests += 1
        rid = f"{os.getpid()}.{self._requests}"
        sent = time.time()
        try:
            self.proc.stdin.write((json.dumps({**request, "id": rid}) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died already: reported below with its exit status
        answered = False
        try:
            reply = self._await(rid, tick, tick_s)
            answered = True
            self.waited_s = max(0.0, self._ready_at - sent) if self._ready_at is not None else 0.0
        finally:
            if not answered:  # abandoned: its late reply must not answer the next request
                self.kill()
        if reply["ok"]:
            return reply["result"]
        raise TrainerFailed(reply["kind"], reply["message"])

    def _await(self, rid: str, tick: Callable[[], str], tick_s: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        pending = b""
        last = time.monotonic()
        slowest = 0.0
        while True:
            ready, _, _ = select.select([fd], [], [], tick_s)
            if ready:
                data = os.read(fd, 1 << 16)
                if not data:
                    code = self.proc.wait()
                    self.proc = None
                    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
                    hint = " (out of memory?)" if code == -signal.SIGKILL else ""
                    raise TrainerCrashed(f"trainer process {how}{hint}")
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    message = json.loads(line)
                    if "ready" in message:
                        self._ready_at = message["ready"]
                        continue
                    if message.get("id") != rid:
                        continue  # not this request's (a trainer is killed before it can happen)
                    if "progress" not in message:
                        return message
                    now = time.monotonic()
                    slowest, last = max(slowest, now - last), now
            limit = max(self.stall_timeout_s, 10 * slowest)
            if time.monotonic() - last > limit:
                raise TrainerStalled(f"trainer reported no progress for {limit:.0f} s (RELAY_STALL_TIMEOUT_S); killed")
            what = tick()
            if what == KILL:
                raise Cancelled("stopped while running")
            if what == STOP and self.proc is not None:
                try:
                    os.kill(self.proc.pid, signal.SIGUSR1)
                except ProcessLookupError:
                    pass  # it died: the next select reports it


def _serve() -> None:
    """The subprocess side: import torch once, then answer requests until stdin closes."""
    from segmodel.lists import read_list
    from segmodel.evaluate import evaluate
    from segmodel.spec import ChunkPlan, TrainSpec
    from segmodel.engine import train_range
    from segmodel.jobs import append_jsonl
    from worker.tbevents import EventFile

    def open_tensorboard(job_dir: Path, tags: dict[str, Any], purge_step: int | None) -> EventFile:
        """A file in the job's one TensorBoard run, <job_dir>/tensorboard, shared by every chunk on
        every worker (see worker.tbevents). `purge_step` (the chunk's first step) hides the steps
        a failed earlier attempt wrote past the last commit."""
        who = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(tags.get("worker", "")))
        suffix = f".{who}.c{tags['chunk']}.a{tags['attempt']}" if "chunk" in tags else ".eval"
        return EventFile(job_dir / "tensorboard", suffix, purge_step)

    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # stray prints must not corrupt the reply channel
    out_lock = threading.Lock()  # cache builds report progress from their threads

    def send(message: dict[str, Any]) -> None:
        with out_lock:
            out.write((json.dumps(message) + "\n").encode())
            out.flush()

    send({"ready": time.time()})  # imports done: how long a first request waited for them is on record
    # Seconds to sleep after each step: a slower machine, for tests and demos of time budgets.
    throttle_s = float(os.environ.get("RELAY_THROTTLE_STEP_S", "0") or 0)
    # Until now SIGUSR1 was ignored (see _in_child). Its handler only sets a flag, read between
    # steps; with SA_RESTART no system call in torch's C code sees EINTR because of it.
    told_to_stop = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: told_to_stop.set())
    signal.siginterrupt(signal.SIGUSR1, False)
    for line in sys.stdin.buffer:
        request = json.loads(line)
        told_to_stop.clear()  # a stop meant for an earlier request; the worker repeats its own
        rid = request.get("id")
        writer: EventFile | None = None

        def progress(*what: Any) -> None:
            send({"id": rid, "progress": list(what)})

        try:
            spec = TrainSpec.model_validate(request["spec"])
            job_dir = Path(request["job_dir"])
            if request["op"] == "train":
                budget_ends = time.monotonic() + spec.chunk_minutes * 60 if spec.chunk_minutes else None

                def stop() -> str | None:
                    if told_to_stop.is_set():
                        return "told"
                    return "budget" if budget_ends is not None and time.monotonic() >= budget_ends else None

                tags = {"chunk": request["chunk"], "attempt": request["attempt"], "worker": request["worker"]}
                metrics = job_dir / "metrics.jsonl"

                def on_step(m: dict[str, Any]) -> None:
                    nonlocal writer
                    if throttle_s:
                        time.sleep(throttle_s)
                    append_jsonl(metrics, {**m, **tags, "time": time.time()})
                    progress("step", m["step"])
                    if writer is None:  # opened at the first step: a chunk that never trains leaves no file
                        writer = open_tensorboard(job_dir, tags, purge_step=m["step"])
                    writer.add_scalar("train/loss", m["loss"], m["step"])
                    writer.add_scalar("train/lr", m["lr"], m["step"])
                    writer.add_scalar("train/images_per_s", m["images_per_s"], m["step"])

                result = train_range(spec, job_dir, request["start"], request["end"], cache_dir=request["cache_dir"],
                                     on_step=on_step, stop=stop, on_progress=progress).to_dict()
            else:
                result = evaluate(spec, job_dir, Path(request["weights"]), cache_dir=request.get("cache_dir"), on_progress=progress)
                writer = open_tensorboard(job_dir, {}, purge_step=None)
                total = ChunkPlan(spec, len(read_list(spec.train))).total_steps
                writer.add_scalar("eval/mean_iou", result["mean_iou"], total)
                writer.add_scalar("eval/pixel_accuracy", result["pixel_accuracy"], total)
            reply = {"id": rid, "ok": True, "result": result}
        except Exception as exc:  # every failure goes back to the worker, which records it
            reply = {"id": rid, "ok": False, "kind": type(exc).__name__, "message": str(exc)}
        finally:
            if writer is not None:
                try:
                    writer.close()  # flushed before the reply: the chunk's curve is on storage when it commits
                except Exception as exc:  # a lost curve must not lose the chunk
                    print(f"tensorboard: {exc}", file=sys.stderr)
        send(reply)


if __name__ == "__main__":
    _serve()
