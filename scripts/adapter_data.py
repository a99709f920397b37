"""Reading and checking training/eval data (CSV or JSONL files, or a split of a Hugging Face dataset) and turning
rows into prompts.

Shared by train_adapter and eval_adapter so a served adapter is always evaluated on the prompts it was trained on.
Every problem is a DataError with a one-line message naming the file, the row and the column.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import string
from dataclasses import dataclass, field
from pathlib import Path

Row = dict[str, object]


class DataError(ValueError):
    """The data cannot be used: the message names the file and what is wrong."""


@dataclass
class DatasetSplit:
    """One split of a Hugging Face dataset, read with the `datasets` library: a dataset name (fetched from its hub
    unless HF_HUB_OFFLINE=1 and cached), a local data folder (CSV/JSON files named by split, as `load_dataset` reads
    them) or a folder written by `DatasetDict.save_to_disk`."""

    name: str
    split: str
    _rows: list[Row] | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        return f"{self.name}[{self.split}]"

    def rows(self) -> list[Row]:
        """The split's rows, a ClassLabel column as its label names (loaded once)."""
        if self._rows is None:
            try:
                import datasets
            except ImportError:
                raise DataError(f"{self}: reading a Hugging Face dataset needs the datasets package: "
                                "pip install 'loraswap[datasets]'") from None
            folder = Path(self.name)
            if (folder / "dataset_dict.json").is_file():
                saved = datasets.load_from_disk(str(folder))
                if self.split not in saved:
                    raise DataError(f"{self}: no split {self.split!r}; the dataset has {', '.join(saved)}")
                data = saved[self.split]
            else:
                data = datasets.load_dataset(self.name, split=self.split)
            names = {col: f for col, f in data.features.items() if isinstance(f, datasets.ClassLabel)}
            self._rows = [{col: names[col].int2str(v) if col in names and isinstance(v, int) and v >= 0 else v
                           for col, v in row.items()} for row in data]
        if not self._rows:
            raise DataError(f"{self}: no data rows")
        return self._rows


DataSource = Path | DatasetSplit


def data_sha256(source: DataSource) -> str:
    """A file's sha256, or a dataset split's: of its rows as sorted-key JSON lines."""
    if isinstance(source, DatasetSplit):
        lines = "".join(json.dumps(row, sort_keys=True, default=str) + "\n" for row in source.rows())
        return hashlib.sha256(lines.encode()).hexdigest()
    return hashlib.sha256(source.read_bytes()).hexdigest()


def read_rows(path: DataSource) -> list[Row]:
    """All rows of a CSV (header row) or JSONL file (UTF-8 only), or of a dataset split."""
    if isinstance(path, DatasetSplit):
        return path.rows()
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 (invalid byte at offset {exc.start})") from None
    text = text.removeprefix("\ufeff")
    if path.suffix == ".csv":
        rows: list[Row] = list(csv.DictReader(io.StringIO(text)))
    elif path.suffix in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise DataError(f"{path}: line {number} is not valid JSON") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {number} is not a JSON object")
            rows.append(row)
    else:
        raise DataError(f"{path}: unknown format {path.suffix!r}; use .csv or .jsonl")
    if not rows:
        raise DataError(f"{path}: no data rows")
    return rows


def column(rows: list[Row], name: str, path: Path) -> list[str]:
    """The non-empty string values of one column; a missing column or empty value names the row."""
    values = []
    for number, row in enumerate(rows, 1):
        if name not in row or row[name] is None:
            raise DataError(f"{path}: no column {name!r} (row {number} has: {', '.join(map(str, row))})")
        value = row[name]
        value = value if isinstance(value, str) else json.dumps(value)
        if not value.strip():
            raise DataError(f"{path}: row {number} has an empty {name!r}")
        values.append(value)
    return values


def template_fields(template: str) -> list[str]:
    """The column names a `str.format` template refers to, e.g. "Q: {question}" -> ["question"]."""
    try:
        return [field for _, field, _, _ in string.Formatter().parse(template) if field]
    except ValueError as exc:
        raise DataError(f"bad template {template!r}: {exc}") from None


def render(template: str, rows: list[Row], path: Path, truncate: dict[str, int] | None = None) -> list[str]:
    """Fill a template per row; `truncate` cuts the named columns first: N > 0 keeps the first N characters,
    N < 0 the last -N (e.g. the results at the end of an abstract)."""
    columns = {field: column(rows, field, path) for field in template_fields(template)}
    for field, limit in (truncate or {}).items():
        if field in columns:
            columns[field] = [value[:limit] if limit > 0 else value[limit:] for value in columns[field]]
    return [template.format_map({f: v[i] for f, v in columns.items()}) for i in range(len(rows))]


def check_labels_known(
    train_labels: list[str], eval_labels: list[str], path: Path, what: str = "label", known_by: str = "train"
) -> None:
    unseen = sorted(set(eval_labels) - set(train_labels))
    if unseen:
        raise DataError(
            f"{path}: {what} {unseen[0]!r} appears only in the eval data "
            f"({known_by} has: {', '.join(sorted(set(train_labels)))})"
        )


def parse_truncate(specs: list[str]) -> dict[str, int]:
    """`["context=1500"]` -> {"context": 1500}; `context=-800` keeps the last 800 characters."""
    out = {}
    for spec in specs:
        name, _, limit = spec.partition("=")
        if not name or not limit.removeprefix("-").isdigit() or int(limit) == 0:
            raise DataError(f"--truncate-column wants COLUMN=CHARS or COLUMN=-CHARS, got {spec!r}")
        out[name] = int(limit)
    return out
