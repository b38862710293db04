"""Fault injection: a multi-chunk job on a real redis-server and several workers, hit at random
moments by kills, preemptions, broker loss, duplicated and stale messages and corrupted
checkpoints. Each trial then checks every guarantee and the run prints a table; any violated
check exits non-zero. A graceful preemption (`term_worker`: SIGTERM) may retrain at most one step;
`preempt_kill` (SIGTERM, then SIGKILL after a random grace of 0-3 s) loses what the grace did not
let it commit, and the table reports both.

    python bench/chaos.py --trials 10 --seed 0           # the short profile CI runs
    python bench/chaos.py --trials 100 --seed 1          # a long profile, on demand
    python bench/chaos.py --storage s3 --trials 30       # storage on an S3 server (moto), workers with own caches

Every check reads the job through the storage interface (JobStore), so one code path serves a
local folder and a bucket. On S3 a chunk's metrics reach storage only with its commit (the worker
uploads them from its scratch folder), so the steps a killed worker trained in vain are not there
to count: the work-lost figures cover uploaded metrics only, and the table says so.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import io
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from segmodel.jobs import JobStatus, JobStore
from segmodel import checkpoint
from segmodel.layout import JobLayout
from segmodel.storage import ObjectNotFound, Storage
from segmodel.spec import TrainSpec
from segmodel.synthetic import generate
from segmodel.engine import train_range
from worker.app import EVAL_TASK, TRAIN_TASK, make_app
from worker.registry import online
from worker.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3server import s3_env, start_moto  # noqa: E402

FAULTS = ("kill_worker", "kill_trainer", "term_worker", "preempt_kill", "redis_restart", "flushall", "scheduler_restart",
          "broker_pause", "trainer_stall", "disk_full", "duplicate", "stale", "corrupt_newest", "corrupt_older")
PREEMPTIONS = ("term_worker", "preempt_kill")
WORKERS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := cond():
            return value
        time.sleep(0.1)
    raise TimeoutError(f"waiting for {what}")


def job_digest(backend: Storage, job_id: str) -> str:
    """Every object of the job, names and bytes (a folder's hidden lock files are not the job's)."""
    h = hashlib.sha256()
    for key in backend.list(f"jobs/{job_id}"):
        h.update(key.encode() + backend.get(key))
    return h.hexdigest()


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for kid in _children(todo.pop()):
            out.append(kid)
            todo.append(kid)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Rig:
    """The processes of one trial: redis-server, the scheduler, and the workers; on `s3`, an S3
    server (moto) too, and each worker with a cache folder of its own."""

    def __init__(self, root: Path, storage: str) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.s3 = storage == "s3"
        self.moto: subprocess.Popen[bytes] | None = None
        s3: dict[str, str] = {}
        if self.s3:
            self.moto, endpoint = start_moto(root / "moto.log")
            s3 = s3_env(endpoint, "chaos")
            os.environ.update(s3)  # this process reads and faults the bucket too
        self.storage: Path | str = "s3://chaos/relay" if self.s3 else root / "storage"
        self.image = None if self.s3 else self._small_disk()
        # Faults this rig cannot apply, and why: left out of the draw and named in the table.
        self.skipped = {"disk_full": "storage is a bucket; a worker's full disk is tested in tests/test_cache_space.py"
                        if self.s3 else "it needs root to mount a small filesystem for storage"} if self.image is None else {}
        self.store = JobStore(self.storage)
        self.victim = ""  # the worker the last kill or preemption hit
        self.redis_port = free_port()
        self.api_port = free_port()
        self.broker_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        self.env.update(RELAY_STORAGE=str(self.storage), RELAY_BROKER_URL=self.broker_url, PYTHONUNBUFFERED="1",
                        RELAY_API_URL=f"http://127.0.0.1:{self.api_port}", RELAY_LEASE_TTL_S="3",
                        RELAY_RECONCILE_INTERVAL_S="0.5", RELAY_RECONCILE_GRACE_S="3", RELAY_MAX_ATTEMPTS="20",
                        RELAY_STALL_TIMEOUT_S="30", **s3)
        # Steps of at least 0.2 s: a job of 20 tiny steps lasts a few seconds, so the faults (drawn
        # 0.5-2.5 s apart) land while it trains, not after it has ended.
        self.env["RELAY_THROTTLE_STEP_S"] = "0.2"
        self.redis: subprocess.Popen[bytes] | None = None
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.worker_keys: set[str] = set()
        self.n_started = 0
        self.start_redis()
        self.start_scheduler()
        for _ in range(WORKERS):
            self.start_worker()
        wait_for(lambda: len(online(self.storage)) >= WORKERS, 120, "workers online")

    def _spawn(self, args: list[str], name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "ab")
        return subprocess.Popen(args, env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def start_redis(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("redis-server is needed for the chaos harness")
        self.redis = self._spawn([exe, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no", "--dir", str(self.root)], "redis")
        import redis

        wait_for(lambda: _ping(redis.Redis(port=self.redis_port)), 10, "redis")

    def start_scheduler(self) -> None:
        self.scheduler = self._spawn([sys.executable, "-m", "scheduler.cli", "scheduler", "--port", str(self.api_port)], "scheduler")

    def start_worker(self) -> None:
        self.n_started += 1
        name = f"w{self.n_started}"
        own = {"RELAY_CACHE_DIR": str(self.root / f"cache-{name}")} if self.s3 else {}  # shares no folder
        self.workers.append(self._spawn([sys.executable, "-m", "scheduler.cli", "worker", "--name", name], name, own))

    def between_trials(self, worker_env: dict[str, str]) -> None:
        """Reap what faults left (orphaned pool children of killed workers), restart the workers if
        their settings change, and top them up to WORKERS."""
        for w in self.workers:
            if w.poll() is not None:
                try:
                    os.killpg(w.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.workers = self.live_workers()
        if any(self.env.get(k) != v for k, v in worker_env.items()) or any(
                k not in worker_env for k in self.worker_keys):
            for w in self.workers:
                os.killpg(w.pid, signal.SIGKILL)
                w.wait()
            self.workers = []
            for k in self.worker_keys:
                self.env.pop(k, None)
            self.env.update(worker_env)
            self.worker_keys = set(worker_env)
        while len(self.live_workers()) < WORKERS:
            self.start_worker()
        live = {w.args[-1] for w in self.live_workers()}
        wait_for(lambda: live <= {r["node"] for r in online(self.storage)}, 120, "workers online")

    def live_workers(self) -> list[subprocess.Popen[bytes]]:
        return [w for w in self.workers if w.poll() is None]

    def trainers(self) -> list[int]:
        return [p for w in self.live_workers() for p in _descendants(w.pid) if "worker.trainer" in _cmdline(p)]

    def busy_trainer(self, job_id: str) -> int | None:
        """The trainer of the worker that reports training job_id, if any."""
        busy = {w["node"] for w in online(self.storage) if w.get("job") == job_id}
        for w in self.live_workers():
            name = Path(w.args[-1]).name
            if name in busy:
                return next((p for p in _descendants(w.pid) if "worker.trainer" in _cmdline(p)), None)
        return None

    def stop(self) -> None:
        for p in [*self.workers, self.scheduler, self.redis, self.moto]:
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if self.image is not None:
            subprocess.run(["umount", "-l", str(self.storage)], check=False)
            self.image.unlink(missing_ok=True)

    def _small_disk(self) -> Path | None:
        """Storage on a filesystem of its own (a loop-mounted ext4 image, no blocks reserved for
        root), which `disk_full` can fill; None where that needs what this machine lacks (root)."""
        if os.geteuid() != 0 or not all(shutil.which(t) for t in ("mkfs.ext4", "mount", "umount", "fallocate")):
            return None
        image = self.root / "storage.img"
        with open(image, "wb") as f:
            f.truncate(16 << 30)  # sparse: only what is written takes disk space
        self.storage.mkdir(parents=True, exist_ok=True)
        for step in (["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], ["mount", "-o", "loop", str(image), str(self.storage)]):
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:  # e.g. no loop devices in a container
                print(f"disk_full: {' '.join(step[:3])} failed ({done.stderr.strip()}); storage stays on the parent filesystem")
                image.unlink()
                return None
        return image


def _ping(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


@dataclass
class Trial:
    faults: list[tuple[str, float]] = field(default_factory=list)   # (kind, when)
    preempted: list[tuple[str, str, float]] = field(default_factory=list)  # (kind, worker, when) of each preemption
    retrained: list[tuple[str, int]] = field(default_factory=list)  # (kind, steps the preempted worker trained in vain)
    recoveries: list[float] = field(default_factory=list)
    lost_steps: int = 0
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0


def inject(kind: str, rig: Rig, job_id: str, app: Any, rng: random.Random) -> bool:
    """Apply one fault; False if it could not apply right now (e.g. no chunk running)."""
    state = rig.store.state(job_id)
    if kind in ("kill_worker", *PREEMPTIONS):
        busy = {w["node"] for w in online(rig.storage) if w.get("job") == job_id}
        victims = [w for w in rig.live_workers() if w.args[-1] in busy]
        if kind in PREEMPTIONS and not victims:
            return False  # a preemption is measured on a worker with a chunk in hand
        victim = rng.choice(victims or rig.live_workers())
        rig.victim = victim.args[-1]
        if kind == "kill_worker":
            os.kill(victim.pid, signal.SIGKILL)  # the main process only; its pool child is orphaned
        else:
            os.kill(victim.pid, signal.SIGTERM)  # warm shutdown: the chunk stops at its next step and commits
        if kind == "preempt_kill":  # the grace period runs out: the whole worker goes, as `docker kill` does
            grace = rng.uniform(0, 3)
            threading.Timer(grace, lambda: _killpg(victim.pid)).start()
        rig.start_worker()
    elif kind in ("kill_trainer", "trainer_stall"):
        pid = rig.busy_trainer(job_id)
        if pid is None:
            return False
        # trainer_stall: alive and silent (an NFS hang, a wedged GPU) until the stall watchdog kills it
        os.kill(pid, signal.SIGKILL if kind == "kill_trainer" else signal.SIGSTOP)
    elif kind == "disk_full":  # every write to storage fails (ENOSPC) for a few seconds
        if rig.image is None:
            return False
        st = os.statvfs(rig.storage)
        assert isinstance(rig.storage, Path)
        ballast = rig.storage / ".ballast"
        # All but a few hundred kB (the filesystem's own metadata needs some room to allocate it).
        for spare in (256 << 10, 4 << 20, 64 << 20):
            if subprocess.run(["fallocate", "-l", str(max(st.f_bavail * st.f_frsize - spare, 4096)), str(ballast)],
                              capture_output=True).returncode == 0:
                break
        else:
            ballast.unlink(missing_ok=True)
            return False
        threading.Timer(rng.uniform(2, 5), lambda: ballast.unlink(missing_ok=True)).start()
    elif kind == "broker_pause":  # connections stay open, nothing answers, for longer than the lease TTL
        assert rig.redis is not None
        paused = rig.redis
        paused.send_signal(signal.SIGSTOP)
        threading.Timer(rng.uniform(4, 8), lambda: paused.poll() is None and paused.send_signal(signal.SIGCONT)).start()
    elif kind == "redis_restart":
        assert rig.redis is not None
        os.killpg(rig.redis.pid, signal.SIGKILL)
        rig.redis.wait()
        rig.start_redis()  # empty: no persistence
    elif kind == "flushall":
        import redis

        redis.Redis(port=rig.redis_port).flushall()
    elif kind == "scheduler_restart":
        assert rig.scheduler is not None
        os.killpg(rig.scheduler.pid, signal.SIGKILL)
        rig.scheduler.wait()
        rig.start_scheduler()
    elif kind == "duplicate":
        app.send_task(TRAIN_TASK, args=[job_id, state.chunk], queue="cpu")
    elif kind == "stale":
        if state.chunk == 0:
            return False
        app.send_task(TRAIN_TASK, args=[job_id, state.chunk - 1], queue="cpu")
    elif kind in ("corrupt_newest", "corrupt_older"):
        steps = checkpoint_steps(rig.store.backend, job_id)
        if len(steps) < (1 if kind == "corrupt_newest" else 2):
            return False
        key = f"jobs/{job_id}/checkpoints/step{steps[0] if kind == 'corrupt_newest' else rng.choice(steps[1:])}.pt"
        try:
            data = rig.store.backend.get(key)
            if rng.random() < 0.5:
                rig.store.backend.put(key, data[: len(data) // 2])  # truncated
            else:
                i = rng.randrange(len(data))
                rig.store.backend.put(key, data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])  # one flipped byte
        except OSError as exc:  # pruned meanwhile (retention), or a disk_full fault still holds the disk
            if isinstance(exc, ObjectNotFound) or exc.errno == errno.ENOSPC:
                return False
            raise
    return True


def checkpoint_steps(backend: Storage, job_id: str) -> list[int]:
    """Steps with a chunk checkpoint object, newest first (validity not checked)."""
    names = (k.rsplit("/", 1)[-1] for k in backend.list(f"jobs/{job_id}/checkpoints"))
    return sorted((int(n[4:-3]) for n in names if n.startswith("step") and n.endswith(".pt") and n[4:-3].isdigit()),
                  reverse=True)


def commit_log(store: JobStore, job_id: str) -> list[dict[str, Any]]:
    """The commit log in the order things happened: a folder's file is in that order already; a
    bucket's objects come in name order, where a rewind sorts after the commit that followed it."""
    return sorted(store.records(job_id, "commits"), key=lambda r: r.get("committed_at", r.get("at", 0.0)))


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def retrained_by(store: JobStore, job_id: str, worker: str, when: float) -> int:
    """Steps `worker` trained in the attempt it had in hand when preempted at `when` that no commit
    of its kept: work its preemption threw away. The job's events say which attempt: the last
    "chunk K attempt A on W" before `when`, unless a failure or a commit of chunk K ended it
    before `when` (the registry can show a worker busy for a moment after that). Steps that other
    faults on the same worker cost (a killed or hung trainer) are not counted."""
    events = store.state(job_id).events
    in_hand: tuple[int, int] | None = None
    for e in (e for e in events if e.at <= when):
        if (m := re.fullmatch(r"chunk (\d+) attempt (\d+) on (\S+)", e.what)) and m[3] == worker:
            in_hand = (int(m[1]), int(m[2]))
        elif in_hand and _ends_attempt(e.what, in_hand[0]):
            in_hand = None
    if in_hand is None:
        return 0
    ended = next((e.what for e in events if e.at > when and _ends_attempt(e.what, in_hand[0])), "")
    if re.search(r"trainer reported no progress|trainer process killed", ended):
        return 0  # a trainer_stall or kill_trainer fault took this attempt: no stop could be graceful
    kept = set()
    for rec in commit_log(store, job_id):
        if rec.get("worker") == worker:
            kept.update(range(rec["start_step"], rec["end_step"]))
    # a metrics line is written as step `step` ends: step index step-1
    trained = {m["step"] - 1 for m in store.records(job_id, "metrics")
               if m["worker"] == worker and (m["chunk"], m["attempt"]) == in_hand}
    return len(trained - kept)


