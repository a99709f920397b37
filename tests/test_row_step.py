"""The compiled decode step of one or two rows (server/row_step.py) computes what the eager lean step does, and what
PEFT does: base rows, LoRA adapters of different ranks and targets, a merged adapter, two rows of one slot or of two.
DoRA rows keep the eager step; where compiling fails the engine decodes eagerly."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
from transformers import LlamaForCausalLM

from server.engine import Engine
from server.jobs import GenerateJob
from server.lora import LoraContext, wrap_linear_layers
from server.decode import LeanDecoder
from server.row_step import RowStep, compiled_graphs, compiled_or_none
from server.slots import BASE_SLOT
from server.types import AdapterLocation, GenerationParams, GenerationResult
from tests.helpers import engine_with, generate_together, peft_reference_greedy

PROMPT = "Tell me a long story about a dragon and a knight"
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def row_engine(tiny_settings):
    """The compiled step serves where the C step (server/fused.py) does not: here the C step is set aside."""
    for engine in engine_with(tiny_settings, auto_merge=False):
        engine.runner.lean.fused = None
        engine.runner.call(engine.runner.calibrate)  # compiles the step of one or two rows now
        yield engine


SHORTER = "A dragon"  # decoding beside PROMPT, it is a row with padding


def one_row(engine: Engine, slot, prompts: tuple[str, ...] = (PROMPT,)) -> list[GenerationResult]:
    params = GenerationParams(max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=2)
    return engine.generate([engine.tokenizer(p)["input_ids"] for p in prompts], slot, params)


def together(engine: Engine, slots: list, prompts: tuple[str, ...], budgets: tuple[int, ...] | None = None
             ) -> list[GenerationResult]:
    """One row per (slot, prompt), prefilled in one forward so that they decode as one batch of mixed slots; each
    row generates its budget of tokens (NEW_TOKENS by default)."""
    jobs = [GenerateJob([engine.tokenizer(prompt)["input_ids"]], slot.index if slot else BASE_SLOT,
                        GenerationParams(max_new_tokens=budget, temperature=0, ignore_eos=True, logprobs=2))
            for prompt, slot, budget in zip(prompts, slots, budgets or (NEW_TOKENS,) * len(prompts))]
    return [results[0] for results in generate_together(engine, jobs)]


def compiled_and_eager(engine: Engine, run: Callable[[], list[GenerationResult]]
                       ) -> tuple[list[GenerationResult], list[GenerationResult], int]:
    """`run` (rows decoded together) with the compiled step, then with the eager one; and how many steps the compiled
    one took."""
    lean = engine.runner.lean
    compiled = lean.row_step
    assert compiled is not None  # the tiny Llama gets the compiled step (so every test's single rows run through it)
    steps = 0
    original = compiled.step

    def counted(*args):  # type: ignore[no-untyped-def]
        nonlocal steps
        steps += 1
        return original(*args)

    compiled.step = counted  # type: ignore[method-assign]
    try:
        ours = run()
    finally:
        compiled.step = original  # type: ignore[method-assign]
    assert lean.row_step is compiled  # no step failed over to the eager one
    lean.row_step = None
    try:
        eager = run()
    finally:
        lean.row_step = compiled
    return ours, eager, steps


def assert_as_eager(ours: GenerationResult, eager: GenerationResult) -> None:
    """A row of the compiled step has the eager step's tokens, and their logprobs within summation-order noise."""
    assert ours.token_ids == eager.token_ids
    for a, b in zip(ours.logprobs, eager.logprobs):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)


@pytest.mark.parametrize("adapter", [None, "gen-a", "gen-b", "gen-mlp"])
def test_the_compiled_step_equals_the_eager_step_and_peft(row_engine, tiny_settings, adapter_store, adapter):
    engine = row_engine
    graphs = compiled_graphs()
    slot = engine.acquire(AdapterLocation(adapter, 1, adapter_store / adapter)) if adapter else None
    try:
        [ours], [eager], steps = compiled_and_eager(engine, lambda: one_row(engine, slot))
    finally:
        if slot is not None:
            engine.release(slot)
    assert steps == NEW_TOKENS - 1  # the first token comes from the prefill, every other from a compiled step
    assert compiled_graphs() == graphs  # the engine compiled every variant at start: no request waits for one
    assert_as_eager(ours, eager)
    for a, b in zip(ours.logprobs, eager.logprobs):
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
    prompt_ids = engine.tokenizer(PROMPT)["input_ids"]
    reference = peft_reference_greedy(tiny_settings.base_model, adapter_store / adapter if adapter else None,
                                      prompt_ids, NEW_TOKENS)
    assert ours.token_ids == reference


