"""The `relay` command line. Exit codes: see EXIT_CODES.

Wherever a command takes JOB, it accepts the id, the job's name, a unique id prefix, or `last`
(also `-`) for the newest job."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click
from pydantic import ValidationError

from scheduler.client import ApiError, Client
from scheduler.views import print_job, print_report, print_status, watch_job
from segmodel.jobs import JobStatus, JobStore
from segmodel.datasets import is_remote
from segmodel.errors import RelayError
from segmodel.spec import TrainSpec
from worker.settings import Settings

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_NOT_FOUND, EXIT_UNREACHABLE, EXIT_INFRA = 1, 2, 3, 4, 5
EXIT_NOT_READY, EXIT_PAUSED = 6, 7
EXIT_CODES = """Exit codes:

\b
  0  ok
  1  the job failed or was cancelled (watch, run)
  2  bad input (a spec, a list file, a refused change, an ambiguous JOB, an epoch the job will never have)
  3  no such job
  4  unreachable: nothing answered at RELAY_API_URL (or, for scheduler and worker, RELAY_BROKER_URL or RELAY_STORAGE at start)
  5  infrastructure trouble: the API answered 5xx (broker or storage down, or an internal error)
  6  not ready yet: no evaluation yet, or that epoch not trained yet (report, fetch)
  7  the job is paused (watch, run)"""


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"relay: {message}", err=True)
    sys.exit(code)


def _check_settings(settings: Settings) -> None:
    """Bad storage or broker settings stop the start with the setting named, instead of a retry loop."""
    from segmodel.storage import StorageError, check_before_fork
    from worker import redis_url

    try:
        check_before_fork(settings.storage)
    except StorageError as exc:
        _fail(str(exc), EXIT_UNREACHABLE)
    if settings.broker_url:
        try:
            redis_url.check(settings.broker_url)
        except redis_url.BrokerConfigError as exc:
            _fail(str(exc), EXIT_UNREACHABLE)


def _where(settings: Settings, queues: list[str]) -> str:
    """Storage, broker (password hidden) and queues: what a service's start-up line names."""
    from worker.redis_url import redacted

    broker = redacted(settings.broker_url) if settings.broker_url else f"embedded (files under {settings.storage / 'broker'})"
    return f"storage {settings.storage}; broker {broker}; queues {','.join(queues)}"


def _warn_empty_embedded(settings: Settings) -> None:
    """An embedded worker only meets jobs submitted to this same storage folder: say so when the
    folder holds none, the usual sign of a worker started somewhere else without RELAY_STORAGE."""
    if settings.embedded and not JobStore(settings.storage).ids():
        click.echo(f"relay: warning: embedded transport (no RELAY_BROKER_URL) and no jobs in {settings.storage}: "
                   "this worker only sees jobs submitted with this same RELAY_STORAGE; set RELAY_STORAGE "
                   "(and RELAY_BROKER_URL for Redis) as the scheduler has them", err=True)


def _api_code(exc: ApiError, conflict: int = EXIT_BAD_INPUT) -> int:
    """`conflict`: what a 409 means here (a refused change, or for downloads, not ready yet)."""
    if exc.status >= 500:
        return EXIT_INFRA
    return {0: EXIT_UNREACHABLE, 404: EXIT_NOT_FOUND, 409: conflict}.get(exc.status, EXIT_BAD_INPUT)


def _exit_for(state: str) -> int:
    return 0 if state == "succeeded" else EXIT_PAUSED if state == "paused" else EXIT_FAILED


def _client() -> Client:
    s = Settings()
    return Client(s.api_url, s.api_token, timeout=s.api_timeout_s, retries=s.api_retries,
                  on_retry=lambda message: click.echo(f"relay: {message}", err=True))


def _call(fn: Any, *args: Any, conflict: int = EXIT_BAD_INPUT) -> Any:
    try:
        return fn(*args)
    except ApiError as exc:
        _fail(str(exc), _api_code(exc, conflict))


