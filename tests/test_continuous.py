"""Continuous batching: requests join and leave the decode batch at any step, with their own adapters and sampling
settings, and get exactly what they would get alone."""

from __future__ import annotations

import threading
from queue import Queue

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from server.engine import Engine
from server.jobs import GenerateJob
from server.sampling import sampling_scores
from server.scheduler import whole_rows
from server.types import AdapterLocation, GenerationParams
from tests.helpers import generate_together, peft_reference_greedy, poisoned

PROMPT_LONG = "Tell me a long story about a dragon"


@pytest.fixture(scope="module")
def slots(engine, adapter_store):
    held = {n: engine.acquire(AdapterLocation(n, 1, adapter_store / n)) for n in ("gen-a", "gen-b", "sentiment")}
    yield held
    for slot in held.values():
        engine.release(slot)


def ids(engine, prompt: str, max_new_tokens: int) -> list[int]:
    return engine.encode_for_generation([prompt], GenerationParams(max_new_tokens=max_new_tokens))[0]


def start_streamed(engine, slot, prompt: str, params: GenerationParams, tokens: int) -> GenerateJob:
    """Submit a streamed job and return once it has produced `tokens` tokens (it is decoding now)."""
    job = GenerateJob([ids(engine, prompt, params.max_new_tokens)], slot.index if slot else 0, params, Queue())
    engine.runner.generate(job)
    for _ in range(tokens):
        assert job.stream.get(timeout=30) is not None
    return job


def test_a_request_joins_mid_flight_and_leaves_first(engine, slots, tiny_base, adapter_store):
    long = start_streamed(engine, slots["gen-a"], PROMPT_LONG, GenerationParams(max_new_tokens=120), tokens=3)
    two_row_forwards = engine.batch_sizes[2]
    [short] = engine.generate(["a short one"], slots["gen-b"], GenerationParams(max_new_tokens=6))
    assert not long.future.done()  # the short request was answered while the long one went on
    assert engine.batch_sizes[2] > two_row_forwards  # it decoded in the same forwards as the long row
    [long_result] = long.future.result(timeout=60)
    assert long_result.tokens == 120  # it really was still running (no early EOS)
    assert short.token_ids == peft_reference_greedy(tiny_base, adapter_store / "gen-b", ids(engine, "a short one", 6), 6)
    assert long_result.token_ids == peft_reference_greedy(
        tiny_base, adapter_store / "gen-a", ids(engine, PROMPT_LONG, 120), 120
    )


def test_classification_runs_between_decode_steps(tiny_settings, adapter_store):
    """Its own engine without auto-merge: on the shared one, what earlier tests sent could have the policy merge
    the classifier once it runs alone (merged weights move scores by 1e-7; test_runner checks merging)."""
    engine = Engine.from_settings(tiny_settings.model_copy(update={"auto_merge": False}))
    try:
        gen = engine.acquire(AdapterLocation("gen-a", 1, adapter_store / "gen-a"))
        cls = engine.acquire(AdapterLocation("sentiment", 1, adapter_store / "sentiment"))
        long = start_streamed(engine, gen, PROMPT_LONG, GenerationParams(max_new_tokens=120), tokens=2)
        [during] = engine.classify(["a fine film"], cls)
        assert not long.future.done()  # it did not wait for the generation to end
        long.future.result(timeout=60)
        assert engine.classify(["a fine film"], cls)[0].scores == during.scores  # alone: the same numbers
    finally:
        engine.close()


def test_static_scheduling_makes_requests_wait_for_the_batch(tiny_settings, adapter_store):
    engine = Engine.from_settings(tiny_settings.model_copy(update={"scheduling": "static"}))
    try:
        gen = engine.acquire(AdapterLocation("gen-a", 1, adapter_store / "gen-a"))
        cls = engine.acquire(AdapterLocation("sentiment", 1, adapter_store / "sentiment"))
        long = start_streamed(engine, gen, PROMPT_LONG, GenerationParams(max_new_tokens=60), tokens=2)
        engine.classify(["a fine film"], cls)
        assert long.future.done()  # the classification waited for the whole batch, as model.generate() did
        # a finished row keeps its place in the batch until the longest is done (computed, its tokens dropped)
        short, longer = GenerationParams(3, ignore_eos=True), GenerationParams(12, ignore_eos=True)
        before = engine.batch_sizes[2]
        results = generate_together(engine, [GenerateJob([ids(engine, "a", 3)], gen.index, short),
                                             GenerateJob([ids(engine, "b", 12)], gen.index, longer)])
        assert [r[0].tokens for r in results] == [3, 12]
        assert engine.batch_sizes[2] - before == 12  # the prefill and 11 decode steps, all of two rows
        engine.release(gen)
        engine.release(cls)
    finally:
        engine.close()


