"""Build and run medpipe's image with podman on this kind of machine (tests/test_container.py, benchmarks/container.py).

    python tests/container_image.py            # make (or reuse) the base and build localhost/medpipe:test

Constraints found by trying (docs/guides/containers.md, "Building without a registry"): Debian's podman 4.3 runs
containers with ``--runtime runc --cgroup-manager cgroupfs``, explicit nofile/nproc ulimits and ``--network host``;
no registry is reachable, so the base image (Debian bookworm + Debian's python3) is made with ``debootstrap``
and ``podman import``ed; its tarball is cached under ``$XDG_CACHE_HOME/medpipe`` (``~/.cache/medpipe``) between
runs. pip inside the build uses this machine's pip configuration (``pip config list``, written to one file) and
every file or folder it names (CA bundle, constraints, local wheel folders), mounted read-only.
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("MEDPIPE_TEST_IMAGE", "localhost/medpipe:test")
BASE_IMAGE = "localhost/medpipe-base:bookworm-python3"
BASE_PACKAGES = "python3,python3-venv"
MIRROR = os.environ.get("MEDPIPE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
RUN_FLAGS = ["--network", "host", "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medpipe"


def podman(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"podman {shlex.join(args[:3])} ... failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r


def unavailable() -> str | None:
    """Why containers cannot run here (None when they can): podman, runc and debootstrap present and a
    trivial container started."""
    for tool in ("podman", "runc", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (.ci/apt.d/container.txt lists the Debian packages)"
    if os.geteuid() != 0:
        return "debootstrap and podman's host network need root here"
    try:
        ensure_base()
        r = podman("run", "--rm", *RUN_FLAGS, BASE_IMAGE, "python3", "-c", "print('ok')", timeout=120, check=False)
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
        return f"cannot make the base image: {str(exc)[-500:]}"
    if r.returncode != 0 or r.stdout.strip() != "ok":
        return f"podman cannot run a container here: {r.stderr.strip()[-500:]}"
    return None


def ensure_base() -> str:
    """The local Debian bookworm + python3 base: already in podman's store, or imported from the cached
    tarball, or made with debootstrap (about a minute) and cached."""
    if podman("image", "exists", BASE_IMAGE, check=False).returncode == 0:
        return BASE_IMAGE
    tarball = cache_dir() / f"bookworm-minbase-{BASE_PACKAGES.replace(',', '-')}.tar"
    if not tarball.is_file():
        tarball.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="medpipe-rootfs-") as tmp:
            rootfs = Path(tmp) / "rootfs"
            r = subprocess.run(["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm",
                                str(rootfs), MIRROR], capture_output=True, text=True, timeout=900)
            if r.returncode != 0:
                raise RuntimeError(f"debootstrap failed: {(r.stdout + r.stderr).strip()[-1500:]}")
            for junk in ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*_*", "usr/share/doc/*",
                         "usr/share/man/*", "usr/share/locale/*", "usr/share/info/*"):  # as the official slim images
                for p in rootfs.glob(junk):
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            partial = tarball.with_suffix(".partial")
            subprocess.run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], check=True, timeout=300)
            partial.rename(tarball)
    with tarball.open("rb") as f:
        r = subprocess.run([*PODMAN, "import", "-", BASE_IMAGE], stdin=f, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"podman import failed: {r.stderr.strip()[-1000:]}")
    return BASE_IMAGE


def pip_mounts(workdir: Path) -> list[str]:
    """``-v`` options giving the build this machine's pip configuration (one pip.conf) and every local path
    it names, read-only."""
    r = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60)
    options, paths = {}, set()
    for line in r.stdout.splitlines():  # "global.cert='/etc/...'", ":env:.find-links='/opt/wheels'" (env wins)
        key, _, value = line.partition("=")
        name, value = key.rpartition(".")[2], value.strip().strip("'\"")
        if name and value:
            options[name] = value
    for value in options.values():
        for token in value.split():
            p = token.removeprefix("file://").rstrip("/")
            if token.startswith("file://") and p.endswith("/simple"):  # a local index: its files lie beside it
                p = p.rpartition("/")[0]
            if p.startswith("/") and Path(p).exists():
                paths.add(p)
    conf = workdir / "pip.conf"
    conf.write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in options.items()))
    mounts = ["-v", f"{conf}:/etc/pip.conf:ro"]
    for p in sorted(paths):
        mounts += ["-v", f"{p}:{p}:ro"]
    return mounts


def free_port() -> int:
    """A port for a container on the host network, below the ephemeral range: with many outgoing connections on
    the machine, a port the kernel handed out (bind to port 0) is soon some client's local port, and binding
    0.0.0.0 to it then fails."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def git_revision() -> str:
    r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    return r.stdout.strip() if r.returncode == 0 else "unknown"


def build(image: str = IMAGE, timeout: float = 900) -> str:
    """Build ``image`` from the Containerfile on the local base (podman's layer cache makes a rebuild quick)."""
    from medpipe import __version__

    base = ensure_base()
    with tempfile.TemporaryDirectory(prefix="medpipe-build-") as tmp:
        args = ["build", *RUN_FLAGS, "--build-arg", f"BASE={base}", "--build-arg", "TORCH_INDEX=",
                "--build-arg", f"VERSION={__version__}", "--build-arg", f"REVISION={git_revision()}",
                *pip_mounts(Path(tmp)), "-f", str(ROOT / "Containerfile"), "-t", image, str(ROOT)]
        podman(*args, timeout=timeout)
    return image


def image_size(image: str = IMAGE) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    print(unavailable() or f"built {build()} ({image_size() / 1e6:.0f} MB)")