def spec_options(f: Any) -> Any:
    """The job options shared by `submit` and `run`."""
    options = [
        click.option("--name", default=None, help="a name to find the job by (unique; starts with a letter)"),
        click.option("--train", "train", type=click.Path(), help="list file of training samples (required)"),
        click.option("--val", "val", type=click.Path(), help="list file of validation samples (required)"),
        click.option("--epochs", type=int, default=20, show_default=True),
        click.option("--chunk-steps", type=int, default=None, help="steps per chunk (default: one epoch)"),
        click.option("--chunk-minutes", type=float, default=None,
                     help="a time budget per chunk instead: train this long, then commit (e.g. 330 in a 6-hour Colab session)"),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--batch-size", type=int, default=16, show_default=True),
        click.option("--lr", type=float, default=1e-2, show_default=True),
        click.option("--height", type=int, default=240, show_default=True),
        click.option("--width", type=int, default=240, show_default=True),
        click.option("--num-workers", type=int, default=0, show_default=True, help="DataLoader worker processes"),
        click.option("--no-pretrained", is_flag=True, help="random backbone instead of ImageNet AlexNet weights"),
        click.option("--pretrained-path", type=click.Path(), default=None, help="local AlexNet weights file"),
        click.option("--val-every", type=click.IntRange(1), default=None,
                     help="score the validation set every N epochs during training (the dashboard draws the curve)"),
        click.option("--queue", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True),
        click.option("--engine", type=click.Choice(["fast", "seed"]), default="fast", show_default=True,
                     help="fast: cached data and features, fused loss; seed: the seed's arithmetic exactly"),
        click.option("--init-weights", "init_weights", type=click.Path(), default=None,
                     help="start from this state_dict (the seed's format, or a weight<E>.pt); copied into the job"),
        click.option("--start-epoch", type=click.IntRange(0), default=None,
                     help="epochs the init weights have had: --start-epoch 21 writes weight22.pt first"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _spec(kw: dict[str, Any]) -> TrainSpec:
    if not kw["train"] or not kw["val"]:
        raise click.UsageError("give --train and --val")
    fields = {k: v for k, v in kw.items() if k in TrainSpec.model_fields and v is not None}
    fields["pretrained"] = not kw["no_pretrained"]
    for key in ("train", "val", "pretrained_path", "init_weights"):
        if fields.get(key) and not is_remote(fields[key]):
            fields[key] = os.path.abspath(fields[key])
    try:
        return TrainSpec(**fields)
    except ValidationError as exc:
        _fail(f"invalid job spec: {_problems(exc)}", EXIT_BAD_INPUT)


def _problems(exc: ValidationError, prefix: str = "") -> str:
    """pydantic's errors on one line, each naming its field (with `prefix`: the variable to set)."""
    def one(e: Any) -> str:
        message = e["msg"].removeprefix("Value error, ")
        field = ".".join(map(str, e["loc"]))
        return f"{prefix + field.upper() if prefix else field}: {message}" if field else message

    return "; ".join(one(e) for e in exc.errors())


class _Relay(click.Group):
    """Bad RELAY_* settings end any command with one line naming them, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ValidationError as exc:
            if exc.title != Settings.__name__:
                raise
            _fail(f"bad settings: {_problems(exc, prefix='RELAY_')}", EXIT_BAD_INPUT)


@click.group(cls=_Relay, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES)
@click.version_option(package_name="relay", prog_name="relay")
def main() -> None:
    """Relay: chunked training on a job queue. Submit a job; any worker trains its next chunk."""


# ---- data ---------------------------------------------------------------------------------


@main.group()
def data() -> None:
    """Make, convert and check datasets in the seed's format."""


@data.command("synthetic")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--train", "n_train", type=click.IntRange(1), default=200, show_default=True)
@click.option("--val", "n_val", type=click.IntRange(1), default=40, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--size", type=click.IntRange(32, 2048), default=128, show_default=True, help="image side in pixels")
@click.option("--classes", type=click.IntRange(1, 100), default=5, show_default=True)
def data_synthetic(out: str, n_train: int, n_val: int, seed: int, size: int, classes: int) -> None:
    """Generate a learnable dataset (class decides shape colour and texture). Same seed, same bytes."""
    from segmodel.synthetic import generate

    lists = generate(Path(out), n_train, n_val, seed=seed, size=size, classes=classes)
    click.echo(f"wrote {n_train} training and {n_val} validation samples: {lists['train']} {lists['val']}")


@data.command("ade20k")
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
def data_ade20k(root: str, out: str) -> None:
    """Convert ADEChallengeData2016 (150 classes) to the 100 thing classes + void."""
    from segmodel.ade20k import convert_ade20k

    try:
        stats = convert_ade20k(Path(root), Path(out))
    except RelayError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    click.echo(", ".join(f"{split}: {n} samples" for split, n in stats.items()) + f" -> {out}")


@data.command("push")
@click.argument("folder", type=click.Path(file_okay=False))
@click.argument("url")
@click.option("--threads", type=click.IntRange(1, 256), default=16, show_default=True, help="parallel uploads")
def data_push(folder: str, url: str, threads: int) -> None:
    """Upload a dataset FOLDER (its *.txt lists and the files they name) to URL (s3://bucket/prefix), with
    a manifest of every file's size and sha256, so workers that share no disk with it can train on it."""
    from segmodel.datasets import is_remote, push, size_text
    from segmodel.storage import StorageError

    if not is_remote(url):
        _fail(f"{url}: give an object-store URL (s3://bucket/prefix or gs://bucket/prefix)", EXIT_BAD_INPUT)
    step = 0

    def progress(done: int, total: int, sent: int) -> None:
        nonlocal step
        if done * 10 // total > step or done == total:
            step = done * 10 // total
            click.echo(f"  {done}/{total} files, {size_text(sent)}", err=True)

    try:
        pushed = push(Path(folder), url, threads=threads, progress=progress)
    except StorageError as exc:
        _fail(str(exc), EXIT_UNREACHABLE)
    except RelayError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    click.echo(f"pushed {pushed.files} files, {size_text(pushed.bytes)} in {pushed.seconds:.1f} s; "
               f"manifest sha256 {pushed.manifest_sha256[:12]}…")
    for list_url in pushed.lists:
        click.echo(f"  --{Path(list_url).stem} {list_url}" if Path(list_url).stem in ("train", "val") else f"  {list_url}")


@data.command("check")
@click.argument("list_file", type=click.Path())
@click.option("--num-classes", type=int, default=101, show_default=True)
def data_check(list_file: str, num_classes: int) -> None:
    """Validate every sample of a list file and report every bad one at once."""
    from segmodel.samples import check_dataset

    checked, errors = check_dataset(Path(list_file), num_classes)
    for err in errors:
        click.echo(str(err), err=True)
    click.echo(f"{checked} samples checked, {len(errors)} bad")
    sys.exit(EXIT_BAD_INPUT if errors else 0)


# ---- jobs through the API -------------------------------------------------------------------


@main.command()
@spec_options
@click.option("--json", "as_json", is_flag=True, help="print the job as JSON")
def submit(as_json: bool, **kw: Any) -> None:
    """Submit a job; prints its id. Retried after a timeout or a 5xx (RELAY_API_RETRIES) under one
    idempotency key, so a retry never makes a second job."""
    job = _call(_client().submit, _spec(kw).model_dump())
    click.echo(json.dumps(job) if as_json else job["id"])


JOB_HELP = "JOB: an id, a name, a unique id prefix, or `last`"


@main.command(epilog=JOB_HELP)
@click.argument("job_id", metavar="[JOB]", required=False)
@click.option("--state", "states", multiple=True, type=click.Choice([s.value for s in JobStatus]),
              help="only jobs in this state (repeatable)")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True, help="the newest N jobs")
@click.option("--json", "as_json", is_flag=True)
def status(job_id: str | None, states: tuple[str, ...], limit: int, as_json: bool) -> None:
    """Queue depths, workers and the newest jobs; or one job in detail."""
    client = _client()
    if job_id:
        job = _call(client.job, job_id)
        click.echo(json.dumps(job)) if as_json else print_job(job)
        return
    queue, (jobs, total) = _call(client.queue), _call(client.jobs, list(states), limit)
    if as_json:
        click.echo(json.dumps({**queue, "jobs": jobs, "total_jobs": total}))
    else:
        print_status(queue, jobs, total)


@main.command(epilog=JOB_HELP)
@click.argument("job_id", metavar="JOB")
@click.option("--interval", type=float, default=1.0, show_default=True)
@click.option("--log-every", type=click.FloatRange(0), default=0.0, show_default=True,
              help="without a terminal: a line per chunk, or at most one per this many seconds")
def watch(job_id: str, interval: float, log_every: float) -> None:
    """Follow a job until it ends or pauses: a live progress bar in a terminal, else one line per
    chunk. Exits 0 succeeded, 1 failed or cancelled, 7 paused."""
    client = _client()
    job_id = _call(client.job, job_id)["id"]  # `last` or a prefix: follow the job it means now
    job = watch_job(lambda: _call(client.job, job_id), interval, log_every)
    sys.exit(_exit_for(job["state"]))


@main.command(epilog=JOB_HELP)
@click.argument("job_id", metavar="JOB")
@click.option("-o", "--output", type=click.Path(), default=".", show_default=True, help="file or folder")
@click.option("--epoch", type=click.IntRange(1), default=None, help="default: the latest epoch")
def fetch(job_id: str, output: str, epoch: int | None) -> None:
    """Download a job's weights (weight<E>.pt, a plain state_dict). Exits 6 if that epoch is not
    trained yet, 2 if the job will never have it."""
    path = _call(_client().download_weights, job_id, output, epoch, conflict=EXIT_NOT_READY)
    click.echo(str(path))


def _action(verb: str) -> None:
    @main.command(verb, help=f"{verb.capitalize()} a job.", epilog=JOB_HELP)
    @click.argument("job_id", metavar="JOB")
    @click.option("--json", "as_json", is_flag=True)
    def command(job_id: str, as_json: bool) -> None:
        job = _call(_client().action, job_id, verb)
        click.echo(json.dumps(job) if as_json else f"{job['id']}: {job['state']}")


@main.command(epilog=JOB_HELP)
@click.argument("job_ids", metavar="JOB...", nargs=-1, required=True)
def rm(job_ids: tuple[str, ...]) -> None:
    """Delete jobs with their checkpoints, weights and reports (refused while queued or running)."""
    client = _client()
    for ref in job_ids:
        job = _call(client.job, ref)
        _call(client.remove, job["id"])
        click.echo(f"removed {job['id']}")


def _age(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    if len(text) < 2 or text[-1] not in units or not text[:-1].replace(".", "", 1).isdigit():
        raise click.BadParameter(f"{text!r}: a number and a unit, e.g. 7d, 12h, 30m")
    return float(text[:-1]) * units[text[-1]]


@main.command()
@click.option("--older-than", "older_than", required=True, help="last changed this long ago: 30m, 12h, 7d, 2w")
@click.option("--state", "states", multiple=True, default=("succeeded",), show_default=True,
              type=click.Choice(["succeeded", "failed", "cancelled", "paused"]), help="repeatable")
@click.option("--dry-run", is_flag=True, help="list what would go, delete nothing")
def prune(older_than: str, states: tuple[str, ...], dry_run: bool) -> None:
    """Delete the jobs in these states that have not changed for a while."""
    cutoff = time.time() - _age(older_than)
    client = _client()
    jobs, total = _call(client.jobs, list(states), 1000)
    old = [j for j in jobs if j["updated_at"] < cutoff]
    for j in old:
        if not dry_run:
            _call(client.remove, j["id"])
        click.echo(f"{'would remove' if dry_run else 'removed'} {j['id']} ({j['state']}, "
                   f"last changed {time.strftime('%Y-%m-%d %H:%M', time.localtime(j['updated_at']))})")
    click.echo(f"{len(old)} of {total} {'/'.join(states)} jobs {'would be ' if dry_run else ''}removed")


@main.command(epilog=JOB_HELP)
@click.argument("job_id", metavar="JOB")
@click.option("--wait", is_flag=True, help="then follow it like `relay watch` until it ends or pauses")
@click.option("--json", "as_json", is_flag=True)
def resume(job_id: str, wait: bool, as_json: bool) -> None:
    """Resume a paused, failed or cancelled job from its last good checkpoint."""
    client = _client()
    job = _call(client.action, job_id, "resume")
    click.echo(json.dumps(job) if as_json else f"{job['id']}: {job['state']}")
    if wait:
        job = watch_job(lambda: _call(client.job, job["id"]), 1.0)
        sys.exit(_exit_for(job["state"]))


for _verb in ("cancel", "pause"):
    _action(_verb)


@main.command(epilog=JOB_HELP)
@click.argument("job_id", metavar="JOB")
@click.option("--epochs", type=click.IntRange(1), required=True, help="the job's new number of epochs")
@click.option("--json", "as_json", is_flag=True)
def extend(job_id: str, epochs: int, as_json: bool) -> None:
    """Train a succeeded job on to more epochs (from its final full state) and evaluate it again."""
    job = _call(_client().extend, job_id, epochs)
    click.echo(json.dumps(job) if as_json else f"{job['id']}: {job['state']}, to {job['spec']['epochs']} epochs")


@main.command(epilog=JOB_HELP)
@click.argument("job_id", metavar="JOB")
@click.option("--json", "as_json", is_flag=True)
def report(job_id: str, as_json: bool) -> None:
    """The evaluation: mIoU, pixel accuracy, per-class IoU, the prediction picture. Exits 6 if
    there is none yet."""
    rep = _call(_client().report, job_id, conflict=EXIT_NOT_READY)
    click.echo(json.dumps(rep)) if as_json else print_report(rep)


# ---- services -----------------------------------------------------------------------------


@main.command()
@click.option("--queues", default="cpu", show_default=True, help="comma-separated: cpu, gpu")
@click.option("--name", default=None, help="node name (default: host.pid)")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--max-runtime", default=None, metavar="DURATION",
              help="stop before this much time has passed (e.g. 11h30m), committing the chunk in flight")
@click.option("--exit-when-idle", default=None, metavar="DURATION",
              help="stop after this long with nothing to do (e.g. 10m)")
def worker(queues: str, name: str | None, loglevel: str, max_runtime: str | None, exit_when_idle: str | None) -> None:
    """Start a worker: one chunk at a time, from the given queues. SIGTERM (docker stop, a spot
    notice) ends the chunk in flight at its next step and commits it; a second one loses it."""
    import socket

    from worker.lifetime import Lifetime, parse_duration

    limits: dict[str, float | None] = {}
    for option, value in (("--max-runtime", max_runtime), ("--exit-when-idle", exit_when_idle)):
        try:
            limits[option] = parse_duration(value) if value else None
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=option) from None

    node = name or os.environ.get("RELAY_NODE") or f"{socket.gethostname()}.{os.getpid()}"
    queue_list = [q.strip() for q in queues.split(",") if q.strip()]
    # Pool children build their settings from the environment: hand them ours.
    os.environ["RELAY_NODE"] = node
    os.environ["RELAY_QUEUES"] = json.dumps(queue_list)
    from worker.app import make_app

    settings = Settings()
    click.echo(f"relay worker {node}: {_where(settings, queue_list)}", err=True)
    _check_settings(settings)
    _warn_empty_embedded(settings)
    argv = ["worker", "-Q", ",".join(queue_list), "-n", f"relay@{node}", "-c", "1", "-P", "prefork", f"--loglevel={loglevel}"]
    if settings.embedded:
        argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    Lifetime(settings.caches, node, limits["--max-runtime"], limits["--exit-when-idle"]).install()
    try:
        make_app(settings).worker_main(argv)
    except SystemExit as exc:  # how Celery ends: its shutdown is complete (task done, messages restored)
        code = exc.code
    else:
        code = 0
    # What is left at interpreter exit is billiard's pool finalizer joining its idle handler
    # threads, each in a sleep of up to a second: ~2.4 s of every worker's stop, doing nothing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)


@main.command()
@click.option("--host", default=None, help="default: RELAY_HOST or 127.0.0.1")
@click.option("--port", type=int, default=None, help="default: RELAY_PORT or 8000")
@click.option("--access-log", is_flag=True, help="log every HTTP request (off: the dashboard polls every 2 s)")
def scheduler(host: str | None, port: int | None, access_log: bool) -> None:
    """Start the scheduler: the API (and dashboard) plus the reconciler."""
    import uvicorn

    from scheduler.api import make_api
    from worker.broker import QUEUES
    from scheduler.control import Control
    from scheduler.reconciler import Reconciler

    settings = Settings()
    host, port = host or settings.host, port or settings.port
    url_host = f"[{host}]" if ":" in host else host
    click.echo(f"relay scheduler: {_where(settings, list(QUEUES))}; dashboard and API at http://{url_host}:{port}/", err=True)
    _check_settings(settings)
    control = Control(settings)
    app = make_api(settings, control)
    reconciler = Reconciler(control.store, control.broker, control.leases, settings.reconcile_interval_s, settings.reconcile_grace_s)
    reconciler.start()
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=access_log)
    reconciler.stop()


