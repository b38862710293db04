"""How jobs, queues and reports look in a terminal (rich)."""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console()
if not console.is_terminal and "COLUMNS" not in os.environ:
    console = Console(width=200)  # a pipe or a log: rich's 80 columns would cut job ids
FINAL = {"succeeded", "failed", "cancelled"}
STOPPED = FINAL | {"paused"}  # watching ends here


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _progress(job: dict[str, Any]) -> str:
    p = job["progress"]
    return f"epoch {p['epoch']:.2f}/{p['epochs']}  step {p['step']}/{p['total_steps']}  chunk {p['chunk']}/{p['n_chunks']}"


def print_status(queue: dict[str, Any], jobs: list[dict[str, Any]], total: int | None = None) -> None:
    depths = "  ".join(f"{q}: {'unknown' if n is None else n} waiting" for q, n in queue["queues"].items())
    console.print(f"[bold]queues[/]  {depths}")
    if queue.get("broker_error"):
        console.print(f"[yellow]queue depths and lease holders unknown:[/] {queue['broker_error']}")
    workers = Table("worker", "queues", "doing", "since", title=f"{len(queue['workers'])} workers online", title_justify="left")
    for w in queue["workers"]:
        doing = f"{w['job']} chunk {w['chunk']}" if w.get("job") else "idle"
        since = f"{time.time() - w['since']:.0f} s" if w.get("since") else ""
        workers.add_row(w["node"], ",".join(w["queues"]), doing, since)
    console.print(workers)
    for w in queue["workers"]:
        if w.get("problem"):
            console.print(f"[yellow]{w['node']}:[/] {w['problem']['what']} "
                          f"({time.strftime('%H:%M:%S', time.localtime(w['problem']['at']))})")
    for w in queue.get("lost_workers", []):
        doing = f", was training {w['job']} chunk {w['chunk']}" if w.get("job") else ""
        console.print(f"[red]lost:[/] worker {w['node']} stopped heartbeating {_eta(time.time() - w['lost_at'])} ago "
                      f"({time.strftime('%H:%M:%S', time.localtime(w['lost_at']))}){doing}")
    for warning in queue.get("warnings", []):
        console.print(f"[yellow]warning:[/] {warning['message']}")
    shown = f"{len(jobs)} jobs" if total is None or total == len(jobs) else f"newest {len(jobs)} of {total} jobs"
    table = Table("job", "name", "state", "progress", "loss", "eta", "reason", title=shown, title_justify="left")
    for j in jobs:
        loss = f"{j['last_loss']:.4f}" if j["last_loss"] is not None else "-"
        table.add_row(j["id"], j["spec"].get("name") or "", j["state"], _progress(j), loss, _eta(j["eta_s"]), j["reason"] or j["last_error"] or "")
    console.print(table)


def print_job(job: dict[str, Any]) -> None:
    name = f" ({job['spec']['name']})" if job["spec"].get("name") else ""
    console.print(f"[bold]{job['id']}[/]{name}  {job['state']}  {_progress(job)}")
    worker = "unknown" if job.get("broker_error") else job["worker"] or "-"
    if job["last_loss"] is not None:
        console.print(f"last loss {job['last_loss']:.4f}   eta {_eta(job['eta_s'])}   worker {worker}")
    if job.get("broker_error"):
        console.print(f"[yellow]worker unknown:[/] {job['broker_error']}")
    if job["reason"]:
        console.print(f"[red]reason:[/] {job['reason']}")
    table = Table("chunk", "steps", "worker", "attempt", "seconds", "loss", "img/s", "device", title="chunks", title_justify="left")
    for h in job["history"]:
        table.add_row(str(h["chunk"]), f"{h['start_step']}-{h['end_step']}", h["worker"], str(h["attempt"]),
                      f"{h['seconds']:.1f}", f"{h['loss_last']:.4f}", f"{h['images_per_s']:.1f}", str(h["environment"].get("device", "")))
    console.print(table)


