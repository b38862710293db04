"""Caches on shared storage that make an epoch cheap: the decoded data here, the frozen backbone's
features in segmodel.features (built the same way, with the helpers below).

This module imports no torch (only a batch of the data, as tensors, needs it): checking and
preparing data cost no seconds of importing it.

Prepared data, `<cache>/data/<key>/`: every sample decoded and resized once, exactly as the seed's
`load_sample` does it, into `images.npy` (N, H, W, 3) uint8 and `labels.npy` (N, H, W) uint8, read
back with `np.load(mmap_mode="r")`. The key is a sha256 of the format version, the sizes, the
Pillow version and, for every sample in list order, the resolved image and annotation paths with
their size and mtime_ns (or, with `content_hash=True`, a sha256 of their bytes). Rewriting a file
changes its mtime, so it gets a new key and a new cache; the old one is simply no longer used.
A rewrite that keeps both size and mtime_ns (a copy with preserved times) is not noticed unless
`content_hash=True` - the same rule as make's and rsync's.

Both caches are built in a temporary folder next to the final one and renamed into place, so a
reader sees a complete cache or none. Two workers building the same key at once both do the work;
the first rename wins and the other's copy is removed.

Space. Before a build the free space of the cache folder is checked against the cache's size
(CacheSpaceError naming the folder and the bytes, permanent: the job fails at once). The arrays'
blocks are then reserved up front (posix_fallocate), so a disk that fills up meanwhile is an
ENOSPC exception at that point - never a SIGBUS while writing through the memory map, which would
kill the process before it could clean up. Any failure removes the build folder; a folder left by
a builder that died (its host's process no longer exists) is removed by the next build.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import PIL

from segmodel.errors import CacheSpaceError, DataError, show_path
from segmodel.lists import Sample, read_list
from segmodel.samples import load_sample

if TYPE_CHECKING:
    import torch

DATA_FORMAT = 2  # bump when load_sample's output for the same file could change

Progress = Callable[[str, int, int], None]  # (stage, done, total)


# ---- keys ----------------------------------------------------------------------------------------

def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_entry(sample: Sample, path: Path, content_hash: bool, real_dirs: dict[Path, str]) -> list[Any]:
    """[real path, size, mtime(, sha256)] of one file. Its real path is its folder's (resolved once
    per folder in `real_dirs`) joined with its name unless the file is itself a symbolic link: the
    same string as `path.resolve()`, without resolving every component of every path."""
    try:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            real, st = str(path.resolve()), path.stat()
        else:
            folder = real_dirs.get(path.parent)
            if folder is None:
                folder = real_dirs[path.parent] = str(path.parent.resolve())
            real = os.path.join(folder, path.name)
    except FileNotFoundError:
        raise DataError("file does not exist", list_file=sample.list_file, line=sample.line, path=path) from None
    entry: list[Any] = [real, st.st_size, st.st_mtime_ns]
    if content_hash:
        entry.append(_file_sha256(path))
    return entry


# Stats of the first files, sequentially, slower than this per sample (a network filesystem, where
# each one is a round trip) send the rest to a thread pool; a local disk answers in microseconds.
SLOW_STAT_S = 2e-4
PROBE_SAMPLES = 64


def data_key(samples: Sequence[Sample], height: int, width: int, num_classes: int, *, content_hash: bool = False) -> str:
    """sha256 naming the prepared data of these samples at this size. Stats every file, every
    chunk: cheap next to a step (~10 ms for 480 samples on a local disk)."""
    h = hashlib.sha256()
    head = {"format": DATA_FORMAT, "height": height, "width": width, "num_classes": num_classes,
            "n": len(samples), "pillow": PIL.__version__, "content_hash": content_hash}
    h.update(json.dumps(head, sort_keys=True).encode() + b"\n")
    real_dirs: dict[Path, str] = {}

    def entry(s: Sample) -> bytes:
        return json.dumps([_file_entry(s, s.image, content_hash, real_dirs),
                           _file_entry(s, s.annotation, content_hash, real_dirs)]).encode()

    t0 = time.perf_counter()
    entries = [entry(s) for s in samples[:PROBE_SAMPLES]]
    rest = samples[PROBE_SAMPLES:]
    if rest and time.perf_counter() - t0 > SLOW_STAT_S * PROBE_SAMPLES:
        with ThreadPoolExecutor(max_workers=16) as pool:
            entries += pool.map(entry, rest)
    else:
        entries += [entry(s) for s in rest]
    for e in entries:
        h.update(e + b"\n")
    return h.hexdigest()


# ---- building --------------------------------------------------------------------------------------

def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished temporary folder into place; if someone else got there first, keep theirs."""
    _fsync_tree(tmp)
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / "meta.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


