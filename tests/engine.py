"""What the compose test needs from a Docker engine on a machine without a container registry.

Stand-in base images: where python:3.11-slim or redis:7-alpine cannot be pulled, one Debian
bookworm root filesystem made by debootstrap (Python 3.11, venv, redis-server) is imported under
both names. A local package index: the project's dependencies (torch included), pinned to what
this interpreter has installed, taken from the local wheel stores pip's configuration names
(downloaded by this machine's pip where none holds them) and served on the loopback for the
build's TORCH_INDEX_URL and PIP_INDEX_URL: the build downloads nothing from outside. A copy of
the checkout with a fresh .env, and the compose file's own build.

Run as a script, it builds ahead of the test (`.ci/run` does so while the other tests run): the
test's own build is then a cache hit.

    python tests/engine.py warm FOLDER   # base images and the image; FOLDER/made lists what it made
"""
from __future__ import annotations

import contextlib
import html
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[1]

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


def compose_command() -> list[str] | None:
    if shutil.which("docker") and run(["docker", "compose", "version"], 60).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose") and run(["docker-compose", "version"], 60).returncode == 0:
        return ["docker-compose"]
    return None


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


# The index's address is a build argument, so part of the build cache's key: on a fixed port, a
# build made earlier (`warm`) serves the test's build from the cache.
INDEX_PORT = 47651


def free_port(preferred: int = 0) -> int:
    """preferred where nothing listens on it, else any free port on the loopback."""
    for port in dict.fromkeys((preferred, 0)):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server binds
            with contextlib.suppress(OSError):
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
    raise OSError("no free port on the loopback")


@contextlib.contextmanager
def serve(folder: Path) -> Iterator[str]:
    """folder over HTTP on the loopback (builds run with --network host and reach it there)."""
    port = free_port(INDEX_PORT)  # elsewhere when taken: the build then runs uncached
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


# ---- the checkout and its build ----------------------------------------------------------------


def copy_checkout(dest: Path) -> None:
    """What a user's clone holds: tracked files and untracked ones git does not ignore."""
    listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], 120, cwd=ROOT)
    assert listed.returncode == 0, f"the test copies a git checkout: {listed.stderr}"
    for name in filter(None, listed.stdout.split("\0")):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def write_env(folder: Path, run_id: str) -> dict[str, str]:
    """.env from .env.example, as the README says: every change-me value changed; names and ports
    of this run's own so that it clashes with nothing else on the engine."""
    values = {
        "COMPOSE_PROJECT_NAME": f"relaye2e{run_id}",
        "REDIS_PASSWORD": secrets.token_hex(16),
        "RELAY_API_TOKEN": secrets.token_hex(16),
        "FLOWER_USER": "relay",
        "FLOWER_PASSWORD": secrets.token_hex(16),
        "RELAY_IMAGE": f"relay-e2e-{run_id}",
        "RELAY_API_PORT": str(free_port()),
        "FLOWER_PORT": str(free_port()),
    }
    lines = []
    for line in (folder / ".env.example").read_text().splitlines():
        key = line.partition("=")[0]
        lines.append(f"{key}={values[key]}" if key in values and not line.startswith("#") else line)
    (folder / ".env").write_text("\n".join(lines) + "\n")
    settings = {k: v for k, _, v in (ln.partition("=") for ln in lines if ln.strip() and not ln.startswith("#"))}
    assert not [k for k, v in settings.items() if v.startswith("change-me")], "a placeholder is left in .env"
    return settings


def shell_env(env: dict[str, str]) -> dict[str, str]:
    """The environment for compose commands: the shell's overrides .env in Compose, so without .env's keys."""
    return {k: v for k, v in os.environ.items() if k not in env}


def build(folder: Path, env: dict[str, str], work: Path) -> None:
    """The compose file's own build, with the engine's network (the build reaches the host's
    loopback) and a local index of the exact wheels instead of PyTorch's index and PyPI."""
    compose = yaml.safe_load((folder / "docker-compose.yml").read_text())
    built = [name for name, svc in compose["services"].items() if "build" in svc and not svc.get("profiles")]
    override = work / "build.yml"
    override.write_text(yaml.safe_dump({"services": {name: {"build": {"network": "host"}} for name in built}}))
    index = project_wheelhouse(work / "wheels")
    with serve(index.parent) as url:
        command = [*(compose_command() or []), "-f", "docker-compose.yml", "-f", str(override), "build",
                   "--build-arg", f"TORCH_INDEX_URL={url}/simple", "--build-arg", f"PIP_INDEX_URL={url}/simple"]
        result = run(command, 3000, cwd=folder, env=shell_env(env))
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"


def warm(work: Path) -> list[str]:
    """The base images and the compose build, as the test makes them; returns the images made."""
    started = time.monotonic()
    made = ensure_base_images(work)
    print(f"base images: {time.monotonic() - started:.0f} s (made: {made or 'none'})", flush=True)
    folder = work / "relay"
    copy_checkout(folder)
    env = write_env(folder, "warm")
    started = time.monotonic()
    build(folder, env, work)
    print(f"image {env['RELAY_IMAGE']}:cpu: {time.monotonic() - started:.0f} s", flush=True)
    return [f"{env['RELAY_IMAGE']}:cpu", *made]


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "warm":
        sys.exit(__doc__)
    folder = Path(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)
    images = warm(folder)
    (folder / "made").write_text("".join(f"{image}\n" for image in images))
