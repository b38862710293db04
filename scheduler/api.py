"""The HTTP API under /api (FastAPI; OpenAPI at /openapi.json). The root path is the dashboard's."""
from __future__ import annotations

import hmac
import json
import re
from collections.abc import Callable
from typing import Any

import redis
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from kombu.exceptions import OperationalError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from scheduler.bodylimit import BodyLimit
from scheduler.control import AmbiguousJob, Control, SpecRejected, TransitionRefused
from scheduler.health import BrokerDown
from segmodel.jobs import IdempotencyConflict, JobNotFound, JobStatus
from scheduler.responses import AsciiJSONResponse
from scheduler.web import list_files, mount_dashboard
from segmodel.spec import TrainSpec
from segmodel.storage import StorageError
from worker.settings import Settings


IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


class Extend(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(ge=1, le=10_000, description="the job's new number of epochs, above its current one")


def _rejected(exc: SpecRejected) -> HTTPException:
    return HTTPException(422, [{"loc": ["body", exc.field], "msg": exc.message, "type": "value_error"}])


def make_api(settings: Settings, control: Control | None = None) -> FastAPI:
    control = control or Control(settings)

    def require_read_token(request: Request) -> None:
        if request.url.path != "/healthz":
            require_token(request)
    api = FastAPI(title="Relay", version="0.1.0", description="A job queue for chunked deep-learning training.",
                  default_response_class=AsciiJSONResponse,
                  dependencies=[Depends(require_read_token)] if settings.api_token_reads else [])
    api.state.control = control

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return AsciiJSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    async def broker_down(request: Request, exc: Exception) -> Response:
        why = str(exc) if isinstance(exc, BrokerDown) else f"{control.guard.where} unreachable ({exc.__class__.__name__}: {exc})"
        return AsciiJSONResponse({"detail": why}, status_code=503)

    async def storage_down(request: Request, exc: Exception) -> Response:
        return AsciiJSONResponse({"detail": f"storage {settings.storage} unusable ({exc.__class__.__name__}: {exc})"},
                                 status_code=503)

    for error in (BrokerDown, redis.RedisError, OperationalError):
        api.add_exception_handler(error, broker_down)
    for error in (OSError, StorageError):
        api.add_exception_handler(error, storage_down)

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return AsciiJSONResponse({"detail": jsonable_encoder(exc.errors())}, status_code=422)

    api.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)

    def require_token(request: Request) -> None:
        """Changes need the bearer token when one is configured; compared in constant time."""
        if not settings.api_token:
            return
        given = request.headers.get("authorization", "")
        expected = f"Bearer {settings.api_token}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer $RELAY_API_TOKEN)",
                                headers={"WWW-Authenticate": "Bearer"})

    def found(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except JobNotFound as exc:
            raise HTTPException(404, str(exc)) from exc
        except TransitionRefused as exc:
            raise HTTPException(409, str(exc)) from exc
        except AmbiguousJob as exc:
            raise HTTPException(400, str(exc)) from exc

    def resolved(ref: str) -> str:
        """Every route takes an id, a name, `last`/`-` or a unique id prefix."""
        return found(lambda: control.resolve(ref))

    @api.get("/healthz")
    def healthz() -> Response:
        """Broker and storage each checked; 200 when both work, 503 ("degraded") when either fails."""
        report = control.health()
        return AsciiJSONResponse(report, status_code=200 if report["ok"] else 503)

    @api.post("/api/jobs", status_code=201, dependencies=[Depends(require_token)],
              responses={200: {"description": "the job this Idempotency-Key already made"}})
    def submit(spec: TrainSpec, idempotency_key: str | None = Header(
            None, description="any unique string (e.g. a UUID), up to 255 printable ASCII characters: a retry "
                              "with the same key and spec answers with the job the first try made")) -> Response:
        """Paths (train, val, init_weights) are the scheduler's; init_weights is checked against the
        job's model and copied into the job, with its sha256, before the job exists."""
        if idempotency_key is not None and not IDEMPOTENCY_KEY.fullmatch(idempotency_key):
            raise HTTPException(422, [{"loc": ["header", "Idempotency-Key"], "type": "value_error",
                                       "msg": "must be 1-255 printable ASCII characters (e.g. a UUID)"}])
        try:
            job_id, _, created = control.submit_once(spec, idempotency_key)
        except SpecRejected as exc:
            raise _rejected(exc) from exc
        except IdempotencyConflict as exc:
            raise HTTPException(422, [{"loc": ["header", "Idempotency-Key"], "msg": str(exc), "type": "value_error"}]) from exc
        return AsciiJSONResponse(control.view(job_id), status_code=201 if created else 200)

    @api.get("/api/jobs")
    def jobs(response: Response, state: list[JobStatus] = Query([], description="only jobs in these states"),
             limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)) -> list[dict[str, Any]]:
        """Jobs, newest first, `limit` from `offset`; the header X-Total-Count counts all that match."""
        out = []
        for job_id in reversed(control.store.ids()):
            try:
                view = control.view(job_id)
            except JobNotFound:
                continue  # removed while we looked
            if not state or view["state"] in state or (view["state"] == "pausing" and JobStatus.paused in state):
                out.append(view)
        out.sort(key=lambda j: -j["created_at"])
        response.headers["X-Total-Count"] = str(len(out))
        return out[offset:offset + limit]

    @api.get("/api/jobs/{job_id}")
    def job(job_id: str) -> dict[str, Any]:
        return found(lambda: control.view(resolved(job_id)))

    @api.delete("/api/jobs/{job_id}", status_code=204, dependencies=[Depends(require_token)])
    def remove(job_id: str) -> Response:
        """Delete a job and its files; 409 while it is queued or running."""
        job_id = resolved(job_id)
        found(lambda: control.remove(job_id))
        return Response(status_code=204)

    @api.post("/api/jobs/{job_id}/cancel", dependencies=[Depends(require_token)])
    def cancel(job_id: str) -> dict[str, Any]:
        job_id = resolved(job_id)
        found(lambda: control.cancel(job_id))
        return control.view(job_id)

    @api.post("/api/jobs/{job_id}/pause", dependencies=[Depends(require_token)])
    def pause(job_id: str) -> dict[str, Any]:
        job_id = resolved(job_id)
        found(lambda: control.pause(job_id))
        return control.view(job_id)

    @api.post("/api/jobs/{job_id}/resume", dependencies=[Depends(require_token)])
    def resume(job_id: str) -> dict[str, Any]:
        job_id = resolved(job_id)
        found(lambda: control.resume(job_id))
        return control.view(job_id)

    @api.post("/api/jobs/{job_id}/extend", dependencies=[Depends(require_token)])
    def extend(job_id: str, body: Extend) -> dict[str, Any]:
        """A succeeded job trains on to `epochs` from its final full-state checkpoint and is evaluated
        again; it ends bitwise equal to the job submitted with `epochs` (409 unless succeeded)."""
        job_id = resolved(job_id)
        try:
            found(lambda: control.extend(job_id, body.epochs))
        except SpecRejected as exc:
            raise _rejected(exc) from exc
        return control.view(job_id)

    @api.get("/api/jobs/{job_id}/weights")
    def weights(job_id: str, epoch: int | None = Query(None, ge=1)) -> Response:
        """404: no such job; 422: an epoch the job will never have; 409: not trained yet."""
        job_id = resolved(job_id)
        spec = found(lambda: control.store.spec(job_id))
        state = control.store.state(job_id)
        if epoch is not None and not spec.start_epoch < epoch <= spec.epochs:
            first = f" from epoch {spec.start_epoch + 1}" if spec.start_epoch else ""
            raise HTTPException(422, f"job {job_id} has {spec.epochs} epochs{first}: there will never be weights for epoch {epoch}")
        e = epoch if epoch is not None else min(spec.epochs, state.start_epoch + state.step // state.steps_per_epoch)
        data = control.store.read(job_id, f"weights/weight{e}.pt") if e >= 1 else None
        if data is None:
            raise HTTPException(409, f"job {job_id} has no weights for epoch {max(e, 1)} yet "
                                     f"({state.status.value}, at epoch {state.epoch:.2f} of {spec.epochs})")
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="weight{e}.pt"'})

    @api.get("/api/jobs/{job_id}/report")
    def report(job_id: str) -> dict[str, Any]:
        """404: no such job; 409: no evaluation yet."""
        job_id = resolved(job_id)
        state = found(lambda: control.store.state(job_id))
        data = control.store.read(job_id, "eval/report.json")
        if data is None:
            raise HTTPException(409, f"job {job_id} has no evaluation yet ({state.status.value})")
        return {**json.loads(data), "predictions_url": f"/api/jobs/{job_id}/predictions.png"}

    @api.get("/api/jobs/{job_id}/predictions.png")
    def predictions(job_id: str) -> Response:
        job_id = resolved(job_id)
        found(lambda: control.store.layout(job_id))
        data = control.store.read(job_id, "eval/predictions.png")
        if data is None:
            raise HTTPException(404, f"job {job_id} has no prediction picture yet")
        return Response(data, media_type="image/png")

    @api.get("/api/jobs/{job_id}/validation")
    def validation(job_id: str) -> list[dict[str, Any]]:
        """The validation curve (spec.val_every): mIoU and pixel accuracy per validated epoch; an
        epoch trained twice (a retried chunk) appears once, the latest."""
        job_id = resolved(job_id)
        found(lambda: control.store.state(job_id))
        by_epoch = {v["epoch"]: v for v in control.store.records(job_id, "validation")}
        return [by_epoch[k] for k in sorted(by_epoch)]

    @api.get("/api/jobs/{job_id}/metrics")
    def metrics(job_id: str, since_step: int = Query(0, ge=0)) -> list[dict[str, Any]]:
        """Per-step metrics; a step trained twice (a retried chunk) appears once, the latest."""
        job_id = resolved(job_id)
        found(lambda: control.store.state(job_id))
        by_step: dict[int, dict[str, Any]] = {}
        for m in control.store.records(job_id, "metrics"):
            if m.get("step", 0) > since_step:
                by_step[m["step"]] = m
        return [by_step[k] for k in sorted(by_step)]

    @api.get("/api/datasets")
    def datasets() -> dict[str, Any]:
        """List files (*.txt) under the data roots (RELAY_DATA_ROOTS), for the dashboard's new-job form."""
        return {"roots": [str(r) for r in settings.data_roots], "lists": list_files(settings.data_roots)}

    @api.get("/api/queue")
    def queue() -> dict[str, Any]:
        return control.queue()

    mount_dashboard(api)
    return api
