"""Where Relay keeps what must outlive a worker: one small interface over a local folder or an object store.

Keys are '/'-separated relative names ("jobs/<id>/state.json"). Every write is whole: a reader sees
the old object or the complete new one, never a part. `put_if_absent` creates an object once;
`put_if_match` is the compare-and-set a commit is fenced by (the version is an opaque token from
`get_versioned`: an ETag on S3, a content hash on a local folder). There is no append and no rename,
because an object store has neither: logs are one object per record batch.
"""
from __future__ import annotations

import datetime
import fcntl
import hashlib
import multiprocessing
import os
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from segmodel.errors import CheckpointError, RelayError

_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=+-]*$")


class StorageError(RelayError):
    """Storage cannot be reached or used as configured; the message names the setting at fault."""


class KeyRefused(StorageError):
    """A key that is malformed or would lead outside the storage root."""


class ObjectNotFound(StorageError, FileNotFoundError):
    def __init__(self, key: str, where: str) -> None:
        super().__init__(f"{where}: no object {key!r}")
        self.key = key


def check_key(key: str) -> str:
    """Keys are relative and plain: no '..', no hidden names, nothing that escapes the root."""
    parts = key.split("/")
    if not key or not all(_SEGMENT.match(p) for p in parts):
        raise KeyRefused(f"invalid storage key {key!r}")
    return key