def _ends_attempt(what: str, chunk: int) -> bool:
    return re.match(rf"retryable failure: chunk {chunk}:|enqueued .*: chunk {chunk} committed by ", what) is not None


def check(rig: Rig, job_id: str, bystanders: dict[str, str], reference: dict[str, torch.Tensor], spec: TrainSpec, app: Any,
          trial: Trial) -> None:
    store = rig.store
    state = store.state(job_id)
    v = trial.violations
    if state.status != JobStatus.succeeded:
        v.append(f"job ended {state.status.value}: {state.reason}")
        return
    for e in range(1, spec.epochs + 1):
        try:
            data, _ = store.backend.get_checked(f"jobs/{job_id}/weights/weight{e}.pt")
            weights = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:
            v.append(f"weight{e}.pt: {exc}")
            continue
        if e == spec.epochs and not all(torch.equal(weights[k], reference[k]) for k in reference):
            v.append("final weights differ from the uninterrupted reference")
    # The job's record: every step once, in order, to the last; the evaluation's report written.
    ranges = [(h.start_step, h.end_step) for h in state.history]
    if [h.chunk for h in state.history] != list(range(len(state.history))):
        v.append(f"history chunks {[h.chunk for h in state.history]} are not 0, 1, 2, ...")
    if any(b[0] > a[1] for a, b in zip(ranges, ranges[1:])) or not ranges or ranges[0][0] != 0:
        v.append(f"history leaves steps out: {ranges}")
    if state.step != state.total_steps or (ranges and ranges[-1][1] != state.total_steps):
        v.append(f"job ended at step {state.step}, history at {ranges[-1][1] if ranges else None}, of {state.total_steps}")
    if store.read(job_id, "eval/report.json") is None:
        v.append("no evaluation report")
    # The commit log: consecutive chunks, except right after a recorded rewind; no overlap in time.
    expected, last_end = 0, 0.0
    for rec in commit_log(store, job_id):
        if "rewind_to_chunk" in rec:
            expected = rec["rewind_to_chunk"]
            continue
        if rec["chunk"] != expected:
            v.append(f"commit of chunk {rec['chunk']} where chunk {expected} was due (committed twice or skipped)")
        if rec["started_at"] < last_end:
            v.append(f"chunk {rec['chunk']} started before the previous commit: two workers at once")
        expected, last_end = rec["chunk"] + 1, rec["committed_at"]
    if expected != state.n_chunks:
        v.append(f"commit log ends at chunk {expected}, job has {state.n_chunks}")
    # No two workers training at once: per (worker, chunk, attempt) step intervals must not overlap.
    spans: dict[tuple[str, int, int], list[float]] = {}
    for m in store.records(job_id, "metrics"):
        key = (m["worker"], m["chunk"], m["attempt"])
        lo, hi = m["time"] - m["step_s"], m["time"]
        span = spans.setdefault(key, [lo, hi])
        span[0], span[1] = min(span[0], lo), max(span[1], hi)
        trial.lost_steps += 1
    trial.lost_steps -= state.total_steps
    ordered = sorted(spans.items(), key=lambda kv: kv[1][0])
    for (ka, a), (kb, b) in zip(ordered, ordered[1:]):
        if ka[0] != kb[0] and b[0] < a[1] - 0.05:
            v.append(f"{ka[0]} and {kb[0]} trained at the same time (chunks {ka[1]}, {kb[1]})")
    # A message replayed after the end changes nothing; the bystander job was not touched.
    before = store.read(job_id, "state.json")
    app.send_task(TRAIN_TASK, args=[job_id, 0], queue="cpu")
    app.send_task(EVAL_TASK, args=[job_id], queue="cpu")
    time.sleep(2)
    if store.read(job_id, "state.json") != before:
        v.append("a replayed message changed the finished job")
    for other, digest in bystanders.items():
        if job_digest(store.backend, other) != digest:
            v.append(f"job {other}, not under test, was touched")


