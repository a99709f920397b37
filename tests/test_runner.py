"""The step loop: continuous batching across adapters, per-row sampling, cancellation, failures, automatic merge;
behaviour and exactness against PEFT."""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from server.engine import Engine
from server.merging import MergePolicy
from server.slots import BASE_SLOT
from server.types import GenerationParams
from tests.conftest import LABELS
from tests.helpers import engine_with, location, peft_reference_greedy, peft_reference_probs, poisoned



def test_merge_policy_decisions():
    policy = MergePolicy(window=4, merge_share=0.75, unmerge_share=0.5)
    for slot in (1, 1, 1):
        policy.observe(slot)
    assert policy.choose(None) is None  # window not full yet
    policy.observe(2)
    assert policy.choose(None) == 1  # 3 of 4
    policy.observe(2)
    assert policy.choose(1) == 1  # 2 of 4: still at the unmerge share
    policy.observe(BASE_SLOT)
    assert policy.choose(1) is None  # 1 of 4, and nobody else dominates
    policy.observe(2)
    assert policy.choose(None) == 2  # 2, 2, base, 2: 3 of 4
    for _ in range(4):
        policy.observe(BASE_SLOT)
    assert policy.choose(None) is None  # the base never "merges"
    policy.forget(BASE_SLOT)
    assert len(policy.recent) == 0


# ---- the engine ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batching_engine(tiny_settings):
    yield from engine_with(tiny_settings, max_wait_ms=100.0, auto_merge=False)


def test_concurrent_requests_of_many_adapters_share_forwards(batching_engine, tiny_base, adapter_store, tokenizer):
    engine = batching_engine
    texts = {"sentiment": "a fine and moving film", "topic": "markets fell sharply today"}
    references = {
        name: peft_reference_probs(tiny_base, adapter_store / name, tokenizer, [text], n)[0]
        for (name, text), n in zip(texts.items(), (3, 2))
    }
    slots = {name: engine.acquire(location(adapter_store, name)) for name in texts}
    try:
        engine.batch_sizes.clear()
        order = list(texts) * 4
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(lambda n: (n, engine.classify([texts[n]], slots[n])[0]), order))
    finally:
        for slot in slots.values():
            engine.release(slot)
    assert max(engine.batch_sizes) > 1, engine.batch_sizes  # rows of both adapters went through one forward
    assert sum(size * count for size, count in engine.batch_sizes.items()) == len(order)
    for name, result in results:
        probs = torch.tensor(list(result.scores.values()))
        assert torch.allclose(probs, references[name], atol=1e-5)


def test_generation_batch_with_different_budgets_and_adapters(batching_engine, tiny_base, adapter_store):
    engine = batching_engine
    requests = [("gen-a", "first question", 5), ("gen-b", "second, longer question here", 9), (None, "base", 3),
                ("gen-mlp", "fourth", 7)]
    slots = {n: engine.acquire(location(adapter_store, n)) for n, _, _ in requests if n}
    try:
        engine.batch_sizes.clear()

        def run(request):
            name, prompt, budget = request
            return engine.generate([prompt], slots.get(name), GenerationParams(max_new_tokens=budget))[0]

        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(run, requests))
    finally:
        for slot in slots.values():
            engine.release(slot)
    assert max(engine.batch_sizes) > 1
    for (name, prompt, budget), result in zip(requests, results):
        ids = engine.encode_for_generation([prompt], GenerationParams(max_new_tokens=budget))[0]
        adapter = adapter_store / name if name else None
        assert result.token_ids == peft_reference_greedy(tiny_base, adapter, ids, budget), name
        assert result.tokens <= budget


def test_merged_unmerged_and_100_switches_stay_exact(batching_engine, tiny_base, adapter_store, tokenizer):
    engine = batching_engine
    text = ["the acting is wonderful", "dreadful"]
    reference = peft_reference_probs(tiny_base, adapter_store / "sentiment", tokenizer, text, 3)
    params = GenerationParams(max_new_tokens=8)
    ids = engine.encode_for_generation(["Hello"], params)[0]
    gen_reference = peft_reference_greedy(tiny_base, adapter_store / "gen-b", ids, 8)
    base_weights = {path: layer.base.weight.detach().clone() for path, layer in engine.layers.items()}
    sentiment = engine.acquire(location(adapter_store, "sentiment"))
    generator = engine.acquire(location(adapter_store, "gen-b"))
    try:
        for cycle in range(100):
            slot = sentiment if cycle % 2 == 0 else generator
            engine.merge(slot)
            assert engine.merged_adapter == slot.location.name
            if cycle in (0, 1, 98, 99):
                if slot is sentiment:
                    probs = torch.tensor([[r.scores[l] for l in LABELS] for r in engine.classify(text, slot)])
                    assert torch.allclose(probs, reference, atol=1e-5)
                else:
                    assert engine.generate(["Hello"], slot, params)[0].token_ids == gen_reference
                assert engine.merged_adapter == slot.location.name  # its own batches keep it merged
            engine.unmerge()
        assert engine.merged_adapter is None
        for path, layer in engine.layers.items():
            assert torch.equal(layer.base.weight, base_weights[path]), path  # restored bit for bit, no drift
        probs = torch.tensor([[r.scores[l] for l in LABELS] for r in engine.classify(text, sentiment)])
        assert torch.allclose(probs, reference, atol=1e-5)
        # a batch of another adapter while one is merged unmerges first: mixed batches never run merged
        engine.merge(sentiment)
        assert engine.generate(["Hello"], generator, params)[0].token_ids == gen_reference
        assert engine.merged_adapter is None
    finally:
        engine.release(sentiment)
        engine.release(generator)


