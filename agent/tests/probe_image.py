"""The probe image the real-engine tests attack the host from, built without a registry.

It holds Debian's static busybox (package busybox-static) and nothing else of note: ``/bin/busybox``
and ``/bin/sh`` (a link to it), a two-line ``/etc/passwd`` and ``/etc/group`` (root and nobody),
and empty ``/work``, ``/tmp``, ``/proc``, ``/sys``, ``/dev``, ``/run``, ``/usr`` and ``/var``. The image is imported
from a tarball (``podman import`` / ``docker import``) and named
``gpgpu-probe:<digest of its contents>`` (no registry: the runner refuses local ones), so a
different busybox makes a new tag and an unchanged one is reused. Every probe calls its tools
through busybox (``busybox nc …``), so no applet links are needed.

Run it directly to build the image for an engine: ``python agent/tests/probe_image.py podman``.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPOSITORY = "gpgpu-probe"
# Bump when the layout below changes: the tag is a digest of this and busybox.
LAYOUT_VERSION = b"gpgpu-probe layout 2"
PASSWD = "root:x:0:0:root:/work:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"


class ProbeImageError(Exception):
    """The image cannot be built here; the sentence says what is missing."""


def static_busybox() -> Path:
    """Debian's static busybox (busybox-static), refusing a dynamically linked one: the image
    has no C library for it."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox", shutil.which("busybox")):
        if candidate and Path(candidate).is_file():
            path = Path(candidate).resolve()
            if _is_static_elf(path.read_bytes()):
                return path
            raise ProbeImageError(
                f"{path} is dynamically linked; install busybox-static (apt-get install busybox-static)"
            )
    raise ProbeImageError("busybox is not installed; install busybox-static (apt-get install busybox-static)")


def _is_static_elf(data: bytes) -> bool:
    """A 64-bit little-endian ELF with no PT_INTERP program header (no dynamic loader)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != 3 for i in range(phnum))


def image_tarball(busybox: Path) -> tuple[bytes, str]:
    """The root filesystem as a tar, and the tag (digest of busybox and the layout)."""
    binary = busybox.read_bytes()
    tag = hashlib.sha256(LAYOUT_VERSION + binary).hexdigest()[:12]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for directory, mode in (("bin", 0o755), ("etc", 0o755), ("work", 0o755), ("tmp", 0o1777)):
            tar.addfile(_info(directory, tarfile.DIRTYPE, mode))
        for directory in ("proc", "sys", "dev", "run", "usr", "var"):
            tar.addfile(_info(directory, tarfile.DIRTYPE, 0o755))
        tar.addfile(_info("bin/busybox", tarfile.REGTYPE, 0o755, len(binary)), io.BytesIO(binary))
        link = _info("bin/sh", tarfile.SYMTYPE, 0o777)
        link.linkname = "busybox"
        tar.addfile(link)
        for name, text in (("etc/passwd", PASSWD), ("etc/group", GROUP)):
            data = text.encode()
            tar.addfile(_info(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
    return buffer.getvalue(), tag


def _info(name: str, kind: bytes, mode: int, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.mtime = 0
    return info


def ensure_probe_image(engine_bin: str, *, timeout_s: float = 120) -> str:
    """The probe image's reference in the engine ``engine_bin`` (podman or docker), imported
    when it is not there yet. Raises ProbeImageError with the engine's message."""
    data, tag = image_tarball(static_busybox())
    ref = f"{REPOSITORY}:{tag}"
    found = subprocess.run(  # noqa: S603 - argv, no shell
        [engine_bin, "image", "inspect", ref], capture_output=True, timeout=timeout_s, check=False
    )
    if found.returncode == 0:
        return ref
    with tempfile.NamedTemporaryFile(suffix=".tar") as f:
        f.write(data)
        f.flush()
        done = subprocess.run(  # noqa: S603 - argv, no shell
            [engine_bin, "import", f.name, ref], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    if done.returncode != 0:
        raise ProbeImageError(f"`{engine_bin} import` failed: {done.stderr.strip()}")
    return ref


if __name__ == "__main__":
    print(ensure_probe_image(sys.argv[1] if len(sys.argv) > 1 else "podman"))
