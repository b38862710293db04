"""Finding jobs: by id, name, unique prefix or `last`; listing with filters and pages; what a
missing job, a job not ready yet and an epoch that will never exist answer (API and CLI)."""
from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conftest import Procs
from scheduler.api import make_api
from worker.settings import Settings


@pytest.fixture
def client(tmp_path: Path, tiny_data: dict[str, Path]) -> TestClient:
    return TestClient(make_api(Settings(storage=tmp_path / "storage")))


def submit(client: TestClient, data: dict[str, Path], **extra: object) -> dict:
    r = client.post("/api/jobs", json={"train": str(data["train"]), "val": str(data["val"]), "epochs": 3,
                                       "pretrained": False, **extra})
    assert r.status_code == 201, r.text
    return r.json()


def test_jobs_by_id_name_prefix_and_last(client: TestClient, tiny_data: dict[str, Path]) -> None:
    a = submit(client, tiny_data, name="baseline")
    b = submit(client, tiny_data)
    assert a["spec"]["name"] == "baseline" and b["spec"]["name"] is None
    assert client.get("/api/jobs/baseline").json()["id"] == a["id"]
    assert client.get(f"/api/jobs/{a['id']}").json()["id"] == a["id"]
    assert client.get("/api/jobs/last").json()["id"] == b["id"]
    assert client.get("/api/jobs/-").json()["id"] == b["id"]
    # Both ids start with the date: a short prefix is ambiguous and names both, a long one is not.
    common = a["id"][:9]
    r = client.post(f"/api/jobs/{common}/pause")
    assert r.status_code == 400 and a["id"] in r.text and b["id"] in r.text
    unique = next(b["id"][:n] for n in range(1, len(b["id"]) + 1) if not a["id"].startswith(b["id"][:n]))
    assert client.post(f"/api/jobs/{unique}/pause").json()["id"] == b["id"]
    assert client.get(f"/api/jobs/{b['id']}").json()["state"] == "paused"
    assert client.get("/api/jobs/nothing-like-it").status_code == 404
    # A name is unique among jobs, and must start with a letter (ids start with digits).
    r = client.post("/api/jobs", json={"train": str(tiny_data["train"]), "val": str(tiny_data["val"]), "name": "baseline"})
    assert r.status_code == 422 and "name" in r.text and a["id"] in r.text
    # A retried submit under one Idempotency-Key answers with the named job it made.
    body = {"train": str(tiny_data["train"]), "val": str(tiny_data["val"]), "epochs": 3, "pretrained": False, "name": "keyed"}
    made = client.post("/api/jobs", json=body, headers={"Idempotency-Key": "k-1"})
    again = client.post("/api/jobs", json=body, headers={"Idempotency-Key": "k-1"})
    assert made.status_code == 201 and again.status_code == 200 and again.json()["id"] == made.json()["id"]
    assert client.post("/api/jobs", json=body, headers={"Idempotency-Key": "k-2"}).status_code == 422
    r = client.post("/api/jobs", json={"train": str(tiny_data["train"]), "val": str(tiny_data["val"]), "name": "2024-run"})
    assert r.status_code == 422 and "name" in r.text


def test_job_list_filters_and_pages(client: TestClient, tiny_data: dict[str, Path]) -> None:
    ids = [submit(client, tiny_data)["id"] for _ in range(5)]
    client.post(f"/api/jobs/{ids[1]}/cancel")
    client.post(f"/api/jobs/{ids[3]}/cancel")
    r = client.get("/api/jobs", params={"limit": 2})
    assert [j["id"] for j in r.json()] == ids[::-1][:2] and r.headers["x-total-count"] == "5"
    r = client.get("/api/jobs", params={"limit": 2, "offset": 4})
    assert [j["id"] for j in r.json()] == [ids[0]]
    r = client.get("/api/jobs", params={"state": "cancelled"})
    assert [j["id"] for j in r.json()] == [ids[3], ids[1]] and r.headers["x-total-count"] == "2"
    r = client.get("/api/jobs", params=[("state", "cancelled"), ("state", "queued")])
    assert len(r.json()) == 5
    assert client.get("/api/jobs", params={"state": "sleeping"}).status_code == 422
    assert client.get("/api/jobs", params={"limit": 0}).status_code == 422


def test_not_found_not_ready_and_never(client: TestClient, tiny_data: dict[str, Path]) -> None:
    job = submit(client, tiny_data)
    assert client.get("/api/jobs/19990101-000000-abcdef/weights").status_code == 404
    r = client.get(f"/api/jobs/{job['id']}/weights", params={"epoch": 2})
    assert r.status_code == 409 and "epoch 2 yet" in r.text
    r = client.get(f"/api/jobs/{job['id']}/weights", params={"epoch": 9})
    assert r.status_code == 422 and "never" in r.text and "3 epochs" in r.text
    assert client.get(f"/api/jobs/{job['id']}/report").status_code == 409
    assert client.get("/api/jobs/19990101-000000-abcdef/report").status_code == 404


