"""Data that follows the job: a dataset folder pushed to an object store, checked at submission, and
fetched once by each worker that trains on it.

A pushed dataset is its list files and every file they name, under one prefix, with `manifest.json`
next to the list files: each file's path relative to it, size and sha256. The manifest is written
last, so its presence means every object was uploaded; its bytes are deterministic (no times), so
pushing the same folder again gives the same manifest. A job submitted with s3:// lists records
the manifest's sha256 (`train_manifest_sha256`, `val_manifest_sha256`); a worker fetches exactly
that dataset or refuses. A fetched copy lives under `<cache>/datasets/<manifest sha256>/` with the
bucket's layout, so a list's relative paths resolve there as they did in the pushed folder. Every
file is checked against the manifest (size and sha256) before it is renamed into place, and a list
file is written only after every file it names: a fetch that dies leaves files that are whole and
verified, or temporary names that nothing trusts (a later fetch removes them), and the next
fetch gets only what is missing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from segmodel.lists import Sample, parse_list, read_list
from segmodel.errors import DataError
from segmodel.storage import ObjectNotFound, Storage, atomic_write_bytes, open_storage

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
THREADS = 16

log = logging.getLogger("relay.datasets")
Progress = Callable[[int, int, int], None]  # (files done, files in all, bytes done)


def is_remote(where: str) -> bool:
    """A list given as an object-store URL rather than a path."""
    return where.startswith(("s3://", "gs://"))


def size_text(n: int) -> str:
    """Bytes for people: 812 bytes, 1.2 MB."""
    if n < 1000:
        return f"{n} bytes"
    value = float(n)
    for unit in ("kB", "MB", "GB", "TB"):
        value /= 1000
        if value < 1000 or unit == "TB":
            break
    return f"{value:.1f} {unit}"


def _split(url: str) -> tuple[str, str]:
    """The dataset's prefix (where the manifest is) and the list file's name."""
    bucket, _, key = url.partition("://")[2].partition("/")
    base, _, name = url.rpartition("/")
    if not bucket or not key or not name:
        raise DataError("a list file URL needs a bucket and a name (s3://bucket/prefix/train.txt)", list_file=url)
    return base, name


def _open(base: str) -> Storage:
    try:
        return open_storage(base, name=f"dataset {base}")
    except ValueError as exc:  # the client refuses the URL itself (a bucket name it cannot use)
        raise DataError(f"not a usable object-store URL ({exc})", list_file=base) from None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Entry:
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    files: dict[str, Entry]

    def to_bytes(self) -> bytes:
        body = {"format": MANIFEST_FORMAT,
                "files": {k: {"size": e.size, "sha256": e.sha256} for k, e in sorted(self.files.items())}}
        return (json.dumps(body, indent=0, sort_keys=True) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes, where: str) -> Manifest:
        try:
            body = json.loads(data)
            if body.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {body.get('format')!r}, expected {MANIFEST_FORMAT}")
            files = {str(k): Entry(int(v["size"]), str(v["sha256"])) for k, v in body["files"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"not a dataset manifest ({exc})", list_file=where) from None
        return cls(files)


def _relative(sample_path: Path, list_file: str, line: int) -> str:
    """A path from a list line as a key under the dataset's prefix; never one that leaves it."""
    rel = posixpath.normpath(PurePosixPath(sample_path).as_posix())
    if rel.startswith(("../", "/")) or rel in ("..", "."):
        raise DataError("the path leads outside the dataset's folder", list_file=list_file, line=line, path=str(sample_path))
    return rel


def _referenced(samples: Iterable[Sample], list_file: str) -> list[tuple[str, int]]:
    """(relative path, line) of every file the samples name, each once, in list order."""
    seen: dict[str, int] = {}
    for s in samples:
        for p in (s.image, s.annotation):
            seen.setdefault(_relative(p, list_file, s.line), s.line)
    return list(seen.items())


# ---- push ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pushed:
    lists: list[str]     # the URLs to pass as --train / --val
    files: int
    bytes: int
    seconds: float
    manifest_sha256: str


