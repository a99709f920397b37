"""/v1/embeddings: mean-pooled, normalized last hidden states with the adapter applied, against plain PEFT."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from tests.helpers import folder_files, make_adapter, peft_reference_embeddings, upload

TEXTS = ["a gorgeous, witty film", "dull", "the river runs past the old stone mill at night"]


def vectors(response) -> torch.Tensor:
    assert response.status_code == 200, response.text
    return torch.tensor([item["embedding"] for item in response.json()["data"]])


@pytest.mark.parametrize("model", ["gen-b", "sentiment", "base"])
def test_embeddings_equal_peft_with_the_adapter_applied(client, tiny_base, adapter_store, tokenizer, model):
    name = tiny_base.name if model == "base" else model
    response = client.post("/v1/embeddings", json={"model": name, "input": TEXTS})
    ours = vectors(response)
    reference = peft_reference_embeddings(tiny_base, None if model == "base" else adapter_store / model, TEXTS,
                                          tokenizer)
    assert ours.shape == (3, 64)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()
    body = response.json()
    tokens = sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert [item["index"] for item in body["data"]] == [0, 1, 2] and body["model"] == name


def test_base64_is_the_float32_bytes_and_ids_equal_their_text(client, tokenizer):
    floats = vectors(client.post("/v1/embeddings", json={"model": "gen-a", "input": "dull"}))[0]
    packed = client.post("/v1/embeddings", json={"model": "gen-a", "input": "dull", "encoding_format": "base64"})
    decoded = np.frombuffer(base64.b64decode(packed.json()["data"][0]["embedding"]), dtype="<f4")
    assert torch.equal(torch.from_numpy(decoded.copy()), floats)
    ids = vectors(client.post("/v1/embeddings", json={"model": "gen-a", "input": tokenizer("dull")["input_ids"]}))
    assert torch.equal(ids[0], floats)


def test_embeddings_batch_with_classifications(engine, adapter_store, tokenizer):
    """An embedding job and a classification job in one forward get what each gets alone."""
    from server.jobs import ClassifyJob, EmbedJob
    from server.types import AdapterLocation
    from tests.helpers import classify_together

    slot = engine.acquire(AdapterLocation("sentiment", 1, adapter_store / "sentiment"))
    try:
        rows = [tokenizer(t)["input_ids"] for t in TEXTS]
        together = classify_together(engine, [EmbedJob(rows[:2], 0), ClassifyJob(rows, slot), EmbedJob(rows, slot.index)])
        alone = [classify_together(engine, [job])[0] for job in
                 (EmbedJob(rows[:2], 0), ClassifyJob(rows, slot), EmbedJob(rows, slot.index))]
    finally:
        engine.release(slot)
    for mixed, single in zip(together, alone):
        for a, b in zip(mixed, single):
            values = (a.embedding, b.embedding) if hasattr(a, "embedding") else (list(a.scores.values()),
                                                                                   list(b.scores.values()))
            assert values[0] == pytest.approx(values[1], abs=1e-6)


def test_a_feature_extraction_adapter_uploads_and_embeds(admin, tiny_base, tmp_path, tokenizer):
    folder = make_adapter(tiny_base, tmp_path / "embedder", task="FEATURE_EXTRACTION", r=8, seed=9,
                          targets=("q_proj", "v_proj", "down_proj"))
    created = upload(admin, "embedder", folder_files(folder))
    assert created.status_code == 201, created.text
    assert created.json()["task"] == "embedding"
    ours = vectors(admin.post("/v1/embeddings", json={"model": "embedder", "input": TEXTS}))
    assert torch.allclose(ours, peft_reference_embeddings(tiny_base, folder, TEXTS, tokenizer), atol=1e-5)
    base = vectors(admin.post("/v1/embeddings", json={"model": tiny_base.name, "input": TEXTS}))
    assert (ours - base).abs().max() > 1e-2  # the adapter changes the vectors
    refused = admin.post("/predict?adapter=embedder", json={"inputs": "hi"})
    assert refused.status_code == 422
    assert refused.json()["detail"] == "adapter: 'embedder' is an adapter for embedding, not generation"


@pytest.mark.parametrize(
    "payload, param, message",
    [
        ({"model": "gen-a", "input": "hi", "dimensions": 32}, "dimensions",
         "dimensions: not supported: embeddings have the base's size, 64"),
        ({"model": "gen-a", "input": ["hi", " "]}, "input", "input: input 1 is empty"),
        ({"model": "gen-a", "input": [3, 99999]}, "input[0]",
         "input[0]: token id 99999 is outside the vocabulary (0 to 49151)"),
        ({"model": "gen-a", "input": "hi", "encoding_format": "int8"}, "encoding_format",
         "encoding_format: Input should be 'float' or 'base64'"),
        ({"model": "nope", "input": "hi"}, "model", "The model 'nope' does not exist (GET /v1/models lists the models)"),
    ],
)
def test_bad_embedding_requests_are_4xx_naming_the_param(client, payload, param, message):
    response = client.post("/v1/embeddings", json=payload)
    assert response.status_code == (404 if param == "model" else 400), response.text
    error = response.json()["error"]
    assert (error["param"], error["message"]) == (param, message)


def test_embeddings_count_in_the_metrics(client, tokenizer):
    from tests.test_metrics import scrape

    requests = ("loraswap_requests_total", (("adapter", "gen-b"), ("status", "200")))
    tokens = ("loraswap_input_tokens_total", (("adapter", "gen-b"),))
    before = scrape(client)
    assert client.post("/v1/embeddings", json={"model": "gen-b", "input": TEXTS}).status_code == 200
    after = scrape(client)
    assert after[requests] - before.get(requests, 0) == 1
    assert after[tokens] - before.get(tokens, 0) == sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)