def test_a_merged_adapter_takes_the_compiled_step_with_the_merged_weights(row_engine, tiny_settings, adapter_store):
    engine = row_engine
    slot = engine.acquire(AdapterLocation("gen-b", 1, adapter_store / "gen-b"))
    try:
        engine.merge(slot)
        try:
            [ours], [eager], steps = compiled_and_eager(engine, lambda: one_row(engine, slot))
        finally:
            engine.unmerge()
    finally:
        engine.release(slot)
    assert steps == NEW_TOKENS - 1
    assert ours.token_ids == eager.token_ids
    prompt_ids = engine.tokenizer(PROMPT)["input_ids"]
    assert ours.token_ids == peft_reference_greedy(tiny_settings.base_model, adapter_store / "gen-b", prompt_ids,
                                                   NEW_TOKENS)


@pytest.mark.parametrize("adapter", [None, "gen-b"])
def test_two_rows_of_one_slot_take_the_compiled_step_padding_and_all(row_engine, tiny_settings, adapter_store,
                                                                      adapter):
    engine = row_engine
    graphs = compiled_graphs()
    slot = engine.acquire(AdapterLocation(adapter, 1, adapter_store / adapter)) if adapter else None
    try:
        ours, eager, steps = compiled_and_eager(engine, lambda: one_row(engine, slot, (PROMPT, SHORTER)))
    finally:
        if slot is not None:
            engine.release(slot)
    assert steps == NEW_TOKENS - 1 and compiled_graphs() == graphs
    for prompt, row, eager_row in zip((PROMPT, SHORTER), ours, eager):
        assert_as_eager(row, eager_row)
        assert row.token_ids == peft_reference_greedy(
            tiny_settings.base_model, adapter_store / adapter if adapter else None,
            engine.tokenizer(prompt)["input_ids"], NEW_TOKENS)


@pytest.mark.parametrize("adapters", [("gen-a", "gen-b"), ("gen-b", None), (None, "gen-mlp"), ("gen-mlp", "gen-a")])
def test_two_rows_of_different_slots_take_the_compiled_step(row_engine, tiny_settings, adapter_store, adapters):
    """Each row its own pair: two adapters of different ranks, an adapter beside the base, one whose pairs reach only
    the MLP (zero pairs elsewhere)."""
    engine = row_engine
    graphs = compiled_graphs()
    slots = [engine.acquire(AdapterLocation(name, 1, adapter_store / name)) if name else None for name in adapters]
    try:
        ours, eager, steps = compiled_and_eager(engine, lambda: together(engine, slots, (PROMPT, SHORTER)))
    finally:
        for slot in slots:
            if slot is not None:
                engine.release(slot)
    assert steps == NEW_TOKENS - 1 and compiled_graphs() == graphs
    for name, prompt, row, eager_row in zip(adapters, (PROMPT, SHORTER), ours, eager):
        assert_as_eager(row, eager_row)
        assert row.token_ids == peft_reference_greedy(
            tiny_settings.base_model, adapter_store / name if name else None, engine.tokenizer(prompt)["input_ids"],
            NEW_TOKENS)


def test_two_mixed_rows_left_by_a_larger_batch_take_the_compiled_step_with_their_own_pairs(row_engine, adapter_store):
    """Three rows of three slots decode eagerly (which gathers three rows' pairs into the layers' buffers); once the
    base row is done the two left take the compiled step, whose pairs must be gathered again for those two."""
    engine = row_engine
    slots = [engine.acquire(AdapterLocation(name, 1, adapter_store / name)) for name in ("gen-b", "gen-a")] + [None]
    try:
        ours, eager, steps = compiled_and_eager(
            engine, lambda: together(engine, slots, (PROMPT, SHORTER, "A knight"), (NEW_TOKENS, NEW_TOKENS, 8)))
    finally:
        for slot in slots[:2]:
            engine.release(slot)
    assert steps == NEW_TOKENS - 8  # the steps after the base row's 8th token
    for row, eager_row in zip(ours, eager):
        assert_as_eager(row, eager_row)


def test_a_step_that_cannot_compile_falls_back_to_the_eager_step(row_engine, caplog):
    """E.g. a variant past dynamo's recompile limit: the request is answered, by the eager step from then on."""
    engine = row_engine
    lean = engine.runner.lean
    compiled = lean.row_step

    def refused(*args):  # type: ignore[no-untyped-def]
        raise torch._dynamo.exc.FailOnRecompileLimitHit("Hard failure due to fullgraph=True")

    compiled.step = refused  # type: ignore[method-assign]
    try:
        with caplog.at_level(logging.WARNING, logger="server.decode"):
            [result] = one_row(engine, None)
        assert lean.row_step is None and "decoding eagerly" in caplog.text
    finally:
        del compiled.step  # the class's method again
        lean.row_step = compiled
    [expected] = one_row(engine, None)
    assert result.token_ids == expected.token_ids