@main.command(epilog=JOB_HELP)
@spec_options
@click.option("--workers", type=click.IntRange(1, 16), default=1, show_default=True, help="local worker processes")
@click.option("--log-every", type=click.FloatRange(0), default=0.0, show_default=True,
              help="without a terminal: a line per chunk, or at most one per this many seconds")
@click.option("--attach", "attach", metavar="JOB", default=None,
              help="pick up a job run here before (paused, stopped or left running) instead of submitting one")
@click.option("--detach", is_flag=True, help="on Ctrl-C leave the job running (no worker trains it until you attach) "
                                             "instead of pausing it")
def run(workers: int, log_every: float, attach: str | None, detach: bool, **kw: Any) -> None:
    """Run a job start to end on the embedded default (no Redis, no Docker): print the evaluation
    and the final weights' path. Ctrl-C pauses the job once the chunk in flight has stopped at its
    next step and committed (exit 7); `relay run --attach JOB` continues it."""
    from scheduler.control import AmbiguousJob, Control, SpecRejected, TransitionRefused
    from segmodel.jobs import JobNotFound
    from scheduler.reconciler import Reconciler

    storage = os.environ.get("RELAY_STORAGE", "")
    if is_remote(storage):
        _fail(f"relay run trains on the embedded default, whose queue lives in the storage folder, so it needs a local "
              f"RELAY_STORAGE (got {storage}); with a bucket, start `relay scheduler` and `relay worker` "
              f"with RELAY_BROKER_URL, then `relay submit` and `relay watch`", EXIT_BAD_INPUT)
    settings = Settings().model_copy(update={"broker_url": None})
    control = Control(settings)
    if attach is None:
        spec = _spec(kw)
        try:
            job_id, _ = control.submit(spec)
        except SpecRejected as exc:
            _fail(str(exc), EXIT_BAD_INPUT)
    else:
        try:
            job_id = control.resolve(attach)
            spec = control.store.spec(job_id)
            if control.store.state(job_id).status.value in ("paused", "failed", "cancelled"):
                control.resume(job_id)
        except JobNotFound as exc:
            _fail(f"{exc} in {settings.storage} (RELAY_STORAGE)", EXIT_NOT_FOUND)
        except (AmbiguousJob, TransitionRefused) as exc:
            _fail(str(exc), EXIT_BAD_INPUT)
    state = control.store.state(job_id)
    verb = "attached" if attach else "submitted"
    click.echo(f"job {job_id}: {verb}, {state.n_chunks} chunks, at step {state.step}/{state.total_steps}; "
               f"{_where(settings, [spec.queue])}")
    procs = _embedded_workers(settings, spec.queue, workers) if not state.status.final else []
    reconciler = Reconciler(control.store, control.broker, control.leases, settings.reconcile_interval_s, settings.reconcile_grace_s)
    reconciler.start()
    try:
        try:
            job = watch_job(lambda: control.view(job_id), 0.5, log_every)
        except KeyboardInterrupt:
            job = _interrupted(control, job_id, detach)
        if job["state"] == "succeeded":  # shown now: the workers' warm shutdown below takes seconds
            report = control.store.read(job_id, "eval/report.json")
            if report is None:
                _fail(f"job {job_id} succeeded but its report {control.store.where(job_id, 'eval/report.json')} cannot be read", EXIT_INFRA)
            print_report(json.loads(report))
            click.echo(f"final weights: {control.store.where(job_id, f'weights/weight{spec.epochs}.pt')}")
            click.echo(f"job {job_id} succeeded in {time.time() - job['created_at']:.0f} s")
    finally:
        reconciler.stop()
        _stop(procs)
    if job["state"] == "paused" or (detach and job["state"] in ("queued", "running")):
        left = "paused" if job["state"] == "paused" else f"left {job['state']} with no worker"
        click.echo(f"job {job_id} {left} at step {job['progress']['step']}/{job['progress']['total_steps']}; "
                   f"continue with: relay run --attach {job_id}   (or, with a scheduler: relay resume {job_id} --wait)")
        sys.exit(EXIT_PAUSED)
    if job["state"] != "succeeded":
        _fail(f"job {job_id} {job['state']}: {job['reason'] or job['last_error']}", EXIT_FAILED)


