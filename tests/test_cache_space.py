"""The caches on a full disk: checked before building, a clean error naming the folder and the
bytes, no build folder left behind, never a SIGBUS. Run on a real small tmpfs, mounted in a
private mount namespace (`unshare -m`, as root)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from segmodel import cache as caches
from segmodel.errors import CacheSpaceError
from segmodel.synthetic import generate
from worker.trainer import TrainerFailed

from conftest import IN_CI

BUILD = """
import json, shutil, sys
from pathlib import Path
from segmodel import cache as caches
from segmodel.errors import CacheSpaceError
mnt, mode, train = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
if mode == "race":  # the check passes (someone else fills the disk right after it)
    caches.shutil.disk_usage = lambda p: shutil._ntuple_diskusage(1 << 40, 0, 1 << 40)
try:
    caches.data_cache(train, 240, 240, 101, mnt / "cache")
    out = {"ok": True}
except CacheSpaceError as exc:
    out = {"error": str(exc)}
out["left"] = sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*"))
out["free"] = shutil.disk_usage(mnt).free
print(json.dumps(out))
"""


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None


@pytest.fixture(scope="module")
def train_list(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("spacedata"), train=12, val=2, size=64, seed=1)["train"]


def _build_on_tmpfs(tmp_path: Path, size: str, mode: str, train: Path) -> dict:  # type: ignore[type-arg]
    if not _can_mount():
        if IN_CI:
            pytest.fail("CI runs as root with unshare: the full-disk tests must run")
        pytest.skip("needs root and unshare to mount a small tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = f'mount -t tmpfs -o size={size} tmpfs "$1" && exec "$0" -c "$2" "$1" "$3" "$4"'
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, sys.executable, str(mnt),
                           BUILD, mode, str(train)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"  # a SIGBUS would be -7 here
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_too_little_space_is_refused_before_building(tmp_path: Path, train_list: Path) -> None:
    out = _build_on_tmpfs(tmp_path, "8m", "check", train_list)
    needed = caches.npy_bytes((12, 240, 240, 3), np.uint8) + caches.npy_bytes((12, 240, 240), np.uint8)
    assert "error" in out, out
    assert "/mnt/cache/data/.tmp-" in out["error"] and f"needs {needed:,} bytes" in out["error"], out["error"]
    assert "bytes are free" in out["error"] and "RELAY_CACHE_DIR" in out["error"]
    assert out["left"] == ["cache", "cache/data"]  # no build folder left


def test_disk_full_while_building_is_an_error_not_sigbus(tmp_path: Path, train_list: Path) -> None:
    """The check is fooled; the disk (1 MiB) cannot hold the 2.1 MB image array: the reservation
    fails with ENOSPC, named, and the build folder goes. (Writing the memory map of a sparse file
    here, the old way, dies of SIGBUS.)"""
    out = _build_on_tmpfs(tmp_path, "1m", "race", train_list)
    assert "error" in out, out
    assert "no space left on the device" in out["error"] and "/mnt/cache/data/" in out["error"], out["error"]
    assert out["left"] == ["cache", "cache/data"]
    assert out["free"] > 1_000_000  # the partial reservation was given back


def test_enough_space_builds(tmp_path: Path, train_list: Path) -> None:
    out = _build_on_tmpfs(tmp_path, "96m", "check", train_list)
    assert out.get("ok"), out
    assert not [p for p in out["left"] if ".tmp-" in p]


def test_space_error_is_retried_where_there_may_be_room() -> None:
    """Each worker has its own cache disk (and space comes and goes): the chunk is retried, up to
    RELAY_MAX_ATTEMPTS, and the job fails with the message naming folder and bytes only then."""
    assert not TrainerFailed("CacheSpaceError", "x").permanent


def test_a_dead_builders_folder_is_removed(tmp_path: Path, train_list: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    parent = tmp_path / "cache" / "data"
    parent.mkdir(parents=True)
    left = parent / f".tmp-0123456789abcdef.{caches._HOST}.{dead.pid}.deadbeef"
    left.mkdir()
    (left / "images.npy").write_bytes(b"x" * 1000)
    alive = parent / f".tmp-0123456789abcdef.{caches._HOST}.{os.getpid()}.cafecafe"  # a live builder's: kept
    alive.mkdir()
    caches.data_cache(train_list, 64, 64, 101, tmp_path / "cache")
    assert not left.exists() and alive.exists()


def test_other_os_errors_name_the_cache(tmp_path: Path, train_list: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a, **k):  # type: ignore[no-untyped-def]
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(caches, "allocate", refuse)
    with pytest.raises(OSError, match="building the cache .*cache/data/"):
        caches.data_cache(train_list, 64, 64, 101, tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache" / "data").iterdir()] == []
    with pytest.raises(CacheSpaceError):
        caches.check_space(tmp_path, 1 << 60)


def test_the_old_way_dies_of_sigbus(tmp_path: Path) -> None:
    """The control: writing a sparse memory-mapped .npy on the same full tmpfs kills the process."""
    if not _can_mount():
        if IN_CI:
            pytest.fail("CI runs as root with unshare: the full-disk tests must run")
        pytest.skip("needs root and unshare to mount a small tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    code = "import numpy as np, sys; a = np.lib.format.open_memmap(sys.argv[1] + '/x.npy', mode='w+', dtype=np.uint8, shape=(12, 240, 240, 3)); a[:] = 1"
    script = 'mount -t tmpfs -o size=1m tmpfs "$1" && exec "$0" -c "$2" "$1"'
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, sys.executable, str(mnt), code],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -7, (proc.returncode, proc.stderr[-2000:])  # SIGBUS
