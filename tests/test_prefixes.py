"""Scored prompts (echo) that begin with one just scored (server/prefixes.py) run only their own last tokens, and
answer as PEFT does over the whole prompt: lm-eval's choices of one question, in one request or across two."""

from __future__ import annotations

import pytest
import torch

from server.jobs import GenerateJob
from server.scheduler import Piece, pack, packed_width
from server.types import AdapterLocation, GenerationParams
from tests.helpers import engine_with, peft_reference_greedy, peft_reference_logprobs

TOLERANCE = 1e-5
CONTEXT = "Question: does the river run past the old stone mill at night?\nResults: the miller counts stars.\n\nAnswer:"
CHOICES = [" yes", " no", " maybe", " maybe, in the spring"]  # one token each, then several
SCORED = GenerationParams(max_new_tokens=1, chat=False, logprobs=1, prompt_logprobs=True)  # what lm-eval sends


@pytest.fixture(scope="module")
def shared_engine(tiny_settings):
    yield from engine_with(tiny_settings, auto_merge=False)


@pytest.fixture
def widths(shared_engine):
    """[rows, tokens] of every forward of the body from now on."""
    seen: list[tuple[int, int]] = []
    handle = shared_engine.runner.call(lambda: shared_engine.runner.body.register_forward_pre_hook(
        lambda _module, _args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True))
    yield seen
    shared_engine.runner.call(handle.remove)


def choice_prompts(tokenizer, context: str = CONTEXT) -> list[list[int]]:
    return [tokenizer(context + choice)["input_ids"] for choice in CHOICES]


def check_against_peft(result, ids: list[int], reference: torch.Tensor, greedy: list[int]) -> None:
    """Echo entries and the generated tokens' logprobs against PEFT's log-softmax over prompt + answer."""
    assert result.token_ids == greedy
    entries = result.prompt_logprobs + result.logprobs
    everything = ids + result.token_ids
    assert [entry.token_id for entry in entries] == everything and entries[0].logprob is None
    for t in range(1, len(everything)):
        expected = reference[t - 1]
        assert entries[t].logprob == pytest.approx(float(expected[everything[t]]), abs=TOLERANCE)
        [(best, value)] = entries[t].top
        assert best == int(expected.argmax()) and value == pytest.approx(float(expected.max()), abs=TOLERANCE)


def test_choices_of_one_context_run_in_one_row_and_score_as_peft(shared_engine, widths, tiny_base,
                                                                        adapter_store, tokenizer):
    prompts = choice_prompts(tokenizer)
    context = len(tokenizer(CONTEXT)["input_ids"])
    assert all(p[:context] == prompts[0][:context] for p in prompts)
    _, results = shared_engine.predict(AdapterLocation("gen-a", 1, adapter_store / "gen-a"), prompts, SCORED)
    # one row: the first choice whole, then each other one's own tokens
    assert widths == [(1, len(prompts[0]) + sum(len(p) - context for p in prompts[1:]))]
    for result, ids in zip(results, prompts):
        greedy = peft_reference_greedy(tiny_base, adapter_store / "gen-a", ids, 1)
        check_against_peft(result, ids, peft_reference_logprobs(tiny_base, adapter_store / "gen-a", ids + greedy),
                           greedy)


def test_a_prompt_takes_the_previous_requests_and_generates_on_as_peft(shared_engine, widths, tiny_base,
                                                                       adapter_store, tokenizer):
    """lm-eval's batches of 8 split a question's choices across two requests; a longer answer decodes on from the
    borrowed cache."""
    first, second, *_ = choice_prompts(tokenizer, CONTEXT.replace("river", "brook"))
    location = AdapterLocation("gen-b", 1, adapter_store / "gen-b")
    shared_engine.predict(location, [first], SCORED)
    params = GenerationParams(max_new_tokens=5, chat=False, logprobs=1, prompt_logprobs=True, ignore_eos=True)
    _, [result] = shared_engine.predict(location, [second], params)
    assert widths[1][1] < len(second) // 2
    greedy = peft_reference_greedy(tiny_base, adapter_store / "gen-b", second, 5)
    check_against_peft(result, second, peft_reference_logprobs(tiny_base, adapter_store / "gen-b", second + greedy),
                       greedy)


OTHERS = {"gen-b": ("gen-b", SCORED),
          "top-n": ("gen-a", GenerationParams(max_new_tokens=1, chat=False, logprobs=3, prompt_logprobs=True)),
          "no echo": ("gen-a", GenerationParams(max_new_tokens=1, chat=False, logprobs=1))}


@pytest.mark.parametrize("other", OTHERS)
def test_no_prompt_borrows_from_another_adapter_or_top_n_nor_unscored(shared_engine, widths, adapter_store, tokenizer,
                                                                      other):
    """An unscored prompt always runs whole: the same generation request twice answers bit for bit the same."""
    prompt = choice_prompts(tokenizer, CONTEXT.replace("mill", other))[0]
    shared_engine.predict(AdapterLocation("gen-a", 1, adapter_store / "gen-a"), [prompt], SCORED)
    name, params = OTHERS[other]
    shared_engine.predict(AdapterLocation(name, 1, adapter_store / name), [prompt], params)
    assert widths == [(1, len(prompt))] * 2


def test_an_evicted_adapter_leaves_no_prompts(shared_engine, adapter_store, tokenizer):
    """Its slot index may hold another adapter next."""
    shared_engine.predict(AdapterLocation("gen-mlp", 1, adapter_store / "gen-mlp"), choice_prompts(tokenizer)[:1],
                          SCORED)
    assert shared_engine.runner.call(lambda: len(shared_engine.runner.prefixes.prompts)) == 1
    shared_engine.unload("gen-mlp")
    assert shared_engine.runner.call(lambda: shared_engine.runner.prefixes.prompts) == []


def test_a_prompt_rides_in_an_earlier_ones_row_when_it_shares_most_of_its_tokens():
    def piece(slot: int, ids: list[int], params: GenerationParams = SCORED) -> Piece:
        return Piece(GenerateJob([ids], slot, params), 0, 0, len(ids))

    context = list(range(10, 20))
    pieces = [piece(1, context + [1]), piece(1, context + [2, 2]), piece(2, context + [3]),  # another adapter
              piece(1, context[:4] + [4] * 7),  # 4 of 11 shared: not worth it
              piece(1, context + [5], GenerationParams(max_new_tokens=1, logprobs=2, prompt_logprobs=True)),
              piece(1, context + [6], GenerationParams(max_new_tokens=3, logprobs=1)),  # not scored: never shares
              piece(1, context + [7])]
    groups = pack(pieces)
    assert groups == [[pieces[0], pieces[1], pieces[6]], [pieces[2]], [pieces[3]], [pieces[4]], [pieces[5]]]
    assert packed_width(groups[0]) == 11 + 2 + 1
