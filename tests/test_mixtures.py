"""Per-request adapter mixtures equal PEFT's add_weighted_adapter of the same adapters and weights (float32): the
combined LoRA tensors within 1e-6 and the same greedy token ids, for linear, cat, ties, dare_linear and dare_ties on
two and three adapters; a mixture serves as one slot of the shared batch (mixed with plain, DoRA and base rows,
joining a running decode batch), is built once per distinct mixture and evicted like an adapter. Classification
adapters are refused, as PEFT refuses them (each saves its own head)."""

from __future__ import annotations

from queue import Queue

import pytest
import torch

from server.engine import Engine
from server.errors import AdapterNotFound, InvalidInput
from server.lora import resolve_module_path
from server.runner import GenerateJob
from server.types import GenerationParams, MixtureKey, MixturePart
from tests.conftest import LABELS
from tests.helpers import (
    assert_together_equals_alone, engine_with, greedy_ids, location, make_adapter, peft_mixture, peft_reference_greedy,
)

PROMPTS = ["What is the capital of France?", "Write a haiku"]
GREEDY = GenerationParams(max_new_tokens=12)
DENSITY = 0.6

# (combination, adapters, weights, density, seed): two and three adapters per combination; cat mixes ranks
CASES = {
    "linear-2": ("linear", ["m1", "m2"], [0.7, 0.3], None, None),
    "linear-3": ("linear", ["m1", "m2", "m3"], [0.5, -0.4, 1.2], None, None),
    "cat-2": ("cat", ["m1", "r8"], [0.7, 0.3], None, None),
    "cat-3": ("cat", ["m1", "m2", "r8"], [0.6, 0.9, -0.5], None, None),
    "ties-2": ("ties", ["m1", "m2"], [0.7, 0.3], DENSITY, None),
    "ties-3": ("ties", ["m1", "m2", "m3"], [1.0, 0.8, 0.5], DENSITY, None),
    "dare_linear-2": ("dare_linear", ["m1", "m2"], [0.7, 0.3], DENSITY, 7),
    "dare_linear-3": ("dare_linear", ["m1", "m2", "m3"], [0.5, 0.5, 0.5], DENSITY, 0),
    "dare_ties-2": ("dare_ties", ["m1", "m2"], [1.0, 0.6], DENSITY, 3),
    "dare_ties-3": ("dare_ties", ["m1", "m2", "m3"], [0.9, 0.7, 1.1], 0.4, 11),
}


