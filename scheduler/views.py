"""How jobs, queues and reports look in a terminal (rich)."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console()
FINAL = {"succeeded", "failed", "cancelled"}


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _progress(job: dict[str, Any]) -> str:
    p = job["progress"]
    return f"epoch {p['epoch']:.2f}/{p['epochs']}  step {p['step']}/{p['total_steps']}  chunk {p['chunk']}/{p['n_chunks']}"


def print_status(queue: dict[str, Any], jobs: list[dict[str, Any]]) -> None:
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
    table = Table("job", "state", "progress", "loss", "eta", "reason", title=f"{len(jobs)} jobs", title_justify="left")
    for j in jobs:
        loss = f"{j['last_loss']:.4f}" if j["last_loss"] is not None else "-"
        table.add_row(j["id"], j["state"], _progress(j), loss, _eta(j["eta_s"]), j["reason"] or j["last_error"] or "")
    console.print(table)


def print_job(job: dict[str, Any]) -> None:
    console.print(f"[bold]{job['id']}[/]  {job['state']}  {_progress(job)}")
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


def watch_job(fetch: Callable[[], dict[str, Any]], interval: float) -> dict[str, Any]:
    """Poll a job and show a progress bar with loss and ETA until it ends; returns its last view."""
    job = fetch()
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(job["id"], total=job["progress"]["total_steps"], info="")
        while True:
            loss = f"loss {job['last_loss']:.4f}" if job["last_loss"] is not None else "loss -"
            bar.update(task, completed=job["progress"]["step"],
                       info=f"{job['state']}  {_progress(job)}  {loss}  eta {_eta(job['eta_s'])}")
            if job["state"] in FINAL or job["state"] == "paused":
                return job
            time.sleep(interval)
            job = fetch()
