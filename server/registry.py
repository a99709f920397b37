"""The adapter store on disk: one folder per adapter name under the adapters directory.

Storage only: names, versions, files and records. Loading weights into memory is the engine's job.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from .adapter_format import CONFIG_FILE, WEIGHTS_FILE, AdapterWeights, file_sha256
from .engine import AdapterLocation
from .errors import AdapterNotFound

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
RECORD_FILE = "record.json"  # the registry's own facts about the installed version


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
    metrics: dict | None = None

    def as_dict(self) -> dict:
        return asdict(self)


class Registry:
    """Names -> records and folders. Thread-safe; every read sees a fully installed adapter or none."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock = threading.Lock()
        self._records: dict[str, AdapterRecord] = {}

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._records)

    def records(self) -> list[AdapterRecord]:
        with self._lock:
            return [self._records[n] for n in sorted(self._records)]

    def get(self, name: str) -> AdapterRecord:
        with self._lock:
            record = self._records.get(name)
        if record is None:
            raise AdapterNotFound(name, self.names())
        return record

    def locate(self, name: str) -> AdapterLocation:
        record = self.get(name)
        return AdapterLocation(record.name, record.version, self.root / name, record.sha256)

    def scan(self, describe) -> list[str]:
        """(Re)read the store; `describe(folder)` checks an adapter against the base. Returns skipped problems."""
        skipped: list[str] = []
        records: dict[str, AdapterRecord] = {}
        if self.root.is_dir():
            for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
                if not NAME_PATTERN.match(folder.name) or not (folder / CONFIG_FILE).is_file():
                    continue
                try:
                    records[folder.name] = self._record(folder, describe(folder))
                except Exception as exc:  # one broken folder must not keep the server from starting
                    skipped.append(f"{folder.name}: {exc}")
        with self._lock:
            self._records = records
        return skipped

    def _record(self, folder: Path, adapter: AdapterWeights) -> AdapterRecord:
        stored = {}
        if (folder / RECORD_FILE).is_file():
            stored = json.loads((folder / RECORD_FILE).read_text())
        created = stored.get("created") or _iso_mtime(folder / WEIGHTS_FILE)
        return AdapterRecord(
            name=folder.name,
            version=int(stored.get("version", 1)),
            task=adapter.task,
            labels=adapter.labels,
            rank=adapter.rank,
            alpha=adapter.alpha,
            target_modules=adapter.target_modules,
            size_bytes=adapter.size_bytes,
            sha256=adapter.sha256 or file_sha256(folder / WEIGHTS_FILE),
            created=created,
            metrics=adapter.metadata.get("metrics"),
        )


def _iso_mtime(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc).isoformat(timespec="seconds")
