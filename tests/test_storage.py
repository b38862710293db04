"""One contract every storage backend passes: a local folder, and a real S3 server (moto) over HTTP."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from segmodel.errors import CheckpointError
from segmodel.storage import LocalStorage, ObjectNotFound, ObjectStorage, Storage, StorageError, open_storage


class StorageContract:
    """Subclasses provide `store`: an empty storage of their backend."""

    def test_read_after_write(self, store: Storage) -> None:
        version = store.put("jobs/a/state.json", b"one")
        assert store.get_versioned("jobs/a/state.json") == (b"one", version)
        store.put("jobs/a/state.json", b"two")
        assert store.get("jobs/a/state.json") == b"two"
        assert store.exists("jobs/a/state.json")

    def test_missing_object(self, store: Storage) -> None:
        with pytest.raises(ObjectNotFound):
            store.get("jobs/none/state.json")
        assert not store.exists("jobs/none/state.json")

    def test_create_once(self, store: Storage) -> None:
        assert store.put_if_absent("jobs/a/job.json", b"first") is not None
        assert store.put_if_absent("jobs/a/job.json", b"second") is None
        assert store.get("jobs/a/job.json") == b"first"

    def test_create_once_race_has_one_winner(self, store: Storage) -> None:
        wins: list[int] = []

        def create(i: int) -> None:
            if store.put_if_absent("jobs/race/commit-0", str(i).encode()) is not None:
                wins.append(i)

        threads = [threading.Thread(target=create, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1
        assert store.get("jobs/race/commit-0") == str(wins[0]).encode()

    def test_compare_and_set_conflict(self, store: Storage) -> None:
        v1 = store.put("jobs/a/state.json", b"v1")
        v2 = store.put_if_match("jobs/a/state.json", b"v2", v1)
        assert v2 is not None and v2 != v1
        assert store.put_if_match("jobs/a/state.json", b"stale", v1) is None
        assert store.get_versioned("jobs/a/state.json") == (b"v2", v2)
        assert store.put_if_match("jobs/gone/state.json", b"x", v1) is None
        assert not store.exists("jobs/gone/state.json")

    def test_compare_and_set_loses_no_update(self, store: Storage) -> None:
        store.put("counter", b"0")

        def add(n: int) -> None:
            for _ in range(n):
                while True:
                    data, version = store.get_versioned("counter")
                    if store.put_if_match("counter", str(int(data) + 1).encode(), version) is not None:
                        break

        threads = [threading.Thread(target=add, args=(5,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert store.get("counter") == b"20"

    def test_list_by_prefix(self, store: Storage) -> None:
        for key in ("jobs/a/state.json", "jobs/a/commits/00001.json", "jobs/a/commits/00000.json",
                    "jobs/ab/state.json", "workers/n1.json"):
            store.put(key, b"x")
        assert store.list("jobs/a") == ["jobs/a/commits/00000.json", "jobs/a/commits/00001.json", "jobs/a/state.json"]
        assert store.list("jobs/a/commits/") == ["jobs/a/commits/00000.json", "jobs/a/commits/00001.json"]
        assert store.list("jobs/none") == []
        assert len(store.list("")) == 5
        assert store.children("jobs") == ["a", "ab"]
        assert store.children("jobs/a") == ["commits"]
        assert store.children("jobs/none") == []

    def test_delete(self, store: Storage) -> None:
        store.put("jobs/a/tmp.bin", b"x")
        store.delete("jobs/a/tmp.bin")
        assert not store.exists("jobs/a/tmp.bin")
        store.delete("jobs/a/tmp.bin")
        assert store.list("jobs/a") == []

    def test_checksum_mismatch_detected(self, store: Storage) -> None:
        data = bytes(range(256)) * 64
        digest = store.put_checked("jobs/a/checkpoints/step3.pt", data)
        assert store.get_checked("jobs/a/checkpoints/step3.pt") == (data, digest)
        store.put("jobs/a/checkpoints/step3.pt", data[:-1] + b"\x00")
        with pytest.raises(CheckpointError, match="checksum mismatch"):
            store.get_checked("jobs/a/checkpoints/step3.pt")

    def test_object_without_checksum_counts_as_absent(self, store: Storage) -> None:
        store.put("jobs/a/checkpoints/step6.pt", b"half written")
        with pytest.raises(CheckpointError, match="interrupted write"):
            store.get_checked("jobs/a/checkpoints/step6.pt")
        with pytest.raises(CheckpointError, match="does not exist"):
            store.get_checked("jobs/a/checkpoints/step9.pt")

    def test_local_files_round_trip(self, store: Storage, tmp_path: Path) -> None:
        src = tmp_path / "events.out"
        src.write_bytes(b"tensorboard events")
        store.upload(src, "jobs/a/tensorboard/chunk0.events")
        dest = store.download("jobs/a/tensorboard/chunk0.events", tmp_path / "copy" / "events")
        assert dest.read_bytes() == b"tensorboard events"

    @pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", ".hidden", "a/../b", ""])
    def test_keys_cannot_escape(self, store: Storage, key: str) -> None:
        with pytest.raises(StorageError, match="invalid storage key"):
            store.put(key, b"x")

    def test_check_passes(self, store: Storage) -> None:
        store.check()
        assert store.list("") == []


class TestLocalStorage(StorageContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Storage:
        return open_storage(tmp_path / "storage")

    def test_symlink_out_of_root_refused(self, tmp_path: Path) -> None:
        store = LocalStorage(tmp_path / "storage")
        (tmp_path / "outside").mkdir()
        (tmp_path / "storage").mkdir()
        (tmp_path / "storage" / "jobs").symlink_to(tmp_path / "outside")
        with pytest.raises(StorageError, match="outside"):
            store.put("jobs/x", b"x")


class TestObjectStorage(StorageContract):
    @pytest.fixture
    def store(self, s3_bucket: str) -> Storage:
        store = open_storage(f"s3://{s3_bucket}/relay")
        assert isinstance(store, ObjectStorage)
        return store

    def test_prefix_isolates(self, store: Storage, s3_bucket: str) -> None:
        store.put("jobs/a/state.json", b"x")
        assert ObjectStorage(f"s3://{s3_bucket}/other").list("") == []

    def test_misnamed_bucket_names_the_setting(self, s3_bucket: str) -> None:
        with pytest.raises(StorageError, match=r"RELAY_STORAGE=s3://no-such-bucket-here/x: bucket 'no-such-bucket-here' does not exist"):
            open_storage("s3://no-such-bucket-here/x").check()

    def test_unreachable_endpoint_names_the_setting(self, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
        from conftest import free_port

        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        with pytest.raises(StorageError, match=r"cannot reach http://127\.0\.0\.1:\d+ \(AWS_ENDPOINT_URL\)"):
            ObjectStorage(f"s3://{s3_bucket}/x", retries=1, timeout_s=5).check()


def test_wrong_credentials_name_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An S3 server that checks signatures (moto with authentication on) refuses unknown keys."""
    import socket
    import subprocess
    import sys

    from conftest import S3_CREDENTIALS, free_port, wait_for

    port = free_port()
    env = {**__import__("os").environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    with open(tmp_path / "moto.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        def up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_for(up, 60, "the authenticating S3 server to listen")
        for k, v in {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(StorageError, match=r"refused the credentials \(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY\)"):
            ObjectStorage("s3://some-bucket/x", retries=1, timeout_s=5).check()
    finally:
        proc.kill()
        proc.wait()


def test_unknown_scheme_refused() -> None:
    with pytest.raises(StorageError, match="RELAY_STORAGE=ftp://x: unsupported scheme"):
        open_storage("ftp://x")
