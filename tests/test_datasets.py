"""Datasets pushed to an object store (moto): the manifest, the check at submission, and the fetch a
worker makes into its cache, verified file by file."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conftest import tiny_spec
from scheduler.api import make_api
from segmodel import datasets
from segmodel.lists import read_list
from segmodel.datasets import MANIFEST, Manifest, fetch, open_remote_list, push
from segmodel.errors import DataError
from segmodel.storage import ObjectStorage, StorageError, open_storage
from worker.settings import Settings


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def pushed(s3_bucket: str, tiny_data: dict[str, Path]) -> str:
    """The tiny dataset pushed to s3://<bucket>/ds; the prefix's URL."""
    url = f"s3://{s3_bucket}/ds"
    push(tiny_data["train"].parent, url, threads=4)
    return url


def test_push_uploads_lists_and_named_files_with_a_manifest(s3_bucket: str, tiny_data: dict[str, Path]) -> None:
    folder = tiny_data["train"].parent
    url = f"s3://{s3_bucket}/sets/tiny"
    seen: list[tuple[int, int, int]] = []
    result = push(folder, url, threads=4, progress=lambda *a: seen.append(a))
    named = {"train.txt", "val.txt"} | {str(p.relative_to(folder)) for lst in ("train", "val")
                                         for s in read_list(tiny_data[lst]) for p in (s.image, s.annotation)}
    assert result.lists == [f"{url}/train.txt", f"{url}/val.txt"]
    assert result.files == len(named) == len(seen) and seen[-1][:2] == (len(named), len(named))
    store = open_storage(url)
    raw = store.get(MANIFEST)
    assert result.manifest_sha256 == hashlib.sha256(raw).hexdigest()
    manifest = Manifest.parse(raw, url)
    assert set(manifest.files) == named and set(store.list("")) == named | {MANIFEST}
    for rel, entry in manifest.files.items():
        data = (folder / rel).read_bytes()
        assert (entry.size, entry.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        assert store.get(rel) == data
    assert result.bytes == sum(e.size for e in manifest.files.values())
    # The same folder again: the same manifest, byte for byte.
    assert push(folder, url, threads=2).manifest_sha256 == result.manifest_sha256


def test_push_refuses_bad_folders_and_buckets(s3_bucket: str, tiny_data: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing: no such folder"):
        push(tmp_path / "missing", f"s3://{s3_bucket}/x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no list files \(\*\.txt\)"):
        push(tmp_path / "empty", f"s3://{s3_bucket}/x")
    copy = tmp_path / "copy"
    shutil.copytree(tiny_data["train"].parent, copy)
    victim = read_list(copy / "train.txt")[2]
    victim.annotation.unlink()
    with pytest.raises(DataError, match=rf"train.txt:3: {victim.annotation}: file does not exist"):
        push(copy, f"s3://{s3_bucket}/x")
    with pytest.raises(StorageError, match=r"dataset s3://no-such-bucket-here/x: bucket 'no-such-bucket-here' does not exist"):
        push(tiny_data["train"].parent, "s3://no-such-bucket-here/x")
    assert open_storage(f"s3://{s3_bucket}").list("") == []  # nothing uploaded by any of them


def test_submission_checks_the_list_against_the_manifest(pushed: str, tiny_data: dict[str, Path], tmp_path: Path) -> None:
    remote = open_remote_list(f"{pushed}/train.txt")
    assert remote.n_samples == 16
    assert remote.manifest_sha256 == hashlib.sha256(open_storage(pushed).get(MANIFEST)).hexdigest()

    client = TestClient(make_api(Settings(storage=tmp_path / "storage")))
    body = {"train": f"{pushed}/train.txt", "val": f"{pushed}/val.txt", "epochs": 2, "pretrained": False}
    ok = client.post("/api/jobs", json=body)
    assert ok.status_code == 201, ok.text
    assert ok.json()["spec"]["train"] == f"{pushed}/train.txt"
    assert ok.json()["spec"]["train_manifest_sha256"] == ok.json()["spec"]["val_manifest_sha256"] == remote.manifest_sha256

    def refused(change: dict[str, str], field: str, message: str) -> None:
        before = sorted((tmp_path / "storage" / "jobs").iterdir())
        r = client.post("/api/jobs", json={**body, **change})
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"][-1] == field and message in r.json()["detail"][0]["msg"], r.json()
        assert sorted((tmp_path / "storage" / "jobs").iterdir()) == before  # no job made

    store = open_storage(pushed)
    image = str(read_list(tiny_data["val"])[1].image.relative_to(tiny_data["val"].parent))
    store.delete(image)
    refused({}, "val", f"{pushed}/val.txt:2: {image}: no object {pushed}/{image}")
    store.put(image, b"short")
    refused({}, "val", f"{pushed}/val.txt:2: {image}: object {pushed}/{image} has 5 bytes")
    refused({"train": f"{pushed}/nope.txt"}, "train", f"{pushed}/nope.txt: the list file is not in the dataset's manifest.json")
    refused({"train": f"s3://{pushed.split('/')[2]}/elsewhere/train.txt"}, "train", "no manifest.json there")
    refused({"train_manifest_sha256": "0" * 64}, "train", "the dataset changed since the job was submitted")
    store.put("val.txt", b"images/val/x.png annotations/val/x.png\n")
    refused({}, "val", f"{pushed}/val.txt: object does not match the manifest")


def test_fetch_verifies_and_keeps_what_is_whole(pushed: str, tiny_data: dict[str, Path], tmp_path: Path) -> None:
    digest = open_remote_list(f"{pushed}/train.txt").manifest_sha256
    cache = tmp_path / "cache"
    cold = fetch(f"{pushed}/train.txt", digest, cache, threads=4)
    folder = tiny_data["train"].parent
    assert cold.list_file == cache / "datasets" / digest / "train.txt"
    assert cold.files == 33 and cold.bytes == sum(len(b) for n, b in _files(folder).items()
                                                  if n == "train.txt" or "/train/" in n)
    local = read_list(cold.list_file)
    assert [(s.image.read_bytes(), s.annotation.read_bytes()) for s in local] == \
           [(s.image.read_bytes(), s.annotation.read_bytes()) for s in read_list(tiny_data["train"])]
    warm = fetch(f"{pushed}/train.txt", digest, cache)
    assert (warm.list_file, warm.files, warm.bytes) == (cold.list_file, 0, 0)
    # A file cut short on this disk is fetched again, and only it; what a killed fetch left is removed.
    local[5].image.write_bytes(local[5].image.read_bytes()[:10])
    dead = local[6].image.with_name(f".{local[6].image.name}.999999999.1.tmp")
    dead.write_bytes(b"half")
    again = fetch(f"{pushed}/train.txt", digest, cache)
    assert again.files == 1 and local[5].image.read_bytes() == read_list(tiny_data["train"])[5].image.read_bytes()
    assert not dead.exists()
    # The val list shares the folder.
    assert fetch(f"{pushed}/val.txt", digest, cache).list_file.parent == cold.list_file.parent
    assert not list(cache.rglob(".*.tmp"))


def test_a_corrupt_object_is_fetched_again_then_refused(pushed: str, tiny_data: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    digest = open_remote_list(f"{pushed}/train.txt").manifest_sha256
    victim = str(read_list(tiny_data["train"])[3].image.relative_to(tiny_data["train"].parent))
    real_get, served = ObjectStorage.get, []

    def flaky_get(self: ObjectStorage, key: str) -> bytes:
        data = real_get(self, key)
        if key == victim:
            served.append(key)
            if len(served) == 1:  # the first read comes back damaged, the retry whole
                return data[:-1] + bytes([data[-1] ^ 1])
        return data

    monkeypatch.setattr(ObjectStorage, "get", flaky_get)
    fetched = fetch(f"{pushed}/train.txt", digest, tmp_path / "a")
    assert len(served) == 2 and (fetched.list_file.parent / victim).read_bytes() == (tiny_data["train"].parent / victim).read_bytes()

    monkeypatch.setattr(ObjectStorage, "get", real_get)
    open_storage(pushed).put(victim, b"\x00" * len((tiny_data["train"].parent / victim).read_bytes()))  # same size, other bytes
    with pytest.raises(DataError, match=rf"{pushed}/{victim}: object does not match the manifest"):
        fetch(f"{pushed}/train.txt", digest, tmp_path / "b")
    root = datasets.local_folder(tmp_path / "b", digest)
    assert not (root / "train.txt").exists() and not (root / victim).exists()  # nothing half-done is trusted

    open_storage(pushed).put(MANIFEST, json.dumps({"format": 1, "files": {}}).encode())
    with pytest.raises(DataError, match="the dataset changed since the job was submitted"):
        fetch(f"{pushed}/train.txt", digest, tmp_path / "c")


def test_same_weights_from_the_fetched_copy(pushed: str, tiny_data: dict[str, Path], tmp_path: Path,
                                            reference: dict) -> None:
    from conftest import assert_equal_weights
    from segmodel import checkpoint
    from segmodel.engine import train_range
    from segmodel.layout import JobLayout

    digest = open_remote_list(f"{pushed}/train.txt").manifest_sha256
    spec = tiny_spec(tiny_data)
    local = spec.model_copy(update={"train": str(fetch(f"{pushed}/train.txt", digest, tmp_path / "cache").list_file),
                                    "val": str(fetch(f"{pushed}/val.txt", digest, tmp_path / "cache").list_file)})
    train_range(local, tmp_path / "job", 0, 12, cache_dir=tmp_path / "cache")
    assert_equal_weights(checkpoint.load(JobLayout(tmp_path / "job").weight(3)), reference)


def test_relay_data_push_prints_the_urls_and_exits_with_the_right_code(s3_bucket: str, tiny_data: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    from click.testing import CliRunner

    from scheduler.cli import main

    folder = str(tiny_data["train"].parent)
    ok = CliRunner().invoke(main, ["data", "push", folder, f"s3://{s3_bucket}/tiny/"])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.splitlines()[1:] == [f"  --train s3://{s3_bucket}/tiny/train.txt", f"  --val s3://{s3_bucket}/tiny/val.txt"]
    assert ok.stdout.startswith("pushed 42 files, ")
    for args, code, message in [
        ([str(tmp_path / "nope"), f"s3://{s3_bucket}/x"], 2, f"relay: {tmp_path / 'nope'}: no such folder"),
        ([folder, str(tmp_path / "local")], 2, f"relay: {tmp_path / 'local'}: give an object-store URL"),
        ([folder, "s3://no-such-bucket-here/x"], 4, "relay: dataset s3://no-such-bucket-here/x: bucket 'no-such-bucket-here' does not exist"),
    ]:
        bad = CliRunner().invoke(main, ["data", "push", *args])
        assert (bad.exit_code, bad.stderr.splitlines()[-1].startswith(message)) == (code, True), bad.stderr


def test_a_worker_fetches_once_and_refuses_a_changed_dataset(pushed: str, tiny_data: dict[str, Path], tmp_path: Path) -> None:
    from scheduler.control import Control
    from segmodel.jobs import JobStatus
    from test_protocol import FakeTrainer
    from worker import tasks
    from worker.broker import Broker
    from worker.lease import FileLeases
    from worker.registry import WorkerRegistry

    settings = Settings(storage=tmp_path / "storage", node="w1", cache_dir=tmp_path / "w1-cache")
    control = Control(settings)
    job_id, _ = control.submit(tiny_spec(tiny_data, train=f"{pushed}/train.txt", val=f"{pushed}/val.txt"))
    digest = control.store.spec(job_id).train_manifest_sha256
    trainer = FakeTrainer([None, None])

    def runtime(node: str) -> tasks.Runtime:
        s = settings.model_copy(update={"node": node, "cache_dir": tmp_path / f"{node}-cache"})
        return tasks.Runtime(settings=s, store=control.store, broker=Broker(control.app, s), trainer=trainer,  # type: ignore[arg-type]
                             leases=FileLeases(s.storage, 30), registry=WorkerRegistry(s.storage, node, ["cpu"]))

    w1 = runtime("w1")
    assert tasks.handle_train(w1, job_id, 0) == "committed chunk 0"
    assert tasks.handle_train(w1, job_id, 1) == "committed chunk 1"
    local = tmp_path / "w1-cache" / "datasets" / digest
    assert [(r["spec"]["train"], r["spec"]["val"]) for r in trainer.requests] == [(str(local / "train.txt"), str(local / "val.txt"))] * 2
    notes = [e.what for e in control.store.state(job_id).events if " fetched " in e.what]
    sizes = {lst: datasets.size_text(sum(len(b) for n, b in _files(tiny_data["train"].parent).items()
                                         if n == f"{lst}.txt" or f"/{lst}/" in n)) for lst in ("train", "val")}
    assert [n.split(" in ")[0] for n in notes] == [f"w1 fetched 33 files, {sizes['train']} for train",
                                                   f"w1 fetched 9 files, {sizes['val']} for val"]

    # The dataset is pushed again, changed, to the same prefix: a worker without a copy refuses it.
    changed = tmp_path / "changed"
    shutil.copytree(tiny_data["train"].parent, changed)
    (changed / "val.txt").write_text("".join(reversed((changed / "val.txt").read_text().splitlines(keepends=True))))
    push(changed, pushed)
    assert tasks.handle_train(runtime("w2"), job_id, 2).startswith("failed: ")
    state = control.store.state(job_id)
    assert state.status == JobStatus.failed and "the dataset changed since the job was submitted" in state.reason, state.reason
    assert f"{pushed}/manifest.json" in state.reason
