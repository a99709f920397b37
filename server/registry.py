"""The adapter store on disk: names, versions, records, atomic installs and crash recovery.

Storage only: loading weights into memory is the engine's job. Two layers: the adapters shipped with the package
(plain folders, read-only, never written) and the writable store, outside the source tree, which holds everything
uploaded or fine-tuned; a name in the store shadows a shipped one. Layout under the writable store:

    <name>/                      a plain PEFT folder put there by hand (adapter_config.json, adapter_model.safetensors,
                                 loraswap.json), version 1 unless its record.json says otherwise (the shipped
                                 adapters are such folders, in the package)
    <name> -> .versions/<name>/<v>   an uploaded (or replaced) adapter: a relative symlink to its current version
    .versions/<name>/<v>/        one immutable version: the PEFT files plus record.json (version, created)
    .tmp/                        uploads being unpacked and checked; deleted folders on their way out

A version folder is written in .tmp, checked, fsynced and renamed into .versions in one step, and never changed
afterwards, so a request that located version v always loads v's weights. The highest version in
.versions/<name> is the current one; the symlink is a derived pointer that start-up recovery repairs, so a crash at
any point leaves either the old or the new version, never half of one. The previous version is kept until the next
replace (or restart): a request that located it just before a replace can still load it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from .adapter_format import CONFIG_FILE, WEIGHTS_FILE, AdapterWeights
from .archive import ArchiveLimits, check_file_name, extract_archive, is_archive
from .errors import AdapterExists, AdapterForOtherBase, AdapterInvalid, AdapterNotFound, AdapterReadOnly, InvalidInput
from .types import AdapterLocation

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
RECORD_FILE = "record.json"  # the registry's own facts about one version
VERSIONS_DIR = ".versions"
STAGING_DIR = ".tmp"

CheckAdapter = Callable[[Path], AdapterWeights]  # reads an adapter folder, raises AdapterInvalid (engine.check_adapter)


@dataclass
class AdapterRecord:
    name: str
    version: int
    task: str
    labels: list[str] | None
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    sha256: str
    created: str
    folder: Path = field(repr=False)  # where this version's files live; not shown to clients
    metrics: dict | None = None
    dora: bool = False  # a DoRA adapter (use_dora): LoRA pairs plus a magnitude vector per layer

    def as_dict(self) -> dict:
        data = asdict(self)
        del data["folder"]
        return data


def valid_name(name: str) -> bool:
    return NAME_PATTERN.fullmatch(name) is not None and ".." not in name


def check_name(name: str) -> None:
    if not valid_name(name):
        raise InvalidInput(
            "name",
            f"{name!r} is not a valid adapter name: 1-64 characters from a-z, 0-9, '.', '_', '-', starting with a "
            "letter or digit, without '..' (a name, never a path)",
        )


class Registry:
    """Names -> records and folders. Thread-safe; every read sees a fully installed adapter or none."""

    def __init__(self, root: Path, shipped: Path | None = None):
        self.root = Path(root).absolute()
        self.shipped = Path(shipped).absolute() if shipped is not None else None  # read-only, never written
        self._lock = threading.Lock()  # guards _records and every change to the store
        self._records: dict[str, AdapterRecord] = {}
        self._shipped_records: dict[str, AdapterRecord] = {}  # the shipped adapters that fit the base
        self._skipped: dict[str, str] = {}  # name -> why the last scan did not serve that entry
        self._other_base: dict[str, str] = {}  # name -> the base it was trained on, for adapters of another base
        self._scanned: set[str] = set()  # every entry name the last scan saw on disk

    # ---- reading ---------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._records)

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._records

    def records(self) -> list[AdapterRecord]:
        with self._lock:
            return [self._records[n] for n in sorted(self._records)]

    def skipped(self) -> dict[str, str]:
        """Store entries the last scan did not serve (an adapter for another base, a broken folder) and why."""
        with self._lock:
            return dict(self._skipped)

    def other_base(self) -> dict[str, str]:
        """Adapters (shipped or in the store) trained on another base than the loaded one: name -> that base."""
        with self._lock:
            return dict(self._other_base)

    def exists(self, name: str) -> bool:
        with self._lock:
            return name in self._records

    def get(self, name: str) -> AdapterRecord:
        with self._lock:
            record = self._records.get(name)
        if record is None:
            raise AdapterNotFound(name, self.names())
        return record

    def locate(self, name: str) -> AdapterLocation:
        record = self.get(name)
        return AdapterLocation(record.name, record.version, record.folder, record.sha256)

    def scan(self, describe: CheckAdapter) -> list[str]:
        """Repair what a crash left, then (re)read the store and the shipped adapters; `describe(folder)` checks an
        adapter against the base. Returns the problems of skipped folders (one broken folder must not keep the server
        from starting). Adapters of another base are not problems: see other_base(); in the writable store they are
        listed as skipped too (with their base), shipped ones are simply not served."""
        skipped = self._recover()
        records: dict[str, AdapterRecord] = {}
        shipped: dict[str, AdapterRecord] = {}
        other_base: dict[str, str] = {}
        scanned = {p.name for p in self.root.iterdir()} if self.root.is_dir() else set()
        for layer, found in ((self.root, records), (self.shipped, shipped)):
            for entry in _adapter_folders(layer):
                folder = layer / os.readlink(entry) if entry.is_symlink() else entry
                try:
                    found[entry.name] = self._record(entry.name, folder, describe(folder))
                except AdapterForOtherBase as exc:
                    other_base[entry.name] = exc.base
                    if layer == self.root:
                        skipped[entry.name] = str(exc)
                except Exception as exc:
                    skipped[entry.name] = str(exc)
        with self._lock:
            self._records = {**shipped, **records}
            self._shipped_records = shipped
            self._skipped = skipped
            self._other_base = other_base
            self._scanned = scanned
        return [f"{name}: {problem}" for name, problem in skipped.items() if name not in other_base]

    def _record(self, name: str, folder: Path, adapter: AdapterWeights) -> AdapterRecord:
        stored = json.loads((folder / RECORD_FILE).read_text()) if (folder / RECORD_FILE).is_file() else {}
        created = stored.get("created") or _iso(datetime.fromtimestamp((folder / WEIGHTS_FILE).stat().st_mtime))
        return AdapterRecord(
            name=name,
            version=int(stored.get("version", 1)),
            created=created,
            metrics=adapter.metadata.get("metrics"),
            folder=folder,
            **adapter.describe(),
        )

    # ---- writing ---------------------------------------------------------------------------------------------

    def add(
        self,
        name: str,
        uploads: list[tuple[str, BinaryIO]],
        check: CheckAdapter,
        limits: ArchiveLimits,
        replace: bool = False,
    ) -> tuple[AdapterRecord, AdapterRecord | None]:
        """Install an uploaded adapter: one archive, or its files as (file name, content) pairs.

        Returns the new record and the one it replaced. Nothing becomes visible unless every check passes;
        AdapterInvalid lists every problem, AdapterExists refuses an existing name unless `replace`.
        """
        check_name(name)
        if not replace and self.exists(name):
            raise AdapterExists(name)  # before unpacking anything; checked again when committing
        with self._staging() as staged:
            if len(uploads) == 1 and is_archive(uploads[0][1]):
                extract_archive(uploads[0][1], staged, limits)
            else:
                _write_files(uploads, staged)
            adapter = check(staged)
            return self._commit(name, staged, adapter, replace)

    def _commit(
        self, name: str, staged: Path, adapter: AdapterWeights, replace: bool
    ) -> tuple[AdapterRecord, AdapterRecord | None]:
        with self._lock:
            current = self._records.get(name)
            if current is not None and not replace:
                raise AdapterExists(name)
            entry = self.root / name
            if current is None and os.path.lexists(entry):
                raise AdapterExists(name, self._unserved_entry_message(name))
            versions = self.root / VERSIONS_DIR / name
            existing = [int(p.name) for p in versions.iterdir() if p.name.isdigit()] if versions.is_dir() else []
            version = max([current.version if current else 0, *existing]) + 1
            (staged / RECORD_FILE).write_text(json.dumps({"name": name, "version": version, "created": _now()}))
            _fsync_tree(staged)
            versions.mkdir(parents=True, exist_ok=True)
            _fsync_dir(versions.parent)
            if current is not None and current.folder == entry:
                # a plain folder in the store becomes the previous version (restart recovery points at the newest);
                # a shipped adapter stays in the package, shadowed by the new version
                os.rename(entry, versions / str(current.version))
            os.rename(staged, versions / str(version))  # the commit point
            _fsync_dir(versions)
            self._point(name, version)
            record = self._record(name, versions / str(version), adapter)
            self._records[name] = record
            self._collect(name, keep={version, current.version if current else version})
        log.info("installed adapter %s v%d (%s, sha256 %s)", name, version, adapter.task, adapter.sha256[:12])
        return record, current

    def _unserved_entry_message(self, name: str) -> str:
        """Why `<root>/<name>` exists on disk although no adapter of that name is served."""
        if name in self._skipped:
            return (f"the store holds a {name!r} that is not a valid adapter (skipped at start: {self._skipped[name]}): "
                    "remove it first")
        if name in self._scanned:
            return f"the store holds a {name!r} that is not an adapter (no {CONFIG_FILE}): remove it first"
        return (f"the store holds a {name!r} written after the server started: the store is read only at start, "
                f"so it is not served; remove it from {self.root} (or restart the server to serve it) first")

    def delete(self, name: str) -> AdapterRecord:
        """Remove an adapter and all its versions from the store; returns its record."""
        with self._lock:
            record = self._records.get(name)
            if record is None:
                raise AdapterNotFound(name, sorted(self._records))
            if record is self._shipped_records.get(name):
                raise AdapterReadOnly(name)
            trash = self._staging_root() / f"deleted-{uuid.uuid4().hex}"
            trash.mkdir()
            versions = self.root / VERSIONS_DIR / name
            if versions.is_dir():
                os.rename(versions, trash / "versions")  # the commit point for uploaded adapters
            entry = self.root / name
            if entry.is_symlink():
                entry.unlink()
            else:
                os.rename(entry, trash / "folder")  # the commit point for shipped ones
            _fsync_dir(self.root)
            del self._records[name]
            if name in self._shipped_records:  # the store's versions shadowed a shipped adapter: it is served again
                self._records[name] = self._shipped_records[name]
        shutil.rmtree(trash, ignore_errors=True)
        log.info("deleted adapter %s v%d (sha256 %s)", name, record.version, record.sha256[:12])
        return record

    def _point(self, name: str, version: int) -> None:
        """Swap the `<name>` symlink to `.versions/<name>/<version>` atomically (rename over the old link)."""
        target = f"{VERSIONS_DIR}/{name}/{version}"
        entry = self.root / name
        if entry.is_symlink() and os.readlink(entry) == target:
            return
        link = self._staging_root() / f"link-{uuid.uuid4().hex}"
        os.symlink(target, link)
        os.replace(link, entry)
        _fsync_dir(self.root)

    def _collect(self, name: str, keep: set[int]) -> None:
        """Delete the versions of `name` other than `keep` (nothing references them any more)."""
        versions = self.root / VERSIONS_DIR / name
        for folder in versions.iterdir():
            if not (folder.name.isdigit() and int(folder.name) in keep):
                shutil.rmtree(folder, ignore_errors=True)

    def _recover(self) -> dict[str, str]:
        """Start-up repair after a crash: drop staging leftovers, point every name at its newest complete version,
        drop links whose versions were deleted, and collect old versions (no request references them yet).
        Returns name -> problem for what it could not repair."""
        problems: dict[str, str] = {}
        with self._lock:
            shutil.rmtree(self.root / STAGING_DIR, ignore_errors=True)
            versions_root = self.root / VERSIONS_DIR
            for versions in sorted(versions_root.iterdir()) if versions_root.is_dir() else []:
                numbers = sorted(int(p.name) for p in versions.iterdir() if p.name.isdigit())
                if not numbers:
                    shutil.rmtree(versions)
                    continue
                entry = self.root / versions.name
                if entry.exists() and not entry.is_symlink():
                    problems[versions.name] = f"a plain folder shadows its uploaded versions in {versions}"
                    continue
                self._point(versions.name, numbers[-1])
                self._collect(versions.name, keep={numbers[-1]})
            for entry in self.root.iterdir() if self.root.is_dir() else []:
                if entry.is_symlink() and not entry.exists():
                    entry.unlink()  # a delete that was cut short after its commit point
        return problems

    def _staging_root(self) -> Path:
        root = self.root / STAGING_DIR
        root.mkdir(parents=True, exist_ok=True)
        return root

    @contextmanager
    def _staging(self) -> Iterator[Path]:
        """A fresh folder inside the store (same file system, so the final rename is atomic), removed unless
        it was installed."""
        folder = Path(tempfile.mkdtemp(prefix="upload-", dir=self._staging_root()))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _adapter_folders(layer: Path | None) -> list[Path]:
    """The entries of a store layer that hold an adapter (named validly, with its config file), sorted."""
    if layer is None or not layer.is_dir():
        return []
    return sorted(p for p in layer.iterdir() if valid_name(p.name) and p.is_dir() and (p / CONFIG_FILE).is_file())


def _write_files(uploads: list[tuple[str, BinaryIO]], target: Path) -> None:
    problems = [problem for file_name, _ in uploads if (problem := check_file_name(file_name))]
    names = [file_name for file_name, _ in uploads]
    problems += [f"file {n!r} is uploaded twice" for n in sorted({n for n in names if names.count(n) > 1})]
    if not uploads:
        problems.append(f"no files uploaded: send the adapter as a .zip or .tar.gz, or as {CONFIG_FILE} and "
                        f"{WEIGHTS_FILE}")
    if problems:
        raise AdapterInvalid(problems)
    for file_name, content in uploads:
        with (target / file_name).open("wb") as out:
            shutil.copyfileobj(content, out)


def _fsync_tree(folder: Path) -> None:
    for file in folder.iterdir():
        with file.open("rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _now() -> str:
    return _iso(datetime.now(timezone.utc))


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds")