STALE_TMP_S = 24 * 3600  # a temporary build folder this old belongs to a builder that died
HEADROOM_BYTES = 64 << 20  # left free beside a new cache, for logs and checkpoints
_HOST = "".join(c if c.isalnum() or c == "-" else "_" for c in socket.gethostname())[:40]


def _builder_gone(folder: Path, now: float) -> bool:
    """A build folder whose builder is dead: a process of this host that no longer exists, or
    any builder silent for STALE_TMP_S."""
    parts = folder.name.split(".")  # .tmp-<key16>.<host>.<pid>.<random>
    if len(parts) == 5 and parts[2] == _HOST and parts[3].isdigit():
        try:
            os.kill(int(parts[3]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    try:
        return now - folder.stat().st_mtime > STALE_TMP_S
    except OSError:
        return False


def _tmp_dir(parent: Path, key: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in parent.glob(".tmp-*"):
        if _builder_gone(old, now):
            shutil.rmtree(old, ignore_errors=True)
    tmp = parent / f".tmp-{key[:16]}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def npy_bytes(shape: Sequence[int], dtype: Any) -> int:
    """Size of an .npy file of this shape and dtype (header included)."""
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize + 4096


def check_space(folder: Path, needed: int) -> None:
    """Raise CacheSpaceError unless `folder`'s file system has `needed` bytes free (plus headroom)."""
    free = shutil.disk_usage(folder).free
    if free < needed + HEADROOM_BYTES:
        raise CacheSpaceError(
            f"{show_path(folder)}: building this cache needs {needed:,} bytes ({needed / 2**30:.2f} GiB) "
            f"plus {HEADROOM_BYTES >> 20} MiB to spare, but only {free:,} bytes are free; free space there "
            f"or point RELAY_CACHE_DIR at a larger disk")


def allocate(path: Path, shape: tuple[int, ...], dtype: Any) -> np.memmap:
    """An .npy file memory-mapped for writing, every block reserved first: a full disk raises
    ENOSPC here instead of a SIGBUS when the map is written."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            zeros = bytes(1 << 20)  # no fallocate on this file system: reserve with plain writes
            for off in range(arr.offset, size, len(zeros)):
                os.pwrite(fd, zeros[: min(len(zeros), size - off)], off)
    finally:
        os.close(fd)
    return arr


def _read_meta(folder: Path, key: str) -> dict[str, Any] | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return meta if meta.get("key") == key else None


@dataclass
class DataCache:
    path: Path
    key: str
    images: np.ndarray  # (N, H, W, 3) uint8, memory-mapped
    labels: np.ndarray  # (N, H, W) uint8, memory-mapped
    built_s: float = 0.0  # seconds spent building it in this call (0: it was there)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    # Batches are tensors: torch is imported by their first use, never by building the cache.
    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) float and (N, H, W) int64: bit for bit what the seed's Dataset + default collate give."""
        import torch
        from segmodel.data import normalised_batch
        rows = list(indices)
        return normalised_batch(self.images[rows]), torch.from_numpy(self.labels[rows]).long()

    def label_batch(self, indices: Sequence[int]) -> torch.Tensor:
        """(N, H, W) uint8 class ids (the fast loss takes any integer type)."""
        import torch
        return torch.from_numpy(self.labels[list(indices)])


def open_arrays(folder: Path, key: str, names: tuple[str, ...]) -> list[np.ndarray] | None:
    """The cache's arrays, memory-mapped, if its metadata has this key and they are complete."""
    meta = _read_meta(folder, key)
    if meta is None:
        return None
    arrays = [np.load(folder / f"{name}.npy", mmap_mode="r") for name in names]
    return arrays if all(a.shape[0] == meta["n"] for a in arrays) else None


def _open_data(folder: Path, key: str, built_s: float = 0.0) -> DataCache | None:
    arrays = open_arrays(folder, key, ("images", "labels"))
    return DataCache(folder, key, *arrays, built_s) if arrays is not None else None


def data_cache(
    list_file: Path | str | Sequence[Sample],
    height: int,
    width: int,
    num_classes: int,
    root: Path | str,
    *,
    progress: Progress | None = None,
    threads: int | None = None,
    content_hash: bool = False,
) -> DataCache:
    """The prepared data of a list file (or parsed samples), built first if it is not on storage yet.

    Bad samples raise DataError naming list file, line and path, and leave no cache behind.
    """
    samples = read_list(list_file) if isinstance(list_file, (str, Path)) else list(list_file)
    key = data_key(samples, height, width, num_classes, content_hash=content_hash)

    def build(tmp: Path) -> dict[str, Any]:
        n = len(samples)
        check_space(tmp, npy_bytes((n, height, width, 3), np.uint8) + npy_bytes((n, height, width), np.uint8))
        images = allocate(tmp / "images.npy", (n, height, width, 3), np.uint8)
        labels = allocate(tmp / "labels.npy", (n, height, width), np.uint8)
        workers = threads or max(1, len(os.sched_getaffinity(0)))
        # PIL decodes and resizes with the GIL released: threads use every core. Windows of
        # samples bound the decoded images waiting to be written; a bad sample stops the rest.
        window = 64 * workers
        pool = ThreadPoolExecutor(max_workers=workers)
        try:
            for w0 in range(0, n, window):
                part = samples[w0 : w0 + window]
                for i, (rgb, lab) in enumerate(pool.map(lambda s: load_sample(s, height, width, num_classes), part), start=w0):
                    images[i] = rgb
                    labels[i] = lab
                if progress is not None:
                    progress("data", min(n, w0 + window), n)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        images.flush()
        labels.flush()
        return {"format": DATA_FORMAT, "n": n, "height": height, "width": width, "num_classes": num_classes,
                "samples": [[str(s.image), str(s.annotation)] for s in samples]}

    return open_or_build(Path(root) / "data", key, _open_data, build)


C = TypeVar("C")


def open_or_build(parent: Path, key: str, open_: Callable[[Path, str, float], C | None], build: Callable[[Path], dict[str, Any]]) -> C:
    """Open the cache `key`, or build it in a temporary folder and publish it whole (rename)."""
    final = parent / key
    found = open_(final, key, 0.0)
    if found is not None:
        return found
    t0 = time.perf_counter()
    tmp: Path | None = None
    try:
        tmp = _tmp_dir(parent, key)
        meta = build(tmp)
        meta.update(key=key, built=time.time(), seconds=time.perf_counter() - t0)
        (tmp / "meta.json").write_text(json.dumps(meta))
        _publish(tmp, final)
    except OSError as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        where = show_path(exc.filename or tmp or parent)
        if exc.errno == errno.ENOSPC:
            raise CacheSpaceError(f"{where}: no space left on the device while building the cache {show_path(final)} "
                                  f"(its build folder was removed); free space there or point RELAY_CACHE_DIR at a larger disk") from exc
        raise OSError(exc.errno, f"{exc.strerror} (building the cache {show_path(final)})", str(exc.filename or tmp or parent)) from exc
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    opened = open_(final, key, time.perf_counter() - t0)
    assert opened is not None
    return opened

