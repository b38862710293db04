"""The API in-process: bad input gets a 4xx naming the field and changes nothing; tokens; fuzzing."""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from scheduler.api import make_api
from worker.settings import Settings


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")) if root.exists() else []:
        h.update(str(p.relative_to(root)).encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    return tmp_path / "storage"


@pytest.fixture
def client(storage: Path, tiny_data: dict[str, Path]) -> TestClient:
    settings = Settings(storage=storage, data_roots=[tiny_data["train"].parent])
    return TestClient(make_api(settings))


def good(data: dict[str, Path], **extra: Any) -> dict[str, Any]:
    return {"train": str(data["train"]), "val": str(data["val"]), "epochs": 2, "pretrained": False, **extra}


BAD_FIELDS = [
    ({"epochs": 0}, "epochs"),
    ({"epochs": -3}, "epochs"),
    ({"epochs": 10**9}, "epochs"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": -16}, "batch_size"),
    ({"lr": 0}, "lr"),
    ({"lr": -0.01}, "lr"),
    ({"lr": "fast"}, "lr"),
    ({"epochs": "twenty"}, "epochs"),
    ({"chunk_steps": 0}, "chunk_steps"),
    ({"colour": "red"}, "colour"),
    ({"queue": "tpu"}, "queue"),
    ({"height": 8}, "height"),
]


@pytest.mark.parametrize("change,field", BAD_FIELDS)
def test_bad_fields_get_422_naming_the_field(client: TestClient, storage: Path, tiny_data: dict[str, Path], change: dict, field: str) -> None:
    before = tree_digest(storage)
    r = client.post("/api/jobs", json=good(tiny_data, **change))
    assert r.status_code == 422, r.text
    assert any(field in d["loc"] for d in r.json()["detail"]), r.text
    assert tree_digest(storage) == before


def test_missing_list_file_and_paths_outside_the_data_roots(client: TestClient, storage: Path, tiny_data: dict[str, Path], tmp_path: Path) -> None:
    before = tree_digest(storage)
    root = tiny_data["train"].parent
    cases = {
        "train": str(root / "missing.txt"),
        "val": "/etc/passwd",
    }
    r = client.post("/api/jobs", json=good(tiny_data, train=cases["train"]))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "train"] and "missing.txt" in r.text
    r = client.post("/api/jobs", json=good(tiny_data, val=cases["val"]))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "val"] and "outside" in r.text
    r = client.post("/api/jobs", json=good(tiny_data, train=str(root / ".." / ".." / "x" / "train.txt")))
    assert r.status_code == 422 and "train" in r.text
    outside = tmp_path / "outside.txt"
    outside.write_text("images/train/train_000000.jpg annotations/train/train_000000.png\n")
    link = root / "link-out.txt"
    link.symlink_to(outside)
    try:
        r = client.post("/api/jobs", json=good(tiny_data, train=str(link)))
        assert r.status_code == 422 and "outside" in r.text
    finally:
        link.unlink()
    bad_utf8 = root / "latin1.txt"
    bad_utf8.write_bytes("images/train/caf\xe9.jpg\n".encode("latin-1"))
    try:
        r = client.post("/api/jobs", json=good(tiny_data, train=str(bad_utf8)))
        assert r.status_code == 422 and "UTF-8" in r.text and "train" in str(r.json()["detail"][0]["loc"])
    finally:
        bad_utf8.unlink()
    assert tree_digest(storage) == before


def test_wrong_body_shapes_and_huge_payloads(client: TestClient, storage: Path, tiny_data: dict[str, Path]) -> None:
    before = tree_digest(storage)
    assert client.post("/api/jobs", content=b"not json", headers={"content-type": "application/json"}).status_code == 422
    assert client.post("/api/jobs", json=[1, 2, 3]).status_code == 422
    assert client.post("/api/jobs", json={}).status_code == 422
    huge = good(tiny_data, train="x" * (2 << 20))
    r = client.post("/api/jobs", json=huge)
    assert r.status_code == 413 and "bytes" in r.text
    assert tree_digest(storage) == before