def push(folder: Path | str, url: str, threads: int = THREADS, progress: Progress | None = None) -> Pushed:
    """Upload the folder's list files (*.txt at its top) and every file they name, in parallel, then
    the manifest. Raises DataError naming the folder, list, line or file at fault, StorageError for
    a bucket that cannot be used."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError("no such folder" if not folder.exists() else "not a folder", path=folder)
    lists = sorted(p for p in folder.glob("*.txt") if p.is_file())
    if not lists:
        raise DataError("no list files (*.txt) at the top of the folder; make a dataset with "
                        "`relay data synthetic` or `relay data ade20k`", path=folder)
    names = {p.name: p for p in lists}
    for lst in lists:
        samples = [replace(s, image=Path(os.path.relpath(s.image, folder)), annotation=Path(os.path.relpath(s.annotation, folder)))
                   for s in read_list(lst)]
        for rel, line in _referenced(samples, str(lst)):
            path = folder / rel
            if not path.is_file():
                raise DataError("file does not exist", list_file=lst, line=line, path=path)
            names.setdefault(rel, path)
    store = _open(url.rstrip("/"))
    store.check()  # a missing bucket or refused credentials now, before any upload
    started, done, sent = time.monotonic(), 0, 0

    def upload(item: tuple[str, Path]) -> tuple[str, Entry]:
        key, path = item
        data = path.read_bytes()
        store.put(key, data)
        return key, Entry(len(data), _sha256(data))

    entries: dict[str, Entry] = {}
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for key, entry in pool.map(upload, sorted(names.items())):
            entries[key] = entry
            done, sent = done + 1, sent + entry.size
            if progress is not None:
                progress(done, len(names), sent)
    manifest = Manifest(entries).to_bytes()
    store.put(MANIFEST, manifest)  # last: its presence means the dataset is whole
    return Pushed([f"{store.url}/{p.name}" for p in lists], len(entries), sent, time.monotonic() - started,
                  _sha256(manifest))


# ---- check at submission ---------------------------------------------------------------------------

@dataclass(frozen=True)
class RemoteList:
    url: str
    manifest_sha256: str
    manifest: Manifest
    text: str                       # the list file, checked against the manifest
    files: list[tuple[str, int]]    # every file it names (relative path, line)

    @property
    def n_samples(self) -> int:
        return len(parse_list(self.text, Path(_split(self.url)[1])))


def _manifest(store: Storage, base: str, expected: str | None) -> tuple[Manifest, bytes]:
    where = f"{base}/{MANIFEST}"
    try:
        data = store.get(MANIFEST)
    except ObjectNotFound:
        raise DataError(f"no {MANIFEST} there: push the dataset with `relay data push FOLDER {base}`", list_file=where) from None
    if expected is not None and _sha256(data) != expected:
        raise DataError(f"the dataset changed since the job was submitted (manifest sha256 {_sha256(data)[:12]}…, "
                        f"the job has {expected[:12]}…): push it to a new prefix and submit again", list_file=where)
    return Manifest.parse(data, where), data


def _checked(data: bytes, entry: Entry, where: str) -> bytes:
    if len(data) != entry.size or _sha256(data) != entry.sha256:
        raise DataError(f"object does not match the manifest ({len(data)} bytes, sha256 {_sha256(data)[:12]}…; "
                        f"the manifest has {entry.size} bytes, {entry.sha256[:12]}…): push the dataset again", list_file=where)
    return data


def _list_in(manifest: Manifest, url: str, data: bytes) -> tuple[str, list[tuple[str, int]]]:
    """The list's text and the files it names, each in the manifest."""
    name = _split(url)[1]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"list file is not UTF-8 text ({exc.reason} at byte {exc.start})", list_file=url) from None
    try:
        samples = parse_list(text, Path(name))
    except DataError as exc:
        raise DataError(exc.problem, list_file=url, line=exc.line, path=exc.path) from None
    files = _referenced(samples, url)
    for rel, line in files:
        if rel not in manifest.files:
            raise DataError(f"not in the dataset's {MANIFEST} (push the folder again)", list_file=url, line=line, path=rel)
    return text, files