def run_trial(i: int, rig: Rig, spec: TrainSpec, reference: dict[str, torch.Tensor], rng: random.Random,
              kinds: list[str], short_visibility: bool) -> Trial:
    """One job under test on the shared rig; every job from earlier trials (and a paused one) must
    come through it untouched."""
    trial = Trial()
    rig.between_trials({"RELAY_VISIBILITY_TIMEOUT_S": "1"} if short_visibility else {})
    app = make_app(Settings(storage=rig.storage, broker_url=rig.broker_url))
    store = rig.store
    bystanders = {j: job_digest(store.backend, j) for j in store.ids()}
    t0 = time.time()
    client = httpx.Client(base_url=rig.env["RELAY_API_URL"], timeout=10)
    wait_for(lambda: _up(client), 60, "the scheduler")
    job_id = client.post("/api/jobs", json=spec.model_dump()).json()["id"]
    for kind in kinds:
        time.sleep(rng.uniform(0.5, 2.5))
        if store.state(job_id).status.final:
            break
        deadline = time.time() + 20
        while not inject(kind, rig, job_id, app, rng):  # wait until the fault can apply
            if time.time() > deadline or store.state(job_id).status.final:
                break
            time.sleep(0.1)
        else:
            trial.faults.append((kind, time.time()))
            if kind in PREEMPTIONS:
                trial.preempted.append((kind, rig.victim, trial.faults[-1][1]))
    wait_for(lambda: store.state(job_id).status.final, 300, f"trial {i}: the job to end (logs in {rig.root})")
    trial.seconds = time.time() - t0
    commits = commit_log(store, job_id)  # none if the job failed before its first commit
    done_at = store.state(job_id).updated_at
    for _, when in trial.faults:
        nxt = min((c["committed_at"] for c in commits if "committed_at" in c and c["committed_at"] > when), default=done_at)
        trial.recoveries.append(nxt - when)
    check(rig, job_id, bystanders, reference, spec, app, trial)
    for kind, worker, when in trial.preempted:
        lost = retrained_by(store, job_id, worker, when)
        trial.retrained.append((kind, lost))
        if kind == "term_worker" and lost > 1:
            trial.violations.append(f"a graceful preemption of {worker} threw away {lost} steps (at most 1 allowed)")
    return trial


