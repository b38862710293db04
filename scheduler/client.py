"""The CLI's client for the API at RELAY_API_URL."""
from __future__ import annotations

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
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(0, f"cannot reach the Relay API at {self.http.base_url} ({exc}); is `relay scheduler` running? (RELAY_API_URL)") from exc
        if response.status_code >= 500:
            raise ApiError(response.status_code, f"the Relay API failed (HTTP {response.status_code}): {_message(response)}")
        if response.status_code >= 400:
            raise ApiError(response.status_code, _message(response))
        return response.json()

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/api/jobs", json=spec)

    def jobs(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/jobs")

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/jobs/{job_id}")

    def action(self, job_id: str, verb: str) -> dict[str, Any]:
        return self._call("POST", f"/api/jobs/{job_id}/{verb}")

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