class Storage(ABC):
    url: str

    @abstractmethod
    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """The object's bytes and its version token; ObjectNotFound if absent."""

    def get(self, key: str) -> bytes:
        return self.get_versioned(key)[0]

    @abstractmethod
    def put(self, key: str, data: bytes) -> str:
        """Write the whole object (replacing any); return its version."""

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> str | None:
        """Create the object only if no object has that key; its version, or None if one existed."""

    @abstractmethod
    def put_if_match(self, key: str, data: bytes, version: str) -> str | None:
        """Replace the object only if it is still at `version`; the new version, or None on conflict."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Every key under the folder `prefix` (recursive), sorted."""

    @abstractmethod
    def sizes(self, prefix: str) -> dict[str, int]:
        """Every key under the folder `prefix` with its size in bytes (one listing, no reads)."""

    @abstractmethod
    def children(self, prefix: str) -> list[str]:
        """Names of the sub-folders directly under the folder `prefix`, sorted (one LIST, not a walk)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; absent is fine."""

    def exists(self, key: str) -> bool:
        try:
            self.get_versioned(key)
        except ObjectNotFound:
            return False
        return True

    def download(self, key: str, dest: Path) -> Path:
        """Copy the object to a local file (for what needs a path), written whole."""
        atomic_write_bytes(dest, self.get(key))
        return dest

    def upload(self, src: Path, key: str) -> str:
        return self.put(key, Path(src).read_bytes())

    @abstractmethod
    def check(self) -> None:
        """Fail now, naming the setting, if the storage cannot be read and written."""

    @contextmanager
    def locked(self, key: str) -> Iterator[None]:
        """Serialize writers of `key` where the backend can (a folder: flock); on an object store
        nothing is held, and the conditional writes alone decide."""
        yield

    # Checked objects: the sha256 goes to a sidecar written after the object, so an interrupted
    # write leaves an object without a checksum, which counts as absent.
    def put_checked(self, key: str, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        self.put(key, data)
        self.put(key + ".sha256", f"{digest}  {key.rsplit('/', 1)[-1]}\n".encode())
        return digest

    def get_checked(self, key: str) -> tuple[bytes, str]:
        """Bytes and sha256 once they match the recorded checksum; CheckpointError names what is wrong."""
        where = f"{self.url.rstrip('/')}/{key}"
        try:
            recorded = self.get(key + ".sha256").split()
        except ObjectNotFound:
            if self.exists(key):
                raise CheckpointError(f"{where}: no checksum {key.rsplit('/', 1)[-1]}.sha256 (an interrupted write)") from None
            raise CheckpointError(f"{where}: does not exist") from None
        try:
            data = self.get(key)
        except ObjectNotFound:
            raise CheckpointError(f"{where}: does not exist") from None
        if not recorded:
            raise CheckpointError(f"{where}: checksum file is empty")
        actual = hashlib.sha256(data).hexdigest()
        if actual != recorded[0].decode():
            raise CheckpointError(f"{where}: checksum mismatch (expected {recorded[0].decode()[:12]}…, "
                                  f"object has {actual[:12]}…, {len(data)} bytes)")
        return data, actual


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temporary name, fsync, rename: a reader sees the old file or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # pid and thread: two threads of one process (a heartbeat and a chunk) may write one file at once
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a read-only remount: no partial temp file stays behind
        tmp.unlink(missing_ok=True)
        raise


class LocalStorage(Storage):
    """A POSIX folder, shared by every process that mounts it: rename for whole writes, flock for CAS."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)

    def path(self, key: str) -> Path:
        path = self.root / check_key(key)
        # A planted symlink must not lead outside the root either.
        if not path.resolve().is_relative_to(self.root):
            raise KeyRefused(f"storage key {key!r} leads outside {self.root}")
        return path

    @staticmethod
    def _version(data: bytes) -> str:
        return hashlib.md5(data, usedforsecurity=False).hexdigest()

    @contextmanager
    def _locked(self, path: Path, what: str = "lock") -> Iterator[None]:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.{what}"), "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    @contextmanager
    def locked(self, key: str) -> Iterator[None]:
        with self._locked(self.path(key), "held"):  # not the lock each write takes: no self-deadlock
            yield

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        try:
            data = self.path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key, self.url) from None
        return data, self._version(data)

    def put(self, key: str, data: bytes) -> str:
        path = self.path(key)
        with self._locked(path):
            atomic_write_bytes(path, data)
        return self._version(data)

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        path = self.path(key)
        with self._locked(path):
            if path.exists():
                return None
            atomic_write_bytes(path, data)
        return self._version(data)

    def put_if_match(self, key: str, data: bytes, version: str) -> str | None:
        path = self.path(key)
        with self._locked(path):
            try:
                current = self._version(path.read_bytes())
            except FileNotFoundError:
                return None
            if current != version:
                return None
            atomic_write_bytes(path, data)
        return self._version(data)

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix.strip("/") if prefix.strip("/") else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root)
            keys += [str(rel / f) if str(rel) != "." else f for f in filenames if not f.startswith(".")]
        return sorted(keys)

    def sizes(self, prefix: str) -> dict[str, int]:
        return {key: (self.root / key).stat().st_size for key in self.list(prefix)}

    def children(self, prefix: str) -> list[str]:
        base = self.root / prefix.strip("/") if prefix.strip("/") else self.root
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def download(self, key: str, dest: Path) -> Path:
        if Path(dest).resolve() == self.path(key).resolve():
            return dest
        return super().download(key, dest)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise StorageError(f"RELAY_STORAGE={self.url}: cannot write there ({exc.strerror})") from exc


class ObjectStorage(Storage):
    """An S3-compatible bucket (or gs://) through obstore: conditional PUTs give create-once and CAS.

    Configured the way the ecosystem does it: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_REGION (GOOGLE_SERVICE_ACCOUNT for gs://).
    """

    def __init__(self, url: str, *, retries: int = 3, timeout_s: float = 30.0, name: str | None = None) -> None:
        import obstore.store

        self.url = url.rstrip("/")
        self.name = name or f"RELAY_STORAGE={self.url}"  # what errors call it: the setting to fix
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
        self._store = obstore.store.from_url(
            self.url,
            client_options={"allow_http": endpoint.startswith("http://"), "timeout": f"{timeout_s:g}s",
                            "connect_timeout": "10s"},
            retry_config={"max_retries": retries, "retry_timeout": datetime.timedelta(seconds=timeout_s),
                          "backoff": {"init_backoff": datetime.timedelta(milliseconds=100),
                                      "max_backoff": datetime.timedelta(seconds=5), "base": 2}},
        )

    def _where(self, key: str) -> str:
        return f"{self.url}/{key}"

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        import obstore

        try:
            result = obstore.get(self._store, check_key(key))
            data = bytes(result.bytes())
        except FileNotFoundError as exc:
            raise self._not_found(exc, key) from None
        except obstore.exceptions.BaseError as exc:
            raise self._explain(exc, key) from exc
        return data, result.meta["e_tag"] or ""

    def _put(self, key: str, data: bytes, mode: object) -> str | None:
        import obstore

        try:
            result = obstore.put(self._store, check_key(key), data, mode=mode)  # type: ignore[arg-type]
        except (obstore.exceptions.AlreadyExistsError, obstore.exceptions.PreconditionError):
            return None
        except FileNotFoundError as exc:
            self._not_found(exc, key)  # a missing bucket raises; If-Match on a gone object is a conflict
            return None
        except obstore.exceptions.BaseError as exc:
            raise self._explain(exc, key) from exc
        return result["e_tag"] or ""

    def put(self, key: str, data: bytes) -> str:
        version = self._put(key, data, "overwrite")
        assert version is not None
        return version

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        return self._put(key, data, "create")

    def put_if_match(self, key: str, data: bytes, version: str) -> str | None:
        return self._put(key, data, {"e_tag": version})

    def list(self, prefix: str) -> list[str]:
        import obstore

        try:
            found = obstore.list(self._store, prefix.strip("/") or None).collect()
        except obstore.exceptions.BaseError as exc:
            raise self._explain(exc, prefix) from exc
        return sorted(m["path"] for m in found)

    def sizes(self, prefix: str) -> dict[str, int]:
        import obstore

        try:
            found = obstore.list(self._store, prefix.strip("/") or None).collect()
        except obstore.exceptions.BaseError as exc:
            raise self._explain(exc, prefix) from exc
        return {m["path"]: int(m["size"]) for m in found}

    def children(self, prefix: str) -> list[str]:
        import obstore

        try:
            found = obstore.list_with_delimiter(self._store, prefix.strip("/") or None)
        except obstore.exceptions.BaseError as exc:
            raise self._explain(exc, prefix) from exc
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in found["common_prefixes"])

    def delete(self, key: str) -> None:
        import obstore

        try:
            obstore.delete(self._store, check_key(key))
        except FileNotFoundError as exc:
            self._not_found(exc, key)
        except obstore.exceptions.BaseError as exc:
            raise self._explain(exc, key) from exc

    def check(self) -> None:
        """A write, a read and a delete of a probe object: the first call that would fail in a worker."""
        key = f"relay-probe-{os.getpid()}"
        self.put(key, b"ok")
        if self.get(key) != b"ok":
            raise StorageError(f"{self.name}: a probe object read back different bytes")
        self.delete(key)

    def _not_found(self, exc: Exception, key: str) -> ObjectNotFound:
        """A missing object is ordinary; a missing bucket is a setting to fix, raised at once."""
        if "NoSuchBucket" in str(exc):
            raise self._explain(exc, key) from exc
        return ObjectNotFound(key, self.url)

    def _explain(self, exc: Exception, key: str) -> StorageError:
        """Turn the client's error into one that names the setting a user would change."""
        text = str(exc)
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or "the default endpoint"
        bucket = self.url.split("://", 1)[-1].split("/", 1)[0]
        if "169.254.169.254" in text:  # no keys given, so the client asked the cloud's instance metadata
            return StorageError(f"{self.name}: no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
        if "NoSuchBucket" in text:
            return StorageError(f"{self.name}: bucket {bucket!r} does not exist at {endpoint}")
        if any(s in text for s in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403 Forbidden")):
            return StorageError(f"{self.name}: {endpoint} refused the credentials "
                                f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
        if "error sending request" in text or "connect" in text.lower():
            return StorageError(f"{self.name}: cannot reach {endpoint} (AWS_ENDPOINT_URL)")
        first = text.splitlines()[0] if text else type(exc).__name__
        return StorageError(f"{self._where(key)}: {first}")


def open_storage(where: str | Path, name: str | None = None) -> Storage:
    """RELAY_STORAGE's value: a local folder, or s3://bucket/prefix (gs://, too). `name` is what
    errors call an object store (default: the RELAY_STORAGE setting)."""
    text = str(where)
    if text.startswith(("s3://", "gs://")):
        return ObjectStorage(text, name=name)
    if "://" in text:
        raise StorageError(f"RELAY_STORAGE={text}: unsupported scheme (use a folder, s3://bucket/prefix or gs://bucket/prefix)")
    return LocalStorage(Path(text))


def _check(where: str | Path) -> None:
    open_storage(where).check()


def check_before_fork(where: str | Path) -> None:
    """open_storage(where).check(), run in a spawned process: the object-store client's runtime must
    not start in a process that forks afterwards (Celery's prefork pool), or its children crash."""
    if not isinstance(where, str) or "://" not in where:
        _check(where)
        return
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(_check, where).result()