def _up(client: httpx.Client) -> bool:
    try:
        return client.get("/healthz").status_code == 200
    except httpx.TransportError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faults", type=int, default=3, help="faults per trial")
    parser.add_argument("--kinds", default=",".join(FAULTS), help="the fault kinds to draw from (comma-separated)")
    parser.add_argument("--keep", action="store_true", help="keep the trials' folders and logs")
    parser.add_argument("--storage", choices=("local", "s3"), default="local",
                        help="where jobs live: a local folder, or a bucket on an S3 server (moto) started for the run")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="relay-chaos-"))
    lists = generate(root / "data", train=16, val=4, seed=args.seed, size=64)
    spec = TrainSpec(train=str(lists["train"]), val=str(lists["val"]), epochs=5, chunk_steps=4, batch_size=4,
                     height=240, width=240, pretrained=False, seed=args.seed)
    train_range(spec, root / "reference", 0, spec.epochs * 4, cache_dir=root / "reference-cache")
    reference = checkpoint.load(JobLayout(root / "reference").weight(spec.epochs))
    trials = []
    rig = Rig(root / "rig", args.storage)
    store = rig.store
    paused, _ = store.create(spec)  # a job that must stay exactly as it is
    store.update(paused, lambda s: s.set_status(JobStatus.paused, "bystander"))
    try:
        run_all(args, rig, spec, reference, rng, trials)
    finally:
        rig.stop()
    report(trials, spec, args.storage, rig.skipped)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"kept {root}")
    return 1 if any(t.violations for t in trials) else 0