def print_report(report: dict[str, Any]) -> None:
    console.print(f"[bold]mean IoU[/] {report['mean_iou']:.4f}   [bold]pixel accuracy[/] {report['pixel_accuracy']:.4f}   "
                  f"({report['classes_evaluated']} classes, {report['val_samples']} validation images)")
    table = Table("class", "IoU", "gt pixels", "predicted pixels")
    for c in sorted((c for c in report["per_class"] if c["iou"] is not None), key=lambda c: -c["iou"]):
        table.add_row(f"{c['id']} {c['name']}", f"{c['iou']:.4f}", str(c["gt_pixels"]), str(c["pred_pixels"]))
    console.print(table)
    console.print(f"predictions: {report['predictions_png']}")


def _speed(job: dict[str, Any]) -> str:
    done = [h for h in job["history"] if h["seconds"] > 0]
    return f"{done[-1]['images_per_s']:.1f} img/s" if done else "- img/s"


def progress_line(job: dict[str, Any]) -> str:
    """One self-contained, labelled line: what a log file, a pipe or a notebook shows."""
    p = job["progress"]
    loss = f"{job['last_loss']:.4f}" if job["last_loss"] is not None else "-"
    return (f"{_who(job)}: {job['state']}  step {p['step']}/{p['total_steps']} ({100 * p['fraction']:.0f}%)  "
            f"epoch {p['epoch']:.2f}/{p['epochs']}  chunk {p['chunk']}/{p['n_chunks']}  loss {loss}  "
            f"speed {_speed(job)}  eta {_eta(job['eta_s'])}")


def _who(job: dict[str, Any]) -> str:
    name = f" ({job['spec']['name']})" if job["spec"].get("name") else ""
    return f"{time.strftime('%H:%M:%S')} job {job['id']}{name}"


def chunk_line(job: dict[str, Any], h: dict[str, Any]) -> str:
    """The line for one committed chunk."""
    p = job["progress"]
    spe = p["total_steps"] / p["epochs"]
    steps = h["end_step"] - h["start_step"]
    return (f"{_who(job)}: chunk {h['chunk'] + 1}/{p['n_chunks']} done ({h.get('ended', 'steps')}, "
            f"{steps} step{'' if steps == 1 else 's'})  step {h['end_step']}/{p['total_steps']} "
            f"({100 * h['end_step'] / p['total_steps']:.0f}%)  epoch {h['end_step'] / spe:.2f}/{p['epochs']}  "
            f"loss {h['loss_last']:.4f}  speed {h['images_per_s']:.1f} img/s  eta {_eta(job['eta_s'])}")


def _watch_plain(fetch: Callable[[], dict[str, Any]], interval: float, every_s: float) -> dict[str, Any]:
    """A line per committed chunk (with every_s > 0: at most one line per every_s seconds, for the
    newest chunk), and one whenever the state changes (queued, running, paused, succeeded, ...)."""
    seen, shown_state, shown_at = None, None, -float("inf")
    while True:
        job = fetch()
        history = job["history"]
        if seen is None or len(history) < seen:
            seen = len(history)  # what was done before we looked is not news
        now = time.monotonic()
        if len(history) > seen and now - shown_at >= every_s:
            for h in history[seen:] if every_s == 0 else history[-1:]:
                print(chunk_line(job, h), flush=True)
            seen, shown_at = len(history), now
        if job["state"] != shown_state:
            print(progress_line(job), flush=True)
            shown_state = job["state"]
        if job["state"] in STOPPED:
            return job
        time.sleep(interval)


def watch_job(fetch: Callable[[], dict[str, Any]], interval: float, every_s: float = 0.0) -> dict[str, Any]:
    """Follow a job until it ends or is paused; returns its last view. A terminal gets a live
    progress bar; anything else (a pipe, a log file, CI) gets plain lines (see _watch_plain)."""
    if not console.is_terminal:
        return _watch_plain(fetch, interval, every_s)
    job = fetch()
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(job["id"], total=job["progress"]["total_steps"], info="")
        while True:
            loss = f"loss {job['last_loss']:.4f}" if job["last_loss"] is not None else "loss -"
            bar.update(task, completed=job["progress"]["step"],
                       info=f"{job['state']}  {_progress(job)}  {loss}  {_speed(job)}  eta {_eta(job['eta_s'])}")
            if job["state"] in STOPPED:
                return job
            time.sleep(interval)
            job = fetch()