def test_scheduling_switched_on_a_running_engine(tiny_settings, adapter_store):
    """benchmarks/run.py measures both policies on one engine: the switch reaches the scheduler (static: nothing
    joins a decoding batch), and a row finished under static batching leaves once the switch is back."""
    engine = Engine.from_settings(tiny_settings.model_copy(update={"auto_merge": False}))
    try:
        gen = engine.acquire(AdapterLocation("gen-a", 1, adapter_store / "gen-a"))
        cls = engine.acquire(AdapterLocation("sentiment", 1, adapter_store / "sentiment"))
        engine.runner.continuous = False
        long = start_streamed(engine, gen, PROMPT_LONG, GenerationParams(max_new_tokens=60), tokens=2)
        engine.classify(["a fine film"], cls)
        assert long.future.done()  # the classification waited for the batch

        short = GenerateJob([ids(engine, "a", 3)], gen.index, GenerationParams(3, ignore_eos=True), Queue())
        longer = GenerateJob([ids(engine, "b", 120)], gen.index, GenerationParams(120, ignore_eos=True), Queue())
        engine.runner.call(lambda: engine.runner._prefill(whole_rows([short, longer])))
        [short_result] = short.future.result(timeout=30)
        assert engine.runner.decoding == 2  # the finished row rides along
        engine.runner.continuous = True
        [during] = engine.classify(["a fine film"], cls)
        assert not longer.future.done()  # it joined the decoding batch's turns again
        [longer_result] = longer.future.result(timeout=60)
        assert (short_result.tokens, longer_result.tokens) == (3, 120)
        assert engine.runner.call(lambda: engine.runner.decoding) == 0  # both rows left: the batch ended
        assert engine.classify(["a fine film"], cls)[0].scores == during.scores
        engine.release(gen)
        engine.release(cls)
    finally:
        engine.close()


def test_rows_with_different_sampling_settings_share_steps_and_keep_their_answers(engine, slots):
    budgets = 12
    greedy_text = engine.generate(["stop somewhere"], slots["gen-b"], GenerationParams(max_new_tokens=budgets))[0]
    stop = engine.tokenizer.decode(greedy_text.token_ids[1:2])  # the answer's second token ends it
    assert stop.strip() and greedy_text.generated_text.find(stop) > 0, greedy_text
    settings = [
        (slots["gen-a"].index, GenerationParams(max_new_tokens=budgets)),
        (slots["gen-b"].index, GenerationParams(max_new_tokens=budgets, temperature=0.8, top_p=0.9, seed=1)),
        (0, GenerationParams(max_new_tokens=budgets - 4, temperature=1.3, seed=2)),
        (slots["gen-b"].index, GenerationParams(max_new_tokens=budgets, stop=(stop,))),
    ]
    prompts = ["first prompt", "second prompt, longer", "third", "stop somewhere"]

    def jobs():
        return [GenerateJob([ids(engine, p, s.max_new_tokens)], i, s) for p, (i, s) in zip(prompts, settings)]

    alone = [generate_together(engine, [job])[0][0] for job in jobs()]
    before = engine.batch_sizes[4]
    together = [results[0] for results in generate_together(engine, jobs())]
    assert engine.batch_sizes[4] > before  # one forward held all four
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert together[2].tokens == budgets - 4
    assert together[3].finish_reason == "stop" and together[3].tokens == 2
    assert together[3].generated_text == greedy_text.generated_text[: greedy_text.generated_text.find(stop)]


def test_seeded_rows_give_the_same_answer_whatever_their_batch_mates(engine, slots):
    def seeded(seed: int = 42) -> GenerateJob:
        return GenerateJob([ids(engine, "pick words", 10)], slots["gen-a"].index, GenerationParams(
            max_new_tokens=10, temperature=1.0, seed=seed))

    def mate(prompt: str, slot_index: int, temperature: float) -> GenerateJob:
        return GenerateJob([ids(engine, prompt, 10)], slot_index, GenerationParams(10, temperature=temperature))

    [[alone]] = generate_together(engine, [seeded()])
    first = generate_together(engine, [mate("x", 0, 1.0), seeded(), mate("another mate", slots["gen-b"].index, 0)])
    second = generate_together(engine, [seeded(), mate("a third, different mate", slots["gen-a"].index, 0.7)])
    assert first[1][0].token_ids == alone.token_ids == second[0][0].token_ids
    [[other_seed]] = generate_together(engine, [seeded(7)])
    assert other_seed.token_ids != alone.token_ids  # the seed matters: the test can fail