def run_all(args: argparse.Namespace, rig: Rig, spec: TrainSpec, reference: dict[str, torch.Tensor], rng: random.Random,
            trials: list[Trial]) -> None:
    # Every kind appears in the first trials (in turn), then kinds are drawn at random.
    kinds_allowed = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds_allowed) - set(FAULTS)
    if unknown:
        raise SystemExit(f"--kinds: unknown fault kinds {sorted(unknown)}; known: {', '.join(FAULTS)}")
    for kind, why in rig.skipped.items():
        if kind in kinds_allowed:
            print(f"{kind}: not injected ({why})")
            kinds_allowed.remove(kind)
    deck = list(kinds_allowed)
    rng.shuffle(deck)
    for i in range(args.trials):
        kinds = [deck.pop() if deck else rng.choice(kinds_allowed) for _ in range(args.faults)]
        short_visibility = i % 3 == 2
        trial = run_trial(i, rig, spec, reference, rng, kinds, short_visibility)
        applied = [k for k, _ in trial.faults]
        for kind in kinds:  # a fault the job ended too early for goes back into the deck
            if kind in applied:
                applied.remove(kind)
            elif kind in kinds_allowed:
                deck.append(kind)
        tag = " (visibility timeout 1 s)" if short_visibility else ""
        print(f"trial {i}{tag}: {', '.join(k for k, _ in trial.faults)} -> {trial.seconds:.0f} s, "
              f"{len(trial.violations)} violations {trial.violations or ''}", flush=True)
        trials.append(trial)


