"""DoRA adapters (PEFT use_dora=True) serve exactly as PEFT serves them (float32): alone, mixed in a batch with plain
LoRA and base rows, merged into the base weights, and joining a running decode batch; their tensors are checked at
upload like a plain adapter's. Tolerance: probabilities within 1e-5, greedy token ids identical."""

from __future__ import annotations

import json
import shutil
from queue import Queue

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.adapter_format import CONFIG_FILE, WEIGHTS_FILE, read_adapter
from server.engine import Engine
from server.errors import AdapterInvalid
from server.runner import ClassifyJob, GenerateJob
from server.types import GenerationParams
from tests.conftest import LABELS
from tests.helpers import (
    assert_together_equals_alone, classify_together, engine_with, folder_files, location, make_adapter,
    make_family_adapter, make_family_base, peft_reference_greedy, peft_reference_probs, upload,
)

TEXTS = ["a stirring , funny and finally transporting film", "one long string of cliches .", "ok"]
PROMPTS = ["What is the capital of France?", "Write a haiku"]
GREEDY = GenerationParams(max_new_tokens=12)


@pytest.fixture(scope="module")
def dora_store(tmp_path_factory, tiny_base):
    root = tmp_path_factory.mktemp("dora-adapters")
    make_adapter(tiny_base, root / "dora-gen", r=4, seed=21, dora=True, targets=("q_proj", "v_proj", "o_proj"))
    make_adapter(tiny_base, root / "dora-mlp", r=8, seed=22, dora=True, targets=("gate_proj", "down_proj"))
    make_adapter(tiny_base, root / "dora-cls", task="SEQ_CLS", r=4, seed=23, labels=LABELS, dora=True)
    make_adapter(tiny_base, root / "plain-gen", r=4, seed=24)
    make_adapter(tiny_base, root / "plain-cls", task="SEQ_CLS", r=8, seed=25, labels=["a", "b"])
    return root


@pytest.fixture(scope="module")
def dora_engine(tiny_settings, dora_store):
    yield from engine_with(tiny_settings, adapters_dir=dora_store, auto_merge=False)



def probs(results, labels) -> torch.Tensor:
    return torch.tensor([[r.scores[label] for label in labels] for r in results])


def test_a_dora_adapter_is_read_as_one(dora_store):
    adapter = read_adapter(dora_store / "dora-gen")
    assert adapter.dora and adapter.describe()["dora"] is True
    pair = adapter.modules["model.layers.0.self_attn.o_proj"]
    assert pair.magnitude is not None and pair.magnitude.shape == (pair.B.shape[0],)
    assert not read_adapter(dora_store / "plain-gen").dora


def test_dora_generation_matches_peft(dora_engine, tiny_base, dora_store):
    for name in ("dora-gen", "dora-mlp"):
        _, results = dora_engine.predict(location(dora_store, name), PROMPTS, GREEDY)
        for prompt, result in zip(PROMPTS, results):
            ids = dora_engine.encode_for_generation([prompt], GREEDY)[0]
            reference = peft_reference_greedy(tiny_base, dora_store / name, ids, 12)
            assert result.token_ids == reference, name
            assert reference != peft_reference_greedy(tiny_base, None, ids, 12), f"{name} changes nothing"


def test_dora_classification_matches_peft(dora_engine, tiny_base, dora_store, tokenizer):
    _, results = dora_engine.predict(location(dora_store, "dora-cls"), TEXTS, GenerationParams())
    reference = peft_reference_probs(tiny_base, dora_store / "dora-cls", tokenizer, TEXTS, len(LABELS))
    ours = probs(results, LABELS)
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()


def test_the_magnitude_vector_matters(tiny_base, dora_store, tmp_path, tokenizer):
    """The same pairs without their magnitude vectors (plain LoRA) give other probabilities: the DoRA term is
    applied, not ignored."""
    plain = tmp_path / "no-magnitude"
    shutil.copytree(dora_store / "dora-cls", plain)
    tensors = {k: v for k, v in load_file(str(plain / WEIGHTS_FILE)).items() if "magnitude" not in k}
    save_file(tensors, str(plain / WEIGHTS_FILE))
    config = json.loads((plain / CONFIG_FILE).read_text())
    (plain / CONFIG_FILE).write_text(json.dumps({**config, "use_dora": False}))
    dora = peft_reference_probs(tiny_base, dora_store / "dora-cls", tokenizer, TEXTS, len(LABELS))
    assert (dora - peft_reference_probs(tiny_base, plain, tokenizer, TEXTS, len(LABELS))).abs().max() > 1e-3