def test_pausing_until_the_chunk_in_flight_commits(client: TestClient, tiny_data: dict[str, Path]) -> None:
    job = submit(client, tiny_data)
    control = client.app.state.control
    token = control.leases.acquire(job["id"], "w9")  # a worker trains the chunk in flight
    assert client.post(f"/api/jobs/{job['id']}/pause").json()["state"] == "pausing"
    assert client.get(f"/api/jobs/{job['id']}").json()["worker"] == "w9"
    assert [j["id"] for j in client.get("/api/jobs", params={"state": "paused"}).json()] == [job["id"]]
    assert client.delete(f"/api/jobs/{job['id']}").status_code == 409  # its chunk is still in flight
    control.leases.release(job["id"], token)  # committed
    assert client.get(f"/api/jobs/{job['id']}").json()["state"] == "paused"


def test_delete_refused_while_active_then_frees_everything(client: TestClient, tiny_data: dict[str, Path], tmp_path: Path) -> None:
    job = submit(client, tiny_data, name="doomed")
    r = client.delete("/api/jobs/doomed")
    assert r.status_code == 409 and "queued" in r.text
    client.post("/api/jobs/doomed/cancel")
    assert client.delete("/api/jobs/doomed").status_code == 204
    assert client.get(f"/api/jobs/{job['id']}").status_code == 404
    assert not (tmp_path / "storage" / "jobs" / job["id"]).exists()
    assert [p.name for p in (tmp_path / "storage" / "jobs").iterdir() if not p.name.startswith(".lock")] == []
    assert submit(client, tiny_data, name="doomed")["spec"]["name"] == "doomed"  # the name is free again
    assert client.delete("/api/jobs/nosuchjob").status_code == 404


@pytest.mark.e2e
def test_cli_lookup_and_exit_codes(procs: Procs, tiny_data: dict[str, Path], tmp_path: Path) -> None:
    """A real scheduler (embedded: no broker, no workers); the CLI's answers and exit codes."""
    procs.env["RELAY_API_URL"] = procs.start_scheduler()
    args = ["--train", str(tiny_data["train"]), "--val", str(tiny_data["val"]), "--epochs", "3", "--no-pretrained"]
    first = procs.relay("submit", *args, "--name", "first").stdout.strip()
    second = procs.relay("submit", *args).stdout.strip()
    assert procs.relay("status", "first", "--json").stdout.count(first) >= 1
    assert second in procs.relay("status", "last").stdout
    assert "first" in procs.relay("status").stdout  # the names column
    paused = procs.relay("pause", second[:-1])  # a unique prefix
    assert paused.stdout.strip() == f"{second}: paused"
    ambiguous = procs.relay("pause", first[:4], check=False)
    assert ambiguous.returncode == 2 and first in ambiguous.stderr and second in ambiguous.stderr
    missing = procs.relay("report", "nosuchjob", check=False)
    assert missing.returncode == 3 and "no job" in missing.stderr
    not_yet = procs.relay("report", "first", check=False)
    assert not_yet.returncode == 6 and "no evaluation yet" in not_yet.stderr
    not_yet = procs.relay("fetch", "first", "-o", str(tmp_path), "--epoch", "2", check=False)
    assert not_yet.returncode == 6 and "yet" in not_yet.stderr
    never = procs.relay("fetch", "first", "-o", str(tmp_path), "--epoch", "9", check=False)
    assert never.returncode == 2 and "never" in never.stderr
    watched = procs.relay("watch", second, "--interval", "0.1", check=False)
    assert watched.returncode == 7 and f"job {second}: paused" in watched.stdout
    listed = procs.relay("status", "--state", "paused", "--limit", "5").stdout
    assert second in listed and first not in listed
    assert procs.relay("--version").stdout.startswith("relay, version ")
    # rm: refused while queued; prune: old enough jobs in the given states only.
    refused = procs.relay("rm", "first", check=False)
    assert refused.returncode == 2 and "queued" in refused.stderr
    dry = procs.relay("prune", "--older-than", "1s", "--state", "paused", "--dry-run").stdout
    assert f"would remove {second}" in dry and first not in dry
    assert procs.relay("prune", "--older-than", "1w", "--state", "paused").stdout.startswith("0 of 1 ")
    assert f"removed {second}" in procs.relay("prune", "--older-than", "1s", "--state", "paused").stdout
    assert procs.relay("status", second, check=False).returncode == 3
    procs.relay("cancel", "first")
    assert procs.relay("rm", "first").stdout.strip() == f"removed {first}"
    assert procs.relay("prune", "--older-than", "soon", check=False).returncode == 2
