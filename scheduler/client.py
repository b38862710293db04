"""The CLI's client for the API at RELAY_API_URL."""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _message(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        return response.text
    if isinstance(detail, list):  # FastAPI validation errors: name each field
        return "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:]) or 'body'}: {d.get('msg')}" for d in detail)
    return str(detail)


class Client:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0, retries: int = 0,
                 on_retry: Callable[[str], None] | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)
        self.retries = retries
        self.on_retry = on_retry or (lambda message: None)

    def _unreachable(self, exc: httpx.TransportError) -> ApiError:
        why = f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
        return ApiError(0, f"cannot reach the Relay API at {self.http.base_url} ({why}); is `relay scheduler` running? (RELAY_API_URL)")

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        return self._answer(response)

    def _answer(self, response: httpx.Response) -> Any:
        if response.status_code >= 500:
            raise ApiError(response.status_code, f"the Relay API failed (HTTP {response.status_code}): {_message(response)}")
        if response.status_code >= 400:
            raise ApiError(response.status_code, _message(response))
        return None if response.status_code == 204 else response.json()

    def submit(self, spec: dict[str, Any], key: str | None = None) -> dict[str, Any]:
        """Submit under an idempotency key, retrying after no answer (a timeout, a dropped
        connection) or a 5xx: the API answers a retry with the job the first try made, if it did."""
        headers = {"Idempotency-Key": key or str(uuid.uuid4())}
        attempt = 0
        while True:
            try:
                response = self.http.post("/api/jobs", json=spec, headers=headers)
            except httpx.TransportError as exc:
                if attempt >= self.retries:
                    raise self._unreachable(exc) from exc
                why = f"no answer from the API ({exc.__class__.__name__})"
            else:
                if response.status_code < 500 or attempt >= self.retries:
                    return self._answer(response)
                why = f"the API answered {response.status_code}"
            attempt += 1
            self.on_retry(f"{why}; retrying with the same idempotency key {headers['Idempotency-Key']} "
                          f"(try {attempt + 1} of {self.retries + 1})")
            time.sleep(min(2.0 ** (attempt - 1), 10.0))

    def jobs(self, states: list[str] | None = None, limit: int = 100) -> tuple[list[dict[str, Any]], int]:
        """The newest `limit` jobs (in `states`, if given) and how many match in all."""
        try:
            response = self.http.get("/api/jobs", params={"state": states or [], "limit": limit})
        except httpx.TransportError as exc:
            raise ApiError(0, f"cannot reach the Relay API at {self.http.base_url} ({exc}); is `relay scheduler` running? (RELAY_API_URL)") from exc
        if response.status_code >= 400:
            raise ApiError(response.status_code, _message(response))
        return response.json(), int(response.headers.get("x-total-count", len(response.json())))

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/jobs/{job_id}")

    def remove(self, job_id: str) -> None:
        self._call("DELETE", f"/api/jobs/{job_id}")

    def action(self, job_id: str, verb: str) -> dict[str, Any]:
        return self._call("POST", f"/api/jobs/{job_id}/{verb}")

    def extend(self, job_id: str, epochs: int) -> dict[str, Any]:
        return self._call("POST", f"/api/jobs/{job_id}/extend", json={"epochs": epochs})

    def report(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/jobs/{job_id}/report")

    def queue(self) -> dict[str, Any]:
        return self._call("GET", "/api/queue")

    def download_weights(self, job_id: str, out: Path | str, epoch: int | None = None) -> Path:
        """Stream weight<E>.pt to `out`: a file, or a folder (existing, or written with a trailing /)."""
        params = {"epoch": epoch} if epoch is not None else {}
        try:
            with self.http.stream("GET", f"/api/jobs/{job_id}/weights", params=params) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ApiError(response.status_code, _message(response))
                name = response.headers.get("content-disposition", "").split("filename=")[-1].strip('"') or "weights.pt"
                folder = str(out).endswith("/") or Path(out).is_dir()
                target = Path(out) / name if folder else Path(out)
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.part")
                with open(tmp, "wb") as f:
                    for block in response.iter_bytes():
                        f.write(block)
                tmp.replace(target)
                return target
        except httpx.TransportError as exc:
            raise ApiError(0, f"cannot reach the Relay API at {self.http.base_url} ({exc})") from exc
