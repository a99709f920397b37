"""eval-adapter: score any served adapter through a running server's /predict on a CSV/JSONL file.

    eval-adapter --url http://127.0.0.1:8000 --adapter spam --data dev.csv
    eval-adapter --url http://127.0.0.1:8000 --adapter pubmedqa --data dev.jsonl --metadata adapters/pubmedqa

Prints the metrics train-adapter prints. Column names and templates default to what the adapter's loraswap.json
records (`--metadata` folder or file); flags override them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx

from scripts.adapter_data import DataError, check_labels_known, column, parse_truncate, read_rows, render
from scripts.metrics import classification_metrics, format_metrics, generation_metrics

PROG = "eval-adapter"


class Poster(Protocol):
    """httpx.Client or starlette's TestClient: anything that POSTs JSON and returns a response."""

    def post(self, url: str, **kwargs): ...


@dataclass
class EvalSpec:
    """How rows become /predict inputs and gold answers (the same fields train-adapter records)."""

    task: str
    text_column: str = "text"
    label_column: str = "label"
    prompt_template: str = "{prompt}"
    answer_template: str = "{answer}"
    decision_column: str | None = None
    decision_labels: list[str] | None = None
    truncate_columns: dict[str, int] | None = None
    labels: list[str] | None = None

    @classmethod
    def from_metadata(cls, metadata: dict) -> EvalSpec:
        fields = {k: metadata[k] for k in cls.__dataclass_fields__ if metadata.get(k) is not None}
        return cls(**fields)


def inputs_and_gold(spec: EvalSpec, rows: list[dict], path: Path) -> tuple[list[str], list[str], list[str] | None]:
    if spec.task == "classification":
        return column(rows, spec.text_column, path), column(rows, spec.label_column, path), None
    prompts = render(spec.prompt_template, rows, path, spec.truncate_columns)
    answers = render(spec.answer_template, rows, path, spec.truncate_columns)
    decisions = column(rows, spec.decision_column, path) if spec.decision_column else None
    return prompts, answers, decisions


def predict(client: Poster, adapter: str, inputs: list[str], batch_size: int, parameters: dict,
            headers: dict | None = None) -> list[dict]:
    outputs: list[dict] = []
    for start in range(0, len(inputs), batch_size):
        body = {"inputs": inputs[start:start + batch_size], "parameters": parameters}
        response = client.post("/predict", params={"adapter": adapter}, json=body, headers=headers or {})
        if response.status_code != 200:
            raise RuntimeError(f"/predict?adapter={adapter} answered HTTP {response.status_code}: {response.text}")
        outputs += response.json()["outputs"]
    return outputs


def evaluate(client: Poster, adapter: str, spec: EvalSpec, rows: list[dict], path: Path, batch_size: int = 16,
             max_new_tokens: int = 128, headers: dict | None = None) -> dict:
    """Metrics of one served adapter on rows of a data file."""
    inputs, gold, decisions = inputs_and_gold(spec, rows, path)
    # refused before any request where the adapter's labels are known; else once the server has named them
    if spec.task == "classification" and spec.labels:
        check_labels_known(spec.labels, gold, path, known_by="the adapter")
    if spec.decision_labels and decisions:
        check_labels_known(spec.decision_labels, decisions, path, "decision", "the adapter")
    # a classifier takes no generation parameters (the server refuses them)
    parameters = {} if spec.task == "classification" else {"max_new_tokens": max_new_tokens, "temperature": 0}
    outputs = predict(client, adapter, inputs, batch_size, parameters, headers)
    if spec.task == "classification":
        labels = spec.labels or list(outputs[0]["scores"])
        if not spec.labels:
            check_labels_known(labels, gold, path, known_by="the adapter")
        return classification_metrics(gold, [o["label"] for o in outputs], labels)
    choices = spec.decision_labels or (sorted(set(decisions)) if decisions else None)
    return generation_metrics([o["generated_text"] for o in outputs], gold, decisions, choices)


def load_metadata(path: Path | None) -> dict:
    if path is None:
        return {}
    path = path / "loraswap.json" if path.is_dir() else path
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read adapter metadata ({exc.__class__.__name__})") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the running server")
    p.add_argument("--adapter", required=True)
    p.add_argument("--data", type=Path, required=True, help=".csv or .jsonl with gold answers")
    p.add_argument("--metadata", type=Path, help="the adapter's folder or loraswap.json (columns, templates)")
    p.add_argument("--task", choices=["classification", "generation"], help="default: from metadata or server")
    p.add_argument("--text-column")
    p.add_argument("--label-column")
    p.add_argument("--prompt-template")
    p.add_argument("--answer-template")
    p.add_argument("--decision-column")
    p.add_argument("--truncate-column", action="append", default=[], metavar="COLUMN=CHARS")
    p.add_argument("--limit", type=int, help="only the first N rows")
    p.add_argument("--batch-size", type=int, default=16, help="inputs per /predict request")
    p.add_argument("--max-new-tokens", type=int, help="default: what the adapter was evaluated with, else 128")
    p.add_argument("--token", default=os.environ.get("LORASWAP_TOKEN"), help="bearer token, if the server wants one")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    try:
        metadata = load_metadata(args.metadata)
        rows = read_rows(args.data)[: args.limit]
        with httpx.Client(base_url=args.url, timeout=600) as client:
            task = args.task or metadata.get("task")
            if task is None:
                records = client.get("/adapters", headers=headers).json()["adapters"]
                record = next((r for r in records if r["name"] == args.adapter), None)
                if record is None:
                    raise RuntimeError(f"the server has no adapter {args.adapter!r}")
                task, metadata["labels"] = record["task"], record.get("labels")
            spec = EvalSpec.from_metadata(dict(metadata, task=task))
            overrides = {k: getattr(args, k) for k in ("text_column", "label_column", "prompt_template",
                                                        "answer_template", "decision_column")}
            spec = dataclasses.replace(spec, **{k: v for k, v in overrides.items() if v is not None})
            if args.truncate_column:
                spec.truncate_columns = parse_truncate(args.truncate_column)
            max_new_tokens = args.max_new_tokens or metadata.get("hyperparameters", {}).get("max_new_tokens", 128)
            metrics = evaluate(client, args.adapter, spec, rows, args.data, args.batch_size, max_new_tokens, headers)
    except (DataError, RuntimeError, httpx.HTTPError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2) if args.json else format_metrics(metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
