"""A job's pushed dataset on this worker: fetched once into the local cache before the trainer runs,
and the spec the trainer gets pointed at the local copies (segmodel.datasets does the work).

The copies hold the same bytes as the pushed folder and the data order comes from (seed, epoch), so
a job trains to the same weights from them as from the folder itself.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from segmodel.datasets import fetch, is_remote, size_text
from segmodel.jobs import JobState, JobStore
from segmodel.spec import TrainSpec

log = logging.getLogger("relay.worker")


def localize(spec: TrainSpec, cache: Path, store: JobStore, job_id: str, node: str,
             heartbeat: Callable[[], None] = lambda: None) -> TrainSpec:
    """The spec with each s3:// list replaced by its local copy, fetched (and noted in the job's
    events) where this worker lacks it; `heartbeat` is called after every file (it keeps the
    job's lease through a long fetch). Raises DataError for data that fails the manifest,
    StorageError for a bucket that cannot be read."""
    update: dict[str, str] = {}
    for field in ("train", "val"):
        url = getattr(spec, field)
        if not is_remote(url):
            continue
        digest = getattr(spec, f"{field}_manifest_sha256")
        step = -1

        def progress(done: int, total: int, got: int, field: str = field) -> None:
            nonlocal step
            heartbeat()
            if done * 10 // total > step:
                step = done * 10 // total
                log.info("%s: fetching %s data: %d/%d files, %s", job_id, field, done, total, size_text(got))

        fetched = fetch(url, digest, cache, progress=progress)
        update[field] = str(fetched.list_file)
        if fetched.files:
            what = (f"{node} fetched {fetched.files} files, {size_text(fetched.bytes)} for {field} "
                    f"in {fetched.seconds:.1f} s")
            log.info("%s: %s", job_id, what)

            def note(s: JobState, what: str = what) -> None:
                s.note(what)

            store.update(job_id, note)
    return spec.model_copy(update=update)
