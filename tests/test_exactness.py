"""The engine's answers equal plain PEFT's on the same base and inputs (float32)."""

from __future__ import annotations

import torch

from server.jobs import ClassifyJob
from server.types import AdapterLocation, GenerationParams
from tests.conftest import LABELS
from tests.helpers import (
    assert_together_equals_alone, classify_together, location, peft_reference_greedy, peft_reference_probs,
)

TEXTS = ["a stirring , funny and finally transporting film", "one long string of cliches .", "ok"]



def test_classification_matches_peft(engine, tiny_base, adapter_store, tokenizer):
    task, results = engine.predict(location(adapter_store, "sentiment"), TEXTS, GenerationParams())
    assert task == "classification"
    ours = torch.tensor([[r.scores[label] for label in LABELS] for r in results])
    reference = peft_reference_probs(tiny_base, adapter_store / "sentiment", tokenizer, TEXTS, len(LABELS))
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()
    for result, row in zip(results, reference):
        assert result.label == LABELS[int(row.argmax())]
        assert abs(result.score - float(row.max())) < 1e-5


def test_classification_lora_changes_the_answer(engine, tiny_base, adapter_store, tokenizer):
    """The LoRA weights matter: zeroing them (head only) gives different probabilities."""
    slot = engine.acquire(location(adapter_store, "sentiment"))
    try:
        with_lora = torch.tensor([list(r.scores.values()) for r in engine.classify(TEXTS, slot)])
        saved = {
            path: [t.clone() for t in layer.pair(slot.index)]
            for path, layer in engine.layers.items()
            if slot.index in layer.ranks
        }
        for path in saved:
            engine.layers[path].clear_slot(slot.index)
        try:
            head_only = torch.tensor([list(r.scores.values()) for r in engine.classify(TEXTS, slot)])
        finally:
            for path, (A, Bt) in saved.items():
                engine.layers[path].set_slot(slot.index, A, Bt.t(), 1.0)
    finally:
        engine.release(slot)
    assert (with_lora - head_only).abs().max() > 1e-3


def test_generation_matches_peft_greedy(engine, tiny_base, adapter_store):
    params = GenerationParams(max_new_tokens=12)
    prompts = ["What is the capital of France?", "Write a haiku"]
    for name in ("gen-a", "gen-b", "gen-mlp"):
        _, results = engine.predict(location(adapter_store, name), prompts, params)
        for prompt, result in zip(prompts, results):
            ids = engine.encode_for_generation([prompt], params)[0]
            reference = peft_reference_greedy(tiny_base, adapter_store / name, ids, 12)
            assert result.token_ids == reference, name
            base = peft_reference_greedy(tiny_base, None, ids, 12)
            assert reference != base, f"{name} does not change the output"


def test_base_generation_matches_transformers(engine, tiny_base):
    params = GenerationParams(max_new_tokens=10)
    _, [result] = engine.predict(None, ["Hello there"], params)
    ids = engine.encode_for_generation(["Hello there"], params)[0]
    assert result.token_ids == peft_reference_greedy(tiny_base, None, ids, 10)
    assert result.tokens == len(result.token_ids)


def assert_mixed_classification_equals_lone_runs(engine, rows, slots):
    """One forward of rows of different adapters gives each row what a forward of that row alone gives."""
    mixed = classify_together(engine, [ClassifyJob([row], slot) for row, slot in zip(rows, slots)])
    for row, slot, [result] in zip(rows, slots, mixed):
        [[alone]] = classify_together(engine, [ClassifyJob([row], slot)])
        assert result.label == alone.label
        for label, p in alone.scores.items():
            assert abs(result.scores[label] - p) < 1e-5


def test_mixed_batch_rows_equal_separate_runs(engine, adapter_store):
    """One forward with rows of different adapters (ranks 4, 16, 8, base) equals one run per adapter."""
    names = ["gen-a", "gen-b", "gen-mlp"]
    slots = [engine.acquire(location(adapter_store, n)) for n in names]
    try:
        assert_together_equals_alone(engine, [s.index for s in slots] + [0], GenerationParams(max_new_tokens=8))

        cls = [engine.acquire(location(adapter_store, n)) for n in ("sentiment", "topic")]
        try:
            texts = ["good", "a much longer text about nothing in particular", "bad"]
            cls_rows = engine.encode_for_classification(texts)
            assert_mixed_classification_equals_lone_runs(engine, cls_rows, [cls[0], cls[1], cls[0]])
        finally:
            for s in cls:
                engine.release(s)
    finally:
        for s in slots:
            engine.release(s)


def test_classification_labels_default_without_metadata(engine, tiny_base, tmp_path, tokenizer):
    from tests.helpers import make_adapter

    folder = make_adapter(tiny_base, tmp_path / "plain", task="SEQ_CLS", labels=["x", "y"], write_labels=False)
    _, results = engine.predict(AdapterLocation("plain", 1, folder), ["hi"], GenerationParams())
    assert set(results[0].scores) == {"LABEL_0", "LABEL_1"}
    reference = peft_reference_probs(tiny_base, folder, tokenizer, ["hi"], 2)[0]
    assert abs(results[0].scores["LABEL_1"] - float(reference[1])) < 1e-5
    engine.unload("plain")


def test_each_mixed_batch_gathers_its_own_rows_into_reused_buffers(engine, adapter_store):
    """Consecutive mixed batches of the same shape but other row assignments each get their own rows' pairs, and
    the gather reuses the layer's buffers (fresh per-batch buffers cost the mixed path page faults)."""
    cls = [engine.acquire(location(adapter_store, n)) for n in ("sentiment", "topic")]
    try:
        rows = engine.encode_for_classification(["good", "a longer text about nothing", "bad"])
        layer = next(layer for layer in engine.layers.values() if cls[0].index in layer.ranks)
        buffers = []
        for assignment in ([cls[0], cls[1], cls[0]], [cls[1], cls[0], cls[1]]):
            assert_mixed_classification_equals_lone_runs(engine, rows, assignment)
            buffers.append(layer._rows_A.data_ptr())
        assert buffers[0] == buffers[1]
    finally:
        for s in cls:
            engine.release(s)
