"""Safe extraction of uploaded adapter archives (.zip, .tar.gz) into a folder we own.

An upload is untrusted input: every member is checked before a byte is written, links and special files are
refused, paths may not escape the target, and the member count and the uncompressed total are bounded. The total
is summed from the declared sizes, which bound what is unpacked: zipfile stops at a member's declared size and
checks its CRC, and a tar member's data is exactly its header's size. The adapter may sit at the archive's root or
inside one top-level folder; nested folders below that are refused.
"""

from __future__ import annotations

import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterator

from .errors import AdapterInvalid

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
GZIP_MAGIC = b"\x1f\x8b"
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # a plain file name, never a path


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int
    max_uncompressed_bytes: int


@dataclass
class _Member:
    path: str  # as written in the archive
    size: int  # declared uncompressed size
    kind: str  # "file", "dir" or a reason it is refused ("a symbolic link", ...)
    open: Callable[[], BinaryIO]


def _head(source: BinaryIO) -> bytes:
    head = source.read(4)
    source.seek(0)
    return head


def is_archive(source: BinaryIO) -> bool:
    """Whether a (seekable) upload starts like a .zip or a gzip file."""
    return _head(source).startswith(ZIP_MAGIC + (GZIP_MAGIC,))


def check_file_name(name: str) -> str | None:
    """A problem if `name` is not a plain, safe file name (uploaded files keep their own names)."""
    if not FILE_NAME.match(name) or ".." in name:
        return f"file name {name!r} is not allowed (a plain name: letters, digits, '.', '_', '-')"
    return None


def extract_archive(archive: BinaryIO, target: Path, limits: ArchiveLimits) -> None:
    """Extract a .zip or .tar.gz (a seekable file) into `target`, flat: the adapter's files. Raise AdapterInvalid
    with every problem."""
    head = _head(archive)
    try:
        if head.startswith(ZIP_MAGIC):
            with zipfile.ZipFile(archive) as zf:
                _extract(_zip_members(zf, limits), target, limits)
        elif head.startswith(GZIP_MAGIC):
            with tarfile.open(fileobj=archive, mode="r:gz") as tf:
                _extract(_tar_members(tf, limits), target, limits)
        else:
            raise AdapterInvalid(["the upload is neither a .zip nor a .tar.gz archive"])
    # zlib.error: a corrupt deflate stream; RuntimeError: an encrypted zip member; NotImplementedError: an
    # unsupported compression method
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error, RuntimeError,
            NotImplementedError) as exc:
        raise AdapterInvalid([f"the archive cannot be read ({exc.__class__.__name__}: {exc})"]) from None


def _zip_members(zf: zipfile.ZipFile, limits: ArchiveLimits) -> Iterator[_Member]:
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise AdapterInvalid([f"the archive has {len(infos)} members, over the limit of {limits.max_members}"])
    for info in infos:
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            kind = "a symbolic link"
        elif info.is_dir():
            kind = "dir"
        elif stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # 0: written without Unix file-type bits
            kind = "not a regular file"
        else:
            kind = "file"
        yield _Member(info.filename, info.file_size, kind, lambda info=info: zf.open(info))


def _tar_members(tf: tarfile.TarFile, limits: ArchiveLimits) -> Iterator[_Member]:
    count = 0
    while (info := tf.next()) is not None:  # streams: a huge member list is cut off at the limit, never listed
        count += 1
        if count > limits.max_members:
            raise AdapterInvalid([f"the archive has more than {limits.max_members} members, the limit"])
        if info.issym() or info.islnk():
            kind = "a link"
        elif info.isdir():
            kind = "dir"
        elif not info.isfile():
            kind = "not a regular file"
        else:
            kind = "file"
        yield _Member(info.name, info.size, kind, lambda info=info: tf.extractfile(info))


def _extract(members: Iterator[_Member], target: Path, limits: ArchiveLimits) -> None:
    problems: list[str] = []
    files: list[tuple[PurePosixPath, _Member]] = []
    declared = 0
    for member in members:
        path = PurePosixPath(member.path.replace("\\", "/"))
        if path.is_absolute() or re.match(r"^[A-Za-z]:", member.path):  # POSIX, Windows (backslashes) or a drive
            problems.append(f"member {member.path!r} has an absolute path")
        elif ".." in path.parts:
            problems.append(f"member {member.path!r} leaves the archive folder ('..')")
        elif member.kind not in ("file", "dir"):
            problems.append(f"member {member.path!r} is {member.kind}; only regular files are accepted")
        elif member.kind == "file":
            files.append((path, member))
            declared += member.size
    if declared > limits.max_uncompressed_bytes:
        problems.append(f"the archive unpacks to {declared} bytes, over the limit of {limits.max_uncompressed_bytes}")
    if problems:
        raise AdapterInvalid(problems)
    if not files:
        raise AdapterInvalid(["the archive holds no files"])
    # the adapter's files sit at the root or inside one top-level folder
    strip = len({p.parts[0] for p, _ in files}) == 1 and all(len(p.parts) > 1 for p, _ in files)
    for path, member in files:
        parts = path.parts[1:] if strip else path.parts
        if len(parts) != 1:
            problems.append(f"member {member.path!r} is in a nested folder; the adapter's files must sit together")
            continue
        if problem := check_file_name(parts[0]):
            problems.append(problem)
            continue
        if (target / parts[0]).exists():
            problems.append(f"file {parts[0]!r} appears twice in the archive")
            continue
        with member.open() as source, (target / parts[0]).open("wb") as out:
            shutil.copyfileobj(source, out)
    if problems:
        raise AdapterInvalid(problems)


def write_zip(folder: Path, dest: BinaryIO, top: str) -> None:
    """Zip the regular files of an adapter folder under one top-level folder (stored: safetensors barely compress)."""
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED) as zf:
        for file in sorted(p for p in folder.iterdir() if p.is_file()):
            zf.write(file, f"{top}/{file.name}")