def report(trials: list[Trial], spec: TrainSpec, storage: str, skipped: dict[str, str]) -> None:
    by_kind = Counter(k for t in trials for k, _ in t.faults)
    recoveries = [r for t in trials for r in t.recoveries]
    n_faults = sum(by_kind.values())
    violations = sum(len(t.violations) for t in trials)
    print("\nfault               injected")
    for kind in FAULTS:
        print(f"{kind:<20}{by_kind.get(kind, 0):>8}" + (f"   not injected: {skipped[kind]}" if kind in skipped else ""))
    print(f"\nstorage {'a bucket on an S3 server (moto), a cache folder per worker' if storage == 's3' else 'a local folder'}")
    print(f"trials {len(trials)}, faults {n_faults}, jobs recovered {sum(not t.violations for t in trials)}/{len(trials)}")
    if recoveries:
        print(f"time to the next commit after a fault: median {statistics.median(recoveries):.1f} s, worst {max(recoveries):.1f} s")
    lost = sum(t.lost_steps for t in trials)
    print(f"work lost: {lost} steps retrained in all ({lost / max(n_faults, 1):.2f} per fault; a chunk is {spec.chunk_steps} steps)")
    if storage == "s3":
        print("  (uploaded metrics only: on S3 a chunk's metrics reach storage with its commit, so the steps a killed "
              "worker trained in vain, and preemption losses below, are not counted)")
    for kind in PREEMPTIONS:
        lost = [n for t in trials for k, n in t.retrained if k == kind]
        if lost:
            print(f"{kind}: {len(lost)} preemptions, steps retrained per preemption: mean {statistics.mean(lost):.2f}, "
                  f"max {max(lost)} (a chunk is {spec.chunk_steps} steps)")
    print(f"violated checks: {violations}")


if __name__ == "__main__":
    sys.exit(main())
