"""Bounded forwards on a model (server/scheduler.py + runner): rows longer than `max_batch_tokens` run in chunks
through their KV cache and answer as PEFT does in one forward; a big request interleaves with small ones, leaves at
the next chunk when its client goes, and shutdown answers everything at the next turn."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from server.engine import Engine
from server.errors import Draining
from server.jobs import ClassifyJob, EmbedJob, GenerateJob
from server.request_context import RequestContext
from server.types import AdapterLocation, GenerationParams
from tests.conftest import LABELS
from tests.helpers import (
    engine_with, peft_reference_embeddings, peft_reference_greedy, peft_reference_logprobs, peft_reference_probs,
    slowed,
)

BUDGET = 16  # tokens per forward: every text below is several chunks
LONG_TEXTS = ["the river runs past the old stone mill at night, and the miller's daughter counts the stars " * 2,
              "a gorgeous, witty film with a heart as big as its budget and a cast that never once misses a beat",
              "dull"]


@pytest.fixture(scope="module")
def chunked(tiny_settings):
    yield from engine_with(tiny_settings, max_batch_tokens=BUDGET, auto_merge=False)


@pytest.fixture
def slot(chunked, adapter_store):
    def acquire(name):
        return chunked.acquire(AdapterLocation(name, 1, adapter_store / name))

    held = []
    yield lambda name: held.append(acquire(name)) or held[-1]
    for s in held:
        chunked.release(s)


def test_long_classification_rows_run_in_chunks_and_equal_peft(chunked, slot, tiny_base, adapter_store, tokenizer):
    sentiment = slot("sentiment")
    chunked.batch_sizes.clear()
    results = chunked.classify(LONG_TEXTS, sentiment)
    assert max(len(tokenizer(t)["input_ids"]) for t in LONG_TEXTS) > 2 * BUDGET
    assert sum(chunked.batch_sizes.values()) > len(LONG_TEXTS)  # chunks, not one forward
    probs = torch.tensor([[r.scores[label] for label in LABELS] for r in results])
    reference = peft_reference_probs(tiny_base, adapter_store / "sentiment", tokenizer, LONG_TEXTS, 3)
    assert torch.allclose(probs, reference, atol=1e-5), (probs - reference).abs().max()


def test_long_embeddings_equal_peft(chunked, adapter_store, tiny_base, tokenizer):
    location = AdapterLocation("gen-b", 1, adapter_store / "gen-b")
    ours = torch.tensor([e.embedding for e in chunked.embed(location, LONG_TEXTS)])
    reference = peft_reference_embeddings(tiny_base, adapter_store / "gen-b", LONG_TEXTS, tokenizer)
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()


def test_a_long_prompt_is_prefilled_in_chunks_and_generates_as_peft(chunked, slot, tiny_base, adapter_store):
    gen = slot("gen-a")
    params = GenerationParams(max_new_tokens=12, prompt_logprobs=True, logprobs=0)
    [prompt] = chunked.encode_for_generation([LONG_TEXTS[0]], params)
    assert len(prompt) > 3 * BUDGET
    # a short request in the same turns: it joins the decode batch while the long prompt is still in chunks
    short = GenerateJob(chunked.encode_for_generation(["hi"], params), gen.index, params)
    long = GenerateJob([prompt], gen.index, params)
    chunked.runner.generate(long)
    chunked.runner.generate(short)
    [result] = long.future.result(timeout=60)
    short.future.result(timeout=60)
    assert result.token_ids == peft_reference_greedy(tiny_base, adapter_store / "gen-a", prompt, 12)
    reference = peft_reference_logprobs(tiny_base, adapter_store / "gen-a", prompt)
    echoed = result.prompt_logprobs
    assert [entry.token_id for entry in echoed] == prompt and echoed[0].logprob is None
    expected = reference[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    assert torch.allclose(torch.tensor([e.logprob for e in echoed[1:]]), expected, atol=1e-5)


def test_a_big_request_interleaves_with_a_small_one_and_leaves_when_its_client_goes(chunked, slot, tokenizer):
    sentiment = slot("sentiment")
    rows = [tokenizer(LONG_TEXTS[0])["input_ids"]] * 64  # 64 long rows: about 640 chunks
    big = ClassifyJob(rows, sentiment, request=RequestContext())
    with slowed(chunked, 0.002):
        chunked.runner.classify(big)
        time.sleep(0.2)
        started = time.monotonic()
        [small] = chunked.classify(["dull"], sentiment)
        waited = time.monotonic() - started
        assert not big.future.done()  # the small one did not wait for the big one
        assert waited < 1.0, waited
        big.request.client_gone.set()  # its client leaves: it ends at the next turn
        with pytest.raises(Exception, match="disconnected"):
            big.future.result(timeout=5)
        done = threading.Event()
        chunked.runner.call(done.set)
        assert done.wait(5) and chunked.runner._long is None and chunked.runner.depth() == 0
    assert small.label in LABELS


def test_shutdown_answers_everything_at_the_next_turn(tiny_settings, adapter_store, tokenizer):
    engine = Engine.from_settings(tiny_settings.model_copy(update={"max_batch_tokens": BUDGET}))
    sentiment = engine.acquire(AdapterLocation("sentiment", 1, adapter_store / "sentiment"))
    with slowed(engine, 0.005):
        rows = [tokenizer(LONG_TEXTS[0])["input_ids"]] * 8
        jobs = [ClassifyJob(rows, sentiment), EmbedJob(rows, 0),
                GenerateJob([[1, 2, 3]], 0, GenerationParams(max_new_tokens=200, ignore_eos=True))]
        for job in jobs:
            (engine.runner.generate if isinstance(job, GenerateJob) else engine.runner.classify)(job)
        time.sleep(0.3)
        started = time.monotonic()
        engine.runner.abort(Draining("the server is shutting down"))
        assert time.monotonic() - started < 2
        for job in jobs:
            with pytest.raises(Draining):
                job.future.result(timeout=1)
        assert not engine.runner._thread.is_alive()
        with pytest.raises(RuntimeError, match="shut down"):
            engine.classify(["x"], sentiment)