def test_nucleus_scores_match_transformers_warpers():
    generator = torch.Generator().manual_seed(0)
    for temperature, top_p in [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5), (0.5, 0.05)]:
        logits = torch.randn(500, generator=generator) * 3
        ours = sampling_scores(logits, GenerationParams(temperature=temperature, top_p=top_p))
        theirs = TemperatureLogitsWarper(temperature)(None, logits[None].clone())
        if top_p < 1.0:
            theirs = TopPLogitsWarper(top_p)(None, theirs)
        assert torch.equal(ours.isinf(), theirs[0].isinf())
        assert torch.allclose(ours.softmax(-1), theirs[0].softmax(-1), atol=1e-7)


def test_a_cancelled_request_frees_its_row_and_its_mate_goes_on(engine, slots, tiny_base, adapter_store):
    doomed = start_streamed(engine, None, PROMPT_LONG, GenerationParams(max_new_tokens=150), tokens=1)
    [mate] = engine.generate(["the mate"], slots["gen-b"], GenerationParams(max_new_tokens=4))
    doomed.future.cancel()
    done = threading.Event()
    engine.runner.call(done.set)  # the next turn of the loop: the cancelled row leaves before any forward
    done.wait(10)
    engine.generate(["x"], None, GenerationParams(max_new_tokens=1))
    assert engine.runner.decoding == 0
    assert mate.token_ids == peft_reference_greedy(tiny_base, adapter_store / "gen-b", ids(engine, "the mate", 4), 4)


def test_a_failing_row_does_not_fail_its_mates(engine, slots, tiny_base, adapter_store):
    healthy = start_streamed(engine, slots["gen-a"], PROMPT_LONG, GenerationParams(max_new_tokens=40), tokens=1)
    failing = start_streamed(engine, slots["gen-b"], "this one breaks", GenerationParams(max_new_tokens=40), tokens=2)
    with poisoned(engine, slots["gen-b"].index):  # from now on every forward holding its row fails
        with pytest.raises(RuntimeError, match="poisoned"):
            failing.future.result(timeout=60)
        [result] = healthy.future.result(timeout=60)
        # a request whose prefill fails (shared with a healthy one) fails alone too
        bad = GenerateJob([ids(engine, "bad", 5)], slots["gen-b"].index, GenerationParams(max_new_tokens=5))
        good = GenerateJob([ids(engine, "good", 5)], slots["gen-a"].index, GenerationParams(max_new_tokens=5))
        engine.runner.call(lambda: engine.runner._isolated(whole_rows([bad, good]), engine.runner._prefill))
        with pytest.raises(RuntimeError, match="poisoned"):
            bad.future.result(timeout=60)
        [good_result] = good.future.result(timeout=60)
    assert result.token_ids == peft_reference_greedy(tiny_base, adapter_store / "gen-a", ids(engine, PROMPT_LONG, 40), 40)
    assert good_result.token_ids == peft_reference_greedy(tiny_base, adapter_store / "gen-a", ids(engine, "good", 5), 5)


def test_a_full_decode_batch_does_not_hold_back_classification(tiny_settings, adapter_store):
    engine = Engine.from_settings(tiny_settings.model_copy(update={"max_batch_size": 2}))
    try:
        gen = engine.acquire(AdapterLocation("gen-a", 1, adapter_store / "gen-a"))
        cls = engine.acquire(AdapterLocation("sentiment", 1, adapter_store / "sentiment"))
        longs = [start_streamed(engine, gen, PROMPT_LONG, GenerationParams(max_new_tokens=150), tokens=2)
                 for _ in range(2)]
        assert engine.runner.decoding == 2  # the batch is full
        engine.classify(["a fine film"], cls)
        assert not any(job.future.done() for job in longs)
        [job.future.result(timeout=60) for job in longs]
        engine.release(gen)
        engine.release(cls)
    finally:
        engine.close()
