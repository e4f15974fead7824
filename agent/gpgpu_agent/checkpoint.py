"""A job's checkpoint directory, carried between its leases (docs/agent-api.md, "Checkpoints").

The directory is the renter's: everything in it was written by code the agent does not trust,
and an archive to restore may have been made by another machine's agent (or forged by it). So:

- ``pack`` runs after the workload is dead and reads the directory through file descriptors,
  never following a symbolic link (the directory itself, or any of its parents below the work
  directory, replaced by a link is refused), and keeps only directories and regular files with
  one name: symbolic links, hard-linked files (the other name may be a file outside the
  directory), device nodes, FIFOs and sockets are left out, set-id bits dropped. The archive is capped while
  it is written (content and entries), not after.
- ``unpack`` checks the archive's size and SHA-256 (``Restore``) before it reads it, and extracts
  into the lease's new, empty work directory before the workload starts: only directories and
  regular files, names relative and without ``..``, nothing created through a link, the total
  size and the number of entries capped; each created entry is given to the rental user.
- ``write_status`` keeps ``/work/.gpgpu-lease.json`` current in the job's view, written whole
  by rename through the work directory's descriptor, so a link the job planted there is
  replaced, never followed.
- ``prepare_work`` does both for a new lease, before its workload starts: a job may read its
  status file at its first instruction.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from gpgpu_agent.protocols import AgentError
from gpgpu_agent.types import LeaseSpec

# The job's view of its work directory (both runners mount it there).
WORKSPACE = "/work"
STATUS_FILE = ".gpgpu-lease.json"
MAX_ENTRIES = 100_000
MAX_DEPTH = 64
# The most an extended header (PAX records, a GNU long name) of a restored archive may hold: a
# packed one names a path of at most MAX_DEPTH parts of 255 bytes.
MAX_EXTENDED_HEADER_BYTES = 256 * 1024
_BLOCK = 512
_BLOCK = tarfile.BLOCKSIZE
_READ = 1 << 20


class CheckpointError(AgentError):
    """The checkpoint cannot be packed, fetched or restored (a sentence for the log and the renter)."""


@dataclass(frozen=True, slots=True)
class Packed:
    path: Path
    size: int
    sha256: str
    files: int
    # Entries left out: links, hard-linked files, devices, FIFOs, sockets.
    skipped: int


def relative_parts(checkpoint_dir: str) -> tuple[str, ...]:
    """The parts of `checkpoint_dir` below /work; CheckpointError for a path that is not under it
    in normal form (the marketplace checks it too: an agent does not trust its orders' paths)."""
    path = PurePosixPath(checkpoint_dir)
    parts = path.parts
    if (
        not checkpoint_dir.startswith(WORKSPACE + "/")
        or str(path) != checkpoint_dir
        or len(parts) < 3
        or any(p in {"", ".", ".."} or "\x00" in p for p in parts[2:])
    ):
        raise CheckpointError(f"the checkpoint directory {checkpoint_dir!r} is not a directory under {WORKSPACE}")
    return tuple(parts[2:])


def suggested_interval_s(*, predicted_idle_s: float | None, promised_s: int | None) -> int:
    """How often the job should checkpoint: a quarter of the owner's predicted remaining absence
    (so an interruption costs a small share of the run), between 60 s and an hour, and no longer
    than the job promised; without a forecast, its promise or ten minutes."""
    if predicted_idle_s is None:
        suggested = float(promised_s or 600)
    else:
        suggested = min(max(predicted_idle_s / 4, 60.0), 3600.0)
    if promised_s:
        suggested = min(suggested, float(promised_s))
    return int(suggested)


# --- packing ----------------------------------------------------------------------------------


def _open_dir(name: str, dir_fd: int | None) -> int:
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def _open_below(work: Path, parts: tuple[str, ...]) -> int | None:
    """A descriptor of work/<parts>, every step without following a link; None when missing."""
    fd = _open_dir(str(work), None)
    try:
        for part in parts:
            try:
                child = _open_dir(part, fd)
            except FileNotFoundError:
                return None
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise CheckpointError(f"{part!r} in the checkpoint path is not a directory (a link?)") from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_from(top: int, names: tuple[str, ...]) -> int:
    """A new descriptor of top/<names>, no step following a link."""
    fd = os.dup(top)
    try:
        for name in names:
            try:
                child = _open_dir(name, fd)
            except OSError as exc:
                raise CheckpointError(f"{name!r} changed while the checkpoint was packed: {exc.strerror}") from None
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Budget:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 2 * _BLOCK  # the archive's end
        self.entries = 0

    def take(self, content: int, name: str) -> None:
        self.entries += 1
        # A header, a PAX one before it with the name (a path of MAX_DEPTH long names is 16 KB:
        # three blocks let the archive grow to several times its limit before the last check),
        # and the content, each padded to blocks.
        pax = -(-(len(name.encode("utf-8", "surrogateescape")) + 64) // _BLOCK) * _BLOCK
        self.used += 2 * _BLOCK + pax + -(-content // _BLOCK) * _BLOCK
        if self.entries > MAX_ENTRIES:
            raise CheckpointError(f"the checkpoint has more than {MAX_ENTRIES} entries")
        if self.used > self.max_bytes:
            raise CheckpointError(f"the checkpoint is larger than its limit of {self.max_bytes} bytes")


def pack(work: Path, checkpoint_dir: str, dest: Path, *, max_bytes: int) -> Packed | None:
    """Pack the job's checkpoint directory (a path of its view) of the lease's work directory
    `work` into the tar archive `dest` (mode 0600); None when the directory does not exist.
    Raises CheckpointError when it is a link, or over `max_bytes` or MAX_ENTRIES (then nothing is
    left at `dest`). The workload must be over: its files are read as they are."""
    parts = relative_parts(checkpoint_dir)
    top = _open_below(work, parts)
    if top is None:
        return None
    budget = _Budget(max_bytes)
    skipped = files = 0
    dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    # Directories still to pack, by their names below the top; each is opened from the top
    # through descriptors when its turn comes (one descriptor per level, however wide the tree).
    stack: list[tuple[str, ...]] = [()]
    try:
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(out, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            while stack:
                names = stack.pop()
                fd = _open_from(top, names)
                try:
                    for entry in sorted(_listing(fd, MAX_ENTRIES - budget.entries), key=lambda e: e.name):
                        name = "/".join((*names, entry.name))
                        st = entry.stat(follow_symlinks=False)
                        if stat.S_ISDIR(st.st_mode):
                            if len(names) + 1 > MAX_DEPTH:
                                raise CheckpointError(f"the checkpoint is deeper than {MAX_DEPTH} directories")
                            budget.take(0, name)
                            info = tarfile.TarInfo(name)
                            info.type = tarfile.DIRTYPE
                            info.mode = (st.st_mode & 0o777) | 0o700
                            info.mtime = int(st.st_mtime)
                            tar.addfile(info)
                            stack.append((*names, entry.name))
                        elif stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                            files += 1
                            _add_file(tar, fd, entry.name, name, budget)
                        else:
                            skipped += 1
                finally:
                    os.close(fd)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    finally:
        os.close(top)
    size, digest = file_digest(dest)
    if size > max_bytes:
        dest.unlink(missing_ok=True)
        raise CheckpointError(f"the checkpoint is larger than its limit of {max_bytes} bytes")
    return Packed(path=dest, size=size, sha256=digest, files=files, skipped=skipped)


def _listing(fd: int, room: int) -> list[os.DirEntry[str]]:
    """The directory's entries, refused past `room` while they are listed: a job that made
    millions of files in one directory had them all listed and sorted in the agent's memory
    (150 MiB for 300,000) before the count stopped it."""
    listed: list[os.DirEntry[str]] = []
    with os.scandir(fd) as entries:
        for entry in entries:
            listed.append(entry)
            if len(listed) > room:
                raise CheckpointError(f"the checkpoint has more than {MAX_ENTRIES} entries")
    return listed


def _add_file(tar: tarfile.TarFile, dir_fd: int, entry: str, name: str, budget: _Budget) -> None:
    try:
        fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        raise CheckpointError(f"could not read {name!r}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:  # swapped since it was listed
            raise CheckpointError(f"{name!r} changed while it was packed")
        budget.take(st.st_size, name)
        info = tarfile.TarInfo(name)
        info.size = st.st_size
        info.mode = st.st_mode & 0o777
        info.mtime = int(st.st_mtime)
        tar.addfile(info, f)  # reads exactly info.size bytes (OSError if the file shrank)


def file_digest(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_READ):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


# --- restoring ----------------------------------------------------------------------------------


def _safe_name(name: str) -> tuple[str, ...]:
    path = PurePosixPath(name)
    parts = tuple(p for p in path.parts if p not in ("", "."))
    if path.is_absolute() or not parts or any(p == ".." or "\x00" in p for p in parts):
        raise CheckpointError(f"the checkpoint holds an entry {name[:200]!r} outside its directory")
    return parts


def unpack(archive: Path, work: Path, checkpoint_dir: str, *, max_bytes: int, owner: tuple[int, int] | None) -> int:
    """Extract the checkpoint `archive` (already checked against its hash) into work/<dir> of
    a new lease whose workload has not started; returns the number of files. `owner` (uid, gid):
    who gets every directory and file created (None: the agent's user). Raises CheckpointError
    for an entry that is not a regular file or directory, a name outside the directory, a
    duplicate, more than MAX_ENTRIES or `max_bytes` of content."""
    parts = relative_parts(checkpoint_dir)
    root = work
    for part in parts:
        root = root / part
        try:
            os.mkdir(root, 0o700)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(root).st_mode):
                raise CheckpointError(f"{root} is not a directory") from None
        if owner is not None:
            os.lchown(root, *owner)
    _extended_headers_check(archive)
    total = files = entries = 0
    archive_size = archive.stat().st_size
    data_end = 0  # where the last member's content ended in the archive
    try:
        with tarfile.open(archive, mode="r:") as tar:
            for member in _members(tar):
                # Each member's content lies after the one before and within the archive: a size
                # below 0 (base-256, or a PAX record) made tarfile jump back and read the same
                # bytes again as new members, past max_bytes and the duplicate check (a 63 KiB
                # archive wrote 880 KiB), and a forged checkpoint could fill a machine's disk.
                if member.size < 0 or member.offset_data < data_end or member.offset_data + member.size > archive_size:
                    raise CheckpointError(f"the checkpoint's {member.name[:200]!r} is not where a tar member can be")
                data_end = member.offset_data + member.size
                entries += 1
                if entries > MAX_ENTRIES:
                    raise CheckpointError(f"the checkpoint has more than {MAX_ENTRIES} entries")
                names = _safe_name(member.name)
                if len(names) > MAX_DEPTH:
                    raise CheckpointError(f"the checkpoint is deeper than {MAX_DEPTH} directories")
                parent = _open_below(root, names[:-1])
                if parent is None:
                    raise CheckpointError(f"the checkpoint's {member.name[:200]!r} comes before its directory")
                try:
                    if member.isdir():
                        _make_dir(parent, names[-1], member.mode, owner)
                    elif member.isreg():
                        total += member.size
                        if total > max_bytes:
                            raise CheckpointError(f"the checkpoint holds more than {max_bytes} bytes")
                        source = tar.extractfile(member)
                        if source is None:
                            raise CheckpointError(f"the checkpoint's {member.name[:200]!r} cannot be read")
                        _write_file(parent, names[-1], source, member.size, member.mode, owner)
                        files += 1
                    else:
                        raise CheckpointError(
                            f"the checkpoint's {member.name[:200]!r} is not a regular file or directory"
                        )
                finally:
                    os.close(parent)
    except (tarfile.TarError, EOFError) as exc:
        raise CheckpointError(f"the checkpoint is not a readable tar archive: {exc}") from None
    return files


def _extended_headers_check(archive: Path) -> None:
    """Refuse an archive with an extended header that is not well formed or over
    MAX_EXTENDED_HEADER_BYTES, before tarfile reads it: tarfile before Python 3.11.10 parses PAX
    records made of a long run of digits in quadratic time (CVE-2024-6232: 80 KB took 4 s of CPU,
    a forged checkpoint of a megabyte would hold an agent's poll loop for minutes), and reads a
    long name whole into memory. tarfile reads headers at multiples of 512 bytes only, so every
    such block that is a tar header (its checksum holds) of type x, g, L or K is looked at,
    wherever it lies; a file's content that happens to be one is judged the same way."""
    with open(archive, "rb") as f:
        offset = 0
        while chunk := f.read(1 << 20):  # whole blocks: 1 MiB is 2,048 of them
            for i in range(0, len(chunk) - _BLOCK + 1, _BLOCK):
                if chunk[i + 156] in b"xgLK" and _is_header(chunk[i : i + _BLOCK]):
                    size = _octal(chunk[i + 124 : i + 136])
                    if size is None or size > MAX_EXTENDED_HEADER_BYTES:
                        raise CheckpointError(
                            f"the checkpoint has an extended tar header over {MAX_EXTENDED_HEADER_BYTES} bytes"
                        )
                    if chunk[i + 156] in b"xg":
                        at = f.tell()
                        f.seek(offset + i + _BLOCK)
                        _pax_records_check(f.read(size))
                        f.seek(at)
            offset += len(chunk)


def _octal(field: bytes) -> int | None:
    """A header's number in octal (None for base-256, or for what is no number)."""
    text = field.split(b"\0", 1)[0].strip()
    if not text:
        return 0
    if not all(48 <= c <= 55 for c in text):
        return None
    return int(text, 8)


def _is_header(block: bytes) -> bool:
    """Whether tarfile would take the block for a header: its checksum holds."""
    stored = _octal(block[148:156])
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    signed = unsigned - 256 * sum(1 for c in (*block[:148], *block[156:]) if c > 127)
    return stored is not None and stored in (unsigned, signed)


def _pax_records_check(data: bytes) -> None:
    """PAX records are "<length> <keyword>=<value>\\n", the length counting the whole record,
    then NUL padding: checked in one pass."""
    pos, end = 0, len(data)
    while pos < end and data[pos] != 0:
        space = data.find(b" ", pos, pos + 20)
        digits = data[pos:space] if space > pos else b""
        length = int(digits) if digits.isdigit() else 0
        record = data[pos : pos + length]
        if length < len(digits) + 4 or pos + length > end or not record.endswith(b"\n") or b"=" not in record:
            raise CheckpointError("the checkpoint has a PAX header that is not well formed")
        pos += length
    if data[pos:].strip(b"\0"):
        raise CheckpointError("the checkpoint has a PAX header that is not well formed")


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while (member := tar.next()) is not None:
        yield member


def _make_dir(parent: int, name: str, mode: int, owner: tuple[int, int] | None) -> None:
    try:
        os.mkdir(name, (mode & 0o777) | 0o700, dir_fd=parent)
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(name, dir_fd=parent).st_mode):
            raise CheckpointError(f"{name!r} is in the checkpoint twice") from None
        return
    if owner is not None:
        os.chown(name, *owner, dir_fd=parent, follow_symlinks=False)


def _write_file(parent: int, name: str, source: IO[bytes], size: int, mode: int, owner: tuple[int, int] | None) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, (mode & 0o777) | 0o600, dir_fd=parent)
    except FileExistsError:
        raise CheckpointError(f"{name!r} is in the checkpoint twice") from None
    with os.fdopen(fd, "wb") as out:
        left = size
        while left > 0:
            chunk = source.read(min(_READ, left))
            if not chunk:
                raise CheckpointError(f"the checkpoint's {name!r} is cut short")
            out.write(chunk)
            left -= len(chunk)
        if owner is not None:
            os.fchown(out.fileno(), *owner)


# --- the job's status file ----------------------------------------------------------------------


def write_status(work: Path, data: Mapping[str, object]) -> None:
    """Write /work/.gpgpu-lease.json of the lease's work directory `work` whole (by rename, mode
    0644), through the directory's descriptor: whatever the job put at that name (a link, a
    file) is replaced, never followed or written through. Raises OSError."""
    wfd = _open_dir(str(work), None)
    try:
        tmp = f"{STATUS_FILE}.tmp"
        try:
            os.unlink(tmp, dir_fd=wfd)
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=wfd)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o644)
            json.dump(dict(data), f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, STATUS_FILE, src_dir_fd=wfd, dst_dir_fd=wfd)
    finally:
        os.close(wfd)


def prepare_work(work: Path, spec: LeaseSpec, *, owner: tuple[int, int] | None) -> None:
    """Fill the new lease's empty work directory before its workload starts: the job's checkpoint
    restored (when the lease has one to restore; `owner` as for ``unpack``) and its status file
    (``spec.agent_status``, when given). Raises CheckpointError with a sentence for the renter."""
    if spec.restore_archive is not None and spec.checkpoint is not None:
        try:
            unpack(
                Path(spec.restore_archive), work, spec.checkpoint.dir, max_bytes=spec.checkpoint.max_bytes, owner=owner
            )
        except (CheckpointError, OSError) as exc:
            raise CheckpointError(f"could not restore the job's checkpoint: {exc}") from exc
    if spec.agent_status:
        try:
            write_status(work, spec.agent_status)
        except OSError as exc:
            raise CheckpointError(f"could not write the job's status file: {exc.strerror or exc}") from exc