def open_remote_list(url: str, manifest_sha256: str | None = None) -> RemoteList:
    """Read a list from the bucket and check it against its manifest: the list itself, and every
    file it names present in the manifest and in the bucket with the manifest's size. DataError
    names the URL, line and file at fault; StorageError a bucket that cannot be read."""
    base, name = _split(url)
    store = _open(base)
    manifest, data = _manifest(store, base, manifest_sha256)
    if name not in manifest.files:
        raise DataError(f"the list file is not in the dataset's {MANIFEST}", list_file=url)
    try:
        raw = store.get(name)
    except ObjectNotFound:
        raise DataError("the list file is in the manifest but not in the bucket (push the dataset again)", list_file=url) from None
    text, files = _list_in(manifest, url, _checked(raw, manifest.files[name], url))
    sizes = store.sizes("")
    for rel, line in files:
        if rel not in sizes:
            raise DataError(f"no object {base}/{rel} (push the dataset again)", list_file=url, line=line, path=rel)
        if sizes[rel] != manifest.files[rel].size:
            raise DataError(f"object {base}/{rel} has {sizes[rel]} bytes, the manifest {manifest.files[rel].size} "
                            f"(push the dataset again)", list_file=url, line=line, path=rel)
    return RemoteList(url, _sha256(data), manifest, text, files)


def sample_count(where: str, manifest_sha256: str | None = None) -> int:
    """Samples in a list file, a path or a pushed list's URL (checked against its manifest)."""
    if is_remote(where):
        return open_remote_list(where, manifest_sha256).n_samples
    return len(read_list(where))


# ---- fetch on a worker ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Fetched:
    list_file: Path   # the local copy of the list, its files beside it
    files: int        # files fetched now (0: all were here)
    bytes: int
    seconds: float


def local_folder(cache: Path, manifest_sha256: str) -> Path:
    return Path(cache) / "datasets" / manifest_sha256


def fetch(url: str, manifest_sha256: str, cache: Path, threads: int = THREADS, progress: Progress | None = None) -> Fetched:
    """The list at `url` and every file it names, under local_folder(cache, manifest_sha256): what is
    already there (the right size, put there verified) is kept, the rest fetched in parallel and
    verified. An object that does not match the manifest is fetched once more, then refused."""
    started = time.monotonic()
    base, name = _split(url)
    root = local_folder(cache, manifest_sha256)
    local_list = root / name
    store = _open(base)
    try:
        data = (root / MANIFEST).read_bytes()
        fresh = _sha256(data) != manifest_sha256
    except FileNotFoundError:
        fresh = True
    if fresh:
        manifest, data = _manifest(store, base, manifest_sha256)
        atomic_write_bytes(root / MANIFEST, data)
    else:
        manifest = Manifest.parse(data, str(root / MANIFEST))

    def get(rel: str) -> bytes:
        entry, where = manifest.files[rel], f"{base}/{rel}"
        for attempt in (1, 2):
            try:
                return _checked(store.get(rel), entry, where)
            except ObjectNotFound:
                raise DataError("object is in the manifest but not in the bucket (push the dataset again)", list_file=where) from None
            except DataError:
                if attempt == 2:
                    raise
                log.warning("%s: does not match the manifest; fetching it again", where)
        raise AssertionError("unreachable")

    list_data = None if local_list.is_file() else get(name)
    _, files = _list_in(manifest, url, list_data if list_data is not None else local_list.read_bytes())
    missing = [rel for rel, _ in files if not _whole(root / rel, manifest.files[rel])]
    if missing:
        _remove_dead_temporaries(root)
    done, got = 0, 0

    def fetch_one(rel: str) -> int:
        data = get(rel)
        atomic_write_bytes(root / rel, data)
        return len(data)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for size in pool.map(fetch_one, missing):
            done, got = done + 1, got + size
            if progress is not None:
                progress(done, len(missing), got)
    if list_data is not None:  # last: a list file here means every file it names is here too
        atomic_write_bytes(local_list, list_data)
        done, got = done + 1, got + len(list_data)
    return Fetched(local_list, done, got, time.monotonic() - started)


def _whole(path: Path, entry: Entry) -> bool:
    """A file a fetch renamed into place (so verified then) and still of the manifest's size."""
    try:
        return path.stat().st_size == entry.size
    except OSError:
        return False


def _remove_dead_temporaries(root: Path) -> None:
    """Temporary files of fetches whose process died (atomic_write_bytes names them
    .<name>.<pid>.<thread>.tmp): never trusted, only taking space."""
    for tmp in root.rglob(".*.tmp"):
        try:
            pid = int(tmp.name.rsplit(".", 3)[-3])
            os.kill(pid, 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, IndexError, PermissionError):
            continue  # not ours, or another user's live process
