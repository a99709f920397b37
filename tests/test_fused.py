"""The decode step in C (server/fused.py, server/decoder.c) computes what the eager lean step computes: Llama, Mistral
and Qwen2 (q/k/v biases) layers, rows of different adapters and of the base, left padding, LoRA on some projections
only; a row's numbers do not depend on its batch mates; the engine decodes through it; DoRA rows keep the eager step;
wrong sizes are refused before any raw memory is touched."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from server import fused, panels
from server.decode import LeanDecoder
from server.engine import pack_weights
from server.fused import FusedLayers
from server.jobs import GenerateJob
from server.lora import LoraContext, wrap_linear_layers
from server.types import AdapterLocation, GenerationParams
from tests.helpers import engine_with, generate_together

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),  # q/k/v with biases
}
WIDTH = 9  # cache columns before the step
SLOTS = [1, 0, 2, 1]  # rows on adapter 1, the base, adapter 2 and adapter 1 again


@pytest.fixture(params=["native", "x86-64-v3"])
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """The library built for this CPU, and for AVX2 only where this CPU runs it."""
    if request.param != "native":
        if platform.machine() not in ("x86_64", "AMD64") or "avx2" not in Path("/proc/cpuinfo").read_text():
            pytest.skip("not an x86 CPU with AVX2")
        built = panels.build(request.param)
        assert built is not None
        monkeypatch.setattr(panels, "kernel", lambda: built)
    fused._library.cache_clear()
    yield
    fused._library.cache_clear()


def decoder(family: str) -> tuple[LeanDecoder, LoraContext, dict]:
    """A tiny model of the family, its projections wrapped and packed as the engine's are; slot 1 has pairs on q/v (rank 4), slot 2 on
    o and the MLP (rank 8), in the second layer only."""
    config_class, model_class, extra = FAMILIES[family]
    config = config_class(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, **extra)
    torch.manual_seed(0)
    model = model_class(config).eval()
    context = LoraContext()
    layers = wrap_linear_layers(model, context, n_slots=3)
    generator = torch.Generator().manual_seed(1)
    pack_weights(model, layers)  # the projections and the LM head in panels, as the engine has them
    for path, layer in layers.items():
        for slot, rank, targets in ((1, 4, ("q_proj", "v_proj")), (2, 8, ("o_proj", "gate_proj", "up_proj", "down_proj"))):
            if path.endswith(targets) and (slot == 1 or ".1." in path):
                A = torch.randn(rank, layer.in_features, generator=generator) * 0.2
                B = torch.randn(layer.out_features, rank, generator=generator) * 0.2
                layer.set_slot(slot, A, B, scale=2.0)
    lean = LeanDecoder.for_model(model)
    lean.fused = FusedLayers.for_model(model, context)
    assert lean.fused is not None
    return lean, context, layers


def step_inputs(lean: LeanDecoder, rows: int, seed: int = 2):
    """Tokens, positions, a mask with left padding (row i has i padding columns) and a random cache with room."""
    generator = torch.Generator().manual_seed(seed)
    last = torch.randint(0, 64, (rows,), generator=generator)
    mask = torch.ones(rows, WIDTH + 1, dtype=torch.long)
    for row in range(rows):
        mask[row, :row] = 0
    positions = mask.sum(1) - 1
    kv = [tuple(torch.randn(rows, lean.kv_heads, WIDTH + 3, lean.head_dim, generator=generator) for _ in range(2))
          for _ in lean.layers]
    return last, positions, mask, kv


def run(lean: LeanDecoder, context: LoraContext, slots: list[int], inputs, use_fused: bool):
    last, positions, mask, kv = inputs
    kv = [(k.clone(), v.clone()) for k, v in kv]
    keep, lean.fused = lean.fused, lean.fused if use_fused else None
    try:
        with context.rows(slots, "cpu"):
            logits = lean.step(last, positions, mask, kv, WIDTH)
    finally:
        lean.fused = keep
    return logits, kv


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("slots", [SLOTS, [1], [0, 0], [2, 2, 2]])
def test_the_c_step_computes_the_eager_step(family: str, slots: list[int]):
    lean, context, _ = decoder(family)
    inputs = step_inputs(lean, len(slots))
    ours, our_kv = run(lean, context, slots, inputs, use_fused=True)
    eager, eager_kv = run(lean, context, slots, inputs, use_fused=False)
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-5)
    for (k, v), (k_eager, v_eager) in zip(our_kv, eager_kv):  # this step's keys and values written at WIDTH
        torch.testing.assert_close(k[:, :, : WIDTH + 1], k_eager[:, :, : WIDTH + 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v[:, :, : WIDTH + 1], v_eager[:, :, : WIDTH + 1], rtol=1e-5, atol=1e-5)
    if slots[0] != 0:  # the adapter's pairs count
        assert not torch.equal(ours[0], run(lean, context, [0] * len(slots), inputs, use_fused=True)[0][0])


@pytest.mark.usefixtures("kernel")
def test_a_row_alone_gets_the_same_numbers_as_in_its_batch():
    lean, context, _ = decoder("qwen2")
    inputs = step_inputs(lean, len(SLOTS))
    together, _ = run(lean, context, SLOTS, inputs, use_fused=True)
    last, positions, mask, kv = inputs
    for row in range(len(SLOTS)):
        start = row  # the columns before are this row's padding: alone it has none
        alone_inputs = (last[row : row + 1], positions[row : row + 1], mask[row : row + 1, start:],
                        [(k[row : row + 1, :, start:].contiguous(), v[row : row + 1, :, start:].contiguous())
                         for k, v in kv])
        alone_kv = [(k.clone(), v.clone()) for k, v in alone_inputs[3]]
        with context.rows([SLOTS[row]], "cpu"):
            alone = lean.step(*alone_inputs[:3], alone_kv, WIDTH - start)
        assert torch.equal(alone[0], together[row])


def test_dora_rows_take_the_eager_step():
    lean, context, layers = decoder("llama")
    layer = next(iter(layers.values()))
    with context.rows([1, 2], "cpu"):
        assert lean.fused.applies()
    layer.set_slot(2, torch.zeros(2, layer.in_features), torch.zeros(layer.out_features, 2), scale=1.0,
                   magnitude=torch.ones(layer.out_features))  # slot 2 becomes a DoRA slot on this layer
    with context.rows([1, 2], "cpu"):
        assert not lean.fused.applies()
    with context.rows([1], "cpu"):
        assert lean.fused.applies()


def test_wrong_sizes_are_refused_before_the_c_code_runs():
    lean, context, _ = decoder("llama")
    last, positions, mask, kv = step_inputs(lean, 2)
    hidden = lean.embed(last)
    cos, sin = (t[:, 0].contiguous() for t in lean.rotary(hidden, positions[:, None]))
    with context.rows([0, 0], "cpu"):
        with pytest.raises(ValueError, match="fused decode step"):
            lean.fused.step(hidden, cos, sin, mask.int(), kv, WIDTH)  # a mask of another dtype
        with pytest.raises(ValueError, match="fused decode step"):
            lean.fused.step(hidden, cos, sin, mask, kv, WIDTH + 3)  # no room for this step's column
        with pytest.raises(ValueError, match="fused decode step"):
            lean.fused.step(hidden, cos, sin, mask, kv[:1], WIDTH)  # a cache for one layer of two
    with context.rows([0, 7], "cpu"):
        with pytest.raises(ValueError, match="fused decode step"):
            lean.fused.step(hidden, cos, sin, mask, kv, WIDTH)  # a slot outside the stacks


@pytest.fixture(scope="module")
def fused_engine(tiny_settings):
    yield from engine_with(tiny_settings, auto_merge=False)


def test_the_engine_decodes_through_it_as_the_eager_step_does(fused_engine, adapter_store):
    engine = fused_engine
    lean = engine.runner.lean
    assert lean.fused is not None and lean.row_step is None  # the C step serves; nothing compiled at start
    slots = [engine.acquire(AdapterLocation(n, 1, adapter_store / n)) for n in ("gen-a", "gen-mlp")] + [None]
    prompts = ["Tell me a long story about a dragon and a knight", "hi", "What is two plus two?"]
    params = GenerationParams(max_new_tokens=80, temperature=0, ignore_eos=True, logprobs=2)

    def generate() -> list:
        jobs = [GenerateJob(engine.encode_for_generation([prompt], params), slot.index if slot else 0, params)
                for prompt, slot in zip(prompts, slots)]
        return [results[0] for results in generate_together(engine, jobs)]

    steps = 0
    original = lean.fused.step

    def counted(*args):  # type: ignore[no-untyped-def]
        nonlocal steps
        steps += 1
        return original(*args)

    try:
        lean.fused.step = counted
        ours = generate()
        del lean.fused.step
        keep, lean.fused = lean.fused, None
        try:
            eager = generate()
        finally:
            lean.fused = keep
    finally:
        for slot in slots[:2]:
            engine.release(slot)
    assert steps >= 79  # every decode step of the 80 tokens (the first comes from the prefill)
    for a, b in zip(ours, eager):
        assert a.token_ids == b.token_ids and len(a.token_ids) == 80
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-5)
            assert [t for t, _ in x.top] == [t for t, _ in y.top]
