"""Relay's configuration: one validated object from defaults and RELAY_* environment variables."""
from __future__ import annotations

import socket
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RELAY_", extra="ignore")

    storage: Path | str = Field(
        Path("relay-storage"), description="jobs, checkpoints, reports: a shared folder, or s3://bucket/prefix (gs://)"
    )
    cache_dir: Path | None = Field(
        None, description="prepared-data and feature caches (a local or shared folder); default <storage>/cache"
    )
    broker_url: str | None = Field(
        None, description="redis://... ; unset = embedded filesystem transport under the storage root"
    )
    api_url: str = "http://127.0.0.1:8000"
    api_token: str | None = Field(None, description="bearer token the API requires for changes")
    api_token_reads: bool = Field(False, description="require the token for reads too")
    api_timeout_s: float = Field(30.0, gt=0, description="the CLI's wait for one API answer")
    api_retries: int = Field(
        4, ge=0, le=100, description="`relay submit` retries after no answer or a 5xx, with the same idempotency key"
    )
    max_request_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies get 413")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    node: str = Field(default_factory=socket.gethostname, description="this worker's name")
    queues: list[str] = Field(["cpu"], description="queues this worker consumes: cpu, gpu")
    lease_ttl_s: float = Field(30.0, gt=0, description="a lease not renewed for this long is dead")
    max_attempts: int = Field(3, ge=1, le=100, description="tries per chunk before the job fails")
    stall_timeout_s: float = Field(
        600.0, gt=0, description="a trainer that reports no progress (a step, a slice of a cache build) for this long, "
        "or for 10x its slowest interval so far, is hung: killed, and the chunk retried"
    )
    visibility_timeout_s: int = Field(
        7 * 24 * 3600, ge=1, description="Redis redelivers unacked messages after this; keep it above any chunk"
    )
    reconcile_interval_s: float = Field(5.0, gt=0)
    reconcile_grace_s: float = Field(
        20.0, ge=0, description="how long a running job may have no lease and no message before it is re-enqueued"
    )
    data_roots: list[Path] = Field(default_factory=list, description="list files must lie under one of these (empty: anywhere)")

    @field_validator("storage", mode="before")
    @classmethod
    def _absolute(cls, v: Path | str) -> Path | str:
        if isinstance(v, str) and v.startswith(("s3://", "gs://")):
            return v.rstrip("/")
        return Path(v).expanduser().resolve()

    @model_validator(mode="after")
    def _object_store_needs_a_broker(self) -> Settings:
        if isinstance(self.storage, str) and not self.broker_url:
            raise ValueError(f"RELAY_STORAGE={self.storage} needs RELAY_BROKER_URL: the embedded transport keeps "
                             f"its queue in a local folder")
        return self

    @property
    def caches(self) -> Path:
        """Local to this worker when storage is an object store (the default is ~/.cache/relay)."""
        if self.cache_dir:
            return self.cache_dir
        return self.storage / "cache" if isinstance(self.storage, Path) else Path("~/.cache/relay").expanduser()

    @property
    def embedded(self) -> bool:
        return not self.broker_url

    @property
    def heartbeat_s(self) -> float:
        return self.lease_ttl_s / 3
