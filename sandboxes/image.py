"""Builds the sandbox image without any image registry: a minimal Debian root file system made by
debootstrap (from the Debian package mirror), imported into the local Docker engine."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time

from .limits import SandboxUnavailable

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "k2rl-sandbox:latest"
DEFAULT_SUITE = "bookworm"
# The full Python standard library: programs under test expect json, decimal, fractions, ...
DEFAULT_PACKAGES = ("python3",)
IMAGE_LABEL = "k2rl.sandbox.image"

_PRUNE = (
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
)


def split_image_name(name: str) -> tuple[str, str]:
    """'repo/name:tag' -> ('repo/name', 'tag'); the tag defaults to 'latest'."""
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1 :]
    return name, "latest"


def docker_client(timeout: int = 60):
    """A Docker SDK client whose engine answers, or SandboxUnavailable saying what is missing."""
    try:
        import docker
    except ImportError as exc:
        raise SandboxUnavailable(
            "the Docker SDK for Python is not installed (pip install 'docker>=7')"
        ) from exc
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except Exception as exc:  # DockerException, connection errors, missing socket
        raise SandboxUnavailable(
            f"no Docker engine answers ({type(exc).__name__}: {exc}). Install and start one "
            "(as root: apt-get install docker.io && dockerd &), or set DOCKER_HOST"
        ) from exc
    return client


def image_exists(name: str = DEFAULT_IMAGE, client=None) -> bool:
    import docker

    client = client or docker_client()
    try:
        client.images.get(name)
    except docker.errors.ImageNotFound:
        return False
    return True


def build_image(
    name: str = DEFAULT_IMAGE,
    *,
    suite: str = DEFAULT_SUITE,
    packages: tuple[str, ...] = DEFAULT_PACKAGES,
    mirror: str | None = None,
    client=None,
) -> None:
    """Build the sandbox image `name`: `debootstrap --variant=minbase --include=<packages> <suite>`
    into a temporary directory, trimmed, then imported into the Docker engine.

    Needs root, the `debootstrap` program (apt-get install debootstrap) and a running engine; raises
    SandboxUnavailable naming whichever is missing, and RuntimeError if a step fails.
    """
    debootstrap = shutil.which("debootstrap") or next(
        (p for p in ("/usr/sbin/debootstrap", "/sbin/debootstrap") if os.path.exists(p)), None
    )
    if debootstrap is None:
        raise SandboxUnavailable("debootstrap is not installed (as root: apt-get install debootstrap)")
    if os.geteuid() != 0:
        raise SandboxUnavailable("building the sandbox image needs root (debootstrap creates a root file system)")
    if shutil.which("tar") is None:
        raise SandboxUnavailable("tar is not installed")
    client = client or docker_client(timeout=600)
    repository, tag = split_image_name(name)

    work = tempfile.mkdtemp(prefix="k2rl-image-")
    rootfs = os.path.join(work, "rootfs")
    archive = os.path.join(work, "rootfs.tar")
    try:
        started = time.monotonic()
        command = [debootstrap, "--variant=minbase", f"--include={','.join(packages)}", suite, rootfs]
        if mirror:
            command.append(mirror)
        log.info("building %s: %s", name, " ".join(command))
        done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
            raise RuntimeError(f"debootstrap failed (exit {done.returncode}):\n{tail}")
        for relative in _PRUNE:
            path = os.path.join(rootfs, relative)
            if os.path.isdir(path):
                for entry in os.listdir(path):
                    target = os.path.join(path, entry)
                    if os.path.isdir(target) and not os.path.islink(target):
                        shutil.rmtree(target, ignore_errors=True)
                    else:
                        os.unlink(target)
        # Mount point of the per-run scratch tmpfs (the root file system is mounted read-only).
        os.makedirs(os.path.join(rootfs, "scratch"), mode=0o755, exist_ok=True)
        subprocess.run(
            ["tar", "--numeric-owner", "-C", rootfs, "-cf", archive, "."],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
        changes = [
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            f"LABEL {IMAGE_LABEL}=1",
            "WORKDIR /",
            'CMD ["python3"]',
        ]
        client.api.import_image_from_file(archive, repository=repository, tag=tag, changes=changes)
        if not image_exists(name, client):
            raise RuntimeError(f"docker import finished but image {name} is not there")
        log.info("built %s in %.1f s", name, time.monotonic() - started)
    finally:
        shutil.rmtree(work, ignore_errors=True)