def test_dora_rows_in_a_mixed_batch_equal_their_lone_runs(dora_engine, dora_store):
    """One prefill and decode batch with DoRA, plain LoRA and base rows; one classification forward with DoRA and
    plain classifiers: each row gets what it gets alone (and alone equals PEFT, above)."""
    names = ["dora-gen", "plain-gen", "dora-mlp"]
    slots = [dora_engine.acquire(location(dora_store, n)) for n in names]
    cls = [dora_engine.acquire(location(dora_store, n)) for n in ("dora-cls", "plain-cls")]
    try:
        assert_together_equals_alone(dora_engine, [s.index for s in slots] + [0], GREEDY)
        texts = dora_engine.encode_for_classification(["good", "a much longer text about nothing at all", "bad"])
        assignment = [cls[0], cls[1], cls[0]]
        together = classify_together(dora_engine, [ClassifyJob([row], s) for row, s in zip(texts, assignment)])
        for row, slot, [result] in zip(texts, assignment, together):
            [[alone]] = classify_together(dora_engine, [ClassifyJob([row], slot)])
            assert all(abs(result.scores[k] - v) < 1e-5 for k, v in alone.scores.items())
    finally:
        for slot in slots + cls:
            dora_engine.release(slot)


def test_dora_merged_equals_peft_and_unmerge_restores_the_base(dora_engine, tiny_base, dora_store, tokenizer):
    """PEFT merges DoRA as g (W + scale B A); merged answers equal PEFT's, and unmerging restores the base weights
    bit for bit (from the pristine copy, never by dividing g out again)."""
    before = {path: layer.weight.detach().clone() for path, layer in dora_engine.layers.items()}
    for name, check in (("dora-cls", "probs"), ("dora-gen", "greedy")):
        slot = dora_engine.acquire(location(dora_store, name))
        try:
            dora_engine.merge(slot)
            assert dora_engine.merged_adapter == name
            changed = [p for p, layer in dora_engine.layers.items() if not torch.equal(layer.weight, before[p])]
            assert changed, "merging changed no weight"
            if check == "probs":
                ours = probs(dora_engine.classify(TEXTS, slot), LABELS)
                reference = peft_reference_probs(tiny_base, dora_store / name, tokenizer, TEXTS, len(LABELS))
                assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()
            else:
                for prompt, result in zip(PROMPTS, dora_engine.generate(PROMPTS, slot, GREEDY)):
                    ids = dora_engine.encode_for_generation([prompt], GREEDY)[0]
                    assert result.token_ids == peft_reference_greedy(tiny_base, dora_store / name, ids, 12)
            dora_engine.unmerge()
        finally:
            dora_engine.release(slot)
        assert all(torch.equal(layer.weight, before[p]) for p, layer in dora_engine.layers.items())


def test_a_dora_adapter_installed_while_another_is_merged_uses_the_pristine_weight(dora_engine, tiny_base, dora_store,
                                                                                   tokenizer):
    """DoRA's norm is of the base weight plus its own update: installed while another adapter is merged into the
    base, it must read the pristine copy, not the merged weight."""
    gen = dora_engine.acquire(location(dora_store, "dora-gen"))
    try:
        dora_engine.merge(gen)
        dora_engine.unload("dora-cls")  # the next acquire installs it anew, now, while dora-gen is merged
        cls = dora_engine.acquire(location(dora_store, "dora-cls"))
        try:
            dora_engine.unmerge()
            ours = probs(dora_engine.classify(TEXTS, cls), LABELS)
        finally:
            dora_engine.release(cls)
    finally:
        dora_engine.release(gen)
    reference = peft_reference_probs(tiny_base, dora_store / "dora-cls", tokenizer, TEXTS, len(LABELS))
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()


def test_dora_and_plain_rows_join_a_running_decode_batch(dora_engine, tiny_base, dora_store):
    """A DoRA row joins while a plain LoRA row decodes, and a plain row joins a running DoRA row: all get PEFT's
    answer."""
    for running, joining in (("plain-gen", "dora-gen"), ("dora-mlp", "plain-gen")):
        long_slot = dora_engine.acquire(location(dora_store, running))
        short_slot = dora_engine.acquire(location(dora_store, joining))
        try:
            long_params = GenerationParams(max_new_tokens=60, ignore_eos=True)
            long_ids = dora_engine.encode_for_generation(["Tell me a long story"], long_params)[0]
            job = GenerateJob([long_ids], long_slot.index, long_params, Queue())
            dora_engine.runner.generate(job)
            for _ in range(3):
                assert job.stream.get(timeout=30) is not None
            two_rows = dora_engine.batch_sizes[2]
            [short] = dora_engine.generate(["a short one"], short_slot, GenerationParams(max_new_tokens=6))
            assert not job.future.done() and dora_engine.batch_sizes[2] > two_rows  # decoded beside the long row
            [long] = job.future.result(timeout=60)
        finally:
            dora_engine.release(long_slot)
            dora_engine.release(short_slot)
        short_ids = dora_engine.encode_for_generation(["a short one"], GREEDY)[0]
        assert short.token_ids == peft_reference_greedy(tiny_base, dora_store / joining, short_ids, 6)
        reference = peft_reference_greedy(tiny_base, dora_store / running, long_ids, 60)
        assert long.token_ids[: len(reference)] == reference  # PEFT stops at EOS; ours was told to go on


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_dora_on_conv1d_and_biased_layers_matches_peft(family, tmp_path, tokenizer):
    """GPT-2's Conv1D keeps its weight as [in, out] (fan_in_fan_out: the norm is taken over the transposed weight)
    and has a bias, as Qwen2's q/k/v projections do (DoRA scales W x, never the bias)."""
    from server.settings import Settings

    base = make_family_base(tmp_path / "base", family, tokenizer)
    make_family_adapter(base, tmp_path / "store" / "gen", family, "CAUSAL_LM", dora=True, seed=31)
    make_family_adapter(base, tmp_path / "store" / "cls", family, "SEQ_CLS", ["x", "y"], dora=True, seed=32)
    engine = Engine.from_settings(Settings(base_model=base, adapters_dir=tmp_path / "store", dtype="float32",
                                           cache_dir=tmp_path / "cache", auto_merge=False))
    try:
        _, results = engine.predict(location(tmp_path / "store", "gen"), PROMPTS, GREEDY)
        for prompt, result in zip(PROMPTS, results):
            ids = engine.encode_for_generation([prompt], GREEDY)[0]
            assert result.token_ids == peft_reference_greedy(base, tmp_path / "store" / "gen", ids, 12)
        _, results = engine.predict(location(tmp_path / "store", "cls"), TEXTS, GenerationParams())
        reference = peft_reference_probs(base, tmp_path / "store" / "cls", tokenizer, TEXTS, 2)
        assert torch.allclose(probs(results, ["x", "y"]), reference, atol=1e-5)
    finally:
        engine.close()


