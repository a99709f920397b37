"""Quality metrics shared by train-adapter and eval-adapter (pure Python, no torch)."""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCT = str.maketrans("", "", string.punctuation)


def classification_metrics(gold: list[str], pred: list[str | None], labels: list[str]) -> dict:
    """Accuracy, per-class precision/recall/F1/support and the confusion matrix (rows = gold, columns = predicted).

    A prediction outside `labels` (e.g. no decision word found) counts as wrong and lands in no column.
    """
    if len(gold) != len(pred) or not gold:
        raise ValueError("gold and pred must be non-empty and of equal length")
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, pred):
        if p in index:
            matrix[index[g]][index[p]] += 1
    per_class = {}
    for i, label in enumerate(labels):
        tp = matrix[i][i]
        predicted = sum(row[i] for row in matrix)
        support = sum(1 for g in gold if g == label)
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    correct = sum(1 for g, p in zip(gold, pred) if g == p)
    return {
        "accuracy": correct / len(gold),
        "macro_f1": sum(c["f1"] for c in per_class.values()) / len(labels),
        "per_class": per_class,
        "confusion_matrix": {"labels": labels, "rows_gold_columns_predicted": matrix},
        "rows": len(gold),
    }


def normalize_tokens(text: str) -> list[str]:
    """Lower-case, drop punctuation, split on whitespace (SQuAD-style)."""
    return text.lower().translate(_PUNCT).split()


def token_f1(pred: str, ref: str) -> float:
    p, r = normalize_tokens(pred), normalize_tokens(ref)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def _lcs(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 over normalized tokens (longest common subsequence)."""
    p, r = normalize_tokens(pred), normalize_tokens(ref)
    if not p or not r:
        return float(p == r)
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def extract_decision(text: str, choices: list[str]) -> str | None:
    """The first of `choices` that appears as a whole word in the text (case-insensitive), or None."""
    if not choices:
        return None
    pattern = r"\b(" + "|".join(re.escape(c) for c in sorted(choices, key=len, reverse=True)) + r")\b"
    match = re.search(pattern, text, flags=re.IGNORECASE)
    if match is None:
        return None
    found = match.group(1).lower()
    return next(c for c in choices if c.lower() == found)


def generation_metrics(
    preds: list[str], refs: list[str], gold_decisions: list[str] | None = None, choices: list[str] | None = None
) -> dict:
    """Exact match (normalized tokens), token F1 and ROUGE-L of whole answers; with gold decisions, exact match of
    the decision word too."""
    if len(preds) != len(refs) or not preds:
        raise ValueError("preds and refs must be non-empty and of equal length")
    metrics: dict = {
        "exact_match": sum(normalize_tokens(p) == normalize_tokens(r) for p, r in zip(preds, refs)) / len(preds),
        "token_f1": sum(map(token_f1, preds, refs)) / len(preds),
        "rouge_l": sum(map(rouge_l, preds, refs)) / len(preds),
        "rows": len(preds),
    }
    if gold_decisions is not None and choices:
        decided = [extract_decision(p, choices) for p in preds]
        decision = classification_metrics(gold_decisions, decided, choices)
        metrics["decision_accuracy"] = decision.pop("accuracy")
        metrics["decision"] = decision
        metrics["no_decision"] = sum(d is None for d in decided)
    return metrics


def format_metrics(metrics: dict) -> str:
    """A human-readable report of either kind of metrics."""
    lines = []
    for key in ("accuracy", "macro_f1", "decision_accuracy", "exact_match", "token_f1", "rouge_l", "no_decision",
                "rows"):
        if key in metrics:
            value = metrics[key]
            lines.append(f"{key:>18}: {value:.4f}" if isinstance(value, float) else f"{key:>18}: {value}")
    detail = metrics.get("decision", metrics)
    if "per_class" in detail:
        lines.append(f"{'label':>18}  precision  recall     f1  support")
        for label, c in detail["per_class"].items():
            lines.append(f"{label:>18}  {c['precision']:9.4f}  {c['recall']:6.4f}  {c['f1']:.4f}  {c['support']:7d}")
        labels = detail["confusion_matrix"]["labels"]
        width = max(8, *(len(label) for label in labels))
        lines.append("confusion matrix (rows: gold, columns: predicted)")
        lines.append(" " * width + "".join(f"{label:>{width + 1}}" for label in labels))
        for label, row in zip(labels, detail["confusion_matrix"]["rows_gold_columns_predicted"]):
            lines.append(f"{label:>{width}}" + "".join(f"{n:>{width + 1}}" for n in row))
    return "\n".join(lines)
