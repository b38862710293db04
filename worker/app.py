"""The Celery app: JSON only, late acks, requeue on a lost worker, one chunk at a time."""
from __future__ import annotations

from celery import Celery

from worker.redis_url import RedisTarget
from worker.settings import Settings

TRAIN_TASK = "relay.train_chunk"
EVAL_TASK = "relay.evaluate"


def broker_folders(settings: Settings) -> dict[str, str]:
    """The embedded transport's folders under the storage root (kombu filesystem://)."""
    root = settings.storage / "broker"
    folders = {"data_folder_in": root / "queue", "data_folder_out": root / "queue", "control_folder": root / "control"}
    for path in folders.values():
        path.mkdir(parents=True, exist_ok=True)
    return {k: str(v) for k, v in folders.items()}


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings()
    app = Celery("relay", include=["worker.tasks"])
    if settings.embedded:
        app.conf.broker_url = "filesystem://"
        app.conf.broker_transport = "worker.fstransport:Transport"
        # Polling every 0.1 s keeps the hand-off between chunks well under a second.
        app.conf.broker_transport_options = {**broker_folders(settings), "store_processed": False, "polling_interval": 0.1}
    else:
        target = RedisTarget.parse(settings.broker_url)
        app.conf.broker_url = target.url
        # rediss://: kombu takes the ssl module's constants, not the URL's spelling (and Flower needs this).
        app.conf.broker_use_ssl = target.kombu_ssl()
        # Redis redelivers any unacked message older than this, running or not: keep it above the
        # longest chunk. Liveness comes from the per-job lease, not from this timeout.
        app.conf.broker_transport_options = {"visibility_timeout": settings.visibility_timeout_s}
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_default_queue="cpu",
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # Events feed Flower; the filesystem transport has no use for them.
        worker_send_task_events=not settings.embedded,
        task_send_sent_event=not settings.embedded,
        worker_enable_remote_control=not settings.embedded,
    )
    app.relay_settings = settings  # type: ignore[attr-defined]
    return app


def __getattr__(name: str) -> Celery:
    """`celery -A worker.app` (Flower, plain celery commands) gets an app built from the environment."""
    if name == "app":
        global app
        app = make_app()
        return app
    raise AttributeError(name)