@pytest.fixture(scope="module")
def mix_store(tmp_path_factory, tiny_base):
    root = tmp_path_factory.mktemp("mix-adapters")
    make_adapter(tiny_base, root / "m1", r=4, seed=41, targets=("q_proj", "v_proj"))
    make_adapter(tiny_base, root / "m2", r=4, seed=42, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    make_adapter(tiny_base, root / "m3", r=4, seed=43, targets=("q_proj", "gate_proj", "down_proj"))
    make_adapter(tiny_base, root / "r8", r=8, seed=44, targets=("v_proj", "up_proj"))
    make_adapter(tiny_base, root / "dora", r=4, seed=45, dora=True)
    make_adapter(tiny_base, root / "cls-a", task="SEQ_CLS", r=4, seed=46, labels=LABELS)
    make_adapter(tiny_base, root / "cls-b", task="SEQ_CLS", r=4, seed=47, labels=LABELS)
    return root


@pytest.fixture(scope="module")
def mix_engine(tiny_settings, mix_store):
    yield from engine_with(tiny_settings, adapters_dir=mix_store, auto_merge=False)


def mixture(store, names, weights, combination, density=None, seed=None) -> MixtureKey:
    parts = tuple(MixturePart(location(store, n), w) for n, w in zip(names, weights))
    return MixtureKey(parts, combination, density, seed)


@pytest.mark.parametrize("case", CASES)
def test_a_mixture_equals_peft_add_weighted_adapter(case, mix_engine, mix_store, tiny_base):
    combination, names, weights, density, seed = CASES[case]
    key = mixture(mix_store, names, weights, combination, density, seed)
    reference = peft_mixture(tiny_base, [mix_store / n for n in names], weights, combination, density, seed)
    slot = mix_engine.acquire(key)
    try:
        # the combined tensors: PEFT's "mix" pair (scale alpha / r = 1) against the pair in our slot
        compared = 0
        for name, module in reference.base_model.model.named_modules():
            if not hasattr(module, "lora_A") or "mix" not in module.lora_A:
                continue
            layer = mix_engine.layers[resolve_module_path(name, mix_engine.layers)]
            expected = module.lora_B["mix"].weight @ module.lora_A["mix"].weight * module.scaling["mix"]
            A, Bt = layer.pair(slot.index)
            assert torch.allclose(Bt.t() @ A, expected, atol=1e-6), (name, (Bt.t() @ A - expected).abs().max())
            compared += 1
        assert compared >= 4
        _, results = mix_engine.predict(key, PROMPTS, GREEDY)
    finally:
        mix_engine.release(slot)
    for prompt, result in zip(PROMPTS, results):
        ids = mix_engine.encode_for_generation([prompt], GREEDY)[0]
        assert result.token_ids == greedy_ids(reference, ids, 12)
    parts = [peft_reference_greedy(tiny_base, mix_store / n, ids, 12) for n in names]
    assert result.token_ids not in parts or len(set(map(tuple, parts))) == 1  # a mixture, not one of its parts


def test_dare_depends_on_its_seed_and_is_the_same_for_the_same_seed(mix_engine, mix_store):
    def pair(key):
        slot = mix_engine.acquire(key)
        try:
            layer = mix_engine.layers["model.layers.0.self_attn.q_proj"]
            return [t.clone() for t in layer.pair(slot.index)]
        finally:
            mix_engine.release(slot)

    first = pair(mixture(mix_store, ["m1", "m2"], [1.0, 1.0], "dare_linear", 0.5, 1))
    mix_engine.unload("m1")  # built again from the files
    again = pair(mixture(mix_store, ["m1", "m2"], [1.0, 1.0], "dare_linear", 0.5, 1))
    other = pair(mixture(mix_store, ["m1", "m2"], [1.0, 1.0], "dare_linear", 0.5, 2))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


def test_a_mixture_is_built_once_per_distinct_key_and_evicted_like_an_adapter(tiny_settings, mix_store):
    engine = Engine.from_settings(tiny_settings.model_copy(
        update={"adapters_dir": mix_store, "auto_merge": False, "max_loaded_adapters": 2}))
    try:
        linear = mixture(mix_store, ["m1", "m2"], [0.7, 0.3], "linear")
        same = mixture(mix_store, ["m1", "m2"], [0.7, 0.3], "linear")
        loads = []
        engine.observers.append(type("Loads", (), {"adapter_loaded": lambda _, n, s: loads.append(n),
                                                    "adapter_evicted": lambda _, n: None,
                                                    "batch_ran": lambda _, r: None})())
        first = engine.predict(linear, PROMPTS, GREEDY)[1]
        again = engine.predict(same, PROMPTS, GREEDY)[1]
        assert loads == [linear.name] and [r.token_ids for r in first] == [r.token_ids for r in again]
        assert engine.mixtures() == [linear.describe()]
        assert linear.describe()["adapters"] == [{"name": "m1", "version": 1, "weight": 0.7},
                                                 {"name": "m2", "version": 1, "weight": 0.3}]
        engine.predict(mixture(mix_store, ["m1", "m2"], [0.3, 0.7], "linear"), PROMPTS, GREEDY)  # other weights
        engine.predict(location(mix_store, "m3"), PROMPTS, GREEDY)  # a third key in two slots: the oldest goes
        assert linear not in engine.loaded() and engine.evictions == 1
        assert engine.loaded_kinds() == {"mixture": 1, "lora": 1}
        engine.unload("m2")  # replacing or deleting a part retires its mixtures
        assert engine.mixtures() == []
    finally:
        engine.close()


def test_mixture_rows_share_batches_with_plain_dora_and_base_rows(mix_engine, mix_store):
    key = mixture(mix_store, ["m1", "m2", "m3"], [0.5, 0.3, 0.4], "ties", DENSITY)
    held = [mix_engine.acquire(k) for k in (key, location(mix_store, "m1"), location(mix_store, "dora"))]
    try:
        assert_together_equals_alone(mix_engine, [s.index for s in held] + [0], GREEDY)
    finally:
        for slot in held:
            mix_engine.release(slot)


def test_a_mixture_joins_a_running_decode_batch(mix_engine, mix_store, tiny_base):
    plain = mix_engine.acquire(location(mix_store, "m3"))
    key = mixture(mix_store, ["m1", "r8"], [0.8, 0.4], "cat")
    try:
        long_params = GenerationParams(max_new_tokens=60, ignore_eos=True)
        long_ids = mix_engine.encode_for_generation(["Tell me a long story"], long_params)[0]
        job = GenerateJob([long_ids], plain.index, long_params, Queue())
        mix_engine.runner.generate(job)
        for _ in range(3):
            assert job.stream.get(timeout=30) is not None
        two_rows = mix_engine.batch_sizes[2]
        _, [short] = mix_engine.predict(key, ["a short one"], GenerationParams(max_new_tokens=6))
        assert not job.future.done() and mix_engine.batch_sizes[2] > two_rows  # decoded beside the long row
        job.future.result(timeout=60)
    finally:
        mix_engine.release(plain)
    reference = peft_mixture(tiny_base, [mix_store / "m1", mix_store / "r8"], [0.8, 0.4], "cat")
    ids = mix_engine.encode_for_generation(["a short one"], GREEDY)[0]
    assert short.token_ids == greedy_ids(reference, ids, 6)


def test_a_merged_mixture_equals_peft(mix_engine, mix_store, tiny_base):
    key = mixture(mix_store, ["m1", "m2"], [0.6, 0.6], "linear")
    slot = mix_engine.acquire(key)
    try:
        mix_engine.merge(slot)
        assert mix_engine.merged_adapter == key.name
        results = mix_engine.generate(PROMPTS, slot, GREEDY)
        mix_engine.unmerge()
    finally:
        mix_engine.release(slot)
    reference = peft_mixture(tiny_base, [mix_store / "m1", mix_store / "m2"], [0.6, 0.6], "linear")
    for prompt, result in zip(PROMPTS, results):
        assert result.token_ids == greedy_ids(reference, mix_engine.encode_for_generation([prompt], GREEDY)[0], 12)


def test_classification_adapters_are_refused_as_peft_refuses_them(mix_engine, mix_store, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    with pytest.raises(InvalidInput) as refused:
        mix_engine.predict(mixture(mix_store, ["cls-a", "cls-b"], [0.5, 0.5], "linear"), ["good"], GenerationParams())
    assert refused.value.field == "adapters" and "saves its own head" in str(refused.value)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=3, dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, mix_store / "cls-a", adapter_name="a")
    peft.load_adapter(mix_store / "cls-b", adapter_name="b")
    with pytest.raises(ValueError, match="modules_to_save"):  # PEFT itself refuses this mixture
        peft.add_weighted_adapter(["a", "b"], [0.5, 0.5], "mix", combination_type="linear")


@pytest.mark.parametrize("names, combination, problem", [
    (["m1", "r8"], "linear", "linear needs adapters of one rank, as in PEFT ('m1' r=4, 'r8' r=8)"),
    (["m1", "dora"], "cat", "'dora' is a DoRA adapter"),
    (["m1", "cls-a"], "cat", "the adapters are for different tasks (classification, generation)"),
])
def test_adapters_that_cannot_be_mixed_are_refused_with_the_reason(mix_engine, mix_store, names, combination,
                                                                   problem):
    with pytest.raises(InvalidInput) as refused:
        mix_engine.acquire(mixture(mix_store, names, [0.5, 0.5], combination))
    assert problem in str(refused.value)
    assert not mix_engine.mixtures() or all(m["combination"] != combination or [a["name"] for a in m["adapters"]]
                                            != names for m in mix_engine.mixtures())


# ---- HTTP ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mix_client(tiny_settings, mix_engine, mix_store):
    from fastapi.testclient import TestClient

    from server.api import create_app

    with TestClient(create_app(tiny_settings.model_copy(update={"adapters_dir": mix_store}), mix_engine)) as client:
        yield client


def test_predict_serves_a_mixture_from_the_body(mix_client, mix_engine, mix_store):
    body = {"inputs": PROMPTS, "parameters": {"max_new_tokens": 12},
            "adapters": [{"name": "m1", "weight": 0.7}, {"name": "m2", "weight": 0.3}], "combination": "ties",
            "density": DENSITY}
    response = mix_client.post("/predict", json=body)
    assert response.status_code == 200, response.text
    key = mixture(mix_store, ["m1", "m2"], [0.7, 0.3], "ties", DENSITY)
    assert response.json()["adapter"] == key.name == "mix:ties(m1@1*0.7+m2@1*0.3,density=0.6)"
    _, expected = mix_engine.predict(key, PROMPTS, GREEDY)
    assert [o["token_ids"] for o in response.json()["outputs"]] == [r.token_ids for r in expected]
    listed = mix_client.get("/adapters").json()
    assert key.describe() in listed["mixtures"]
    assert {a["name"]: a["dora"] for a in listed["adapters"]}["dora"] is True
    metrics = mix_client.get("/metrics").text
    assert 'loraswap_requests_total{adapter="__mixture__",status="200"} 1.0' in metrics
    assert 'loraswap_loaded_adapters_by_kind{kind="mixture"}' in metrics
    streamed = mix_client.post("/predict", json={**body, "inputs": PROMPTS[0], "stream": True})
    assert f'"token_ids": {expected[0].token_ids}' in streamed.text


@pytest.mark.parametrize("body, status, field, words", [
    ({"adapters": [{"name": "m1", "weight": 0.5}, {"name": "nope", "weight": 0.5}]}, 404, None, "nope"),
    ({"adapters": [{"name": "m1", "weight": 0.5}, {"name": "m1", "weight": 0.5}]}, 422, "adapters", "named twice"),
    ({"adapters": [{"name": "m1", "weight": 0.5}, {"name": "m2", "weight": 0.5}], "combination": "ties"}, 422,
     "density", "needs a density"),
    ({"adapters": [{"name": "m1", "weight": 0.5}, {"name": "m2", "weight": 0.5}], "density": 0.5}, 422, "density",
     "not to linear"),
    ({"adapters": [{"name": "m1", "weight": 0.5}, {"name": "m2", "weight": 0.5}], "mixture_seed": 1}, 422,
     "mixture_seed", "prune at random"),
    ({"adapters": [{"name": "m1", "weight": 0.5}], "combination": "cat"}, 422, "combination", "'linear' only"),
    ({"combination": "linear"}, 422, "combination", "applies to a mixture only"),
    ({"adapters": [{"name": "cls-a", "weight": 0.5}, {"name": "cls-b", "weight": 0.5}]}, 422, "adapters",
     "saves its own head"),
    ({"adapters": [{"name": "m1", "weight": 0.5}, {"name": "m2", "weight": "x"}]}, 422, "adapters[1].weight", ""),
    ({"adapters": [], "combination": "linear"}, 422, "adapters", ""),
    ({"adapters": [{"name": "m1", "weight": 1e300}, {"name": "m2", "weight": 0.5}]}, 422, "adapters[0].weight", ""),
    ({"adapters": [{"name": "m1", "weight": 0.5}, {"name": "m2", "weight": 0.5}], "combination": "svd"}, 422,
     "combination", ""),
])
def test_a_bad_mixture_is_refused_naming_the_field(mix_client, body, status, field, words):
    response = mix_client.post("/predict", json={"inputs": "hi", **body})
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert words in detail and (field is None or detail.startswith(f"{field}:")), detail


def test_a_mixture_and_a_query_adapter_together_are_422(mix_client):
    body = {"inputs": "hi", "adapters": [{"name": "m1", "weight": 0.5}, {"name": "m2", "weight": 0.5}]}
    response = mix_client.post("/predict?adapter=m1", json=body)
    assert response.status_code == 422 and response.json()["detail"].startswith("adapters:")


def test_openai_routes_take_a_mixture_in_the_body(mix_client, mix_engine, mix_store):
    base = mix_engine.info.name
    mix = {"adapters": [{"name": "m1", "weight": 0.4}, {"name": "m3", "weight": 0.9}], "combination": "dare_ties",
           "density": DENSITY, "mixture_seed": 5}
    answer = mix_client.post("/v1/completions", json={"model": base, "prompt": "Once upon", "max_tokens": 8,
                                                      "temperature": 0, **mix})
    assert answer.status_code == 200, answer.text
    key = mixture(mix_store, ["m1", "m3"], [0.4, 0.9], "dare_ties", DENSITY, 5)
    _, [expected] = mix_engine.predict(key, ["Once upon"], GenerationParams(max_new_tokens=8, chat=False))
    assert answer.json()["choices"][0]["text"] == expected.generated_text
    chat = mix_client.post("/v1/chat/completions", json={
        "model": base, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0, **mix})
    assert chat.status_code == 200, chat.text
    wrong = mix_client.post("/v1/completions", json={"model": "m1", "prompt": "x", **mix})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "model"
    refused = mix_client.post("/v1/completions", json={"model": base, "prompt": "x", **mix, "density": None,
                                                       "combination": "ties"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "density"


def test_an_unknown_part_is_404_before_anything_loads(mix_engine, mix_store):
    from server.registry import Registry
    from server.serving import resolve_mixture
    from server.schemas import PredictRequest
    from server.telemetry import RequestRecord

    registry = Registry(mix_store)
    registry.scan(mix_engine.check_adapter)
    body = PredictRequest(inputs="x", adapters=[{"name": "m1", "weight": 1.0}, {"name": "gone", "weight": 1.0}])
    with pytest.raises(AdapterNotFound):
        resolve_mixture(registry, RequestRecord(), body)