def _embedded_workers(settings: Settings, queue: str, n: int) -> list[subprocess.Popen[bytes]]:
    """Local `relay worker` processes, each in its own session: Ctrl-C reaches `relay run` only,
    which decides what the workers do."""
    env = {k: v for k, v in os.environ.items() if k != "RELAY_BROKER_URL"}
    env["RELAY_STORAGE"] = str(settings.storage)
    logs = settings.storage / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(n):
        name = f"embedded-{i + 1}"
        with open(logs / f"{name}.log", "ab") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "scheduler.cli", "worker", "--queues", queue,
                                           "--name", name], env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    click.echo(f"{n} worker(s) started; logs in {logs}")
    return procs


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Warm shutdown: a worker finishes the chunk it trains; one that takes too long is killed."""
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _interrupted(control: Any, job_id: str, detach: bool) -> dict[str, Any]:
    """Ctrl-C: pause (unless detaching), then wait for the chunk in flight to stop at its next step
    and commit, so no work is lost. A second Ctrl-C stops waiting: the steps since the chunk's
    last commit are trained again."""
    from scheduler.control import TransitionRefused

    if detach:
        click.echo(f"\ninterrupted: leaving job {job_id} as it is; stopping the local workers", err=True)
        return control.view(job_id)
    try:
        control.pause(job_id)
    except TransitionRefused:
        return control.view(job_id)  # it ended meanwhile
    click.echo(f"\ninterrupted: pausing job {job_id}: the chunk in flight stops at its next step and commits (Ctrl-C again: don't wait)",
               err=True)
    try:
        while control.leases.holder(job_id) is not None:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    return control.view(job_id)


if __name__ == "__main__":
    main()