def broken_copy(source, target, edit) -> None:
    shutil.copytree(source, target)
    tensors = load_file(str(target / WEIGHTS_FILE))
    config = json.loads((target / CONFIG_FILE).read_text())
    edit(tensors, config)
    save_file(tensors, str(target / WEIGHTS_FILE))
    (target / CONFIG_FILE).write_text(json.dumps(config))


MAGNITUDE = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"


def _nan(tensors, config):
    tensors[MAGNITUDE][3] = float("nan")


def _short(tensors, config):
    tensors[MAGNITUDE] = tensors[MAGNITUDE][:-1].clone()


def _missing(tensors, config):
    del tensors[MAGNITUDE]


def _not_dora(tensors, config):
    config["use_dora"] = False


@pytest.mark.parametrize("edit, problem", [
    (_nan, f"tensor '{MAGNITUDE}' holds NaN or Inf values"),
    (_short, "model.layers.0.self_attn.q_proj: lora_magnitude_vector (63,) does not fit lora_B (64, 4)"),
    (_missing, "model.layers.0.self_attn.q_proj: use_dora=true but no lora_magnitude_vector for it"),
    (_not_dora, "lora_magnitude_vector is DoRA's, but the config does not say use_dora=true"),
])
def test_broken_dora_tensors_are_refused_naming_the_problem(dora_store, tmp_path, edit, problem):
    broken_copy(dora_store / "dora-gen", tmp_path / "broken", edit)
    with pytest.raises(AdapterInvalid) as refused:
        read_adapter(tmp_path / "broken")
    assert any(problem in p for p in refused.value.problems), refused.value.problems


def test_a_dora_upload_is_accepted_and_listed_as_dora(admin, dora_store, tmp_path):
    response = upload(admin, "uploaded-dora", folder_files(dora_store / "dora-cls"))
    assert response.status_code == 201, response.text
    assert response.json()["dora"] is True
    listed = {a["name"]: a for a in admin.get("/adapters").json()["adapters"]}
    assert listed["uploaded-dora"]["dora"] is True and listed["sentiment"]["dora"] is False
    broken_copy(dora_store / "dora-gen", tmp_path / "broken", _short)
    refused = upload(admin, "broken-dora", folder_files(tmp_path / "broken"))
    assert refused.status_code == 422
    assert "does not fit lora_B" in refused.json()["detail"]


def test_dora_rows_in_chunks_equal_peft(tiny_settings, dora_store, tiny_base, tokenizer):
    """Rows longer than max_batch_tokens run in chunks through their KV cache: a DoRA row's chunks too."""
    texts = ["the river runs past the old stone mill at night, and the miller's daughter counts the stars " * 2, "ok"]
    engine = Engine.from_settings(tiny_settings.model_copy(
        update={"adapters_dir": dora_store, "auto_merge": False, "max_batch_tokens": 16}))
    try:
        engine.batch_sizes.clear()
        _, results = engine.predict(location(dora_store, "dora-cls"), texts, GenerationParams())
        assert sum(engine.batch_sizes.values()) > len(texts)  # chunks, not one forward
        reference = peft_reference_probs(tiny_base, dora_store / "dora-cls", tokenizer, texts, len(LABELS))
        assert torch.allclose(probs(results, LABELS), reference, atol=1e-5)
        _, [generated] = engine.predict(location(dora_store, "dora-gen"), texts[:1], GREEDY)
        ids = engine.encode_for_generation(texts[:1], GREEDY)[0]
        assert generated.token_ids == peft_reference_greedy(tiny_base, dora_store / "dora-gen", ids, 12)
    finally:
        engine.close()
