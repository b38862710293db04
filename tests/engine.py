"""What the compose test needs from a Docker engine on a machine without a container registry.

Stand-in base images: where python:3.11-slim or redis:7-alpine cannot be pulled, one Debian
bookworm root filesystem made by debootstrap (Python 3.11, venv, redis-server) is imported under
both names. A local package index: the project's dependencies (torch included), pinned to what
this interpreter has installed, taken from the local wheel stores pip's configuration names
(downloaded by this machine's pip where none holds them) and served on the loopback for the
build's TORCH_INDEX_URL and PIP_INDEX_URL: the build downloads nothing from outside.
"""
from __future__ import annotations

import contextlib
import html
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

BASE_IMAGES = ("python:3.11-slim", "redis:7-alpine")
DEBIAN_PACKAGES = "python3,python3-venv,python-is-python3,ca-certificates,redis-server"
# What each stand-in needs from the image it replaces: the redis image's working directory holds
# its append-only file.
STAND_IN_CHANGES = {
    "python:3.11-slim": ["ENV LANG=C.UTF-8", 'CMD ["python3"]'],
    "redis:7-alpine": ["WORKDIR /data", 'CMD ["redis-server"]'],
}


def run(args: list[str], timeout: float, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]


def has_image(image: str) -> bool:
    return run(["docker", "image", "inspect", image], 60).returncode == 0


def debian_mirror() -> str:
    """The Debian mirror apt uses here (deb822 or one-line sources)."""
    for path in sorted(Path("/etc/apt").glob("sources.list*")) + sorted(Path("/etc/apt/sources.list.d").glob("*")):
        if path.is_file():
            text = path.read_text(errors="replace")
            found = re.search(r"^URIs:\s*(\S+/debian)/?\s*$", text, re.M) or re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)/?\s", text, re.M)
            if found:
                return found[1]
    return "http://deb.debian.org/debian"


def ensure_base_images(work: Path) -> list[str]:
    """Pull each base image, or import a stand-in; returns the images this made (to remove later)."""
    missing = [image for image in BASE_IMAGES if not has_image(image) and run(["docker", "pull", image], 300).returncode != 0]
    if not missing:
        return []
    if shutil.which("debootstrap") is None:
        raise RuntimeError(f"cannot pull {missing} and debootstrap is not installed to make stand-ins")
    rootfs = work / "rootfs"
    made = run(["debootstrap", "--variant=minbase", f"--include={DEBIAN_PACKAGES}", "bookworm", str(rootfs), debian_mirror()], 1800)
    if made.returncode != 0:
        raise RuntimeError(f"debootstrap failed:\n{made.stdout[-3000:]}{made.stderr[-3000:]}")
    tarball = work / "rootfs.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tarball), "."], check=True, timeout=600)
    for image in missing:
        changes = [arg for change in STAND_IN_CHANGES[image] for arg in ("--change", change)]
        imported = run(["docker", "import", *changes, str(tarball), image], 600)
        assert imported.returncode == 0, f"docker import {image}: {imported.stderr}"
    shutil.rmtree(rootfs)
    tarball.unlink()
    return missing


# ---- local torch wheels ------------------------------------------------------------------------


# The image's Python may be an older 3.11 than this one (Debian 12 has 3.11.2), and some
# dependencies are only needed there (redis needs async-timeout before 3.11.3).
OLDEST_PYTHON = {"python_full_version": "3.11.0"}


def _needed(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": extra}) for env in ({}, OLDEST_PYTHON) for extra in {"", *extras})


def _pins(roots: list[str]) -> tuple[dict[str, str], list[str]]:
    """The requirements' closure: name -> version installed in this interpreter (extras followed),
    and the requirements installed nowhere here (needed only by an older Python)."""
    pins: dict[str, str] = {}
    absent: list[str] = []
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            absent.append(f"{req.name}{req.specifier}")
            continue
        pins[key[0]] = dist.version
        todo += [dep for line in dist.requires or [] if _needed(dep := Requirement(line), set(req.extras))]
    return pins, absent


def _local_stores() -> list[Path]:
    """Local folders and file:// indexes named by pip's configuration."""
    listed = run([sys.executable, "-m", "pip", "config", "list"], 60).stdout
    places = []
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(("find-links", "index-url")):
            places += value.strip().strip("'\"").split()
    out = []
    for place in places:
        path = Path(unquote(urlparse(place).path)) if place.startswith("file:") else Path(place)
        if path.is_absolute() and path.is_dir():
            out.append(path)
    return out


def _local_wheels() -> dict[tuple[str, str], list[Path]]:
    """(name, version) -> wheel files, from find-links folders and the pages of file:// indexes."""
    found: dict[tuple[str, str], list[Path]] = {}

    def add(path: Path) -> None:
        try:
            name, version, _, _ = parse_wheel_filename(path.name)
        except ValueError:
            return
        found.setdefault((name, str(version)), []).append(path)

    for store in _local_stores():
        for wheel in store.glob("*.whl"):
            add(wheel)
        for page in store.glob("*/index.html"):
            for href in re.findall(r'href="([^"#]+)', page.read_text(errors="replace")):
                wheel = (page.parent / unquote(html.unescape(href))).resolve()
                if wheel.suffix == ".whl" and wheel.is_file():
                    add(wheel)
    return found


def project_wheelhouse(dest: Path, project: str = "relay", extra: tuple[str, ...] = ("wheel",)) -> Path:
    """A PEP 503 index at dest/simple with everything the image installs: the project's dependency
    closure pinned to this interpreter's versions (torch included), and `extra` (build requirements
    this interpreter lacks). Wheels come from local stores where they lie, else this machine's pip
    downloads them (with its own index and TLS settings), so the build needs no network but ours."""
    roots = [line for line in metadata.distribution(project).requires or [] if _needed(Requirement(line), set())]
    pins, absent = _pins(roots)
    local = _local_wheels()
    files = dest / "files"
    files.mkdir(parents=True)
    wanted = [*absent, *extra]
    for name, version in pins.items():
        for wheel in local.get((name, version), []):
            with contextlib.suppress(FileExistsError):
                (files / wheel.name).symlink_to(wheel)
        if (name, version) not in local:
            wanted.append(f"{name}=={version}")
    got = run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(files), *wanted], 3600)
    assert got.returncode == 0, f"pip download {wanted}: {got.stderr[-3000:]}"
    for wheel in sorted(files.iterdir()):
        if wheel.name.endswith(".whl"):
            name = canonicalize_name(parse_wheel_filename(wheel.name)[0])
        else:  # an sdist: name-version.tar.gz
            name = canonicalize_name(wheel.name.rsplit("-", 1)[0])
        page = dest / "simple" / name / "index.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        with page.open("a") as f:
            f.write(f'<a href="../../files/{wheel.name}">{wheel.name}</a>\n')
    return dest / "simple"


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    """folder over HTTP on the loopback (builds run with --network host and reach it there)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(folder), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert time.monotonic() < deadline and proc.poll() is None, "the wheel server did not start"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()
