"""The lean decode step (server/decode.py) computes what transformers' full forward does, on padded mixed batches of
adapters, and the KV buffers it writes into keep their valid columns."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from server.decode import GROW_COLUMNS, LeanDecoder, grow_kv
from server.engine import Engine
from server.jobs import GenerateJob
from server.types import AdapterLocation, GenerationParams
from tests.helpers import engine_with, generate_together

PROMPTS = ["Tell me a long story about a dragon and a knight", "hi", "What is two plus two?"]


@pytest.fixture(scope="module")
def lean_engine(tiny_settings):
    yield from engine_with(tiny_settings, auto_merge=False)


def run_mixed(engine: Engine, slots: list) -> list[list]:
    """Three rows of different lengths (left padding) on three adapters, one batch, 80 greedy tokens (past the
    first buffer's room) with logprobs."""
    params = GenerationParams(max_new_tokens=80, temperature=0, ignore_eos=True, logprobs=2)
    jobs = [GenerateJob(engine.encode_for_generation([prompt], params), slot.index if slot else 0, params)
            for prompt, slot in zip(PROMPTS, slots)]
    return [results[0] for results in generate_together(engine, jobs)]


def test_lean_step_equals_the_full_forward(lean_engine, adapter_store):
    engine = lean_engine
    assert engine.runner.lean is not None  # the tiny Llama takes the lean step (the exactness tests run through it)
    slots = [engine.acquire(AdapterLocation(n, 1, adapter_store / n)) for n in ("gen-a", "gen-mlp")] + [None]
    try:
        lean = run_mixed(engine, slots)
        decoder, engine.runner.lean = engine.runner.lean, None
        try:
            full = run_mixed(engine, slots)
        finally:
            engine.runner.lean = decoder
    finally:
        for slot in slots[:2]:
            engine.release(slot)
    for ours, theirs in zip(lean, full):
        assert ours.token_ids == theirs.token_ids
        assert len(ours.token_ids) == 80
        for a, b in zip(ours.logprobs, theirs.logprobs):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_grow_kv_keeps_the_valid_columns_and_the_old_buffers():
    keys = torch.arange(2 * 3 * 5 * 4, dtype=torch.float32).view(2, 3, 5, 4)
    values = -keys
    kv = [(keys, values)]
    assert grow_kv(kv, width=4, needed=5) is kv  # room left: the same buffers
    grown = grow_kv(kv, width=5, needed=6)
    new_keys, new_values = grown[0]
    assert new_keys.shape == (2, 3, 6 + GROW_COLUMNS, 4)
    assert torch.equal(new_keys[:, :, :5], keys) and torch.equal(new_values[:, :, :5], values)
    assert torch.equal(keys, torch.arange(2 * 3 * 5 * 4, dtype=torch.float32).view(2, 3, 5, 4))


def tiny(config_class, model_class, **extra):
    config = config_class(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, **extra)
    return model_class(config)


def test_lean_step_only_where_it_is_exact():
    assert LeanDecoder.for_model(tiny(LlamaConfig, LlamaForCausalLM)) is not None
    assert LeanDecoder.for_model(tiny(MistralConfig, MistralForCausalLM, sliding_window=None)) is not None
    assert LeanDecoder.for_model(tiny(MistralConfig, MistralForCausalLM, sliding_window=8)) is None  # window mask
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2))
    assert LeanDecoder.for_model(gpt2) is None
    eager = tiny(LlamaConfig, LlamaForCausalLM)
    eager.config._attn_implementation = "eager"
    assert LeanDecoder.for_model(eager) is None