def test_where_compiling_fails_the_eager_step_serves(caplog):
    def broken_build():
        raise RuntimeError("no C++ compiler here")

    with caplog.at_level(logging.WARNING, logger="server.row_step"):
        assert compiled_or_none(broken_build, lambda _: None) is None
    assert "decoding eagerly" in caplog.text and "no C++ compiler here" in caplog.text


def test_bfloat16_weights_stream_into_float32_arithmetic(tiny_base):
    """dtype=bfloat16: the step reads the bf16 weights and computes in float32, so it lands closer to the float32
    forward of the same (bf16-rounded) weights than transformers' bf16 forward does."""
    model = LlamaForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16).eval()
    reference = LlamaForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16).float().eval()  # same weights
    context = LoraContext()
    wrap_linear_layers(model, context, 2)
    row_step = RowStep.for_model(model, context)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    kv = [(torch.zeros(1, config.num_key_value_heads, 1, head_dim, dtype=torch.bfloat16),
           torch.zeros(1, config.num_key_value_heads, 1, head_dim, dtype=torch.bfloat16))
          for _ in range(config.num_hidden_layers)]
    token, position = torch.tensor([42]), torch.tensor([0])
    with torch.no_grad():
        ours = row_step.step(token, position, torch.ones(1, 1, dtype=torch.long), kv, 0)
        want = reference(input_ids=token[None]).logits[0]
        bf16 = model(input_ids=token[None]).logits[0].float()
    assert ours.dtype == torch.float32
    ours_error, bf16_error = (ours - want).abs().max(), (bf16 - want).abs().max()
    assert ours_error < bf16_error / 2, (ours_error, bf16_error)  # measured 1.1e-3 against 3.3e-3


def first_steps(row_step: RowStep, lean: LeanDecoder, config) -> tuple[torch.Tensor, torch.Tensor]:
    """One token's logits at position 0 by the compiled step and by the eager one, each on a cache of its own."""
    head_dim = config.hidden_size // config.num_attention_heads
    mask = torch.ones(1, 1, dtype=torch.long)
    outputs = []
    for step in (row_step.step, lean.step):
        kv = [(torch.zeros(1, config.num_key_value_heads, 1, head_dim),
               torch.zeros(1, config.num_key_value_heads, 1, head_dim)) for _ in range(config.num_hidden_layers)]
        outputs.append(step(torch.tensor([42]), torch.tensor([0]), mask, kv, 0))
    return outputs[0], outputs[1]


def test_bases_of_different_shapes_in_one_process_each_get_their_step():
    """The compiled functions are shared by every engine of the process: after shapes change dynamo traces the
    layer's sizes as symbols (found in CI: the grouped-query flag then was a symbolic bool SDPA refuses)."""
    from transformers import LlamaConfig

    for heads, kv_heads, hidden in ((4, 2, 64), (4, 4, 64), (8, 2, 64), (4, 2, 64)):
        config = LlamaConfig(vocab_size=100, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                             num_attention_heads=heads, num_key_value_heads=kv_heads, attn_implementation="sdpa")
        model = LlamaForCausalLM(config).eval()
        context = LoraContext()
        wrap_linear_layers(model, context, 2)
        row_step = RowStep.for_model(model, context)
        row_step.warm_up()
        ours, eager = first_steps(row_step, LeanDecoder.for_model(model), config)
        assert torch.allclose(ours, eager, atol=1e-5), (heads, kv_heads, hidden)


def test_a_slot_reinstalled_after_its_stacks_grew_steps_with_its_new_pairs(tiny_base):
    """The step keeps each slot's arguments (views of the pair stacks) from step to step: a larger rank reallocates
    the stacks, and the adapter installed into the slot after that must be the one the next step uses."""
    model = LlamaForCausalLM.from_pretrained(tiny_base).eval()
    context = LoraContext()
    layers = wrap_linear_layers(model, context, 3)
    row_step, lean = RowStep.for_model(model, context), LeanDecoder.for_model(model)

    def install(slot: int, rank: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        for layer in layers.values():
            layer.set_slot(slot, torch.randn(rank, layer.in_features, generator=generator),
                           torch.randn(layer.out_features, rank, generator=generator), 0.5)

    def compiled_and_eager(slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        with context.rows([slot], "cpu"):
            return first_steps(row_step, lean, model.config)

    install(1, 2, seed=0)
    first, eager_first = compiled_and_eager(1)
    install(2, 8, seed=1)  # a larger rank: every layer's stacks are reallocated
    install(1, 2, seed=2)  # slot 1 holds another adapter, in the new stacks
    ours, eager = compiled_and_eager(1)
    assert torch.allclose(first, eager_first, atol=1e-5)
    assert torch.allclose(ours, eager, atol=1e-5)
    assert not torch.allclose(ours, first, atol=1e-3)  # the new adapter's answer, not the old one's