def test_auto_merge_follows_the_traffic(tiny_settings, adapter_store):
    settings = tiny_settings.model_copy(update={"merge_window": 4, "merge_share": 0.75, "unmerge_share": 0.5})
    engine = Engine.from_settings(settings)
    try:
        slot = engine.acquire(location(adapter_store, "sentiment"))
        other = engine.acquire(location(adapter_store, "topic"))
        try:
            for _ in range(3):
                unmerged = engine.classify(["hello"], slot)[0]
            assert engine.merged_adapter is None  # the window is not full yet
            first = engine.classify(["hello"], slot)[0]  # 4 of 4: merged before this forward
            assert engine.merged_adapter == "sentiment"
            assert first.scores == pytest.approx(unmerged.scores, abs=1e-6)
            engine.classify(["hello"], other)
            assert engine.merged_adapter is None
            assert engine.classify(["hello"], slot)[0].scores == pytest.approx(first.scores, abs=1e-6)
            for _ in range(3):
                engine.classify(["x"], other)
            engine.classify(["x"], slot)
            assert engine.merged_adapter is None  # sentiment is 1 of the last 4: stays unmerged
        finally:
            engine.release(slot)
            engine.release(other)
    finally:
        engine.close()


def test_streamed_generations_count_for_the_merge_policy(tiny_settings, adapter_store):
    settings = tiny_settings.model_copy(update={"merge_window": 4, "merge_share": 0.75, "unmerge_share": 0.5})
    engine = Engine.from_settings(settings)
    try:
        slot = engine.acquire(location(adapter_store, "gen-a"))
        try:
            for _ in range(4):
                *_, result = engine.generate_stream("hello", slot, GenerationParams(max_new_tokens=2))
            assert engine.merged_adapter == "gen-a"  # the fourth stream ran merged
            assert result.tokens == 2
        finally:
            engine.release(slot)
    finally:
        engine.close()


def test_a_request_rerun_after_its_batch_failed_is_counted_once(tiny_settings, adapter_store):
    engine = Engine.from_settings(tiny_settings.model_copy(update={"max_wait_ms": 200.0}))
    try:
        slots = [engine.acquire(location(adapter_store, n)) for n in ("sentiment", "topic")]
        try:
            with poisoned(engine, slots[1].index), ThreadPoolExecutor(max_workers=2) as pool:
                futures = [pool.submit(engine.classify, ["hello"], slot) for slot in slots]
            assert futures[0].result()[0].label in LABELS
            with pytest.raises(RuntimeError, match="poisoned"):
                futures[1].result()
            assert max(engine.batch_sizes) == 2  # they shared the forward that failed, then ran alone
            assert sorted(engine.merge_policy.recent) == sorted(s.index for s in slots)
        finally:
            for slot in slots:
                engine.release(slot)
    finally:
        engine.close()


def test_no_job_is_lost_when_callers_race_the_worker_swapping_its_queues(engine):
    """The worker takes each queue by swapping in a new list; a caller must append to the current one (found by
    the soak benchmark: an adapter install queued at the wrong moment waited forever; with the old lookup this test
    failed in two runs of three: a stress test, not a proof). Embeddings of the base share the classification
    queue and leave the merge policy as it was (requests of the base never merge)."""
    done: list[str] = []

    def control_calls() -> None:
        assert sum(engine.runner.call(lambda: 1) for _ in range(3000)) == 3000
        done.append("controls")

    def embeddings() -> None:
        assert sum(len(engine.embed(None, ["fine"])) for _ in range(100)) == 100
        done.append("embeddings")

    threads = [threading.Thread(target=work, daemon=True) for work in [control_calls] * 3 + [embeddings] * 3]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads change at almost every bytecode: the race shows within a few hundred calls
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(done) == ["controls"] * 3 + ["embeddings"] * 3  # a lost job never returns
    finally:
        sys.setswitchinterval(switch)