def test_job_ids_cannot_escape_the_storage_root(client: TestClient, storage: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    (secret / "weights").mkdir(parents=True)
    (secret / "state.json").write_text("{}")
    (secret / "weights" / "weight1.pt").write_bytes(b"secret")
    (storage / "jobs").mkdir(parents=True)
    (storage / "jobs" / "evil").symlink_to(secret)
    for job_id in ("..", "%2e%2e", "..%2f..%2fetc", "evil", "a" * 300, "UPPER", "x;rm"):
        for path in ("", "/weights", "/report", "/metrics", "/predictions.png"):
            r = client.get(f"/api/jobs/{job_id}{path}")
            assert r.status_code in (404, 405, 422), (job_id, path, r.status_code)
            assert b"secret" not in r.content
        r = client.post(f"/api/jobs/{job_id}/resume")
        assert r.status_code in (404, 405, 422), (job_id, r.status_code)


def test_token_guards_changes_and_optionally_reads(storage: Path, tiny_data: dict[str, Path]) -> None:
    settings = Settings(storage=storage, api_token="s3cret")
    c = TestClient(make_api(settings))
    assert c.post("/api/jobs", json=good(tiny_data)).status_code == 401
    assert c.post("/api/jobs", json=good(tiny_data), headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/api/jobs").status_code == 200  # reads are open unless configured
    r = c.post("/api/jobs", json=good(tiny_data), headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 201, r.text
    guarded = TestClient(make_api(settings.model_copy(update={"api_token_reads": True})))
    assert guarded.get("/api/jobs").status_code == 401
    assert guarded.get("/api/jobs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert guarded.get("/healthz").status_code == 200


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10,
)
FIELDS = ["train", "val", "epochs", "chunk_steps", "seed", "batch_size", "lr", "optimizer", "height", "width",
          "num_classes", "freeze_backbone", "pretrained", "pretrained_path", "num_workers", "queue"]


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=12), json_values, max_size=8))
def test_fuzzed_submissions_never_5xx(client: TestClient, body: dict[str, Any]) -> None:
    r = client.post("/api/jobs", json=body)
    assert r.status_code < 500, (body, r.text)


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(job_id=st.text(min_size=1, max_size=80),
       verb=st.sampled_from(["", "/weights", "/report", "/metrics", "/predictions.png", "/cancel", "/pause", "/resume",
                             "DELETE"]),
       epoch=st.one_of(st.none(), st.integers(-5, 10**12), st.integers(-2**70, 2**70), st.text(max_size=5)))
def test_fuzzed_job_routes_never_5xx(client: TestClient, job_id: str, verb: str, epoch: Any) -> None:
    method = client.post if verb in ("/cancel", "/pause", "/resume") else client.delete if verb == "DELETE" else client.get
    verb = "" if verb == "DELETE" else verb
    name = {"/weights": "epoch", "/metrics": "since_step"}.get(verb)
    params = {name: epoch} if epoch is not None and name else None
    r = method(f"/api/jobs/{quote(job_id, safe='')}{verb}", params=params)
    assert r.status_code < 500, (job_id, verb, r.text)


SPECIAL_PATHS = ["/proc/self/mem", "/proc/self/environ", "/dev/zero", "/dev/stdin", "/", "/etc", "~", "", ".", "..",
                 "/tmp/" + "a" * 300, "/tmp/" + "a/" * 3000, "a" * 256, "\udcff", "//", "/etc/passwd"]
paths = st.sampled_from(SPECIAL_PATHS) | st.text(max_size=300)


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(train=paths, val=paths, pretrained_path=st.none() | paths)
def test_fuzzed_paths_never_5xx(open_client: TestClient, storage: Path, train: str, val: str, pretrained_path: str | None) -> None:
    body = {"train": train, "val": val, "pretrained": True, "pretrained_path": pretrained_path}
    # json.dumps escapes lone surrogates, as a client in another language may send them
    r = open_client.post("/api/jobs", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 422, (body, r.status_code, r.text[:300])
    assert not (storage / "jobs").exists() or not any((storage / "jobs").iterdir())


def test_openapi_is_served(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "/api/jobs" in spec["paths"] and "/api/queue" in spec["paths"]


@pytest.fixture
def open_client(storage: Path) -> TestClient:
    """No data roots: any path may be named, so the path checks themselves must hold."""
    return TestClient(make_api(Settings(storage=storage)))


def _bad_path_cases(tmp_path: Path) -> list[tuple[str, str, str]]:
    """(path, words the message must hold, what it is) for every kind of bad list-file path."""
    folder = tmp_path / "a-folder"
    folder.mkdir()
    fifo = tmp_path / "a-fifo"
    os.mkfifo(fifo)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("images/caf\xe9.jpg\n".encode("latin-1"))
    return [
        ("/tmp/" + "a" * 5000, "too long", "a 5,000-character path"),
        ("/proc/self/mem", "cannot read", "a file that fails to read"),
        (str(folder), "folder", "a folder"),
        (str(fifo), "not a regular file", "a FIFO"),
        (str(latin1), "UTF-8", "a non-UTF-8 file"),
        (str(tmp_path / "missing.txt"), "does not exist", "a missing file"),
        ("/tmp/nul\x00byte.txt", "NUL", "a NUL byte"),
    ]


@pytest.mark.parametrize("field", ["train", "val"])
def test_bad_paths_get_422_naming_field_and_value(open_client: TestClient, storage: Path, tiny_data: dict[str, Path],
                                                  tmp_path: Path, field: str) -> None:
    before = tree_digest(storage)
    for path, words, what in _bad_path_cases(tmp_path):
        r = open_client.post("/api/jobs", json=good(tiny_data, **{field: path}))
        assert r.status_code == 422, (what, r.status_code, r.text[:300])
        detail = r.json()["detail"][0]
        assert detail["loc"] == ["body", field], (what, detail)
        assert words in detail["msg"], (what, detail["msg"][:300])
        assert path[:40].replace("\x00", "") in detail["msg"] or path[:5] in detail["msg"], (what, detail["msg"][:300])
        assert len(detail["msg"]) < 600, (what, len(detail["msg"]))  # a 5,000-character path is shortened
    assert tree_digest(storage) == before


def test_bad_pretrained_path_gets_422(open_client: TestClient, storage: Path, tiny_data: dict[str, Path], tmp_path: Path) -> None:
    before = tree_digest(storage)
    for path, _, what in _bad_path_cases(tmp_path):
        if what in ("a file that fails to read", "a non-UTF-8 file"):
            continue  # a weights file is read by the worker: only its kind is checked on submit
        r = open_client.post("/api/jobs", json=good(tiny_data, pretrained=True, pretrained_path=path))
        assert r.status_code == 422, (what, r.status_code, r.text[:300])
        assert r.json()["detail"][0]["loc"] == ["body", "pretrained_path"], (what, r.text[:300])
    assert tree_digest(storage) == before


def _job_dirs(storage: Path) -> list[str]:
    jobs = storage / "jobs"
    return sorted(p.name for p in jobs.iterdir() if not p.name.startswith(".")) if jobs.is_dir() else []


def test_idempotency_key_makes_one_job_and_survives_a_restart(storage: Path, tiny_data: dict[str, Path]) -> None:
    settings = Settings(storage=storage, data_roots=[tiny_data["train"].parent])
    first = TestClient(make_api(settings))
    key = {"Idempotency-Key": "4b0c1c3e-submit-1"}
    made = first.post("/api/jobs", json=good(tiny_data), headers=key)
    assert made.status_code == 201, made.text
    again = first.post("/api/jobs", json=good(tiny_data), headers=key)
    assert again.status_code == 200 and again.json()["id"] == made.json()["id"]
    restarted = TestClient(make_api(settings))  # a new scheduler on the same storage
    replay = restarted.post("/api/jobs", json=good(tiny_data), headers=key)
    assert replay.status_code == 200 and replay.json()["id"] == made.json()["id"]
    assert _job_dirs(storage) == [made.json()["id"]]

    other = restarted.post("/api/jobs", json=good(tiny_data, epochs=3), headers=key)
    assert other.status_code == 422, other.text
    detail = other.json()["detail"][0]
    assert detail["loc"] == ["header", "Idempotency-Key"], detail
    assert made.json()["id"] in detail["msg"] and "epochs" in detail["msg"] and "4b0c1c3e-submit-1" in detail["msg"]
    assert _job_dirs(storage) == [made.json()["id"]]

    fresh = restarted.post("/api/jobs", json=good(tiny_data), headers={"Idempotency-Key": "another"})
    assert fresh.status_code == 201 and fresh.json()["id"] != made.json()["id"]
    assert restarted.post("/api/jobs", json=good(tiny_data)).status_code == 201  # no key: a new job every time
    assert len(_job_dirs(storage)) == 3


def test_bad_idempotency_keys_get_422(client: TestClient, storage: Path, tiny_data: dict[str, Path]) -> None:
    before = tree_digest(storage)
    for key in ("", "k" * 256, "tab\there", "caf\u00e9"):
        r = client.post("/api/jobs", json=good(tiny_data), headers={"Idempotency-Key": key.encode("utf-8")})
        assert r.status_code == 422, (key, r.text)
        assert r.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
    assert tree_digest(storage) == before


def test_a_failed_submit_keeps_no_key(client: TestClient, storage: Path, tiny_data: dict[str, Path]) -> None:
    key = {"Idempotency-Key": "retry-after-fixing-the-file"}
    root = tiny_data["train"].parent
    later = root / "later.txt"
    r = client.post("/api/jobs", json=good(tiny_data, train=str(later)), headers=key)
    assert r.status_code == 422 and "does not exist" in r.text
    later.write_text(tiny_data["train"].read_text().replace("images/", str(root / "images") + "/").replace(
        "annotations/", str(root / "annotations") + "/"))
    try:
        r = client.post("/api/jobs", json=good(tiny_data, train=str(later)), headers=key)
        assert r.status_code == 201, r.text
    finally:
        later.unlink()


def test_concurrent_submits_with_one_key_make_one_job(storage: Path, tiny_data: dict[str, Path]) -> None:
    settings = Settings(storage=storage, data_roots=[tiny_data["train"].parent])
    clients = [TestClient(make_api(settings)) for _ in range(6)]
    results: list[Any] = [None] * len(clients)

    def post(i: int) -> None:
        results[i] = clients[i].post("/api/jobs", json=good(tiny_data), headers={"Idempotency-Key": "same"})

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status_code for r in results) == [200] * 5 + [201]
    assert len({r.json()["id"] for r in results}) == 1
    assert len(_job_dirs(storage)) == 1


@hsettings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.text(max_size=300).filter(lambda k: all(0x20 <= ord(c) < 0x7f for c in k)) | st.binary(max_size=300))
def test_fuzzed_idempotency_keys_never_5xx(client: TestClient, tiny_data: dict[str, Path], key: str | bytes) -> None:
    raw = key if isinstance(key, bytes) else key.encode()
    if any(b in raw for b in b"\r\n\x00"):
        return  # not a header value any HTTP client sends
    r = client.post("/api/jobs", json=good(tiny_data), headers={"Idempotency-Key": raw})
    assert r.status_code in (200, 201, 422), (key, r.status_code, r.text[:300])


def test_unusable_storage_gets_503_naming_it(tmp_path: Path, tiny_data: dict[str, Path]) -> None:
    """Storage that cannot be written (here: its root is a file) is infrastructure trouble, not a 500."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    c = TestClient(make_api(Settings(storage=blocker / "storage", broker_url="redis://127.0.0.1:1/0")))  # nothing listens
    r = c.post("/api/jobs", json=good(tiny_data))
    assert r.status_code == 503 and "storage" in r.json()["detail"] and str(blocker) in r.json()["detail"], r.text
    health = c.get("/healthz")
    assert health.status_code == 503, health.text
    body = health.json()
    assert body["status"] == "degraded" and body["storage"]["ok"] is False and body["broker"]["ok"] is False
    assert c.get("/api/jobs").status_code == 200
